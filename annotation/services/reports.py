"""What comes out of a project: exports, progress and the admin dashboard."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session

from align.formats import Ranking
from annotation.models import Assignment, Project, ProjectMember, Prompt, RankingRow, User
from annotation.services._tx import read_only
from annotation.services.errors import Invalid
from annotation.services.projects import members
from annotation.services.rankings import order_to_ranks, ranked_prefix

EXPORT_FORMATS = ("kwise", "trl", "hh")  # trl: the pair format TRL reads, and the import and training stages
EXPORT_FORMAT_ALIASES = {"pairs": "trl"}  # its former name


_EXPORT_CHUNK = 500  # prompts read at a time: an export holds one chunk's rows, whatever the project's size


@read_only
def export_rankings(db: Session, project: Project, *, all_revisions: bool = False) -> list[Ranking]:
    """The project's rankings as `Ranking`s (latest revision per annotator and prompt unless
    `all_revisions`); responses in their original order, ranks 0 = best with ties."""
    return list(_iter_rankings(db, project, all_revisions))


def _iter_rankings(db: Session, project: Project, all_revisions: bool) -> Iterator[Ranking]:
    """`export_rankings`' rankings, in `_ranking_rows`' order."""
    for row, (content, source_id), cands in _ranking_rows(db, project, all_revisions=all_revisions):
        yield Ranking(
            prompt=content,
            responses=[c.text for c in cands],
            ranks=order_to_ranks([c.id for c in cands], row.order, row.below),
            annotator=row.username,  # an imported annotator as `src:<name>`: never taken for a user
            prompt_id=source_id,
            ranked=ranked_prefix(row.order, row.below),
            meta={
                "all_bad": row.all_bad,
                "candidate_ids": [c.source_id or str(c.id) for c in cands],
                "models": [c.model for c in cands],
                "rationale": row.rationale,
                "revision": row.revision,
                "time_spent_ms": row.time_spent_ms,
            },
        )


def _ranking_rows(db: Session, project: Project, *,
                  all_revisions: bool = False) -> Iterator[tuple[Any, tuple[Any, str], list[Any]]]:
    """Each annotator's latest ranking of each prompt (every revision with `all_revisions`; a skip as
    the latest leaves none), prompt by prompt, annotators by name, revisions
    in order: (the ranking's row with its annotator's `username`, the prompt's (content, source id),
    its candidates in order). Read _EXPORT_CHUNK prompts at a time as plain rows: neither the rows of
    the whole project nor ORM objects for them are held at once (a 100,000-ranking export held 1.5 GB)."""
    from annotation.models import Candidate

    prompt_ids = db.scalars(select(Prompt.id).where(Prompt.project_id == project.id).order_by(Prompt.id)).all()
    for start in range(0, len(prompt_ids), _EXPORT_CHUNK):
        chunk = prompt_ids[start : start + _EXPORT_CHUNK]
        prompts = {pid: (content, sid) for pid, content, sid in db.execute(
            select(Prompt.id, Prompt.content, Prompt.source_id).where(Prompt.id.in_(chunk)))}
        candidates: dict[int, list[Any]] = {pid: [] for pid in chunk}
        for c in db.execute(select(Candidate.prompt_id, Candidate.id, Candidate.text, Candidate.model, Candidate.source_id)
                            .where(Candidate.prompt_id.in_(chunk)).order_by(Candidate.prompt_id, Candidate.position)):
            candidates[c.prompt_id].append(c)
        q = (select(RankingRow.prompt_id, RankingRow.order, RankingRow.below, RankingRow.all_bad, RankingRow.rationale,
                    RankingRow.revision, RankingRow.time_spent_ms, RankingRow.created_at, RankingRow.skipped,
                    RankingRow.skip_reason, User.username)
             .join(User, User.id == RankingRow.user_id)
             .where(RankingRow.prompt_id.in_(chunk))
             .where(RankingRow.skipped.is_(False))
             .order_by(RankingRow.prompt_id, User.username, RankingRow.revision))
        if not all_revisions:
            latest = (select(RankingRow.prompt_id, RankingRow.user_id, func.max(RankingRow.revision).label("rev"))
                      .where(RankingRow.prompt_id.in_(chunk)).group_by(RankingRow.prompt_id, RankingRow.user_id).subquery())
            q = q.join(latest, and_(latest.c.prompt_id == RankingRow.prompt_id, latest.c.user_id == RankingRow.user_id,
                                    latest.c.rev == RankingRow.revision))
        for row in db.execute(q):
            yield row, prompts[row.prompt_id], candidates[row.prompt_id]


@read_only
def export_rows(db: Session, project: Project, fmt: str, *, all_revisions: bool = False,
                notes: list[str] | None = None) -> list[dict[str, Any]]:
    """The project's rankings as rows of `fmt` (`write_export`'s rows, in a list)."""
    return list(_export_rows(db, project, fmt, all_revisions, notes if notes is not None else []))


@read_only
def write_export(db: Session, project: Project, fmt: str, out: str | Path, *, all_revisions: bool = False) -> tuple[int, list[str]]:
    """Write the project's rankings as JSONL rows of `fmt` to `out` (atomically: the whole file or none):
    the latest revision of each annotator's ranking of each prompt, or with `all_revisions` (kwise
    only: an audit of every correction, each row with its `revision`) every ranking stored. The rows
    are written as they are read, from one snapshot; gzip-compressed when `out` is named .gz. Returns
    the rows written and a line for what the format had to leave out (hh: prompts a transcript
    cannot hold as they are)."""
    from align.run import write_jsonl_atomic

    notes: list[str] = []
    written = 0

    def counted(rows: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        nonlocal written
        for row in rows:
            written += 1
            yield row

    write_jsonl_atomic(out, counted(_export_rows(db, project, fmt, all_revisions, notes)))
    return written, notes


def export_format(fmt: str, all_revisions: bool) -> str:
    """The export format `fmt` names (`pairs` is trl's former name); Invalid where there is none, or
    where it cannot hold every revision."""
    fmt = EXPORT_FORMAT_ALIASES.get(fmt, fmt)
    if fmt not in EXPORT_FORMATS:
        raise Invalid(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if all_revisions and fmt != "kwise":
        raise Invalid("every revision is exported in the kwise format only (its rows carry the revision); "
                      f"{fmt} rows from revised rankings would count one annotator's judgement twice")
    return fmt


def _export_rows(db: Session, project: Project, fmt: str, all_revisions: bool, notes: list[str]) -> Iterator[dict[str, Any]]:
    from align import exports

    fmt = export_format(fmt, all_revisions)
    reasons: dict[str, int] = {}  # hh: the rankings left out, by why
    total = 0
    for r in _iter_rankings(db, project, all_revisions):
        total += 1
        if fmt == "kwise":
            yield exports.kwise_row(r)
        elif fmt == "trl":
            yield from exports.pairs_from_rankings([r])
        elif (problem := exports.hh_problem(r)) is not None:
            reasons[problem] = reasons.get(problem, 0) + 1
        else:
            yield from exports.hh_from_rankings([r])
    if line := exports.hh_left_out_line(reasons, total):
        notes.append(line)


@read_only
def user_progress(db: Session, user: User, project: Project) -> dict[str, int]:
    done = db.scalar(select(func.count()).where(Assignment.user_id == user.id, Assignment.project_id == project.id, Assignment.status == "done"))
    return {"done": int(done or 0)}


@read_only
def project_progress(db: Session, project: Project) -> dict[str, int]:
    """Prompts, rankings stored against the target, and `in_progress`: the tasks annotators hold
    now (a slot is taken from lease to ranking), whose prompts come back if a lease runs out."""
    n_prompts, done, taken, rankable = db.execute(
        select(func.count(Prompt.id), func.coalesce(func.sum(Prompt.done_count), 0),
               func.coalesce(func.sum(Prompt.slots_taken), 0), func.count(Prompt.id).filter(Prompt.n_candidates >= 2))
        .where(Prompt.project_id == project.id)
    ).one()
    target = int(rankable) * project.annotators_per_prompt
    return {"prompts": int(n_prompts), "rankable_prompts": int(rankable), "rankings": int(done), "target": target,
            "in_progress": int(taken) - int(done)}


def _latest_rankings(db: Session, project: Project) -> tuple[list[Any], dict[int, list[int]]]:
    """What the dashboard reads: each annotator's latest ranking or skip of each prompt, as plain rows
    with the prompt's source id and `first_ranked`, when the annotator first ranked the prompt (their
    earliest revision that is not a skip: a correction keeps it), and the candidate ids of the prompts
    ranked, in order. No text: the prompts' and candidates' texts are most of a project's bytes, and
    no figure needs them."""
    from annotation.models import Candidate

    latest = (select(RankingRow.prompt_id, RankingRow.user_id, func.max(RankingRow.revision).label("rev"),
                     func.min(case((RankingRow.skipped.is_(False), RankingRow.created_at))).label("first_ranked"))
              .where(RankingRow.project_id == project.id).group_by(RankingRow.prompt_id, RankingRow.user_id).subquery())
    rows = db.execute(
        select(RankingRow.prompt_id, RankingRow.order, RankingRow.below, RankingRow.all_bad, RankingRow.time_spent_ms,
               latest.c.first_ranked, RankingRow.skipped, RankingRow.skip_reason, User.username, Prompt.source_id)
        .join(User, User.id == RankingRow.user_id).join(Prompt, Prompt.id == RankingRow.prompt_id)
        .join(latest, and_(latest.c.prompt_id == RankingRow.prompt_id, latest.c.user_id == RankingRow.user_id,
                           latest.c.rev == RankingRow.revision))
        .where(RankingRow.project_id == project.id)
        .order_by(RankingRow.prompt_id, User.username)).all()
    candidate_ids: dict[int, list[int]] = {}
    ranked = select(RankingRow.prompt_id).where(RankingRow.project_id == project.id)
    for prompt_id, candidate_id in db.execute(select(Candidate.prompt_id, Candidate.id)
                                              .where(Candidate.prompt_id.in_(ranked))
                                              .order_by(Candidate.prompt_id, Candidate.position)):
        candidate_ids.setdefault(prompt_id, []).append(candidate_id)
    return rows, candidate_ids


def _able_members(project: Project) -> Any:
    """The ids of the project's members who may rank: active annotators or admins."""
    return (select(ProjectMember.user_id).join(User, User.id == ProjectMember.user_id)
            .where(ProjectMember.project_id == project.id, User.active.is_(True), User.role != "source"))


