"""Domain errors of the service layer. They say what is wrong in words a user can act on;
the web layer maps each kind to an HTTP status (annotation.status.HTTP_STATUS) and the CLI
prints the message as one line (they are `UserError`s)."""

from __future__ import annotations

from align.errors import UserError


class ServiceError(UserError):
    """Base of every error a service function raises on purpose. `code` names, in a word a client
    can branch on, the few conditions a client answers in its own way (the JSON API's "code"
    field: the annotator's page says what happened and offers the way on without reading the
    wording of the message, which may change)."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


class NotFound(ServiceError):
    """The named thing does not exist (or is not visible to this user)."""


class Unauthorized(ServiceError):
    """The request's credentials are missing, unknown, expired or revoked."""


class Forbidden(ServiceError):
    """The user may not do this."""


class Conflict(ServiceError):
    """The request clashes with the current state (already exists, already submitted)."""


class Invalid(ServiceError):
    """The input itself is wrong (type, range, length, content)."""


class StorageFull(ServiceError):
    """The database's disk is full: nothing of the request was stored (HTTP 507)."""


class Throttled(ServiceError):
    """Too many failed attempts; `retry_after` seconds until the next is allowed."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


def not_a_member(task_id: int) -> Forbidden:
    """A task of a project its annotator was removed from (members-only requests)."""
    return Forbidden(f"task {task_id} is in a project you are no longer a member of")


def another_annotators(task_id: int) -> Forbidden:
    return Forbidden(f"task {task_id} belongs to another annotator")


def disk_full(exc: BaseException) -> bool:
    """Whether a database error says its disk is full (SQLite: "database or disk is full";
    PostgreSQL: "No space left on device")."""
    text = str(exc)
    return "disk is full" in text or "No space left on device" in text
