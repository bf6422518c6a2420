"""A submission reads its task, then stores the ranking in a write of its own; another request
may change the task in between. Here that request runs at exactly that moment (between the
read and the write, where `submit_ranking` checks the ranking it was sent), so each
interleaving a concurrent request can produce is played out deterministically. Whatever it
was, the answer says what is stored: never "already ranked" with no ranking stored."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from align.formats import Candidate, PromptRecord
from annotation import services
from annotation.db import open_db
from annotation.models import Assignment, RankingRow, User
from annotation.models import Prompt as PromptRow
from annotation.services import leasing, rankings

LEASE_S = 10


@pytest.fixture
def db_url(tmp_path) -> str:
    """SQLite only: on PostgreSQL a submission of a live lease is one statement, with no
    moment between a read and a write for another request to run in."""
    return f"sqlite:///{tmp_path / 'races.db'}"


@pytest.fixture
def sm(db_url):
    sessionmaker = open_db(db_url)
    yield sessionmaker
    sessionmaker.kw["bind"].dispose()


def _project(sm, per_prompt: int = 1):
    with sm() as db:
        p = services.create_project(db, "races", k=2, annotators_per_prompt=per_prompt, lease_seconds=LEASE_S)
        services.add_prompts(db, p, [PromptRecord("hello?", "q1", [Candidate("a"), Candidate("b")])])
        return p


def _between_read_and_write(monkeypatch, meanwhile) -> None:
    """Run `meanwhile` (another request, in a session of its own) once the submission has
    read its task and before it writes."""
    check = rankings._checked_ranking

    def read_then_meanwhile(*args, **kwargs):
        meanwhile()
        return check(*args, **kwargs)

    monkeypatch.setattr(rankings, "_checked_ranking", read_then_meanwhile)


def _state(sm, assignment_id: int) -> dict:
    with sm() as db:
        a = db.get(Assignment, assignment_id)
        prompt = db.get(PromptRow, a.prompt_id)
        return {"status": a.status, "rankings": db.scalar(select(func.count()).select_from(RankingRow)
                                                          .where(RankingRow.assignment_id == assignment_id)),
                "done_count": prompt.done_count, "slots_taken": prompt.slots_taken}


def _sweep(sm, at: float):
    """Another request's stale-lease sweep, run at time `at`."""
    def sweep():
        with sm() as other:
            leasing.release_expired_leases(other, services.get_project(other, "races"), now=at)
    return sweep


def test_a_lease_expired_by_another_request_meanwhile_still_counts_if_a_slot_is_free(sm, monkeypatch):
    """Read while live, expired by a sweep before the write: the late ranking is stored and
    counted, and holds the slot the sweep gave back (README: a late submission still counts
    if a slot is free)."""
    _project(sm)
    t0 = time.time()
    with sm() as db:
        user = services.create_user(db, "ann", None, "annotator")
        task = services.next_task(db, user, services.get_project(db, "races"), now=t0)
        _between_read_and_write(monkeypatch, _sweep(sm, t0 + LEASE_S + 0.05))
        row = services.submit_ranking(db, user, task.assignment_id, [[c.id] for c in task.candidates],
                                      now=t0 + LEASE_S - 0.01)
    assert row.assignment_id == task.assignment_id
    assert _state(sm, task.assignment_id) == {"status": "done", "rankings": 1, "done_count": 1, "slots_taken": 1}


def test_a_lease_expired_meanwhile_whose_slot_another_annotator_took_is_lease_expired(sm, monkeypatch):
    """Read while live; a sweep expires it and another annotator leases the freed (last) slot
    before the write: 409 lease_expired, nothing stored, the other annotator's slot kept."""
    _project(sm)
    t0 = time.time()
    with sm() as db:
        user, rival = (services.create_user(db, name, None, "annotator") for name in ("ann", "rival"))
        task = services.next_task(db, user, services.get_project(db, "races"), now=t0)
        late = t0 + LEASE_S + 0.05

        def sweep_and_lease():
            with sm() as other:  # the rival's next-task request sweeps, then leases the prompt
                taken = services.next_task(other, other.get(User, rival.id), services.get_project(other, "races"),
                                           now=late)
                assert taken.prompt_id == task.prompt_id

        _between_read_and_write(monkeypatch, sweep_and_lease)
        with pytest.raises(services.Conflict) as refused:
            services.submit_ranking(db, user, task.assignment_id, [[c.id] for c in task.candidates],
                                    now=t0 + LEASE_S - 0.01)
    assert refused.value.code == "lease_expired"
    assert _state(sm, task.assignment_id) == {"status": "expired", "rankings": 0, "done_count": 0, "slots_taken": 1}


