"""Request and response bodies of the JSON API (create/public split)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from annotation.limits import MAX_TIME_SPENT_MS

Text = Annotated[str, Field(max_length=100_000)]


class _Strict(BaseModel):
    """Request bodies: unknown fields refused, and no coercion ("yes" is not true, "3" is not 3)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class TokenCreate(_Strict):
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)


class TokenPublic(BaseModel):
    token: str
    username: str
    role: str
    password_change_required: bool = Field(
        default=False, description="the password used no longer meets the rules: choose a new one (PUT /api/me/password)")


class UserCreate(_Strict):
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)
    role: Literal["admin", "annotator"] = "annotator"


class UserPublic(BaseModel):
    id: int
    username: str
    role: str
    active: bool = True
    password_change_required: bool = Field(
        default=False, description="the password last used no longer meets the rules: choose a new one (PUT /api/me/password)")


class PasswordChange(_Strict):
    current_password: str = Field(max_length=1024)
    new_password: str = Field(max_length=1024)


class MemberCreate(_Strict):
    username: str = Field(max_length=64)


class InviteCreate(_Strict):
    role: Literal["admin", "annotator"] = "annotator"
    project: str | None = Field(default=None, max_length=128, description="the new account joins this project")


class InvitePublic(BaseModel):
    path: str  # open <server>/invite/<token> to choose a username and password


class ProjectCreate(_Strict):
    name: str = Field(max_length=128)
    guidelines: str = Field(default="", max_length=100_000, description="Markdown shown to annotators")
    k: int = Field(default=4, ge=2, le=16, description="candidates per prompt")
    annotators_per_prompt: int = Field(default=1, ge=1, le=100)
    lease_seconds: int = Field(default=900, ge=10, le=7 * 86400)
    rank_top: int | None = Field(default=None, ge=1, le=15, description=(
        "top-m: annotators rank only the best m candidates (1 <= m < k) and leave the rest unordered below; "
        "omit to rank every candidate"))


class ProjectPublic(BaseModel):
    name: str
    guidelines: str
    k: int
    annotators_per_prompt: int
    lease_seconds: int
    rank_top: int | None = None
    progress: dict[str, int]


class CandidateCreate(_Strict):
    text: Text
    model: str | None = Field(default=None, max_length=255)
    sampling: dict[str, Any] = Field(default_factory=dict)


class Message(_Strict):
    role: str = Field(max_length=64)
    content: Text


class PromptCreate(_Strict):
    prompt: Text | list[Message] = Field(description="text, or chat messages [{role, content}]")
    id: str | None = Field(default=None, min_length=1, max_length=255)
    candidates: list[Text | CandidateCreate] = Field(
        default_factory=list, max_length=16, description="none (generate later) or exactly the project's K")


class PromptsCreate(_Strict):
    prompts: list[PromptCreate] = Field(min_length=1, max_length=10_000)


class ImportPublic(BaseModel):
    prompts_added: int
    candidates_added: int
    rankings_added: int
    duplicates_skipped: int


class CandidatePublic(BaseModel):
    id: int
    text: str


class TaskPublic(BaseModel):
    id: int  # the task (assignment) id
    project: str
    prompt: str | list[dict[str, str]]
    candidates: list[CandidatePublic]  # in this annotator's order
    status: str  # leased | done | skipped | expired
    leased_until: float
    revision: int
    order: list[list[int]] | None = None
    below: list[int] | None = None  # the stored ranking's unordered rest, if it was a top-m one
    rank_top: int | None = None  # the project ranks only the best m (None: every candidate)
    all_bad: bool = False  # of the stored ranking, if ranked
    rationale: str | None = None  # of the stored ranking, if ranked


class RankingCreate(_Strict):
    # Checked by services.validate_order, whose messages name the wrong id (a union type
    # here would answer with pydantic's less readable per-branch errors).
    order: Annotated[list[Any], WithJsonSchema({
        "type": "array", "minItems": 1, "maxItems": 16,
        "items": {"anyOf": [{"type": "integer"}, {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 16}]},
    })] = Field(
        description="groups of candidate ids, best first; ids in one group are tied, e.g. [[3], [1, 2], [4]]",
        max_length=16,
    )
    below: Annotated[list[Any] | None, WithJsonSchema({
        "type": "array", "maxItems": 16, "items": {"type": "integer"},
    })] = Field(default=None, max_length=16, description=(
        "top-m projects: the candidate ids left unranked, an unordered group below those in order "
        "(order then ranks at least the project's rank_top); omit for a full ranking"))
    all_bad: bool = False
    rationale: str | None = Field(default=None, max_length=2000)
    time_spent_ms: int | None = Field(default=None, ge=0, le=MAX_TIME_SPENT_MS)


class SkipCreate(_Strict):
    reason: str = Field(min_length=1, max_length=2000)


class ValidationProblem(BaseModel):
    """One way a request does not match its schema: pydantic's error without the values sent."""

    type: str = Field(description="pydantic's error type, e.g. missing, int_type, string_too_long")
    loc: list[str | int] = Field(description='where: "body", "query", "path" or "header", then the field')
    msg: str


class ErrorPublic(BaseModel):
    """The body of every refusal, whatever its status (annotation.app's exception handlers)."""

    detail: str = Field(description="what is wrong, in one line a person can act on")
    code: Literal["already_ranked", "already_skipped", "lease_expired", "csrf_token"] | None = Field(
        default=None, description=(
            "present on the few refusals a client answers in its own way: already_ranked, already_skipped "
            "(409: the task was ranked or skipped already), lease_expired (409: the lease ran out and the "
            "prompt has all its annotators, or a lease that ran out is not renewed), csrf_token (403: a "
            "browser request without the page's token; reload the page)"))
    errors: list[ValidationProblem] | None = Field(
        default=None, description="422 for a request that does not match its schema: each problem, as detail names them")


class LeasePublic(BaseModel):
    """A renewed lease: when it now runs out (seconds since the epoch)."""

    id: int
    leased_until: float


class RankingPublic(BaseModel):
    id: int
    task_id: int | None
    revision: int
    order: list[list[int]] | None
    below: list[int] | None = None
    all_bad: bool
    skipped: bool
    skip_reason: str | None
    created_at: float
