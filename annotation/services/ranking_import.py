"""Importing existing rankings (kwise, TRL pairs, HH-RLHF, OpenAssistant) into a project.

A prompt is identified by its source id (the file's prompt id, or a content hash): the
first ranking of a prompt creates it with its responses as candidates, and every further
ranking of it, in the same file or a later one, is stored on that prompt, by its own
annotator. A ranking is a duplicate, and skipped, only when the same annotator's ranking
of the same prompt with the same ranks is already there; a different ranking by the same
annotator is a new revision (rankings are append-only). Imported annotators are accounts
of role "source" in a namespace of their own (`users.source_username`), never real users.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from align.formats import Candidate as CandidateIn
from align.formats import Ranking
from annotation.db import begin_read_only, refresh_planner_statistics
from annotation.models import Candidate, Project, Prompt, RankingRow, User
from annotation.services._tx import unit_of_work
from annotation.services.errors import Invalid
from annotation.services.imports import (
    ImportReport,
    check_id,
    checked_candidate,
    checked_prompt,
    chunk_transaction,
    chunks,
    new_prompt,
)
from annotation.services.rankings import clean_optional_text, ranks_to_order
from annotation.services.users import SOURCE_PREFIX, check_source_name, new_user, source_username

_READ_BATCH = 500  # ids per IN (...) list of the reads before an import


def _check_ranks(ranks: Any, n: int, where: str) -> list[int]:
    """An imported ranking's ranks: one integer per response, 0 (best) to n - 1; equal
    ranks are ties."""
    if not isinstance(ranks, list) or len(ranks) != n:
        raise Invalid(f"{where}: ranks must be a list of {n} integers, one per response")
    if not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < n for r in ranks):
        raise Invalid(f"{where}: ranks must be integers from 0 (best) to {n - 1}, got {ranks!r:.200}")
    return ranks


def _optional_list(meta: dict, key: str, n: int, where: str) -> list:
    """A per-response list in a ranking's meta (`candidate_ids`, `models`): absent or a list."""
    value = meta.get(key)
    if value is None:
        return [None] * n
    if not isinstance(value, list):
        raise Invalid(f"{where}: {key} must be a list with one entry per response, got {value!r:.80}")
    return (value + [None] * n)[:n]


