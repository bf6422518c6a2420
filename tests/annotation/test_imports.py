"""Imports of existing rankings over the API: every ranking of a prompt is kept, imported
annotators are not real accounts, and a refused import leaves the project as it was."""

from __future__ import annotations

import json
from collections import Counter


def _rank_everything(env, tokens, project="p"):
    """Each annotator ranks every prompt of the project: the candidates as shown, the first
    best and the others tied below it."""
    for token in tokens:
        while (r := env.client.post(f"/api/projects/{project}/next", headers=env.headers(token))).status_code == 200:
            ids = [c["id"] for c in r.json()["candidates"]]
            r = env.client.post(f"/api/tasks/{r.json()['id']}/ranking", headers=env.headers(token),
                                json={"order": [[ids[0]], ids[1:]], "all_bad": False})
            assert r.status_code == 201, r.text


def _import(env, project, fmt, body: str):
    return env.client.post(f"/api/projects/{project}/import?format={fmt}", headers=env.headers(env.admin_token),
                           content=body.encode())


def _export(env, project, fmt="kwise") -> list[dict]:
    r = env.client.get(f"/api/projects/{project}/export?format={fmt}", headers=env.headers(env.admin_token))
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines()]


def _ranking_view(rows, imported=False):
    """The rankings of an export; `imported`: as another project that imported them holds
    them (the annotators as source accounts `src:<name>`)."""
    return Counter((r["prompt_id"], "src:" * imported + r["annotator"], tuple(r["responses"]), tuple(r["ranks"]),
                    tuple(r["models"])) for r in rows)


def test_every_annotators_ranking_of_a_prompt_is_imported_and_a_second_import_adds_nothing(env):
    """A kwise export has one line per annotator and prompt, all with the prompt's id; TRL
    pairs of one ranking share it too. All of them are stored (they were cut to the first
    line of each prompt), with the candidates' models, and importing a file again is a no-op.
    The users' rankings are stored under source accounts of their names, and exported so."""
    env.project(n_prompts=3, k=3, annotators=2)
    _rank_everything(env, [env.annotator("alice"), env.annotator("bobby")])
    kwise = _export(env, "p")
    assert len(kwise) == 6 and len({r["prompt_id"] for r in kwise}) == 3
    body = "".join(json.dumps(r) + "\n" for r in kwise)

    r = _import(env, "q", "kwise", body)
    assert r.status_code == 201 and r.json() == {"prompts_added": 3, "candidates_added": 9, "rankings_added": 6,
                                                 "duplicates_skipped": 0}
    assert _ranking_view(_export(env, "q")) == _ranking_view(kwise, imported=True)
    r = _import(env, "q", "kwise", body)
    assert r.status_code == 201 and r.json() == {"prompts_added": 0, "candidates_added": 0, "rankings_added": 0,
                                                 "duplicates_skipped": 6}
    assert len(_export(env, "q")) == 6

    pairs = _export(env, "p", "trl")
    assert len(pairs) == 12
    body = "".join(json.dumps(r) + "\n" for r in pairs)
    r = _import(env, "t", "trl", body)
    assert r.status_code == 201 and r.json()["rankings_added"] == 12 and r.json()["duplicates_skipped"] == 0
    view = Counter((json.dumps(r["prompt"]), r["chosen"], r["rejected"], "src:" + r["annotator"]) for r in pairs)
    assert Counter((json.dumps(r["prompt"]), r["chosen"], r["rejected"], r["annotator"])
                   for r in _export(env, "t", "trl")) == view
    r = _import(env, "t", "trl", body)
    assert r.status_code == 201 and r.json()["rankings_added"] == 0 and r.json()["duplicates_skipped"] == 12


def test_a_changed_ranking_of_an_imported_prompt_is_a_new_revision_and_other_responses_are_refused(env):
    line = {"prompt": "q?", "prompt_id": "q1", "responses": ["a", "b", "c"], "ranks": [0, 1, 2], "annotator": "ann"}
    assert _import(env, "i", "kwise", json.dumps(line) + "\n").json()["rankings_added"] == 1
    # the same ranking with the responses in another order: the same ranking
    same = {**line, "responses": ["c", "a", "b"], "ranks": [2, 0, 1]}
    assert _import(env, "i", "kwise", json.dumps(same) + "\n").json()["duplicates_skipped"] == 1
    changed = {**line, "ranks": [2, 1, 0]}
    r = _import(env, "i", "kwise", json.dumps(changed) + "\n")
    assert r.status_code == 201 and r.json()["rankings_added"] == 1 and r.json()["prompts_added"] == 0
    (row,) = _export(env, "i")
    assert row["ranks"] == [2, 1, 0] and row["revision"] == 2
    other = {**line, "responses": ["a", "b", "d"], "annotator": "else"}
    r = _import(env, "i", "kwise", json.dumps(other) + "\n")
    assert r.status_code == 422 and "'q1'" in r.json()["detail"] and "responses" in r.json()["detail"]
    assert len(_export(env, "i")) == 1


