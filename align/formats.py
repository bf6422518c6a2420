"""Preference data formats shared by annotation import/export and reward training.

The unit of preference data in align is a `Ranking`: one annotator's order of K responses
to one prompt, ties allowed. InstructGPT trains on the ranking itself (one batch element
per ranking); pairwise formats (TRL, HH-RLHF) are rankings with K = 2.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from align.chat import messages_problem
from align.errors import UserError
from align.files import jsonl_rows
from align.text_checks import LONE_SURROGATE, check_json_value, has_lone_surrogate, refuse_lone_surrogates


@dataclass
class Ranking:
    """One annotator's ranking of K responses to one prompt."""

    prompt: str | list[dict[str, str]]  # prompt text, or chat messages ending with a user turn
    responses: list[str]  # the K candidate responses
    ranks: list[int]  # rank of each response, 0 = best; equal ranks are ties
    annotator: str | None = None
    prompt_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # anything else the source carried
    # A top-m ranking: only the best `ranked` (m) responses were put in order, the others
    # form an unordered group below them and all have rank m, so they tie with each other
    # and lose to every ranked one ([0, 2, 1, 2] is a top-2 of 4). None: a full ranking.
    ranked: int | None = None
    # where a reader found it ("FILE:LINE"), for a message about it later; not data (no field: no export writes it)
    where: ClassVar[str | None] = None

    def found_at(self, where: str | None) -> Ranking:
        self.where = where
        return self

    def __post_init__(self) -> None:
        # the shape only (file readers apply `messages_problem`): a database's older rankings still export
        if not (isinstance(self.prompt, str) or (isinstance(self.prompt, list) and self.prompt and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in self.prompt))):
            raise ValueError("the prompt must be a string or a non-empty list of messages with string 'role' and "
                             f"'content', got {self.prompt!r:.80}")
        if not isinstance(self.responses, list) or not all(isinstance(r, str) for r in self.responses):
            raise ValueError(f"responses must be a list of strings, got {self.responses!r:.80}")
        if not isinstance(self.ranks, list) or not all(
                isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in self.ranks):
            raise ValueError(f"ranks must be a list of integers >= 0 (0 = best), got {self.ranks!r:.80}")
        if len(self.responses) != len(self.ranks):
            raise ValueError(f"{len(self.responses)} responses but {len(self.ranks)} ranks")
        if any(r >= len(self.ranks) for r in self.ranks):  # a place among the K responses, ties sharing one
            raise ValueError(f"ranks must be integers from 0 (best) to {len(self.ranks) - 1}, got {self.ranks!r:.80}")
        if self.ranked is not None:
            m, k = self.ranked, len(self.ranks)
            if not isinstance(m, int) or isinstance(m, bool) or not 1 <= m < k:
                raise ValueError(f"ranked must be an integer from 1 to {k - 1} (the ranked prefix of {k}), got {m!r}")
            if sum(r < m for r in self.ranks) != m or any(r > m for r in self.ranks):
                raise ValueError(f"a top-{m} ranking has {m} ranks below {m} and the others equal to {m}, "
                                 f"got {self.ranks}")

    def ordered_pairs(self) -> list[tuple[int, int]]:
        """(winner, loser) index pairs implied by the ranking; a tie implies no pair."""
        return ordered_pairs(self.ranks)


def ordered_pairs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """(winner, loser) index pairs implied by one ranking (rank 0 = best); a tie gives none.

    ranks [0, 2, 1] -> response 0 beats 1 and 2, response 2 beats 1: [(0, 1), (0, 2), (2, 1)].
    """
    k = len(ranks)
    return [(w, l) for w in range(k) for l in range(k) if ranks[w] < ranks[l]]


