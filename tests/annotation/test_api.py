"""JSON API behaviour on a temporary SQLite database (and PostgreSQL when configured)."""

from __future__ import annotations

import json

from tests.annotation.conftest import PASSWORD


def _next(env, token, project="p"):
    return env.client.post(f"/api/projects/{project}/next", headers=env.headers(token))


def test_token_login_and_openapi(env):
    r = env.client.post("/api/tokens", json={"username": "admin", "password": PASSWORD})
    assert r.status_code == 201
    assert env.client.get("/api/me", headers=env.headers(r.json()["token"])).json()["role"] == "admin"
    assert env.client.post("/api/tokens", json={"username": "admin", "password": "nope-nope"}).status_code == 401
    assert env.client.get("/api/me").status_code == 401
    assert env.client.get("/api/me", headers=env.headers("aln_forged")).status_code == 401
    spec = env.client.get("/api/openapi.json").json()
    assert "/api/tasks/{task_id}/ranking" in spec["paths"] and "/api/projects" in spec["paths"]


def test_passwords_hashed_with_argon2_and_secret_persisted(env, db_url):
    from sqlalchemy import select

    from annotation.app import create_app
    from annotation.models import Meta, User
    from annotation.settings import Settings

    with env.db() as db:
        stored = db.scalar(select(User.password_hash).where(User.username == "admin"))
        secret = db.get(Meta, "secret").value
    assert stored.startswith("$argon2") and PASSWORD not in stored
    again = create_app(Settings(db_url=db_url))  # a restart reuses the stored secret
    assert again.state.secret == secret and len(secret) >= 32
    again.state.engine.dispose()


def test_rank_with_tie_stores_exact_order_and_exports(env):
    env.project(n_prompts=1, k=3)
    tok = env.annotator("ann")
    task = _next(env, tok).json()
    ids = [c["id"] for c in task["candidates"]]
    order = [[ids[2]], [ids[0], ids[1]]]  # third best, first two tied
    r = env.client.post(f"/api/tasks/{task['id']}/ranking", headers=env.headers(tok),
                        json={"order": order, "rationale": "clear", "time_spent_ms": 1234})
    assert r.status_code == 201, r.text
    assert r.json()["order"] == order and r.json()["revision"] == 1
    assert _next(env, tok).status_code == 204  # nothing left
    lines = env.client.get("/api/projects/p/export?format=kwise", headers=env.headers(env.admin_token)).text.splitlines()
    row = json.loads(lines[0])
    # responses come back in source order: "answer 0.0", "0.1", "0.2"; rank by candidate id
    with env.db() as db:
        from annotation.models import Candidate

        text_of = {c.id: c.text for c in db.query(Candidate).all()}
    expected = {text_of[ids[2]]: 0, text_of[ids[0]]: 1, text_of[ids[1]]: 1}
    assert dict(zip(row["responses"], row["ranks"])) == expected
    assert row["annotator"] == "ann" and row["prompt_id"] == "q0" and row["rationale"] == "clear"
    pairs = env.client.get("/api/projects/p/export?format=trl", headers=env.headers(env.admin_token)).text.splitlines()
    assert len(pairs) == 2  # the tie implies no pair
    assert {json.loads(p)["chosen"] for p in pairs} == {text_of[ids[2]]}


