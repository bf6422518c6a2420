"""Accounts, API tokens, browser sessions, invites and throttled sign-in."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from annotation import passwords, security
from annotation.models import ApiToken, Invite, LoginFailures, Project, ProjectMember, User, WebSession
from annotation.raw_sql import Sql, Transaction, transaction
from annotation.services._tx import insert_unique, read_only, unit_of_work
from annotation.services.errors import Conflict, Forbidden, Invalid, NotFound, Throttled, Unauthorized
from annotation.services.slots import release_live_leases
from annotation.settings import DEFAULT_API_TOKEN_TTL_S

ROLES = ("admin", "annotator", "source")
# Annotators named in imported files are accounts of role "source" whose username is the
# name behind this prefix. ':' is never in a real username (`passwords.username_problem`),
# so an imported name never maps to a real account (an admin's included) and never keeps
# anyone from creating a real user of that name.
SOURCE_PREFIX = "src:"
MAX_SOURCE_NAME = 64 - len(SOURCE_PREFIX)


def source_username(name: str) -> str:
    """The username of the source account of an imported annotator name: `src:N` for a name
    N, and a name an export gave a source account (`src:N`) as it is, so that rankings copied
    to another project and back keep one account."""
    return name if name.startswith(SOURCE_PREFIX) else SOURCE_PREFIX + name


def check_source_name(name: Any) -> str | None:
    """What is wrong with an imported annotator name (None: it is fine once stripped)."""
    bare = name.strip().removeprefix(SOURCE_PREFIX) if isinstance(name, str) else ""
    if not bare or len(bare) > MAX_SOURCE_NAME:
        return f"name must be 1-{MAX_SOURCE_NAME} characters (after {SOURCE_PREFIX!r}), got {name!r:.80}"
    if any(ord(ch) < 32 or 0xD800 <= ord(ch) < 0xE000 for ch in name):
        return f"name {name!r:.80} holds a control character or a lone surrogate"
    return None


def new_user(db: Session, username: str, password: str | None, role: str) -> User:
    """Validate and insert (flush, no commit) a user."""
    username = (username or "").strip() if isinstance(username, str) else username
    if role == "source":  # imported data: the name comes from the file and never signs in
        if not isinstance(username, str) or not username.startswith(SOURCE_PREFIX) or len(username) > 64:
            raise Invalid(f"a source account's name is {SOURCE_PREFIX!r} and 1-{MAX_SOURCE_NAME} characters")
    else:
        problem = passwords.username_problem(username)
        if problem:
            raise Invalid(problem)
    if role not in ROLES:
        raise Invalid(f"unknown role {role!r} (admin, annotator)")
    if password is not None:
        problem = passwords.password_problem(password, username)
        if problem:
            raise Invalid(problem)
    if role != "source":
        _prefix_legacy_source(db, username)
    if db.scalar(select(User.id).where(User.username == username)) is not None:
        raise Conflict(f"user {username!r} already exists")
    if role != "source":
        key = passwords.skeleton(username)
        for other in db.scalars(select(User.username).where(User.role != "source")):
            if passwords.skeleton(other) == key:
                raise Conflict(f"username {username!r} is too easily mistaken for the existing user {other!r}")
    user = User(
        username=username,
        password_hash=security.hash_password(password) if password is not None else None,
        role=role, active=True, created_at=time.time(),
    )
    return insert_unique(db, user, f"user {username!r} already exists", commit=False)


def _prefix_legacy_source(db: Session, username: str) -> None:
    """A source account made before SOURCE_PREFIX carries the bare imported name; a real
    user of that name takes it, and the source account moves to its prefixed name."""
    prefixed = source_username(username)
    if len(prefixed) <= 64 and db.scalar(select(User.id).where(User.username == prefixed)) is None:
        db.execute(update(User).where(User.username == username, User.role == "source").values(username=prefixed)
                   .execution_options(synchronize_session=False))


@unit_of_work
def create_user(db: Session, username: str, password: str | None = None, role: str = "annotator") -> User:
    """Create a user; `password=None` makes an account that cannot sign in (simulated
    annotators, imported sources). A password must pass `passwords.password_problem`."""
    user = new_user(db, username, password, role)
    db.commit()
    return user


@unit_of_work
def set_password(db: Session, user: User, password: str, *, keep: BearerToken | SessionCookie | None = None) -> None:
    """A new password for `user` (it must pass `passwords.password_problem`); the request
    to change it, if one was set, is cleared. Every API token and browser session of the
    account is revoked but `keep`, the credential the change was made with (none kept
    when an admin or the CLI sets it), so whoever held the old password or a stolen
    session is signed out."""
    problem = imported_annotator_problem(user, "password")
    if problem:
        raise Forbidden(problem)
    problem = passwords.password_problem(password, user.username)
    if problem:
        raise Invalid(problem)
    db.execute(update(User).where(User.id == user.id).values(password_hash=security.hash_password(password),
                                                             password_change_required=False))
    revoke_credentials(db, user.id, keep=keep)
    db.commit()


def revoke_credentials(db: Session, user_id: int, *, keep: BearerToken | SessionCookie | None = None) -> None:
    """Delete the user's API tokens and browser sessions (in the caller's transaction), but `keep`."""
    tokens, sessions = delete(ApiToken).where(ApiToken.user_id == user_id), delete(WebSession).where(WebSession.user_id == user_id)
    if isinstance(keep, BearerToken):
        tokens = tokens.where(ApiToken.token_hash != security.hash_token(keep.token))
    elif isinstance(keep, SessionCookie):
        sessions = sessions.where(WebSession.token_hash != security.hash_token(keep.token))
    db.execute(tokens)
    db.execute(sessions)


def change_password(db: Session, user: User, current_password: str, new_password: str, client: str, *,
                    keep: BearerToken | SessionCookie | None = None, max_failures: int = 5,
                    window_s: float = 300.0) -> None:
    """A signed-in user replaces their password: the new one must pass the rules (Invalid,
    nothing changed) and the current one is checked as a sign-in is, throttle included
    (Forbidden when it is wrong), so a stolen session cannot take the account over; every
    other session and API token of the account is revoked (`set_password`), so one stolen
    before the change stops working."""
    problem = passwords.password_problem(new_password, user.username)
    if problem:
        raise Invalid(problem)
    if sign_in(db, user.username, current_password, client, max_failures=max_failures, window_s=window_s) is None:
        raise Forbidden("the current password is wrong")
    set_password(db, user, new_password, keep=keep)


@read_only
def get_user(db: Session, username: str) -> User:
    user = db.scalar(select(User).where(User.username == username))
    if user is None:
        raise NotFound(f"no user {username!r}")
    return user


@read_only
def list_users(db: Session) -> list[User]:
    return list(db.scalars(select(User).where(User.role != "source").order_by(User.username)))


@unit_of_work
def authenticate(db: Session, username: str, password: str) -> User | None:
    """Check a password (no throttle: `sign_in` is what the web layer calls)."""
    user = db.scalar(select(User).where(User.username == username))
    db.commit()  # no transaction held during the deliberately slow hash
    ok = security.verify_password(user.password_hash if user else None, password)
    if not (ok and user is not None and user.active and user.role != "source"):
        return None
    # Only at a sign-in is the password in hand: an account made under an older rule is
    # asked for a new one from now on (and no longer once it has one).
    outdated = passwords.needs_change(password, user.username)
    if user.password_change_required != outdated:
        db.execute(update(User).where(User.id == user.id).values(password_change_required=outdated))
        user.password_change_required = outdated
    return user


def _throttle_keys(username: str, client: str, max_failures: int) -> list[tuple[str, int]]:
    """The counts a sign-in is checked against, each with its limit: the user from this
    client address, every user from it (guesses spread over many accounts), and the user
    from anywhere. Behind a reverse proxy the server does not trust (`serve
    --forwarded-allow-ips`), the address is the proxy's and the whole team shares one count."""
    name = (username or "").casefold()[:64]
    return sorted([(f"u:{name}|c:{client}", max_failures), (f"c:{client}", 4 * max_failures), (f"u:{name}", 100)])


