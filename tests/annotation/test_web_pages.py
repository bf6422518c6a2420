"""The server-rendered pages as the browser receives them: the app in-process, signed in with
a session cookie as a browser is."""

from __future__ import annotations

from tests.annotation.conftest import PASSWORD


def _csrf(page_text: str) -> str:
    return page_text.split('name="csrf-token" content="')[1].split('"')[0]


def test_pages_are_not_kept_in_the_browser_cache(env):
    """A kept page would show a task as it was: Back after a submit showed it still open."""
    env.project(n_prompts=1, k=2)
    env.annotator("ann")
    c = env.client
    login_page = c.get("/")
    assert login_page.headers["cache-control"] == "no-store"
    c.post("/login", data={"username": "ann", "password": PASSWORD, "csrf_token": _csrf(login_page.text)})
    home = c.get("/")
    assert home.headers["cache-control"] == "no-store"
    task = c.post("/api/projects/p/next", headers={"X-CSRF-Token": _csrf(home.text)}).json()
    page = c.get(f"/tasks/{task['id']}", headers={"Accept": "text/html"})
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    missing = c.get("/tasks/999999", headers={"Accept": "text/html"})
    assert missing.status_code == 404 and missing.headers["cache-control"] == "no-store"
    assert "no-store" not in c.get("/static/app.js").headers.get("cache-control", "")  # static files stay cacheable


def _signed_in(env, username: str):
    from fastapi.testclient import TestClient

    c = TestClient(env.client.app)
    login_page = c.get("/")
    c.post("/login", data={"username": username, "password": PASSWORD, "csrf_token": _csrf(login_page.text)})
    return c, _csrf(c.get("/").text)


def test_the_done_page_says_when_tasks_held_by_others_may_come_back(env):
    """One prompt, one annotator slot: while another annotator holds it, the page says it may come
    back and offers to try again; once it is ranked, nothing is left to wait for."""
    env.project(n_prompts=1, k=2, annotators=1)
    env.annotator("holder")
    env.annotator("other")
    holder, holder_csrf = _signed_in(env, "holder")
    other, other_csrf = _signed_in(env, "other")
    task = holder.post("/api/projects/p/next", headers={"X-CSRF-Token": holder_csrf}).json()
    assert other.post("/api/projects/p/next", headers={"X-CSRF-Token": other_csrf}).status_code == 204
    waiting = other.get("/projects/p/done")
    assert "1 task is being ranked by other" in waiting.text and "Try again" in waiting.text
    assert other.get("/api/projects/p").json()["progress"]["in_progress"] == 1
    ranked = holder.post(f"/api/tasks/{task['id']}/ranking", headers={"X-CSRF-Token": holder_csrf},
                         json={"order": [[c["id"] for c in task["candidates"]]]})
    assert ranked.status_code == 201, ranked.text
    finished = other.get("/projects/p/done")
    assert "being ranked" not in finished.text and "Try again" not in finished.text
    assert other.get("/api/projects/p").json()["progress"] == {"prompts": 1, "rankable_prompts": 1, "rankings": 1,
                                                              "target": 1, "in_progress": 0}
