"""Request dependencies: database session, current user, CSRF check (typed aliases)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from annotation import raw_sql, security, services
from annotation.models import User

SESSION_COOKIE = "align_session"
CSRF_COOKIE = "align_csrf"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class CsrfRejected(HTTPException):
    """403 for a state change without the page's CSRF token; `code` as a ServiceError's (the page
    answers it by reloading)."""

    code = "csrf_token"

    def __init__(self):
        super().__init__(403, "missing or wrong CSRF token; reload the page and try again")


class SessionPerRequest:
    """Pure ASGI middleware: every HTTP request gets its database Session (`SessionDep`),
    closed once the request is done, response sent. A dependency with `yield` would do the
    same, but FastAPI enters a cancel scope and two context managers for each one: about
    0.17 ms of CPU per request, a twentieth of what a task request costs on a small server."""

    def __init__(self, app, sessionmaker):
        self.app, self.sessionmaker = app, sessionmaker

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope["align.db"] = db = self.sessionmaker()
        raw_sql.hold_connection(db)
        try:
            await self.app(scope, receive, send)
        finally:
            raw_sql.release_connection(db)
            db.close()  # only returns connections, if any are held: no waiting on the loop


async def get_db(request: Request) -> Session:
    return request.scope["align.db"]


SessionDep = Annotated[Session, Depends(get_db)]


def csrf_binding(request: Request) -> str | None:
    """What the CSRF token is bound to: the session cookie, or before login the pre-session cookie."""
    return request.cookies.get(SESSION_COOKIE) or request.cookies.get(CSRF_COOKIE)


def csrf_for(request: Request) -> str:
    binding = getattr(request.state, "csrf_binding", None) or csrf_binding(request)
    return security.csrf_token(request.app.state.secret, binding) if binding else ""


async def check_csrf(request: Request) -> None:
    """Every state-changing request authenticated by cookie must echo the CSRF token in
    the X-CSRF-Token header or a `csrf_token` form field."""
    presented = request.headers.get("x-csrf-token")
    if presented is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        presented = (await request.form()).get("csrf_token")
    if not security.csrf_ok(request.app.state.secret, csrf_binding(request), presented):
        raise CsrfRejected()


def _bearer_token(request: Request) -> services.BearerToken | None:
    """The API token of an `Authorization: Bearer <token>` header, not checked yet."""
    auth = request.headers.get("authorization", "")
    return services.BearerToken(auth[7:].strip()) if auth.lower().startswith("bearer ") else None


def presented_credential(request: Request) -> services.BearerToken | services.SessionCookie | None:
    """The API token or session cookie the request was made with, not checked yet."""
    token = _bearer_token(request)
    if token is not None:
        return token
    cookie = request.cookies.get(SESSION_COOKIE)
    return services.SessionCookie(cookie) if cookie else None


def _lookup_user(request: Request, db: Session) -> tuple[User | None, str]:
    token = _bearer_token(request)
    if token is not None:
        return services.as_user(db, token), "token"  # Unauthorized: 401
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        return services.user_for_session(db, cookie), "cookie"
    return None, "none"


async def csrf_guard(request: Request) -> None:
    """CSRF applies to cookie-authenticated state changes; decided without the database so
    this async step never blocks the event loop on a database lock."""
    if request.method in SAFE_METHODS or _bearer_token(request) is not None:
        return
    if request.cookies.get(SESSION_COOKIE):
        await check_csrf(request)


# The user dependencies look the user up in the database, so they are plain functions,
# which FastAPI runs in its threadpool: nothing waits on the event loop for a pooled
# connection or a lock (each wait is bounded, and past it the request is a 503). The CSRF
# check before them reads at most the form and stays on the loop.
CsrfGuarded = Annotated[None, Depends(csrf_guard)]
SIGN_IN_FIRST = "sign in first (session cookie or 'Authorization: Bearer <token>')"


def optional_user(request: Request, _csrf: CsrfGuarded) -> User | None:
    user, _kind = _lookup_user(request, request.scope["align.db"])
    return user


def _required(user: User | None) -> User:
    if user is None:
        raise HTTPException(401, SIGN_IN_FIRST, headers={"WWW-Authenticate": "Bearer"})
    return user


def current_user(request: Request, _csrf: CsrfGuarded) -> User:
    return _required(optional_user(request, None))


def admin_user(request: Request, _csrf: CsrfGuarded) -> User:
    user = _required(optional_user(request, None))
    if user.role != "admin":
        raise HTTPException(403, "admins only")
    return user


async def caller(request: Request, _csrf: CsrfGuarded) -> services.BearerToken | services.SessionCookie:
    """The credentials of the two requests of every ranking, not checked yet and read
    without the database: the service checks them with the rest of its work, in the
    threadpool (an API token in the statement that does the work, on PostgreSQL a round
    trip less each; `services.BearerToken`, `services.SessionCookie`)."""
    credential = presented_credential(request)
    if credential is None:
        raise HTTPException(401, SIGN_IN_FIRST, headers={"WWW-Authenticate": "Bearer"})
    return credential


OptionalUser = Annotated[User | None, Depends(optional_user)]
CurrentUser = Annotated[User, Depends(current_user)]
AdminUser = Annotated[User, Depends(admin_user)]
Caller = Annotated[services.BearerToken | services.SessionCookie, Depends(caller)]
