"""The service layer as `align demo` uses it: simulated annotators rank through the same
functions the web routes call."""

from __future__ import annotations

import pytest

from align.formats import Candidate, PromptRecord, Ranking
from annotation import services


def run_team(sm, n_users=3, per_prompt=2, n_prompts=5):
    with sm() as db:
        p = services.create_project(db, "demo", k=3, annotators_per_prompt=per_prompt)
        services.add_prompts(db, p, [PromptRecord(f"q{i}", f"id{i}", [Candidate(f"r{i}{j}") for j in range(3)]) for i in range(n_prompts)])
        users = [services.create_user(db, f"sim{i}", None, "annotator") for i in range(n_users)]
        log = []
        active = list(users)
        while active:
            for u in list(active):
                task = services.next_task(db, u, p)
                if task is None:
                    active.remove(u)
                    continue
                # rank by text: r?0 best ... with r?1 and r?2 tied
                ranks = [0 if c.text.endswith("0") else 1 for c in task.candidates]
                order = services.ranks_to_order([c.id for c in task.candidates], ranks)
                services.submit_ranking(db, u, task.assignment_id, order, time_spent_ms=0)
                log.append((u.username, task.prompt))
        return log, services.export_rankings(db, p)


def test_simulated_team_fills_every_slot_reproducibly(db_url):
    from annotation.db import open_db

    sm = open_db(db_url)
    log, rankings = run_team(sm)
    assert len(rankings) == 5 * 2 and len(set(log)) == len(log)
    assert all(r.ranks == [0, 1, 1] for r in rankings)  # responses back in source order, ties kept
    sm.kw["bind"].dispose()
    if db_url.startswith("sqlite"):  # same seed, fresh database -> same assignment sequence
        from pathlib import Path

        other = open_db(db_url.replace(Path(db_url[10:]).name, "again.db"))
        assert run_team(other)[0] == log


def test_progress_counts_toward_a_target_only_the_prompts_that_can_be_ranked(db_url):
    """A prompt whose candidates are still to be generated is never leased: a target counting it
    could never be reached."""
    from annotation.db import open_db

    sm = open_db(db_url)
    log, _ = run_team(sm, n_prompts=3)
    with sm() as db:
        p = services.get_project(db, "demo")
        services.add_prompts(db, p, [PromptRecord("no answers yet", "later")])
        progress = services.project_progress(db, p)
    assert progress == {"prompts": 4, "rankable_prompts": 3, "rankings": 6, "target": 6, "in_progress": 0}
    assert len(log) == progress["target"]  # the team finished: every slot of every rankable prompt
    sm.kw["bind"].dispose()


def test_each_annotator_sees_their_own_reproducible_order_and_it_is_stored(db_url):
    """The order a task shows its candidates in is a shuffle keyed by annotator and prompt
    (sorted by md5 of "user:prompt:candidate": the same on SQLite and PostgreSQL, whose
    claims compute it in Python and in SQL), and the stored candidate order is the one
    shown."""
    import hashlib

    from sqlalchemy import select

    from annotation.db import open_db
    from annotation.models import Assignment
    from annotation.models import Candidate as CandidateRow

    sm = open_db(db_url)
    with sm() as db:
        p = services.create_project(db, "order", k=5, annotators_per_prompt=6)
        services.add_prompts(db, p, [PromptRecord("q", "q", [Candidate(f"r{j}") for j in range(5)])])
        users = [services.create_user(db, f"ord{i}", None, "annotator") for i in range(6)]
        for u in users:
            services.add_member(db, p, u)
        shown = {}
        for u in users:
            task = services.next_task_in(db, u, "order")  # a request's path: one statement on PostgreSQL
            by_position = list(db.scalars(select(CandidateRow.id).where(CandidateRow.prompt_id == task.prompt_id)
                                          .order_by(CandidateRow.position)))
            expected = sorted(by_position, key=lambda cid: hashlib.md5(f"{u.id}:{task.prompt_id}:{cid}".encode()).hexdigest())
            shown[u.username] = [c.id for c in task.candidates]
            assert shown[u.username] == expected
            assert [c.text for c in task.candidates] == [f"r{by_position.index(cid)}" for cid in expected]
            assert db.get(Assignment, task.assignment_id).candidate_order == expected
            assert services.next_task(db, u, p).candidates == task.candidates  # the live lease, shown again
    sm.kw["bind"].dispose()
    assert len({tuple(o) for o in shown.values()}) > 1

