"""Password hashing, tokens and CSRF. Password rules: annotation.passwords; the sign-in
throttle lives in the database (annotation.services.users.sign_in)."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()  # argon2id with the library's maintained defaults


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
    # as bytes: compare_digest refuses str with non-ASCII characters (TypeError), and a presented
    # token is whatever the request carried
    return hmac.compare_digest(csrf_token(secret, bound_to).encode(), presented.encode("utf-8", "surrogateescape"))
