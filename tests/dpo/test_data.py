"""Which rankings DPO can read a response's log-probability from, and how the others are reported."""

from __future__ import annotations

import torch

from align.formats import Ranking
from dpo.data import DPODataset


class MergingTokenizer:
    """A character tokenizer (id = code point) that, like a BPE with the merge (":", " !"), turns ": !"
    into one token, and truncates from the left as DPO's tokenizer does."""

    chat_template = None
    eos_token, eos_token_id, pad_token_id = "\x03", 3, 0
    name_or_path = "merging-test-tokenizer"
    MERGED = 1000

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for ch in text:
            if ids[-2:] == [ord(":"), ord(" ")] and ch == "!":
                ids[-2:] = [self.MERGED]
            else:
                ids.append(ord(ch))
        return ids

    def __call__(self, texts, *, truncation: bool = False, max_length: int | None = None,
                 add_special_tokens: bool = True) -> dict:
        ids = [self.encode(t) for t in texts]
        if truncation and max_length is not None:
            ids = [s[-max_length:] for s in ids]
        return {"input_ids": ids}


def test_rankings_left_out_are_counted_by_their_reason():
    tok = MergingTokenizer()
    ok = Ranking(prompt="q?", responses=["yes", "no"], ranks=[0, 1])
    # the rendered prompt ends in "Assistant:", the response follows after a space: one starting with "!" is
    # merged into the prompt's last token
    merged = Ranking(prompt="q?", responses=["!wow", "no"], ranks=[0, 1])
    long = Ranking(prompt="q?", responses=["y" * 100, "no"], ranks=[0, 1])
    dataset = DPODataset([ok, merged, long], tok, max_length=64)
    assert dataset.rankings == [ok]
    assert (dataset.left_out.too_long, dataset.left_out.merged_at_boundary) == (1, 1)
    line = str(dataset.left_out)
    assert "1 whose prompt + response exceeds max_length" in line
    assert "1 whose prompt and response the tokenizer merges" in line
    # with room for every text, only the merge is left out
    roomy = DPODataset([ok, merged, long], tok, max_length=1000)
    assert roomy.rankings == [ok, long] and str(roomy.left_out).startswith("1 whose prompt and response")


def test_a_batch_lays_values_out_by_ranking_with_zero_at_padding():
    """A K=3 and a K=2 ranking in one batch: the second's missing third response holds 0, so a sum
    over the (G, K) layout (the logged movement from the reference) counts real responses only."""
    from dpo.data import DPOBatch

    batch = DPOBatch(responses=None, response_index=torch.tensor([[0, 1, 2], [3, 4, -1]]),
                     ranks=torch.tensor([[0, 1, 2], [1, 0, 0]]), reference_logps=None)
    assert batch.valid.tolist() == [[True, True, True], [True, True, False]]
    assert batch.per_ranking(torch.arange(5.0) + 1).tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]]
