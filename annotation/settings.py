"""Settings of the annotation server (one typed object, as in the FastAPI full-stack template).

`align annotate serve` takes any of them as key=value after its options (`--help` lists them,
from the fields below); an unknown key or a value out of range is one line naming it."""

from __future__ import annotations

from dataclasses import dataclass

from align.config import option

DEFAULT_API_TOKEN_TTL_S = 30 * 86400.0


@dataclass
class Settings:
    db_url: str = option(help="SQLAlchemy URL: sqlite:///file.db or postgresql+psycopg://user:pw@host/db (serve: --db).")
    max_body_bytes: int = option(1 << 20, help="Request size limit of every route but imports (serve: --max-body-kb).",
                                 ge=1)
    max_import_bytes: int = option(64 << 20, help="Request size limit of POST /api/projects/{p}/import.", ge=1)
    # K <= 16 ids and 2,000 characters are 24 KB even \u-escaped
    max_task_body_bytes: int = option(32 << 10, help="Request size limit of a ranking or a skip.", ge=1)
    session_ttl_s: float = option(12 * 3600, help="Seconds a browser sign-in lasts.", gt=0)
    api_token_ttl_s: float = option(DEFAULT_API_TOKEN_TTL_S, help="Seconds an API token lasts unless created with "
                                    "another lifetime.", gt=0)
    # Failed sign-ins, counted in the database: per username and client, 4x that per client,
    # and at most 100 per account from anywhere (NIST SP 800-63B 5.2.2) within login_window_s.
    login_max_failures: int = option(5, help="Failed sign-ins per username and client within login_window_s "
                                     "before sign-in is refused for a while (4x that per client).", ge=1)
    login_window_s: float = option(300.0, help="The window failed sign-ins are counted in.", gt=0)
    secure_cookies: bool = option(False, help="Set the Secure flag on cookies: serve behind HTTPS (serve: "
                                  "--secure-cookies).")
    # Bounded waits (annotation.db.make_engine): past them a request is answered 503 with
    # Retry-After instead of hanging; the client tries again a moment later.
    pool_timeout_s: float = option(1.0, help="Seconds a request waits for a pooled database connection before a 503.",
                                   gt=0)
    # 3 workers x 30 stay under PostgreSQL's default max_connections (100). Fewer make
    # requests wait for a connection under overload (16: slowest answer 2.9-3.0 s against
    # 1.5-1.6 s at 30, 650 annotators, 2 cores).
    db_connections: int = option(30, help="PostgreSQL: server connections per worker process, all opened as it "
                                 "starts and kept (annotation.pg_engine.open_connections).", ge=1)
    lock_timeout_s: float = option(5.0, help="Seconds a request waits for a lock before a 503: SQLite's writer lock "
                                   "(an import holds it a chunk at a time), PostgreSQL's lock_timeout (a table "
                                   "locked by LOCK TABLE, CREATE INDEX, VACUUM FULL).", gt=0)
    retry_after_s: int = option(1, help="The Retry-After a 503 answers with, in seconds.", ge=0)
    # A request taken on waits for those ahead of it, so this bounds how long it waits (Little's
    # law: about max_in_flight / the worker's requests per second).
    max_in_flight: int = option(64, help="Requests one worker process takes on at once (its threadpool runs 40); "
                                "past that it answers 503 at once rather than queue them.", ge=1)
    wal_limit_bytes: int = option(16 << 20, help="SQLite: past this size the write-ahead log is checkpointed and "
                                  "truncated.", ge=1)
    # Off the worker's GIL; False runs them in the worker's threadpool (tests that watch them).
    imports_in_subprocess: bool = option(True, help="Run imports through the API in a process of their own "
                                         "(annotation.offload), as exports and dashboards always are.")