def _throttled_message(key: str, wait: int) -> str:
    if key.startswith("c:"):
        return (f"too many failed sign-ins from this network address (a limit per address, all accounts "
                f"together); try again in {wait} s")
    return f"too many failed sign-ins; try again in {wait} s"


@unit_of_work
def reserve_sign_in(db: Session, username: str, client: str, *, max_failures: int = 5, window_s: float = 300.0,
                    now: float | None = None) -> None:
    """Count an attempt against each throttle key before the password is checked, so
    concurrent guesses cannot all pass the check; raises Throttled when a key is at its limit."""
    now = time.time() if now is None else now
    old = now - window_s
    db.execute(delete(LoginFailures).where(LoginFailures.window_start < old - window_s))
    for key, limit in _throttle_keys(username, client, max_failures):
        if db.get(LoginFailures, key) is None:
            try:
                with db.begin_nested():
                    db.add(LoginFailures(key=key, window_start=now, failures=0))
            except IntegrityError:
                pass  # another request created it first
        stale = LoginFailures.window_start < old
        res = db.execute(
            update(LoginFailures)
            .where(LoginFailures.key == key, (LoginFailures.failures < limit) | stale)
            .values(
                failures=_case(stale, 1, LoginFailures.failures + 1),
                window_start=_case(stale, now, LoginFailures.window_start),
            )
            .execution_options(synchronize_session=False)
        )
        if res.rowcount != 1:
            start = db.scalar(select(LoginFailures.window_start).where(LoginFailures.key == key)) or now
            db.rollback()
            wait = max(1, int(start + window_s - now) + 1)
            raise Throttled(_throttled_message(key, wait), wait)
    db.commit()


