"""Reward training off the fp32-on-the-CPU path: batch placement, bf16 storage, gradient checkpointing."""

from __future__ import annotations

import torch

from align.precision import enable_gradient_checkpointing
from reward.data import RankingBatch
from reward.train import RewardTrainer


def _trainer(cfg) -> RewardTrainer:
    trainer = RewardTrainer(cfg, echo=lambda s: None)
    trainer.setup()
    return trainer


def test_every_training_batch_moves_to_the_model_device(quick_config, monkeypatch):
    # On a GPU a batch collated on the CPU and never moved fails at the first step ("index is on cpu");
    # here every batch the trainer hands to `step` must have gone through RankingBatch.to(trainer.device).
    moved, stepped = [], []
    real_to = RankingBatch.to

    def recording_to(self, device):
        out = real_to(self, device)
        moved.append((torch.device(device), id(out)))
        return out

    monkeypatch.setattr(RankingBatch, "to", recording_to)
    trainer = _trainer(quick_config("train.max_steps=2", "eval.normalize=false"))
    real_step = trainer.step
    monkeypatch.setattr(trainer, "step", lambda batch: stepped.append(id(batch)) or real_step(batch))
    trainer.train()
    assert len(stepped) == 2
    assert {i for _, i in moved} >= set(stepped)
    assert {d for d, _ in moved} == {trainer.accelerator.device}


def test_bf16_storage_keeps_what_is_trained_in_fp32_and_trains_it(quick_config):
    trainer = _trainer(quick_config("model.dtype=bfloat16", "lora.enabled=true", "train.max_steps=2",
                                    "train.learning_rate=1e-2", "eval.normalize=false"))
    model = trainer.accelerator.unwrap_model(trainer.model)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert trained and frozen
    assert {p.dtype for p in trained.values()} == {torch.float32}  # adapters and score head: fp32 master weights
    assert {p.dtype for p in frozen.values()} == {torch.bfloat16}  # the base: half the memory
    before = {n: p.detach().clone() for n, p in trained.items()}
    trainer.train()
    lora_b = [n for n in trained if "lora_B" in n]
    # lora_B starts at 0: a bf16 copy of a small first update would still move it, so check the A side too
    assert all(not torch.equal(before[n], trained[n]) for n in lora_b)
    assert any(not torch.equal(before[n], trained[n]) for n in trained if "lora_A" in n)
    assert all(s["train/loss"] == s["train/loss"] for s in [trainer.last_train])  # finite


def test_gradient_checkpointing_gives_the_shared_prompt_rewards_and_gradient(quick_config):
    from reward.model import forward_rewards, forward_rewards_shared_prompts

    cfg = quick_config("train.max_steps=1", "eval.normalize=false")
    trainer = _trainer(cfg)
    model = trainer.accelerator.unwrap_model(trainer.model).double()
    batch = trainer.local_batch(trainer.global_batches[0])
    assert batch.prompt_ids.shape[0] < batch.num_responses  # prompts really are shared in this batch

    def rewards_and_grads(fn):
        model.zero_grad(set_to_none=True)
        r = fn()
        r.sum().backward()
        return r.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    shared, g_shared = rewards_and_grads(lambda: forward_rewards_shared_prompts(model, batch, 2))
    layers = enable_gradient_checkpointing(model)
    assert layers
    ids, mask = batch.whole_sequences(trainer.collate.pad_token_id)
    whole, g_whole = rewards_and_grads(lambda: forward_rewards(model, ids, mask))
    torch.testing.assert_close(whole, shared, rtol=0, atol=1e-9)
    assert g_whole.keys() == g_shared.keys()
    for name in g_shared:
        torch.testing.assert_close(g_whole[name], g_shared[name], rtol=0, atol=1e-6)
