"""JSON API under /api (token auth for scripts; cookie + CSRF for the browser). Thin routes
over `annotation.services`."""

from __future__ import annotations

import os
import tempfile
from typing import Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from annotation import services
from annotation.deps import AdminUser, CurrentUser, SessionDep
from annotation.schemas import (
    ImportPublic,
    InviteCreate,
    InvitePublic,
    ProjectCreate,
    ProjectPublic,
    PromptsCreate,
    RankingCreate,
    RankingPublic,
    SkipCreate,
    TaskPublic,
    TokenCreate,
    TokenPublic,
    UserCreate,
    UserPublic,
)

router = APIRouter(prefix="/api", tags=["api"])


def client_id(request: Request) -> str:
    return request.client.host if request.client else "?"


def login_or_429(request: Request, db, username: str, password: str):
    """Shared by the token endpoint and the login form: throttled password check."""
    throttle = request.app.state.throttle
    wait = throttle.retry_after(username, client_id(request))
    if wait:
        raise HTTPException(429, f"too many failed sign-ins; try again in {wait} s", headers={"Retry-After": str(wait)})
    user = services.authenticate(db, username, password)
    if user is None:
        throttle.failed(username, client_id(request))
        return None
    throttle.succeeded(username, client_id(request))
    return user


def _project_public(db, p) -> ProjectPublic:
    return ProjectPublic(
        name=p.name, guidelines=p.guidelines, k=p.k, annotators_per_prompt=p.annotators_per_prompt,
        lease_seconds=p.lease_seconds, progress=services.project_progress(db, p),
    )


def _task_public(t: services.Task) -> TaskPublic:
    return TaskPublic(
        id=t.assignment_id, project=t.project, prompt=t.prompt,
        candidates=[{"id": c.id, "text": c.text} for c in t.candidates],
        status=t.status, leased_until=t.leased_until, revision=t.revision, order=t.order,
    )


def _ranking_public(r) -> RankingPublic:
    return RankingPublic(
        id=r.id, task_id=r.assignment_id, revision=r.revision, order=r.order, all_bad=r.all_bad,
        skipped=r.skipped, skip_reason=r.skip_reason, created_at=r.created_at,
    )


@router.post("/tokens", response_model=TokenPublic, status_code=201)
def create_token(body: TokenCreate, request: Request, db: SessionDep):
    """Exchange a username and password for an API token (send it as `Authorization: Bearer`)."""
    user = login_or_429(request, db, body.username, body.password)
    if user is None:
        raise HTTPException(401, "wrong username or password")
    return TokenPublic(token=services.issue_api_token(db, user), username=user.username, role=user.role)


@router.get("/me", response_model=UserPublic)
def me(user: CurrentUser):
    return UserPublic(id=user.id, username=user.username, role=user.role)


@router.post("/users", response_model=UserPublic, status_code=201)
def create_user(body: UserCreate, db: SessionDep, _admin: AdminUser):
    u = services.create_user(db, body.username, body.password, body.role)
    return UserPublic(id=u.id, username=u.username, role=u.role)


@router.post("/invites", response_model=InvitePublic, status_code=201)
def create_invite(body: InviteCreate, db: SessionDep, _admin: AdminUser):
    return InvitePublic(path=f"/invite/{services.create_invite(db, body.role)}")


@router.get("/projects", response_model=list[ProjectPublic])
def list_projects(db: SessionDep, _user: CurrentUser):
    return [_project_public(db, p) for p in services.list_projects(db)]


@router.post("/projects", response_model=ProjectPublic, status_code=201)
def create_project(body: ProjectCreate, db: SessionDep, _admin: AdminUser):
    p = services.create_project(db, body.name, k=body.k, annotators_per_prompt=body.annotators_per_prompt,
                                guidelines=body.guidelines, lease_seconds=body.lease_seconds)
    return _project_public(db, p)


@router.get("/projects/{name}", response_model=ProjectPublic)
def get_project(name: str, db: SessionDep, _user: CurrentUser):
    return _project_public(db, services.get_project(db, name))