def _case(cond, a, b):
    from sqlalchemy import case

    return case((cond, a), else_=b)


@unit_of_work
def sign_in_succeeded(db: Session, username: str, client: str, *, max_failures: int = 5) -> None:
    """Give back the reserved attempt; the user-and-client count starts over."""
    keys = [k for k, _ in _throttle_keys(username, client, max_failures)]
    db.execute(update(LoginFailures).where(LoginFailures.key.in_(keys), LoginFailures.failures > 0)
               .values(failures=LoginFailures.failures - 1).execution_options(synchronize_session=False))
    db.execute(update(LoginFailures).where(LoginFailures.key == keys_user_client(username, client))
               .values(failures=0).execution_options(synchronize_session=False))
    db.commit()


def keys_user_client(username: str, client: str) -> str:
    return f"u:{(username or '').casefold()[:64]}|c:{client}"


def sign_in(db: Session, username: str, password: str, client: str, *, max_failures: int = 5,
            window_s: float = 300.0) -> User | None:
    """Throttled password check: None for a wrong password, Throttled past the limits. The name is
    read as `new_user` stores it, without outer spaces (a pasted " ann1 " is ann1)."""
    username = username.strip() if isinstance(username, str) else username
    reserve_sign_in(db, username, client, max_failures=max_failures, window_s=window_s)
    user = authenticate(db, username, password)
    if user is not None:
        sign_in_succeeded(db, username, client, max_failures=max_failures)
    return user


def imported_annotator_problem(user: User, credential: str) -> str | None:
    """Why `user` gets no `credential` ("password", "token"), if it is an imported
    annotator's account: it holds rankings read from a file, and nobody signs in as it."""
    if user.role != "source":
        return None
    return (f"{user.username!r} is an imported annotator (named in an imported ranking file), not an account anyone "
            f"signs in with: it gets no {credential}")


def token_problem(user: User) -> str | None:
    """Why a token issued to `user` would let nobody in (None: it would work): an imported
    annotator's account, or a deactivated one, whose token every request refuses
    (`_user_for`, VALID_TOKEN_HOLDER)."""
    if user.role == "source":
        return imported_annotator_problem(user, "token")
    if not user.active:
        return (f"{user.username!r} is deactivated: every request would refuse its token; reactivate it first "
                f"(POST /api/users/{user.username}/activate)")
    return None


@unit_of_work
def issue_api_token(db: Session, user: User, ttl_s: float = DEFAULT_API_TOKEN_TTL_S) -> str:
    """A new API token for `user`, valid `ttl_s` seconds (revoked earlier by `revoke_api_token`)."""
    token = "aln_" + security.new_token()
    now = time.time()
    db.add(ApiToken(user_id=user.id, token_hash=security.hash_token(token), created_at=now, expires_at=now + ttl_s))
    db.commit()
    return token


@unit_of_work
def revoke_api_token(db: Session, token: str) -> bool:
    res = db.execute(delete(ApiToken).where(ApiToken.token_hash == security.hash_token(token)))
    db.commit()
    return res.rowcount == 1


