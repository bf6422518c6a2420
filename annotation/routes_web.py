"""Server-rendered pages for annotators and admins. Forms carry the CSRF token; the
ranking page's script (static/app.js) posts JSON to /api with the X-CSRF-Token header."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from annotation import passwords, security, services
from annotation.deps import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    AdminUser,
    CurrentUser,
    OptionalUser,
    SessionDep,
    check_csrf,
    csrf_for,
    presented_credential,
)
from annotation.render import markdown
from annotation.routes_api import client_id, sign_in
from annotation.services import users
from annotation.status import error_body, http_status

templates = Jinja2Templates(directory=str(Path(__file__).resolve().parent / "templates"))
templates.env.filters["markdown"] = markdown
templates.env.filters["datetime"] = lambda t: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))
templates.env.globals["csrf_for"] = csrf_for
templates.env.globals["password_policy"] = passwords.POLICY
templates.env.globals["min_password_length"] = passwords.MIN_PASSWORD_LENGTH

router = APIRouter(include_in_schema=False)
CsrfChecked = Annotated[None, Depends(check_csrf)]


def page(request: Request, name: str, status_code: int = 200, **ctx) -> HTMLResponse:
    """Render a template; give a visitor without one the pre-session cookie the CSRF token binds to."""
    new_cookie = None
    if not request.cookies.get(SESSION_COOKIE) and not request.cookies.get(CSRF_COOKIE):
        new_cookie = security.new_token()
        request.state.csrf_binding = new_cookie
    resp = templates.TemplateResponse(request, name, {"request": request, **ctx}, status_code=status_code)
    # A page shows the data as it is now (a task's status, its ranking, progress): kept in the
    # browser's cache, Back would show a task already ranked as still open to rank.
    resp.headers["Cache-Control"] = "no-store"
    if new_cookie:
        resp.set_cookie(CSRF_COOKIE, new_cookie, httponly=True, samesite="strict",
                        secure=request.app.state.settings.secure_cookies, path="/")
    return resp


def wants_page(request: Request) -> bool:
    """A request for a page (not /api) from a browser that asked for HTML."""
    return not request.url.path.startswith("/api") and "text/html" in request.headers.get("accept", "")


def error_response(request: Request, status: int, detail, code: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    """A refusal: for a browser's page the error page (sign-in for 401), with the same
    status and headers (Retry-After); for anything else its JSON (`status.error_body`)."""
    if not wants_page(request):
        return JSONResponse(error_body(detail, code), status_code=status, headers=headers)
    if status == 401:
        return RedirectResponse(sign_in_address(request), status_code=303)
    resp = page(request, "error.html", status_code=status, status=status, detail=detail, user=None)
    resp.headers.update(headers or {})
    return resp


async def html_error_handler(request: Request, exc):
    return error_response(request, getattr(exc, "status_code", 500), getattr(exc, "detail", "error"),
                          getattr(exc, "code", None), getattr(exc, "headers", None))


# What a form that redirects home says there (`/?done=KEY`): fixed words, never the query's text
DONE_NOTICES = {"account": "Account created. Sign in.",
                "password": "Password changed. Your other sessions and API tokens were signed out."}
# Set at sign-in and cleared at sign-out, outliving the session: a browser that shows the sign-in
# page with it was signed in and no longer is (its session expired, or was ended elsewhere), where
# the session cookie itself is gone once its max-age is up. It holds nothing secret.
SIGNED_IN_COOKIE = "align_signed_in"
SIGNED_IN_MAX_AGE_S = 90 * 86400
SESSION_ENDED = "Your session has expired: sign in again."
NOT_SENT = "What you last sent was not carried out: send it again once signed in."


def safe_next(value: str | None) -> str | None:
    """`value` if it is a path on this site to go to after signing in, else None: one leading '/',
    no scheme or host, and no backslash, space or control character (browsers read `/\\evil` and
    `/<tab>/evil` as `//evil`, another host)."""
    if not value or len(value) > 2000 or not value.startswith("/") or value.startswith("//"):
        return None
    if any(ch == "\\" or ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in value):
        return None
    parts = urlsplit(value)
    return value if not (parts.scheme or parts.netloc) else None


def _back_to(request: Request) -> str | None:
    """The page to come back to after signing in: a page asked for (its address as sent, so that
    an escaped '/', '?' or '#' in a project name stays escaped), or for a form sent (a POST, whose
    address is no page) the page it was sent from, read from the Referer if that is this site."""
    if request.method in ("GET", "HEAD"):
        path = request.scope.get("raw_path", b"").decode("latin-1") or quote(request.url.path)
        return safe_next(path + _without_notice(request.url.query))
    referer = urlsplit(request.headers.get("referer", ""))
    here = urlsplit(str(request.base_url))
    if (referer.scheme, referer.netloc) != (here.scheme, here.netloc):
        return None
    return safe_next((referer.path or "/") + _without_notice(referer.query))


def _without_notice(query: str) -> str:
    """`?query` less its `done` notice: the page came back to after signing in must not say again
    that something was done (a form refused meanwhile was not)."""
    from urllib.parse import parse_qsl, urlencode

    kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "done"]
    return "?" + urlencode(kept) if kept else ""


def sign_in_address(request: Request) -> str:
    """The sign-in page for a page or form refused for want of a session: `next` names the page
    to come back to, and `unsent` says a form sent was not carried out."""
    back, query = _back_to(request), []
    if back and back != "/":
        query.append("next=" + quote(back, safe="/"))
    if request.method not in ("GET", "HEAD"):
        query.append("unsent=1")
    return "/?" + "&".join(query) if query else "/"


def login_page(request: Request, status_code: int = 200, *, error: str | None = None, notice: str | None = None,
               next_path: str | None = None, unsent: bool = False) -> HTMLResponse:
    """The sign-in page; it says so when this browser's session ended (SIGNED_IN_COOKIE, or a
    session cookie that signs nobody in) and when a form sent was refused for it."""
    if notice is None and (request.cookies.get(SIGNED_IN_COOKIE) or request.cookies.get(SESSION_COOKIE)):
        notice = SESSION_ENDED + (" " + NOT_SENT if unsent else "")
    elif notice is None and unsent:
        notice = "Sign in first. " + NOT_SENT
    return page(request, "login.html", status_code=status_code, user=None, error=error, notice=notice,
                next_path=next_path)


@router.get("/", response_class=HTMLResponse)
def home(request: Request, db: SessionDep, user: OptionalUser, done: str | None = None,
         next_path: Annotated[str | None, Query(alias="next")] = None, unsent: str | None = None):
    notice = DONE_NOTICES.get(done or "")
    next_path = safe_next(next_path)
    if user is None:
        return login_page(request, notice=notice, next_path=next_path, unsent=unsent == "1")
    if next_path and urlsplit(next_path).path != "/":  # signed in meanwhile (another tab): on to the page
        return RedirectResponse(next_path, status_code=303)
    projects = [
        {"p": p, "progress": services.project_progress(db, p), "mine": services.user_progress(db, user, p),
         "member": user.role != "admin" or services.is_member(db, p, user)}
        for p in services.list_projects(db, user)
    ]
    return page(request, "home.html", user=user, projects=projects, notice=notice)


@router.post("/login")
def login(request: Request, db: SessionDep, _csrf: CsrfChecked,
          username: Annotated[str, Form(max_length=64)], password: Annotated[str, Form(max_length=1024)],
          next_path: Annotated[str, Form(alias="next", max_length=2000)] = ""):
    next_path = safe_next(next_path)
    try:
        user = sign_in(request, db, username, password)
    except services.Throttled as exc:
        return login_page(request, 429, error=str(exc), notice="", next_path=next_path)
    if user is None:
        return login_page(request, 401, error="Wrong username or password.", notice="", next_path=next_path)
    settings = request.app.state.settings
    token = services.open_web_session(db, user, settings.session_ttl_s)
    resp = RedirectResponse(next_path or "/", status_code=303)
    resp.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="lax", secure=settings.secure_cookies,
                    max_age=int(settings.session_ttl_s), path="/")
    resp.set_cookie(SIGNED_IN_COOKIE, "1", httponly=True, samesite="lax", secure=settings.secure_cookies,
                    max_age=SIGNED_IN_MAX_AGE_S, path="/")
    return resp


@router.post("/logout")
def logout(request: Request, db: SessionDep, _csrf: CsrfChecked):
    if request.cookies.get(SESSION_COOKIE):
        services.close_web_session(db, request.cookies[SESSION_COOKIE])
    resp = RedirectResponse("/", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/")
    resp.delete_cookie(SIGNED_IN_COOKIE, path="/")  # signed out on purpose: the sign-in page says nothing expired
    return resp


@router.post("/projects/{name}/start")
def start(name: str, db: SessionDep, user: CurrentUser):
    task = services.next_task_in(db, user, name)
    if task is None:
        return RedirectResponse(f"/projects/{quote(name, safe='')}/done", status_code=303)
    return RedirectResponse(f"/tasks/{task.assignment_id}", status_code=303)


@router.get("/projects/{name}/done", response_class=HTMLResponse)
def done(name: str, request: Request, db: SessionDep, user: CurrentUser):
    p = services.project_for(db, user, name)
    return page(request, "done.html", user=user, project=p, progress=services.project_progress(db, p),
                mine=services.user_progress(db, user, p))


@router.get("/tasks/{task_id}", response_class=HTMLResponse)
def task_page(task_id: int, request: Request, db: SessionDep, user: CurrentUser):
    task = services.get_task(db, user, task_id, members_only=True)
    p = services.get_project(db, task.project)
    messages = task.prompt if isinstance(task.prompt, list) else [{"role": "user", "content": task.prompt}]
    ranked = services.ranked_prefix(task.order, task.below) if task.order else None
    return page(request, "task.html", user=user, task=task, project=p, messages=messages, shown=shown_order(task),
                ranked=ranked,
                progress=services.project_progress(db, p), mine=services.user_progress(db, user, p),
                lease_left_s=max(0, int(task.leased_until - time.time())))


def shown_order(task: services.Task) -> list[tuple[services.TaskCandidate, bool]]:
    """The candidates as the page lists them, each with "tied with the one above": a ranked
    task shows its stored ranking (ties included), an open one this annotator's shuffle."""
    by_id = {c.id: c for c in task.candidates}
    if not task.order:
        return [(c, False) for c in task.candidates]
    out = [(by_id[cid], i > 0) for group in task.order for i, cid in enumerate(group) if cid in by_id]
    listed = {c.id for c, _ in out}
    return out + [(c, False) for c in task.candidates if c.id not in listed]


