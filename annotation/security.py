"""Password hashing, tokens, CSRF and login throttling (issue 3 security requirements)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import defaultdict, deque

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()  # argon2id with the library's maintained defaults
MIN_PASSWORD_LENGTH = 8


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    if not stored_hash:
        _hasher.hash(password)  # same cost either way: no user enumeration by timing
        return False
    try:
        return _hasher.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """Tokens are stored as SHA-256: they are random 256-bit values, so no slow hash is needed."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def csrf_token(secret: str, bound_to: str) -> str:
    """Signed token bound to the browser's session (or pre-login) cookie."""
    return hmac.new(secret.encode(), ("csrf:" + bound_to).encode(), hashlib.sha256).hexdigest()


def csrf_ok(secret: str, bound_to: str | None, presented: str | None) -> bool:
    if not bound_to or not presented:
        return False
    return hmac.compare_digest(csrf_token(secret, bound_to), presented)


class LoginThrottle:
    """At most `max_failures` failed logins per (username, client) and 4x that per client
    within `window_s`; further attempts get 429 until the window slides."""

    def __init__(self, max_failures: int = 5, window_s: float = 300.0):
        self.max_failures, self.window_s = max_failures, window_s
        self._fails: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _keys(self, username: str, client: str) -> list[tuple[str, int]]:
        return [(f"u:{username.lower()}|{client}", self.max_failures), (f"c:{client}", 4 * self.max_failures)]

    def retry_after(self, username: str, client: str) -> int:
        """Seconds to wait, 0 if an attempt is allowed now."""
        now = time.monotonic()
        with self._lock:
            wait = 0.0
            for key, limit in self._keys(username, client):
                q = self._fails[key]
                while q and q[0] < now - self.window_s:
                    q.popleft()
                if len(q) >= limit:
                    wait = max(wait, q[0] + self.window_s - now)
            return int(wait) + 1 if wait > 0 else 0

    def failed(self, username: str, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key, _ in self._keys(username, client):
                self._fails[key].append(now)

    def succeeded(self, username: str, client: str) -> None:
        with self._lock:
            self._fails.pop(self._keys(username, client)[0][0], None)
