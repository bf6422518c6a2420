"""The admin dashboard's figures on small projects (SQLite and PostgreSQL): agreement between
annotators who split 2 to 1, top-m rankings, rankings with every candidate tied, the progress
line's times, and what holds a project up (prompts that cannot reach their target, leases,
members who have not ranked)."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select, update

from annotation import services
from annotation.models import Prompt, RankingRow
from tests.annotation.conftest import PASSWORD


def _lease(env, name: str, now: float | None = None):
    """`name`'s next task and its candidate ids in source order (answers i.0, i.1, ...)."""
    with env.db() as db:
        task = services.next_task(db, services.get_user(db, name), services.get_project(db, "p"), now=now)
    by_text = {c.text: c.id for c in task.candidates}
    i = task.prompt.split()[1].rstrip("?")
    return task, [by_text[f"answer {i}.{j}"] for j in range(len(by_text))]


def _rank(env, name: str, order, now: float | None = None, below=None):
    """Lease `name`'s next task and rank it: `order(ids)` gives the order from the candidate
    ids in source order (and `below(ids)` a top-m ranking's unordered rest)."""
    task, ids = _lease(env, name, now)
    with env.db() as db:
        services.submit_ranking(db, services.get_user(db, name), task.assignment_id, order(ids),
                                below=below(ids) if below else None, now=now)
    return task


def _dashboard(env) -> dict:
    with env.db() as db:
        return services.dashboard(db, services.get_project(db, "p"))


def _admin_page(env) -> str:
    """The project's dashboard page as the admin's browser gets it."""
    from tests.annotation.test_api import _csrf

    c = env.client
    c.post("/login", data={"username": "admin", "password": PASSWORD, "csrf_token": _csrf(c.get("/").text)})
    r = c.get("/admin/projects/p")
    assert r.status_code == 200, r.text
    return r.text


def _by_name(d: dict) -> dict:
    return {a["username"]: a for a in d["annotators"]}


def test_two_of_three_agreeing_is_not_a_total_disagreement(env):
    """ann1 and ann2 rank a > b > c, ann3 c > b > a. Pair taus: 1, -1, -1, so the prompt's
    mean is -1/3 (not the -1 of ann3 against the others' mean rank, which for ann1 and ann2
    was a tie of all three and so no figure); ann1 and ann2 each score (1 - 1) / 2 = 0 on it
    and are counted, ann3 -1."""
    for name in ("ann1", "ann2", "ann3"):
        env.annotator(name)
    env.project(n_prompts=1, k=3, annotators=3)
    _rank(env, "ann1", lambda ids: [[ids[0]], [ids[1]], [ids[2]]])
    _rank(env, "ann2", lambda ids: [[ids[0]], [ids[1]], [ids[2]]])
    _rank(env, "ann3", lambda ids: [[ids[2]], [ids[1]], [ids[0]]])
    d = _dashboard(env)
    by = _by_name(d)
    assert (by["ann1"]["tau_vs_others"], by["ann1"]["shared_items"]) == (0.0, 1)
    assert (by["ann2"]["tau_vs_others"], by["ann2"]["shared_items"]) == (0.0, 1)
    assert (by["ann3"]["tau_vs_others"], by["ann3"]["shared_items"]) == (-1.0, 1)
    assert d["agreement"]["kendall_tau_pairwise"] == pytest.approx(-1 / 3)
    (flag,) = d["flagged"]
    assert flag["reasons"] == ["annotators disagree: mean pairwise tau-b -0.33 over 3 pairs; "
                               "farthest from the others: ann3 (-1.00)"]


def test_top_m_pairs_left_unordered_stay_out_of_tau(env):
    """Top-1 of 3: ann1 puts a first, ann2 b. The one pair both order is a-b, reversed: tau
    is -1. Against ann2's plain ranks [1, 0, 1] ann1's a-c became a tie and tau -1/sqrt(2)."""
    for name in ("ann1", "ann2"):
        env.annotator(name)
    env.project(n_prompts=1, k=3, annotators=2, rank_top=1)
    _rank(env, "ann1", lambda ids: [[ids[0]]], below=lambda ids: [ids[1], ids[2]])
    _rank(env, "ann2", lambda ids: [[ids[1]]], below=lambda ids: [ids[0], ids[2]])
    d = _dashboard(env)
    assert [a["tau_vs_others"] for a in d["annotators"]] == [-1.0, -1.0]
    assert d["flagged"][0]["reasons"] == ["annotators disagree: mean pairwise tau-b -1.00 over 1 pair"]


