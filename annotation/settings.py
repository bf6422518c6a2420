"""Settings of the annotation server (one typed object, as in the FastAPI full-stack template)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_API_TOKEN_TTL_S = 30 * 86400.0


@dataclass
class Settings:
    db_url: str  # SQLAlchemy URL: sqlite:///file.db (default) or postgresql+psycopg://...
    max_body_bytes: int = 1 << 20  # request size limit for every route but imports
    max_import_bytes: int = 64 << 20  # request size limit for POST /api/projects/{p}/import
    max_task_body_bytes: int = 32 << 10  # rankings and skips: K <= 16 ids and 2,000 characters (24 KB even \u-escaped)
    session_ttl_s: float = 12 * 3600
    api_token_ttl_s: float = DEFAULT_API_TOKEN_TTL_S
    # Failed sign-ins, counted in the database: per username and client, 4x that per client,
    # and at most 100 per account from anywhere (NIST SP 800-63B 5.2.2) within login_window_s.
    login_max_failures: int = 5
    login_window_s: float = 300.0
    secure_cookies: bool = False  # set the Secure flag (serve behind HTTPS)
    # Bounded waits (annotation.db.make_engine): past them a request is answered 503 with
    # Retry-After instead of hanging; the client tries again a moment later.
    pool_timeout_s: float = 1.0  # for a pooled database connection
    # PostgreSQL: server connections per worker process, all opened as it starts and kept
    # (annotation.db.open_connections); a request past them waits pool_timeout_s for one.
    # 3 workers x 30 stay under PostgreSQL's default max_connections (100). Fewer make
    # requests wait for a connection under overload (16: slowest answer 2.9-3.0 s against
    # 1.5-1.6 s at 30, 650 annotators, 2 cores).
    db_connections: int = 30
    lock_timeout_s: float = 5.0  # for SQLite's writer lock (an import holds it a chunk at a time)
    retry_after_s: int = 1
    # Requests one worker process takes on at once (its threadpool runs 40); past that it
    # answers 503 at once rather than queue them behind work it cannot start. A request
    # taken on waits for those ahead of it, so this bounds how long it waits (Little's
    # law: about max_in_flight / the worker's requests per second).
    max_in_flight: int = 64
    wal_limit_bytes: int = 16 << 20  # SQLite: past this the WAL is checkpointed with TRUNCATE
    # Imports through the API run in a process of their own (annotation.import_process), off
    # the worker's GIL; False runs them in the worker's threadpool (tests that watch them).
    imports_in_subprocess: bool = True
