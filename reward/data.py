"""Rankings in, batches out: loading every data source, the prompt-level split, the K-wise collate.

- Every source becomes a list of `align.formats.Ranking` (pairwise sources are K = 2 rankings).
- The split is by prompt, never by pair (nor by ranking): all rankings of a prompt, and for
  OpenAssistant all groups of one message tree, land on the same side, so no held-out prompt
  (or conversation prefix) has been seen in training.
- A batch is a list of rankings; each is one batch element and all responses of the batch are
  forwarded together, each once (InstructGPT), their shared prompts once per batch. `expand_to_pairs` turns
  rankings into independent K = 2 rankings for the pairwise comparison mode.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from align.chat import pad_rows
from align.errors import UserError
from align.formats import Ranking, merge_repeated_responses, ordered_pairs
from reward.sources import read_project_rankings

log = logging.getLogger("align")

# --------------------------------------------------------------------------- loading


@dataclass
class RewardData:
    train: list[Ranking]  # training rankings (each with at least one ordered pair)
    eval: list[Ranking]  # held-out rankings whose labels define eval/accuracy
    eval_label: str  # where the held-out labels come from: "gold" (synthetic judge) or "annotators"
    eval_annotator: list[Ranking] | None = None  # synthetic: the simulated annotators' labels on the same prompts
    without_preference: list[Ranking] = field(default_factory=list)  # training-side rankings left out: no pair
    held_out_without_preference: int = 0  # held-out rankings left out: no pair to score
    source: dict[str, Any] = field(default_factory=dict)  # what data produced the model (recorded with it)
    with_repeats: int = 0  # rankings that held one response text more than once (`merge_repeated_responses`)


def prompt_key(ranking: Ranking) -> str:
    """The identity of a prompt for the split: its FIRST user turn. Deeper ranked groups of one
    OpenAssistant tree (or HH dialogues opening the same way) share that opening, and must not be
    split across train and eval; a plain-text prompt is that turn, so a file holding one question
    both as text and as a one-turn conversation keeps it on one side."""
    if isinstance(ranking.prompt, str):
        return f"user:{ranking.prompt}"
    first = next((m["content"] for m in ranking.prompt if m.get("role") == "user"), None)
    return f"user:{first}" if first is not None else f"conversation:{json.dumps(ranking.prompt)}"


def split_by_prompt(rankings: Sequence[Ranking], eval_fraction: float, seed: int) -> tuple[list[Ranking], list[Ranking]]:
    """Hold out `eval_fraction` of the distinct prompts (at least one), with all their rankings."""
    keys = sorted({prompt_key(r) for r in rankings})
    if len(keys) < 2:
        raise UserError(f"need at least 2 distinct prompts to split train/eval, found {len(keys)}")
    random.Random(f"split:{seed}").shuffle(keys)
    n_eval = min(len(keys) - 1, max(1, round(eval_fraction * len(keys))))
    held_out = set(keys[:n_eval])
    train = [r for r in rankings if prompt_key(r) not in held_out]
    eval_ = [r for r in rankings if prompt_key(r) in held_out]
    return train, eval_


def repeats_note(with_repeats: int) -> str:
    """What `load_reward_data` did with rankings that repeat a response, in words for the run's log."""
    return (f"{with_repeats} ranking(s) list one response text more than once: each text is kept once, "
            "at the best rank it was given")


def with_pairs(rankings: Sequence[Ranking]) -> list[Ranking]:
    """Drop rankings that imply no pair (all tied, or K < 2): they carry no training signal."""
    return [r for r in rankings if ordered_pairs(r.ranks)]


def shuffled_pairs(rankings: Sequence[Ranking], seed: int) -> list[tuple[int, int, int]]:
    """(ranking, winner, loser) indices of every ordered pair the rankings imply, shuffled apart."""
    pairs = [(g, w, l) for g, r in enumerate(rankings) for w, l in ordered_pairs(r.ranks)]
    random.Random(f"pairs:{seed}").shuffle(pairs)
    return pairs


