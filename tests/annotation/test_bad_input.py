"""Bad input gets a clear 4xx naming the problem and changes nothing (SQLite and PostgreSQL)."""

from __future__ import annotations

import gzip
import json

import pytest


def _task(env):
    env.project(n_prompts=2, k=3)
    tok = env.annotator("ann")
    task = env.client.post("/api/projects/p/next", headers=env.headers(tok)).json()
    return tok, task, [c["id"] for c in task["candidates"]]


def _prompt_count(env) -> int:
    from sqlalchemy import func, select

    from annotation.models import Project, Prompt

    with env.db() as db:
        return db.scalar(select(func.count()).select_from(Prompt)) * 1000 + db.scalar(select(func.count()).select_from(Project))


def test_ids_too_large_for_the_database(env):
    tok, task, ids = _task(env)
    before = env.counts()
    h = env.headers(tok)
    for url in ("/api/tasks/9223372036854775808", "/api/tasks/2147483648", "/api/tasks/0", "/api/tasks/-1"):
        r = env.client.get(url, headers=h)
        assert r.status_code == 422 and "task_id" in r.text, (url, r.text)
    r = env.client.post("/api/tasks/99999999999999999999/ranking", headers=h, json={"order": [[i] for i in ids]})
    assert r.status_code == 422
    r = env.client.post(f"/api/tasks/{task['id']}/ranking", headers=h, json={"order": [[2**63], [ids[0]], [ids[1]]]})
    assert r.status_code == 422 and "not in this task" in r.text
    assert env.client.get("/tasks/99999999999999999999", headers=h).status_code in (404, 422)
    assert env.counts() == before


def test_types_are_strict(env):
    tok, task, ids = _task(env)
    before = env.counts()
    url = f"/api/tasks/{task['id']}/ranking"
    for body, field in (({"order": [[i] for i in ids], "all_bad": "yes"}, "all_bad"),
                        ({"order": [[i] for i in ids], "all_bad": 1}, "all_bad"),
                        ({"order": [[i] for i in ids], "time_spent_ms": "10"}, "time_spent_ms"),
                        ({"order": [[str(i)] for i in ids]}, "integers"),
                        ({"order": [[True], [ids[1]], [ids[2]]]}, "integers")):
        r = env.client.post(url, headers=env.headers(tok), json=body)
        assert r.status_code == 422 and field in r.text, (body, r.text)
    assert env.counts() == before


def test_ranking_body_over_the_task_limit_refused_unread(env):
    tok, task, ids = _task(env)
    before = env.counts()
    body = json.dumps({"order": [list(range(1, 150_000))]}).encode()
    assert len(body) > 1 << 20
    r = env.client.post(f"/api/tasks/{task['id']}/ranking", headers={**env.headers(tok), "content-type": "application/json"},
                        content=body)
    assert r.status_code == 413 and "too large" in r.text
    many = {"order": [ids[:1] * 3000, ids[1:2], ids[2:3]]}  # under the limit but far more ids than K
    r = env.client.post(f"/api/tasks/{task['id']}/ranking", headers=env.headers(tok), json=many)
    assert r.status_code == 422 and "3 candidates" in r.text
    assert env.counts() == before


def test_prompt_with_wrong_candidate_count_refused(env):
    env.project(n_prompts=1, k=3)
    before = _prompt_count(env)
    h = env.headers(env.admin_token)
    r = env.client.post("/api/projects/p/prompts", headers=h,
                        json={"prompts": [{"prompt": "ok?", "candidates": ["a", "b", "c"]}, {"prompt": "two?", "candidates": ["a", "b"]}]})
    assert r.status_code == 422 and "K=3" in r.text
    assert _prompt_count(env) == before
    assert env.client.post("/api/projects/p/prompts", headers=h, json={"prompts": []}).status_code == 422
    assert env.client.post("/api/projects/p/prompts", headers=h, json={"prompts": [{"prompt": "later?"}]}).status_code == 201


def test_import_bodies_that_are_not_utf8_jsonl(env):
    h = {**env.headers(env.admin_token), "content-type": "application/x-ndjson"}
    before = _prompt_count(env)
    cases = {
        "latin-1": ('{"prompt": "caf\xe9"}\n'.encode("latin-1"), 422, "UTF-8"),
        "gzip": (gzip.compress(b'{"prompt": "hi"}\n'), 415, "gzip"),
        "empty": (b"", 422, "no records"),
        "blank lines": (b"\n\n  \n", 422, "no records"),
        "nul byte": (b'{"prompt": "a\\u0000b"}\n', 422, "NUL"),
    }
    for name, (body, status, word) in cases.items():
        r = env.client.post("/api/projects/newp/import?format=prompts", headers=h, content=body)
        assert r.status_code == status and word in r.text, (name, r.status_code, r.text)
    r = env.client.post("/api/projects/newp/import?format=prompts", headers={**h, "content-encoding": "gzip"},
                        content=gzip.compress(b'{"prompt": "hi"}\n'))
    assert r.status_code == 415
    assert _prompt_count(env) == before  # no project "newp", no prompt
    assert env.client.get("/api/projects/newp", headers=h).status_code == 404


def test_nul_characters_refused(env):
    env.project(n_prompts=1, k=2)
    tok = env.annotator("ann")
    before = env.counts()
    assert env.client.post("/api/tokens", json={"username": "ad\u0000min", "password": "x\u0000" * 8}).status_code in (401, 422)
    r = env.client.post("/api/projects", headers=env.headers(env.admin_token), json={"name": "g", "guidelines": "a\u0000"})
    assert r.status_code == 422 and "NUL" in r.text
    task = env.client.post("/api/projects/p/next", headers=env.headers(tok)).json()
    r = env.client.post(f"/api/tasks/{task['id']}/skip", headers=env.headers(tok), json={"reason": "bad\u0000"})
    assert r.status_code == 422 and "NUL" in r.text
    assert env.counts()["rankings"] == before["rankings"]