def unreachable_prompts(db: Session, project: Project) -> int:
    """Rankable prompts (2+ candidates) that can no longer get their `annotators_per_prompt`
    rankings from the current members: done_count + M - F < N, where M is the number of active
    members and F how many of them have ranked or skipped the prompt. The queue offers a prompt
    to no one who has (a lease of theirs that ran out may be taken up again), so M - F members
    are all who can still add a ranking, those holding a lease on it included. Rankings by
    former members and imported ones count in done_count. Admins who are not members, who may
    rank any project, are not counted: a prompt counted here needs a member added, a skip
    undone or a lower target. One GROUP BY over the project's finished assignments; prompts
    at their target, most of a finished project, are passed over on ix_prompts_queue."""
    need = project.annotators_per_prompt
    able = _able_members(project)
    finished = (select(Assignment.prompt_id, func.count().label("n"))
                .where(Assignment.project_id == project.id, Assignment.status.in_(("done", "skipped")),
                       Assignment.user_id.in_(able))
                .group_by(Assignment.prompt_id).subquery())
    n_able = select(func.count()).select_from(able.subquery()).scalar_subquery()
    return int(db.scalar(
        select(func.count()).select_from(Prompt).outerjoin(finished, finished.c.prompt_id == Prompt.id)
        .where(Prompt.project_id == project.id, Prompt.done_count < need, Prompt.n_candidates >= 2,
               Prompt.done_count + n_able - func.coalesce(finished.c.n, 0) < need)) or 0)


