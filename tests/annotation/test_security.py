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
    ("12345678", "common"), ("password", "common"), ("        ", "spaces"), ("Password1", "common"),
    ("aaaaaaaaaa", "repeats"), ("abcdefghij", "sequence"), ("short", "at least 8"), ("my carol key", "username"),
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
        source = services.create_user(db, "imported-rater", None, "source")
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
