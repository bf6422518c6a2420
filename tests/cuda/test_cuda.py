"""Every stage on a GPU. Skipped without CUDA; run with
`pytest tests/cuda -q` on a machine with one (the CPU suite checks the same code paths on the CPU).

Each test is a few seconds on a tiny random model: device placement and dtypes, not speed
(bench/gpu_bench.py measures that).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible here)")


def _ppo_cfg(policy, reward, out, *extra):
    from align.config import load_config
    from ppo.config import PPOConfig

    return load_config(PPOConfig, None, [
        f"policy_model={policy}", f"reward_model={reward}", f"output_dir={out}", "num_prompts=32",
        "num_eval_prompts=8", "num_iterations=2", "batch_size=8", "num_mini_batches=2",
        "gradient_accumulation_steps=2", "num_ppo_epochs=2", "save_every=1", "progress=false", *extra])


def test_reward_training_runs_on_the_gpu_in_bf16(tiny_random_model, tmp_path):
    from align.config import load_config
    from reward.config import RewardConfig
    from reward.train import train_reward_model

    cfg = load_config(RewardConfig, None, [
        f"model.name_or_path={tiny_random_model}", f"output_dir={tmp_path / 'rm'}", "model.dtype=bfloat16",
        "data.num_rankings=64", "data.num_eval_rankings=16", "train.batch_size=16", "eval.normalize_prompts=8",
        "eval.normalize_max_new_tokens=8", "train.gradient_checkpointing=true"])
    summary = train_reward_model(cfg, echo=lambda s: None)
    assert summary["memory/peak_gpu_mb"] > 0 and summary["eval/accuracy"] == summary["eval/accuracy"]


def test_reward_model_scores_on_the_gpu_by_default(random_reward_model):
    from reward.model import load_reward_model

    rm = load_reward_model(random_reward_model)
    assert rm.device.type == "cuda"
    scores = rm.score(["Hi", "Tell me about tea."], ["Hello!", "Tea is a drink."])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    bf16 = load_reward_model(random_reward_model, dtype=torch.bfloat16)
    torch.testing.assert_close(bf16.score(["Hi"], ["Hello!"]), rm.score(["Hi"], ["Hello!"]), rtol=0.05, atol=0.1)


def test_generation_moves_the_model_to_the_gpu(tiny_random_model):
    from align.generation import generate_responses
    from align.modeling import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(tiny_random_model)
    model = load_causal_lm(tiny_random_model, tokenizer=tokenizer)
    out = generate_responses(model, tokenizer, ["Hi", "Why?"], max_new_tokens=4)
    assert next(model.parameters()).device.type == "cuda" and len(out) == 2


def test_attention_is_sdpa_or_flash_by_default_on_the_gpu(tiny_random_model):
    from align.modeling import load_causal_lm

    model = load_causal_lm(tiny_random_model)
    assert model.config._attn_implementation in ("sdpa", "flash_attention_2", "flash_attention_3")


@pytest.mark.parametrize("value_model,response_length", [("policy_trunk", 32), ("reward_model", 128),
                                                          ("reward_model", 256)])
def test_ppo_runs_on_the_gpu_in_bf16(tiny_random_model, random_reward_model, tmp_path, value_model, response_length):
    from ppo.trainer import run_ppo

    cfg = _ppo_cfg(tiny_random_model, random_reward_model, tmp_path / "run", "dtype=bfloat16",
                   f"value_model={value_model}", f"response_length={response_length}", "gradient_checkpointing=true",
                   "logprob_chunk_tokens=64")
    summary = run_ppo(cfg)
    assert summary["iteration"] == 2 and torch.isfinite(torch.tensor(summary["objective/kl"]))
    assert (tmp_path / "run" / "checkpoints").is_dir() and (tmp_path / "run" / "policy").is_dir()


def test_ppo_resumes_on_the_gpu(tiny_random_model, random_reward_model, tmp_path):
    # (bit-identical resumption is tested on the CPU; GPU kernels need not be deterministic)
    from ppo.trainer import run_ppo

    def cfg(iterations):
        return _ppo_cfg(tiny_random_model, random_reward_model, tmp_path / "run", f"num_iterations={iterations}",
                        "num_eval_prompts=0", "response_length=8", "overwrite=true")

    run_ppo(cfg(1))
    summary = run_ppo(cfg(2), resume=True)
    assert summary["iteration"] == 2
