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
