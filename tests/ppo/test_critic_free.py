"""RLOO and GRPO as methods of the PPO stage: k samples per prompt, no value model, and one
iteration moves probability towards the responses the reward model prefers."""

from __future__ import annotations

import json

import pytest
import torch

from align.config import load_config
from align.errors import ConfigError
from ppo import core
from ppo.config import PPOConfig
from ppo.trainer import PPOTrainer, run_ppo
from tests.ppo.test_learning import HashScorer, record_optimise


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_one_iteration_raises_the_log_probability_of_responses_better_than_their_siblings(small_run, method):
    overrides = [o for o in small_run if not o.startswith(("batch_size=", "learning_rate="))]
    overrides += [f"method={method}", "samples_per_prompt=4", "batch_size=32", "learning_rate=1e-2",
                  "kl.coef=0.0", "kl.adaptive=false", "missing_eos_penalty=null"]
    trainer = PPOTrainer(load_config(PPOConfig, None, overrides), reward_model=HashScorer())
    trainer.setup()
    assert trainer.model.value_head is None and trainer.model.critic is None
    assert not list(trainer.model.value_parameters())
    seen = record_optimise(trainer)
    metrics = trainer.step()
    exp = seen["exp"]
    assert exp.values is None and exp.returns is None
    assert "val/loss" not in metrics and metrics["objective/kl"] == pytest.approx(0.0, abs=1e-3)

    # 8 prompts, each 4 times in a row
    prompts = exp.query_ids.view(8, 4, -1)
    assert (prompts == prompts[:, :1]).all()
    # every token of a response carries its sequence's advantage, computed within its group of 4
    expected = (core.rloo_advantages if method == "rloo" else core.grpo_advantages)(exp.scores, 4)
    torch.testing.assert_close(exp.advantages, core.broadcast_to_tokens(expected, exp.response_mask))

    new_logprobs, new_values = trainer.policy_logprobs_and_values(exp)
    assert new_values is None
    delta = ((new_logprobs - exp.logprobs) * exp.response_mask).sum(-1)
    above, below = expected > 0, expected < 0
    assert above.any() and below.any()
    assert delta[above].mean() > delta[below].mean() + 0.3, (delta[above].mean(), delta[below].mean())


def test_the_kl_penalty_is_in_the_reward_for_ppo_and_rloo_and_in_the_loss_for_grpo(small_run):
    def second_iteration(method):
        samples = [] if method == "ppo" else ["samples_per_prompt=2"]
        cfg = load_config(PPOConfig, None, [*small_run, f"method={method}", *samples, "kl.coef=0.5",
                                            "kl.adaptive=false", "num_iterations=2", "overwrite=true"])
        trainer = PPOTrainer(cfg, reward_model=HashScorer())
        trainer.setup()
        trainer.step()  # the adapter moves: the second rollout's policy differs from the reference
        seen = record_optimise(trainer)
        return trainer.step(), seen["exp"]

    metrics, exp = second_iteration("grpo")
    assert metrics["policy/kl_loss"] > 0  # k3 of a policy that moved is positive
    torch.testing.assert_close(exp.rewards.sum(-1), exp.scores)  # the score alone
    for method in ("rloo", "ppo"):  # the score minus beta times the sequence's KL estimate (Ziegler et al. 2019)
        metrics, exp = second_iteration(method)
        assert "policy/kl_loss" not in metrics
        torch.testing.assert_close(exp.rewards.sum(-1), exp.scores - 0.5 * exp.kl.sum(-1))
        assert exp.kl.abs().sum() > 0, method


@pytest.mark.parametrize("method", ["ppo", "rloo", "grpo"])
def test_the_logged_rlhf_reward_is_the_score_less_what_the_kl_costs_wherever_it_is_paid(small_run, method):
    # objective/non_score_reward is -beta * KL and objective/rlhf_reward the score plus it, for every
    # method: the KL-regularised objective, whether the KL is paid in the reward (PPO, RLOO) or the loss (GRPO)
    samples = [] if method == "ppo" else ["samples_per_prompt=2"]
    cfg = load_config(PPOConfig, None, [*small_run, f"method={method}", *samples, "kl.coef=0.5", "kl.adaptive=false",
                                        "num_iterations=2", "overwrite=true", "missing_eos_penalty=1.5"])
    trainer = PPOTrainer(cfg, reward_model=HashScorer())
    trainer.setup()
    first = trainer.step()
    assert first["train/lr"] == cfg.learning_rate  # linear decay, no warm-up: the first step's rate is the peak
    seen = record_optimise(trainer)
    metrics = trainer.step()  # the policy moved: a KL to pay
    assert abs(metrics["objective/kl"]) > 1e-4  # (k1 of one batch may be negative)
    # the KL of a sequence is its tokens' summed, averaged over the batch's sequences
    per_sequence = core.zero_masked(seen["exp"].kl, seen["exp"].response_mask).sum(-1)
    assert metrics["objective/kl"] == pytest.approx(per_sequence.mean().item(), rel=1e-5)
    assert metrics["objective/non_score_reward"] == pytest.approx(-0.5 * metrics["objective/kl"], rel=1e-5)
    assert metrics["objective/rlhf_reward"] == pytest.approx(
        metrics["objective/scores"] + metrics["objective/non_score_reward"], rel=1e-5, abs=1e-6)
    # objective/scores is after the missing-eos penalty; the reward model's own score is logged beside it
    assert metrics["response/eos_rate"] < 1  # the precondition: 8 new tokens leave responses without an eos
    assert metrics["objective/reward_model_score"] == pytest.approx(
        metrics["objective/scores"] + 1.5 * (1 - metrics["response/eos_rate"]), rel=1e-5, abs=1e-6)