def test_a_refused_ranking_of_a_body_is_a_422_naming_its_place_and_stores_nothing(env):
    """A ranking of one response is named by its place in the body, not by the content hash
    it would be stored under, and the body changes nothing (the project it would create
    included)."""
    env.project(n_prompts=1, k=3)
    before = env.counts()
    good = {"prompt": "fine", "responses": ["a", "b"], "ranks": [0, 1]}
    lone = {"prompt": "q", "responses": ["a"], "ranks": [0]}
    for project in ("p", "new"):
        r = _import(env, project, "kwise", json.dumps(good) + "\n" + json.dumps(lone) + "\n")
        assert r.status_code == 422 and r.json()["detail"] == "ranking 2 of body has fewer than 2 responses", r.text
        assert env.counts() == before
    r = _import(env, "p", "kwise", json.dumps(good) + "\n" + json.dumps({**good, "responses": list("abcd"),
                                                                          "ranks": [0, 1, 2, 3], "prompt_id": "x4"}))
    assert r.status_code == 422 and r.json()["detail"].startswith("ranking 2 of body (prompt_id 'x4') has 4 responses")
    assert env.counts() == before
    assert env.client.get("/api/projects/new", headers=env.headers(env.admin_token)).status_code == 404


def test_imported_annotators_are_never_real_accounts_and_never_block_one(env):
    """A kwise line's "annotator" names a source account of its own: "admin" or an
    existing annotator's name does not attribute the ranking to that account, and a real
    user can still be created with a name an import used (also one stored, before the
    prefix, under the bare name)."""
    from sqlalchemy import func, select

    from annotation.models import RankingRow, User

    env.annotator("alice")
    with env.db() as db:  # a source account as an older version stored it: the bare name
        db.add(User(username="dave", password_hash=None, role="source", active=True, created_at=0.0))
        db.commit()
    lines = [{"prompt": f"q {name}", "responses": ["a", "b"], "ranks": [0, 1], "annotator": name}
             for name in ("admin", "alice", "carol", "dave")]
    body = "".join(json.dumps(line) + "\n" for line in lines)
    assert _import(env, "i", "kwise", body).json()["rankings_added"] == 4
    with env.db() as db:
        for name in ("admin", "alice"):
            real = db.scalar(select(User.id).where(User.username == name))
            assert db.scalar(select(func.count()).select_from(RankingRow).where(RankingRow.user_id == real)) == 0
    assert sorted(r["annotator"] for r in _export(env, "i")) == ["dave", "src:admin", "src:alice", "src:carol"]
    h = env.headers(env.admin_token)
    for name in ("carol", "dave"):
        r = env.client.post("/api/users", headers=h, json={"username": name, "password": "a long enough passphrase 4711"})
        assert r.status_code == 201, r.text
    assert "src:carol" not in {u["username"] for u in env.client.get("/api/users", headers=h).json()}
    r = _import(env, "i", "kwise", body)  # the same source accounts again: nothing new
    assert r.json()["rankings_added"] == 0 and r.json()["duplicates_skipped"] == 4
    assert sorted(r["annotator"] for r in _export(env, "i")) == ["src:admin", "src:alice", "src:carol", "src:dave"]


BAD_IMPORTS = [  # (format, line, words the answer must hold)
    ("prompts", {"prompt": "x", "candidates": 5}, "'candidates' must be a list"),
    ("prompts", {"prompt": "x", "candidates": "abcd"}, "'candidates' must be a list"),
    ("prompts", {"prompt": "x", "candidates": [{"text": "a", "sampling": 5}, "b"]}, "'sampling' must be an object"),
    ("prompts", {"prompt": "x", "candidates": [{"text": "a", "sampling": [[1, 2, 3]]}, "b"]}, "'sampling' must be"),
    ("prompts", {"prompt": "x", "candidates": [{"text": "a", "model": 7}, "b"]}, "'model' must be a string"),
    ("prompts", {"prompt": "x", "id": ["l"]}, "'id' must be a string"),
    ("kwise", {"prompt": "x", "responses": ["a", "b"], "ranks": [0, 1], "candidate_ids": 5}, "'candidate_ids' must be a list"),
    ("kwise", {"prompt": "x", "responses": ["a", "b"], "ranks": [0, 1], "models": "m"}, "'models' must be a list"),
    ("kwise", {"prompt": "x", "responses": ["a", "b"], "ranks": [0, 1], "annotator": 12345}, "'annotator' must be a string"),
    ("trl", {"prompt": "x", "chosen": "a", "rejected": "b", "prompt_id": ["l"]}, "'prompt_id' must be a string"),
]


def test_import_lines_of_the_wrong_types_are_a_422_naming_line_and_field_and_store_nothing(env):
    """Each was a 500 (or, for "abcd", four one-letter candidates): now the answer names
    body:line and the field, and neither the project nor anything in it is created."""
    env.project(n_prompts=1, k=2)
    before = env.counts()
    for fmt, line, words in BAD_IMPORTS:
        good = {"prompts": {"prompt": "fine", "candidates": ["a", "b"]},
                "kwise": {"prompt": "fine", "responses": ["a", "b"], "ranks": [0, 1]},
                "trl": {"prompt": "fine", "chosen": "a", "rejected": "b"}}[fmt]
        for project in ("p", "new"):
            r = _import(env, project, fmt, json.dumps(good) + "\n" + json.dumps(line) + "\n")
            assert r.status_code == 422 and "body:2:" in r.json()["detail"] and words in r.json()["detail"], (line, r.text)
            assert env.counts() == before
    h = env.headers(env.admin_token)
    assert env.client.get("/api/projects/new", headers=h).status_code == 404
    assert env.client.get("/api/projects/p", headers=h).json()["progress"]["prompts"] == 1


