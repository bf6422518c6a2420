"""The optimisation phase's memory reuse (align.host_memory, called by ppo.optimise)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
import torch

# A child process allocates 128 MiB of 1 MiB blocks and frees them, 12 times, and prints each round's
# page faults: with malloc asked to keep freed memory ("keep"), or to give every block back to the
# kernel as it is freed ("give_back": each block its own mapping, unmapped on free), the churn glibc's
# defaults fall into on some runs and not others, depending on what else sits on the heap.
CHURN = """
import ctypes, json, resource, sys, torch
from align.host_memory import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, keep_freed_memory
if sys.argv[1] == "keep":
    took = keep_freed_memory()
else:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    took = bool(mallopt(M_MMAP_THRESHOLD, 128 * 2**10)) and bool(mallopt(M_TRIM_THRESHOLD, 0))
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(2**18) for _ in range(128)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"took": took, "faults": faults}))
"""


def churn(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_freed_activations_are_reused_without_faulting_their_pages_in_again():
    kept, given_back = churn("keep"), churn("give_back")
    assert kept["took"] is True and given_back["took"] is True
    # The first round faults the blocks in and the second grows the heap past the Python objects
    # between them; from then on a kept heap is reused. Counted against the same blocks given back
    # and faulted in again each round, whatever the page size (huge pages fault ~1/512 as often).
    if sum(given_back["faults"][2:]) < 10 * 128:
        pytest.skip(f"blocks given back fault in {given_back['faults']} times: nothing to reduce")
    assert sum(kept["faults"][2:]) < sum(given_back["faults"][2:]) / 20, (kept, given_back)


def test_length_grouped_micro_batches_put_rows_of_similar_length_together():
    from ppo.optimise import MicroBatch, length_grouped_micro_batches

    prompt_lengths = [5, 2, 9, 3, 4, 7]
    response_lengths = [1, 8, 6, 2, 0, 3]  # rows 0..5 are 6, 10, 15, 5, 4, 10 tokens long
    batches = length_grouped_micro_batches([0, 1, 2, 3, 4, 5], prompt_lengths, response_lengths, 4)
    assert batches == [MicroBatch([4, 3, 0, 1], width=10, response_width=8), MicroBatch([5, 2], 15, 6)]
    # a micro-batch whose rows have no response token still keeps one response column
    assert length_grouped_micro_batches([4], prompt_lengths, response_lengths, 4) == [MicroBatch([4], 4, 1)]


@pytest.mark.parametrize("value_model", ["policy_trunk", "reward_model"])
def test_right_padded_sequences_give_the_same_logprobs_values_and_gradients(small_run, value_model):
    # The training forward reads each micro-batch with its padding moved to the right and trimmed to
    # its longest row; log-probs, values and every trainable parameter's gradient must be those of the
    # left-padded, untrimmed batch.
    from align.config import load_config
    from ppo.config import PPOConfig
    from ppo.trainer import PPOTrainer

    trainer = PPOTrainer(load_config(PPOConfig, None, [*small_run, "response_length=12",
                                                       f"value_model={value_model}"]))
    trainer.setup()
    torch.manual_seed(0)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    with torch.no_grad():  # a trained adapter (B = 0 at the start would leave A without a gradient)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    prompts = ["Tell me about tea.", "Hi", "Can you explain the moon to me in simple words, please?", "Why?"]
    exp, _ = trainer.rollout(prompts)
    exp.response_mask[:, 9:] = 0  # responses of 9, 3, 1 and 9 tokens: the longest prompt's is short
    exp.response_mask[1, 3:] = 0
    exp.response_mask[2, 1:] = 0
    prompt_lengths = exp.query_mask.sum(-1)
    assert len(set(prompt_lengths.tolist())) == 4  # every row its own left padding
    width = int((prompt_lengths + exp.response_mask.sum(-1)).max())
    assert width < exp.context_length + 9  # the longest row is shorter than longest prompt + response
    mask = exp.response_mask.bool()

    def forward(input_ids, attention_mask, response_start):
        trainer.optimizer.zero_grad(set_to_none=True)
        logp, _, values = trainer.model(input_ids, attention_mask, response_start, exp.response_ids[:, :9], 1.0)
        ((logp * mask[:, :9]).sum() + (values * mask[:, :9]).sum()).backward()
        return logp.detach()[mask[:, :9]], values.detach()[mask[:, :9]], [p.grad.clone() for p in params]

    trimmed = exp.trim_padding((0, 9))
    right = forward(*trimmed.right_padded(width))
    left = forward(exp.input_ids[:, : exp.context_length + 9], exp.attention_mask[:, : exp.context_length + 9],
                   exp.context_length)
    ids, attention, start = trimmed.right_padded(width)
    assert ids.shape == (4, width) and torch.equal(start, prompt_lengths)
    assert torch.equal(attention.sum(-1), prompt_lengths + exp.response_mask.sum(-1))  # real tokens first
    assert all(attention[i, : int(attention[i].sum())].all() for i in range(4))
    torch.testing.assert_close(right[0], left[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(right[1], left[1], rtol=0, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in left[2])
    for a, b in zip(right[2], left[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_rollout_passes_in_length_groups_keep_each_row_its_own_logprobs(small_run):
    # The rollout's reference (and recomputed policy) log-probs run in groups of similar length, each
    # right-padded and trimmed; every row must get back the log-probs of its own tokens, 0 past its end.
    from align.config import load_config
    from ppo.config import PPOConfig
    from ppo.trainer import PPOTrainer

    trainer = PPOTrainer(load_config(PPOConfig, None, [*small_run, "batch_size=8", "num_mini_batches=2",
                                                       "response_length=12"]))
    trainer.setup()
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name or name.startswith("value_head."):
                p.normal_(std=0.05)
    samples = trainer.generate(trainer.sampler.next_batch())
    lengths = torch.tensor([12, 1, 5, 12, 3, 9, 2, 7])  # not in order: the groups regroup the rows
    samples.response_mask = (torch.arange(12) < lengths[:, None]).long()
    mask = samples.response_mask.bool()
    with torch.no_grad():
        whole = trainer.reference.logprobs(samples.input_ids, samples.attention_mask, samples.context_length,
                                           samples.response_ids, trainer.cfg.temperature)
        policy, _, values = trainer.model(samples.input_ids, samples.attention_mask, samples.context_length,
                                          samples.response_ids, trainer.cfg.temperature)
    grouped = trainer.reference_logprobs(samples)
    torch.testing.assert_close(grouped[mask], whole[mask], rtol=0, atol=1e-5)
    assert (grouped[~mask] == 0).all()
    grouped_policy, grouped_values = trainer.policy_logprobs_and_values(samples)
    torch.testing.assert_close(grouped_policy[mask], policy[mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(grouped_values[mask], values[mask], rtol=0, atol=1e-5)
    assert not torch.allclose(grouped[mask], grouped_policy[mask], atol=1e-3)  # the adapter is in play


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # no optimiser step is taken here
@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_every_schedule_warms_up_over_warmup_steps(small_run, schedule):
    from align.config import load_config
    from ppo.config import PPOConfig
    from ppo.trainer import PPOTrainer

    trainer = PPOTrainer(load_config(PPOConfig, None, [*small_run, f"lr_scheduler={schedule}", "warmup_steps=4",
                                                       "learning_rate=1e-3"]))
    trainer.setup()
    rates = []
    for _ in range(5):
        rates.append(trainer.scheduler.get_last_lr()[0])
        trainer.scheduler.step()
    assert rates[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # the first step already learns
    assert rates[4] == pytest.approx(1e-3, rel=0.2)  # the peak, then the schedule's own decay


def test_a_warm_up_as_long_as_the_run_is_refused(small_run):
    from align.config import load_config
    from align.errors import UserError
    from ppo.config import PPOConfig

    cfg = load_config(PPOConfig, None, small_run)
    steps = cfg.total_optimizer_steps
    assert load_config(PPOConfig, None, [*small_run, f"warmup_steps={steps - 1}"]).warmup_steps == steps - 1
    with pytest.raises(UserError, match=rf"warmup_steps \({steps}\) must be below the run's optimiser steps.* = {steps}"):
        load_config(PPOConfig, None, [*small_run, f"warmup_steps={steps}"])


def test_an_adaptive_kl_coefficient_starting_at_zero_is_refused(small_run):
    """The controller multiplies beta (Ziegler et al. 2019, 2.2): from 0 it never moves."""
    from align.config import load_config
    from align.errors import UserError
    from ppo.config import PPOConfig

    with pytest.raises(UserError, match="kl.coef=0 with kl.adaptive=true"):
        load_config(PPOConfig, None, [*small_run, "kl.coef=0", "kl.adaptive=true"])
    assert load_config(PPOConfig, None, [*small_run, "kl.coef=0", "kl.adaptive=false"]).kl.coef == 0


def test_a_minibatchs_gradient_over_its_micro_batches_is_that_of_its_loss_with_the_configured_coefficients(small_run):
    # One minibatch of 4 rows in micro-batches of 2 rows with responses of different lengths: the
    # accumulated gradient is that of the token-mean loss over the whole minibatch, with the
    # configured clip ranges and value coefficient (each micro-batch weighted by its share of tokens)
    from align.config import load_config
    from ppo import core
    from ppo.config import PPOConfig
    from ppo.optimise import optimise
    from ppo.trainer import PPOTrainer

    cfg = load_config(PPOConfig, None, [*small_run, "batch_size=4", "num_mini_batches=1", "gradient_accumulation_steps=2",
                                        "num_ppo_epochs=1", "clip_coef=0.1", "vf_clip_coef=0.05", "vf_coef=0.3",
                                        "max_grad_norm=1e9", "response_length=10"])
    trainer = PPOTrainer(cfg)
    trainer.setup()
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter (B = 0 at the start would leave A without a gradient)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    exp, _ = trainer.rollout(["Tell me about tea.", "Hi", "Can you explain the moon?", "Why?"])
    exp.response_mask[:] = 0
    for row, n in enumerate([10, 2, 7, 1]):  # micro-batches of 12 and 8 tokens, whichever rows pair up
        exp.response_mask[row, :n] = 1
    mask = exp.response_mask
    with torch.no_grad():
        new_logprobs, _, new_values = trainer.model(exp.input_ids, exp.attention_mask, exp.context_length,
                                                    exp.response_ids, cfg.temperature)
    # ratios 1.16 and values 0.1 away from the rollout's: both clip ranges decide the gradient
    exp.logprobs = core.zero_masked(new_logprobs - 0.15 * torch.sign(torch.randn_like(new_logprobs)), mask)
    exp.values = core.zero_masked(new_values + 0.1 * torch.sign(torch.randn_like(new_values)), mask)
    exp.advantages = core.zero_masked(torch.randn_like(new_values), mask)
    exp.returns = core.zero_masked(torch.randn_like(new_values), mask)
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    trainer.optimizer.zero_grad(set_to_none=True)
    logprobs, _, values = trainer.model(exp.input_ids, exp.attention_mask, exp.context_length, exp.response_ids,
                                        cfg.temperature)
    pg_loss, pg_stats = core.policy_loss(logprobs, exp.logprobs, exp.advantages, mask, 0.1)
    vf_loss, vf_stats = core.value_loss(values, exp.values, exp.returns, mask, 0.05)
    (pg_loss + 0.3 * vf_loss).backward()
    expected = [p.grad.clone() for p in params]
    assert pg_stats["clipfrac"] > 0 and vf_stats["clipfrac"] > 0  # the precondition: clipping matters

    accumulated = []
    trainer.optimizer.step = lambda: accumulated.extend(p.grad.clone() for p in params)  # read, not applied
    trainer.scheduler.step = lambda: None
    metrics = optimise(trainer, exp)
    assert len(accumulated) == len(params)
    for got, want in zip(accumulated, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert metrics["policy/loss"] == pytest.approx(pg_loss.item(), rel=1e-4)
    assert metrics["val/loss"] == pytest.approx(vf_loss.item(), rel=1e-4)
