"""Top-m rankings through the API (SQLite and PostgreSQL): a project that asks for the best m
of K takes a ranking of them with the rest unordered below, stores it as sent, and exports
it marked (kwise `ranked`, pairs only where an order was stated)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from annotation.models import RankingRow


def _top2_task(env):
    """A top-2-of-4 project with one prompt, an annotator and their task (candidate ids in
    source order: answers 0.0 to 0.3)."""
    r = env.client.post("/api/projects", headers=env.headers(env.admin_token),
                        json={"name": "top", "k": 4, "rank_top": 2})
    assert r.status_code == 201 and r.json()["rank_top"] == 2
    with env.db() as db:
        from align.formats import Candidate, PromptRecord
        from annotation import services

        p = services.get_project(db, "top")
        services.add_prompts(db, p, [PromptRecord("which?", "q0", [Candidate(f"answer {j}") for j in range(4)])])
    tok = env.annotator("ann")
    task = env.client.post("/api/projects/top/next", headers=env.headers(tok)).json()
    assert task["rank_top"] == 2
    ids = {c["text"]: c["id"] for c in task["candidates"]}
    return tok, task["id"], [ids[f"answer {j}"] for j in range(4)]


def test_a_top_m_ranking_is_stored_as_sent_and_exported_marked(env):
    tok, task_id, (a, b, c, d) = _top2_task(env)
    r = env.client.post(f"/api/tasks/{task_id}/ranking", headers=env.headers(tok),
                        json={"order": [[c], [a]], "below": [d, b]})
    assert r.status_code == 201, r.text
    assert r.json()["order"] == [[c], [a]] and r.json()["below"] == [d, b]
    with env.db() as db:
        (row,) = db.scalars(select(RankingRow))
        assert (row.order, row.below) == ([[c], [a]], [d, b])  # the raw ranking, as it was sent
    shown = env.client.get(f"/api/tasks/{task_id}", headers=env.headers(tok)).json()
    assert shown["order"] == [[c], [a]] and shown["below"] == [d, b]

    admin = env.headers(env.admin_token)
    (kwise,) = [json.loads(line) for line in env.client.get("/api/projects/top/export?format=kwise", headers=admin).text.splitlines()]
    assert kwise["ranked"] == 2 and kwise["ranks"] == [1, 2, 0, 2]  # answers 0..3: c first, a second
    pairs = [json.loads(line) for line in env.client.get("/api/projects/top/export?format=trl", headers=admin).text.splitlines()]
    stated = {("answer 2", "answer 0"), ("answer 2", "answer 1"), ("answer 2", "answer 3"),
              ("answer 0", "answer 1"), ("answer 0", "answer 3")}
    assert len(pairs) == 5 and {(p["chosen"], p["rejected"]) for p in pairs} == stated


def test_a_tie_among_the_best_m_puts_the_rest_below_every_ranked_one(env):
    """[[a, c]] ties the two best: the rest rank below both (rank 2, the number ranked), not below
    the first group only, and the export reads back."""
    tok, task_id, (a, b, c, d) = _top2_task(env)
    r = env.client.post(f"/api/tasks/{task_id}/ranking", headers=env.headers(tok),
                        json={"order": [[a, c]], "below": [b, d]})
    assert r.status_code == 201, r.text
    admin = env.headers(env.admin_token)
    export = env.client.get("/api/projects/top/export?format=kwise", headers=admin)
    assert export.status_code == 200, export.text
    (kwise,) = [json.loads(line) for line in export.text.splitlines()]
    assert kwise["ranked"] == 2 and kwise["ranks"] == [0, 2, 0, 2]
    pairs = [json.loads(line) for line in env.client.get("/api/projects/top/export?format=trl", headers=admin).text.splitlines()]
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {
        ("answer 0", "answer 1"), ("answer 0", "answer 3"), ("answer 2", "answer 1"), ("answer 2", "answer 3")}


def test_a_full_ranking_is_also_taken_in_a_top_m_project_and_revisions_keep_below(env):
    tok, task_id, (a, b, c, d) = _top2_task(env)
    r = env.client.post(f"/api/tasks/{task_id}/ranking", headers=env.headers(tok), json={"order": [[a], [b], [c], [d]]})
    assert r.status_code == 201 and r.json()["below"] is None
    r = env.client.put(f"/api/tasks/{task_id}/ranking", headers=env.headers(tok),
                       json={"order": [[b], [a], [c]], "below": [d]})  # more than m ranked is fine
    assert r.status_code == 201 and r.json()["revision"] == 2 and r.json()["below"] == [d]
    (kwise,) = [json.loads(line) for line in env.client.get(
        "/api/projects/top/export?format=kwise", headers=env.headers(env.admin_token)).text.splitlines()]
    assert kwise["ranked"] == 3 and kwise["ranks"] == [1, 0, 2, 3]


@pytest.mark.parametrize("body,word", [
    ({"order": [["C"]], "below": ["A", "B", "D"]}, "at least the best 2"),
    ({"order": [], "below": ["A", "B", "C", "D"]}, "at least the best 2"),
    ({"order": [["C"], ["A"]], "below": ["A", "B", "D"]}, "more than once"),
    ({"order": [["C"], ["A"]], "below": ["B"]}, "neither ranked nor below"),
    ({"order": [["C"], ["A"]], "below": ["B", 999999]}, "not in this task"),
    ({"order": [["C"], ["A"]], "below": [["B", "D"]]}, "integers"),
    ({"order": [["C"], ["A"]], "below": "B"}, "below"),
])
def test_a_bad_top_m_ranking_is_a_422_that_stores_nothing(env, body, word):
    tok, task_id, (a, b, c, d) = _top2_task(env)
    named = {"A": a, "B": b, "C": c, "D": d}

    def ids(value):
        if isinstance(value, list):
            return [ids(v) for v in value]
        return named.get(value, value)

    before = env.counts()
    r = env.client.post(f"/api/tasks/{task_id}/ranking", headers=env.headers(tok),
                        json={"order": ids(body["order"]), "below": ids(body["below"])})
    assert r.status_code == 422 and word in r.text, r.text
    assert env.counts() == before


def test_below_is_refused_where_the_project_ranks_every_candidate(env):
    env.project(n_prompts=1, k=3)
    tok = env.annotator("full")
    task = env.client.post("/api/projects/p/next", headers=env.headers(tok)).json()
    a, b, c = (x["id"] for x in task["candidates"])
    before = env.counts()
    r = env.client.post(f"/api/tasks/{task['id']}/ranking", headers=env.headers(tok), json={"order": [[a]], "below": [b, c]})
    assert r.status_code == 422 and "ranks every candidate" in r.text
    assert env.counts() == before


@pytest.mark.parametrize("rank_top", [0, 4, 7])
def test_rank_top_must_be_below_k(env, rank_top):
    r = env.client.post("/api/projects", headers=env.headers(env.admin_token), json={"name": "x", "k": 4, "rank_top": rank_top})
    assert r.status_code == 422


def test_imported_top_m_rankings_are_stored_with_below_and_export_as_they_came(env):
    line = {"prompt": "q", "prompt_id": "t1", "responses": ["w", "x", "y", "z"], "ranks": [1, 2, 0, 2], "ranked": 2,
            "annotator": "someone"}
    h = {**env.headers(env.admin_token), "content-type": "application/x-ndjson"}
    r = env.client.post("/api/projects/imp/import?format=kwise", headers=h, content=(json.dumps(line) + "\n").encode())
    assert r.status_code == 201 and r.json()["rankings_added"] == 1
    with env.db() as db:
        (row,) = db.scalars(select(RankingRow))
        assert len(row.order) == 2 and len(row.below) == 2
    (back,) = [json.loads(x) for x in env.client.get("/api/projects/imp/export?format=kwise", headers=env.headers(env.admin_token)).text.splitlines()]
    assert (back["ranks"], back["ranked"]) == ([1, 2, 0, 2], 2)


def test_the_admin_s_prompt_page_shows_the_unranked_as_unranked_not_as_a_tie(env):
    # the two left below the best 2 read "#3", as two responses tied for third would
    import re

    from tests.annotation.test_web_pages import _signed_in

    tok, task_id, (a, b, c, d) = _top2_task(env)
    r = env.client.post(f"/api/tasks/{task_id}/ranking", headers=env.headers(tok),
                        json={"order": [[c], [a]], "below": [d, b]})
    assert r.status_code == 201, r.text
    admin, _csrf = _signed_in(env, "admin")
    page = admin.get("/admin/projects/top/prompts/q0")
    assert page.status_code == 200
    rows = re.findall(r"<tr><td[^>]*>.*?answer (\d).*?</td>.*?<td class=\"rank-cell\">(.*?)</td>", page.text, re.S)
    shown = {f"answer {j}": re.sub(r"<[^>]+>", "", cell) for j, cell in rows}
    assert shown == {"answer 0": "#2", "answer 1": "unranked", "answer 2": "#1", "answer 3": "unranked"}, shown