def test_a_claim_never_leases_twice_or_past_the_slots(db_url):
    """The claim (one statement on PostgreSQL, a transaction on SQLite) changes nothing
    when the annotator already holds the prompt (two tabs that read the queue before
    either leased) and passes over a prompt whose slots are all taken."""
    import time

    from sqlalchemy import func, select

    from annotation.db import open_db
    from annotation.models import Assignment
    from annotation.models import Prompt as PromptRow
    from annotation.services import leasing

    sm = open_db(db_url)
    with sm() as db:
        p = services.create_project(db, "claims", k=3, annotators_per_prompt=2)
        services.add_prompts(db, p, [PromptRecord(f"q{i}", f"q{i}", [Candidate(f"r{i}{j}") for j in range(3)]) for i in range(2)])
        a, b, c = (services.create_user(db, f"cl{i}", None, "annotator") for i in range(3))
        held = services.next_task(db, a, p)
        pid = held.prompt_id
        (free_pid,) = db.scalars(select(PromptRow.id).where(PromptRow.project_id == p.id, PromptRow.id != pid))
        db.commit()

        def state():  # read in a session of its own, as another request would
            with sm() as other:
                return (other.scalar(select(PromptRow.slots_taken).where(PromptRow.id == pid)),
                        other.scalar(select(func.count(Assignment.id)).where(Assignment.prompt_id == pid)),
                        other.get(Assignment, held.assignment_id).candidate_order)

        before = state()
        assert before[:2] == (1, 1)
        with pytest.raises(leasing.LeasedElsewhere):
            leasing.claim_first_free(db, a, p, [pid], time.time())
        assert state() == before

        second = leasing.claim_first_free(db, b, p, [pid], time.time())  # the prompt's last slot
        assert second.prompt_id == pid and state()[:2] == (2, 2)
        other = leasing.claim_first_free(db, c, p, [pid, free_pid], time.time())  # full: the next one
        assert other.prompt_id == free_pid and state()[:2] == (2, 2)
        assert leasing.claim_first_free(db, c, p, [pid], time.time()) is None and state()[:2] == (2, 2)
    sm.kw["bind"].dispose()

def test_next_task_passes_over_prompts_being_written_and_waits_when_all_are(db_url):
    """PostgreSQL's next-task statement claims the first prompt, in the annotator's spread
    order, that nobody is writing (SKIP LOCKED) rather than queue behind another
    annotator's claim or submission; when every prompt at the head of the queue is being
    written it takes the careful path, which waits for them, rather than report nothing
    left."""
    if not db_url.startswith("postgresql"):
        pytest.skip("row locks: the next-task statement is PostgreSQL's")
    import threading

    from sqlalchemy import select, text

    from annotation.db import open_db
    from annotation.models import Prompt as PromptRow
    from annotation.services import leasing

    sm = open_db(db_url)
    with sm() as db:
        p = services.create_project(db, "busy", k=2, annotators_per_prompt=1)
        services.add_prompts(db, p, [PromptRecord(f"q{i}", f"q{i}", [Candidate(f"r{i}{j}") for j in range(2)]) for i in range(3)])
        user = services.create_user(db, "spread", None, "annotator")
        services.add_member(db, p, user)
        ids = list(db.scalars(select(PromptRow.id).where(PromptRow.project_id == p.id)))
        db.commit()
    *written, free = leasing.spread_order(user.id, 0, ids)

    def next_task_while_locked(locked: list[int]) -> tuple[bool, object]:
        """(whether next_task_in returned before the locks on `locked` were let go, its task)"""
        got: list = []

        def ask() -> None:
            with sm() as db:
                got.append(services.next_task_in(db, user, "busy"))

        writer = sm.kw["bind"].connect()
        try:
            writer.execute(text("SELECT id FROM prompts WHERE id = ANY(:ids) FOR UPDATE"), {"ids": locked})
            asking = threading.Thread(target=ask)
            asking.start()
            asking.join(2.0)
            before_release = bool(got)
        finally:
            writer.rollback()
            writer.close()
        asking.join(30)
        return before_release, got[0]

    returned_at_once, task = next_task_while_locked(written)
    assert returned_at_once and task.prompt_id == free
    with sm() as db:
        services.submit_ranking(db, user, task.assignment_id, [[c.id] for c in task.candidates])
    returned_at_once, task = next_task_while_locked(written)  # the head is now the two being written
    assert not returned_at_once and task is not None and task.prompt_id in written
    sm.kw["bind"].dispose()