def merge_repeated_responses(ranking: Ranking) -> Ranking:
    """The ranking with each distinct response text once, at the best rank it was given.

    Sampled candidates repeat (short answers, low temperatures), and an annotator who must order
    every candidate may place two copies of one text apart. Kept apart, a copy above and a copy
    below another response state both orders, and the pair of copies is one no model can get
    right (the same text has the same reward): a tie scored as a half in every accuracy. The best
    placement is kept, as the annotator's judgement of that text; the others are dropped, and the
    ranks renumbered (each = how many kept responses rank strictly better, so a top-m ranking stays
    one, of the kept ranked responses). `meta` is carried as it was."""
    best: dict[str, int] = {}
    for i, (text, rank) in enumerate(zip(ranking.responses, ranking.ranks)):
        if text not in best or rank < ranking.ranks[best[text]]:
            best[text] = i
    if len(best) == len(ranking.responses):
        return ranking
    keep = sorted(best.values())
    old = [ranking.ranks[i] for i in keep]
    ranks = [sum(o < r for o in old) for r in old]
    ranked = None
    if ranking.ranked is not None:
        ranked = sum(r < ranking.ranked for r in old)
        ranked = ranked if ranked < len(keep) else None  # no unordered group left: a full ranking
    merged = Ranking(prompt=ranking.prompt, responses=[ranking.responses[i] for i in keep], ranks=ranks,
                     annotator=ranking.annotator, prompt_id=ranking.prompt_id, meta=ranking.meta, ranked=ranked)
    return merged.found_at(ranking.where)


def read_kwise(path: str | Path) -> list[Ranking]:
    out = []
    for lineno, row in jsonl_rows(path):
        where = f"{path}:{lineno}"
        line = dict(_json_object(row, where))  # as read: `row` gives the ranking's fields to `known`
        try:
            known = {k: row.pop(k) for k in ("prompt", "responses", "ranks", "annotator", "prompt_id", "ranked") if k in row}
            missing = [k for k in ("prompt", "responses", "ranks") if k not in known]
            if missing:  # another format's line (a TRL pair, an HH transcript): say which fields a kwise line needs
                raise ValueError(f"no {', '.join(repr(k) for k in missing)}; a kwise line holds prompt, responses "
                                 f"and ranks, this one {', '.join(repr(k) for k in [*known, *row]) or 'nothing'}")
            _check_kwise_fields(known, row)
            ranking = Ranking(**known, meta=row)
            if isinstance(ranking.prompt, list) and (problem := messages_problem(ranking.prompt)):
                raise ValueError(problem)
        except (AttributeError, TypeError, ValueError) as exc:
            raise UserError(f"{where}: not a kwise ranking line ({exc})") from None
        refuse_lone_surrogates(line, where)
        out.append(ranking.found_at(where))
    return out


# The kwise fields beside the ranking itself (`kwise_row` writes them), by the types they
# must have when present: per-response lists, a flag, texts.
_KWISE_FIELDS = {"annotator": (str,), "prompt_id": (str, int), "candidate_ids": (list,), "models": (list,),
                 "all_bad": (bool,), "rationale": (str,)}


def _check_kwise_fields(known: dict[str, Any], meta: dict[str, Any]) -> None:
    for key, types in _KWISE_FIELDS.items():
        value = known.get(key, meta.get(key))
        if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            names = " or ".join({"str": "a string", "int": "an integer", "list": "a list", "bool": "true or false"}[t.__name__]
                                for t in types)
            raise ValueError(f"'{key}' must be {names}, got {value!r:.80}")
    for key in ("candidate_ids", "models"):
        if any(not (v is None or isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)))
               for v in meta.get(key) or []):
            raise ValueError(f"every entry of '{key}' must be a string or null, got {meta[key]!r:.80}")
    revision = meta.get("revision")  # an --all-revisions export's: the annotation app's import reads it as this
    if revision is not None and (not isinstance(revision, int) or isinstance(revision, bool) or revision < 1):
        raise ValueError(f"revision must be a whole number from 1, got {revision!r:.80}")


# ---------------------------------------------------------------------------------------
# Readers and writers for the formats the annotation app imports and exports.
# Every reader returns plain `Ranking`s (or `PromptRecord`s) and raises `UserError` naming
# the file and line of anything it cannot read.
# ---------------------------------------------------------------------------------------

Messages = list[dict[str, str]]


@dataclass
class Candidate:
    """A candidate response to a prompt, with where it came from."""

    text: str
    model: str | None = None  # which model produced it
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, ... used


@dataclass
class PromptRecord:
    """A prompt to annotate, optionally with ready-made candidates."""

    prompt: str | Messages
    prompt_id: str | None = None
    candidates: list[Candidate] = field(default_factory=list)


