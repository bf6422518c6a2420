"""Batched sampling of responses from a causal LM (candidates for annotation, evaluation)."""

from __future__ import annotations

from typing import Any

from align.chat import render_prompt


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: list,
    *,
    num_return_sequences: int = 1,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> list[list[str]]:
    """`num_return_sequences` sampled responses per prompt (greedy when temperature is 0).

    Pure sampling (no top-k) by default, so that samples follow the model's distribution,
    as PPO's rollouts and the SFT baseline they are compared with must.
    """
    import torch
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    texts = [render_prompt(tokenizer, p) for p in prompts]
    sampling = temperature > 0
    out: list[list[str]] = []
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for start in tqdm(range(0, len(texts), batch_size), disable=not progress, desc="generating", unit="batch"):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(model.device)
            generated = model.generate(
                **batch,
                do_sample=sampling,
                temperature=temperature if sampling else None,
                top_p=top_p if sampling else None,
                top_k=0 if sampling else None,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_return_sequences,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            decoded = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for i in range(0, len(decoded), num_return_sequences):
                out.append([d.strip() for d in decoded[i : i + num_return_sequences]])
    model.train(was_training)
    return out


def sample_tokens(logits: Any, temperature: float) -> Any:
    """One token per row drawn from softmax(logits / temperature): (B, V) -> (B,).

    Inverts each row's CDF with one uniform draw: exact sampling like `torch.multinomial`,
    which instead draws V exponentials per row (at V = 1024 that was a fifth of a PPO
    rollout's decoding time on a CPU). A token of probability 0 is never drawn.
    """
    import torch

    probs = torch.softmax(logits.float() / temperature, dim=-1)
    cdf = probs.cumsum(-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]  # (B, 1) in [0, total)
    # first index whose cdf exceeds u: token i owns [cdf[i-1], cdf[i]), empty when p_i = 0
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)


def sample_with_cache(
    model: Any,
    input_ids: Any,
    attention_mask: Any,
    *,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int,
    pad_token_id: int,
) -> Any:
    """Sample continuations of left-padded prompts: (B, Q) -> response ids (B, max_new_tokens).

    A lean replacement for `model.generate` in PPO rollouts (pure sampling at `temperature`,
    no top-k/top-p): a static KV cache allocated once (a dynamic cache re-copies every
    layer's keys and values at each step), position ids that skip the left padding, and
    inverse-CDF sampling. Rows stop at their first eos and are padded with `pad_token_id`
    after it; decoding stops when every row has ended.
    """
    import torch
    from transformers import StaticCache

    batch, prompt_len = input_ids.shape
    device = input_ids.device
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + max_new_tokens)
    # (B, Q + N): the cache's slots; a generated position is switched on once it holds a token
    mask = torch.cat([attention_mask, attention_mask.new_zeros(batch, max_new_tokens)], dim=1)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, Q) first real token at 0
    response = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    logits = model(input_ids=input_ids, attention_mask=mask[:, :prompt_len], position_ids=position_ids,
                   past_key_values=cache, use_cache=True, cache_position=torch.arange(prompt_len, device=device),
                   logits_to_keep=1).logits[:, -1]  # (B, V) next-token logits after the prompt
    position = position_ids[:, -1:]  # (B, 1) left padding: the last column is real in every row
    for step in range(max_new_tokens):
        token = torch.where(done, pad_token_id, sample_tokens(logits, temperature))  # (B,)
        response[:, step] = token
        done |= token == eos_token_id
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        slot = prompt_len + step
        mask[:, slot] = 1
        position = position + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, past_key_values=cache,
                       use_cache=True, cache_position=torch.tensor([slot], device=device)).logits[:, -1]
    return response
