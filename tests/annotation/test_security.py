"""Accounts and abuse: invites under concurrency, the sign-in throttle across restarts and
processes, password and username rules, token expiry and revocation, deactivation,
project membership. On SQLite and on PostgreSQL when configured."""

from __future__ import annotations

import threading

import pytest

from tests.annotation.conftest import PASSWORD


def _count_users(env) -> int:
    from sqlalchemy import func, select

    from annotation.models import User

    with env.db() as db:
        return db.scalar(select(func.count()).select_from(User))


def test_concurrent_invite_acceptance_makes_exactly_one_account(env):
    from annotation import services

    with env.db() as db:
        token = services.create_invite(db, "annotator")
    before = _count_users(env)
    results: list = []
    barrier = threading.Barrier(10)

    def accept(i: int) -> None:
        with env.db() as db:
            barrier.wait()
            try:
                services.accept_invite(db, token, f"racer{i}", "tandem bicycle lantern")
                results.append("ok")
            except services.ServiceError as exc:
                results.append(type(exc).__name__)

    threads = [threading.Thread(target=accept, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results.count("ok") == 1, results
    assert _count_users(env) == before + 1


def test_concurrent_wrong_passwords_are_refused_beyond_the_limit(env):
    from annotation import services

    results: list = []
    barrier = threading.Barrier(12)

    def guess(i: int) -> None:
        with env.db() as db:
            barrier.wait()
            try:
                results.append("ok" if services.sign_in(db, "admin", f"wrong guess {i}", "10.0.0.9") else "wrong")
            except services.Throttled:
                results.append("throttled")

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results.count("wrong") == 5 and results.count("throttled") == 7, results
    with env.db() as db:  # even the right password waits now, from that client
        with pytest.raises(services.Throttled):
            services.sign_in(db, "admin", PASSWORD, "10.0.0.9")


def test_throttle_survives_a_restart_and_holds_across_apps(env, db_url):
    from fastapi.testclient import TestClient

    from annotation.app import create_app
    from annotation.settings import Settings

    for _ in range(5):
        assert env.client.post("/api/tokens", json={"username": "admin", "password": "not it at all"}).status_code == 401
    # A second app on the same database (a restart, or another worker process) refuses at once.
    other = create_app(Settings(db_url=db_url))
    with TestClient(other, base_url="http://127.0.0.1") as c:
        r = c.post("/api/tokens", json={"username": "admin", "password": PASSWORD})
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    other.state.engine.dispose()


def test_sign_in_from_another_client_is_not_blocked_and_success_resets(env):
    from annotation import services

    with env.db() as db:
        for i in range(4):
            assert services.sign_in(db, "admin", f"nope {i} nope", "10.0.0.1") is None
        assert services.sign_in(db, "admin", PASSWORD, "10.0.0.1") is not None
        for i in range(5):  # the count started over after the success
            assert services.sign_in(db, "admin", f"nope {i} nope", "10.0.0.1") is None
        assert services.sign_in(db, "admin", PASSWORD, "10.0.0.2") is not None


@pytest.mark.parametrize("password,word", [
    ("12345678", "at least 15"), ("a 9-char!", "at least 15"), ("fourteen chars", "at least 15"),
    ("short", "at least 15"), ("               ", "spaces"),
    ("password1234567", "known-compromised"), ("1qaz2wsx3edc4rfv", "known-compromised"),
    ("Q1W2E3R4T5Y6U7I8", "known-compromised"), ("iloveyou12345678!", "known-compromised"),
    ("aaaaaaaaaaaaaaaa", "repeats"), ("abcdefghijklmnopq", "sequence"), ("my carol key for the lab", "username"),
    # repetitive or sequential however long: a word repeated, keyboard rows run on, digits counted on
    ("qwertyuiopasdfg", "easy to guess"), ("zxcvbnmzxcvbnmz", "easy to guess (a repetition)"),
    ("passwordpassword", "easy to guess (a repetition)"), ("iloveyouiloveyou", "easy to guess"),
    ("0123456789012345", "easy to guess (a sequence"), ("abcabcabcabcabc", "easy to guess"),
])
def test_weak_passwords_refused(env, password, word):
    before = _count_users(env)
    r = env.client.post("/api/users", headers=env.headers(env.admin_token),
                        json={"username": "carol", "password": password})
    assert r.status_code == 422 and word in r.json()["detail"], r.text
    assert _count_users(env) == before


@pytest.mark.parametrize("username", ["Admin", "ADMIN", "adm1n", "a.dmin", "аdmin", "admin ", "ad min", "<b>x</b>"])
def test_usernames_that_could_impersonate_are_refused(env, username):
    before = _count_users(env)
    r = env.client.post("/api/users", headers=env.headers(env.admin_token),
                        json={"username": username, "password": "tandem bicycle lantern"})
    assert r.status_code in (409, 422), r.text
    assert _count_users(env) == before


def test_passwordless_accounts_still_made_for_simulated_annotators(env):
    from annotation import services

    with env.db() as db:
        user = services.create_user(db, "simulated-0", None, "annotator")
        assert user.password_hash is None


def test_tokens_expire_and_are_revoked_on_logout(env):
    from annotation import services

    with env.db() as db:
        user = services.get_user(db, "admin")
        expired = services.issue_api_token(db, user, ttl_s=-1)
    assert env.client.get("/api/me", headers=env.headers(expired)).status_code == 401
    token = env.client.post("/api/tokens", json={"username": "admin", "password": PASSWORD}).json()["token"]
    assert env.client.get("/api/me", headers=env.headers(token)).status_code == 200
    assert env.client.delete("/api/tokens/current", headers=env.headers(token)).status_code == 204
    assert env.client.get("/api/me", headers=env.headers(token)).status_code == 401


def test_admin_deactivates_an_account(env):
    env.project(n_prompts=2, k=2)
    tok = env.annotator("dora")
    task = env.client.post("/api/projects/p/next", headers=env.headers(tok))
    assert task.status_code == 200
    assert env.counts()["slots"] == 1
    r = env.client.post("/api/users/dora/deactivate", headers=env.headers(env.admin_token))
    assert r.status_code == 200 and r.json()["active"] is False
    assert env.client.get("/api/me", headers=env.headers(tok)).status_code == 401  # tokens revoked
    assert env.counts()["slots"] == 0  # the open task went back to the pool
    assert env.client.post("/api/tokens", json={"username": "dora", "password": PASSWORD}).status_code == 401
    assert env.client.post("/api/users/admin/deactivate", headers=env.headers(env.admin_token)).status_code == 409
    assert env.client.post("/api/users/dora/deactivate", headers=env.headers(tok)).status_code == 401


def test_annotators_see_only_their_projects(env):
    env.project("open", n_prompts=1, k=2)
    outsider = env.annotator("olga", member_of_all=False)
    h = env.headers(outsider)
    assert env.client.get("/api/projects", headers=h).json() == []
    assert env.client.get("/api/projects/open", headers=h).status_code == 404
    assert env.client.post("/api/projects/open/next", headers=h).status_code == 404
    assert env.counts()["slots"] == 0
    r = env.client.post("/api/projects/open/members", headers=env.headers(env.admin_token), json={"username": "olga"})
    assert r.status_code == 201
    assert [p["name"] for p in env.client.get("/api/projects", headers=h).json()] == ["open"]
    assert env.client.post("/api/projects/open/next", headers=h).status_code == 200
    env.project("admins only", n_prompts=1, k=2)  # an admin sees every project, member or not
    assert env.client.post("/api/projects/admins%20only/next", headers=env.headers(env.admin_token)).status_code == 200


def test_invite_for_a_project_makes_a_member(env):
    env.project("team", n_prompts=1, k=2)
    path = env.client.post("/api/invites", headers=env.headers(env.admin_token), json={"project": "team"}).json()["path"]
    from annotation import services

    with env.db() as db:
        user = services.accept_invite(db, path.rsplit("/", 1)[1], "newcomer", "tandem bicycle lantern")
        assert services.is_member(db, services.get_project(db, "team"), user)


def test_the_ranking_requests_refuse_tokens_that_do_not_authenticate(env):
    """Next task and submit check an API token in the statement that does their work (on
    PostgreSQL) instead of a lookup of its own: an unknown, expired, revoked or deactivated
    token still gets a 401 and changes nothing, an import account's a 403."""
    from annotation import services

    env.project(n_prompts=3, k=2)
    tok = env.annotator("hana")
    task = env.client.post("/api/projects/p/next", headers=env.headers(tok)).json()
    ranking = {"order": [[c["id"]] for c in task["candidates"]]}
    submit = f"/api/tasks/{task['id']}/ranking"
    with env.db() as db:
        hana = services.get_user(db, "hana")
        expired = services.issue_api_token(db, hana, ttl_s=-1)
        source = services.create_user(db, services.source_username("imported-rater"), None, "source")
        # (add_member refuses such an account: a membership from an older database, written directly)
        from annotation.models import ProjectMember

        db.add(ProjectMember(project_id=services.get_project(db, "p").id, user_id=source.id, added_at=0.0))
        db.commit()
        with pytest.raises(services.NotFound, match="no user 'src:imported-rater'"):
            services.add_member(db, services.get_project(db, "p"), source)
        source_token = services.issue_api_token(db, source)
    revoked = env.client.post("/api/tokens", json={"username": "hana", "password": PASSWORD}).json()["token"]
    assert env.client.delete("/api/tokens/current", headers=env.headers(revoked)).status_code == 204

    def refused(token: str, status: int, words: str) -> None:
        for r in (env.client.post("/api/projects/p/next", headers=env.headers(token)),
                  env.client.post(submit, headers=env.headers(token), json=ranking)):
            assert r.status_code == status and words in r.json()["detail"], (r.status_code, r.text)
            if status == 401:
                assert r.headers["www-authenticate"] == "Bearer"

    before = env.counts()
    for token in ("no-such-token", expired, revoked):
        refused(token, 401, "invalid API token")
    refused(source_token, 403, "imported-data accounts")
    with env.db() as db:  # a token whose account is inactive (deactivating deletes them too)
        from sqlalchemy import update

        from annotation.models import User

        ivo = services.create_user(db, "ivo", PASSWORD)
        inactive = services.issue_api_token(db, ivo)
        db.execute(update(User).where(User.id == ivo.id).values(active=False))
        db.commit()
    refused(inactive, 401, "invalid API token")
    assert env.counts() == before
    assert env.client.post("/api/users/hana/deactivate", headers=env.headers(env.admin_token)).status_code == 200
    before = env.counts()  # the deactivation gave the lease back
    refused(tok, 401, "invalid API token")
    assert env.counts() == before


def _account_with_an_old_password(env, username: str, old: str) -> None:
    """An account whose password was chosen under the old rule (8 characters, a hand-kept
    list), stored as that align stored it."""
    from sqlalchemy import update

    from annotation import security, services
    from annotation.models import User

    with env.db() as db:
        services.create_user(db, username, "a placeholder pass phrase", "annotator")
        db.execute(update(User).where(User.username == username).values(password_hash=security.hash_password(old)))
        db.commit()


def test_an_account_with_an_old_password_keeps_working_and_is_asked_to_change_it(env):
    from tests.annotation.test_api import _csrf

    old, new = "oldpass9!", "a brand new pass phrase"
    _account_with_an_old_password(env, "olduser", old)
    r = env.client.post("/api/tokens", json={"username": "olduser", "password": old})
    assert r.status_code == 201 and r.json()["password_change_required"] is True  # signed in, and told
    token = r.json()["token"]
    assert env.client.get("/api/me", headers=env.headers(token)).json()["password_change_required"] is True

    # The page says so after a browser sign-in.
    c = env.client
    c.post("/login", data={"username": "olduser", "password": old, "csrf_token": _csrf(c.get("/").text)})
    home = c.get("/")
    assert 'id="password-notice"' in home.text and "no longer meets" in home.text and "at least 15" in home.text

    # Refused changes change nothing: a weak new password, a wrong current one.
    weak = c.put("/api/me/password", headers=env.headers(token), json={"current_password": old, "new_password": "short"})
    assert weak.status_code == 422 and "at least 15" in weak.json()["detail"]
    wrong = c.put("/api/me/password", headers=env.headers(token),
                  json={"current_password": "not the password", "new_password": new})
    assert wrong.status_code == 403 and "current password" in wrong.json()["detail"]
    assert env.client.post("/api/tokens", json={"username": "olduser", "password": old}).status_code == 201

    # The page's form changes it; the notice goes, the old password no longer signs in.
    form = c.get("/account/password")
    assert form.status_code == 200 and 'minlength="15"' in form.text
    done = c.post("/account/password", data={"current_password": old, "new_password": new, "csrf_token": _csrf(form.text)})
    assert done.status_code == 200 and 'id="password-notice"' not in done.text  # followed to the home page
    assert "Password changed. Your other sessions and API tokens were signed out." in done.text  # it said nothing
    assert 'href="/account/password"' in done.text  # the page is reachable when no change is required too
    assert c.get("/api/me").json()["password_change_required"] is False  # the session that changed it stays
    assert env.client.get("/api/me", headers=env.headers(token)).status_code == 401  # other credentials are revoked
    assert env.client.post("/api/tokens", json={"username": "olduser", "password": old}).status_code == 401
    again = env.client.post("/api/tokens", json={"username": "olduser", "password": new})
    assert again.status_code == 201 and again.json()["password_change_required"] is False


def test_the_password_form_needs_the_csrf_token_and_a_session(env):
    r = env.client.post("/account/password", data={"current_password": PASSWORD, "new_password": "a brand new pass phrase"})
    assert r.status_code in (401, 403)


def _signed_in(env, password):
    """A browser of its own (a cookie jar) signed in as alice."""
    from fastapi.testclient import TestClient

    from tests.annotation.test_api import _csrf

    c = TestClient(env.client.app, base_url="http://127.0.0.1")
    r = c.post("/login", data={"username": "alice", "password": password, "csrf_token": _csrf(c.get("/").text)},
               follow_redirects=False)
    assert r.status_code == 303
    return c


def test_a_password_change_signs_out_every_other_session_and_token(env):
    """Whoever held the old password, or a stolen session or token, is signed out by a
    change of the password; the credential that made the change keeps working."""
    from tests.annotation.test_api import _csrf

    changer = env.annotator("alice")
    other = env.client.post("/api/tokens", json={"username": "alice", "password": PASSWORD}).json()["token"]
    tab, stolen = _signed_in(env, PASSWORD), _signed_in(env, PASSWORD)
    new = "an entirely different passphrase 4711"
    r = env.client.put("/api/me/password", headers=env.headers(changer), json={"current_password": PASSWORD, "new_password": new})
    assert r.status_code == 204
    assert env.client.get("/api/me", headers=env.headers(changer)).status_code == 200
    assert env.client.get("/api/me", headers=env.headers(other)).status_code == 401
    assert tab.get("/api/me").status_code == 401 and stolen.get("/api/me").status_code == 401

    # From the browser's form: that session stays, the others (and every token) go.
    tab, stolen = _signed_in(env, new), _signed_in(env, new)
    form = tab.get("/account/password")
    done = tab.post("/account/password", data={"current_password": new, "new_password": "yet another long passphrase 90",
                                                "csrf_token": _csrf(form.text)})
    assert done.status_code == 200
    assert tab.get("/api/me").status_code == 200 and stolen.get("/api/me").status_code == 401
    assert env.client.get("/api/me", headers=env.headers(changer)).status_code == 401


def _rows(env, model) -> list:
    from sqlalchemy import select

    with env.db() as db:
        return list(db.scalars(select(model)))


def test_a_passwordless_account_cannot_sign_in(env):
    from annotation import services

    with env.db() as db:
        services.create_user(db, "simulated-0", None, "annotator")
        for i, guess in enumerate(["", "anything at all, really", PASSWORD]):
            assert services.sign_in(db, "simulated-0", guess, f"10.0.3.{i}") is None
    r = env.client.post("/api/tokens", json={"username": "simulated-0", "password": "anything at all, really"})
    assert r.status_code == 401, r.text


def test_another_member_does_not_let_an_outsider_see_a_project(env):
    """A project with a member: someone else, not a member, neither sees nor leases from it."""
    from annotation import services

    env.project("p", n_prompts=2, k=2)
    member = env.annotator("ann")
    outsider = env.annotator("olga", member_of_all=False)
    h = env.headers(outsider)
    before = env.counts()
    assert env.client.get("/api/projects", headers=h).json() == []
    assert env.client.get("/api/projects/p", headers=h).status_code == 404
    r = env.client.post("/api/projects/p/next", headers=h)
    assert r.status_code == 404 and "no project" in r.json()["detail"], r.text
    assert env.counts() == before
    with env.db() as db:
        olga = services.get_user(db, "olga")
        assert services.list_projects(db, olga) == []
        assert [p.name for p in services.list_projects(db, services.get_user(db, "ann"))] == ["p"]
        with pytest.raises(services.NotFound):
            services.next_task_in(db, olga, "p")
    assert env.counts() == before
    assert env.client.post("/api/projects/p/next", headers=env.headers(member)).status_code == 200


def test_an_expired_invite_makes_no_account(env):
    from annotation import services
    from annotation.models import Invite

    with env.db() as db:
        token = services.create_invite(db, "annotator", ttl_s=-1)
    before = _count_users(env)
    with env.db() as db:
        with pytest.raises(services.NotFound, match="expired"):
            services.accept_invite(db, token, "latecomer", "tandem bicycle lantern")
    assert _count_users(env) == before
    assert [inv.used_by for inv in _rows(env, Invite)] == [None]


def test_tokens_sessions_and_invites_are_stored_only_as_their_sha256(env):
    import hashlib

    from annotation import services
    from annotation.models import ApiToken, Invite, WebSession

    with env.db() as db:
        user = services.create_user(db, "stella", PASSWORD)
        api = services.issue_api_token(db, user)
        web = services.open_web_session(db, user)
        invite = services.create_invite(db, "annotator")
    signed = env.client.post("/api/tokens", json={"username": "stella", "password": PASSWORD}).json()["token"]
    sha = {t: hashlib.sha256(t.encode()).hexdigest() for t in (api, web, invite, signed)}
    stored = {m: [r.token_hash for r in _rows(env, m)] for m in (ApiToken, WebSession, Invite)}
    assert sha[api] in stored[ApiToken] and sha[signed] in stored[ApiToken]
    assert stored[WebSession] == [sha[web]] and stored[Invite] == [sha[invite]]
    every = [h for hashes in stored.values() for h in hashes]
    assert not set(sha) & set(every)
    assert all(len(h) == 64 and set(h) <= set("0123456789abcdef") for h in every)
    assert env.client.get("/api/me", headers=env.headers(api)).json()["username"] == "stella"


def test_an_account_is_throttled_after_100_failures_from_many_clients(env):
    """Wrong guesses at one account from 100 clients (each under its own limits) use up the
    account's limit: a new client is refused too, even with the right password."""
    from annotation import services
    from annotation.services import users

    with env.db() as db:
        for i in range(100):
            users.reserve_sign_in(db, "admin", f"10.1.{i // 250}.{i % 250}")  # an attempt, not given back
        with pytest.raises(services.Throttled):
            users.reserve_sign_in(db, "admin", "10.2.0.1")
        with pytest.raises(services.Throttled):
            services.sign_in(db, "admin", PASSWORD, "10.2.0.2")


def test_a_correct_sign_in_gives_back_one_attempt_of_the_client_not_all(env):
    """The client-wide limit is 4 x 5 = 20 wrong sign-ins. 19 spread over accounts (at most
    4 each), then a correct sign-in of another account (its reserved attempt given back):
    the client has one attempt left, not twenty."""
    from annotation import services
    from annotation.services import users

    client = "10.3.0.1"
    with env.db() as db:
        for i in range(19):
            users.reserve_sign_in(db, f"ghost{i // 4}", client)  # wrong sign-ins, never given back
        assert services.sign_in(db, "admin", PASSWORD, client) is not None
        users.reserve_sign_in(db, "ghost9", client)
        with pytest.raises(services.Throttled):
            users.reserve_sign_in(db, "ghost10", client)
        with pytest.raises(services.Throttled):
            services.sign_in(db, "admin", PASSWORD, client)
        assert services.sign_in(db, "admin", PASSWORD, "10.3.0.2") is not None  # another client is not held


def test_deactivating_revokes_tokens_and_sessions_for_good(env):
    from annotation import services
    from annotation.models import ApiToken, WebSession

    old = env.annotator("dora")
    with env.db() as db:
        services.open_web_session(db, services.get_user(db, "dora"))
    signed = env.client.post("/api/tokens", json={"username": "dora", "password": PASSWORD}).json()["token"]
    admin = env.headers(env.admin_token)
    assert env.client.post("/api/users/dora/deactivate", headers=admin).status_code == 200
    with env.db() as db:
        dora = services.get_user(db, "dora")
    assert [r for r in _rows(env, ApiToken) if r.user_id == dora.id] == []
    assert [r for r in _rows(env, WebSession) if r.user_id == dora.id] == []
    r = env.client.post("/api/users/dora/activate", headers=admin)
    assert r.status_code == 200 and r.json()["active"] is True
    for token in (old, signed):
        assert env.client.get("/api/me", headers=env.headers(token)).status_code == 401
    fresh = env.client.post("/api/tokens", json={"username": "dora", "password": PASSWORD}).json()["token"]
    assert env.client.get("/api/me", headers=env.headers(fresh)).status_code == 200


def test_a_signed_in_browser_without_its_csrf_cookie_still_needs_the_csrf_token(env):
    """The CSRF check follows the session cookie, not the pre-login cookie: a browser that
    lost (or never sent) align_csrf is still refused without the token."""
    from fastapi.testclient import TestClient

    from tests.annotation.test_api import _csrf

    env.project(n_prompts=2, k=2)
    env.annotator("alice")
    c = TestClient(env.client.app, base_url="http://127.0.0.1")
    r = c.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": _csrf(c.get("/").text)},
               follow_redirects=False)
    assert r.status_code == 303 and c.cookies.get("align_session")
    c.cookies.delete("align_csrf")
    assert c.cookies.get("align_csrf") is None and c.get("/api/me").status_code == 200
    before = env.counts()
    r = c.post("/api/projects/p/next")
    assert r.status_code == 403 and r.json()["code"] == "csrf_token", r.text
    assert env.counts() == before


def test_a_deactivated_user_cannot_lease_in_process(env):
    from annotation import services

    env.project(n_prompts=2, k=2)
    env.annotator("dora")
    assert env.client.post("/api/users/dora/deactivate", headers=env.headers(env.admin_token)).status_code == 200
    before = env.counts()
    with env.db() as db:
        dora, project = services.get_user(db, "dora"), services.get_project(db, "p")
        assert dora.active is False
        with pytest.raises(services.Forbidden, match="deactivated"):
            services.next_task(db, dora, project)
        with pytest.raises(services.Forbidden, match="deactivated"):
            services.next_task_in(db, dora, "p")
    assert env.counts() == before


def test_unknown_roles_are_refused(env):
    from annotation import services
    from annotation.models import Invite

    before = _count_users(env)
    with env.db() as db:
        with pytest.raises(services.Invalid, match="unknown role"):
            services.create_user(db, "zed", PASSWORD, "root")
        for role in ("source", "root"):
            with pytest.raises(services.Invalid, match="unknown role"):
                services.create_invite(db, role)
    assert _count_users(env) == before and _rows(env, Invite) == []


def test_stored_passwords_are_hashed_at_production_cost_outside_the_tests(monkeypatch):
    """The tests hash at argon2id's smallest cost (conftest); the server's own hasher is argon2id at no
    less than the library's defaults (RFC 9106's second recommended option: 3 passes over 64 MiB)."""
    from argon2 import Type, extract_parameters

    from annotation.security import hash_password, verify_password

    monkeypatch.undo()  # the server's own hasher
    stored = hash_password("correct horse battery staple")
    params = extract_parameters(stored)
    assert params.type is Type.ID and params.time_cost >= 3 and params.memory_cost >= 64 * 1024
    assert verify_password(stored, "correct horse battery staple") and not verify_password(stored, "wrong")


def test_a_csrf_token_with_characters_no_token_has_is_refused_not_a_server_error(env):
    """A presented token is whatever the request carried: one with a non-ASCII character (which
    hmac.compare_digest refuses as text) is a wrong token, in a header or a form alike."""
    from fastapi.testclient import TestClient

    from tests.annotation.test_api import _csrf

    env.project(n_prompts=2, k=2)
    env.annotator("alice")
    c = TestClient(env.client.app, base_url="http://127.0.0.1", raise_server_exceptions=False)
    r = c.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": "\u00e9"}, follow_redirects=False)
    assert r.status_code == 403 and not c.cookies.get("align_session")
    r = c.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": _csrf(c.get("/").text)},
               follow_redirects=False)
    assert r.status_code == 303
    before = env.counts()
    r = c.post("/api/projects/p/next", headers={"X-CSRF-Token": "\u00e9".encode()})
    assert r.status_code == 403 and r.json()["code"] == "csrf_token", r.text
    assert env.counts() == before


def test_a_username_signs_in_as_it_was_stored_without_outer_spaces(env):
    """An account made as " ann1 " is stored as ann1; signing in with the name as typed then
    (or pasted with a space) was refused as a wrong password."""
    h = env.headers(env.admin_token)
    made = env.client.post("/api/users", headers=h, json={"username": " ann1 ", "password": PASSWORD})
    assert made.status_code == 201 and made.json()["username"] == "ann1", made.text
    for typed in (" ann1 ", "ann1", "ann1\t"):
        r = env.client.post("/api/tokens", json={"username": typed, "password": PASSWORD})
        assert r.status_code == 201, (typed, r.text)
    assert env.client.post("/api/tokens", json={"username": " ann1 ", "password": "wrong" * 4}).status_code == 401