def _optional_id(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Invalid(f"{what} must be a string, got {value!r:.80}")
    return check_id(str(value), what)


@dataclass
class _CheckedRanking:
    """An imported ranking, checked: what `import_rankings` stores for it."""

    source_id: str
    where: str  # how an error names it: "ranking 7 of FILE", and the file's prompt id if it gave one
    content: Any
    responses: list[CandidateIn]
    ranks: list[int]
    ranked: int | None  # a top-m ranking: the unranked have rank m
    annotator: str
    all_bad: bool
    rationale: str | None
    candidate_ids: list[str | None]


def _check_ranking(r: Ranking, i: int, project: Project, source: str, origin: str | None) -> _CheckedRanking:
    """Ranking `i` (from 0) of the file `origin` checked. Errors name it by its place in the
    file ("ranking 7 of FILE"; the readers keep no line numbers), with the file's prompt id
    when it gave one; never by the content hash a prompt without an id is stored under."""
    from align.formats import content_id

    where = f"ranking {i + 1}" + ("" if origin is None else f" of {origin}")
    given = check_id(r.prompt_id, f"prompt_id of {where}")
    if given is not None:
        where += f" (prompt_id {given!r})"
    content = checked_prompt(r.prompt, f"the prompt of {where}")
    sid = given or content_id(source, content, r.responses)
    if len(r.responses) < 2:
        raise Invalid(f"{where} has fewer than 2 responses")
    if len(r.responses) > project.k:  # fewer is real data (OpenAssistant trees vary); more cannot be shown
        raise Invalid(f"{where} has {len(r.responses)} responses; project {project.name!r} ranks "
                      f"at most K={project.k}")
    meta = r.meta or {}
    models = _optional_list(meta, "models", len(r.responses), where)
    responses = [checked_candidate(CandidateIn(t, _optional_id(m, f"model of {where}")), j, where)
                 for j, (t, m) in enumerate(zip(r.responses, models))]
    ranks = _check_ranks(r.ranks, len(r.responses), where)
    all_bad = meta.get("all_bad", False)
    if not isinstance(all_bad, bool):
        raise Invalid(f"{where}: all_bad must be true or false")
    rationale = clean_optional_text(meta.get("rationale"), f"rationale of {where}")
    candidate_ids = [_optional_id(cid, f"candidate id of {where}")
                     for cid in _optional_list(meta, "candidate_ids", len(r.responses), where)]
    annotator = source if r.annotator is None else r.annotator
    problem = check_source_name(annotator)
    if problem:  # checked here, stripped as stored: a name refused later would leave the chunks before it
        raise Invalid(f"{where}: annotator {problem}")
    return _CheckedRanking(sid, where, content, responses, ranks, r.ranked, annotator.strip(), all_bad, rationale,
                           candidate_ids)


Key = tuple[tuple[frozenset[int], ...], frozenset[int]]


def _key(order: list[list[int]], below: list[int] | None) -> Key:
    """What makes two rankings of a prompt the same: the tie groups in order, and the
    unordered rest of a top-m ranking (candidate positions or ids alike)."""
    return tuple(frozenset(g) for g in order), frozenset(below or ())


@dataclass
class _PromptSlot:
    """A prompt of the import: in the project already (`prompt_id` set) or created by the
    first ranking of it in the file."""

    content: Any
    texts: list[str]
    prompt_id: int | None = None
    candidate_ids: list[int] = field(default_factory=list)  # by position
    keys: dict[str, set[Key]] = field(default_factory=dict)  # annotator -> rankings stored or planned
    revisions: dict[str, int] = field(default_factory=dict)  # annotator -> highest revision


@dataclass
class _Planned:
    slot: _PromptSlot
    ranking: _CheckedRanking
    order: list[list[int]]  # candidate positions
    below: list[int] | None
    revision: int


def _positions(responses: list[str], texts: list[str]) -> list[int] | None:
    """The prompt's candidate position of each response (the same texts, any order), or None."""
    free: dict[str, list[int]] = {}
    for pos, text in enumerate(texts):
        free.setdefault(text, []).append(pos)
    if len(responses) != len(texts):
        return None
    out = []
    for text in responses:
        if not free.get(text):
            return None
        out.append(free[text].pop(0))
    return out


def _order_of(r: _CheckedRanking, positions: list[int]) -> tuple[list[list[int]], list[int] | None]:
    """The ranking as it is stored: tie groups best first, and a top-m ranking's rest below."""
    if r.ranked is None:
        return ranks_to_order(positions, r.ranks), None
    top = [(p, rank) for p, rank in zip(positions, r.ranks) if rank < r.ranked]
    return (ranks_to_order([p for p, _ in top], [rank for _, rank in top]),
            [p for p, rank in zip(positions, r.ranks) if rank == r.ranked])


def _read_existing(db: Session, project: Project,
                   checked: list[_CheckedRanking]) -> tuple[dict[str, _PromptSlot], dict[str, int]]:
    """The project's prompts that the file names, with their candidates and the rankings
    of the file's annotators on them, read in one snapshot (no writer lock)."""
    sids = list(dict.fromkeys(r.source_id for r in checked))
    names = list(dict.fromkeys(r.annotator for r in checked))
    begin_read_only(db)
    slots: dict[str, _PromptSlot] = {}
    by_id: dict[int, _PromptSlot] = {}
    for i in range(0, len(sids), _READ_BATCH):
        for pid, sid, content in db.execute(select(Prompt.id, Prompt.source_id, Prompt.content).where(
                Prompt.project_id == project.id, Prompt.source_id.in_(sids[i : i + _READ_BATCH]))):
            slots[sid] = by_id[pid] = _PromptSlot(content, [], pid)
    ids = list(by_id)
    for i in range(0, len(ids), _READ_BATCH):
        for pid, cid, text in db.execute(select(Candidate.prompt_id, Candidate.id, Candidate.text).where(
                Candidate.prompt_id.in_(ids[i : i + _READ_BATCH])).order_by(Candidate.prompt_id, Candidate.position)):
            by_id[pid].texts.append(text)
            by_id[pid].candidate_ids.append(cid)
    users = _source_users(db, names)
    name_of = {uid: name for name, uid in users.items()}
    if by_id and name_of:
        for i in range(0, len(ids), _READ_BATCH):
            for pid, uid, revision, order, below in db.execute(
                    select(RankingRow.prompt_id, RankingRow.user_id, RankingRow.revision, RankingRow.order,
                           RankingRow.below).where(RankingRow.prompt_id.in_(ids[i : i + _READ_BATCH]),
                                                   RankingRow.user_id.in_(list(name_of)))):
                slot, name = by_id[pid], name_of[uid]
                position = {cid: p for p, cid in enumerate(slot.candidate_ids)}
                slot.revisions[name] = max(slot.revisions.get(name, 0), revision)
                if order is not None:  # a skip holds no ranking
                    slot.keys.setdefault(name, set()).add(_key(
                        [[position.get(c, -1) for c in g] for g in order], [position.get(c, -1) for c in below or ()]))
    db.commit()  # ends the snapshot (a rollback would expire the project read before it)
    return slots, users


def _source_users(db: Session, names: list[str]) -> dict[str, int]:
    """The source accounts of these annotator names that exist (name -> user id), never a
    real user's; one made before source names had their prefix is found by its bare name."""
    found: dict[str, int] = {}
    for i in range(0, len(names), _READ_BATCH):
        batch = names[i : i + _READ_BATCH]
        wanted = {source_username(n): n for n in batch} | {n: n for n in batch}
        for uid, username in db.execute(select(User.id, User.username).where(
                User.role == "source", User.username.in_(list(wanted)))).all():
            if username.startswith(SOURCE_PREFIX) or wanted[username] not in found:
                found[wanted[username]] = uid
    return found


def _plan(checked: list[_CheckedRanking], slots: dict[str, _PromptSlot], project: Project,
          report: ImportReport) -> list[_Planned]:
    """What to store, decided before anything is: every ranking is matched to its prompt
    (one that a file line names differently from the project or an earlier line is
    refused) and the duplicates are counted."""
    planned = []
    for r in checked:
        slot = slots.get(r.source_id)
        if slot is None:
            slot = slots[r.source_id] = _PromptSlot(r.content, [c.text for c in r.responses])
        if slot.content != r.content:
            raise Invalid(f"{r.where}: prompt id {r.source_id!r} already names another prompt in project "
                          f"{project.name!r} or in this file")
        positions = _positions([c.text for c in r.responses], slot.texts)
        if positions is None:
            raise Invalid(f"{r.where}: prompt {r.source_id!r} has other responses in project {project.name!r} "
                          f"or earlier in this file; a prompt id's rankings must rank the same responses")
        order, below = _order_of(r, positions)
        key = _key(order, below)
        seen = slot.keys.setdefault(r.annotator, set())
        if key in seen:
            report.duplicates_skipped += 1
            continue
        seen.add(key)
        slot.revisions[r.annotator] = revision = slot.revisions.get(r.annotator, 0) + 1
        planned.append(_Planned(slot, r, order, below, revision))
    return planned


def _store(db: Session, project: Project, chunk: list[_Planned], users: dict[str, int], now: float,
           report: ImportReport) -> None:
    new_annotators: dict[int, int] = {}
    for p in chunk:
        r, slot = p.ranking, p.slot
        if slot.prompt_id is None:
            prompt = new_prompt(project, r.source_id, r.content, r.responses, now)
            for c, cid in zip(prompt.candidates, r.candidate_ids):
                c.source_id = cid
            db.add(prompt)
            db.flush()
            slot.prompt_id, slot.candidate_ids = prompt.id, [c.id for c in prompt.candidates]
            report.prompts_added += 1
            report.candidates_added += len(r.responses)
        if r.annotator not in users:
            users[r.annotator] = new_user(db, source_username(r.annotator), None, role="source").id
        ids = slot.candidate_ids
        db.add(RankingRow(
            project_id=project.id, prompt_id=slot.prompt_id, user_id=users[r.annotator], assignment_id=None,
            revision=p.revision, order=[[ids[pos] for pos in g] for g in p.order],
            below=None if p.below is None else [ids[pos] for pos in p.below], all_bad=r.all_bad, skipped=False,
            rationale=r.rationale, time_spent_ms=None, created_at=now,
        ))
        if p.revision == 1:  # one more annotator has ranked the prompt: a slot taken, and done
            new_annotators[slot.prompt_id] = new_annotators.get(slot.prompt_id, 0) + 1
        report.rankings_added += 1
    db.flush()
    for prompt_id, n in new_annotators.items():
        db.execute(update(Prompt).where(Prompt.id == prompt_id).values(
            slots_taken=Prompt.slots_taken + n, done_count=Prompt.done_count + n))


@unit_of_work
def import_rankings(db: Session, project: Project, rankings: list[Ranking], source: str,
                    origin: str | None = None) -> ImportReport:
    """Store existing preference data (see the module's docstring). Every ranking is
    checked, and matched to the prompts already in the project, before any is stored (one
    bad ranking and none is added); they are then stored IMPORT_CHUNK at a time. `origin`:
    the file they were read from, which errors name ("ranking 7 of FILE")."""
    report = ImportReport()
    now = time.time()
    checked = [_check_ranking(r, i, project, source, origin) for i, r in enumerate(rankings)]
    slots, users = _read_existing(db, project, checked)
    planned = _plan(checked, slots, project, report)
    for chunk in chunks(planned):
        with chunk_transaction(db):
            _store(db, project, chunk, users, now, report)
    if report.prompts_added:
        refresh_planner_statistics(db)
    return report

