"""A full disk: a clear answer (HTTP 507, the CLI one line), and an import says what it stored."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session


def _disk_full_after(monkeypatch, commits: int) -> None:
    """Session.commit works `commits` times, then fails as SQLite does on a full disk."""
    real, done = Session.commit, [0]

    def commit(self):
        done[0] += 1
        if done[0] > commits:
            raise OperationalError("COMMIT", {}, Exception("database or disk is full"))
        return real(self)

    monkeypatch.setattr(Session, "commit", commit)


def test_an_import_cut_short_by_a_full_disk_says_what_it_stored_and_that_again_adds_the_rest(env, monkeypatch):
    from align.formats import PromptRecord
    from annotation import services
    from annotation.services import imports

    monkeypatch.setattr(imports, "IMPORT_CHUNK", 2)
    monkeypatch.setattr(imports, "IMPORT_PAUSE_S", 0)
    records = [PromptRecord(f"q{i}", f"id{i}") for i in range(5)]
    with env.db() as db:
        project = services.create_project(db, "full", k=2)
        _disk_full_after(monkeypatch, 3)  # the snapshot's end, chunk 1, the next snapshot's end
        with pytest.raises(services.ServiceError) as refused:
            services.add_prompts(db, project, records)
        monkeypatch.undo()
        assert "disk is full" in str(refused.value) and "2 prompts" in str(refused.value)
        assert "again" in str(refused.value) and "\n" not in str(refused.value)
    with env.db() as db:
        project = services.get_project(db, "full")
        r = services.add_prompts(db, project, records)
        assert (r.prompts_added, r.duplicates_skipped) == (3, 2)


def test_next_task_on_a_full_disk_is_a_507_with_a_detail(env, monkeypatch):
    env.project(n_prompts=1, k=2)
    token = env.annotator("ann")
    from annotation import services

    def next_task(*_args, **_kwargs):
        raise OperationalError("UPDATE prompts", {}, Exception("database or disk is full"))

    monkeypatch.setattr(services, "next_task_in", next_task)
    r = env.client.post("/api/projects/p/next", headers=env.headers(token))
    monkeypatch.undo()
    assert r.status_code == 507 and "disk is full" in r.json()["detail"], r.text


def _cut_then_again(env, monkeypatch, orders: list[list[int]]):
    """One annotator's rankings of one prompt imported with a full disk after the first chunk of two
    (the snapshot's end, chunk 1; chunk 2's commit fails), then the same file again: (the refusal's
    message, the rankings stored after the cut, the second import's report, the latest ranking)."""
    from align.formats import Ranking
    from annotation import services
    from annotation.services import imports

    monkeypatch.setattr(imports, "IMPORT_CHUNK", 2)
    monkeypatch.setattr(imports, "IMPORT_PAUSE_S", 0)
    rankings = [Ranking(prompt="q?", responses=["a", "b", "c"], ranks=ranks, annotator="vendor1", prompt_id="q1")
                for ranks in orders]
    with env.db() as db:
        project = services.create_project(db, "cut", k=3)
        _disk_full_after(monkeypatch, 2)
        with pytest.raises(services.ServiceError) as refused:
            services.import_rankings(db, project, rankings, "file")
        monkeypatch.undo()
    stored = env.counts()["rankings"]
    with env.db() as db:
        again = services.import_rankings(db, services.get_project(db, "cut"), rankings, "file")
        (latest,) = services.export_rankings(db, services.get_project(db, "cut"))
    return str(refused.value), stored, again, latest


def test_a_rankings_import_cut_short_counts_only_what_was_stored_and_again_adds_the_rest(env, monkeypatch):
    message, stored, again, latest = _cut_then_again(env, monkeypatch, [[0, 1, 2], [2, 1, 0], [1, 0, 2]])
    assert stored == 2 and f"{stored} rankings before it stopped" in message
    assert (again.rankings_added, again.duplicates_skipped) == (1, 2) and env.counts()["rankings"] == 3
    assert latest.ranks == [1, 0, 2]


def test_a_file_cut_short_at_a_then_b_ends_with_its_last_a_when_imported_again(env, monkeypatch):
    # A, B, A cut after A, B: importing it again must add the last A, as an uncut import ends with it
    _, _, again, latest = _cut_then_again(env, monkeypatch, [[0, 1, 2], [2, 1, 0], [0, 1, 2]])
    assert (again.rankings_added, again.duplicates_skipped) == (1, 2) and latest.ranks == [0, 1, 2]
