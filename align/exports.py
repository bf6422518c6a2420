"""Rankings written out: align's kwise JSONL (every field kept, ties and top-m included), and
for other tools TRL preference pairs and HH-RLHF transcripts, one row per pair a ranking implies.
The readers of all three are align.formats."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from align.chat import as_messages
from align.formats import Ranking, format_hh_transcript, merge_repeated_responses
from align.run import write_jsonl_atomic


def write_kwise(rankings: list[Ranking], path: str | Path) -> None:
    write_jsonl_atomic(path, map(kwise_row, rankings))


def _pair_rows(rankings: list[Ranking]):
    """(ranking, chosen, rejected) for every pair a ranking implies, each response text once, at the
    best rank it was given (`merge_repeated_responses`, as the training stages read rankings): two
    copies of one text ranked apart would give a row whose chosen is its rejected, and two rows
    contradicting each other."""
    for r in map(merge_repeated_responses, rankings):
        for w, l in r.ordered_pairs():
            yield r, r.responses[w], r.responses[l]


def pairs_from_rankings(rankings: list[Ranking], conversational: bool | None = None) -> list[dict[str, Any]]:
    """TRL preference rows, one per (winner, loser) pair a ranking implies (ties give none).
    Chat prompts give the conversational form unless `conversational=False`."""
    rows = []
    for r, chosen, rejected in _pair_rows(rankings):
        conv = isinstance(r.prompt, list) if conversational is None else conversational
        if conv:
            prompt = as_messages(r.prompt)
            row = {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        else:
            prompt = r.prompt if isinstance(r.prompt, str) else format_hh_transcript(r.prompt) + "\n\nAssistant:"
            row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if r.prompt_id is not None:
            row["prompt_id"] = r.prompt_id
        if r.annotator is not None:
            row["annotator"] = r.annotator
        rows.append(row)
    return rows


_HH_TURN_MARK = re.compile(r"\n\n(Human|Assistant):")


def hh_problem(r: Ranking) -> str | None:
    """Why an HH transcript cannot hold this ranking's prompt as it is (None: it can). A
    transcript has Human and Assistant turns only, split at "\\n\\nHuman:" and
    "\\n\\nAssistant:", and a reader takes the prompt to end at the last Human turn."""
    messages = as_messages(r.prompt)
    if any(m["role"] not in ("user", "assistant") for m in messages):
        return "a system message (or a role other than user and assistant), which would read back as a Human turn"
    if any(_HH_TURN_MARK.search(m["content"]) for m in messages):
        return "'\\n\\nHuman:' or '\\n\\nAssistant:' in the prompt, which would read back as more turns"
    if messages[-1]["role"] != "user":
        return "a prompt ending with an assistant turn, which would read back as part of the responses"
    return None


def hh_left_out(rankings: list[Ranking]) -> str | None:
    """One line saying how many rankings `hh_from_rankings` leaves out, and why (None: none)."""
    reasons: dict[str, int] = {}
    for r in rankings:
        if (problem := hh_problem(r)) is not None:
            reasons[problem] = reasons.get(problem, 0) + 1
    return hh_left_out_line(reasons, len(rankings))


def hh_left_out_line(reasons: dict[str, int], total: int) -> str | None:
    """`hh_left_out`'s line from the count of each `hh_problem` among `total` rankings."""
    if not reasons:
        return None
    why = "; ".join(f"{n} with {problem}" for problem, n in reasons.items())
    return (f"{sum(reasons.values())} of {total} rankings left out of the hh export ({why}); "
            "export kwise or pairs to keep them")


def hh_from_rankings(rankings: list[Ranking]) -> list[dict[str, str]]:
    """HH-RLHF rows: whole transcripts, one per (winner, loser) pair. A ranking whose prompt
    a transcript cannot hold as it is (`hh_problem`) is left out, never changed; `hh_left_out`
    says how many and why."""
    rows = []
    for r, chosen, rejected in _pair_rows([r for r in rankings if hh_problem(r) is None]):
        prompt = as_messages(r.prompt)
        rows.append(
            {
                "chosen": format_hh_transcript(prompt + [{"role": "assistant", "content": chosen}]),
                "rejected": format_hh_transcript(prompt + [{"role": "assistant", "content": rejected}]),
            }
        )
    return rows


def kwise_row(r: Ranking) -> dict[str, Any]:
    """One kwise JSONL line: the fields, `meta` spread out, and `ranked` only for a top-m
    ranking (absent: a full one, as files written before it existed)."""
    row = asdict(r)
    if row["ranked"] is None:
        del row["ranked"]
    row.update(row.pop("meta"))
    return row