def test_a_critic_free_run_writes_the_policy_and_no_value_head(small_run, tmp_path):
    cfg = load_config(PPOConfig, None, [*small_run, "method=grpo", "samples_per_prompt=2", "num_iterations=2",
                                        "save_every=1"])
    summary = run_ppo(cfg, reward_model=HashScorer())
    run = tmp_path / "run"
    assert (run / "policy" / "adapter_config.json").exists()
    assert not (run / "value_head.safetensors").exists()
    assert summary["iteration"] == 2 and "eval/kl" in summary
    from align.commands.export import export_run

    out = export_run(run, tmp_path / "export")
    assert (out / "model.safetensors").exists() and "## GRPO settings" in (out / "README.md").read_text()


def test_overwriting_an_earlier_run_removes_its_outputs_and_keeps_other_files(small_run, tmp_path):
    # a PPO run's value head, samples and summary left in the directory would pass for this critic-free
    # run's, which writes none of them (no evaluation asked); a file of the user's stays
    run = tmp_path / "run"
    (run / "policy").mkdir(parents=True)
    for name in ("value_head.safetensors", "samples.jsonl", "summary.json", "reward.png", "notes.txt"):
        (run / name).write_text("an earlier run's")
    (run / "config.yaml").write_text("seed: 1\n")  # (every run writes its config first)
    cfg = load_config(PPOConfig, None, [*small_run, "method=grpo", "samples_per_prompt=2", "num_iterations=1",
                                        "num_eval_prompts=0", "overwrite=true"])
    run_ppo(cfg, reward_model=HashScorer())
    assert not (run / "value_head.safetensors").exists() and not (run / "samples.jsonl").exists()
    assert (run / "policy" / "adapter_config.json").exists()
    assert "eval/kl" not in json.loads((run / "summary.json").read_text())
    assert (run / "reward.png").read_bytes() != b"an earlier run's"
    assert (run / "notes.txt").read_text() == "an earlier run's"


def test_settings_only_ppo_reads_are_said_to_be_unused_by_a_critic_free_run(small_run, tmp_path, caplog):
    value_model_settings = ["vf_coef=0.5", "gae_lambda=0.5", "whiten_advantages=false"]
    cfg = load_config(PPOConfig, None, [*small_run, "method=rloo", "samples_per_prompt=2", "num_iterations=1",
                                        "num_eval_prompts=0", *value_model_settings])
    with caplog.at_level("WARNING", logger="align"):
        run_ppo(cfg, reward_model=HashScorer())
    assert [r.getMessage() for r in caplog.records if "does not read" in r.getMessage()] == [
        "vf_coef=0.5, gae_lambda=0.5, whiten_advantages=false: method=ppo's settings, which method=rloo (no value "
        "model, no GAE) does not read"]
    assert load_config(PPOConfig, None, [*small_run, *value_model_settings]).unused_settings() == []  # PPO reads them
    assert load_config(PPOConfig, "configs/demo/ppo.yaml", ["method=rloo", "samples_per_prompt=4"]).unused_settings() \
        == []  # PPO's config with its defaults spelled out, run as RLOO: nothing to say


class ConstantScorer:
    """0 for every response."""

    def score(self, prompts, responses, batch_size=64):
        return torch.zeros(len(responses))


def test_prompts_whose_samples_all_scored_alike_are_counted_and_a_batch_of_only_those_is_said_once(small_run, caplog):
    cfg = load_config(PPOConfig, None, [*small_run, "method=grpo", "samples_per_prompt=2", "num_iterations=2",
                                        "num_eval_prompts=0"])
    trainer = PPOTrainer(cfg, reward_model=ConstantScorer())
    trainer.setup()
    with caplog.at_level("WARNING", logger="align"):
        metrics = [trainer.step() for _ in range(2)]
    assert [m["objective/frac_reward_zero_std"] for m in metrics] == [1.0, 1.0]
    assert all(m["policy/loss"] == 0 for m in metrics)  # every advantage 0, and no KL yet to pull on
    said = [r.getMessage() for r in caplog.records if "got one reward" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("iteration 1: each prompt's 2 samples got one reward")

    # otherwise the fraction of the batch's prompts, from the rewards the advantages are built from
    trainer = PPOTrainer(load_config(PPOConfig, None, [*small_run, "method=grpo", "samples_per_prompt=2",
                                                       "overwrite=true"]), reward_model=HashScorer())
    trainer.setup()
    seen = record_optimise(trainer)
    metric = trainer.step()["objective/frac_reward_zero_std"]
    assert metric == pytest.approx(core.frac_zero_spread(seen["exp"].scores, 2).item())


@pytest.mark.parametrize("overrides, message", [
    (["method=rloo"], "samples_per_prompt >= 2"),
    (["method=grpo", "samples_per_prompt=2", "value_model=reward_model"], "trains no value model, so "
     "value_model=reward_model .* does not apply: set value_model=policy_trunk, start from configs/real/grpo.yaml"),
    (["samples_per_prompt=3"], "divisible by samples_per_prompt"),
    (["method=reinforce"], "method"),
])
def test_bad_method_settings_are_one_clear_line(small_run, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PPOConfig, None, [*small_run, *overrides])


def test_a_ppo_run_writes_its_outputs_readable_as_a_plain_open_would(small_run, tmp_path, umask):
    # the value head is written by safetensors (0600) beside the policy: both readable by a serving account
    from tests.conftest import modes

    umask(0o022)
    cfg = load_config(PPOConfig, None, [*small_run, "num_iterations=1", "num_eval_prompts=0", "overwrite=true"])
    run_ppo(cfg, reward_model=HashScorer())
    run = tmp_path / "run"
    assert (run / "value_head.safetensors").stat().st_mode & 0o777 == 0o644
    assert set(modes(run / "policy").values()) <= {0o755, 0o644}
