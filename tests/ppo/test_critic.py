"""value_model=reward_model: the critic must read every token id the policy can sample."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from align.config import load_config
from ppo.config import PPOConfig
from ppo.trainer import PPOTrainer


@pytest.fixture(scope="module")
def longer_tokenizer_pair(tiny_random_model, tmp_path_factory) -> tuple[Path, Path]:
    """A policy checkpoint whose tokenizer has one token more than its embedding table (as a fresh
    byte-level BPE tokenizer gets `<|endoftext|>` from transformers), and a reward model trained on
    the same checkpoint, saved with that tokenizer and its checkpoint's table size."""
    from align.modeling import load_tokenizer
    from reward.model import build_reward_model, save_reward_model

    root = tmp_path_factory.mktemp("longer-tokenizer")
    policy = root / "policy"
    shutil.copytree(tiny_random_model, policy)
    tokenizer = load_tokenizer(policy)
    rows = tokenizer.__len__()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    assert len(tokenizer) == rows + 1
    tokenizer.save_pretrained(policy)
    reward = build_reward_model(tiny_random_model, load_tokenizer(tiny_random_model), seed=1)
    assert reward.get_input_embeddings().num_embeddings == rows
    save_reward_model(reward, tokenizer, root / "reward", gain=1.0, bias=0.0, info={})
    return policy, root / "reward"


def test_critic_embeds_the_ids_only_the_grown_policy_table_has(longer_tokenizer_pair, tmp_path):
    # The policy's table grows to its tokenizer (load_causal_lm); the reward model's does not. A response
    # holding the extra id (the random policy samples it now and then, more often at 128 tokens than at
    # 32) made the critic's embedding read past its table: IndexError here, a device-side assert on CUDA.
    policy, reward = longer_tokenizer_pair
    cfg = load_config(PPOConfig, None, [
        f"policy_model={policy}", f"reward_model={reward}", f"output_dir={tmp_path / 'run'}",
        "value_model=reward_model", "num_prompts=8", "num_eval_prompts=0", "num_iterations=1", "batch_size=4",
        "num_mini_batches=1", "response_length=6", "save_every=0", "progress=false"])
    trainer = PPOTrainer(cfg)
    trainer.setup()
    policy_rows = trainer.model.policy.get_base_model().get_input_embeddings().num_embeddings
    last_id = policy_rows - 1
    assert trainer.tokenizer.convert_ids_to_tokens(last_id) == "<|endoftext|>"
    ids = torch.tensor([[5, 17, 42, last_id, 9, last_id]])
    mask = torch.ones_like(ids)
    values = trainer.model.critic_values(ids, mask, 3)
    assert values.shape == (1, 3) and torch.isfinite(values).all()
    # the training forward reads the same ids through the critic and gets the same values
    logp, _, train_values = trainer.model(ids, mask, 3, ids[:, 3:], 1.0)
    torch.testing.assert_close(train_values, values, rtol=0, atol=1e-6)
    assert torch.isfinite(logp).all()