def _check_messages(value: Any, where: str, *, prompt: bool = True) -> Messages:
    problem = messages_problem(value, prompt=prompt)
    if problem:
        raise UserError(f"{where}: {problem}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def check_prompt(value: Any, where: str) -> str | Messages:
    """A prompt as the stages read it: text, or a non-empty list of chat messages."""
    if not isinstance(value, (str, list)):
        raise UserError(f"{where}: the prompt must be a string or a list of messages, got {value!r:.80}")
    prompt = value if isinstance(value, str) else _check_messages(value, where)
    if has_lone_surrogate(prompt):
        raise UserError(f"{where}: the prompt {LONE_SURROGATE}")
    return prompt


_PROMPT_FIELDS = ("prompt", "id", "prompt_id", "candidates")
# A field that only another import format has: such a line read as prompts would lose its
# responses and their ranking, so it is refused with the format it looks like.
_FIELD_OF_FORMAT = {"responses": "kwise", "ranks": "kwise", "chosen": "trl or hh", "rejected": "trl or hh"}


def _check_prompt_fields(row: dict, where: str) -> None:
    """Refuse a line of another format, or a misspelt field (`candidate`), which would
    otherwise import as a prompt with no candidates. Other fields (a source's own
    metadata) are left unread."""
    for key in row:
        if key in _FIELD_OF_FORMAT:
            raise UserError(f"{where}: {key!r} is a field of {_FIELD_OF_FORMAT[key]} data, not of prompts; "
                            f"import the file as {_FIELD_OF_FORMAT[key]}")
        close = difflib.get_close_matches(key, _PROMPT_FIELDS, n=1, cutoff=0.8) if key not in _PROMPT_FIELDS else []
        if close:
            raise UserError(f"{where}: unknown field {key!r}; did you mean {close[0]!r}?")


def read_prompts(path: str | Path, *, prompts_only: bool = False) -> list[PromptRecord]:
    """Prompts JSONL: each line a JSON string, or an object {"prompt": str | messages,
    "id"?: str, "candidates"?: [str | {"text", "model"?, "sampling"?}]}. `prompts_only`: the
    prompts alone (a stage's prompts file), the other fields neither read nor checked."""
    out = []
    for lineno, row in jsonl_rows(path):
        where = f"{path}:{lineno}"
        if isinstance(row, str):
            row = {"prompt": row}
        if isinstance(row, dict) and not prompts_only:
            _check_prompt_fields(row, where)
        if not isinstance(row, dict) or "prompt" not in row:
            raise UserError(f"{where}: expected a JSON string or an object with a 'prompt' field")
        prompt = check_prompt(row["prompt"], where)
        if isinstance(prompt, str) and not prompt.strip():
            raise UserError(f"{where}: empty prompt")
        if prompts_only:
            out.append(PromptRecord(prompt))
            continue
        refuse_lone_surrogates(row, where)
        candidates = row.get("candidates")
        if candidates is not None and not isinstance(candidates, list):
            raise UserError(f"{where}: 'candidates' must be a list of strings or {{text, model, sampling}} objects, "
                            f"got {candidates!r:.80}")
        cands = [_prompt_candidate(c, f"{where}: candidate {i + 1}") for i, c in enumerate(candidates or [])]
        pid = _optional_str(row, "id", where) if "id" in row else _optional_str(row, "prompt_id", where)
        out.append(PromptRecord(prompt, pid, cands))
    return out


def _prompt_candidate(c: Any, where: str) -> Candidate:
    if isinstance(c, str):
        return Candidate(c)
    if not (isinstance(c, dict) and isinstance(c.get("text"), str)):
        raise UserError(f"{where}: a candidate must be a string or an object with a string 'text', got {c!r:.80}")
    model, sampling = c.get("model"), c.get("sampling")
    if model is not None and not isinstance(model, str):
        raise UserError(f"{where}: 'model' must be a string, got {model!r:.80}")
    if sampling is not None and not isinstance(sampling, dict):
        raise UserError(f"{where}: 'sampling' must be an object (temperature, top_p, ...), got {sampling!r:.80}")
    return Candidate(c["text"], model, check_json_value(dict(sampling or {}), f"{where}: 'sampling'"))


def _json_object(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        kind = ("null" if row is None else "true" if row is True else "false" if row is False
                else {str: "a string", list: "a list"}.get(type(row), "a number"))
        raise UserError(f"{where}: expected a JSON object, got {kind}")
    return row


def content_id(prefix: str, *parts: Any) -> str:
    """A stable id from content, so re-importing a file finds the rows it already holds."""
    import hashlib

    blob = json.dumps(parts, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return f"{prefix}-{hashlib.sha1(blob).hexdigest()[:16]}"


def _pair_ranking(prompt: str | Messages, chosen: str, rejected: str, prompt_id: str | None, source: str,
                  annotator: str | None = None) -> Ranking:
    prompt_id = prompt_id or content_id(source, prompt, chosen, rejected)
    return Ranking(prompt=prompt, responses=[chosen, rejected], ranks=[0, 1], annotator=annotator or source,
                   prompt_id=prompt_id)


def _pair_prompt_ids(rows: list[tuple[str | None, Any, str, str]]) -> list[str | None]:
    """The prompt id of each TRL row's pair. The pairs of one K-wise ranking, and the same
    pair judged by several annotators, share their prompt id (`pairs_from_rankings`), but
    each pair of responses is a prompt of its own in a K = 2 project: a prompt id given to
    one pair only stays as it is; one shared by several pairs becomes `id#<hash of the
    prompt and the unordered pair>` for each, so annotators who judged the same pair either
    way rank one prompt."""
    pairs: dict[str, set] = {}
    for pid, prompt, chosen, rejected in rows:
        if pid is not None:
            pairs.setdefault(pid, set()).add(content_id("pair", prompt, sorted([chosen, rejected])))
    out = []
    for pid, prompt, chosen, rejected in rows:
        if pid is not None and len(pairs[pid]) > 1:
            pid = f"{pid[:230]}#{content_id('pair', prompt, sorted([chosen, rejected]))[5:]}"
        out.append(pid)
    return out


def _optional_str(row: dict, key: str, where: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(f"{where}: '{key}' must be a string, got {value!r:.80}")
    return str(value)


def read_trl_pairs(path: str | Path) -> list[Ranking]:
    """TRL preference data: {"prompt", "chosen", "rejected"} as plain text, or conversational
    (prompt = messages, chosen/rejected = [assistant message]); the implicit-prompt form
    (chosen/rejected are whole conversations sharing a prefix) is accepted too. A row's
    "annotator" (as `pairs_from_rankings` writes it) is kept."""
    rows, annotators = [], []
    for lineno, row in jsonl_rows(path):
        where = f"{path}:{lineno}"
        if "chosen" not in _json_object(row, where) or "rejected" not in row:
            raise UserError(f"{where}: a TRL preference row needs 'chosen' and 'rejected'")
        refuse_lone_surrogates(row, where)
        chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
        if isinstance(chosen, str) and isinstance(rejected, str):
            if not isinstance(prompt, str):
                raise UserError(f"{where}: plain-text chosen/rejected need a string 'prompt'")
        else:
            chosen = _check_messages(chosen, where + " chosen", prompt=False)
            rejected = _check_messages(rejected, where + " rejected", prompt=False)
            if prompt is None:  # implicit prompt: the shared prefix of both conversations
                n = 0
                while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                    n += 1
                prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
            prompt = _check_messages(prompt, where + " prompt")
            if len(chosen) != 1 or len(rejected) != 1 or chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
                raise UserError(f"{where}: chosen/rejected must each be one assistant message after the prompt")
            chosen, rejected = chosen[0]["content"], rejected[0]["content"]
        pid = _optional_str(row, "id", where) if "id" in row else _optional_str(row, "prompt_id", where)
        rows.append((pid, prompt, chosen, rejected))
        annotators.append((_optional_str(row, "annotator", where), where))
    return [_pair_ranking(prompt, chosen, rejected, pid, "trl", annotator).found_at(where)
            for (_, prompt, chosen, rejected), pid, (annotator, where) in zip(rows, _pair_prompt_ids(rows), annotators)]


_HH_TURN = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text: str) -> Messages:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> chat messages."""
    parts = re.split(r"\n\n(Human|Assistant): ?", "\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    if parts[0].strip():
        raise ValueError("transcript does not start with 'Human:'")
    msgs = [{"role": _HH_TURN[parts[i]], "content": parts[i + 1]} for i in range(1, len(parts) - 1, 2)]
    if not msgs:
        raise ValueError("no 'Human:'/'Assistant:' turns")
    return msgs


def format_hh_transcript(messages: Messages) -> str:
    names = {"user": "Human", "assistant": "Assistant", "system": "Human"}
    return "".join(f"\n\n{names.get(m['role'], 'Human')}: {m['content']}" for m in messages)


def read_hh(path: str | Path) -> list[Ranking]:
    """Anthropic HH-RLHF: {"chosen", "rejected"} whole transcripts differing in the last
    assistant turn -> a K = 2 ranking whose prompt is the shared conversation."""
    out = []
    for lineno, row in jsonl_rows(path):
        where = f"{path}:{lineno}"
        _json_object(row, where)
        try:
            chosen, rejected = parse_hh_transcript(row["chosen"]), parse_hh_transcript(row["rejected"])
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{where}: not an HH-RLHF row ({exc})") from None
        refuse_lone_surrogates(row, where)
        # The prompt is the longest shared prefix ending with a Human turn. In a handful of
        # real rows the transcripts diverge earlier (a turn glued into the assistant text);
        # then each response is the whole rest of its transcript, as TRL's HH script does.
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        while n > 0 and chosen[n - 1]["role"] != "user":
            n -= 1
        if n == 0 or n >= len(chosen) or n >= len(rejected):
            raise UserError(f"{where}: chosen and rejected share no Human turn to use as the prompt")
        prompt, rest_c, rest_r = chosen[:n], chosen[n:], rejected[n:]
        if rest_c[0]["role"] != "assistant" or rest_r[0]["role"] != "assistant":
            raise UserError(f"{where}: no Assistant turn after the shared prompt")
        resp_c = format_hh_transcript(rest_c)[len("\n\nAssistant: "):]
        resp_r = format_hh_transcript(rest_r)[len("\n\nAssistant: "):]
        out.append(_pair_ranking(prompt, resp_c, resp_r, None, "hh").found_at(where))
    return out


def _places(ranks: list[int]) -> list[int]:
    """OASST's sibling ranks as places among the ranked replies kept: a deleted or unranked
    sibling leaves a gap ([0, 2] of two), and a rank is below K. Negative ranks are left for
    `Ranking` to refuse."""
    if any(r < 0 for r in ranks):
        return ranks
    return [sum(o < r for o in ranks) for r in ranks]


def read_oasst(path: str | Path) -> list[Ranking]:
    """OpenAssistant export trees: every set of >= 2 sibling assistant replies carrying a
    human `rank` becomes one Ranking whose prompt is the conversation up to their parent.
    Unranked replies (rank null) are left out, as in the oasst pairwise exports."""
    out: list[Ranking] = []

    def walk(node: dict, history: Messages, where: str) -> None:
        role = {"prompter": "user", "assistant": "assistant"}.get(node.get("role"), node.get("role"))
        if has_lone_surrogate([role, node["text"]]):
            mid = node.get("message_id")
            raise UserError(f"{where}: {f'message {mid!r:.80}' if isinstance(mid, str) else 'a message'} {LONE_SURROGATE}")
        convo = history + [{"role": role, "content": node["text"]}]
        replies = [r for r in node.get("replies") or [] if not r.get("deleted")]
        ranked = [r for r in replies if r.get("rank") is not None]
        if len(ranked) >= 2 and role == "user":
            ranking = Ranking(prompt=convo, responses=[r["text"] for r in ranked],
                              ranks=_places([int(r["rank"]) for r in ranked]), annotator="oasst",
                              prompt_id=str(node.get("message_id", f"{where}#{len(out)}")),
                              meta={"candidate_ids": [r.get("message_id") for r in ranked]})
            out.append(ranking.found_at(where))
        for r in replies:
            walk(r, convo, where)

    trees = 0
    for lineno, row in jsonl_rows(path):
        trees += 1
        where = f"{path}:{lineno}"
        root = _json_object(row, where).get("prompt")
        if not isinstance(root, dict) or "text" not in root:
            raise UserError(f"{where}: not an OpenAssistant message tree (no 'prompt' message)")
        try:
            walk(root, [], where)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{where}: malformed message tree ({exc})") from None
    if trees and not out:  # not an empty file, which is what reading nothing would pass for
        held = "its message tree has no" if trees == 1 else f"none of its {trees} message trees has"
        raise UserError(f"{path}: no ranked replies: {held} two sibling assistant replies that both carry a rank "
                        "(a reply whose rank is null is left out)")
    return out
