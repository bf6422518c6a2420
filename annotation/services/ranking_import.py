"""Importing existing rankings (kwise, TRL pairs, HH-RLHF, OpenAssistant) into a project.

A prompt is identified by its source id (the file's prompt id, or a content hash): the
first ranking of a prompt creates it with its responses as candidates, and every further
ranking of it, in the same file or a later one, is stored on that prompt, by its own
annotator. Imported annotators are accounts of role "source" in a namespace of their own
(`users.source_username`: a line's annotator N is stored as `src:N`), never real users;
exports name every account as it is, so a real user "ann1" and an imported "ann1"
(`src:ann1`) stay two annotators through an export and an import. A line is a duplicate,
and skipped, when the account it names (a real user of an export of this project, or an
imported annotator exported as `src:N`) or the source account it would be stored under
holds that ranking already (`ranking_history`); otherwise it is a new revision (rankings
are append-only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from align.formats import Candidate as CandidateIn
from align.formats import Ranking
from annotation.db import begin_read_only, refresh_planner_statistics
from annotation.limits import MAX_DB_INT
from annotation.models import Candidate, Project, Prompt, RankingRow, User
from annotation.services._tx import unit_of_work
from annotation.services.errors import Conflict, Invalid
from annotation.services.imports import (
    ImportReport,
    check_id,
    checked_candidate,
    checked_prompt,
    chunk_transaction,
    chunks,
    insert_candidates,
    insert_prompts,
    stopped_by_full_disk,
)
from annotation.services.ranking_history import History, RevisionConflict, ranking_key
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
    revision: int | None  # the file's revision number of this ranking (kwise exports carry it)


def _revision(meta: dict, where: str) -> int | None:
    value = meta.get("revision")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DB_INT):
        raise Invalid(f"{where}: revision must be a whole number from 1, got {value!r:.80}")
    return value


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
                           candidate_ids, _revision(meta, where))


@dataclass
class _PromptSlot:
    """A prompt of the import: in the project already (`prompt_id` set) or created by the
    first ranking of it in the file."""

    content: Any
    texts: list[str]
    prompt_id: int | None = None
    candidate_ids: list[int] = field(default_factory=list)  # by position
    histories: dict[str, History] = field(default_factory=dict)  # account's username -> its rankings of it
    # in the project without candidates (imported as a prompt, not generated yet): the first ranking's
    # responses become its candidates, stored with that ranking
    attach: bool = False

    def history(self, username: str) -> History:
        return self.histories.setdefault(username, History())


@dataclass
class _Planned:
    slot: _PromptSlot
    ranking: _CheckedRanking
    order: list[list[int]]  # candidate positions
    below: list[int] | None
    revision: int
    first: bool  # the account's first ranking of the prompt: a slot taken, and done


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
                   checked: list[_CheckedRanking]) -> tuple[dict[str, _PromptSlot], dict[str, int], dict[str, str]]:
    """The project's prompts that the file names, with their candidates and the rankings
    of the accounts the file's lines name or would be stored under, read in one snapshot
    (no writer lock). Also: those accounts (username -> user id) and the account each
    annotator name is stored under (`_accounts`)."""
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
    accounts, stored_as = _accounts(db, names)
    if by_id and accounts:
        _read_histories(db, by_id, {uid: name for name, uid in accounts.items()})
    db.commit()  # ends the snapshot (a rollback would expire the project read before it)
    return slots, accounts, stored_as


def _read_histories(db: Session, by_id: dict[int, _PromptSlot], username_of: dict[int, str]) -> None:
    """Every ranking and skip of these accounts on these prompts, into the prompts' histories."""
    ids = list(by_id)
    for i in range(0, len(ids), _READ_BATCH):
        for pid, uid, revision, order, below, all_bad, rationale in db.execute(
                select(RankingRow.prompt_id, RankingRow.user_id, RankingRow.revision, RankingRow.order,
                       RankingRow.below, RankingRow.all_bad, RankingRow.rationale).where(
                    RankingRow.prompt_id.in_(ids[i : i + _READ_BATCH]), RankingRow.user_id.in_(list(username_of)))):
            slot = by_id[pid]
            position = {cid: p for p, cid in enumerate(slot.candidate_ids)}
            key = None if order is None else ranking_key(  # a skip holds no ranking
                [[position.get(c, -1) for c in g] for g in order], [position.get(c, -1) for c in below or ()],
                all_bad, rationale)
            slot.history(username_of[uid]).revisions[revision] = key