def test_revision_keeps_raw_rankings(env):
    env.project(n_prompts=1, k=2)
    tok = env.annotator("ann")
    task = _next(env, tok).json()
    a, b = [c["id"] for c in task["candidates"]]
    url = f"/api/tasks/{task['id']}/ranking"
    assert env.client.post(url, headers=env.headers(tok), json={"order": [[a], [b]]}).status_code == 201
    again = env.client.post(url, headers=env.headers(tok), json={"order": [[b], [a]]})
    assert again.status_code == 409 and "revision" in again.json()["detail"]
    fix = env.client.put(url, headers=env.headers(tok), json={"order": [[b], [a]], "all_bad": True})
    assert fix.status_code == 201 and fix.json()["revision"] == 2
    from annotation.models import RankingRow

    with env.db() as db:
        rows = db.query(RankingRow).order_by(RankingRow.revision).all()
        assert [(r.revision, r.order, r.all_bad) for r in rows] == [(1, [[a], [b]], False), (2, [[b], [a]], True)]
    admin = env.headers(env.admin_token)
    row = json.loads(env.client.get("/api/projects/p/export", headers=admin).text)
    assert row["revision"] == 2 and row["all_bad"] is True
    # the audit export: every revision, in order, each as it was submitted
    every = env.client.get("/api/projects/p/export?all_revisions=true", headers=admin).text.splitlines()
    texts = {c["id"]: c["text"] for c in task["candidates"]}
    assert [(r["revision"], r["all_bad"], r["responses"][r["ranks"].index(0)]) for r in map(json.loads, every)] == [
        (1, False, texts[a]), (2, True, texts[b])]
    refused = env.client.get("/api/projects/p/export?format=trl&all_revisions=true", headers=admin)
    assert refused.status_code == 422 and "kwise format only" in refused.json()["detail"]
    from annotation import services

    with env.db() as db:  # the admin's view of the prompt shows the revised ranking, not the first
        detail = services.prompt_detail(db, services.get_project(db, "p"), "q0")
    (shown,) = detail["rankings"]
    revised_ranks = [0 if c.id == b else 1 for c in detail["candidates"]]  # b best, in the source's order
    assert (shown["revision"], shown["all_bad"], shown["ranks"]) == (2, True, revised_ranks)


def test_distinct_annotators_per_prompt_and_least_annotated_first(env):
    env.project(n_prompts=2, k=2, annotators=2)
    toks = [env.annotator(f"a{i}") for i in range(3)]
    seen = {}
    for tok in toks[:2]:
        got = []
        while (r := _next(env, tok)).status_code == 200:
            t = r.json()
            got.append(t["prompt"])
            ids = [c["id"] for c in t["candidates"]]
            assert env.client.post(f"/api/tasks/{t['id']}/ranking", headers=env.headers(tok), json={"order": ids}).status_code == 201
        seen[tok] = got
    assert all(sorted(g) == ["prompt 0?", "prompt 1?"] for g in seen.values())  # each ranked both, once
    assert _next(env, toks[2]).status_code == 204  # both prompts have their 2 annotators


def test_a_new_annotator_gets_a_prompt_fewer_have_ranked(env):
    # Concurrent annotators are spread over the SPREAD least-annotated prompts: with more than SPREAD
    # prompts that nobody has ranked, every new annotator's first task is one of them.
    from annotation.services.leasing import SPREAD

    env.project(n_prompts=2 * SPREAD + 4, k=2, annotators=3)
    first = env.annotator("first")
    ranked = set()
    for _ in range(SPREAD + 2):  # leaves SPREAD + 2 prompts at 0 rankings, the others at 1
        t = _next(env, first).json()
        ranked.add(t["prompt"])
        ids = [c["id"] for c in t["candidates"]]
        assert env.client.post(f"/api/tasks/{t['id']}/ranking", headers=env.headers(first), json={"order": ids}).status_code == 201
    assert len(ranked) == SPREAD + 2
    for i in range(4):
        assert _next(env, env.annotator(f"new{i}")).json()["prompt"] not in ranked


def test_open_lease_is_returned_again_and_blocks_the_slot(env):
    env.project(n_prompts=2, k=2, annotators=1)
    t1, t2, t3 = env.annotator("a1"), env.annotator("a2"), env.annotator("a3")
    first = _next(env, t1).json()
    assert _next(env, t1).json()["id"] == first["id"]  # same task back, not the other prompt
    assert _next(env, t2).json()["prompt"] != first["prompt"]
    assert _next(env, t3).status_code == 204  # both prompts' only slot is leased


