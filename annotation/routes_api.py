"""JSON API under /api (token auth for scripts; cookie + CSRF for the browser). Thin routes
over `annotation.services`, grouped by resource; domain errors become HTTP statuses in
annotation.app."""

from __future__ import annotations

import os
import tempfile
from typing import Annotated, Literal

import anyio.to_process
from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from annotation import services
from annotation.deps import AdminUser, Caller, CurrentUser, SessionDep, presented_credential
from annotation.limits import MAX_DB_INT
from annotation.offload import dashboard_at, export_file_at, import_body_at
from annotation.schemas import (
    ErrorPublic,
    ImportPublic,
    InviteCreate,
    InvitePublic,
    LeasePublic,
    MemberCreate,
    PasswordChange,
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

# --------------------------------------------------------------------------- refusals in the schema
# Every refusal is an ErrorPublic (annotation.app's exception handlers, deps, the middleware).
# The router declares those any route can answer; each route adds its own, as its
# dependencies and services can raise them, so that a generated client knows each status.
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again", "required": True,
                               "schema": {"type": "integer"}}}
SIGN_IN = ("not signed in: no credentials, or an API token or session that is unknown, expired or revoked, "
           "or whose account is deactivated")
ADMINS_ONLY = "admins only"
CSRF = ('a browser (cookie) request without the page\'s CSRF token ("code": "csrf_token"; reload the page)')
NOT_YOURS = "the task belongs to another annotator, or is in a project you are no longer a member of"
INVALID = ('the request does not match its schema ("errors" lists each problem) or a value in it is refused; '
           '"detail" names the problem')
NO_PROJECT = "no such project (or you are not a member of it)"
NO_TASK = "no such task"
NO_USER = "no such user"
DISK_FULL = "the database's disk is full: nothing of the request was stored"
# FastAPI's own answer to a body it cannot decode (JSON that is not UTF-8 text); JSON it cannot parse is a 422.
JSON_BODY = {400: "the body could not be read: JSON must be UTF-8 text"}
ADMIN_WRITE = {403: f"{ADMINS_ONLY}; or {CSRF}", 422: INVALID, 507: DISK_FULL}
ADMIN_READ_PROJECT = {403: ADMINS_ONLY, 404: NO_PROJECT, 422: INVALID}


def refusals(described: dict[int, str]) -> dict[int | str, dict]:
    """OpenAPI responses for refusals, status -> description, each an ErrorPublic."""
    return {status: {"model": ErrorPublic, "description": description,
                     **({"headers": RETRY_AFTER} if status in (429, 503) else {})}
            for status, description in described.items()}


router = APIRouter(prefix="/api", tags=["api"], responses=refusals({
    401: SIGN_IN,
    413: "the request body is over the server's limit (an import's is larger)",
    503: "the server is busy (too many requests at once, or the database stayed locked); try again after Retry-After",
}))
TaskId = Annotated[int, Path(ge=1, le=MAX_DB_INT, description="task id")]
ProjectName = Annotated[str, Path(max_length=128, description="project name")]
Username = Annotated[str, Path(max_length=64)]


def client_id(request: Request) -> str:
    return request.client.host if request.client else "?"


def sign_in(request: Request, db, username: str, password: str):
    """Shared by the token endpoint and the login form: throttled password check (the
    counts live in the database, so they hold across restarts and worker processes)."""
    settings = request.app.state.settings
    return services.sign_in(db, username, password, client_id(request),
                            max_failures=settings.login_max_failures, window_s=settings.login_window_s)


def _project_public(db, p) -> ProjectPublic:
    return ProjectPublic(
        name=p.name, guidelines=p.guidelines, k=p.k, annotators_per_prompt=p.annotators_per_prompt,
        lease_seconds=p.lease_seconds, rank_top=p.rank_top, progress=services.project_progress(db, p),
    )


def _user_public(u) -> UserPublic:
    return UserPublic(id=u.id, username=u.username, role=u.role, active=u.active,
                      password_change_required=u.password_change_required)


def _task_public(t: services.Task) -> TaskPublic:
    return TaskPublic(
        id=t.assignment_id, project=t.project, prompt=t.prompt,
        candidates=[{"id": c.id, "text": c.text} for c in t.candidates],
        status=t.status, leased_until=t.leased_until, revision=t.revision, order=t.order, below=t.below,
        rank_top=t.rank_top, all_bad=t.all_bad, rationale=t.rationale,
    )