def test_a_task_skipped_in_another_tab_meanwhile_is_already_skipped(sm, monkeypatch):
    _project(sm)
    with sm() as db:
        user = services.create_user(db, "ann", None, "annotator")
        task = services.next_task(db, user, services.get_project(db, "races"))

        def skip():
            with sm() as other:
                services.skip_task(other, other.get(User, user.id), task.assignment_id, "unsure")

        _between_read_and_write(monkeypatch, skip)
        with pytest.raises(services.Conflict) as refused:
            services.submit_ranking(db, user, task.assignment_id, [[c.id] for c in task.candidates])
    assert refused.value.code == "already_skipped"
    assert _state(sm, task.assignment_id) == {"status": "skipped", "rankings": 1, "done_count": 0, "slots_taken": 0}


def test_a_skip_of_a_task_ranked_in_another_tab_meanwhile_is_already_ranked(sm, monkeypatch):
    """The skip's side of the race: it read the lease live, the ranking was stored before its
    write. Its answer says what is stored, with the code a client acts on."""
    _project(sm)
    with sm() as db:
        user = services.create_user(db, "ann", None, "annotator")
        task = services.next_task(db, user, services.get_project(db, "races"))
        clean = rankings.clean_optional_text

        def rank_then_clean(*args, **kwargs):  # after the skip read its task, before it writes
            monkeypatch.setattr(rankings, "clean_optional_text", clean)
            with sm() as other:
                services.submit_ranking(other, other.get(User, user.id), task.assignment_id,
                                        [[c.id] for c in task.candidates])
            return clean(*args, **kwargs)

        monkeypatch.setattr(rankings, "clean_optional_text", rank_then_clean)
        with pytest.raises(services.Conflict) as refused:
            services.skip_task(db, user, task.assignment_id, "unsure")
    assert refused.value.code == "already_ranked"
    assert _state(sm, task.assignment_id) == {"status": "done", "rankings": 1, "done_count": 1, "slots_taken": 1}


@pytest.mark.parametrize("late", [False, True])  # the lease live at the read, or run out (not swept yet)
@pytest.mark.parametrize("meanwhile", ["removed", "deactivated"])
def test_an_annotator_who_lost_access_meanwhile_in_process_is_refused(sm, monkeypatch, meanwhile, late):
    # a run-out lease is expired by the removal or deactivation too, and the late completion
    # matched it: the ranking was stored for an annotator who could no longer rank
    _project(sm)
    t0 = time.time()
    with sm() as db:
        user = services.create_user(db, "ann", None, "annotator")
        project = services.get_project(db, "races")
        services.add_member(db, project, user)
        task = services.next_task(db, user, project, now=t0)

        def lose_access():
            with sm() as other:
                if meanwhile == "removed":
                    services.remove_member(other, services.get_project(other, "races"), other.get(User, user.id))
                else:
                    services.set_active(other, "ann", False)

        _between_read_and_write(monkeypatch, lose_access)
        with pytest.raises(services.Forbidden, match="deactivated" if meanwhile == "deactivated" else "no longer a member"):
            services.submit_ranking(db, user, task.assignment_id, [[c.id] for c in task.candidates],
                                    now=t0 + LEASE_S + 1 if late else t0 + 1, members_only=True)
    assert _state(sm, task.assignment_id) == {"status": "expired", "rankings": 0, "done_count": 0, "slots_taken": 0}


@pytest.mark.parametrize("meanwhile", ["removed", "deactivated"])
def test_a_request_whose_annotator_lost_access_meanwhile_gets_what_a_request_now_gets(env, monkeypatch, meanwhile):
    """Over the API (members only, an API token): the annotator removed from the project, or
    deactivated, between the read and the write. The answer is the one the same request
    sent afterwards gets (403 not a member; 401 the token no longer signs anyone in), and
    nothing is stored."""
    env.project(n_prompts=1, k=2, annotators=1)
    token = env.annotator("ann")
    task = env.client.post("/api/projects/p/next", headers=env.headers(token)).json()

    def lose_access():
        with env.db() as other:
            if meanwhile == "removed":
                services.remove_member(other, services.get_project(other, "p"), services.get_user(other, "ann"))
            else:
                services.set_active(other, "ann", False)

    _between_read_and_write(monkeypatch, lose_access)
    before = env.counts()
    body = {"order": [[c["id"]] for c in task["candidates"]]}
    raced = env.client.post(f"/api/tasks/{task['id']}/ranking", headers=env.headers(token), json=body)
    monkeypatch.undo()
    after = env.client.post(f"/api/tasks/{task['id']}/ranking", headers=env.headers(token), json=body)
    assert raced.status_code == (403 if meanwhile == "removed" else 401), raced.text
    assert (raced.status_code, raced.json()) == (after.status_code, after.json())
    assert env.counts() == {**before, "slots": 0}  # nothing stored; the lease's slot went back