def expand_to_pairs(rankings: Sequence[Ranking], seed: int) -> list[Ranking]:
    """Pairwise expansion (TRL, OpenRLHF, ...): one K = 2 ranking per ordered pair, shuffled apart."""
    def pair(r: Ranking, w: int, l: int) -> Ranking:  # noqa: E741 (winner, loser)
        return Ranking(prompt=r.prompt, responses=[r.responses[w], r.responses[l]], ranks=[0, 1],
                       annotator=r.annotator, prompt_id=r.prompt_id, meta=r.meta).found_at(r.where)

    return [pair(rankings[g], w, l) for g, w, l in shuffled_pairs(rankings, seed)]


def pair_origins(rankings: Sequence[Ranking], seed: int) -> list[int]:
    """Index in `rankings` of the ranking each pair of `expand_to_pairs(rankings, seed)` comes from:
    what a count over the pairs is in rankings."""
    return [g for g, _, _ in shuffled_pairs(rankings, seed)]


def gold_ranks(prompt: str, responses: Sequence[str]) -> list[int]:
    """Ranks (0 = best, equal scores tie) by the synthetic task's gold judge."""
    from align.synthetic import gold_score

    scores = [gold_score(prompt, r) for r in responses]
    distinct = sorted(set(scores), reverse=True)
    return [distinct.index(s) for s in scores]


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_source(fmt: str, path: str | Path) -> list[Ranking]:
    """Read one file of the given format into rankings (readers live in align.formats); of a kwise
    file with revision numbers (an --all-revisions export), each annotator's latest ranking of each
    prompt (`latest_revisions`)."""
    from align import formats

    readers = {"kwise": formats.read_kwise, "trl": formats.read_trl_pairs, "hh": formats.read_hh, "oasst": formats.read_oasst}
    rankings = list(readers[fmt](path))
    return latest_revisions(rankings, path) if fmt == "kwise" else rankings


def latest_revisions(rankings: list[Ranking], path: str | Path) -> list[Ranking]:
    """The rankings less those a later revision of the same annotator's ranking of the same prompt
    replaced: an annotator's corrections are one judgement, the last, as the annotation app's own
    export gives it (trained on, every revision would count it again, contradictions included)."""
    def key(r: Ranking) -> tuple:
        return r.annotator, r.prompt_id if r.prompt_id is not None else json.dumps(r.prompt, sort_keys=True)

    latest: dict[tuple, int] = {}
    for r in rankings:
        revision = (r.meta or {}).get("revision")
        if isinstance(revision, int) and revision > latest.get(key(r), 0):
            latest[key(r)] = revision
    kept = [r for r in rankings if (r.meta or {}).get("revision") in (None, latest.get(key(r)))]
    if len(kept) < len(rankings):
        log.warning("%s: %d earlier revision(s) of rankings left out: each annotator's latest ranking of a prompt "
                    "is trained on", path, len(rankings) - len(kept))
    return kept


def load_reward_data(data_cfg: Any) -> RewardData:
    """All training and held-out rankings for a DataSection, split by prompt."""
    cfg = data_cfg
    if cfg.format == "synthetic":
        return _load_synthetic(cfg)
    source: dict[str, Any] = {"format": cfg.format}
    if cfg.format == "annotation":
        rankings = read_project_rankings(cfg.db_url, cfg.project)
        source.update(db_url=cfg.db_url, project=cfg.project)
    else:
        rankings = read_source(cfg.format, cfg.path)
        source.update(path=str(Path(cfg.path).resolve()), sha256=file_digest(cfg.path))
    if not rankings:
        raise UserError(f"no rankings found in {source.get('path') or cfg.project}")
    merged = [merge_repeated_responses(r) for r in rankings]
    with_repeats = sum(m is not r for m, r in zip(merged, rankings))
    rankings = merged
    if cfg.eval_path is not None:
        train, eval_ = rankings, [merge_repeated_responses(r) for r in read_source(cfg.format, cfg.eval_path)]
        source.update(eval_path=str(Path(cfg.eval_path).resolve()), eval_sha256=file_digest(cfg.eval_path))
        overlap = {prompt_key(r) for r in train} & {prompt_key(r) for r in eval_}
        if overlap:  # the user's own split leaks prompts: refuse rather than report an inflated accuracy
            raise UserError(f"{len(overlap)} prompts appear in both data.path and data.eval_path; split by prompt")
    else:
        train, eval_ = split_by_prompt(rankings, cfg.eval_fraction, cfg.seed)
        source.update(split="prompt", eval_fraction=cfg.eval_fraction, split_seed=cfg.seed)
    given = len(train) + len(eval_)
    without_preference = [r for r in train if not ordered_pairs(r.ranks)]
    held_out_without_preference = sum(not ordered_pairs(r.ranks) for r in eval_)
    train, eval_ = with_pairs(train), with_pairs(eval_)
    if cfg.max_rankings is not None:
        train = train[: cfg.max_rankings]
    if not train or not eval_:
        unranked = len(without_preference) + held_out_without_preference
        why = (f" ({unranked} of the {given} rankings state no preference: a single response, or every "
               "response tied)") if unranked else ""
        raise UserError(f"after the split: {len(train)} training and {len(eval_)} held-out rankings with pairs; need "
                        f"both > 0{why}")
    source.update(train_rankings=len(train), eval_rankings=len(eval_))
    return RewardData(train=train, eval=eval_, eval_label="annotators", source=source,
                      without_preference=without_preference, held_out_without_preference=held_out_without_preference,
                      with_repeats=with_repeats)