def _accounts(db: Session, names: list[str]) -> tuple[dict[str, int], dict[str, str]]:
    """The accounts that exist (username -> user id) of the file's annotator names, as
    named (a real user, or an exported source account `src:N`) and as their lines would
    be stored (`src:N`); and for each name the username it is stored under: `src:N`, or
    a source account that an older version made under the bare name."""
    found: dict[str, tuple[int, str]] = {}
    for i in range(0, len(names), _READ_BATCH):
        batch = names[i : i + _READ_BATCH]
        # as stored, as named, and the user an exported source account src:N was made for
        wanted = [source_username(n) for n in batch] + batch + [n.removeprefix(SOURCE_PREFIX) for n in batch]
        for uid, username, role in db.execute(select(User.id, User.username, User.role).where(
                User.username.in_(wanted))).all():
            found[username] = (uid, role)
    stored_as = {}
    for name in names:
        legacy = (name in found and found[name][1] == "source" and not name.startswith(SOURCE_PREFIX)
                  and source_username(name) not in found)
        stored_as[name] = name if legacy else source_username(name)
    return {username: uid for username, (uid, _role) in found.items()}, stored_as


@dataclass
class _Line:
    """A checked ranking matched to its prompt."""

    ranking: _CheckedRanking
    slot: _PromptSlot
    order: list[list[int]]  # candidate positions
    below: list[int] | None
    key: Any


def _match(r: _CheckedRanking, slots: dict[str, _PromptSlot], project: Project) -> _Line:
    """The ranking matched to its prompt; one that a file line names differently from the
    project or an earlier line is refused."""
    slot = slots.get(r.source_id)
    if slot is None:
        slot = slots[r.source_id] = _PromptSlot(r.content, [c.text for c in r.responses])
    if slot.content != r.content:
        raise Invalid(f"{r.where}: prompt id {r.source_id!r} already names another prompt in project "
                      f"{project.name!r} or in this file")
    if slot.prompt_id is not None and not slot.texts:
        slot.texts, slot.attach = [c.text for c in r.responses], True
    positions = _positions([c.text for c in r.responses], slot.texts)
    if positions is None:
        raise Invalid(f"{r.where}: prompt {r.source_id!r} has other responses in project {project.name!r} "
                      f"or earlier in this file; a prompt id's rankings must rank the same responses")
    order, below = _order_of(r, positions)
    return _Line(r, slot, order, below, ranking_key(order, below, r.all_bad, r.rationale))


def _plan(checked: list[_CheckedRanking], slots: dict[str, _PromptSlot], stored_as: dict[str, str],
          project: Project, report: ImportReport) -> list[_Planned]:
    """What to store, decided before anything is: every ranking is matched to its prompt
    and the duplicates are counted (`ranking_history`)."""
    planned = []
    named_as: dict[str, str] = {}  # account -> the file's name for it
    for line in (_match(r, slots, project) for r in checked):
        r, username = line.ranking, stored_as[line.ranking.annotator]
        # held by the account it is stored under, the account the line names (a ranking this project
        # exported, read back), or the user an exported source account was made for (src:N of a user
        # N: a copy of N's rankings, back home)
        held_by = dict.fromkeys((username, r.annotator, r.annotator.removeprefix(SOURCE_PREFIX)))
        if any(line.slot.history(n).holds(line.key, r.revision) if r.revision is not None
               else line.slot.history(n).follows(line.key) for n in held_by):
            report.duplicates_skipped += 1
            continue
        if named_as.setdefault(username, r.annotator) != r.annotator:  # a user N and an imported src:N, elsewhere
            raise Invalid(f"{r.where}: annotators {named_as[username]!r} and {r.annotator!r} would both be stored "
                          f"as {username!r}, one annotator; rename one of them in the file")
        history = line.slot.history(username)
        first = not history.revisions
        try:
            revision = history.place(line.key, r.revision)
        except RevisionConflict:
            raise Invalid(f"{r.where}: annotator {r.annotator!r} has another ranking of this prompt as revision "
                          f"{r.revision} in project {project.name!r}; the file's revisions are another history "
                          "(import it into another project, or leave its revision numbers out)") from None
        if revision is None:
            report.duplicates_skipped += 1
        else:
            planned.append(_Planned(line.slot, r, line.order, line.below, revision, first))
    return planned


