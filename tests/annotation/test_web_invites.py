"""The admin's invite links in the browser (made on the People page by post/redirect/get, shown
once, listed, revoked), an invite link's own page, and signing in again: why the sign-in page is
shown and the page it returns to. The app in-process, signed in with a session cookie as a
browser is."""

from __future__ import annotations

import pytest

from tests.annotation.conftest import PASSWORD

HTML = {"Accept": "text/html"}
NEW_PASSWORD = "saffron glacier tumbleweed"


def csrf(page_text: str) -> str:
    return page_text.split('name="csrf-token" content="')[1].split('"')[0]


def with_admin_pages(env):
    """The People routes (annotation.routes_admin) on the test's app, if app.py does not include them."""
    if env.client.get("/admin/projects/x/people", follow_redirects=False).status_code == 404:
        from annotation.routes_admin import router

        env.client.app.include_router(router)
    return env


def signed_in(env, username: str = "admin"):
    """A browser signed in as `username`, and the CSRF token of its pages."""
    from fastapi.testclient import TestClient

    c = TestClient(env.client.app, base_url="http://127.0.0.1")
    c.post("/login", data={"username": username, "password": PASSWORD, "csrf_token": csrf(c.get("/").text)})
    return c, csrf(c.get("/").text)


def invite_link(page_text: str) -> str | None:
    if 'id="invite-link"' not in page_text:
        return None
    return page_text.split('id="invite-link"')[1].split('value="')[1].split('"')[0]


def invite_rows(env) -> list:
    from sqlalchemy import select

    from annotation.models import Invite

    with env.db() as db:
        return list(db.execute(select(Invite.id, Invite.used_by, Invite.expires_at)).all())


@pytest.fixture
def admin(env):
    env.project(n_prompts=1, k=2)
    with_admin_pages(env)
    return signed_in(env)


def test_making_an_invite_redirects_to_the_people_page_which_shows_its_link_once(env, admin):
    """Post/redirect/get: the address after making an invite is a page (reload, Back and the
    pager's links work and make nothing), and the link travels in a short-lived cookie of that
    page only, never in an address."""
    c, token = admin
    made = c.post("/admin/projects/p/invite", data={"csrf_token": token}, headers=HTML, follow_redirects=False)
    assert made.status_code == 303 and made.headers["location"] == "/admin/projects/p/people#new-invite"
    cookie = made.headers["set-cookie"]
    assert "Path=/admin/projects/p/people" in cookie and "HttpOnly" in cookie and "Max-Age=120" in cookie
    page = c.get("/admin/projects/p/people", headers=HTML)
    link = invite_link(page.text)
    assert page.status_code == 200 and link and link.startswith("http://127.0.0.1/invite/")
    assert link.rsplit("/", 1)[1] in cookie and link.rsplit("/", 1)[1] not in made.headers["location"]
    assert 'readonly' in page.text.split('id="invite-link"')[1].split(">")[0]
    assert "Max-Age=0" in page.headers["set-cookie"]  # read once, cleared
    again = c.get("/admin/projects/p/people", headers=HTML)
    assert again.status_code == 200 and invite_link(again.text) is None and "only a hash of it is kept" in again.text
    assert again.text.count("/revoke") == 1 and len(invite_rows(env)) == 1  # listed; a reload made no other
    # the link works, and is used once
    c.cookies.clear()
    form = c.get(link.replace("http://127.0.0.1", ""))
    assert form.status_code == 200 and 'name="password"' in form.text


def test_the_new_link_cookie_shows_only_a_live_invite_of_that_project(env, admin):
    """The cookie is whatever the browser sends: a made-up token, or the link of another
    project's invite, shows nothing."""
    from annotation import services

    c, _token = admin
    env.project("other", n_prompts=1, k=2)
    with env.db() as db:
        elsewhere = services.create_invite(db, project=services.get_project(db, "other"))
    for value in ("made-up", elsewhere):
        c.cookies.set("align_new_invite", value, path="/admin/projects/p/people")
        page = c.get("/admin/projects/p/people", headers=HTML)
        assert page.status_code == 200 and invite_link(page.text) is None


