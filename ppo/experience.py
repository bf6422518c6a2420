"""The batch one rollout produces, in the manner of OpenRLHF's `Experience`.

B = episodes (prompts) in the batch, Q = prompt tokens (left-padded), T = response tokens
(right-padded with pad after the first eos). Every later phase of the iteration reads and
fills these fields; minibatches are row slices of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch

Rows = TypeVar("Rows", bound="PromptsAndResponses")


def encode_prompts(tokenizer, prompts: list, max_length: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) ids and mask of the prompts in the chat template, padded and cut on the left (a
    long prompt keeps its end and its bos: align.chat.encode_rendered), so every row ends where its
    response will start."""
    from align.chat import encode_rendered, pad_rows, render_prompt

    rows = encode_rendered(tokenizer, [render_prompt(tokenizer, p) for p in prompts], max_length)
    ids, mask = pad_rows(rows, tokenizer.pad_token_id, left=True)
    return ids.to(device), mask.to(device)


def prompt_notes(tokenizer, training: list, held_out: list, max_length: int) -> list[str]:
    """The run's lines on its training and held-out prompts: those longer than `max_length` tokens,
    which `encode_prompts` cuts (the policy reads a cut prompt's end, while the reward model scores
    its response after the whole prompt, as the annotators read it), and those holding a special
    token's text (`align.chat.special_token_text`)."""
    from align.chat import render_prompt, special_text_line

    counts = []
    for name, group in (("training", training), ("held-out", held_out)):
        lengths = [len(ids) for ids in tokenizer([render_prompt(tokenizer, p) for p in group],
                                                 add_special_tokens=False)["input_ids"]] if group else []
        if cut := sum(n > max_length for n in lengths):
            counts.append(f"{cut} of {len(group)} {name}")
    notes = [f"ppo: {' and '.join(counts)} prompts are longer than max_prompt_length={max_length} tokens: the policy "
             f"reads their last {max_length} (a bos kept first) and the reward model scores its responses after the "
             "whole prompt; raise max_prompt_length to keep them whole"] if counts else []
    special = special_text_line("ppo", tokenizer, [(p, ()) for p in training + held_out], "training and held-out prompts")
    return notes + ([special] if special else [])