def _every_row(env) -> dict:
    from sqlalchemy import select

    from annotation.models import Base

    with env.db() as db:
        return {t.name: sorted(map(repr, db.execute(select(t)).all())) for t in Base.metadata.sorted_tables}


def _lines(n: int, fmt: str) -> list[str]:
    if fmt == "kwise":
        return [json.dumps({"prompt": f"q{i}", "responses": ["a", "b"], "ranks": [0, 1], "annotator": "ann"}) for i in range(n)]
    return [json.dumps({"prompt": f"q{i}", "id": f"id{i}", "candidates": ["a", "b"]}) for i in range(n)]


REFUSED_LAST_LINES = [  # a last line that only the store (or the database) would refuse
    ("kwise", '{"prompt": "last", "responses": ["a", "b"], "ranks": [0, 1], "annotator": "   "}'),
    ("kwise", '{"prompt": "q0", "prompt_id": "kwise-other", "responses": ["a", "b"], "ranks": [0, 1], "annotator": "\\ud800"}'),
    ("prompts", '{"prompt": "last", "id": "last", "candidates": [{"text": "a", "sampling": {"t": NaN}}, "b"]}'),
    ("prompts", '{"prompt": "last", "id": "last", "candidates": ["a \\ud800", "b"]}'),
    ("prompts", '{"prompt": "last", "id": "last", "candidates": [{"text": "a", "sampling": {"t": 1e400}}, "b"]}'),
]


def test_a_refused_import_leaves_the_database_exactly_as_it_was(env):
    """An import is all or nothing: 150 good lines (two chunks) and a bad last one are a
    422, and no row anywhere changes (100 prompts and rankings were kept)."""
    env.project(n_prompts=2, k=2)
    _rank_everything(env, [env.annotator("alice")])
    for fmt, last in REFUSED_LAST_LINES:
        before = _every_row(env)
        for project in ("p", "new"):
            r = _import(env, project, fmt, "\n".join(_lines(150, fmt) + [last]) + "\n")
            assert r.status_code == 422 and r.json()["detail"], (last, r.text)
            assert _every_row(env) == before, last


def test_a_prompts_import_naming_a_stored_prompt_id_for_another_prompt_is_refused_and_stores_nothing(env):
    """It was counted "already present" and the old prompt silently kept, where the rankings
    import refuses the same file; now both refuse it."""
    env.project(n_prompts=1, k=2)  # prompt id q0: "prompt 0?"
    before = _every_row(env)
    new = json.dumps({"prompt": "new one", "id": "fresh", "candidates": ["a", "b"]})
    for changed in ({"prompt": "another prompt", "id": "q0", "candidates": ["a", "b"]},
                    {"prompt": "another prompt", "id": "fresh", "candidates": ["a", "b"]}):
        r = _import(env, "p", "prompts", new + "\n" + json.dumps(changed) + "\n")
        assert r.status_code == 422 and "already names another prompt" in r.json()["detail"], r.text
        assert _every_row(env) == before
    r = _import(env, "p", "prompts", json.dumps({"prompt": "prompt 0?", "id": "q0"}) + "\n")
    assert r.status_code == 201 and r.json()["duplicates_skipped"] == 1


def test_an_imported_annotator_cannot_be_made_a_member_of_a_project(env):
    """`src:` accounts hold imported rankings and never sign in: adding one as a member was
    a 201, where activating it is a 404."""
    env.project(n_prompts=1, k=2)
    line = {"prompt": "q", "responses": ["a", "b"], "ranks": [0, 1], "annotator": "x1"}
    assert _import(env, "p", "kwise", json.dumps(line) + "\n").status_code == 201
    h = env.headers(env.admin_token)
    before = env.client.get("/api/projects/p/members", headers=h).json()
    r = env.client.post("/api/projects/p/members", headers=h, json={"username": "src:x1"})
    assert r.status_code == 404 and r.json()["detail"] == "no user 'src:x1'", r.text
    assert env.client.get("/api/projects/p/members", headers=h).json() == before


def test_a_client_that_leaves_mid_upload_gets_a_quiet_400_and_nothing_is_imported():
    # starlette raises ClientDisconnect from request.body(); unhandled, it logged "Exception in ASGI application"
    import asyncio
    from types import SimpleNamespace

    from starlette.requests import ClientDisconnect

    from annotation.routes_api import import_file

    async def body():
        raise ClientDisconnect()

    request = SimpleNamespace(headers={}, body=body, app=None)  # no app: nothing past the body may run
    response = asyncio.run(import_file("p", request, db=None, _admin=None, format="kwise"))
    assert response.status_code == 400