def test_an_admin_revokes_an_invite_and_its_link_stops_working(env, admin):
    c, token = admin
    c.post("/admin/projects/p/invite", data={"csrf_token": token}, headers=HTML)
    (invite_id, _, _), = invite_rows(env)
    page = c.get("/admin/projects/p/people", headers=HTML)
    assert f"/invites/{invite_id}/revoke" in page.text
    # without the page's CSRF token: refused, nothing revoked
    assert c.post(f"/admin/projects/p/invites/{invite_id}/revoke", headers=HTML).status_code == 403
    assert len(invite_rows(env)) == 1
    done = c.post(f"/admin/projects/p/invites/{invite_id}/revoke", data={"csrf_token": token}, headers=HTML,
                  follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/admin/projects/p/people?done=invite-revoked"
    page = c.get(done.headers["location"], headers=HTML)
    assert "Invite revoked" in page.text and "/revoke" not in page.text and invite_rows(env) == []
    again = c.post(f"/admin/projects/p/invites/{invite_id}/revoke", data={"csrf_token": token}, headers=HTML)
    assert again.status_code == 404 and "No such open invite" in again.text


def test_an_invite_link_that_cannot_be_used_says_so_before_the_form(env):
    """Unknown (404), used or expired (410): the page says so at once, with no form. Looking at a
    live link uses nothing: it still makes its account afterwards."""
    import time

    from sqlalchemy import update

    from annotation import services
    from annotation.models import Invite

    env.project(n_prompts=1, k=2)
    with env.db() as db:
        live = services.create_invite(db)
        used = services.create_invite(db)
        services.accept_invite(db, used, "first", NEW_PASSWORD)
        expired = services.create_invite(db)
        db.execute(update(Invite).where(Invite.id == 3).values(expires_at=time.time() - 1))
        db.commit()
    c = env.client
    for token, status, words in (("bogus", 404, "unknown"), (used, 410, "has been used"), (expired, 410, "has expired")):
        page = c.get(f"/invite/{token}")
        assert page.status_code == status and words in page.text, (token, page.status_code)
        assert 'name="password"' not in page.text and "cannot be used" in page.text
    for _ in range(2):
        assert c.get(f"/invite/{live}").status_code == 200
    form = c.get(f"/invite/{live}")
    made = c.post(f"/invite/{live}", data={"username": "second", "password": NEW_PASSWORD, "csrf_token": csrf(form.text)})
    assert made.status_code == 200 and "Account created" in made.text
    after = c.post(f"/invite/{live}", data={"username": "third", "password": NEW_PASSWORD, "csrf_token": csrf(form.text)})
    assert after.status_code == 410 and 'name="password"' not in after.text


def test_a_refused_password_keeps_the_username(env):
    from annotation import services

    with env.db() as db:
        token = services.create_invite(db)
    form = env.client.get(f"/invite/{token}")
    refused = env.client.post(f"/invite/{token}", data={"username": "newbie", "password": "short",
                                                       "csrf_token": csrf(form.text)})
    assert refused.status_code == 422 and "at least 15 characters" in refused.text
    assert 'name="username" value="newbie"' in refused.text and "short" not in refused.text.split("<form")[1]


def _end_sessions(env) -> None:
    from sqlalchemy import update

    from annotation.models import WebSession

    with env.db() as db:
        db.execute(update(WebSession).values(expires_at=0))
        db.commit()


def test_after_a_session_expires_the_sign_in_page_says_so_and_returns_to_the_page(env, admin):
    """A page asked for: back to it after signing in. A form sent (making an invite): nothing
    done, the sign-in page says so, and back to the page the form was on, not its POST address."""
    c, token = admin
    _end_sessions(env)
    asked = c.get("/admin/projects/p/prompts/q0", headers=HTML, follow_redirects=False)
    assert asked.status_code == 303 and asked.headers["location"] == "/?next=/admin/projects/p/prompts/q0"
    login = c.get(asked.headers["location"], headers=HTML)
    assert "Your session has expired: sign in again." in login.text
    assert 'name="next" value="/admin/projects/p/prompts/q0"' in login.text
    back = c.post("/login", data={"username": "admin", "password": PASSWORD, "next": "/admin/projects/p/prompts/q0",
                                  "csrf_token": csrf(login.text)}, follow_redirects=False)
    assert back.status_code == 303 and back.headers["location"] == "/admin/projects/p/prompts/q0"
    assert c.get(back.headers["location"], headers=HTML).status_code == 200

    _end_sessions(env)
    token = csrf(c.get("/admin/projects/p?page=1", headers=HTML, follow_redirects=True).text)
    sent = c.post("/admin/projects/p/invite", data={"csrf_token": token}, follow_redirects=False,
                  headers={**HTML, "Referer": "http://127.0.0.1/admin/projects/p?page=1"})
    assert sent.status_code == 303 and sent.headers["location"] == "/?next=/admin/projects/p%3Fpage%3D1&unsent=1"
    assert invite_rows(env) == []
    login = c.get(sent.headers["location"], headers=HTML)
    assert "Your session has expired" in login.text and "was not carried out" in login.text
    assert 'name="next" value="/admin/projects/p?page=1"' in login.text

    # a form sent from a page that says what the last one did (?done=...): back to the page, not to
    # its notice, which would claim the refused form was carried out
    _end_sessions(env)
    token = csrf(c.get("/admin/projects/p/people?done=member-added&x=1", headers=HTML, follow_redirects=True).text)
    sent = c.post("/admin/projects/p/invite", data={"csrf_token": token}, follow_redirects=False,
                  headers={**HTML, "Referer": "http://127.0.0.1/admin/projects/p/people?done=member-added&x=1"})
    assert sent.headers["location"] == "/?next=/admin/projects/p/people%3Fx%3D1&unsent=1"
    asked = c.get("/admin/projects/p/people?done=member-added", headers=HTML, follow_redirects=False)
    assert asked.headers["location"] == "/?next=/admin/projects/p/people"


def test_the_session_cookie_gone_with_its_max_age_is_an_expired_session_and_a_sign_out_is_not(env, admin):
    """The browser drops the session cookie when the session's time is up; the sign-in page
    still says the session expired. After signing out it says nothing of the kind."""
    c, token = admin
    c.cookies.delete("align_session")
    assert "Your session has expired" in c.get("/", headers=HTML).text
    c2, token2 = signed_in(env)
    c2.post("/logout", data={"csrf_token": token2})
    assert "Your session has expired" not in c2.get("/", headers=HTML).text
    from fastapi.testclient import TestClient

    assert "Your session has expired" not in TestClient(env.client.app).get("/", headers=HTML).text  # never signed in


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil.example", "\\\\evil.example",
                                    "/\t/evil.example", "javascript:alert(1)", "evil.example", "http:/evil.example",
                                    "/ok\r\nSet-Cookie: x=1"])