def _store(db: Session, project: Project, chunk: list[_Planned], users: dict[str, int], stored_as: dict[str, str],
           now: float, report: ImportReport) -> None:
    """A chunk's new prompts, their candidates and its rankings as a few multi-row INSERTs (SQLAlchemy
    Core, as `imports.insert_prompts` stores prompts): the ORM's unit of work, a flush per new prompt
    for its row id, held SQLite's writer lock ten times as long for the same rows."""
    _insert_new_prompts(db, project, chunk, now, report)
    rows, new_annotators = [], {}
    for p in chunk:
        r, slot = p.ranking, p.slot
        if slot.attach:
            _attach_responses(db, slot, r)
            report.candidates_added += len(r.responses)
        username = stored_as[r.annotator]
        if username not in users:
            try:
                users[username] = new_user(db, username, None, role="source").id
            except Conflict:  # the same new annotator, made by another import at this moment
                raise Conflict(f"another import added annotator {username!r} at the same moment; import the file "
                               "again to add the rest (nothing is added twice)") from None
        ids = slot.candidate_ids
        rows.append({"project_id": project.id, "prompt_id": slot.prompt_id, "user_id": users[username],
                     "assignment_id": None, "revision": p.revision, "order": [[ids[pos] for pos in g] for g in p.order],
                     "below": None if p.below is None else [ids[pos] for pos in p.below], "all_bad": r.all_bad,
                     "skipped": False, "rationale": r.rationale, "time_spent_ms": None, "created_at": now})
        if p.first:  # one more annotator has ranked the prompt: a slot taken, and done
            new_annotators[slot.prompt_id] = new_annotators.get(slot.prompt_id, 0) + 1
    db.execute(insert(RankingRow.__table__), rows)
    report.rankings_added += len(rows)
    prompts = Prompt.__table__
    if new_annotators:
        db.execute(update(prompts).where(prompts.c.id == bindparam("pid")).values(
            slots_taken=prompts.c.slots_taken + bindparam("n"), done_count=prompts.c.done_count + bindparam("n")),
            [{"pid": pid, "n": n} for pid, n in new_annotators.items()])


def _insert_new_prompts(db: Session, project: Project, chunk: list[_Planned], now: float, report: ImportReport) -> None:
    """The prompts that rankings of the chunk create (those whose prompt has no row yet), with the
    responses of the first ranking of each as its candidates; their row ids into their slots."""
    by_id: dict[str, _CheckedRanking] = {}
    for p in chunk:
        if p.slot.prompt_id is None:
            by_id.setdefault(p.ranking.source_id, p.ranking)  # the first: its responses' order is the candidates'
    new = list(by_id.values())
    if not new:
        return
    prompt_ids, candidate_ids = insert_prompts(db, project, [(r.source_id, r.content, r.responses) for r in new], now,
                                               [r.candidate_ids for r in new])
    candidates_of = dict(zip((r.source_id for r in new), candidate_ids))
    for p in chunk:
        if p.slot.prompt_id is None:
            p.slot.prompt_id, p.slot.candidate_ids = prompt_ids[p.ranking.source_id], candidates_of[p.ranking.source_id]
    report.prompts_added += len(new)
    report.candidates_added += sum(len(r.responses) for r in new)


def _attach_responses(db: Session, slot: _PromptSlot, r: _CheckedRanking) -> None:
    """The ranking's responses as the candidates of its prompt, in the project without any until
    now. A prompt that got candidates since the file was read (`align annotate generate`, another
    import) is a Conflict: the ranking may rank other texts than the prompt's."""
    claimed = db.execute(update(Prompt).where(Prompt.id == slot.prompt_id, Prompt.n_candidates == 0)
                         .values(n_candidates=len(r.responses)))
    if claimed.rowcount != 1:
        raise Conflict(f"{r.where}: its prompt got candidates from another import or generate run at the same "
                       "moment; import the file again to add the rest (nothing is added twice)")
    slot.candidate_ids = insert_candidates(db, [(slot.prompt_id, r.responses)], [r.candidate_ids])[0]
    slot.attach = False


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
    slots, users, stored_as = _read_existing(db, project, checked)
    planned = _plan(checked, slots, stored_as, project, report)
    with stopped_by_full_disk(db, report) as committed:
        for chunk in chunks(planned):
            with chunk_transaction(db):
                _store(db, project, chunk, users, stored_as, now, report)
            committed()
    if report.prompts_added:
        refresh_planner_statistics(db)
    return report

