"""Settings of the annotation server (one typed object, as in the FastAPI full-stack template)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Settings:
    db_url: str  # SQLAlchemy URL: sqlite:///file.db (default) or postgresql+psycopg://...
    max_body_bytes: int = 1 << 20  # request size limit for every route but imports
    max_import_bytes: int = 64 << 20  # request size limit for POST /api/projects/{p}/import
    session_ttl_s: float = 12 * 3600
    login_max_failures: int = 5  # per username and client within login_window_s
    login_window_s: float = 300.0
    secure_cookies: bool = False  # set the Secure flag (serve behind HTTPS)
