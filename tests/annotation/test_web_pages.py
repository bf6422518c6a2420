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


def test_a_page_that_cannot_be_shown_is_the_error_page_not_json(env, monkeypatch):
    """A project the annotator is no member of, or that does not exist, and a busy database:
    the browser gets the error page with the status the API answers with, never raw JSON."""
    from annotation import services
    from annotation.db import DatabaseBusy

    env.project("A", n_prompts=1, k=2)
    env.annotator("ann")
    env.team.clear()
    env.project("B", n_prompts=1, k=2)  # ann is no member of B
    c, csrf = _signed_in(env, "ann")
    html = {"Accept": "text/html"}
    for answer in (c.get("/projects/B/done", headers=html), c.get("/projects/nope/done", headers=html),
                   c.post("/projects/B/start", headers=html, data={"csrf_token": csrf}, follow_redirects=False)):
        assert answer.status_code == 404 and answer.headers["content-type"].startswith("text/html"), answer.text
        assert "no project" in answer.text and "<h1>404</h1>" in answer.text
    assert c.get("/api/projects/B").json() == {"detail": "no project 'B'"}  # the API still answers JSON

    def busy(*_args, **_kwargs):
        raise DatabaseBusy("every task offered was taken by another annotator first; try again in a moment")

    monkeypatch.setattr(services, "next_task_in", busy)
    answer = c.post("/projects/A/start", headers=html, data={"csrf_token": csrf}, follow_redirects=False)
    assert answer.status_code == 503 and answer.headers["content-type"].startswith("text/html")
    assert "retry-after" in answer.headers and "try again in a moment" in answer.text


def test_a_full_server_answers_a_page_with_html_and_the_api_with_json(tmp_path):
    """Admission's 503 (more requests at once than a worker takes on) is read by people too."""
    from fastapi.testclient import TestClient

    from annotation.app import create_app
    from annotation.settings import Settings

    app = create_app(Settings(db_url=f"sqlite:///{tmp_path / 'busy.db'}", max_in_flight=0))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        page = c.get("/", headers={"Accept": "text/html"})
        api = c.get("/api/me", headers={"Accept": "text/html"})
    assert (page.status_code, api.status_code) == (503, 503) and page.headers["retry-after"] == "1"
    assert page.headers["content-type"].startswith("text/html") and "busy" in page.text
    assert api.json() == {"detail": "the server is busy; try again in a moment"}
    app.state.engine.dispose()


def test_a_page_address_naming_nothing_is_not_found_not_a_validation_report(env):
    # /tasks/abc answered 422 "path.task_id: Input should be a valid integer, unable to parse ..."
    env.project(n_prompts=1, k=2)
    env.annotator("ann")
    c, _csrf = _signed_in(env, "ann")
    page = c.get("/tasks/abc", headers={"Accept": "text/html"})
    assert page.status_code == 404 and "no such page: /tasks/abc" in page.text and "valid integer" not in page.text
    api = c.get("/api/tasks/abc")  # an API client still reads which parameter was wrong
    assert api.status_code == 422 and "task_id" in api.json()["detail"]
