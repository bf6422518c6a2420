"""Projects and their members."""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from sqlalchemy import exists, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from annotation.models import Project, ProjectMember, User
from annotation.raw_sql import Sql, transaction
from annotation.services._tx import insert_unique, read_only, unit_of_work
from annotation.services.errors import Conflict, Invalid, NotFound
from annotation.services.slots import release_live_leases

MAX_CANDIDATES = 16


def check_project_name(name: Any) -> str:
    if not isinstance(name, str):
        raise Invalid("project name must be text")
    name = name.strip()
    if not name or len(name) > 128 or "/" in name or any(not ch.isprintable() for ch in name):
        raise Invalid("project name must be 1-128 printable characters without '/'")
    if name in (".", ".."):  # a client (browsers, curl, httpx) drops such a segment from an address
        raise Invalid(f"project name cannot be {name!r}: addresses drop such a path segment")
    return name


@unit_of_work
def create_project(
    db: Session,
    name: str,
    *,
    k: int = 4,
    annotators_per_prompt: int = 1,
    guidelines: str = "",
    lease_seconds: int = 900,
    rank_top: int | None = None,
) -> Project:
    """A project whose prompts get `k` candidates each, ranked by `annotators_per_prompt`
    annotators; with `rank_top` (m, 1 <= m < k) they rank only the best m (top-m)."""
    name = check_project_name(name)
    checks = [("k", k, 2, MAX_CANDIDATES), ("annotators_per_prompt", annotators_per_prompt, 1, 100),
              ("lease_seconds", lease_seconds, 10, 7 * 86400)]
    if rank_top is not None:
        checks.append(("rank_top", rank_top, 1, k - 1 if isinstance(k, int) else 1))
    for what, value, lo, hi in checks:
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise Invalid(f"{what} must be an integer between {lo} and {hi}, got {value!r}")
    if not isinstance(guidelines, str) or len(guidelines) > 100_000 or "\x00" in guidelines:
        raise Invalid("guidelines must be text of at most 100000 characters, without NUL characters")
    if db.scalar(select(Project.id).where(Project.name == name)) is not None:
        raise Conflict(f"project {name!r} already exists")
    project = Project(
        name=name, guidelines=guidelines or "", k=k, annotators_per_prompt=annotators_per_prompt,
        lease_seconds=lease_seconds, created_at=time.time(), rank_top=rank_top,
    )
    return insert_unique(db, project, f"project {name!r} already exists")


@read_only
def get_project(db: Session, name: str) -> Project:
    project = db.scalar(select(Project).where(Project.name == name))
    if project is None:
        raise NotFound(f"no project {name!r}")
    return project


class VisibleProjectRow(NamedTuple):
    """A project as a user may see it: its columns, then `member` (None unless they are one)."""

    id: int
    name: str
    guidelines: str
    k: int
    annotators_per_prompt: int
    lease_seconds: int
    created_at: float
    rank_top: int | None
    member: int | None


VISIBLE_PROJECT_COLUMNS = ", ".join(
    "m.user_id AS member" if f == "member" else f"proj.{f}" for f in VisibleProjectRow._fields)
VISIBLE_PROJECT_FROM = "projects proj LEFT JOIN project_members m ON m.project_id = proj.id AND m.user_id = :user"
_PROJECT_FOR = Sql(f"SELECT {VISIBLE_PROJECT_COLUMNS} FROM {VISIBLE_PROJECT_FROM} WHERE proj.name = :name")


def visible_project(user: User, name: str, row: tuple | None) -> Project:
    """The project read with VISIBLE_PROJECT_COLUMNS (`row`, None if there is none by that
    name), as `user` may see it: admins see every project, others only those they are
    members of (anything else is reported as not found, so names do not leak). It comes
    back as a plain (transient) Project to read from."""
    visible = None if row is None else VisibleProjectRow(*row)
    if visible is None or (visible.member is None and user.role != "admin"):
        raise NotFound(f"no project {name!r}")
    columns = visible._asdict()
    del columns["member"]
    return Project.transient(**columns)


def project_for(db: Session, user: User, name: str) -> Project:
    """The project `name` as `user` may see it (see `visible_project`); NotFound if they
    may not. One indexed read."""
    with transaction(db, write=False) as tx:
        return visible_project(user, name, _PROJECT_FOR.first(tx, user=user.id, name=name))


@unit_of_work
def get_or_create_project(db: Session, name: str, **kwargs: Any) -> Project:
    name = check_project_name(name)  # as create_project stores it: " x " finds the project "x"
    project = db.scalar(select(Project).where(Project.name == name))
    return project if project is not None else create_project(db, name, **kwargs)


@read_only
def list_projects(db: Session, user: User | None = None) -> list[Project]:
    """All projects, or those `user` may see (admins: all; others: their memberships)."""
    q = select(Project).order_by(Project.name)
    if user is not None and user.role != "admin":
        q = q.where(exists().where(ProjectMember.project_id == Project.id, ProjectMember.user_id == user.id))
    return list(db.scalars(q))


@read_only
def is_member(db: Session, project: Project, user: User) -> bool:
    return db.scalar(select(ProjectMember.user_id).where(
        ProjectMember.project_id == project.id, ProjectMember.user_id == user.id)) is not None


@unit_of_work
def add_member(db: Session, project: Project, user: User) -> bool:
    """Make `user` a member of `project` (True if they were not one already). An imported
    annotator's account (role "source") never signs in: there is no such user to add."""
    if user.role == "source":
        raise NotFound(f"no user {user.username!r}")
    if db.scalar(select(ProjectMember.user_id).where(
            ProjectMember.project_id == project.id, ProjectMember.user_id == user.id)) is not None:
        return False
    db.add(ProjectMember(project_id=project.id, user_id=user.id, added_at=time.time()))
    try:
        db.commit()
    except IntegrityError:  # added by someone else at the same moment
        db.rollback()
        return False
    return True


_REMOVE_MEMBER = Sql("DELETE FROM project_members WHERE project_id = :project AND user_id = :user")


@unit_of_work
def remove_member(db: Session, project: Project, user: User) -> bool:
    """`user` leaves `project` (False if they were not a member): their tasks in it can no
    longer be read, submitted, revised or skipped, and their live lease there is expired in
    the same transaction, so its slot goes to another annotator at once."""
    with transaction(db, write=True) as tx:
        removed = _REMOVE_MEMBER.rowcount(tx, project=project.id, user=user.id) == 1
        release_live_leases(tx, user.id, project.id)
    return removed


@read_only
def members(db: Session, project: Project) -> list[User]:
    return list(db.scalars(select(User).join(ProjectMember, ProjectMember.user_id == User.id)
                           .where(ProjectMember.project_id == project.id).order_by(User.username)))
