"""The lease keep-alive (`services.renew_lease`, `POST /api/tasks/{id}/lease`): the ranking
page renews its annotator's live lease while they work, so a ranking that takes longer than
lease_seconds is not lost to another annotator; a lease that ran out is never revived. On
SQLite, and on PostgreSQL when ALIGN_TEST_DATABASE_URL is set (the `env` fixture)."""

from __future__ import annotations

from tests.annotation.conftest import PASSWORD

T0 = 1_900_000_000.0  # a fixed "now", so lease arithmetic is exact


def _lease(env, username: str, now: float, project: str = "p"):
    from annotation import services

    with env.db() as db:
        return services.next_task(db, services.get_user(db, username), services.get_project(db, project), now=now)


def _renew(env, username: str, task_id: int, now: float) -> float:
    from annotation import services

    with env.db() as db:
        return services.renew_lease(db, services.get_user(db, username), task_id, members_only=True, now=now)


def _leased_until(env, task_id: int) -> float:
    from annotation.models import Assignment

    with env.db() as db:
        return db.get(Assignment, task_id).leased_until


def test_renewal_extends_a_live_lease_by_the_projects_lease_seconds(env):
    env.project(n_prompts=1, k=2, lease_seconds=60)
    env.annotator("ann")
    task = _lease(env, "ann", T0)
    assert task.leased_until == T0 + 60
    assert _renew(env, "ann", task.assignment_id, T0 + 45) == T0 + 45 + 60
    assert _leased_until(env, task.assignment_id) == T0 + 105
    assert _renew(env, "ann", task.assignment_id, T0 + 100) == T0 + 160  # and again, before it runs out


def test_a_renewed_lease_is_not_taken_by_another_annotator_after_its_first_end(env):
    """The UX review's case: the annotator's ranking took longer than lease_seconds, and
    another annotator took the prompt's only slot meanwhile."""
    env.project(n_prompts=1, k=2, annotators=1, lease_seconds=60)
    env.annotator("ann1")
    env.annotator("ann2")
    task = _lease(env, "ann1", T0)
    _renew(env, "ann1", task.assignment_id, T0 + 50)
    assert _lease(env, "ann2", T0 + 70) is None  # past the first end, before the renewed one
    assert _lease(env, "ann1", T0 + 70).assignment_id == task.assignment_id  # still theirs, live
    taken = _lease(env, "ann2", T0 + 111)  # not renewed again: it runs out, and the slot is free
    assert taken is not None and taken.prompt_id == task.prompt_id


def test_a_lease_that_ran_out_is_not_revived(env):
    from annotation import services

    env.project(n_prompts=1, k=2, annotators=1, lease_seconds=60)
    env.annotator("ann")
    task = _lease(env, "ann", T0)
    for now in (T0 + 61, T0 + 61 + 600):  # ran out, then also expired by a sweep
        if now > T0 + 61:
            with env.db() as db:
                services.release_expired_leases(db, services.get_project(db, "p"), now)
        try:
            _renew(env, "ann", task.assignment_id, now)
        except services.Conflict as exc:
            assert exc.code == "lease_expired"
        else:
            raise AssertionError("a lease that ran out was renewed")
        assert _leased_until(env, task.assignment_id) == T0 + 60


def test_the_api_renews_only_the_callers_own_live_lease(env):
    env.project(n_prompts=3, k=2, lease_seconds=60)
    tok = env.annotator("ann")
    other = env.annotator("other")
    task = env.client.post("/api/projects/p/next", headers=env.headers(tok)).json()
    url = f"/api/tasks/{task['id']}/lease"
    r = env.client.post(url, headers=env.headers(tok))
    assert r.status_code == 200, r.text
    assert r.json()["id"] == task["id"] and r.json()["leased_until"] >= task["leased_until"]
    assert r.json()["leased_until"] == _leased_until(env, task["id"])
    before = _leased_until(env, task["id"])
    refused = env.client.post(url, headers=env.headers(other))
    assert refused.status_code == 403 and "another annotator" in refused.json()["detail"]
    assert env.client.post(url).status_code == 401
    assert env.client.post("/api/tasks/999999/lease", headers=env.headers(tok)).status_code == 404
    assert _leased_until(env, task["id"]) == before
    ids = [c["id"] for c in task["candidates"]]
    assert env.client.post(f"/api/tasks/{task['id']}/ranking", headers=env.headers(tok),
                           json={"order": ids}).status_code == 201
    done = env.client.post(url, headers=env.headers(tok))
    assert done.status_code == 409 and done.json()["code"] == "already_ranked"
    nxt = env.client.post("/api/projects/p/next", headers=env.headers(tok)).json()
    assert env.client.post(f"/api/tasks/{nxt['id']}/skip", headers=env.headers(tok),
                           json={"reason": "not my language"}).status_code == 201
    skipped = env.client.post(f"/api/tasks/{nxt['id']}/lease", headers=env.headers(tok))
    assert skipped.status_code == 409 and skipped.json()["code"] == "already_skipped"


def test_a_removed_member_cannot_renew(env):
    from annotation import services

    env.project(n_prompts=1, k=2, lease_seconds=60)
    tok = env.annotator("ann")
    task = env.client.post("/api/projects/p/next", headers=env.headers(tok)).json()
    with env.db() as db:
        services.remove_member(db, services.get_project(db, "p"), services.get_user(db, "ann"))
    r = env.client.post(f"/api/tasks/{task['id']}/lease", headers=env.headers(tok))
    assert r.status_code == 403 and "no longer a member" in r.json()["detail"]


def _csrf(page_text: str) -> str:
    return page_text.split('name="csrf-token" content="')[1].split('"')[0]


def test_the_browser_renews_with_its_session_cookie_and_csrf_token(env):
    env.project(n_prompts=1, k=2, lease_seconds=60)
    env.annotator("ann")
    c = env.client
    c.post("/login", data={"username": "ann", "password": PASSWORD, "csrf_token": _csrf(c.get("/").text)})
    token = _csrf(c.get("/").text)
    task = c.post("/api/projects/p/next", headers={"X-CSRF-Token": token}).json()
    page = c.get(f"/tasks/{task['id']}", headers={"Accept": "text/html"}).text
    assert 'data-lease-seconds="60"' in page  # the page's keep-alive paces itself by it
    before = _leased_until(env, task["id"])
    assert c.post(f"/api/tasks/{task['id']}/lease").status_code == 403  # no CSRF token
    assert _leased_until(env, task["id"]) == before
    r = c.post(f"/api/tasks/{task['id']}/lease", headers={"X-CSRF-Token": token})
    assert r.status_code == 200 and r.json()["leased_until"] >= before