def _ranking_public(r) -> RankingPublic:
    return RankingPublic(
        id=r.id, task_id=r.assignment_id, revision=r.revision, order=r.order, below=r.below, all_bad=r.all_bad,
        skipped=r.skipped, skip_reason=r.skip_reason, created_at=r.created_at,
    )


# --------------------------------------------------------------------------- tasks and rankings
# First: the router tries routes in order, and every ranking makes two of these requests.


@router.post("/projects/{name}/next", response_model=TaskPublic, responses={
    204: {"description": "no task left for you"},
    **refusals({403: CSRF, 404: NO_PROJECT, 422: INVALID, 507: DISK_FULL})})
def next_task(name: ProjectName, db: SessionDep, caller: Caller):
    """Lease the next task in the project (or get back your current one). 204 when none is left."""
    # A plain function, run in the threadpool like every route that uses the database: its
    # statements are short, but a commit waits for the disk and a busy database for its
    # writer lock, and neither may hold up the event loop and every other request with it.
    task = services.next_task_in(db, caller, name)
    if task is None:
        return Response(status_code=204)
    return _task_public(task)


@router.get("/tasks/{task_id}", response_model=TaskPublic,
            responses=refusals({403: NOT_YOURS, 404: NO_TASK, 422: INVALID}))
def get_task(task_id: TaskId, db: SessionDep, user: CurrentUser):
    return _task_public(services.get_task(db, user, task_id, members_only=True))


# The refusals a client answers in its own way carry a "code" beside "detail" (ServiceError.code).
TASK_REFUSALS = {403: f"{NOT_YOURS}; or {CSRF}", 404: NO_TASK, 422: INVALID, 507: DISK_FULL}


@router.post("/tasks/{task_id}/ranking", response_model=RankingPublic, status_code=201, responses=refusals({
    **JSON_BODY, **TASK_REFUSALS,
    409: 'the task is already ranked or skipped ("code": "already_ranked", "already_skipped"), or its lease '
         'expired and the prompt has all its annotators ("code": "lease_expired")'}))
def submit_ranking(task_id: TaskId, body: RankingCreate, db: SessionDep, caller: Caller):
    """Submit the ranking of a leased task (409 if it was submitted already)."""
    row = services.submit_ranking(db, caller, task_id, body.order, below=body.below, all_bad=body.all_bad,
                                  rationale=body.rationale, time_spent_ms=body.time_spent_ms,
                                  members_only=True)  # threadpool: see next_task
    return _ranking_public(row)


@router.put("/tasks/{task_id}/ranking", response_model=RankingPublic, status_code=201, responses={
    200: {"model": RankingPublic, "description": "the ranking is the same as your latest revision (order, below, "
                                                 "all_bad, rationale): nothing stored, that revision returned"},
    **refusals({**JSON_BODY, **TASK_REFUSALS, 409: 'the task has no ranking yet (submit it first), or it was skipped '
                                      '("code": "already_skipped": a skipped task cannot be ranked)'})})
def revise_ranking(task_id: TaskId, body: RankingCreate, db: SessionDep, user: CurrentUser, response: Response):
    """Correct a submitted ranking: stored as a new revision (201); earlier ones are kept.
    Idempotent: the same ranking as your latest revision stores nothing and answers that
    revision with 200, so a PUT sent again (a client's retry after a lost answer) adds none."""
    row, stored = services.revise_ranking(db, user, task_id, body.order, below=body.below, all_bad=body.all_bad,
                                          rationale=body.rationale, time_spent_ms=body.time_spent_ms,
                                          members_only=True)
    if not stored:
        response.status_code = 200
    return _ranking_public(row)


@router.post("/tasks/{task_id}/skip", response_model=RankingPublic, status_code=201, responses=refusals({
    **JSON_BODY, **TASK_REFUSALS,
    409: 'the task is already ranked or skipped ("code": "already_ranked", "already_skipped")'}))
def skip_task(task_id: TaskId, body: SkipCreate, db: SessionDep, user: CurrentUser):
    return _ranking_public(services.skip_task(db, user, task_id, body.reason, members_only=True))