# Every request authenticates, so the lookups are one indexed read each, in a snapshot
# that takes no lock. The user comes back as a plain (transient) User: the caller reads
# its id, username, role and active flag and never writes through it.
_USER_FOR_TOKEN = Sql("SELECT u.id, u.username, u.role, u.active, u.password_change_required, t.expires_at "
                      "FROM api_tokens t JOIN users u ON u.id = t.user_id WHERE t.token_hash = :hash")
_USER_FOR_SESSION = Sql("SELECT u.id, u.username, u.role, u.active, u.password_change_required, s.expires_at "
                        "FROM web_sessions s JOIN users u ON u.id = s.user_id WHERE s.token_hash = :hash")


def _user_for(db: Session, query: Sql, token: str) -> User | None:
    with transaction(db, write=False) as tx:
        row = query.first(tx, hash=security.hash_token(token))
    if row is None:
        return None
    user_id, username, role, active, password_change_required, expires_at = row
    if not active or (expires_at is not None and expires_at < time.time()):
        return None
    return User.transient(id=user_id, username=username, role=role, active=bool(active),
                          password_change_required=bool(password_change_required))


def user_for_token(db: Session, token: str) -> User | None:
    return _user_for(db, _USER_FOR_TOKEN, token)


class BearerToken(NamedTuple):
    """An API token as a request presented it, not checked yet. The two requests of every
    ranking take the caller this way: on PostgreSQL the statement that does their work
    checks the token too (`VALID_TOKEN_HOLDER`), which saves each a round trip of its own."""

    token: str

    def params(self, now: float) -> dict:
        return {"token_hash": security.hash_token(self.token), "now": now}


class SessionCookie(NamedTuple):
    """A browser session cookie as a request presented it, not checked yet: the web layer
    hands it on so that the lookup runs with the rest of the request's database work, off
    the event loop (`signed_in`)."""

    token: str


def signed_in(db: Session, caller: User | BearerToken | SessionCookie) -> User | BearerToken:
    """The caller of a hot request as its service takes it: a session cookie becomes its
    User (Unauthorized if it does not sign one in); a user or an API token stay as they are."""
    if not isinstance(caller, SessionCookie):
        return caller
    user = user_for_session(db, caller.token)
    if user is None:
        raise Unauthorized("sign in first (session cookie or 'Authorization: Bearer <token>')")
    return user


# The caller of a hot statement (id, username, role), as a subquery: a user by id (whom
# the service has checked with `require_annotator`), or the user a valid API token
# authenticates, with the checks of `_user_for` (known token, active user, not expired).
USER_BY_ID = "SELECT id, username, role FROM users WHERE id = :user"
VALID_TOKEN_HOLDER = ("SELECT u.id, u.username, u.role FROM api_tokens t JOIN users u ON u.id = t.user_id "
                      "WHERE t.token_hash = :token_hash AND u.active AND (t.expires_at IS NULL OR t.expires_at >= :now)")
INVALID_TOKEN = "invalid API token"


class CallerStatement:
    """A hot statement written around its caller, `build(caller_sql)`, in both variants: for
    a user by id and for an API token (USER_BY_ID, VALID_TOKEN_HOLDER)."""

    def __init__(self, build: Callable[[str], Sql]):
        self._by_id, self._by_token = build(USER_BY_ID), build(VALID_TOKEN_HOLDER)

    def first(self, tx: Transaction, caller: User | BearerToken, now: float, **params: Any) -> tuple | None:
        """The first row, run for `caller` (the statement's `:now` is `now`)."""
        if isinstance(caller, BearerToken):
            return self._by_token.first(tx, **caller.params(now), **params)
        return self._by_id.first(tx, user=caller.id, now=now, **params)


def as_user(db: Session, caller: User | BearerToken) -> User:
    """The caller as a User; Unauthorized if it is a token that does not authenticate."""
    if not isinstance(caller, BearerToken):
        return caller
    user = user_for_token(db, caller.token)
    if user is None:
        raise Unauthorized(INVALID_TOKEN)
    return user


@unit_of_work
def open_web_session(db: Session, user: User, ttl_s: float = 12 * 3600) -> str:
    token = security.new_token()
    now = time.time()
    db.execute(delete(WebSession).where(WebSession.expires_at < now))
    db.add(WebSession(user_id=user.id, token_hash=security.hash_token(token), created_at=now, expires_at=now + ttl_s))
    db.commit()
    return token


