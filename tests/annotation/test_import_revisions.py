"""Re-importing rankings: which lines are stored already (revision numbers, the latest
ranking), and whose rankings they are (real users and imported annotators stay apart)."""

from __future__ import annotations

import json

import pytest

from tests.annotation.test_imports import _export, _import, _rank_everything


def _body(lines) -> str:
    return "".join(json.dumps(line) + "\n" for line in lines)


def _added(r) -> int:
    assert r.status_code == 201, r.text
    return r.json()["rankings_added"]


def _rank(env, token, task, order_of, *, revise=False, all_bad=False, rationale=None):
    """Rank (or revise) a task: `order_of(ids)` gives the order of its candidate ids, sorted."""
    ids = sorted(c["id"] for c in task["candidates"])
    send = env.client.put if revise else env.client.post
    r = send(f"/api/tasks/{task['id']}/ranking", headers=env.headers(token),
             json={"order": order_of(ids), "all_bad": all_bad, "rationale": rationale})
    assert r.status_code == 201, r.text


def _latest(rows) -> list[tuple]:
    return sorted((r["prompt_id"], r["annotator"], tuple(r["ranks"]), r["all_bad"], r["rationale"]) for r in rows)


A = {"prompt": "q?", "prompt_id": "q1", "responses": ["a", "b", "c"], "ranks": [0, 1, 2], "annotator": "vendor1",
     "all_bad": False, "rationale": "first look"}
B = {**A, "ranks": [2, 1, 0], "rationale": "changed"}
A_AGAIN = {**A, "all_bad": True, "rationale": "back to the first order, all bad"}


def test_lines_without_revision_numbers_are_held_only_in_the_order_of_the_history():
    """Held A, B; a file of A, A, B: the first A is held, the second is not found after it, so it
    and every line after it are new revisions (A as 3, B as 4)."""
    from annotation.services.ranking_history import History, ranking_key

    a, b = ranking_key([[1], [2]], None, False, None), ranking_key([[2], [1]], None, False, None)
    history = History(revisions={1: a, 2: b})
    assert history.follows(a) is True
    assert history.follows(a) is False and history.place(a, None) == 3
    assert history.follows(b) is False and history.place(b, None) == 4


def test_a_delivery_of_a_then_b_then_a_ends_with_the_last_a_and_adds_nothing_when_sent_again(env):
    """The same order coming back later is a new revision (it was skipped as seen before,
    so B stayed the latest and the final all_bad and rationale were lost)."""
    assert _added(_import(env, "v", "kwise", _body([A, B, A_AGAIN]))) == 3
    (row,) = _export(env, "v")
    assert (row["ranks"], row["all_bad"], row["rationale"], row["revision"]) == ([0, 1, 2], True, A_AGAIN["rationale"], 3)
    r = _import(env, "v", "kwise", _body([A, B, A_AGAIN]))
    assert _added(r) == 0 and r.json()["duplicates_skipped"] == 3
    assert _export(env, "v") == [row]
    # a later delivery: its lines found in order in what the project held are held (A_AGAIN, the
    # latest); from the first that is not (B, after A_AGAIN), each is a new revision, in the file's order
    C = {**A, "ranks": [1, 0, 2], "rationale": "third thoughts"}
    assert _added(_import(env, "v", "kwise", _body([A_AGAIN, B, C]))) == 2
    assert [r["ranks"] for r in _export(env, "v", "kwise&all_revisions=true")] == [
        [0, 1, 2], [2, 1, 0], [0, 1, 2], [2, 1, 0], [1, 0, 2]]


def test_files_imported_again_grown_or_after_a_cut_add_only_what_is_new(env):
    """Re-importing adds nothing twice: every night's deliveries again, a file that grew (the
    rankings an import cut short stored), one line at a time."""
    C = {**A, "ranks": [1, 0, 2], "rationale": "third thoughts"}
    for _night in range(3):
        assert _added(_import(env, "v", "kwise", _body([A]))) in (0, 1)
        assert _added(_import(env, "v", "kwise", _body([B]))) in (0, 1)
    assert len(_export(env, "v", "kwise&all_revisions=true")) == 2
    assert _added(_import(env, "v", "kwise", _body([A, B, C]))) == 1
    assert [r["ranks"] for r in _export(env, "v", "kwise&all_revisions=true")] == [[0, 1, 2], [2, 1, 0], [1, 0, 2]]
    # a file that grew by a ranking held earlier (A again, after C): the new line is the latest
    assert _added(_import(env, "v", "kwise", _body([A, B, C, A]))) == 1
    assert _export(env, "v")[0]["ranks"] == [0, 1, 2]