@router.post("/tasks/{task_id}/lease", response_model=LeasePublic, responses=refusals({
    **TASK_REFUSALS,
    409: 'the task is already ranked or skipped ("code": "already_ranked", "already_skipped"), or its lease ran '
         'out, which is not renewed ("code": "lease_expired"; a ranking sent now still counts if the prompt has a '
         'free slot)'}))
def renew_lease(task_id: TaskId, db: SessionDep, user: CurrentUser):
    """Keep your live lease on a task while you work on it: it runs for the project's
    lease_seconds from now. The ranking page sends this while its annotator is active."""
    return LeasePublic(id=task_id, leased_until=services.renew_lease(db, user, task_id, members_only=True))


# --------------------------------------------------------------------------- tokens and users


@router.post("/tokens", response_model=TokenPublic, status_code=201, responses=refusals({
    **JSON_BODY,
    401: "wrong username or password", 422: INVALID,
    429: "too many failed sign-ins for this username or address; try again after Retry-After", 507: DISK_FULL}))
def create_token(body: TokenCreate, request: Request, db: SessionDep):
    """Exchange a username and password for an API token (send it as `Authorization: Bearer`).
    The token expires after the server's token lifetime (30 days by default)."""
    user = sign_in(request, db, body.username, body.password)
    if user is None:
        raise HTTPException(401, "wrong username or password")
    token = services.issue_api_token(db, user, request.app.state.settings.api_token_ttl_s)
    return TokenPublic(token=token, username=user.username, role=user.role,
                       password_change_required=user.password_change_required)


@router.delete("/tokens/current", status_code=204, responses=refusals({
    400: "signed in with a session cookie: send the token to revoke as 'Authorization: Bearer <token>'",
    403: CSRF, 507: DISK_FULL}))
def revoke_token(request: Request, db: SessionDep, _user: CurrentUser):
    """Sign out a script: revoke the API token this request was sent with."""
    credential = presented_credential(request)
    if not isinstance(credential, services.BearerToken):
        raise HTTPException(400, "send the token to revoke as 'Authorization: Bearer <token>'")
    services.revoke_api_token(db, credential.token)
    return Response(status_code=204)


@router.get("/me", response_model=UserPublic)
def me(user: CurrentUser):
    return _user_public(user)


@router.put("/me/password", status_code=204, responses=refusals({
    **JSON_BODY,
    403: f"the current password is wrong; or {CSRF}", 422: INVALID,
    429: "too many wrong passwords; try again after Retry-After", 507: DISK_FULL}))
def change_password(body: PasswordChange, request: Request, db: SessionDep, user: CurrentUser):
    """Choose a new password (at least 15 characters, not a known-compromised one); the
    current one is checked as a sign-in is."""
    settings = request.app.state.settings
    services.change_password(db, user, body.current_password, body.new_password, client_id(request),
                             keep=presented_credential(request),
                             max_failures=settings.login_max_failures, window_s=settings.login_window_s)
    return Response(status_code=204)


@router.get("/users", response_model=list[UserPublic], responses=refusals({403: ADMINS_ONLY}))
def list_users(db: SessionDep, _admin: AdminUser):
    return [_user_public(u) for u in services.list_users(db)]


@router.post("/users", response_model=UserPublic, status_code=201, responses=refusals({
    **JSON_BODY, **ADMIN_WRITE, 409: "the username is taken, or too easily mistaken for an existing one"}))
def create_user(body: UserCreate, db: SessionDep, _admin: AdminUser):
    return _user_public(services.create_user(db, body.username, body.password, body.role))


@router.post("/users/{username}/deactivate", response_model=UserPublic, responses=refusals({
    **ADMIN_WRITE, 404: NO_USER, 409: "you cannot deactivate your own account"}))
def deactivate_user(username: Username, db: SessionDep, admin: AdminUser):
    """Deactivate an account: it can no longer sign in, its tokens and sessions are revoked
    and its open tasks go back to the pool. Its rankings stay."""
    return _user_public(services.set_active(db, username, False, by=admin))


@router.post("/users/{username}/activate", response_model=UserPublic,
             responses=refusals({**ADMIN_WRITE, 404: NO_USER}))
