"""Reward training off the fp32-on-the-CPU path: batch placement, bf16 storage, gradient checkpointing and
accumulation."""

from __future__ import annotations

import pytest
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
    monkeypatch.setattr(trainer, "step", lambda batches: stepped.extend(map(id, batches)) or real_step(batches))
    trainer.train()
    assert len(stepped) == 2
    assert {i for _, i in moved} >= set(stepped)
    assert {d for d, _ in moved} == {trainer.accelerator.device}


def test_bf16_storage_keeps_what_is_trained_in_fp32_and_trains_it(quick_config):
    trainer = _trainer(quick_config("model.dtype=bfloat16", "lora.enabled=true", "train.max_steps=2",
                                    "train.learning_rate=1e-2", "eval.normalize=false"))
    model = trainer.model
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
    model = trainer.model.double()
    (batch,) = trainer.local_batches(trainer.global_batches[0])
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


def first_step(quick_config, *overrides: str) -> dict:
    """The first optimizer step of a fresh run with every term of the loss on: its metrics, the
    gradients it applies and the micro-batches it forwards."""
    trainer = _trainer(quick_config("train.max_steps=1", "eval.normalize=false", "train.mismatch_coef=1.0",
                                    "train.center_coef=0.1", "model.max_length=512", "overwrite=true", *overrides))
    model = trainer.model
    grads, apply = {}, trainer.optimizer.step

    def step_keeping_the_gradients(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        return apply(*args, **kwargs)

    trainer.optimizer.step = step_keeping_the_gradients
    batches = trainer.local_batches(trainer.global_batches[0])
    return {"metrics": trainer.step(batches), "grads": grads, "batches": batches}


def test_micro_batches_accumulate_the_gradient_of_the_whole_batch(quick_config):
    whole = first_step(quick_config)  # one batch of 16 rankings
    micro = first_step(quick_config, "train.gradient_accumulation_steps=3")
    assert [b.num_groups for b in whole["batches"]] == [16]
    assert [b.num_groups for b in micro["batches"]] == [6, 5, 5]
    # the same sequences, mismatched-prompt pairs included: partners drawn over the whole batch
    sequences = [sorted(s for b in run["batches"] for s in b.full_sequences()) for run in (whole, micro)]
    assert sequences[0] == sequences[1]
    assert sum(b.mismatch_winners.numel() for b in micro["batches"]) == 16
    for key in ("train/loss", "train/mismatch_loss", "train/accuracy", "train/reward_std"):
        assert micro["metrics"][key] == pytest.approx(whole["metrics"][key], rel=1e-5), key
    assert whole["grads"].keys() == micro["grads"].keys() and any(g.abs().sum() > 0 for g in whole["grads"].values())
    for name, grad in whole["grads"].items():
        torch.testing.assert_close(micro["grads"][name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_mismatched_prompt_copies_enter_only_the_mismatch_term(quick_config):
    # A response under another ranking's prompt is no ranked response: the reward-centering term and
    # the logged reward statistics are over the rankings' own responses. With the mismatch term's
    # weight near 0, the copies are still forwarded but the step must be the one without them.
    strong_centering = ("train.center_coef=10.0",)
    without = first_step(quick_config, "train.mismatch_coef=0.0", *strong_centering)
    tiny = first_step(quick_config, "train.mismatch_coef=1e-9", *strong_centering)
    assert sum(b.mismatch_winners.numel() for b in without["batches"]) == 0
    assert sum(b.mismatch_winners.numel() for b in tiny["batches"]) == 16  # the copies were forwarded
    assert [b.num_ranked for b in tiny["batches"]] == [b.num_responses for b in without["batches"]]
    for key in ("train/loss", "train/reward_mean", "train/reward_std"):
        assert tiny["metrics"][key] == pytest.approx(without["metrics"][key], rel=1e-5), key
    assert any(g.abs().sum() > 0 for g in without["grads"].values())
    for name, grad in without["grads"].items():
        torch.testing.assert_close(tiny["grads"][name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_a_diverging_run_stops_before_applying_a_non_finite_gradient(quick_config, tmp_path):
    from align.errors import TrainingDiverged
    from reward.train import train_reward_model

    cfg = quick_config(f"output_dir={tmp_path / 'run'}", "train.learning_rate=1e30", "eval.normalize=false")
    with pytest.raises(TrainingDiverged, match=r"^step 2: the gradient norm is nan"):  # step 1 moved weights by ~1e30
        train_reward_model(cfg, echo=lambda _: None)
    assert not (tmp_path / "run" / "model").exists()


def test_the_normalisation_policy_is_found_before_the_training(quick_config, tmp_path):
    from align.errors import UserError
    from reward.train import train_reward_model

    cfg = quick_config(f"output_dir={tmp_path / 'run'}", f"eval.normalize_policy={tmp_path / 'missing'}")
    with pytest.raises(UserError, match="missing"):
        train_reward_model(cfg, echo=lambda _: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before a step was trained
