"""The FastAPI application: middleware (size limit, security headers), routers, startup."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from annotation import security, services
from annotation.db import (
    DatabaseBusy,
    WalCheckpointer,
    get_meta,
    make_engine,
    make_sessionmaker,
    migrate,
)
from annotation.deps import SessionPerRequest
from annotation.models import Meta
from annotation.pg_engine import open_connections, unavailable
from annotation.services.errors import disk_full
from annotation.settings import Settings
from annotation.status import http_status

HERE = Path(__file__).resolve().parent

# No inline script or style anywhere: all JS/CSS are files under /static.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]


class LimitsAndHeaders:
    """Pure ASGI middleware: refuse bodies over the limit with 413 (by Content-Length, or by
    counting a chunked body before the app sees it) and add the security headers. Only the
    paths of `import_routes` (the import routes' own patterns) take an import's size."""

    def __init__(self, app, settings: Settings, import_routes: Sequence[re.Pattern]):
        self.app, self.settings, self.import_routes = app, settings, tuple(import_routes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if any(route.match(path) for route in self.import_routes):
            limit = self.settings.max_import_bytes
        elif path.startswith("/api/tasks/"):  # a ranking is a few hundred bytes; refuse the rest unread
            limit = min(self.settings.max_body_bytes, self.settings.max_task_body_bytes)
        else:
            limit = self.settings.max_body_bytes

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() not in {k for k, _ in SECURITY_HEADERS}]
                message["headers"] = headers + SECURITY_HEADERS
            await send(message)

        async def too_large():
            body = json.dumps({"detail": f"request body too large (limit {limit} bytes)"}).encode()
            await send_with_headers({"type": "http.response.start", "status": 413,
                                     "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send_with_headers({"type": "http.response.body", "body": body})

        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                if int(length) > limit:
                    return await too_large()
            except ValueError:
                return await too_large()
        elif scope.get("method") in ("POST", "PUT", "PATCH") and headers.get(b"transfer-encoding"):
            chunks, size = [], 0
            while True:
                msg = await receive()
                if msg["type"] != "http.request":
                    break
                size += len(msg.get("body", b""))
                if size > limit:
                    return await too_large()
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body"):
                    break
            body, done = b"".join(chunks), False

            async def replay():
                nonlocal done
                if not done:
                    done = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send_with_headers)
        return await self.app(scope, receive, send_with_headers)


BUSY = "the server is busy; try again in a moment"
# Written out, not rendered: a refusal at the door costs nothing else (no template, no database).
BUSY_PAGE = (b'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>503 busy</title></head>'
             b'<body><h1>503</h1><p>The server is busy; try again in a moment.</p><p><a href="/">Back to projects</a></p>'
             b'</body></html>')


def _browser_page(scope) -> bool:
    """A request for a page (not /api) from a browser that asked for HTML (`routes_web.wants_page`)."""
    accept = dict(scope.get("headers") or []).get(b"accept", b"")
    return not scope.get("path", "").startswith("/api") and b"text/html" in accept


class Admission:
    """Pure ASGI middleware: a worker serves at most `max_in_flight` requests at once and
    answers the next ones 503 with Retry-After straight away, without the database. A
    saturated server then tells clients to come back in a moment, where it would queue
    them without bound and answer each later and later. One counter per worker process,
    changed only on its event loop."""

    def __init__(self, app, settings: Settings):
        self.app, self.settings = app, settings
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.in_flight >= self.settings.max_in_flight:
            page = _browser_page(scope)
            body = BUSY_PAGE if page else json.dumps({"detail": BUSY}).encode()
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"text/html; charset=utf-8" if page else b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(self.settings.retry_after_s).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def load_or_create_secret(sessionmaker) -> str:
    """The CSRF/signing secret: generated on first start, stored in the database, reused."""
    with sessionmaker() as db:
        secret = get_meta(db, "secret")
        if secret:
            return secret
        db.add(Meta(key="secret", value=security.new_token()))
        try:
            db.commit()
        except Exception:  # another worker stored one first
            db.rollback()
        return get_meta(db, "secret")


def create_app(settings: Settings) -> FastAPI:
    sqlite = settings.db_url.startswith("sqlite")
    engine = make_engine(settings.db_url, background_checkpoints=sqlite, pool_timeout_s=settings.pool_timeout_s,
                         pool_size=settings.db_connections,
                         lock_timeout_s=settings.lock_timeout_s)
    migrate(engine)
    sm = make_sessionmaker(engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        checkpointer = WalCheckpointer(settings.db_url, wal_limit_bytes=settings.wal_limit_bytes).start() if sqlite else None
        open_connections(engine)
        try:
            yield
        finally:
            if checkpointer is not None:
                checkpointer.stop()
            engine.dispose()

    app = FastAPI(
        lifespan=lifespan,
        title="align annotation",
        description="Rank K responses per prompt; raw rankings (ties, revisions) stored and exported.",
        openapi_url="/api/openapi.json",
        docs_url=None,  # Swagger UI would load its assets from a CDN; the schema is at /api/openapi.json
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = sm
    app.state.secret = load_or_create_secret(sm)

    from annotation.routes_admin import router as admin_router
    from annotation.routes_api import router as api_router
    from annotation.routes_web import error_response, html_error_handler, wants_page
    from annotation.routes_web import router as web_router

    # Every refusal below is the JSON an API client reads, or, for a browser's page, the error
    # page with the same status (`routes_web.error_response`).
    @app.exception_handler(services.ServiceError)
    async def _service_error(request: Request, exc: services.ServiceError):
        headers = None
        if isinstance(exc, services.Throttled):
            headers = {"Retry-After": str(exc.retry_after)}
        elif isinstance(exc, services.Unauthorized):
            headers = {"WWW-Authenticate": "Bearer"}
        return error_response(request, http_status(exc), str(exc), exc.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        # The request's own values (pydantic's `input`, `ctx`) are not echoed: NaN, Infinity or
        # a lone surrogate in them cannot be written as JSON, and the answer was a 500.
        errors = [{"type": str(err.get("type")), "loc": [p if isinstance(p, int) else printable(str(p)) for p in err.get("loc", ())],
                   "msg": printable(str(err.get("msg")))} for err in exc.errors()]
        problems = [f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}" for err in errors]
        if wants_page(request) and errors and all(err["loc"][:1] == ["path"] for err in errors):
            return error_response(request, 404, f"no such page: {printable(request.url.path)}")  # /tasks/abc
        if wants_page(request):
            return error_response(request, 422, "; ".join(problems) or "invalid request")
        return JSONResponse({"detail": "; ".join(problems) or "invalid request", "errors": errors}, status_code=422)

    def _busy(request: Request, detail: str, retry_after: int) -> Response:
        return error_response(request, 503, detail, headers={"Retry-After": str(retry_after)})

    # A bounded wait ran out: the server is saturated for the moment. 503 with Retry-After
    # tells the client (and the page's script) to try again rather than wait.
    @app.exception_handler(DatabaseBusy)
    async def _database_busy(request: Request, exc: DatabaseBusy):
        return _busy(request, str(exc), max(exc.retry_after, settings.retry_after_s))

    @app.exception_handler(PoolTimeout)
    async def _pool_timeout(request: Request, exc: PoolTimeout):
        return _busy(request, f"the server is busy (no database connection free within {settings.pool_timeout_s:g} s); "
                     "try again in a moment", settings.retry_after_s)

    # The database's disk is full: the write was rolled back. 507 Insufficient Storage, with
    # a detail an admin can act on. PostgreSQL restarting, a connection it dropped, a lock held
    # past lock_timeout_s: 503, which clients send again after Retry-After (a 500 would also
    # close the client's keep-alive connection).
    @app.exception_handler(OperationalError)
    async def _operational_error(request: Request, exc: OperationalError):
        if disk_full(exc):
            return error_response(request, 507, "the database's disk is full; nothing of this request was stored "
                                                "(free space on the database's disk, then try again)")
        reason = unavailable(exc)
        if reason is None:
            raise exc
        return _busy(request, f"{reason}; try again in a moment", settings.retry_after_s)

    @app.exception_handler(DataError)
    async def _data_error(request: Request, exc: DataError):
        # Last line of defence: input the schemas let through but the database cannot hold.
        return error_response(request, 422,
                              "a value in the request cannot be stored (NUL character or number out of range)")

    app.add_exception_handler(StarletteHTTPException, html_error_handler)
    app.include_router(api_router)
    app.include_router(web_router)
    app.include_router(admin_router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_middleware(SessionPerRequest, sessionmaker=sm)
    app.add_middleware(LimitsAndHeaders, settings=settings,
                       import_routes=[r.path_regex for r in api_router.routes if r.name == "import_file"])
    app.add_middleware(Admission, settings=settings)  # outermost: a refusal costs nothing else
    return app


SETTINGS_ENV = "ALIGN_ANNOTATION_SETTINGS"


def served_app(settings: Settings) -> FastAPI:
    """`create_app` for a server process (`align annotate serve`). What the process loaded
    and built by then (FastAPI, SQLAlchemy, the app: about 110,000 objects) is left out of
    its later garbage collections (gc.freeze): a full collection walks every object it
    tracks, and in a worker one took 60-110 ms, in which that worker answered nothing and
    a request of it holding SQLite's writer lock kept every other writer waiting. Frozen,
    a collection walks only what the requests made since."""
    import gc

    app = create_app(settings)
    gc.collect()  # first, so that no garbage of the startup is kept (frozen objects are never collected)
    gc.freeze()
    return app


def app_from_environment() -> FastAPI:
    """The app for one of several worker processes: settings as JSON in $ALIGN_ANNOTATION_SETTINGS."""
    import os

    return served_app(Settings(**json.loads(os.environ[SETTINGS_ENV])))


def printable(text: str) -> str:
    """`text` as UTF-8 can carry it: a lone surrogate (which JSON allows as an escape, and
    Python's JSON reads) becomes its escape sequence."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