def activate_user(username: Username, db: SessionDep, admin: AdminUser):
    return _user_public(services.set_active(db, username, True, by=admin))


@router.post("/invites", response_model=InvitePublic, status_code=201,
             responses=refusals({**JSON_BODY, **ADMIN_WRITE, 404: NO_PROJECT}))
def create_invite(body: InviteCreate, db: SessionDep, _admin: AdminUser):
    project = services.get_project(db, body.project) if body.project is not None else None
    return InvitePublic(path=f"/invite/{services.create_invite(db, body.role, project=project)}")


# --------------------------------------------------------------------------- projects


@router.get("/projects", response_model=list[ProjectPublic])
def list_projects(db: SessionDep, user: CurrentUser):
    """The projects you may see: all for admins, your memberships for annotators."""
    return [_project_public(db, p) for p in services.list_projects(db, user)]


@router.post("/projects", response_model=ProjectPublic, status_code=201,
             responses=refusals({**JSON_BODY, **ADMIN_WRITE, 409: "a project of that name exists"}))
def create_project(body: ProjectCreate, db: SessionDep, _admin: AdminUser):
    p = services.create_project(db, body.name, k=body.k, annotators_per_prompt=body.annotators_per_prompt,
                                guidelines=body.guidelines, lease_seconds=body.lease_seconds, rank_top=body.rank_top)
    return _project_public(db, p)


@router.get("/projects/{name}", response_model=ProjectPublic, responses=refusals({404: NO_PROJECT, 422: INVALID}))
def get_project(name: ProjectName, db: SessionDep, user: CurrentUser):
    return _project_public(db, services.project_for(db, user, name))


@router.get("/projects/{name}/members", response_model=list[UserPublic], responses=refusals(ADMIN_READ_PROJECT))
def list_members(name: ProjectName, db: SessionDep, _admin: AdminUser):
    return [_user_public(u) for u in services.members(db, services.get_project(db, name))]


@router.post("/projects/{name}/members", response_model=UserPublic, status_code=201,
             responses=refusals({**JSON_BODY, **ADMIN_WRITE, 404: "no such project or user"}))
def add_member(name: ProjectName, body: MemberCreate, db: SessionDep, _admin: AdminUser):
    """Let an annotator see and rank this project."""
    project = services.get_project(db, name)  # a missing project is named first
    user = services.get_user(db, body.username)
    services.add_member(db, project, user)  # (an imported annotator's account: no such user)
    return _user_public(user)


@router.delete("/projects/{name}/members/{username}", status_code=204, responses=refusals({
    **ADMIN_WRITE, 404: "no such project or user, or the user is not a member of the project"}))
def remove_member(name: ProjectName, username: Username, db: SessionDep, _admin: AdminUser):
    if not services.remove_member(db, services.get_project(db, name), services.get_user(db, username)):
        raise HTTPException(404, f"{username!r} is not a member of {name!r}")
    return Response(status_code=204)


@router.post("/projects/{name}/prompts", response_model=ImportPublic, status_code=201, responses=refusals({
    **JSON_BODY, **ADMIN_WRITE, 404: NO_PROJECT,
    409: "another import or generate run gave some of these prompts candidates at the same moment"}))
def add_prompts(name: ProjectName, body: PromptsCreate, db: SessionDep, _admin: AdminUser):
    """Add prompts, each with no candidates (generate them later) or exactly the project's K."""
    from align.formats import Candidate, PromptRecord

    records = [
        PromptRecord(
            p.prompt if isinstance(p.prompt, str) else [m.model_dump() for m in p.prompt], p.id,
            [Candidate(c) if isinstance(c, str) else Candidate(c.text, c.model, c.sampling) for c in p.candidates],
        )
        for p in body.prompts
    ]
    return ImportPublic(**vars(services.add_prompts(db, services.get_project(db, name), records)))


# The file is the raw request body, whatever its Content-Type (no multipart form): read as UTF-8 JSONL.
JSONL_FILE = {"type": "string", "description": "the JSONL file, one record per line, UTF-8"}
IMPORT_BODY = {"requestBody": {"required": True, "content": {
    media_type: {"schema": JSONL_FILE}
    for media_type in ("application/x-ndjson", "application/jsonl", "text/plain", "application/octet-stream")}}}