def test_rankings_copied_to_another_project_and_back_add_nothing_and_keep_one_account(env):
    assert _added(_import(env, "a", "kwise", _body([A]))) == 1
    assert _added(_import(env, "b", "kwise", _body(_export(env, "a")))) == 1
    assert [r["annotator"] for r in _export(env, "b")] == ["src:vendor1"]  # not src:src:vendor1
    r = _import(env, "a", "kwise", _body(_export(env, "b")))
    assert _added(r) == 0 and r.json()["duplicates_skipped"] == 1
    assert [r["annotator"] for r in _export(env, "a")] == ["src:vendor1"]
    long_name = {**A, "prompt_id": "q2", "annotator": "v" * 60}  # 64 characters once exported as src:...
    assert _added(_import(env, "a", "kwise", _body([long_name]))) == 1
    assert _added(_import(env, "c", "kwise", _body(_export(env, "a")))) == 2


def _ranked_and_revised_twice(env):
    """Project p: alice ranks its one prompt A, revises it to B, then back to A with all_bad
    and a rationale."""
    env.project(n_prompts=1, k=3)
    alice = env.annotator("alice")
    task = env.client.post("/api/projects/p/next", headers=env.headers(alice)).json()
    forward, backward = (lambda ids: [[ids[0]], [ids[1]], [ids[2]]]), (lambda ids: [[ids[2]], [ids[1]], [ids[0]]])
    _rank(env, alice, task, forward)
    _rank(env, alice, task, backward, revise=True)
    _rank(env, alice, task, forward, revise=True, all_bad=True, rationale="in the end, all bad")
    every = _export(env, "p", "kwise&all_revisions=true")
    assert [r["revision"] for r in every] == [1, 2, 3]
    return every


def test_an_all_revisions_export_imported_elsewhere_keeps_the_latest_and_again_adds_nothing(env):
    every = _ranked_and_revised_twice(env)
    assert _added(_import(env, "copy", "kwise", _body(every))) == 3
    latest = _export(env, "p")
    assert [r[2:] for r in _latest(_export(env, "copy"))] == [r[2:] for r in _latest(latest)]
    assert _export(env, "copy")[0]["all_bad"] is True
    r = _import(env, "copy", "kwise", _body(every))
    assert _added(r) == 0 and r.json()["duplicates_skipped"] == 3
    # the latest-only export too, in either project
    assert _added(_import(env, "copy", "kwise", _body(_export(env, "copy")))) == 0
    assert _added(_import(env, "copy", "kwise", _body(latest))) == 0


def test_a_projects_own_exports_imported_into_it_add_nothing(env):
    """Rankings made in the app, exported and imported back, are the same rankings: they
    were stored again under source accounts of the annotators' names."""
    every = _ranked_and_revised_twice(env)
    before = env.counts()
    for rows in (every, _export(env, "p")):
        r = _import(env, "p", "kwise", _body(rows))
        assert _added(r) == 0 and r.json()["duplicates_skipped"] == len(rows)
    assert env.counts() == before
    assert [r["annotator"] for r in _export(env, "p")] == ["alice"]


def test_a_real_user_and_an_imported_annotator_of_the_same_name_are_never_merged(env):
    """An imported "ann1" and the user ann1 were both exported as "ann1", and importing the
    export merged them into one account: one of the two rankings became an old revision. Now
    the export tells them apart, and a project elsewhere refuses to merge them."""
    env.project(n_prompts=1, k=3)
    _rank_everything(env, [env.annotator("ann1")])
    (mine,) = _export(env, "p")
    theirs = {**mine, "ranks": [2, 1, 0], "annotator": "ann1", "rationale": "the vendor's"}
    del theirs["revision"]
    assert _added(_import(env, "p", "kwise", _body([theirs]))) == 1
    exported = _export(env, "p")
    assert sorted(r["annotator"] for r in exported) == ["ann1", "src:ann1"]
    assert _added(_import(env, "p", "kwise", _body(exported))) == 0
    # elsewhere both would be the one account src:ann1: refused, nothing stored, until one is renamed
    before = env.counts()
    r = _import(env, "copy", "kwise", _body(exported))
    assert r.status_code == 422 and "'ann1' and 'src:ann1' would both be stored as 'src:ann1'" in r.json()["detail"]
    assert env.counts() == before
    renamed = [{**row, "annotator": "ann1-of-p"} if row["annotator"] == "ann1" else row for row in exported]
    assert _added(_import(env, "copy", "kwise", _body(renamed))) == 2
    copied = _export(env, "copy")
    assert sorted(r["annotator"] for r in copied) == ["src:ann1", "src:ann1-of-p"]
    assert _added(_import(env, "copy", "kwise", _body(copied))) == 0