def test_ranks_order_conversions():
    assert services.ranks_to_order([10, 11, 12], [1, 0, 1]) == [[11], [10, 12]]
    assert services.order_to_ranks([10, 11, 12], [[11], [10, 12]]) == [1, 0, 1]
    assert services.validate_order([3, [1, 2]], [1, 2, 3]) == [[3], [1, 2]]
    with pytest.raises(services.Invalid, match="more than once"):
        services.validate_order([[1], [1, 2]], [1, 2])
    with pytest.raises(services.Invalid, match="not in this task"):
        services.validate_order([[1], [2], [9]], [1, 2])
    with pytest.raises(services.Invalid, match="leaves out"):
        services.validate_order([[1]], [1, 2])
    with pytest.raises(services.Invalid):
        services.validate_order([[True], [2]], [1, 2])


def test_schema_version_recorded_and_newer_schema_refused(tmp_path):
    from sqlalchemy import text

    from align.errors import UserError
    from annotation.db import SCHEMA_VERSION, make_engine, migrate, open_db

    url = f"sqlite:///{tmp_path / 'm.db'}"
    sm = open_db(url)
    with sm() as db:
        assert db.execute(text("select value from align_meta where key='schema_version'")).scalar() == str(SCHEMA_VERSION)
        db.execute(text("update align_meta set value='999' where key='schema_version'"))
        db.commit()
    sm.kw["bind"].dispose()
    with pytest.raises(UserError, match="newer than this align"):
        migrate(make_engine(url))


def test_ids_repeated_in_a_file_are_added_once_within_and_across_chunks(db_url, monkeypatch):
    """An import is stored a chunk at a time: a prompt id that comes again later in the file,
    in the same chunk or a later one, counts as a duplicate and is stored once."""
    from annotation.db import open_db
    from annotation.services import imports

    monkeypatch.setattr(imports, "IMPORT_CHUNK", 2)
    monkeypatch.setattr(imports, "IMPORT_PAUSE_S", 0)
    sm = open_db(db_url)
    with sm() as db:
        p = services.create_project(db, "dup", k=2)
        ids = ["a", "a", "b", "c", "b", "a", "d"]  # chunks: [a a] [b c] [b a] [d]
        report = services.add_prompts(db, p, [PromptRecord(f"q {i}", i, [Candidate("x"), Candidate("y")]) for i in ids])
        assert (report.prompts_added, report.duplicates_skipped) == (4, 3)
        ranked = [Ranking(f"r {i}", ["x", "y"], [0, 1], prompt_id=f"r{i}") for i in ids]
        report = services.import_rankings(db, p, ranked, source="file")
        assert (report.prompts_added, report.rankings_added, report.duplicates_skipped) == (4, 4, 3)
        assert len(services.export_rankings(db, p)) == 4
    sm.kw["bind"].dispose()


def test_an_export_read_in_chunks_is_of_one_moment(db_url, monkeypatch):
    # the export reads 1 prompt at a time here; a ranking committed by another session while it reads
    # (after its first prompt) is not in it, on SQLite and on PostgreSQL (REPEATABLE READ) alike
    from annotation.db import open_db
    from annotation.services import reports

    sm = open_db(db_url)
    run_team(sm, n_users=1, per_prompt=2, n_prompts=5)  # every prompt has one of its two rankings
    monkeypatch.setattr(reports, "_EXPORT_CHUNK", 1)
    rank = reports.order_to_ranks
    written = []

    def meanwhile(*args, **kwargs):
        if not written:  # another annotator's ranking of the last prompt arrives while the export reads the first
            with sm() as other:
                late = Ranking(prompt="q4", responses=["r40", "r41", "r42"], ranks=[2, 1, 0], annotator="late",
                               prompt_id="id4")
                written.append(services.import_rankings(other, services.get_project(other, "demo"), [late], "test"))
        return rank(*args, **kwargs)

    monkeypatch.setattr(reports, "order_to_ranks", meanwhile)
    with sm() as db:
        exported = services.export_rankings(db, services.get_project(db, "demo"))
    assert written[0].rankings_added == 1 and len(exported) == 5 and {r.annotator for r in exported} == {"sim0"}
    with sm() as db:  # stored all the same: the next export has it
        assert len(services.export_rankings(db, services.get_project(db, "demo"))) == 6
    sm.kw["bind"].dispose()