def test_sign_in_goes_only_to_a_path_on_this_site(env, target):
    env.project(n_prompts=1, k=2)
    c = env.client
    login = c.get("/", params={"next": target}, headers=HTML)
    assert 'name="next"' not in login.text
    answer = c.post("/login", data={"username": "admin", "password": PASSWORD, "next": target,
                                    "csrf_token": csrf(login.text)}, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/", target


def test_sign_in_returns_to_a_page_with_its_query_and_a_signed_in_visit_goes_on_to_it(env):
    env.project(n_prompts=1, k=2)
    with_admin_pages(env)
    c = env.client
    login = c.get("/", params={"next": "/admin/projects/p?page=2"}, headers=HTML)
    answer = c.post("/login", data={"username": "admin", "password": PASSWORD, "next": "/admin/projects/p?page=2",
                                    "csrf_token": csrf(login.text)}, follow_redirects=False)
    assert answer.headers["location"] == "/admin/projects/p?page=2"
    onward = c.get("/", params={"next": "/admin/projects/p"}, headers=HTML, follow_redirects=False)
    assert onward.status_code == 303 and onward.headers["location"] == "/admin/projects/p"
    # a refused form from another site (no Referer of this one) comes back to the home page
    c.cookies.delete("align_session")
    refused = c.post("/admin/projects/p/invite", headers={**HTML, "Referer": "https://evil.example/admin"},
                     follow_redirects=False)
    assert refused.status_code == 303 and refused.headers["location"] == "/?unsent=1"