def _load_synthetic(cfg: Any) -> RewardData:
    """Train on simulated annotators' rankings of train-pool prompts; evaluate on held-out-pool
    prompts against the gold judge's order (and, for reference, against the annotators)."""
    from align.synthetic import make_rankings

    train = with_pairs(make_rankings(cfg.num_rankings, k=cfg.k, agreement=cfg.agreement, seed=cfg.seed,
                                     split="train", annotators=cfg.annotators_per_prompt))
    held_out = make_rankings(cfg.num_eval_rankings, k=cfg.k, agreement=cfg.agreement, seed=cfg.seed + 1,
                             split="heldout", annotators=cfg.annotators_per_prompt)
    gold, seen = [], set()
    for r in held_out:  # one gold ranking per distinct (prompt, responses), however many annotators
        key = (r.prompt, tuple(r.responses))
        if key not in seen:
            seen.add(key)
            gold.append(Ranking(prompt=r.prompt, responses=r.responses, ranks=gold_ranks(r.prompt, r.responses),
                                annotator="gold", prompt_id=r.prompt_id))
    if cfg.max_rankings is not None:
        train = train[: cfg.max_rankings]
    source = {"format": "synthetic", "num_rankings": cfg.num_rankings, "k": cfg.k, "agreement": cfg.agreement,
              "annotators_per_prompt": cfg.annotators_per_prompt, "seed": cfg.seed, "train_rankings": len(train),
              "eval_rankings": len(gold), "split": "synthetic train/heldout prompt pools"}
    return RewardData(train=train, eval=with_pairs(gold), eval_label="gold", eval_annotator=with_pairs(held_out),
                      source=source)


# --------------------------------------------------------------------------- batches


def mismatch_partners(prompts: Sequence[tuple[int, ...] | None]) -> list[tuple[int, int]]:
    """In-batch pairing for the mismatched-prompt pairs: (g, h) shows ranking g's top response
    under ranking h's prompt. h is the ranking after g in the batch, cyclically, so every prompt
    is once the winner's context and once the loser's (the prompt alone cannot explain the
    pair), and as batches are reshuffled every epoch a response meets a new prompt each epoch.
    `prompts[g]` is ranking g's rendered prompt, None where its responses do not share one
    (truncated); no pair with those, nor between two rankings of the same prompt."""
    usable = [g for g, p in enumerate(prompts) if p is not None]
    return [(g, h) for g, h in zip(usable, usable[1:] + usable[:1]) if prompts[g] != prompts[h]]


def top_response(ranks: Sequence[int]) -> int:
    """Index of the best-ranked response (the first one on a tie)."""
    return min(range(len(ranks)), key=lambda i: ranks[i])


