"""Request and response bodies of the JSON API (create/public split)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenCreate(_Strict):
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)


class TokenPublic(BaseModel):
    token: str
    username: str
    role: str


class UserCreate(_Strict):
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)
    role: Literal["admin", "annotator"] = "annotator"


class UserPublic(BaseModel):
    id: int
    username: str
    role: str


class InviteCreate(_Strict):
    role: Literal["admin", "annotator"] = "annotator"


class InvitePublic(BaseModel):
    path: str  # open <server>/invite/<token> to choose a username and password


class ProjectCreate(_Strict):
    name: str = Field(max_length=128)
    guidelines: str = Field(default="", max_length=100_000, description="Markdown shown to annotators")
    k: int = Field(default=4, ge=2, le=16, description="candidates per prompt")
    annotators_per_prompt: int = Field(default=1, ge=1, le=100)
    lease_seconds: int = Field(default=900, ge=10, le=7 * 86400)


class ProjectPublic(BaseModel):
    name: str
    guidelines: str
    k: int
    annotators_per_prompt: int
    lease_seconds: int
    progress: dict[str, int]


class CandidateCreate(_Strict):
    text: str
    model: Optional[str] = None
    sampling: dict[str, Any] = Field(default_factory=dict)


class PromptCreate(_Strict):
    prompt: str | list[dict[str, str]]
    id: Optional[str] = Field(default=None, max_length=255)
    candidates: list[str | CandidateCreate] = Field(default_factory=list, max_length=16)


class PromptsCreate(_Strict):
    prompts: list[PromptCreate] = Field(max_length=10_000)


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
    order: Optional[list[list[int]]] = None


class RankingCreate(_Strict):
    order: list[Any] = Field(
        description="groups of candidate ids, best first; ids in one group are tied, e.g. [[3], [1, 2], [4]]",
        max_length=16,
    )
    all_bad: bool = False
    rationale: Optional[str] = Field(default=None, max_length=2000)
    time_spent_ms: Optional[int] = Field(default=None, ge=0)


class SkipCreate(_Strict):
    reason: str = Field(min_length=1, max_length=2000)


class RankingPublic(BaseModel):
    id: int
    task_id: Optional[int]
    revision: int
    order: Optional[list[list[int]]]
    all_bad: bool
    skipped: bool
    skip_reason: Optional[str]
    created_at: float