@router.get("/account/password", response_class=HTMLResponse)
def password_page(request: Request, user: CurrentUser):
    return page(request, "password.html", user=user, error=None)


@router.post("/account/password", response_class=HTMLResponse)
def password_change(request: Request, db: SessionDep, user: CurrentUser, _csrf: CsrfChecked,
                    current_password: Annotated[str, Form(max_length=1024)],
                    new_password: Annotated[str, Form(max_length=1024)]):
    settings = request.app.state.settings
    try:
        services.change_password(db, user, current_password, new_password, client_id(request),
                                 keep=presented_credential(request),
                                 max_failures=settings.login_max_failures, window_s=settings.login_window_s)
    except services.ServiceError as exc:
        return page(request, "password.html", status_code=http_status(exc), user=user, error=str(exc))
    return RedirectResponse("/?done=password", status_code=303)


# Why an invite link makes no account, as its page says it at once (`users.invite_problem`): an
# unknown link is not found; a used or expired one is gone for good (410), a new one is needed.
INVITE_PROBLEMS = {
    "unknown": (404, "This invite link is unknown: check that the whole link was copied, or ask for a new one."),
    "used": (410, "This invite link has been used: each link makes one account. Ask for a new one, or sign in."),
    "expired": (410, "This invite link has expired. Ask the admin who sent it for a new one."),
}