@dataclass
class RankingItem:
    """One ranking, tokenized: the batch element of the K-wise loss."""

    responses: list[list[int]]  # K token id lists, prompt + response + eos each
    pairs: list[tuple[int, int]]  # ordered (winner, loser) pairs the ranking implies
    top: int = 0  # index of this ranking's top response (under its own prompt: the mismatch pair's winner)
    prompt_len: int = 0  # leading tokens of every response that are the rendered prompt (0: none shared)

    @property
    def prompt(self) -> tuple[int, ...] | None:
        """The rendered prompt's tokens, None if the responses do not share them."""
        return tuple(self.responses[0][: self.prompt_len]) if self.prompt_len else None


@dataclass
class RankingBatch:
    """A batch of G rankings, all their N responses flattened into one pass (each prompt once):
    sequence n is prompt_ids[prompt_index[n]] followed by continuation_ids[n]."""

    prompt_ids: torch.Tensor  # (U, Q) the batch's distinct prompts (rendered), left-padded
    prompt_mask: torch.Tensor  # (U, Q) 1 on real prompt tokens
    continuation_ids: torch.Tensor  # (N, R) each sequence after its prompt (response + eos), right-padded
    continuation_mask: torch.Tensor  # (N, R) 1 on real tokens
    prompt_index: torch.Tensor  # (N,) row of prompt_ids that sequence n continues
    winners: torch.Tensor  # (P,) index into N of each ordered pair's preferred response
    losers: torch.Tensor  # (P,) index into N of the pair's rejected response
    pair_group: torch.Tensor  # (P,) index 0..G-1 of the ranking the pair comes from
    num_groups: int  # G rankings in this batch
    mismatch_winners: torch.Tensor  # (M,) index into N of a ranking's top response under its own prompt
    mismatch_losers: torch.Tensor  # (M,) index into N of the same response under another ranking's prompt

    @property
    def num_responses(self) -> int:
        """N sequences forwarded: the rankings' responses, then the mismatched-prompt copies."""
        return self.continuation_ids.shape[0]

    @property
    def num_ranked(self) -> int:
        """The rankings' own responses: the first num_ranked of the N sequences."""
        return self.num_responses - self.mismatch_losers.numel()

    def full_sequences(self) -> list[list[int]]:
        """The N sequences whole (prompt + continuation token ids), as the model reads them."""
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(self.prompt_ids, self.prompt_mask)]
        return [prompts[int(u)] + ids[mask.bool()].tolist()
                for u, ids, mask in zip(self.prompt_index, self.continuation_ids, self.continuation_mask)]

    def whole_sequences(self, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, L) right-padded ids and mask of the N sequences, each prompt joined to its continuation,
        on the batch's device."""
        ids, mask = pad_rows(self.full_sequences(), pad_token_id, left=False)
        device = self.continuation_ids.device
        return ids.to(device), mask.to(device)

    def to(self, device: torch.device | str) -> RankingBatch:
        return RankingBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()})


def shared_prompt_len(prompt: list[int], sequences: Sequence[list[int]]) -> int:
    """len(prompt) if every sequence starts with exactly these prompt tokens and goes on after
    them, else 0 (a prompt cut by truncation, or a tokenizer that merges across the boundary):
    such sequences are then run whole, never continued from a prompt they do not contain."""
    n = len(prompt)
    return n if n and all(len(s) > n and s[:n] == prompt for s in sequences) else 0


class RankingDataset(torch.utils.data.Dataset):
    """Rankings pre-tokenized once: item i = a `RankingItem`.

    `encoder=True` (a BERT-like reward model): each text gets the tokenizer's own special tokens
    and shares no prompt with its siblings (`prompt_len` 0: attention is bidirectional, every
    token of the prompt depends on the response), so each sequence is forwarded whole."""

    def __init__(self, rankings: Sequence[Ranking], tokenizer, max_length: int, *, encoder: bool = False):
        from align.chat import encode_rendered, naming_prompt, render_example, render_prompt

        self.rankings = list(rankings)
        texts, prompts = [], []
        for r in self.rankings:  # a chat template that refuses a prompt: the line of the file it came from
            with naming_prompt(r.where or (f"the prompt {r.prompt_id!r:.80}" if r.prompt_id is not None else None)):
                if not encoder:  # (an encoder reads the whole text only)
                    prompts.append(render_prompt(tokenizer, r.prompt))
                texts.extend(render_example(tokenizer, r.prompt, resp) for resp in r.responses)
        ids = (tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"] if encoder
               else encode_rendered(tokenizer, texts, max_length))  # a causal LM's text keeps its bos
        prompt_ids = [[] for _ in self.rankings] if encoder else tokenizer(prompts, add_special_tokens=False)["input_ids"]
        self.items: list[RankingItem] = []
        pos = 0
        for r, prompt in zip(self.rankings, prompt_ids):
            k = len(r.responses)
            sequences = ids[pos : pos + k]
            self.items.append(RankingItem(sequences, ordered_pairs(r.ranks), top=top_response(r.ranks),
                                          prompt_len=shared_prompt_len(prompt, sequences)))
            pos += k
        # rankings with a text at max_length: cut to it (from the left: the prompt's start first), or exactly that long
        self.at_max_length = [any(len(s) >= max_length for s in item.responses) for item in self.items]
        self.truncated = sum(self.at_max_length)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> RankingItem:
        return self.items[i]