def user_for_session(db: Session, token: str) -> User | None:
    return _user_for(db, _USER_FOR_SESSION, token)


@unit_of_work
def close_web_session(db: Session, token: str) -> None:
    db.execute(delete(WebSession).where(WebSession.token_hash == security.hash_token(token)))
    db.commit()


@unit_of_work
def set_active(db: Session, username: str, active: bool, *, by: User | None = None) -> User:
    """Deactivate (or reactivate) an account. Deactivating revokes its API tokens and
    browser sessions and gives its live leases back to the pool; its rankings stay."""
    user = db.scalar(select(User).where(User.username == username, User.role != "source"))
    if user is None:
        raise NotFound(f"no user {username!r}")
    if by is not None and by.id == user.id and not active:
        raise Conflict("you cannot deactivate your own account")
    user.active = active
    if not active:
        revoke_credentials(db, user.id)
    db.commit()
    if not active:  # after the commit: the account can no longer use them
        with transaction(db, write=True) as tx:
            release_live_leases(tx, user.id)
    return user


@unit_of_work
def create_invite(db: Session, role: str = "annotator", ttl_s: float = 7 * 86400, project: Project | None = None) -> str:
    """A one-use invite token; the account it creates joins `project` if one is given."""
    if role not in ("admin", "annotator"):
        raise Invalid(f"unknown role {role!r} (admin, annotator)")
    token = security.new_token()
    now = time.time()
    db.add(Invite(token_hash=security.hash_token(token), role=role, created_at=now, expires_at=now + ttl_s,
                  project_id=project.id if project is not None else None))
    db.commit()
    return token


@unit_of_work
def accept_invite(db: Session, token: str, username: str, password: str) -> User:
    """Create the invited account. The user row and the claim of the invite are one
    transaction: of concurrent acceptances exactly one commits an account."""
    if not isinstance(password, str):
        raise Invalid("a password is required")
    inv = _invite_of(db, token)
    if invite_problem(inv) is not None:
        raise NotFound("this invite link is unknown, used or expired")
    user = new_user(db, username, password, inv.role)
    claimed = db.execute(update(Invite).where(Invite.id == inv.id, Invite.used_by.is_(None)).values(used_by=user.id))
    if claimed.rowcount != 1:
        db.rollback()
        raise Conflict("this invite link was just used")
    if inv.project_id is not None:
        db.add(ProjectMember(project_id=inv.project_id, user_id=user.id, added_at=time.time()))
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        raise Conflict(f"user {username!r} already exists") from None
    return user


def _invite_of(db: Session, token: str) -> Invite | None:
    return db.scalar(select(Invite).where(Invite.token_hash == security.hash_token(token)))


@read_only
def find_invite(db: Session, token: str) -> Invite | None:
    """The invite of the link `token`, live or not; reading it uses nothing."""
    return _invite_of(db, token)


def invite_problem(inv: Invite | None) -> str | None:
    """Why the invite `inv` makes no account ("unknown": no invite has its token, "used",
    "expired"); None while it is live."""
    if inv is None or inv.used_by is not None:
        return "unknown" if inv is None else "used"
    return "expired" if inv.expires_at < time.time() else None


@read_only
def live_invites(db: Session, project: Project) -> list[Invite]:
    """The invites to `project` still open (neither used nor expired), newest first."""
    return list(db.scalars(select(Invite).where(Invite.project_id == project.id, Invite.used_by.is_(None),
                                                Invite.expires_at >= time.time()).order_by(Invite.id.desc())))


@unit_of_work
def revoke_invite(db: Session, project: Project, invite_id: int) -> bool:
    """Delete an unused invite to `project` (False: none by that id): its link is then unknown.
    An acceptance racing it claims nothing (`accept_invite`: "just used")."""
    res = db.execute(delete(Invite).where(Invite.id == invite_id, Invite.project_id == project.id,
                                          Invite.used_by.is_(None)))
    db.commit()
    return res.rowcount == 1


def require_annotator(user: User) -> None:
    if user.role == "source":
        raise Forbidden("imported-data accounts do not annotate")
    if not user.active:
        raise Forbidden("this account is deactivated")
