"""Rankings in, DPO batches out.

The rankings, their sources and the prompt-level split are the reward stage's
(`reward.data.load_reward_data`), and so is the tokenization: one `RankingItem` per ranking, its
K responses continuing one shared encoding of the prompt (`RankingCollator`). A `RankingBatch`
flattens the batch's responses; `DPOBatch` adds where each ranking's responses sit in it, their
ranks, and their cached reference log-probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from align.errors import UserError
from align.formats import Ranking
from reward.data import RankingBatch, RankingCollator, RankingDataset


@dataclass
class LeftOut:
    """Rankings DPO cannot learn from, counted for the one line that reports them."""

    single_response: int = 0  # fewer than 2 responses: nothing to compare
    all_tied: int = 0  # every response in one tie: no preference stated
    too_long: int = 0  # prompt + a response exceed max_length: truncation cuts the prompt
    merged_at_boundary: int = 0  # the tokenizer joins the prompt's last characters to a response's first

    def __str__(self) -> str:
        parts = [f"{n} {what}" for n, what in (
            (self.single_response, "with a single response"),
            (self.all_tied, "with every response tied (no preference)"),
            (self.too_long, "whose prompt + response exceeds max_length"),
            (self.merged_at_boundary, "whose prompt and response the tokenizer merges into one token where they meet"))
            if n]
        return ", ".join(parts)

    def __bool__(self) -> bool:
        return bool(self.single_response or self.all_tied or self.too_long or self.merged_at_boundary)


def usable_rankings(rankings: Sequence[Ranking]) -> tuple[list[Ranking], LeftOut]:
    """The rankings that state a preference; the others counted by reason."""
    kept, left_out = [], LeftOut()
    for r in rankings:
        if len(r.responses) < 2:
            left_out.single_response += 1
        elif len(set(r.ranks)) < 2:
            left_out.all_tied += 1
        else:
            kept.append(r)
    return kept, left_out


class DPODataset:
    """Rankings tokenized once, with the reference log-probabilities filled in by the trainer.

    Only rankings whose responses all continue the rendered prompt are kept: the log-probability
    of a response is read over its own tokens, so they must be told apart from the prompt's."""

    def __init__(self, rankings: Sequence[Ranking], tokenizer, max_length: int):
        tokenized = RankingDataset(rankings, tokenizer, max_length)
        keep = [i for i, item in enumerate(tokenized.items) if item.prompt_len]
        self.rankings = [tokenized.rankings[i] for i in keep]
        self.items = [tokenized.items[i] for i in keep]
        self.left_out = LeftOut()
        for item in tokenized.items:
            if not item.prompt_len:  # a sequence at max_length was truncated (from the left: its prompt cut)
                if any(len(s) >= max_length for s in item.responses):
                    self.left_out.too_long += 1
                else:
                    self.left_out.merged_at_boundary += 1
        self.reference_logps: list[torch.Tensor | None] = [None] * len(self.items)  # (K,) each, once computed
        self.pad_token_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.items)


def held_out_left_out_line(dataset: DPODataset, num_held_out: int) -> str:
    """The run's line on the `num_held_out` held-out rankings `dataset` left out: what the held-out
    accuracy is over, or, none left, that there is none (the summary has no eval/accuracy)."""
    line = f"dpo: left out {dataset.left_out} of the {num_held_out} held-out rankings"
    if len(dataset):
        return f"{line} (the held-out accuracy is over the others)"
    why = "fits max_length" if not dataset.left_out.merged_at_boundary else "is left to score"
    return f"{line}: no held-out ranking {why}: no held-out accuracy"


@dataclass
class DPOBatch:
    """G rankings of up to K responses each; their N responses flattened into one `RankingBatch`."""

    responses: RankingBatch  # the N responses, each prompt encoded once
    response_index: torch.Tensor  # (G, K) index into the N responses; -1 pads a ranking of fewer than K
    ranks: torch.Tensor  # (G, K) 0 = best, equal ranks tie; padding holds 0 and is masked by `valid`
    reference_logps: torch.Tensor | None  # (N,) log pi_ref(response | prompt), None before they are cached

    @property
    def valid(self) -> torch.Tensor:  # (G, K) real responses
        return self.response_index >= 0

    def per_ranking(self, values: torch.Tensor) -> torch.Tensor:
        """(N,) one value per response -> (G, K) laid out by ranking (0 at padding)."""
        return torch.where(self.valid, values[self.response_index.clamp(min=0)], 0.0)

    def to(self, device: torch.device | str) -> DPOBatch:
        return DPOBatch(self.responses.to(device), self.response_index.to(device), self.ranks.to(device),
                        None if self.reference_logps is None else self.reference_logps.to(device))


def collate(dataset: DPODataset, indices: Sequence[int]) -> DPOBatch:
    """The rankings `indices` of `dataset` as one batch."""
    items = [dataset.items[i] for i in indices]
    width = max(len(item.responses) for item in items)
    response_index = torch.full((len(items), width), -1, dtype=torch.long)
    ranks = torch.zeros((len(items), width), dtype=torch.long)
    offset = 0
    for g, i in enumerate(indices):
        k = len(dataset.items[i].responses)
        response_index[g, :k] = torch.arange(offset, offset + k)
        ranks[g, :k] = torch.tensor(dataset.rankings[i].ranks)
        offset += k
    cached = [dataset.reference_logps[i] for i in indices]
    reference = torch.cat(cached) if all(c is not None for c in cached) else None
    return DPOBatch(RankingCollator(dataset.pad_token_id)(items), response_index, ranks, reference)


def check_usable(train: Sequence[Ranking], left_out: LeftOut, where: str) -> None:
    if not train:
        raise UserError(f"no ranking states a preference in {where}" + (f" ({left_out})" if left_out else ""))
