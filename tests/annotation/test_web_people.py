"""A project's People page (members: list with counts, add, remove; accounts: deactivate,
reactivate) and the home page of an admin who is no member of a project. The app in-process,
signed in with a session cookie as a browser is."""

from __future__ import annotations

import pytest

from tests.annotation.test_web_invites import HTML, signed_in, with_admin_pages


@pytest.fixture
def admin(env):
    env.project(n_prompts=2, k=2)
    with_admin_pages(env)
    return signed_in(env)


def members(env, project: str = "p") -> list[str]:
    r = env.client.get(f"/api/projects/{project}/members", headers=env.headers(env.admin_token))
    return sorted(u["username"] for u in r.json())


def test_the_people_page_lists_members_with_their_rankings(env, admin):
    env.annotator("ann")
    tok = env.annotator("bob")
    task = env.client.post("/api/projects/p/next", headers=env.headers(tok)).json()
    ranked = env.client.post(f"/api/tasks/{task['id']}/ranking", headers=env.headers(tok),
                             json={"order": [[c["id"]] for c in task["candidates"]]})
    assert ranked.status_code == 201
    c, _token = admin
    page = c.get("/admin/projects/p/people", headers=HTML)
    assert page.status_code == 200 and "Members <span class=\"muted\">(2)</span>" in page.text
    table = page.text.split('id="member-list"')[1].split("</table>")[0]
    assert "<td>ann</td>\n      <td>0</td>" in table and "<td>bob</td>\n      <td>1</td>" in table
    assert "/admin/projects/p/people" in c.get("/admin/projects/p", headers=HTML).text  # the dashboard links to it


def test_an_admin_adds_an_existing_account_and_bad_input_changes_nothing(env, admin):
    from annotation import services

    c, token = admin
    env.annotator("carol", member_of_all=False)
    with env.db() as db:
        services.create_user(db, "src:imported", None, "source")
    added = c.post("/admin/projects/p/members", data={"username": " carol ", "csrf_token": token}, headers=HTML,
                   follow_redirects=False)
    assert added.status_code == 303 and added.headers["location"] == "/admin/projects/p/people?done=member-added"
    assert members(env) == ["carol"] and "Member added." in c.get(added.headers["location"], headers=HTML).text
    for username, status, words in (("nobody", 404, "no user &#39;nobody&#39;"), ("", 422, "Enter the username"),
                                    ("carol", 409, "already a member"), ("src:imported", 404, "no user")):
        refused = c.post("/admin/projects/p/members", data={"username": username, "csrf_token": token}, headers=HTML)
        assert refused.status_code == status and words in refused.text, (username, refused.status_code)
        assert 'id="people-error"' in refused.text and f'name="username" value="{username}"' in refused.text
        assert members(env) == ["carol"]
    assert c.post("/admin/projects/p/members", data={"username": "nobody"}, headers=HTML).status_code == 403  # CSRF
    assert c.post("/admin/projects/nope/members", data={"username": "carol", "csrf_token": token},
                  headers=HTML).status_code == 404


def test_an_admin_removes_a_member_and_their_open_task_goes_back(env, admin):
    c, token = admin
    tok = env.annotator("dave")
    env.client.post("/api/projects/p/next", headers=env.headers(tok))
    assert env.counts()["slots"] == 1
    removed = c.post("/admin/projects/p/members/dave/remove", data={"csrf_token": token}, headers=HTML,
                     follow_redirects=False)
    assert removed.status_code == 303 and removed.headers["location"] == "/admin/projects/p/people?done=member-removed"
    assert members(env) == [] and env.counts()["slots"] == 0
    again = c.post("/admin/projects/p/members/dave/remove", data={"csrf_token": token}, headers=HTML)
    assert again.status_code == 404 and "not a member" in again.text
    assert c.post("/admin/projects/p/members/nobody/remove", data={"csrf_token": token}, headers=HTML).status_code == 404


def test_an_admin_deactivates_and_reactivates_an_account_but_not_their_own(env, admin):
    from annotation import services

    c, token = admin
    tok = env.annotator("erin")
    with env.db() as db:
        services.add_member(db, services.get_project(db, "p"), services.get_user(db, "admin"))
    erin, _ = signed_in(env, "erin")
    page = c.get("/admin/projects/p/people", headers=HTML)
    assert "/people/erin/deactivate" in page.text and "/people/admin/deactivate" not in page.text  # no button for oneself
    off = c.post("/admin/projects/p/people/erin/deactivate", data={"csrf_token": token}, headers=HTML,
                 follow_redirects=False)
    assert off.status_code == 303 and off.headers["location"] == "/admin/projects/p/people?done=deactivated"
    assert env.client.get("/api/me", headers=env.headers(tok)).status_code == 401
    assert erin.get("/projects/p/done", headers=HTML, follow_redirects=False).status_code == 303  # signed out
    assert "deactivated" in c.get("/admin/projects/p/people", headers=HTML).text
    own = c.post("/admin/projects/p/people/admin/deactivate", data={"csrf_token": token}, headers=HTML)
    assert own.status_code == 409 and "your own account" in own.text
    on = c.post("/admin/projects/p/people/erin/activate", data={"csrf_token": token}, headers=HTML,
                follow_redirects=False)
    assert on.status_code == 303 and signed_in(env, "erin")[0].get("/projects/p/done", headers=HTML).status_code == 200
    assert c.post("/admin/projects/p/people/erin/delete", data={"csrf_token": token}, headers=HTML).status_code == 404
    assert c.post("/admin/projects/p/people/nobody/deactivate", data={"csrf_token": token}, headers=HTML).status_code == 404
    assert c.post("/admin/projects/nope/people/erin/deactivate", data={"csrf_token": token},
                  headers=HTML).status_code == 404
    assert signed_in(env, "erin")[0].get("/projects/p/done", headers=HTML).status_code == 200  # still active


def test_an_annotator_cannot_open_or_use_the_people_page(env, admin):
    env.annotator("fay")
    fay, token = signed_in(env, "fay")
    assert fay.get("/admin/projects/p/people", headers=HTML).status_code == 403
    for path in ("/admin/projects/p/invite", "/admin/projects/p/members", "/admin/projects/p/members/fay/remove",
                 "/admin/projects/p/people/admin/deactivate"):
        assert fay.post(path, data={"csrf_token": token, "username": "fay"}, headers=HTML).status_code == 403, path
    assert members(env) == ["fay"]


def test_an_admin_who_is_no_member_is_shown_the_dashboard_first_and_warned_before_ranking(env):
    """Start ranking leases a real task and counts what is ranked: for an admin who is no member,
    the dashboard comes first and ranking is a second step that says so."""
    from annotation import services

    env.project(n_prompts=1, k=2)
    c, _token = signed_in(env)
    env.project("mine", n_prompts=1, k=2)
    with env.db() as db:
        services.add_member(db, services.get_project(db, "mine"), services.get_user(db, "admin"))
    home = c.get("/", headers=HTML).text
    looked = home.split("<h2>p</h2>")[1].split("</li>")[0]
    assert looked.index('href="/admin/projects/p"') < looked.index('action="/projects/p/start"')
    assert "takes a real task" in looked and "counts as" in looked and "<details" in looked
    assert "Start ranking" not in looked and "Take a real task and rank it" in looked
    member = home.split("<h2>mine</h2>")[1].split("</li>")[0]
    assert "Start ranking" in member and "<details" not in member
    assert env.counts()["slots"] == 0  # looking leased nothing