class RankingCollator:
    """list of RankingItem -> RankingBatch.

    `mismatch=True` adds, after all the rankings' responses, each ranking's top response under
    the next ranking's prompt (`mismatch_partners`): one extra forward per ranking whose prompt
    is already in the batch. Such a sequence longer than `max_length` is left out. A micro-batch
    takes its rankings' partners from the whole batch they were cut from (`partners`).
    """

    def __init__(self, pad_token_id: int, *, mismatch: bool = False, max_length: int | None = None):
        self.pad_token_id = pad_token_id
        self.mismatch = mismatch
        self.max_length = max_length

    def partners(self, items: Sequence[RankingItem]) -> list[RankingItem | None]:
        """For each ranking, the one whose prompt its top response is shown under (None: no
        mismatched pair; all None with `mismatch=False`)."""
        found: list[RankingItem | None] = [None] * len(items)
        for g, h in mismatch_partners([item.prompt for item in items]) if self.mismatch else []:
            found[g] = items[h]
        return found

    def __call__(self, items: Sequence[RankingItem],
                 partners: Sequence[RankingItem | None] | None = None) -> RankingBatch:
        """The batch of `items`; `partners` (`self.partners` of a larger batch the items are a part
        of) pairs them as that batch would, default: among themselves."""
        partners = self.partners(items) if partners is None else partners
        prompts, continuations, winners, losers, groups, offsets = [], [], [], [], [], []
        for g, item in enumerate(items):
            offsets.append(len(continuations))
            prompt = item.prompt or ()  # a sequence without a shared prompt continues the empty one
            prompts.extend([prompt] * len(item.responses))
            continuations.extend(response[item.prompt_len :] for response in item.responses)
            for w, l in item.pairs:
                winners.append(offsets[g] + w)
                losers.append(offsets[g] + l)
                groups.append(g)
        mismatch_winners, mismatch_losers = [], []
        for g, partner in enumerate(partners):
            if partner is None:
                continue
            response = items[g].responses[items[g].top][items[g].prompt_len :]
            if self.max_length is not None and len(partner.prompt) + len(response) > self.max_length:
                continue
            mismatch_winners.append(offsets[g] + items[g].top)
            mismatch_losers.append(len(continuations))
            prompts.append(partner.prompt)
            continuations.append(response)
        distinct: dict[tuple[int, ...], int] = {}  # each distinct prompt once
        prompt_index = [distinct.setdefault(p, len(distinct)) for p in prompts]
        prompt_ids, prompt_mask = pad_rows(list(distinct), self.pad_token_id, left=True)
        continuation_ids, continuation_mask = pad_rows(continuations, self.pad_token_id, left=False)
        return RankingBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            continuation_ids=continuation_ids,
            continuation_mask=continuation_mask,
            prompt_index=torch.tensor(prompt_index, dtype=torch.long),
            winners=torch.tensor(winners, dtype=torch.long),
            losers=torch.tensor(losers, dtype=torch.long),
            pair_group=torch.tensor(groups, dtype=torch.long),
            num_groups=len(items),
            mismatch_winners=torch.tensor(mismatch_winners, dtype=torch.long),
            mismatch_losers=torch.tensor(mismatch_losers, dtype=torch.long),
        )
