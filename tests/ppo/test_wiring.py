"""The trainer's wiring of ppo.core: one real iteration of the small run, and each quantity the step
hands on (scores, rewards, advantages, returns, the losses' gradients, the learning rate, beta)
checked against the core function or the formula it should come from, on the step's own tensors."""

from __future__ import annotations

import pytest
import torch

from align.config import load_config
from ppo import core
from ppo.config import PPOConfig
from ppo.trainer import PPOTrainer
from tests.ppo.test_learning import HashScorer, record_optimise


class ConstantScorer:
    """The same score for every response: the critic-free advantages are then exactly 0."""

    def __init__(self, value: float = 1.0):
        self.value = value

    def score(self, prompts, responses, batch_size=64):
        return torch.full((len(responses),), self.value)


class RecordingScorer(HashScorer):
    """HashScorer that keeps the scores it returned last."""

    def score(self, prompts, responses, batch_size=64):
        self.last = super().score(prompts, responses, batch_size)
        return self.last.clone()


def make_trainer(small_run, *overrides, scorer=None) -> PPOTrainer:
    trainer = PPOTrainer(load_config(PPOConfig, None, [*small_run, *overrides]),
                         reward_model=scorer if scorer is not None else HashScorer())
    trainer.setup()
    return trainer


def perturb(trainer: PPOTrainer, *, adapter: bool = False, value_head: bool = False) -> None:
    """Random (seeded) weights where the trainer starts from zeros: LoRA B (the policy then differs
    from the reference) and the value head (V != 0)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if (adapter and "lora_B" in name) or (value_head and name.startswith("value_head.")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def one_step(trainer: PPOTrainer):
    """(metrics, the Experience the step optimised on) of one trainer.step()."""
    seen = record_optimise(trainer)
    metrics = trainer.step()
    return metrics, seen["exp"]


def raw_rewards(trainer: PPOTrainer, exp) -> torch.Tensor:
    """-beta * KL at every token plus the score at the last one (Ziegler et al. 2019, eq. 2), beta as the step used it."""
    return core.compute_rewards(exp.kl, exp.scores, trainer.cfg.kl.coef, exp.response_mask)[0]


def assert_differ(a: torch.Tensor, b: torch.Tensor) -> None:
    assert not torch.allclose(a, b, rtol=1e-3, atol=1e-4), "the test's setting cannot tell the two apart"


PPO_GAE = ["gamma=0.9", "gae_lambda=0.5", "kl.adaptive=false", "num_ppo_epochs=1", "num_mini_batches=1",
           "gradient_accumulation_steps=1"]


@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_ppo_advantages_and_returns_are_gae_with_gamma_and_lambda_in_their_places(small_run, whiten_rewards):
    trainer = make_trainer(small_run, *PPO_GAE, f"whiten_rewards={str(whiten_rewards).lower()}")
    perturb(trainer, value_head=True)  # V != 0: gamma * V_{t+1} tells gamma from lambda
    _, exp = one_step(trainer)
    mask = exp.response_mask
    assert exp.values.abs().sum() > 0

    rewards = raw_rewards(trainer, exp)
    if whiten_rewards:  # scaled to unit variance, mean kept (Huang et al. 2024: shift_mean=False)
        whitened = core.masked_whiten(rewards, mask, shift_mean=False)
        assert_differ(whitened, core.masked_whiten(rewards, mask))  # the scores' mean is not 0
        torch.testing.assert_close(core.masked_mean(exp.rewards, mask), core.masked_mean(rewards, mask))
        rewards = whitened
    torch.testing.assert_close(exp.rewards, rewards)

    advantages, returns = core.gae(rewards, exp.values, mask, 0.9, 0.5)  # gamma 0.9, lambda 0.5
    assert_differ(returns, core.gae(rewards, exp.values, mask, 0.5, 0.9)[1])
    torch.testing.assert_close(exp.returns, returns)  # the value targets: not whitened
    torch.testing.assert_close(exp.advantages, core.masked_whiten(advantages, mask))


def test_the_value_loss_targets_the_returns(small_run):
    # one epoch of one minibatch: its forward sees the rollout's weights, so V = V_old (nothing clipped)
    # and the logged value loss is 0.5 * mean((V_old - returns)^2) over the response tokens
    trainer = make_trainer(small_run, *PPO_GAE)
    perturb(trainer, value_head=True)
    metrics, exp = one_step(trainer)
    mask = exp.response_mask

    def half_mse(target):
        return 0.5 * core.masked_mean((exp.values - target) ** 2, mask).item()

    assert half_mse(exp.advantages) != pytest.approx(half_mse(exp.returns), rel=1e-2)
    assert metrics["val/loss"] == pytest.approx(half_mse(exp.returns), rel=1e-4, abs=1e-7)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
@pytest.mark.parametrize("kl_coef, ent_coef", [(0.5, 0.0), (0.0, 0.1)], ids=["kl", "entropy"])
def test_grpo_gradient_is_that_of_beta_kl_to_the_reference_less_the_entropy_bonus(small_run, kl_coef, ent_coef):
    # Every response scores the same: the group advantages and the surrogate's gradient are exactly 0,
    # so the adapter's gradient is that of beta * mean_t k3(pi || pi_ref) - ent_coef * mean_t H(pi)
    # (Shao et al. 2024, eq. 3-4) over the minibatch's response tokens, taken from the current policy.
    trainer = make_trainer(small_run, "method=grpo", "samples_per_prompt=2", "missing_eos_penalty=null",
                           f"kl.coef={kl_coef}", "kl.adaptive=false", f"ent_coef={ent_coef}", "num_ppo_epochs=1",
                           "num_mini_batches=1", "gradient_accumulation_steps=1", "max_grad_norm=1e9",
                           scorer=ConstantScorer())
    perturb(trainer, adapter=True)  # a policy away from the reference: a KL to pull back
    grads = {}

    def recording_step(*args, **kwargs):  # the gradient the optimiser would apply; the weights stay put
        grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})

    trainer.optimizer.step = recording_step
    metrics, exp = one_step(trainer)
    assert (exp.advantages == 0).all()

    cfg, mask = trainer.cfg, exp.response_mask
    trainer.model.zero_grad(set_to_none=True)
    input_ids, attention_mask, start = exp.right_padded()
    logp, entropy, _ = trainer.model(input_ids, attention_mask, start, exp.response_ids, cfg.temperature,
                                     cfg.logprob_chunk_tokens, with_entropy=True)
    log_r = (exp.ref_logprobs - logp) * mask  # r = pi_ref / pi
    k3 = torch.expm1(log_r) - log_r
    loss = kl_coef * core.masked_mean(k3, mask) - ent_coef * core.masked_mean(entropy, mask)
    loss.backward()
    expected = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert expected.keys() == grads.keys() and any("lora_A" in n for n in expected)
    scale = max(g.abs().max() for g in expected.values())
    assert scale > 0
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-4 * scale, msg=lambda m, name=name: f"{name}: {m}")


def test_rloo_advantages_come_from_the_kl_penalised_sequence_reward(small_run):
    # RLOO pays the KL in its reward (Ahmadian et al. 2024): each response's reward is its score less
    # beta times its summed KL estimate, and its baseline the other samples' such rewards
    trainer = make_trainer(small_run, "method=rloo", "samples_per_prompt=2", "kl.coef=0.5", "kl.adaptive=false")
    perturb(trainer, adapter=True)  # the rollout's policy is not the reference: KL != 0
    _, exp = one_step(trainer)
    rewards = exp.scores - 0.5 * exp.kl.sum(-1)
    expected = core.rloo_advantages(rewards, 2)
    assert_differ(expected, core.rloo_advantages(exp.scores, 2))
    torch.testing.assert_close(exp.advantages, core.broadcast_to_tokens(expected, exp.response_mask))


def test_a_response_without_eos_loses_the_missing_eos_penalty(small_run):
    scorer = RecordingScorer()
    trainer = make_trainer(small_run, "missing_eos_penalty=0.75", scorer=scorer)
    _, exp = one_step(trainer)
    has_eos = (exp.response_ids == trainer.tokenizer.eos_token_id).any(-1)
    assert (~has_eos).any()  # 8 tokens of a random model: most responses never end
    expected = scorer.last - 0.75 * (~has_eos).float()
    torch.testing.assert_close(exp.scores, expected)


def test_an_eos_in_the_last_column_ends_its_response_and_escapes_the_penalty(small_run):
    # every response fills its 8 columns: the first ends with the eos in its last one, the second has none
    scorer = RecordingScorer()
    trainer = make_trainer(small_run, "missing_eos_penalty=0.75", scorer=scorer)
    eos, generate = trainer.tokenizer.eos_token_id, trainer.generate

    def full_rows(prompts, adapter=True):
        samples = generate(prompts, adapter)
        ids = samples.response_ids
        ids[ids == eos] = eos + 1  # no eos anywhere ...
        ids[0, -1] = eos  # ... but at the end of the first row
        samples.response_mask[:] = 1
        return samples

    trainer.generate = full_rows
    _, exp = one_step(trainer)
    assert exp.response_mask[:2].all() and exp.response_ids[0, -1] == eos
    torch.testing.assert_close(exp.scores[:2], scorer.last[:2] - torch.tensor([0.0, 0.75]))


def test_the_learning_rate_decays_linearly_once_per_optimiser_step(small_run):
    # 3 iterations x 2 epochs x 2 minibatches = 12 optimiser steps, no warm-up: after an iteration's 4
    # the rate is (1 - 4/12) of its peak, the value head's value_lr_scale times higher
    trainer = make_trainer(small_run, "lr_scheduler=linear", "warmup_steps=0")
    cfg = trainer.cfg
    steps = cfg.num_ppo_epochs * cfg.num_mini_batches  # optimiser steps per iteration
    total = cfg.num_iterations * steps
    assert (steps, total) == (4, 12)
    first = trainer.step()
    assert first["train/lr"] == pytest.approx(cfg.learning_rate)
    decayed = cfg.learning_rate * (1 - steps / total)
    policy_group, value_group = trainer.optimizer.param_groups
    assert policy_group["lr"] == pytest.approx(decayed)
    assert value_group["lr"] == pytest.approx(decayed * cfg.value_lr_scale)
    assert trainer.step()["train/lr"] == pytest.approx(decayed)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.learning_rate * (1 - 2 * steps / total))


def test_the_adaptive_kl_controller_counts_every_response_of_the_batch(small_run):
    # batch_size counts responses (8 = 4 prompts x 2 samples): beta <- beta * (1 + e * 8 / horizon),
    # e = clip(KL / target - 1, -0.2, 0.2) (Ziegler et al. 2019, section 2.2)
    trainer = make_trainer(small_run, "method=rloo", "samples_per_prompt=2", "kl.adaptive=true", "kl.coef=0.1",
                           "kl.target=6", "kl.horizon=16")
    metrics = trainer.step()
    assert metrics["objective/kl_coef"] == 0.1  # the step's beta, before the update
    error = min(max(metrics["objective/kl"] / 6 - 1, -0.2), 0.2)
    assert error != 0
    assert trainer.kl_ctl.value == pytest.approx(0.1 * (1 + error * 8 / 16), rel=1e-9)