def test_expired_lease_frees_the_slot(env):
    from annotation import services
    from annotation.models import User

    env.project(n_prompts=1, k=2, annotators=1, lease_seconds=10)
    env.annotator("a1")
    env.annotator("a2")
    with env.db() as db:
        p = services.get_project(db, "p")
        u1, u2 = db.query(User).filter_by(username="a1").one(), db.query(User).filter_by(username="a2").one()
        t1 = services.next_task(db, u1, p, now=1000.0)
        assert services.next_task(db, u2, p, now=1005.0) is None
        t2 = services.next_task(db, u2, p, now=1011.0)  # a1's lease ran out
        assert t2 is not None and t2.prompt_id == t1.prompt_id
        ids = [c.id for c in t1.candidates]
        services.submit_ranking(db, u2, t2.assignment_id, [ids], now=1012.0)
        try:
            services.submit_ranking(db, u1, t1.assignment_id, [ids], now=1013.0)
            raise AssertionError("late submission on a full prompt was stored")
        except services.Conflict as exc:
            assert "expired" in str(exc)


def test_a_skipped_task_is_final_and_both_ways_of_ranking_it_say_so(env):
    """A skip gives the slot back and the prompt is never offered to its annotator again, so
    a ranking of it may follow neither as a first ranking (POST) nor as a revision (PUT):
    both refuse with the same code, and neither sends the annotator to the other."""
    env.project(n_prompts=2, k=2, annotators=1)
    tok = env.annotator("ann")
    task = _next(env, tok).json()
    url = f"/api/tasks/{task['id']}"
    assert env.client.post(f"{url}/skip", headers=env.headers(tok), json={"reason": "unsure"}).status_code == 201
    before = env.counts()
    order = {"order": [[c["id"]] for c in task["candidates"]]}
    for method in ("post", "put"):
        r = getattr(env.client, method)(f"{url}/ranking", headers=env.headers(tok), json=order)
        assert (r.status_code, r.json().get("code")) == (409, "already_skipped"), (method, r.text)
        assert "skipped" in r.json()["detail"] and "PUT" not in r.json()["detail"] and "POST" not in r.json()["detail"]
    assert env.counts() == before
    leased = _next(env, tok).json()  # a leased task: a revision has nothing to revise yet
    r = env.client.put(f"/api/tasks/{leased['id']}/ranking", headers=env.headers(tok),
                       json={"order": [[c["id"]] for c in leased["candidates"]]})
    assert r.status_code == 409 and "submit it first (POST)" in r.json()["detail"]