def test_a_ranking_with_every_candidate_tied_is_flagged_and_counted(env):
    for name in ("ann1", "ann2", "ann3"):
        env.annotator(name)
    env.project(n_prompts=1, k=3, annotators=3)
    _rank(env, "ann1", lambda ids: [ids])
    _rank(env, "ann2", lambda ids: [[ids[0]], [ids[1]], [ids[2]]])
    _rank(env, "ann3", lambda ids: [[ids[0]], [ids[1]], [ids[2]]])
    d = _dashboard(env)
    by = _by_name(d)
    assert by["ann1"]["all_tied"] == 1 and by["ann1"]["tau_vs_others"] is None  # no tau is defined for it
    assert (by["ann2"]["tau_vs_others"], by["ann2"]["all_tied"]) == (1.0, 0)
    assert d["flagged"][0]["reasons"] == ["no preference: every candidate tied (ann1)"]


def test_the_progress_line_counts_a_ranking_when_it_was_first_made(env):
    """A correction does not move its ranking on the progress line, and a skip later turned
    into a ranking counts from the ranking."""
    for name in ("ann1", "ann2"):
        env.annotator(name)
    env.project(n_prompts=2, k=2, annotators=2)
    task = _rank(env, "ann1", lambda ids: [[ids[0]], [ids[1]]], now=1000.0)
    theirs = _rank(env, "ann2", lambda ids: [[ids[0]], [ids[1]]], now=2000.0)
    with env.db() as db:
        services.revise_ranking(db, services.get_user(db, "ann1"), task.assignment_id,
                                [[c.id] for c in reversed(task.candidates)])
        db.execute(update(RankingRow).where(RankingRow.revision == 2).values(created_at=9000.0))
        db.commit()
    points = _dashboard(env)["timeline"]
    assert (points[0]["t"], points[-1]["t"]) == (1000.0, 2000.0)  # not 2000 .. 9000
    with env.db() as db:  # ann2 on their other prompt: skipped at 500 (revision 1), ranked at 3000 (revision 2)
        (pid,) = set(db.scalars(select(Prompt.id))) - {theirs.prompt_id}
        order = db.scalar(select(RankingRow.order).where(RankingRow.prompt_id == pid, RankingRow.revision == 1))
        common = dict(project_id=services.get_project(db, "p").id, prompt_id=pid, user_id=services.get_user(db, "ann2").id,
                      assignment_id=None, below=None, all_bad=False, rationale=None, time_spent_ms=None)
        db.add(RankingRow(revision=1, order=None, skipped=True, skip_reason="later", created_at=500.0, **common))
        db.add(RankingRow(revision=2, order=order, skipped=False, skip_reason=None, created_at=3000.0, **common))
        db.commit()
    points = _dashboard(env)["timeline"]
    assert (points[0], points[-1]) == ({"t": 1000.0, "n": 0}, {"t": 3000.0, "n": 3})


def test_what_holds_progress_up(env):
    """Three members, three annotators a prompt: one skip and that prompt can never get its
    three. A member who has not ranked is listed with zeros; a live lease shows who holds what."""
    for name in ("ann1", "ann2", "ann3"):
        env.annotator(name)
    env.project(n_prompts=2, k=2, annotators=3)
    skipped, _ = _lease(env, "ann1")
    with env.db() as db:
        services.skip_task(db, services.get_user(db, "ann1"), skipped.assignment_id, "unclear")
    held, _ = _lease(env, "ann2")
    d = _dashboard(env)
    assert (d["unreachable_prompts"], d["active_members"]) == (1, 3)
    (lease,) = d["leases"]
    with env.db() as db:
        assert (lease["username"], lease["prompt_id"]) == ("ann2", db.get(Prompt, held.prompt_id).source_id)
    assert lease["leased_until"] == pytest.approx(held.leased_until) and lease["leased_until"] > time.time()
    page = _admin_page(env)  # the page says it: the stuck prompt, who holds which lease
    assert "1</strong>\n  prompt(s) can no longer reach 3 ranking(s)" in page and "3 active member(s)" in page
    leases = page.split('id="leases"')[1].split("</details>")[0]
    assert "ann2" in leases and "min" in leases and "ann1" not in leases
    by = _by_name(d)
    assert sorted(by) == ["ann1", "ann2", "ann3"]
    assert {k: by["ann3"][k] for k in ("rankings", "skips", "all_bad", "median_time_s", "tau_vs_others", "shared_items")} \
        == {"rankings": 0, "skips": 0, "all_bad": 0, "median_time_s": None, "tau_vs_others": None, "shared_items": 0}
    assert by["ann1"]["skips"] == 1
    env.annotator("ann4")  # a fourth member can still give the skipped prompt its third ranking
    assert _dashboard(env)["unreachable_prompts"] == 0
    with env.db() as db:
        services.set_active(db, "ann3", False)
    d = _dashboard(env)  # ann3 deactivated: three who may rank, one of whom skipped it
    assert (d["unreachable_prompts"], d["active_members"]) == (1, 3)