@router.post("/projects/{name}/prompts", response_model=ImportPublic, status_code=201)
def add_prompts(name: str, body: PromptsCreate, db: SessionDep, _admin: AdminUser):
    from align.formats import Candidate, PromptRecord

    records = [
        PromptRecord(
            p.prompt, p.id,
            [Candidate(c) if isinstance(c, str) else Candidate(c.text, c.model, c.sampling) for c in p.candidates],
        )
        for p in body.prompts
    ]
    return ImportPublic(**vars(services.add_prompts(db, services.get_project(db, name), records)))


@router.post("/projects/{name}/import", response_model=ImportPublic, status_code=201)
async def import_file(
    name: str, request: Request, db: SessionDep, _admin: AdminUser,
    format: Literal["oasst", "hh", "trl", "prompts", "kwise"] = Query(description="format of the JSONL request body"),
):
    """Import a JSONL file sent as the raw request body (the project is created if missing)."""
    body = await request.body()
    fd, tmp = tempfile.mkstemp(suffix=".jsonl")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        try:
            report = await run_in_threadpool(services.import_file, db, name, format, tmp)
        except services.ServiceError:
            raise
        except services.UserError as exc:  # the file reader's message names the line
            raise HTTPException(422, str(exc).replace(tmp, "body")) from None
        return ImportPublic(**vars(report))
    finally:
        os.unlink(tmp)


@router.post("/projects/{name}/next", response_model=TaskPublic, responses={204: {"description": "no task left for you"}})
def next_task(name: str, db: SessionDep, user: CurrentUser):
    """Lease the next task in the project (or get back your current one). 204 when none is left."""
    task = services.next_task(db, user, services.get_project(db, name))
    if task is None:
        return Response(status_code=204)
    return _task_public(task)


@router.get("/tasks/{task_id}", response_model=TaskPublic)
def get_task(task_id: int, db: SessionDep, user: CurrentUser):
    return _task_public(services.get_task(db, user, task_id))


@router.post("/tasks/{task_id}/ranking", response_model=RankingPublic, status_code=201)
def submit_ranking(task_id: int, body: RankingCreate, db: SessionDep, user: CurrentUser):
    """Submit the ranking of a leased task (409 if it was submitted already)."""
    row = services.submit_ranking(db, user, task_id, body.order, all_bad=body.all_bad,
                                  rationale=body.rationale, time_spent_ms=body.time_spent_ms)
    return _ranking_public(row)


@router.put("/tasks/{task_id}/ranking", response_model=RankingPublic, status_code=201)
def revise_ranking(task_id: int, body: RankingCreate, db: SessionDep, user: CurrentUser):
    """Correct a submitted ranking: stored as a new revision; earlier ones are kept."""
    row = services.revise_ranking(db, user, task_id, body.order, all_bad=body.all_bad,
                                  rationale=body.rationale, time_spent_ms=body.time_spent_ms)
    return _ranking_public(row)


@router.post("/tasks/{task_id}/skip", response_model=RankingPublic, status_code=201)
def skip_task(task_id: int, body: SkipCreate, db: SessionDep, user: CurrentUser):
    return _ranking_public(services.skip_task(db, user, task_id, body.reason))


@router.get("/projects/{name}/export", response_class=PlainTextResponse)
def export(name: str, db: SessionDep, _admin: AdminUser, format: Literal["kwise", "pairs", "hh"] = "kwise"):
    """The project's rankings as JSONL: kwise (one line per annotator and prompt), pairs (TRL), hh."""
    import json

    rows = services.export_rows(db, services.get_project(db, name), format)
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return PlainTextResponse(body, media_type="application/x-ndjson")


@router.get("/projects/{name}/dashboard")
def dashboard(name: str, db: SessionDep, _admin: AdminUser) -> dict:
    """Progress, per-annotator counts and median time, agreement metrics, flagged items."""
    return services.dashboard(db, services.get_project(db, name))
