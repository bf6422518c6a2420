"""One live lease per annotator and project, whatever the tabs: two next-task requests of
one annotator that both read "no live lease" end with one lease, shown in both tabs."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import func, select

from align.formats import Candidate, PromptRecord
from annotation import services
from annotation.db import open_db
from annotation.models import Assignment, Prompt
from annotation.services import leasing


def _project(db, name: str, per_prompt: int, n_prompts: int = 6):
    p = services.create_project(db, name, k=3, annotators_per_prompt=per_prompt)
    services.add_prompts(db, p, [PromptRecord(f"q{i}", f"q{i}", [Candidate(f"r{i}{j}") for j in range(3)])
                                 for i in range(n_prompts)])
    return p


def _live_leases_and_slots(sm, user_id: int, project_id: int) -> tuple[int, int]:
    with sm() as db:
        live = db.scalar(select(func.count()).select_from(Assignment).where(
            Assignment.user_id == user_id, Assignment.project_id == project_id, Assignment.status == "leased"))
        slots = db.scalar(select(func.coalesce(func.sum(Prompt.slots_taken), 0)).where(Prompt.project_id == project_id))
    return live, slots


@pytest.mark.parametrize("per_prompt", [1, 2])
def test_a_tab_that_read_the_queue_before_another_tab_leased_shows_that_lease(db_url, monkeypatch, per_prompt):
    """Tab A reads the queue (no live lease), tab B leases, then A claims: A gets B's
    lease, not a second one. With one annotator per prompt A's first choice is full and it
    would lease the next prompt; with two it reaches the prompt B holds."""
    sm = open_db(db_url)
    with sm() as db:
        p = _project(db, f"tabs{per_prompt}", per_prompt)
        user = services.create_user(db, "tabs", None, "annotator")
    claim = leasing.claim_first_free
    other_tab: list = []
    first = [True]

    def claim_after_the_other_tab(db, *args, **kwargs):
        if first[0]:  # the first claim: tab A's, whose queue snapshot is already read
            first[0] = False
            with sm() as db_b:
                other_tab.append(services.next_task(db_b, user, p))
        return claim(db, *args, **kwargs)

    monkeypatch.setattr(leasing, "claim_first_free", claim_after_the_other_tab)
    with sm() as db_a:
        task_a = services.next_task(db_a, user, p)
    assert other_tab[0] is not None
    assert task_a.assignment_id == other_tab[0].assignment_id
    assert _live_leases_and_slots(sm, user.id, p.id) == (1, 1)
    sm.kw["bind"].dispose()


def test_a_second_live_lease_is_refused_by_the_database(db_url):
    """The claim itself refuses a live lease of another prompt while one is held, changing
    nothing: the guarantee does not rest on the reads before it."""
    sm = open_db(db_url)
    with sm() as db:
        p = _project(db, "refused", 1)
        user = services.create_user(db, "holder", None, "annotator")
        held = services.next_task(db, user, p)
        others = list(db.scalars(select(Prompt.id).where(Prompt.project_id == p.id, Prompt.id != held.prompt_id)))
        with pytest.raises(leasing.LeasedElsewhere):
            leasing.claim_first_free(db, user, p, others, time.time())
    assert _live_leases_and_slots(sm, user.id, p.id) == (1, 1)
    sm.kw["bind"].dispose()


def test_many_tabs_at_once_hold_one_lease(db_url):
    """Eight tabs of one annotator ask for a task at the same moment, by the path a request
    takes (one statement on PostgreSQL), over several rounds: every tab shows the same
    task and the database holds one live lease."""
    sm = open_db(db_url)
    with sm() as db:
        p = _project(db, "many", 1, n_prompts=20)
        user = services.create_user(db, "eight", None, "annotator")
        services.add_member(db, p, user)
    tabs = 8
    for _round in range(4):
        barrier = threading.Barrier(tabs)
        got: list = []
        errors: list = []

        def tab(barrier=barrier, got=got, errors=errors) -> None:
            try:
                with sm() as db:
                    barrier.wait()
                    got.append(services.next_task_in(db, user, "many"))
            except Exception as exc:  # a failed tab is reported by the assertion below
                errors.append(repr(exc))

        threads = [threading.Thread(target=tab) for _ in range(tabs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert len({t.assignment_id for t in got}) == 1 and len(got) == tabs
        assert _live_leases_and_slots(sm, user.id, p.id)[0] == 1
        with sm() as db:
            services.submit_ranking(db, user, got[0].assignment_id, [[c.id] for c in got[0].candidates])
    sm.kw["bind"].dispose()


def test_a_lease_that_ran_out_can_be_submitted_while_another_is_held(db_url):
    """A ranking of a lease that expired still counts when a slot is free, also when the
    annotator has leased another prompt since (it is never made a second live lease)."""
    sm = open_db(db_url)
    with sm() as db:
        p = _project(db, "late", 2)
        user = services.create_user(db, "late", None, "annotator")
        old = services.next_task(db, user, p)
        services.release_expired_leases(db, p, now=time.time() + 10 * p.lease_seconds)
        other = db.scalars(select(Prompt.id).where(Prompt.project_id == p.id, Prompt.id != old.prompt_id)).first()
        new = leasing.claim_first_free(db, user, p, [other], time.time())
        assert new.prompt_id == other
        row = services.submit_ranking(db, user, old.assignment_id, [[c.id] for c in old.candidates])
        assert row.assignment_id == old.assignment_id
        assert db.get(Assignment, old.assignment_id).status == "done"
    assert _live_leases_and_slots(sm, user.id, p.id) == (1, 2)  # the new lease, and the ranked prompt's slot
    sm.kw["bind"].dispose()


@pytest.mark.parametrize("released", [True, False], ids=["expired", "lapsed"])
def test_skipping_a_lease_that_ran_out_gives_its_slot_back_once(db_url, released):
    """A lease marked expired gave its slot back then; skipping it later frees nothing more, or the
    prompt would take one annotator too many. A lease that lapsed unmarked still holds its slot, and
    the skip gives it back."""
    sm = open_db(db_url)
    with sm() as db:
        p = _project(db, f"skip{released}", 1, n_prompts=1)
        user = services.create_user(db, "skipper", None, "annotator")
        other = services.create_user(db, "next", None, "annotator")
        task = services.next_task(db, user, p, now=time.time() - 10 * p.lease_seconds)  # ran out long ago
        if released:
            assert services.release_expired_leases(db, p) == 1
        services.skip_task(db, user, task.assignment_id, "not my language")
        slots = db.scalar(select(Prompt.slots_taken).where(Prompt.id == task.prompt_id))
        assert slots == 0
        taken = services.next_task(db, other, p)  # the one slot is free again: another annotator gets it
        assert taken is not None and taken.prompt_id == task.prompt_id
        assert db.scalar(select(Prompt.slots_taken).where(Prompt.id == task.prompt_id)) == 1
    sm.kw["bind"].dispose()
