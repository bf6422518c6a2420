"""The PPO sampler: exact categorical draws, and a KV-cache loop that continues left-padded
prompts exactly as `model.generate` does."""

from __future__ import annotations

import torch

from align.generation import sample_tokens, sample_with_cache
from align.chat import render_prompt
from align.modeling import load_causal_lm, load_tokenizer
from align.synthetic import make_prompts


def test_sample_tokens_draws_each_token_with_its_probability():
    # logits (0, -inf, ln 3) -> probs (1/4, 0, 3/4); at temperature 1 token 1 is never drawn
    logits = torch.tensor([0.0, float("-inf"), torch.log(torch.tensor(3.0)).item()]).expand(20_000, 3)
    torch.manual_seed(0)
    counts = torch.bincount(sample_tokens(logits, temperature=1.0), minlength=3)
    assert counts[1] == 0
    assert abs(counts[0].item() / 20_000 - 0.25) < 0.015  # binomial std 0.003
    # temperature 2: logits / 2 -> exp = (1, 0, sqrt 3) -> p0 = 1 / (1 + sqrt 3) = 0.366
    counts = torch.bincount(sample_tokens(logits, temperature=2.0), minlength=3)
    assert abs(counts[0].item() / 20_000 - 1 / (1 + 3**0.5)) < 0.015


def test_sample_with_cache_continues_left_padded_prompts_like_generate(demo_model):
    tokenizer = load_tokenizer(demo_model)
    tokenizer.padding_side = "left"
    model = load_causal_lm(demo_model, tokenizer=tokenizer).eval()
    enc = tokenizer([render_prompt(tokenizer, p) for p in make_prompts(3, seed=1)],
                    return_tensors="pt", padding=True, add_special_tokens=False)
    assert (enc["attention_mask"] == 0).any()  # left padding is exercised
    # near-zero temperature is greedy decoding: the same tokens as generate(do_sample=False)
    ours = sample_with_cache(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=24, temperature=1e-4,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        reference = model.generate(**enc, do_sample=False, max_new_tokens=24, min_new_tokens=24,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=None)[:, enc["input_ids"].shape[1]:]
    eos = (reference == tokenizer.eos_token_id).cumsum(-1) > 0
    ended = eos & ~(reference == tokenizer.eos_token_id)  # after the first eos ours holds pad
    assert torch.equal(ours[~ended], reference[~ended])
    assert (ours[ended] == tokenizer.pad_token_id).all()
