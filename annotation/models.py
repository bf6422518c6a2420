"""Database schema of the annotation app.

Timestamps are UNIX seconds (float) so SQLite and PostgreSQL compare them the same way.
Raw rankings are append-only: a correction is a new `rankings` row with revision + 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, false, inspect, text
from sqlalchemy.orm import DeclarativeBase, Mapped, configure_mappers, mapped_column, relationship

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; read by type checkers only

_mappers_configured = False


class Base(DeclarativeBase):
    @classmethod
    def transient(cls, **columns: Any) -> Self:
        """A transient instance holding `columns`, for a row read by hand-written SQL
        (`annotation.raw_sql`) that the caller only reads. Built without the attribute
        events the constructor fires for each column: about 4 us instead of 20-35 us, and
        the hot path builds a few on every ranking."""
        global _mappers_configured
        if not _mappers_configured:  # what the constructor would do first: every model is below
            configure_mappers()
            _mappers_configured = True
        instance = inspect(cls).class_manager.new_instance()  # the mapper's, as the constructor uses
        instance.__dict__.update(columns)
        return instance


class Meta(Base):
    """Key/value store for the schema version and the session secret generated on first start."""

    __tablename__ = "align_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(255))  # None: cannot log in
    role: Mapped[str] = mapped_column(String(16))  # admin | annotator | source (imported data)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[float] = mapped_column(Float)
    # Schema v5: the password last used to sign in no longer meets the rules (it was chosen
    # under an older one); set and cleared at each sign-in, cleared by a new password. The
    # pages and /api/me ask for a new one while it is set.
    password_change_required: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256; the token itself is never stored
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float)  # schema v2; v1 tokens get created_at + the default TTL


class WebSession(Base):
    __tablename__ = "web_sessions"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)


class Invite(Base):
    __tablename__ = "invites"
    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    used_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    project_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id"))  # schema v2: joins this project


class LoginFailures(Base):
    """Failed sign-ins counted per key (user and client, client, user) in a fixed window.
    In the database, so the limit holds across restarts and worker processes; the
    conditional UPDATE that reserves an attempt is what keeps concurrent guesses from all
    passing the check at once (NIST SP 800-63B section 5.2.2, rate limiting)."""

    __tablename__ = "login_failures"
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    window_start: Mapped[float] = mapped_column(Float)
    failures: Mapped[int] = mapped_column(Integer)


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    guidelines: Mapped[str] = mapped_column(Text, default="")  # Markdown
    k: Mapped[int] = mapped_column(Integer)  # candidates generated per prompt
    annotators_per_prompt: Mapped[int] = mapped_column(Integer)
    lease_seconds: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    # Schema v6, top-m rankings: annotators put only the best `rank_top` (m) candidates in
    # order and leave the rest an unordered group below them (they may order more). None:
    # every candidate is ranked.
    rank_top: Mapped[int | None] = mapped_column(Integer)


class ProjectMember(Base):
    """Annotators see and rank only the projects they are members of; admins see all."""

    __tablename__ = "project_members"
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True, index=True)
    added_at: Mapped[float] = mapped_column(Float)


class Prompt(Base):
    __tablename__ = "prompts"
    __table_args__ = (
        UniqueConstraint("project_id", "source_id"),
        # The leasing queue's order, id included, so "the least-annotated prompts" is an
        # ordered index scan that stops after a few rows instead of a sort of the project.
        Index("ix_prompts_queue", "project_id", "done_count", "slots_taken", "id"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    source_id: Mapped[str] = mapped_column(String(255))  # id in the imported file (or a content hash)
    content: Mapped[Any] = mapped_column(JSON)  # prompt text, or chat messages
    n_candidates: Mapped[int] = mapped_column(Integer, default=0)
    # slots_taken = annotators holding a live lease or done; the conditional
    # `UPDATE ... SET slots_taken = slots_taken + 1 WHERE slots_taken < N` is what keeps
    # two annotators from taking the last slot at once, on SQLite and PostgreSQL alike.
    slots_taken: Mapped[int] = mapped_column(Integer, default=0)
    done_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    candidates: Mapped[list[Candidate]] = relationship(order_by="Candidate.position", lazy="selectin")


class Candidate(Base):
    __tablename__ = "candidates"
    __table_args__ = (UniqueConstraint("prompt_id", "position"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # order in the source file / generation
    text: Mapped[str] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(String(255))
    sampling: Mapped[Any] = mapped_column(JSON, default=dict)
    source_id: Mapped[str | None] = mapped_column(String(255))


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("prompt_id", "user_id"),  # nobody ranks the same prompt twice
        Index("ix_assignments_lease", "project_id", "status", "leased_until"),
        Index("ix_assignments_user", "user_id", "project_id", "status"),
        # One live lease per annotator and project, whatever the tabs: two next-task
        # requests that both read "no live lease" cannot both insert one (schema v4).
        Index("ux_assignments_live", "user_id", "project_id", unique=True,
              sqlite_where=text("status = 'leased'"), postgresql_where=text("status = 'leased'")),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    status: Mapped[str] = mapped_column(String(16))  # leased | done | skipped | expired
    candidate_order: Mapped[Any] = mapped_column(JSON)  # candidate ids in the order this annotator saw them
    leased_until: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    completed_at: Mapped[float | None] = mapped_column(Float)


class RankingRow(Base):
    """One annotator's ranking of one prompt, one row per revision, never updated."""

    __tablename__ = "rankings"
    __table_args__ = (UniqueConstraint("prompt_id", "user_id", "revision"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    assignment_id: Mapped[int | None] = mapped_column(ForeignKey("assignments.id"))  # None for imported data
    revision: Mapped[int] = mapped_column(Integer)
    order: Mapped[Any] = mapped_column(JSON)  # [[best ids...], [next ids...], ...]; ids in one group are tied
    # Schema v6: a top-m ranking's ids left unordered below `order`, as sent; None (SQL
    # NULL) when `order` ranks every candidate.
    below: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    all_bad: Mapped[bool] = mapped_column(Boolean, default=False)
    skipped: Mapped[bool] = mapped_column(Boolean, default=False)
    skip_reason: Mapped[str | None] = mapped_column(Text)
    rationale: Mapped[str | None] = mapped_column(Text)
    time_spent_ms: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