def test_a_revision_number_that_names_another_ranking_is_refused_and_stores_nothing(env):
    """A file's revision that the project holds as a different ranking of that annotator is
    another history: refused, rather than guessed at."""
    assert _added(_import(env, "v", "kwise", _body([{**A, "revision": 1}]))) == 1
    before = env.counts()
    r = _import(env, "v", "kwise", _body([{**B, "revision": 1}]))
    assert r.status_code == 422 and "revision 1" in r.json()["detail"], r.text
    assert env.counts() == before
    r = _import(env, "v", "kwise", _body([{**B, "revision": "2"}]))
    assert r.status_code == 422 and "revision" in r.json()["detail"], r.text
    assert env.counts() == before


def test_pairs_and_hh_exports_keep_a_repeated_response_once_at_its_best_rank(env):
    """Two copies of one text ranked first and last gave a row with chosen == rejected and
    two rows that contradict each other; the training stages keep the text once, at the
    best rank it was given, and so do these exports."""
    h = env.headers(env.admin_token)
    assert env.client.post("/api/projects", headers=h, json={"name": "rep", "k": 3}).status_code == 201
    r = env.client.post("/api/projects/rep/prompts", headers=h,
                        json={"prompts": [{"id": "q", "prompt": "say it", "candidates": ["same", "other", "same"]}]})
    assert r.status_code == 201, r.text
    token = env.annotator("ann")
    task = env.client.post("/api/projects/rep/next", headers=env.headers(token)).json()
    text = {c["id"]: c["text"] for c in task["candidates"]}
    same = [i for i in text if text[i] == "same"]
    (other,) = [i for i in text if text[i] == "other"]
    r = env.client.post(f"/api/tasks/{task['id']}/ranking", headers=env.headers(token),
                        json={"order": [[same[0]], [other], [same[1]]]})
    assert r.status_code == 201, r.text
    pairs = _export(env, "rep", "trl")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("same", "other")]
    hh = _export(env, "rep", "hh")
    assert [(p["chosen"][-4:], p["rejected"][-5:]) for p in hh] == [("same", "other")]


def test_the_hh_export_says_how_many_rankings_it_left_out_and_why(env):
    system = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
              "responses": ["Hello.", "Go away."], "ranks": [0, 1], "annotator": "v"}
    plain = {**system, "prompt": "Hi?"}
    assert _added(_import(env, "hh", "kwise", _body([system, plain]))) == 2
    r = env.client.get("/api/projects/hh/export?format=hh", headers=env.headers(env.admin_token))
    assert r.status_code == 200 and len(r.text.splitlines()) == 1
    assert r.headers["x-align-left-out"].startswith("1 of 2 rankings left out of the hh export (1 with a system")
    r = env.client.get("/api/projects/hh/export?format=trl", headers=env.headers(env.admin_token))
    assert r.status_code == 200 and len(r.text.splitlines()) == 2 and "x-align-left-out" not in r.headers


def test_a_user_of_the_longest_name_has_an_export_another_project_imports(env):
    # usernames are at most 60 characters, so src:<name> fits the 64 a username holds: a 64-character user's
    # export could be imported nowhere (not even back)
    from annotation import services

    env.project(n_prompts=1, k=3)
    with env.db() as db, pytest.raises(services.ServiceError, match="1-60 characters"):
        services.create_user(db, "u" * 61, "correct horse battery staple")
    _rank_everything(env, [env.annotator("u" * 60)])
    exported = _export(env, "p")
    assert [r["annotator"] for r in exported] == ["u" * 60]
    assert _added(_import(env, "p", "kwise", _body(exported))) == 0
    assert _added(_import(env, "copy", "kwise", _body(exported))) == 1
    assert [r["annotator"] for r in _export(env, "copy")] == ["src:" + "u" * 60]


def test_an_annotator_made_by_another_import_at_the_same_moment_is_a_conflict_that_says_import_again(env, monkeypatch):
    from annotation import services
    from annotation.services import ranking_import

    def raced(*_args, **_kwargs):  # the other import committed src:vendor1 between this one's read and its write
        raise services.Conflict("user 'src:vendor1' already exists")

    from align.formats import Ranking

    monkeypatch.setattr(ranking_import, "new_user", raced)
    line = Ranking(prompt="q?", responses=["a", "b", "c"], ranks=[0, 1, 2], annotator="vendor1", prompt_id="q1")
    with env.db() as db, pytest.raises(services.Conflict, match="another import added annotator 'src:vendor1' at the "
                                                                "same moment; import the file again"):
        services.import_rankings(db, services.create_project(db, "v", k=3), [line], "file")
