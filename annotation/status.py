"""The HTTP status each domain error of the service layer is answered with (API and pages alike),
and the JSON body of a refusal."""

from __future__ import annotations

from typing import Any

from annotation import services

# Domain errors of the service layer -> HTTP status.
HTTP_STATUS = {
    services.Unauthorized: 401,
    services.NotFound: 404,
    services.Forbidden: 403,
    services.Conflict: 409,
    services.Invalid: 422,
    services.Throttled: 429,
    services.StorageFull: 507,
}


def http_status(exc: Exception) -> int:
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 400


def error_body(detail: Any, code: str | None) -> dict[str, Any]:
    """A refusal's JSON: its words, and the code of the few a client answers in its own way
    (ServiceError.code, deps.CsrfRejected.code)."""
    return {"detail": detail} if code is None else {"detail": detail, "code": code}