def _invite_page(request: Request, db, token: str, status_code: int = 200, error: str | None = None,
                 username: str = "") -> HTMLResponse:
    """The invite's page: the sign-up form while the invite is live, else only why it cannot be used."""
    problem = users.invite_problem(users.find_invite(db, token))
    if problem is not None:
        status_code, error = INVITE_PROBLEMS[problem]
    return page(request, "invite.html", status_code=status_code, user=None, token=token, error=error,
                usable=problem is None, username=username)


@router.get("/invite/{token}", response_class=HTMLResponse)
def invite_page(token: str, request: Request, db: SessionDep):
    return _invite_page(request, db, token)


@router.post("/invite/{token}")
def invite_accept(token: str, request: Request, db: SessionDep, _csrf: CsrfChecked,
                        username: Annotated[str, Form(max_length=64)], password: Annotated[str, Form(max_length=1024)]):
    try:
        services.accept_invite(db, token, username, password)
    except services.ServiceError as exc:  # the name typed stays in the form; the password never comes back
        return _invite_page(request, db, token, http_status(exc), str(exc), username)
    # away from the invite's address: reloading it said the (used) link was unknown
    return RedirectResponse("/?done=account", status_code=303)


FLAGGED_PER_PAGE = 20


@router.get("/admin/projects/{name}", response_class=HTMLResponse)
def dashboard_page(name: str, request: Request, db: SessionDep, user: AdminUser,
                   page_no: Annotated[int, Query(alias="page", ge=1, le=1_000_000)] = 1):
    from annotation import charts

    p = services.get_project(db, name)
    d = services.dashboard(db, p)
    pages = max(1, -(-len(d["flagged"]) // FLAGGED_PER_PAGE))
    page_no = min(page_no, pages)
    flagged = d["flagged"][(page_no - 1) * FLAGGED_PER_PAGE: page_no * FLAGGED_PER_PAGE]
    return page(request, "dashboard.html", user=user, project=p, d=d, flagged=flagged,
                page_no=page_no, pages=pages, progress_chart=charts.progress_line(d["timeline"], d["progress"]["target"]),
                agreement_chart=charts.agreement_bars(d["annotators"]), quote=quote, lease_end=_lease_end)


def _lease_end(until: float) -> str:
    """When a live lease ends, as an admin reads it at a glance: in how many minutes."""
    minutes = max(0, round((until - time.time()) / 60))
    return "in under a minute" if minutes == 0 else f"in {minutes} min"


@router.get("/admin/projects/{name}/prompts/{source_id:path}", response_class=HTMLResponse)
def prompt_page(name: str, source_id: str, request: Request, db: SessionDep, user: AdminUser):
    p = services.get_project(db, name)
    detail = services.prompt_detail(db, p, source_id)
    content = detail["prompt"].content
    messages = content if isinstance(content, list) else [{"role": "user", "content": content}]
    return page(request, "prompt.html", user=user, project=p, messages=messages, **detail)


@router.get("/favicon.ico")
def favicon():
    return Response(status_code=204)
