"""Prompts longer than a sliding window (Gemma 2/3 alternate sliding and full layers): a prompt's
continuations read from its cache see what one pass over the whole sequence sees."""

from __future__ import annotations

import pytest
import torch

from tests.families.builders import build_family_model

WINDOWED = {"gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 4}),
            "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 4,
                                                 "layer_types": ["sliding_attention", "full_attention"]})}


@pytest.mark.parametrize("family", sorted(WINDOWED))
def test_shared_prompt_continuations_past_the_window_match_the_whole_sequence(family, tmp_path):
    import transformers

    from align.forward import forward_shared_prompts, model_trunk
    from tests.families import builders

    builders.FAMILIES.setdefault(f"{family}-windowed", WINDOWED[family])
    path = build_family_model(f"{family}-windowed", tmp_path / family)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, 300, (1, 20), generator=g)  # 5 windows long
    continuations = torch.randint(5, 300, (2, 12), generator=g)
    whole = torch.cat([prompt.expand(2, -1), continuations], dim=1)
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification):
        model = auto.from_pretrained(path).eval()
        body = model_trunk(model) if auto is transformers.AutoModelForCausalLM else model
        with torch.no_grad():
            _, _, continued = forward_shared_prompts(body, prompt, torch.ones_like(prompt), torch.tensor([0, 0]),
                                                     continuations, torch.ones_like(continuations), 1)
            (*_, out), = list(continued)
            full = body(input_ids=whole, use_cache=False)
        if auto is transformers.AutoModelForCausalLM:
            torch.testing.assert_close(out.last_hidden_state, full.last_hidden_state[:, 20:], atol=1e-5, rtol=1e-5)
        else:  # a sequence classifier scores the last token
            torch.testing.assert_close(out.logits, full.logits, atol=1e-5, rtol=1e-5)