def test_refusals_a_client_answers_carry_a_code_and_change_nothing(env):
    """409s and the CSRF 403 name their condition in "code" (the ranking page branches on it, not
    on the wording); other refusals carry none."""
    import time

    from annotation import services
    from annotation.models import User

    env.project(n_prompts=2, k=2, annotators=1)
    env.project("late", n_prompts=1, k=2, annotators=1, lease_seconds=10)
    tok = env.annotator("ann")
    ranked = _next(env, tok).json()
    url = f"/api/tasks/{ranked['id']}"
    order = [[c["id"]] for c in ranked["candidates"]]
    assert env.client.post(f"{url}/ranking", headers=env.headers(tok), json={"order": order}).status_code == 201
    skipped = _next(env, tok).json()
    assert env.client.post(f"/api/tasks/{skipped['id']}/skip", headers=env.headers(tok),
                           json={"reason": "unclear"}).status_code == 201
    before = env.counts()
    for path, body, code in [(f"{url}/ranking", {"order": order}, "already_ranked"),
                             (f"{url}/skip", {"reason": "again"}, "already_ranked"),
                             (f"/api/tasks/{skipped['id']}/ranking",
                              {"order": [[c["id"]] for c in skipped["candidates"]]}, "already_skipped"),
                             (f"/api/tasks/{skipped['id']}/skip", {"reason": "again"}, "already_skipped")]:
        r = env.client.post(path, headers=env.headers(tok), json=body)
        assert (r.status_code, r.json().get("code")) == (409, code), (path, r.text)
    assert env.counts() == before

    env.annotator("other")
    with env.db() as db:  # ann's lease on the one prompt of "late" runs out and "other" ranks it
        p = services.get_project(db, "late")
        ann, other = (db.query(User).filter_by(username=n).one() for n in ("ann", "other"))
        late = services.next_task(db, ann, p)
        taken = services.next_task(db, other, p, now=time.time() + 11)
        assert taken.prompt_id == late.prompt_id
        services.submit_ranking(db, other, taken.assignment_id, [[c.id] for c in taken.candidates])
    before = env.counts()
    r = env.client.post(f"/api/tasks/{late.assignment_id}/ranking", headers=env.headers(tok),
                        json={"order": [[c.id] for c in late.candidates]})
    assert (r.status_code, r.json().get("code")) == (409, "lease_expired") and env.counts() == before
    r = env.client.post("/api/projects", headers=env.headers(env.admin_token), json={"name": "p"})
    assert r.status_code == 409 and "code" not in r.json()  # a conflict no client answers on its own

    c = env.client  # a signed-in browser without the page's token
    c.cookies.clear()
    csrf = c.get("/").text.split('name="csrf_token" value="')[1].split('"')[0]
    assert c.post("/login", data={"username": "ann", "password": PASSWORD, "csrf_token": csrf},
                  follow_redirects=False).status_code == 303
    r = c.post("/api/projects/p/next")
    assert (r.status_code, r.json().get("code")) == (403, "csrf_token") and env.counts() == before


def test_skip_with_reason_releases_slot(env):
    env.project(n_prompts=1, k=2, annotators=1)
    t1, t2 = env.annotator("a1"), env.annotator("a2")
    task = _next(env, t1).json()
    assert env.client.post(f"/api/tasks/{task['id']}/skip", headers=env.headers(t1), json={"reason": ""}).status_code == 422
    r = env.client.post(f"/api/tasks/{task['id']}/skip", headers=env.headers(t1), json={"reason": "not my language"})
    assert r.status_code == 201 and r.json()["skipped"] is True
    assert _next(env, t1).status_code == 204  # never the same prompt again
    assert _next(env, t2).status_code == 200  # the slot went back
    dash = env.client.get("/api/projects/p/dashboard", headers=env.headers(env.admin_token)).json()
    assert any("not my language" in reason for f in dash["flagged"] for reason in f["reasons"])


def test_bad_rankings_refused_and_nothing_stored(env):
    env.project(n_prompts=1, k=3)
    tok = env.annotator("ann")
    task = _next(env, tok).json()
    ids = [c["id"] for c in task["candidates"]]
    url = f"/api/tasks/{task['id']}/ranking"
    before = env.counts()
    cases = {
        "malformed JSON": dict(content=b'{"order": [[1,', headers={**env.headers(tok), "content-type": "application/json"}),
        "unknown id": dict(json={"order": [[ids[0]], [ids[1]], [999999]]}, headers=env.headers(tok)),
        "duplicate id": dict(json={"order": [[ids[0]], [ids[0]], [ids[1]], [ids[2]]]}, headers=env.headers(tok)),
        "missing id": dict(json={"order": [[ids[0]], [ids[1]]]}, headers=env.headers(tok)),
        "empty group": dict(json={"order": [[ids[0]], [], [ids[1], ids[2]]]}, headers=env.headers(tok)),
        "wrong type": dict(json={"order": [["a"], [ids[1]]]}, headers=env.headers(tok)),
        "unknown field": dict(json={"order": [ids], "score": 3}, headers=env.headers(tok)),
    }
    expected_words = {"unknown id": "not in this task", "duplicate id": "more than once", "missing id": "leaves out",
                      "malformed JSON": "json", "empty group": "non-empty", "wrong type": "candidate id", "unknown field": "score"}
    for name, kw in cases.items():
        r = env.client.post(url, **kw)
        assert 400 <= r.status_code < 500, (name, r.status_code)
        assert expected_words[name].lower() in r.text.lower(), (name, r.text)
    assert env.counts() == before