def decode_responses(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """The (B, T) responses as text: their real tokens, without the eos and special tokens."""
    texts = []
    for ids, mask in zip(response_ids.tolist(), response_mask.tolist()):
        kept = [t for t, m in zip(ids, mask) if m and t != tokenizer.eos_token_id]
        texts.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
    return texts


class PromptsAndResponses:
    """Whole sequences from the query_* and response_* fields of the dataclasses below, and their rows."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:  # (B, Q + T) prompt and response
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # (B, Q + T)
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    @property
    def context_length(self) -> int:  # Q
        return self.query_ids.shape[1]

    def select(self: Rows, rows: torch.Tensor | slice) -> Rows:
        """The episodes `rows` (a minibatch), every tensor field sliced along B."""
        return type(self)(
            **{
                f.name: (None if (v := getattr(self, f.name)) is None else v[rows])
                for f in dataclasses.fields(self)
            }
        )

    def trim_padding(self: Rows, bounds: tuple[int, int] | None = None) -> Rows:
        """The same episodes without the columns that are padding in every row: left padding of
        the prompts and the tail after the longest response. A minibatch of short responses then
        costs what its tokens cost; causal attention and mask-derived position ids make the
        result the same (the dropped columns only ever held masked-out padding).

        `bounds` = (first prompt column kept, response columns kept) when the caller knows them on
        the host (`batch_trim_bounds`), so that trimming reads nothing back from the device."""
        if bounds is None:
            bounds = batch_trim_bounds(*per_row_padding(self.query_mask, self.response_mask),
                                         range(len(self.query_mask)))
        first, last = bounds
        return type(self)(
            **{
                f.name: (None if (v := getattr(self, f.name)) is None
                         else v[:, first:] if f.name.startswith("query_")
                         else v[:, :last] if v.dim() == 2 else v)
                for f in dataclasses.fields(self)
            }
        )

    def right_padded(self, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sequences with all their padding at the right: (B, width) each row's prompt followed by
        its response, their attention mask, and (B,) the column where each row's response starts (its
        prompt's length). `width` must hold the longest prompt + response of the rows (None: Q + T).

        Left-padded prompts before right-padded responses put each row's real tokens in the middle, so
        the batch is as wide as its longest prompt plus its longest response; with the padding moved to
        the right it is as wide as its longest row. Causal attention and mask-derived position ids give
        every real token the same state either way (tests/ppo/test_optimise.py)."""
        full = self.query_ids.shape[1] + self.response_ids.shape[1]
        prompt_lengths = self.query_mask.sum(-1)
        columns = torch.arange(full if width is None else width, device=prompt_lengths.device)
        columns = columns + (self.context_length - prompt_lengths)[:, None]  # skip each row's left padding
        inside = columns < full
        columns = columns.clamp(max=full - 1)
        return self.input_ids.gather(1, columns), self.attention_mask.gather(1, columns) * inside, prompt_lengths


@dataclass
class Samples(PromptsAndResponses):
    """What step 1 samples: prompts, responses, and the sampler's own log-probs and values."""

    query_ids: torch.Tensor  # (B, Q) prompt tokens, left-padded
    query_mask: torch.Tensor  # (B, Q) 1 for real prompt tokens
    response_ids: torch.Tensor  # (B, T) sampled tokens a_t, pad after the first eos
    response_mask: torch.Tensor  # (B, T) 1 for tokens up to and including the first eos
    logprobs: torch.Tensor  # (B, T) log pi(a_t|s_t) at the sampling temperature, 0 after eos
    values: torch.Tensor | None  # (B, T) V(s_t) from the value head, 0 after eos; None with a critic


@dataclass
class Experience(PromptsAndResponses):
    query_ids: torch.Tensor  # (B, Q) prompt tokens, left-padded
    query_mask: torch.Tensor  # (B, Q) 1 for real prompt tokens, 0 for left padding
    response_ids: torch.Tensor  # (B, T) sampled tokens a_t, pad after the first eos
    response_mask: torch.Tensor  # (B, T) 1 for tokens up to and including the first eos
    logprobs: torch.Tensor  # (B, T) log pi_old(a_t|s_t) at the sampling temperature
    ref_logprobs: torch.Tensor  # (B, T) log pi_ref(a_t|s_t), same temperature
    values: torch.Tensor | None  # (B, T) V_old(s_t), the value of the state before a_t; None without a value model
    scores: torch.Tensor  # (B,) reward-model score (normalised) minus the missing-eos penalty
    kl: torch.Tensor | None = None  # (B, T) per-token KL estimate (k1 or k3) of pi_old vs pi_ref
    rewards: torch.Tensor | None = None  # (B, T) PPO: -beta * kl, plus the score at the last real token
    advantages: torch.Tensor | None = None  # (B, T) PPO: GAE, whitened; RLOO/GRPO: the sequence's, at every token
    returns: torch.Tensor | None = None  # (B, T) PPO's value targets = GAE advantages + V_old (not whitened)

    def __len__(self) -> int:
        return self.query_ids.shape[0]

def per_row_padding(query_mask: torch.Tensor, response_mask: torch.Tensor) -> tuple[list[int], list[int]]:
    """Per row, read back to the host once: the first real prompt column (0 for an empty prompt,
    which keeps every column) and one past the last real response column (0 for none)."""
    q, t = query_mask.shape[1], response_mask.shape[1]
    columns = torch.arange(q, device=query_mask.device).expand_as(query_mask)
    first = torch.where(query_mask.bool(), columns, q).amin(1)
    first = torch.where(first == q, 0, first)
    last = (response_mask.bool() * torch.arange(1, t + 1, device=response_mask.device)).amax(1)
    return first.tolist(), last.tolist()


def batch_trim_bounds(first: list[int], last: list[int], rows: Iterable[int]) -> tuple[int, int]:
    """`trim_padding`'s bounds for `rows`, from `per_row_padding`'s per-row lists: the first
    prompt column real in some row, and one past the last response column real in some row (at
    least 1)."""
    rows = list(rows)
    return min(first[i] for i in rows), max(1, max(last[i] for i in rows))
