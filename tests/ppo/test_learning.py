"""One PPO iteration moves probability towards the responses the reward model prefers."""

from __future__ import annotations

import hashlib

import pytest
import torch

from align.config import load_config
from ppo.config import PPOConfig
from ppo.trainer import PPOTrainer


class HashScorer:
    """+1 or -1 per response text, fixed but arbitrary: nothing but PPO can make it go up."""

    def score(self, prompts, responses, batch_size=64):
        return torch.tensor([1.0 if hashlib.sha256(r.encode()).digest()[0] % 2 else -1.0 for r in responses])


def record_optimise(trainer: PPOTrainer) -> dict:
    """After `trainer.step()`, the returned dict's "exp" is the Experience that step optimised on."""
    seen = {}
    optimise = trainer.optimise

    def recording(exp):
        seen["exp"] = exp
        return optimise(exp)

    trainer.optimise = recording
    return seen


def test_one_iteration_raises_the_log_probability_of_well_scored_responses(small_run):
    overrides = [o for o in small_run if not o.startswith(("batch_size=", "learning_rate="))]
    overrides += ["batch_size=32", "learning_rate=1e-2", "value_lr_scale=1", "kl.coef=0.0", "kl.adaptive=false",
                  "missing_eos_penalty=null"]
    trainer = PPOTrainer(load_config(PPOConfig, None, overrides), reward_model=HashScorer())
    trainer.setup()
    seen = record_optimise(trainer)
    metrics = trainer.step()
    exp = seen["exp"]
    assert abs(metrics["objective/kl"]) < 1e-3  # the rollout policy is the SFT model (LoRA B starts at 0)

    new_logprobs, new_values = trainer.policy_logprobs_and_values(exp)
    mask = exp.response_mask.float()
    delta = ((new_logprobs - exp.logprobs) * mask).sum(-1)  # change of log pi(response) per episode
    good, bad = exp.scores > 0, exp.scores < 0
    assert good.any() and bad.any()
    assert delta[good].mean() > delta[bad].mean() + 0.3, (delta[good].mean(), delta[bad].mean())
    # the value head moved towards the returns it was fitted to on this batch (from V = 0); at
    # the policy's own rate, since 10x of this test's high rate overshoots in one iteration
    def value_error(values):
        return (((values - exp.returns) ** 2) * mask).sum() / mask.sum()

    assert value_error(new_values) < value_error(exp.values), (value_error(new_values), value_error(exp.values))


def test_minibatch_gradient_does_not_depend_on_its_micro_batches(small_run):
    # The loss is a token mean over the minibatch, so accumulating 4 micro-batches (grouped by
    # length) gives the gradient of one pass over all 8 episodes. The responses are given lengths
    # 1..8 here (not left to sampling), so per-micro-batch means would weight their tokens differently.
    overrides = [o for o in small_run if not o.startswith("response_length=")]
    overrides += ["response_length=8", "batch_size=8", "num_mini_batches=1", "gradient_accumulation_steps=1",
                  "num_ppo_epochs=1", "max_grad_norm=1e9"]
    trainer = PPOTrainer(load_config(PPOConfig, None, overrides), reward_model=HashScorer())
    trainer.setup()
    captured = {}
    optimise = trainer.optimise
    trainer.optimise = lambda exp: captured.setdefault("exp", exp) and {}
    trainer.step()  # rollout, scores, KL rewards and advantages of a real iteration
    exp = captured["exp"]
    width = 8
    for name in ("response_ids", "response_mask", "logprobs", "ref_logprobs", "values", "kl", "rewards",
                 "advantages", "returns"):  # a batch that ended early: widen it to 8 columns
        value = getattr(exp, name)
        setattr(exp, name, torch.nn.functional.pad(value, (0, width - value.shape[1])))
    lengths = torch.tensor([3, 8, 1, 6, 2, 7, 5, 4])
    exp.response_mask = (torch.arange(width) < lengths[:, None]).long()

    grads: dict[str, dict[str, torch.Tensor]] = {}
    for accumulation in (1, 4):
        trainer.cfg.gradient_accumulation_steps = accumulation
        trainer.batch = trainer.cfg.batch_shape(1)  # the micro-batch size the optimisation reads
        assert trainer.batch.micro_batch == trainer.batch.mini_batch // accumulation

        def recording_step(*args, key=accumulation, **kwargs):  # record the first gradient; weights stay put
            grads[key] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

        trainer.optimizer.step = recording_step
        torch.manual_seed(0)  # the same minibatch order
        optimise(exp)
    whole, accumulated = grads[1], grads[4]
    assert whole.keys() == accumulated.keys() and any("lora_" in n for n in whole)
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], atol=1e-6, rtol=1e-4, msg=name)


class NaNScorer:
    """A reward model gone wrong: every score NaN."""

    def score(self, prompts, responses, batch_size=64):
        return torch.full((len(responses),), float("nan"))


def test_a_non_finite_gradient_stops_the_run_before_it_is_applied(small_run):
    from align.errors import TrainingDiverged

    trainer = PPOTrainer(load_config(PPOConfig, None, small_run), reward_model=NaNScorer())
    trainer.setup()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(TrainingDiverged, match=r"iteration 1, epoch 1, minibatch 1: the gradient norm is nan"):
        trainer.step()
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_a_policy_that_overflowed_stops_the_rollout_naming_the_iteration(small_run):
    # an update that left the weights finite but the logits not (a learning rate far too high): the
    # next rollout stops with the iteration and the hint, as the gradient guard does (exit 3, no traceback)
    from align.errors import TrainingDiverged

    trainer = PPOTrainer(load_config(PPOConfig, None, small_run), reward_model=NaNScorer())
    trainer.setup()
    trainer.iteration = 4
    with torch.no_grad():
        trainer.model.lm_head.linear.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match=r"^iteration 5: the policy produced non-finite logits while sampling .*"
                                               r"lower the learning rate"):
        trainer.step()
    trainer.iteration = 0  # before any update, the learning rate is not the cause: the checkpoint is
    with pytest.raises(TrainingDiverged, match=r"^iteration 1: .*non-finite logits while sampling before any update: "
                                               r"the SFT checkpoint itself gives them in dtype=float32 \(its weights hold NaN or inf\?\)"):
        trainer.step()
