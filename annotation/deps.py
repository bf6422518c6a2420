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
        raise HTTPException(403, "missing or wrong CSRF token; reload the page and try again")


def _bearer_token(request: Request) -> services.BearerToken | None:
    """The API token of an `Authorization: Bearer <token>` header, not checked yet."""
    auth = request.headers.get("authorization", "")
    return services.BearerToken(auth[7:].strip()) if auth.lower().startswith("bearer ") else None


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


# The three user dependencies each take only the request (the session is the one
# SessionPerRequest opened): FastAPI resolves every Depends node of a route on every
# request, and a chain of four cost about 0.1 ms more than one.


async def optional_user(request: Request) -> User | None:
    # On the event loop on purpose: the lookup is one indexed read in a snapshot that
    # takes no lock (SQLite WAL reader, PostgreSQL MVCC), well under a millisecond, while
    # a trip through the threadpool costs more than the query and every request makes it.
    await csrf_guard(request)
    user, _kind = _lookup_user(request, request.scope["align.db"])
    return user


async def current_user(request: Request) -> User:
    user = await optional_user(request)
    if user is None:
        raise HTTPException(401, "sign in first (session cookie or 'Authorization: Bearer <token>')", headers={"WWW-Authenticate": "Bearer"})
    return user


async def admin_user(request: Request) -> User:
    user = await current_user(request)
    if user.role != "admin":
        raise HTTPException(403, "admins only")
    return user


async def caller(request: Request) -> User | services.BearerToken:
    """`current_user` for the two requests of every ranking: an API token is passed on
    unchecked, for the service to check in the statement that does the work (on
    PostgreSQL a round trip less each; `services.BearerToken`)."""
    return _bearer_token(request) or await current_user(request)


OptionalUser = Annotated[User | None, Depends(optional_user)]
CurrentUser = Annotated[User, Depends(current_user)]
AdminUser = Annotated[User, Depends(admin_user)]
Caller = Annotated[User | services.BearerToken, Depends(caller)]