def test_imported_rankings_are_held_to_the_projects_k(env):
    """Imported rankings may have fewer responses than the project's K (real data varies)
    but never more: a file with one such ranking is refused whole and stores nothing."""
    import json

    h = {**env.headers(env.admin_token), "content-type": "application/x-ndjson"}
    env.project(n_prompts=1, k=3)
    before = env.counts()

    def kwise(n: int, pid: str) -> str:
        return json.dumps({"prompt": f"q {pid}", "prompt_id": pid, "responses": [f"r{i}" for i in range(n)],
                           "ranks": list(range(n))})

    r = env.client.post("/api/projects/p/import?format=kwise", headers=h,
                        content=(kwise(2, "a") + "\n" + kwise(4, "b") + "\n").encode())
    assert r.status_code == 422 and "K=3" in r.text and "'b'" in r.text
    assert env.counts() == before
    r = env.client.post("/api/projects/p/import?format=kwise", headers=h, content=(kwise(2, "a") + "\n" + kwise(3, "c") + "\n").encode())
    assert r.status_code == 201 and r.json()["rankings_added"] == 2


@pytest.mark.parametrize("ranks", [["a", 0], [0.5, 1], [True, False], [-1, 0], [0, 2], None, [[0], 1], [0], "01"])
def test_imported_ranks_must_be_ranks_of_their_responses(env, ranks):
    """Ranks are integers from 0 to n - 1, one per response: anything else is a 422 naming
    the ranking, and nothing of the file is stored."""
    import json

    h = {**env.headers(env.admin_token), "content-type": "application/x-ndjson"}
    env.project(n_prompts=1, k=3)
    before = env.counts()
    good = json.dumps({"prompt": "fine", "prompt_id": "fine", "responses": ["a", "b"], "ranks": [1, 0]})
    bad = json.dumps({"prompt": "q", "prompt_id": "bad", "responses": ["a", "b"], "ranks": ranks})
    r = env.client.post("/api/projects/p/import?format=kwise", headers=h, content=f"{good}\n{bad}\n".encode())
    assert r.status_code == 422 and ("'bad'" in r.text or ":2:" in r.text), r.text
    assert env.counts() == before


def test_non_finite_numbers_and_lone_surrogates_in_a_body_are_a_422_and_store_nothing(env):
    """Python's JSON reads NaN, Infinity, 1e400 (inf) and "\\ud800" (a lone surrogate); the
    422 answer echoed them back and could not be written: a 500. Each is a 422 now."""
    env.project(n_prompts=3, k=3)
    tok = env.annotator("nina")
    task = env.client.post("/api/projects/p/next", headers=env.headers(tok)).json()
    ids = [c["id"] for c in task["candidates"]]
    h = {**env.headers(tok), "content-type": "application/json"}
    admin = {**env.headers(env.admin_token), "content-type": "application/json"}
    before = env.counts()
    prompts = env.client.get("/api/projects/p", headers=env.headers(env.admin_token)).json()["progress"]["prompts"]
    ranking = f"/api/tasks/{task['id']}/ranking"
    order = f'{{"order": {ids}, '
    for url, headers, body in [
        (ranking, h, order + '"time_spent_ms": NaN}'),
        (ranking, h, order + '"time_spent_ms": Infinity}'),
        (ranking, h, order + '"time_spent_ms": 1e400}'),
        (ranking, h, order + '"rationale": "\\ud800"}'),
        (ranking, h, order + '"\\ud800": 1}'),
        (f"/api/tasks/{task['id']}/skip", h, '{"reason": "\\udfff"}'),
        ("/api/projects/p/prompts", admin, '{"prompts": [{"prompt": "\\ud800 hi"}]}'),
        ("/api/projects/p/prompts", admin, '{"prompts": [{"prompt": "hi", "candidates": [NaN, "b", "c"]}]}'),
    ]:
        r = env.client.post(url, headers=headers, content=body.encode())
        assert r.status_code == 422 and r.json()["detail"], (body, r.status_code, r.text)
        assert env.counts() == before
    assert env.client.get("/api/projects/p", headers=env.headers(env.admin_token)).json()["progress"]["prompts"] == prompts


def test_a_project_is_named_as_it_is_stored_and_dot_names_are_refused(env):
    """A name is stored without its outer spaces: an import to " x " finds the project "x" it made
    the first time, instead of answering that "x" exists. "." and ".." cannot be addressed (clients
    drop such a path segment: /api/projects/./members is sent as /api/projects/members)."""
    h = env.headers(env.admin_token)
    body = b'{"prompt": "hi", "candidates": ["a", "b"]}\n'
    first = env.client.post("/api/projects/%20x%20/import?format=prompts", headers=h, content=body)
    assert first.status_code == 201 and first.json()["prompts_added"] == 1, first.text
    again = env.client.post("/api/projects/%20x%20/import?format=prompts", headers=h, content=body)
    assert again.status_code == 201 and again.json()["prompts_added"] == 0, again.text
    assert [p["name"] for p in env.client.get("/api/projects", headers=h).json()] == ["x"]
    before = env.counts()
    for name in (".", ".."):
        r = env.client.post("/api/projects", headers=h, json={"name": name, "k": 2})
        assert r.status_code == 422 and "addresses drop such a path segment" in r.json()["detail"], r.text
        r = env.client.post("/api/projects/%2E/import?format=prompts" if name == "." else
                            "/api/projects/%2E%2E/import?format=prompts", headers=h, content=body)
        assert r.status_code == 422 and "addresses drop such a path segment" in r.json()["detail"], r.text
    assert env.counts() == before