def test_oversized_body_refused(env):
    env.project(n_prompts=1, k=2)
    tok = env.annotator("ann")
    task = _next(env, tok).json()
    before = env.counts()
    huge = {"order": [c["id"] for c in task["candidates"]], "rationale": "x" * 200_000}
    r = env.client.post(f"/api/tasks/{task['id']}/ranking", headers=env.headers(tok), json=huge)
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    assert env.counts() == before


def test_only_the_import_route_takes_an_import_sized_body(env):
    """The import limit is the import route's: a form that happens to end in /import (the
    invite page of a token 'import', unauthenticated) is refused at the general limit unread."""
    body = b"x" * (100 * 1024)  # over the app's 64 KiB, far under the import limit
    for path in ("/invite/import", "/invite/abc", "/api/projects/p/import/x", "/api/projects/import"):
        r = env.client.post(path, content=body, headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 413 and "too large" in r.json()["detail"], (path, r.status_code, r.text[:200])
    r = env.client.post("/api/projects/p/import?format=prompts", headers=env.headers(env.admin_token),
                        content=b"".join(b'{"prompt": "%d %s"}\n' % (i, b"x" * 40_000) for i in range(3)))
    assert r.status_code == 201, r.text

def test_other_users_task_and_admin_routes_forbidden(env):
    env.project(n_prompts=2, k=2, annotators=2)
    t1, t2 = env.annotator("a1"), env.annotator("a2")
    task = _next(env, t1).json()
    ids = [c["id"] for c in task["candidates"]]
    before = env.counts()
    assert env.client.get(f"/api/tasks/{task['id']}", headers=env.headers(t2)).status_code == 403
    r = env.client.post(f"/api/tasks/{task['id']}/ranking", headers=env.headers(t2), json={"order": ids})
    assert r.status_code == 403 and "another annotator" in r.json()["detail"]
    assert env.client.post(f"/api/tasks/{task['id']}/skip", headers=env.headers(t2), json={"reason": "x"}).status_code == 403
    assert env.client.post("/api/tasks/999999/ranking", headers=env.headers(t2), json={"order": ids}).status_code == 404
    for method, path in [("get", "/api/projects/p/export"), ("get", "/api/projects/p/dashboard"),
                         ("post", "/api/projects"), ("post", "/api/users"), ("post", "/api/invites")]:
        r = getattr(env.client, method)(path, headers=env.headers(t2), **({"json": {}} if method == "post" else {}))
        assert r.status_code in (403, 422) and (r.status_code == 403 or method == "post"), (path, r.status_code)
        if method == "post":
            r = env.client.post(path, headers=env.headers(t2), json={"name": "x", "username": "x", "password": "12345678"})
            assert r.status_code == 403, path
    assert env.counts() == before


def test_cookie_session_requires_csrf(env):
    env.project(n_prompts=1, k=2)
    env.annotator("ann")
    c = env.client
    login_page = c.get("/")
    assert "align_csrf" in login_page.cookies or c.cookies.get("align_csrf")
    csrf = login_page.text.split('name="csrf-token" content="')[1].split('"')[0]
    # login without the token: refused
    assert c.post("/login", data={"username": "ann", "password": PASSWORD}).status_code == 403
    r = c.post("/login", data={"username": "ann", "password": PASSWORD, "csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303
    set_cookie = r.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=lax" in set_cookie
    home = c.get("/")
    token = home.text.split('name="csrf-token" content="')[1].split('"')[0]
    before = env.counts()
    assert c.post("/api/projects/p/next").status_code == 403  # no CSRF header
    assert c.post("/api/projects/p/next", headers={"X-CSRF-Token": csrf}).status_code == 403  # pre-login token
    assert env.counts() == before
    task = c.post("/api/projects/p/next", headers={"X-CSRF-Token": token})
    assert task.status_code == 200
    ids = [x["id"] for x in task.json()["candidates"]]
    before = env.counts()
    assert c.post(f"/api/tasks/{task.json()['id']}/ranking", json={"order": ids}).status_code == 403
    assert env.counts() == before
    ok = c.post(f"/api/tasks/{task.json()['id']}/ranking", json={"order": ids}, headers={"X-CSRF-Token": token})
    assert ok.status_code == 201


def test_login_throttled(env):
    for _ in range(5):
        assert env.client.post("/api/tokens", json={"username": "admin", "password": "wrong-password"}).status_code == 401
    r = env.client.post("/api/tokens", json={"username": "admin", "password": PASSWORD})
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0


def test_security_headers_and_xss_escaped(env):
    from align.formats import Candidate, PromptRecord
    from annotation import services

    with env.db() as db:
        p = services.create_project(db, "x", k=2, guidelines="<script>alert(2)</script> **bold**")
        services.add_prompts(db, p, [PromptRecord("<b>hi</b>", "x1", [Candidate("<img src=x onerror=alert(1)>"), Candidate("<script>alert(1)</script>\n\n```\ncode\n```")])])
    tok = env.annotator("ann")
    task = _next(env, tok, "x").json()
    # the page itself, via a browser session
    c = env.client
    csrf = c.get("/").text.split('name="csrf-token" content="')[1].split('"')[0]
    c.post("/login", data={"username": "ann", "password": PASSWORD, "csrf_token": csrf})
    page = c.get(f"/tasks/{task['id']}")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-frame-options"] == "DENY"
    html = page.text
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<strong>bold</strong>" in html and "<pre><code>code" in html  # Markdown still renders
    assert "<script>" not in html.replace('<script src="/static/app.js" defer></script>', "")
    assert c.get("/static/app.js").status_code == 200


def test_projects_prompts_and_import_over_api(env):
    h = env.headers(env.admin_token)
    r = env.client.post("/api/projects", headers=h, json={"name": "api", "k": 2, "annotators_per_prompt": 1})
    assert r.status_code == 201
    assert env.client.post("/api/projects", headers=h, json={"name": "api"}).status_code == 409
    assert env.client.post("/api/projects", headers=h, json={"name": "bad", "k": 1}).status_code == 422
    r = env.client.post("/api/projects/api/prompts", headers=h,
                        json={"prompts": [{"prompt": "hi", "candidates": ["a", {"text": "b", "model": "m"}]}, {"prompt": "later"}]})
    assert r.status_code == 201 and r.json()["prompts_added"] == 2
    trl = b'{"prompt": "p?", "chosen": "good", "rejected": "bad", "prompt_id": "q7"}\n'
    r = env.client.post("/api/projects/t/import?format=trl", headers=h, content=trl)
    assert r.status_code == 201 and r.json()["rankings_added"] == 1
    bad = env.client.post("/api/projects/t/import?format=trl", headers=h, content=b'{"prompt": "p"}\n')
    assert bad.status_code == 422 and bad.json()["detail"].startswith("body:1:") and "chosen" in bad.json()["detail"]
    pairs = env.client.get("/api/projects/t/export?format=trl", headers=h).text
    assert env.client.get("/api/projects/t/export?format=pairs", headers=h).text == pairs  # its former name
    assert json.loads(pairs) == {"prompt": "p?", "chosen": "good", "rejected": "bad", "prompt_id": "q7", "annotator": "src:trl"}
    projects = env.client.get("/api/projects", headers=env.headers(env.annotator("ann"))).json()
    assert {p["name"] for p in projects} == {"api", "t"}
    assert next(p for p in projects if p["name"] == "api")["progress"]["rankable_prompts"] == 1


def test_dashboard_agreement(env):
    env.project(n_prompts=2, k=3, annotators=2)
    toks = [env.annotator("a1"), env.annotator("a2")]
    for tok in toks:
        while (r := _next(env, tok)).status_code == 200:
            t = r.json()
            ids = sorted(c["id"] for c in t["candidates"])  # both rank by candidate id: full agreement
            env.client.post(f"/api/tasks/{t['id']}/ranking", headers=env.headers(tok), json={"order": ids, "time_spent_ms": 2000})
    d = env.client.get("/api/projects/p/dashboard", headers=env.headers(env.admin_token)).json()
    a = d["agreement"]
    assert a["items_with_2plus_annotators"] == 2 and a["pairwise_agreement"] == 1.0
    assert a["kendall_tau_pairwise"] == 1.0 and a["krippendorff_alpha_ordinal"] == 1.0
    assert [u["rankings"] for u in d["annotators"]] == [2, 2] and d["annotators"][0]["median_time_s"] == 2.0
    html = env.client.get("/admin/projects/p")  # no cookie: redirected/refused
    assert html.status_code in (401, 303, 200) and "Krippendorff" not in html.text


def _csrf(page_text: str) -> str:
    return page_text.split('name="csrf-token" content="')[1].split('"')[0]


def test_admin_dashboard_page_and_invite_flow(env):
    env.project(n_prompts=1, k=2)
    c = env.client
    c.post("/login", data={"username": "admin", "password": PASSWORD, "csrf_token": _csrf(c.get("/").text)})
    page = c.get("/admin/projects/p")
    assert page.status_code == 200 and "Krippendorff" in page.text and "Pairwise agreement" in page.text
    token = _csrf(page.text)
    assert c.post("/admin/projects/p/invite", data={}).status_code == 403  # CSRF needed
    r = c.post("/admin/projects/p/invite", data={"csrf_token": token})
    assert r.url.path == "/admin/projects/p/people"  # post/redirect/get: the People page shows the new link once
    link = r.text.split('id="invite-link"')[1].split('value="')[1].split('"')[0]
    path = "/invite/" + link.rsplit("/invite/", 1)[1]
    c.post("/logout", data={"csrf_token": token})
    c.cookies.clear()
    form = c.get(path)
    assert form.status_code == 200
    short = c.post(path, data={"username": "newbie", "password": "short", "csrf_token": _csrf(form.text)})
    assert short.status_code == 422 and "at least 15 characters" in short.text
    assert 'minlength="15"' in form.text  # the page says so before sending
    listed = c.post(path, data={"username": "newbie", "password": "password1234567", "csrf_token": _csrf(form.text)})
    assert listed.status_code == 422 and "known-compromised" in listed.text
    made = c.post(path, data={"username": "newbie", "password": "a fresh key phrase", "csrf_token": _csrf(form.text)})
    assert made.status_code == 200 and "Account created" in made.text
    assert made.url.path == "/"  # redirected away from the invite: reloading it said the link was unknown
    assert c.post(path, data={"username": "other", "password": "other password", "csrf_token": _csrf(form.text)}).status_code == 410
    # the new annotator signs in and cannot open the admin page
    c.post("/login", data={"username": "newbie", "password": "a fresh key phrase", "csrf_token": _csrf(c.get("/").text)})
    assert "Start ranking" in c.get("/").text
    assert c.get("/admin/projects/p", headers={"accept": "text/html"}).status_code == 403


def test_task_page_of_another_user_is_refused(env):
    env.project(n_prompts=1, k=2, annotators=2)
    t1 = env.annotator("a1")
    env.annotator("a2")
    task = _next(env, t1).json()
    c = env.client
    c.post("/login", data={"username": "a2", "password": PASSWORD, "csrf_token": _csrf(c.get("/").text)})
    r = c.get(f"/tasks/{task['id']}", headers={"accept": "text/html"})
    assert r.status_code == 403 and "another annotator" in r.text and "answer 0" not in r.text


def test_a_task_request_takes_one_pooled_connection_and_gives_it_back(env):
    """The statements of one request share one connection (each checkout costs the pool
    Python on every ranking), and it is back in the pool once the response is sent, for a
    refused request too."""
    from sqlalchemy import event

    env.project()
    token = env.annotator("ann")
    engine = env.client.app.state.engine
    checkouts = []
    event.listen(engine, "checkout", lambda *_args: checkouts.append(1))

    task = _next(env, token).json()
    assert len(checkouts) == 1 and engine.pool.checkedout() == 0
    checkouts.clear()
    order = [[c["id"]] for c in task["candidates"]]
    assert env.client.post(f"/api/tasks/{task['id']}/ranking", json={"order": order}, headers=env.headers(token)).status_code == 201
    assert len(checkouts) == 1 and engine.pool.checkedout() == 0
    r = env.client.post(f"/api/tasks/{task['id']}/ranking", json={"order": order}, headers=env.headers(token))
    assert r.status_code == 409 and engine.pool.checkedout() == 0


def test_a_removed_member_loses_their_tasks_and_their_lease_frees_its_slot_at_once(env):
    """After DELETE /api/projects/p/members/alice, alice can no longer read, submit, revise
    or skip her tasks in p (on PostgreSQL the submission's one-statement path too), and
    the prompt she had leased goes to another annotator at once."""
    env.project(n_prompts=2, k=2, annotators=1)
    alice = env.annotator("alice")
    bob = env.annotator("bobby")
    done = _next(env, alice).json()
    ids = [c["id"] for c in done["candidates"]]
    assert env.client.post(f"/api/tasks/{done['id']}/ranking", headers=env.headers(alice), json={"order": ids}).status_code == 201
    leased = _next(env, alice).json()
    assert _next(env, bob).status_code == 204  # both prompts are taken
    before = env.counts()
    r = env.client.delete("/api/projects/p/members/alice", headers=env.headers(env.admin_token))
    assert r.status_code == 204
    h = env.headers(alice)
    lids = [c["id"] for c in leased["candidates"]]
    for r in (env.client.get(f"/api/tasks/{leased['id']}", headers=h),
              env.client.get(f"/api/tasks/{done['id']}", headers=h),
              env.client.post(f"/api/tasks/{leased['id']}/ranking", headers=h, json={"order": lids}),
              env.client.put(f"/api/tasks/{done['id']}/ranking", headers=h, json={"order": ids[::-1]}),
              env.client.post(f"/api/tasks/{leased['id']}/skip", headers=h, json={"reason": "gone"})):
        assert r.status_code == 403 and "member" in r.json()["detail"], r.text
    assert env.counts() == {**before, "slots": before["slots"] - 1}  # her lease's slot is free
    task = _next(env, bob)
    assert task.status_code == 200 and task.json()["prompt"] == leased["prompt"]


def test_a_ranked_task_shows_its_all_bad_and_rationale_so_a_revision_keeps_them(env):
    """The task (API and page) carries the stored ranking's all_bad and rationale; the page
    pre-set neither, so revising from it reset both."""
    import html
    import re

    env.project(n_prompts=1, k=3)
    tok = env.annotator("alice")
    task = _next(env, tok).json()
    assert (task["all_bad"], task["rationale"]) == (False, None)
    ids = [c["id"] for c in task["candidates"]]
    r = env.client.post(f"/api/tasks/{task['id']}/ranking", headers=env.headers(tok),
                        json={"order": ids, "all_bad": True, "rationale": "all <wrong> & off-topic"})
    assert r.status_code == 201
    shown = env.client.get(f"/api/tasks/{task['id']}", headers=env.headers(tok)).json()
    assert (shown["all_bad"], shown["rationale"]) == (True, "all <wrong> & off-topic")
    c = env.client
    c.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": _csrf(c.get("/").text)})
    page = c.get(f"/tasks/{task['id']}").text
    assert re.search(r'<input type="checkbox" id="all-bad" checked>', page)
    textarea = re.search(r'<textarea id="rationale"[^>]*>([^<]*)</textarea>', page).group(1)
    assert html.unescape(textarea) == "all <wrong> & off-topic"