def live_leases(db: Session, project: Project, now: float) -> list[dict[str, Any]]:
    """The leases held at `now`, soonest to run out first: who holds which prompt until when."""
    return [{"username": username, "prompt_id": source_id, "leased_until": until}
            for username, source_id, until in db.execute(
                select(User.username, Prompt.source_id, Assignment.leased_until)
                .join(User, User.id == Assignment.user_id).join(Prompt, Prompt.id == Assignment.prompt_id)
                .where(Assignment.project_id == project.id, Assignment.status == "leased", Assignment.leased_until >= now)
                .order_by(Assignment.leased_until, User.username))]


def _disagreement(tau: float, by_pair: dict[tuple[str, str], float]) -> str:
    """A flag's words for a prompt whose annotators disagree: the mean tau-b over its pairs of
    annotators (`metrics.per_item_tau`), and who stands apart where one alone is farthest."""
    from annotation import metrics

    line = f"annotators disagree: mean pairwise tau-b {tau:+.2f} over {len(by_pair)} pair{'s' * (len(by_pair) > 1)}"
    scores = sorted(metrics.annotator_taus(by_pair).items(), key=lambda kv: kv[1])
    if len(scores) >= 3 and scores[0][1] < scores[1][1]:
        line += f"; farthest from the others: {scores[0][0]} ({scores[0][1]:+.2f})"
    return line