@router.post("/projects/{name}/import", response_model=ImportPublic, status_code=201, openapi_extra=IMPORT_BODY,
             responses=refusals({
                 **ADMIN_WRITE, 409: "another import or generate run added some of these prompts at the same moment",
                 415: "the body is compressed (Content-Encoding, or gzip data): send the file uncompressed",
                 422: 'the query does not match its schema ("errors" lists each problem), or the file is refused '
                      '(nothing of it was stored): "detail" names the line that cannot be read or stored, or says the '
                      'file is empty or the project exists with another k or rank_top'}))
async def import_file(
    name: ProjectName, request: Request, db: SessionDep, _admin: AdminUser,
    format: Literal["oasst", "hh", "trl", "prompts", "kwise"] = Query(description="format of the JSONL request body"),
):
    """Import a UTF-8 JSONL file sent as the raw request body (the project is created if
    missing). All or nothing: a bad line and nothing is stored."""
    if request.headers.get("content-encoding", "identity").lower() not in ("identity", ""):
        raise HTTPException(415, "send the file uncompressed (no Content-Encoding)")
    try:
        body = await request.body()
    except ClientDisconnect:  # the client left mid-upload: nothing was read whole, nothing is stored
        return Response(status_code=400)
    if body[:2] == b"\x1f\x8b":
        raise HTTPException(415, "the body is gzip-compressed; send the JSONL file uncompressed")
    settings = request.app.state.settings
    if settings.imports_in_subprocess:
        report = await anyio.to_process.run_sync(import_body_at, settings.db_url, name, format, body)
    else:
        report = await run_in_threadpool(services.import_body, db, name, format, body)
    return ImportPublic(**vars(report))


@router.get("/projects/{name}/export", response_class=Response, responses={
    200: {"description": "the JSONL file, one record per line", "content": {"application/x-ndjson": {"schema": JSONL_FILE}},
          "headers": {"X-Align-Left-Out": {"schema": {"type": "string"}, "description": (
              "what the format left out, and why (hh: prompts a transcript cannot hold as they are); absent when "
              "nothing was")}}},
    **refusals({**ADMIN_READ_PROJECT, 422: f"{INVALID} (all_revisions=true is for the kwise format only)",
                507: "the server's temporary folder is full: free space there, then try again"})})
async def export(name: ProjectName, request: Request, _admin: AdminUser,
                 format: Literal["kwise", "trl", "pairs", "hh"] = "kwise", all_revisions: bool = False):
    """The project's rankings as JSONL: kwise (one line per annotator and prompt), trl (chosen/rejected
    pairs; `pairs` is its former name), hh;
    `all_revisions=true` (kwise): every stored revision, not only the latest. An hh export
    leaves out prompts a transcript cannot hold as they are (system messages, turn markers in
    a text), and the header X-Align-Left-Out says how many and why. Written to a temporary file
    in a process of its own (annotation.offload) as it is read, then sent from the file: neither
    process holds the project's rows at once."""
    fd, path = tempfile.mkstemp(prefix="align-export-", suffix=".jsonl")
    os.close(fd)
    try:
        notes = await anyio.to_process.run_sync(export_file_at, request.app.state.settings.db_url, name, format,
                                                all_revisions, path)
    except BaseException as exc:
        os.unlink(path)
        if isinstance(exc, OSError):
            raise services.StorageFull(f"the export could not be written to the server's temporary folder "
                                       f"({exc.strerror or exc}); free space there, then try again") from None
        raise
    # what the format left out, where a JSONL body has no room for it (ASCII, as a header must be)
    headers = {"X-Align-Left-Out": notes[0].encode("ascii", "backslashreplace").decode()} if notes else None
    return FileResponse(path, media_type="application/x-ndjson", headers=headers, background=BackgroundTask(os.unlink, path))


@router.get("/projects/{name}/dashboard", responses=refusals(ADMIN_READ_PROJECT))
async def dashboard(name: ProjectName, request: Request, _admin: AdminUser) -> dict:
    """Progress, per-annotator counts and median time, agreement metrics, flagged items; computed in
    a process of its own (annotation.offload)."""
    return await anyio.to_process.run_sync(dashboard_at, request.app.state.settings.db_url, name)
