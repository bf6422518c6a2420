"""bf16 storage with fp32 trained weights, and gradient checkpointing, on the CPU."""

from __future__ import annotations

import math

import pytest
import torch

from align.config import load_config
from ppo.config import PPOConfig
from ppo.trainer import PPOTrainer


def _trainer(overrides: list[str]) -> PPOTrainer:
    trainer = PPOTrainer(load_config(PPOConfig, None, overrides))
    trainer.setup()
    return trainer


@pytest.mark.parametrize("value_model", ["policy_trunk", "reward_model"])
def test_bf16_keeps_adapter_value_head_and_critic_fp32_and_trains_them(small_run, value_model):
    trainer = _trainer([*small_run, "dtype=bfloat16", f"value_model={value_model}", "num_iterations=1",
                        "num_eval_prompts=0"])
    named = dict(trainer.model.named_parameters())
    trained = {n for n, p in named.items() if p.requires_grad}
    assert {named[n].dtype for n in trained} == {torch.float32}  # no update rounds away
    assert {p.dtype for n, p in named.items() if n not in trained} == {torch.bfloat16}
    assert {s["params"][0].dtype for s in trainer.optimizer.state.values()} <= {torch.float32}
    if value_model == "reward_model":
        assert next(trainer.reward_model.model.parameters()).dtype == torch.bfloat16  # the scorer: bf16
        assert trainer.model.critic.compute_dtype == torch.bfloat16
    before = {n: named[n].detach().clone() for n in trained}
    summary = trainer.train()
    changed = {n for n in trained if not torch.equal(named[n], before[n])}
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    assert any(n.startswith(("value_head.", "critic.")) for n in changed)
    assert all(math.isfinite(v) for v in summary.values() if isinstance(v, float))
    for state in trainer.optimizer.state.values():
        assert state["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("value_model", ["policy_trunk", "reward_model"])
def test_gradient_checkpointing_recomputes_the_layers_and_gives_the_same_gradient(small_run, value_model,
                                                                                   monkeypatch):
    from align.precision import enable_gradient_checkpointing

    trainer = _trainer([*small_run, f"value_model={value_model}", "num_iterations=1", "num_eval_prompts=0"])
    captured = {}
    monkeypatch.setattr(trainer, "optimise", lambda exp: captured.setdefault("exp", exp) and {})
    trainer.step()  # rollout, score, rewards, advantages: the experience one micro-step trains on
    mb = captured["exp"].select(slice(0, 4)).trim_padding()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    layer = trainer.model.trunk.layers[0]
    calls = []
    # a pre-hook inside the layer (its own hooks stay outside the checkpoint; the recompute stops early)
    layer.mlp.register_forward_pre_hook(lambda *args: calls.append(1))

    def grads() -> list[torch.Tensor]:
        trainer.optimizer.zero_grad(set_to_none=True)
        calls.clear()
        trainer.micro_step(mb, torch.tensor(1.0))
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]

    plain = grads()
    assert len(calls) == 1
    trainer.checkpointed = enable_gradient_checkpointing(trainer.model.policy.get_base_model())
    if trainer.model.critic is not None:
        trainer.checkpointed += enable_gradient_checkpointing(trainer.model.critic.trunk)
    checkpointed = grads()
    assert len(calls) == 2  # the layer ran again in the backward
    assert not layer.training and not any(m.training for m in layer.modules() if m is not layer)  # eval again
    assert any(g.abs().sum() > 0 for g in plain)
    for a, b in zip(checkpointed, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_evaluation_measures_no_kl_before_the_adapter_moves(small_run, monkeypatch):
    # lora_B = 0 after setup: the policy is the reference, so the KL evaluate reports must be 0 up to
    # rounding. On a GPU the bf16 cached decoding's log-probs differ from a full forward's (other
    # kernels for other shapes); on the CPU they agree, so the sampler here is made as inexact.
    from ppo.evaluation import evaluate

    trainer = _trainer([*small_run, "dtype=bfloat16", "num_eval_prompts=8", "response_length=12"])
    sample = trainer.generate

    def inexact(prompts, adapter=True):
        samples = sample(prompts, adapter)
        samples.logprobs = samples.logprobs + 0.01 * samples.response_mask
        return samples

    monkeypatch.setattr(trainer, "generate", inexact)
    metrics, _ = evaluate(trainer, trainer.eval_prompts, batch_size=8, seed=0)
    assert abs(metrics["eval/kl"]) < 1e-3, metrics["eval/kl"]


def test_evaluation_counts_its_samples_and_the_distinct_prompts_among_them(small_run):
    # a small held-out pool is drawn again: 3 prompts, each sampled twice, are 6 samples of 3 prompts
    from ppo.evaluation import evaluate

    trainer = _trainer([*small_run, "response_length=4"])
    prompts = ["Hi", [{"role": "user", "content": "Tell me a story."}], "Why?"] * 2
    metrics, samples = evaluate(trainer, prompts, batch_size=8, seed=0)
    assert (metrics["eval/num_prompts"], len(samples)) == (6, 6)
    assert metrics["eval/distinct_prompts"] == 3


def test_the_evaluations_kl_is_each_samples_summed_unbounded_estimate_averaged_over_samples(small_run, monkeypatch):
    # log pi - log pi_ref = 12 at every real token: k3 = e^-12 - 1 + 12 = 11.0000061 a token, past the
    # bound of 10 the training penalty takes (a measurement must not read low); a sample's KL is its
    # tokens' summed, the evaluation's the mean over samples
    import math

    from ppo.evaluation import evaluate

    trainer = _trainer([*small_run, "response_length=6"])
    lengths = []
    generate = trainer.generate

    def recording(prompts, adapter=True):
        samples = generate(prompts, adapter)
        if adapter:
            lengths.extend(samples.response_mask.sum(-1).tolist())
        return samples

    monkeypatch.setattr(trainer, "generate", recording)
    monkeypatch.setattr(trainer, "reference_logprobs", lambda samples: torch.zeros(samples.response_ids.shape))
    monkeypatch.setattr(trainer, "sampled_logprobs", lambda samples: torch.full(samples.response_ids.shape, 12.0))
    metrics, _ = evaluate(trainer, ["Hi", "Why?", "Tell me a story.", "Ok"], batch_size=2, seed=0, kl_estimator="k3")
    per_token = math.expm1(-12.0) + 12.0
    assert len(lengths) == 4 and len(set(lengths)) > 1  # the precondition: samples of different lengths
    assert metrics["eval/kl"] == pytest.approx(sum(per_token * n for n in lengths) / 4, rel=1e-5)