@read_only
def dashboard(db: Session, project: Project) -> dict[str, Any]:
    """Progress, per-annotator counts and median time, agreement metrics and flagged items, and
    what holds progress up. `timeline`: rankings over time, each at the time its annotator first
    ranked the prompt. `annotators`: everyone with a ranking or skip, and every member (zeros
    until they rank). Flagged: skips, all-bad rankings, rankings with every candidate tied
    (they order no pair, so no tau is defined for them), and disagreement: a mean tau-b over the
    prompt's pairs of annotators below 0 (`metrics.per_item_tau`). `unreachable_prompts`: see
    `unreachable_prompts`; `active_members`: the members who may rank; `leases`: `live_leases`."""
    from statistics import median

    from annotation import metrics

    firsts: list[float] = []
    per_user: dict[str, dict[str, Any]] = {}
    by_prompt: dict[int, dict[str, metrics.Ranks]] = {}
    flagged: dict[int, dict[str, Any]] = {}
    source_ids: dict[int, str] = {}

    def flag(pid: int, reason: str) -> None:
        flagged.setdefault(pid, {"prompt_id": source_ids[pid], "reasons": []})["reasons"].append(reason)

    def user(name: str) -> dict[str, Any]:
        return per_user.setdefault(name, {"rankings": 0, "skips": 0, "all_bad": 0, "all_tied": 0, "times": []})

    rows, candidate_ids = _latest_rankings(db, project)
    for row in rows:
        name, pid = row.username, row.prompt_id
        source_ids[pid] = row.source_id
        u = user(name)
        if row.skipped:
            u["skips"] += 1
            flag(pid, f"skipped by {name}: {row.skip_reason}")
            continue
        firsts.append(row.first_ranked)
        u["rankings"] += 1
        if row.time_spent_ms is not None:
            u["times"].append(row.time_spent_ms)
        if row.all_bad:
            u["all_bad"] += 1
            flag(pid, f"all bad ({name})")
        ranks = order_to_ranks(candidate_ids[pid], row.order, row.below)
        m = ranked_prefix(row.order, row.below)
        ranking = ranks if m is None else metrics.TopRanks(ranks, m)
        if metrics.states_no_preference(ranking):
            u["all_tied"] += 1
            flag(pid, f"no preference: every candidate tied ({name})")
        by_prompt.setdefault(pid, {})[name] = ranking
    firsts.sort()
    pair_taus = metrics.pair_taus(by_prompt)
    for pid, tau in metrics.per_item_tau(pair_taus).items():
        if tau < 0:
            flag(pid, _disagreement(tau, pair_taus[pid]))
    taus = metrics.per_annotator_tau(pair_taus)
    for member in members(db, project):
        user(member.username)
    annotators = []
    for name, u in sorted(per_user.items()):
        tau, shared = taus.get(name, (None, 0))
        annotators.append({
            "username": name, "rankings": u["rankings"], "skips": u["skips"], "all_bad": u["all_bad"],
            "all_tied": u["all_tied"], "median_time_s": (median(u["times"]) / 1000.0) if u["times"] else None,
            "tau_vs_others": tau,
            "shared_items": shared})
    return {
        "project": project.name,
        "progress": project_progress(db, project),
        "timeline": timeline(firsts),
        "annotators": annotators,
        "agreement": metrics.agreement_report(by_prompt, pair_taus),
        "flagged": sorted(flagged.values(), key=lambda f: (-len(f["reasons"]), f["prompt_id"])),
        "unreachable_prompts": unreachable_prompts(db, project),
        "active_members": int(db.scalar(select(func.count()).select_from(_able_members(project).subquery())) or 0),
        "leases": live_leases(db, project, time.time()),
    }


def timeline(times: list[float], points: int = 48) -> list[dict[str, float]]:
    """Cumulative rankings over time, at most `points` (t, n) steps: progress as a line."""
    if not times:
        return []
    t0, t1 = times[0], times[-1]
    if t1 <= t0:
        return [{"t": t0, "n": len(times)}]
    out, i = [], 0
    for step in range(1, points + 1):
        edge = t0 + (t1 - t0) * step / points
        while i < len(times) and times[i] <= edge:
            i += 1
        out.append({"t": edge, "n": i})
    return [{"t": t0, "n": 0}] + out


@read_only
def prompt_detail(db: Session, project: Project, source_id: str) -> dict[str, Any]:
    """One prompt with its candidates (source order) and every annotator's latest ranking."""
    from annotation.services.errors import NotFound

    prompt = db.scalar(select(Prompt).where(Prompt.project_id == project.id, Prompt.source_id == source_id))
    if prompt is None:
        raise NotFound(f"no prompt {source_id!r} in project {project.name!r}")
    ids = [c.id for c in prompt.candidates]
    latest: dict[int, tuple[RankingRow, User]] = {}
    for row, user in db.execute(select(RankingRow, User).join(User, User.id == RankingRow.user_id)
                                .where(RankingRow.prompt_id == prompt.id).order_by(RankingRow.revision)):
        latest[user.id] = (row, user)  # the highest revision wins
    rankings = []
    for row, user in sorted(latest.values(), key=lambda ru: ru[1].username):
        rankings.append({
            "username": user.username, "revision": row.revision, "skipped": row.skipped, "skip_reason": row.skip_reason,
            "all_bad": row.all_bad, "rationale": row.rationale,
            "ranks": None if row.skipped or not row.order else order_to_ranks(ids, row.order, row.below),
            "ranked": None if row.skipped or not row.order else ranked_prefix(row.order, row.below),
        })
    return {"prompt": prompt, "candidates": prompt.candidates, "rankings": rankings}
