"""`align dpo` on a tiny random model: the adapter learns the rankings, the base stays frozen,
gradient checkpointing takes the same step while keeping less, the run directory exports like a PPO
run, and bad rankings are reported in one line."""

from __future__ import annotations

import math

import pytest
import torch

from align.config import load_config
from align.errors import ConfigError
from align.exports import write_kwise
from align.formats import Ranking
from align.run import read_metrics
from dpo.config import DPOConfig
from dpo.data import collate
from dpo.losses import implicit_rewards, plackett_luce_nll
from dpo.model import response_logprobs
from dpo.train import DPOTrainer
from tests.cli_in_process import run_align_in_process


@torch.no_grad()
def mean_train_nll(trainer: DPOTrainer) -> float:
    """The Plackett-Luce NLL of every training ranking under the current policy, averaged."""
    data = trainer.train_set
    batch = collate(data, range(len(data)))
    logps = response_logprobs(trainer.policy, batch.responses, 1)
    rewards = batch.per_ranking(implicit_rewards(logps, batch.reference_logps, trainer.cfg.beta))
    return plackett_luce_nll(rewards, batch.ranks, batch.valid).mean().item()


@pytest.mark.parametrize("loss", ["kwise", "pairwise"])
def test_training_raises_the_likelihood_of_the_rankings_and_moves_only_the_adapter(small_dpo_run, loss):
    trainer = DPOTrainer(load_config(DPOConfig, None, [*small_dpo_run, f"loss={loss}", "epochs=4",
                                                       "num_eval_prompts=0"]), echo=lambda _: None)
    trainer.setup()
    examples = trainer.train_set.rankings
    if loss == "kwise":  # each ranking whole (data.k = 3)
        assert len(examples) == trainer.num_train_rankings and {len(r.responses) for r in examples} == {3}
    else:  # each ordered pair of a ranking its own K = 2 example: 2 or 3 from each ranking of 3 responses
        assert {len(r.responses) for r in examples} == {2} and {tuple(r.ranks) for r in examples} == {(0, 1)}
        assert 2 * trainer.num_train_rankings <= len(examples) <= 3 * trainer.num_train_rankings
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    assert all(("lora_" in n) == p.requires_grad for n, p in trainer.policy.named_parameters())
    nll_before = mean_train_nll(trainer)
    trainer.train()
    nll_after = mean_train_nll(trainer)
    assert nll_after < nll_before - 0.05, (nll_before, nll_after)  # policy = reference at the start
    changed = {n for n, p in trainer.policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    with trainer.policy.disable_adapter():  # the reference is untouched: its log-probs are still the cached ones
        batch = collate(trainer.train_set, range(4))
        # (sums over ~100 tokens of a random model, ~1e3: float rounding of another padding layout)
        torch.testing.assert_close(response_logprobs(trainer.policy, batch.responses, 1), batch.reference_logps,
                                   atol=1e-4, rtol=1e-5)


def test_a_non_finite_gradient_stops_the_run_before_it_is_applied(small_dpo_run):
    from align.errors import TrainingDiverged

    trainer = DPOTrainer(load_config(DPOConfig, None, [*small_dpo_run, "num_eval_prompts=0"]), echo=lambda _: None)
    trainer.setup()
    lora_a = next(p for n, p in trainer.policy.named_parameters() if "lora_A" in n)
    with torch.no_grad():
        lora_a[0, 0] = float("nan")  # every response's log-prob, the loss and the gradient become NaN
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    with pytest.raises(TrainingDiverged, match=r"^step 1: the gradient norm is nan .*the update was not applied"):
        trainer.train()
    after = dict(trainer.policy.named_parameters())  # unchanged, the one NaN included
    assert all(torch.equal(after[n].nan_to_num(), p.nan_to_num()) for n, p in before.items())
    assert trainer.step_count == 0


def test_responses_sharing_a_prompt_get_the_log_probs_of_their_whole_sequences(small_dpo_run):
    trainer = DPOTrainer(load_config(DPOConfig, None, small_dpo_run), echo=lambda _: None)
    trainer.setup()
    batch = collate(trainer.train_set, range(3))
    shared = response_logprobs(trainer.policy, batch.responses, 2)
    # the plain computation: each whole sequence through the model, log-softmax of the logits
    for n, sequence in enumerate(batch.responses.full_sequences()):
        prompt_len = int(batch.responses.prompt_mask[batch.responses.prompt_index[n]].sum())
        ids = torch.tensor([sequence])
        logits = trainer.policy(input_ids=ids).logits[0, prompt_len - 1: -1]
        expected = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, prompt_len:, None]).sum()
        torch.testing.assert_close(shared[n], expected, atol=1e-4, rtol=1e-5)


def saved_for_backward_bytes(step) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward while `step()` runs (the
    layers' recomputed ones under gradient checkpointing go through torch's own hooks, not these)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def test_a_step_logs_the_margin_accuracy_and_movement_of_its_own_implicit_rewards(small_dpo_run, tmp_path,
                                                                                 monkeypatch):
    """A step's statistics recomputed from the implicit rewards it trained on, with a policy away from
    the reference: the mean margin of the better response over the worse in every stated pair (a tie
    states none), the share of those pairs ordered right, and log pi - log pi_ref per response."""
    import dpo.train as dpo_train
    from align.synthetic import make_rankings

    seen = []
    nll = dpo_train.plackett_luce_nll

    def recording(rewards, ranks, valid):
        seen.append((rewards.detach().clone(), ranks.clone(), valid.clone()))
        return nll(rewards, ranks, valid)

    monkeypatch.setattr(dpo_train, "plackett_luce_nll", recording)
    rankings = make_rankings(40, k=3, seed=1)
    for ranking in rankings[::2]:  # every other ranking ties its two worst responses
        ranking.ranks = [min(rank, 1) for rank in ranking.ranks]
    write_kwise(rankings, tmp_path / "tied.jsonl")
    trainer = DPOTrainer(load_config(DPOConfig, None, [*small_dpo_run, "num_eval_prompts=0", "overwrite=true",
                                                       "beta=0.5", "data.format=kwise",
                                                       f"data.path={tmp_path / 'tied.jsonl'}"]), echo=lambda _: None)
    trainer.setup()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at 0, where every implicit reward is 0
        for name, p in trainer.policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    metrics = trainer.step(trainer.local_batches(trainer.global_batches[0]))
    margins, moved, responses, tied = [], 0.0, 0, 0
    for rewards, ranks, valid in seen:
        for r in range(len(ranks)):
            k = [i for i in range(ranks.shape[1]) if valid[r, i]]
            tied += len({int(ranks[r, i]) for i in k}) < len(k)
            margins += [float(rewards[r, i] - rewards[r, j]) for i in k for j in k if ranks[r, i] < ranks[r, j]]
            moved += float(sum(rewards[r, i] for i in k)) / 0.5
            responses += len(k)
    assert tied and any(m < 0 for m in margins) and any(m > 0 for m in margins)  # the checks below can fail
    assert abs(sum(margins)) > 1e-3 and abs(moved) > 1e-3
    assert metrics["train/reward_margin"] == pytest.approx(sum(margins) / len(margins), rel=1e-4)
    assert metrics["train/accuracy"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    assert metrics["train/logps_policy_minus_ref"] == pytest.approx(moved / responses, rel=1e-4)


def first_step(overrides: list[str]) -> dict:
    """The first training step of a fresh run: its metrics, the adapter's gradients, the policy's
    forwards, how many times each decoder layer's attention ran, and the bytes kept for the
    backward."""
    from align.modeling import find_blocks

    trainer = DPOTrainer(load_config(DPOConfig, None, [*overrides, "num_eval_prompts=0", "overwrite=true"]),
                         echo=lambda _: None)
    trainer.setup()
    forwards = []
    trainer.model.register_forward_hook(lambda *_: forwards.append(1))
    _, layers = find_blocks(trainer.policy.get_base_model())
    calls = []  # the layer's first part: transformers recomputes inside the layer, not around it
    for layer in layers:
        next(layer.children()).register_forward_hook(lambda *_: calls.append(1))
    grads, apply = {}, trainer.optimizer.step

    def step_keeping_the_gradients(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in trainer.policy.named_parameters() if p.requires_grad})
        return apply(*args, **kwargs)

    trainer.optimizer.step = step_keeping_the_gradients
    parts = trainer.local_batches(trainer.global_batches[0])  # as `train` does
    metrics = {}
    saved = saved_for_backward_bytes(lambda: metrics.update(trainer.step(parts)))
    return {"metrics": metrics, "grads": grads, "forwards": len(forwards), "calls_per_layer": len(calls) / len(layers),
            "saved": saved, "length_buckets": trainer.cfg.length_buckets,
            "responses_forwarded": trainer.responses_forwarded}


def assert_same_step(a: dict, b: dict) -> None:
    """The same loss and adapter gradients, to float rounding (another layout of the same sums)."""
    assert a["metrics"]["train/loss"] == pytest.approx(b["metrics"]["train/loss"], rel=1e-5)
    assert a["grads"].keys() == b["grads"].keys() and any(g.abs().sum() > 0 for g in a["grads"].values())
    for name, grad in a["grads"].items():
        torch.testing.assert_close(b["grads"][name], grad, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_recomputes_every_layer_and_takes_the_same_step(small_dpo_run):
    plain = first_step([*small_dpo_run, "gradient_checkpointing=false"])
    ckpt = first_step([*small_dpo_run, "gradient_checkpointing=true"])
    # one forward per length slice and one for the prompts; whole sequences in one forward, run again in the backward
    assert (plain["calls_per_layer"], ckpt["calls_per_layer"]) == (plain["length_buckets"] + 1, 2)
    assert ckpt["saved"] < plain["saved"] / 2, (ckpt["saved"], plain["saved"])
    assert_same_step(plain, ckpt)  # each response read whole instead of after its prompt's cache


def test_micro_batches_accumulate_the_gradient_of_the_whole_batch(small_dpo_run):
    whole = first_step(small_dpo_run)  # batches of 8 rankings
    micro = first_step([*small_dpo_run, "gradient_accumulation_steps=3"])
    assert (whole["forwards"], micro["forwards"]) == (1, 3)  # 3 + 3 + 2 rankings
    assert micro["responses_forwarded"] == whole["responses_forwarded"]
    assert_same_step(whole, micro)


def test_run_reports_held_out_accuracy_and_exports_an_ordinary_checkpoint(small_dpo_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from align.commands.export import export_run
    from dpo.train import run_dpo

    summary = run_dpo(load_config(DPOConfig, None, small_dpo_run), echo=lambda _: None)
    run = tmp_path / "run"
    assert 0.0 <= summary["eval/accuracy"] <= 1.0 and summary["eval/num_pairs"] > 0
    assert summary["eval/label_source"] == "gold" and "eval/gold_gain_in_sft_std" in summary and "eval/kl" in summary
    assert len((run / "samples.jsonl").read_text().splitlines()) == 8
    out = export_run(run, tmp_path / "export")
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    card = (out / "README.md").read_text()
    assert "DPO" in card and "beta" in card
    # generate() samples as the held-out figures were measured: at the run's temperature, nothing filtered
    temperature = load_config(DPOConfig, None, small_dpo_run).temperature
    assert temperature != 1.0
    config = model.generation_config
    assert (config.do_sample, config.temperature, config.top_k, config.top_p) == (True, temperature, 0, 1.0)
    assert f"Held-out responses sampled at temperature {temperature}, no top-k or top-p, as generation_config" in card


def test_the_model_card_states_the_steps_that_ran_and_the_data_path_resolved(small_dpo_run, tmp_path, monkeypatch):
    # it said "epochs: 2" for a run that max_steps stopped at 3, and "data: kwise (rankings.kwise.jsonl)"
    from align.commands.export import export_run
    from align.synthetic import make_rankings
    from dpo.train import run_dpo

    monkeypatch.chdir(tmp_path)
    write_kwise(make_rankings(40, k=3, seed=1), tmp_path / "rankings.kwise.jsonl")
    overrides = [o for o in small_dpo_run if not o.startswith(("data.", "epochs="))]
    summary = run_dpo(load_config(DPOConfig, None, [
        *overrides, "data.format=kwise", "data.path=rankings.kwise.jsonl", "data.eval_fraction=0.2", "epochs=2",
        "max_steps=3", "num_eval_prompts=0"]), echo=lambda _: None)
    assert summary["train/steps"] == 3
    card = (export_run(tmp_path / "run", tmp_path / "export", merge=False) / "README.md").read_text()
    assert "- max_steps: 3\n" in card and "- optimizer steps taken: 3\n" in card and "epochs" not in card
    assert f"- data: kwise ({tmp_path / 'rankings.kwise.jsonl'})\n- data sha256: " in card


@pytest.fixture
def run_cli(capsys):
    """`align dpo ARGS` in this process (tests.cli_in_process): what these tests read is its words and exit code."""
    return lambda *args: run_align_in_process(capsys, "dpo", *args)


def test_rankings_without_a_preference_are_left_out_in_one_line(small_dpo_run, tmp_path, run_cli):
    good = [Ranking(prompt=f"question {i}?", responses=[f"answer {i}", f"reply {i}", f"no {i}"], ranks=[0, 1, 2])
            for i in range(12)]
    bad = [Ranking(prompt="single?", responses=["only one"], ranks=[0]),
           Ranking(prompt="tied?", responses=["a", "b", "c"], ranks=[1, 1, 1])]
    path, held_out = tmp_path / "rankings.jsonl", tmp_path / "held_out.jsonl"
    write_kwise(good[:9] + bad, path)
    write_kwise([*good[9:], Ranking(prompt="held-out tie?", responses=["x", "y"], ranks=[0, 0])], held_out)
    overrides = [o for o in small_dpo_run if not o.startswith("data.")]
    result = run_cli(*overrides, "data.format=kwise", f"data.path={path}", f"data.eval_path={held_out}",
                     "num_eval_prompts=0")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("dpo: left out")]
    assert lines == ["dpo: left out 1 with a single response, 1 with every response tied (no preference) of the "
                     "training rankings",
                     "dpo: left out 1 held-out rankings that state no preference (a single response, or every "
                     "response tied)"]

    write_kwise(bad, path)
    result = run_cli(*overrides, "data.format=kwise", f"data.path={path}", "data.eval_fraction=0.5", "overwrite=true")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: after the split: 0 training and 0 held-out rankings with pairs; need both "
                                     "> 0 (2 of the 2 rankings state no preference: a single response, or every "
                                     "response tied)")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("override, expected", [("loss=listwise", "loss"), ("beta=0", "beta: must be > 0"),
                                                ("bta=0.1", "did you mean 'beta'"),
                                                ("gradient_accumulation_steps=17", r"gradient_accumulation_steps \(17\) "
                                                 r"is more micro-batches than a step has rankings \(batch_size 16\)"),
                                                ("lora.dropout=0.1", "lora.dropout=0.1: DPO runs without dropout")])
def test_bad_settings_are_refused_with_the_key_named(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(DPOConfig, None, [override])


def test_held_out_prompts_are_read_before_the_training(small_dpo_run, tmp_path):
    from align.errors import UserError
    from dpo.train import run_dpo

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cfg = load_config(DPOConfig, None, [*small_dpo_run, f"eval_prompts={empty}", "num_eval_prompts=2"])
    with pytest.raises(UserError, match=rf"^{empty}: no prompts found"):
        run_dpo(cfg, echo=lambda _: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before a step was trained


def test_held_out_prompts_from_the_training_rankings_are_refused(small_dpo_run, tmp_path):
    from align.errors import UserError
    from align.exports import write_kwise
    from align.formats import Ranking
    from dpo.train import run_dpo

    rankings = tmp_path / "rankings.jsonl"
    write_kwise([Ranking(f"question {i}", ["a", "b", "c"], [0, 1, 2], "ann") for i in range(20)], rankings)
    held_out = tmp_path / "held_out.txt"  # every ranked question: 4 are held out, 16 trained on
    held_out.write_text("".join(f"question {i}\n" for i in range(20)))
    cfg = load_config(DPOConfig, None, [*small_dpo_run, "data.format=kwise", f"data.path={rankings}",
                                        "data.eval_fraction=0.2", f"eval_prompts={held_out}", "num_eval_prompts=20"])
    with pytest.raises(UserError, match=r"^16 of the 20 held-out prompts \(eval_prompts\) are also training prompts "
                                        r"\(the training rankings\)"):
        run_dpo(cfg, echo=lambda _: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_bf16_evaluation_measures_no_kl_before_the_adapter_moves(small_dpo_run, monkeypatch):
    # the DPO path of ppo.evaluation (PolicySampler): as PPO's, an inexact bf16 sampler's log-probs are
    # not what the KL compares with the reference (on the CPU they agree; the sampler is made inexact)
    from ppo.evaluation import evaluate

    trainer = DPOTrainer(load_config(DPOConfig, None, [*small_dpo_run, "dtype=bfloat16"]), echo=lambda _: None)
    trainer.setup()
    sample = trainer.sampler.generate

    def inexact(prompts, adapter=True):
        samples = sample(prompts, adapter)
        samples.logprobs = samples.logprobs + 0.01 * samples.response_mask
        return samples

    monkeypatch.setattr(trainer.sampler, "generate", inexact)
    metrics, _ = evaluate(trainer.sampler, trainer.eval_prompts, batch_size=8, seed=0)
    assert abs(metrics["eval/kl"]) < 1e-3, metrics["eval/kl"]


def test_held_out_plackett_luce_nll_is_the_trained_loss(small_dpo_run):
    # before training the policy is the reference: every implicit reward is 0, and each held-out
    # ranking's Plackett-Luce NLL is that of equal rewards (log K! without ties), not the pairwise log 2
    from dpo.losses import plackett_luce_nll
    from dpo.train import held_out_ranking_metrics

    trainer = DPOTrainer(load_config(DPOConfig, None, small_dpo_run), echo=lambda _: None)
    trainer.setup()
    rankings = trainer.eval_rankings
    metrics = held_out_ranking_metrics(trainer.model, trainer.tokenizer, rankings, trainer.cfg, trainer.accelerator)
    expected = [plackett_luce_nll(torch.zeros(1, len(r.ranks)), torch.tensor([r.ranks]),
                                  torch.ones(1, len(r.ranks), dtype=torch.bool)).item() for r in rankings]
    assert metrics["eval/plackett_luce_nll"] == pytest.approx(sum(expected) / len(expected), abs=1e-3)
    assert metrics["eval/loss"] == pytest.approx(math.log(2), abs=1e-3)  # the pairwise loss, beside it
    assert metrics["eval/plackett_luce_nll"] > metrics["eval/loss"] + 0.3  # K = 3: log 6 or log 3 against log 2


@pytest.mark.parametrize("reverse", [False, True])
def test_held_out_metrics_score_the_implicit_reward_against_the_rankings(small_dpo_run, monkeypatch, reverse):
    # A policy whose log-probs exceed the reference's by minus each response's rank: its implicit
    # reward -beta * rank orders every held-out ranking as the annotators did (accuracy 1), or, against
    # the reversed rankings, in the opposite order (accuracy 0); the NLL is that of those rewards.
    import dpo.train
    from dpo.train import held_out_ranking_metrics

    trainer = DPOTrainer(load_config(DPOConfig, None, small_dpo_run), echo=lambda _: None)
    trainer.setup()
    real = dpo.train.dataset_logps

    rankings = [r for r in trainer.eval_rankings if len(set(r.ranks)) == len(r.ranks)]  # no ties: every pair scored
    assert len(rankings) >= 3
    truth = list(rankings)
    true_ranks = {(str(r.prompt), tuple(r.responses)): r.ranks for r in truth}

    def ordered_policy(module, dataset, cfg, accelerator, adapter=True):
        logps = real(module, dataset, cfg, accelerator, adapter=adapter)
        if adapter:
            logps = {i: dataset.reference_logps[i] - torch.tensor(
                true_ranks[str(dataset.rankings[i].prompt), tuple(dataset.rankings[i].responses)], dtype=torch.float32)
                for i in logps}
        return logps

    monkeypatch.setattr(dpo.train, "dataset_logps", ordered_policy)
    if reverse:
        rankings = [Ranking(prompt=r.prompt, responses=r.responses, ranks=[max(r.ranks) - x for x in r.ranks])
                    for r in rankings]
    metrics = held_out_ranking_metrics(trainer.model, trainer.tokenizer, rankings, trainer.cfg, trainer.accelerator)
    assert metrics["eval/accuracy"] == (0.0 if reverse else 1.0)
    beta = trainer.cfg.beta
    expected = [plackett_luce_nll(-beta * torch.tensor([t.ranks], dtype=torch.float32), torch.tensor([r.ranks]),
                                  torch.ones(1, len(r.ranks), dtype=torch.bool)).item() for t, r in zip(truth, rankings)]
    assert metrics["eval/plackett_luce_nll"] == pytest.approx(sum(expected) / len(expected), abs=1e-4)


def test_held_out_rankings_too_long_for_max_length_are_counted_not_silently_dropped(small_dpo_run):
    # one held-out ranking whose response cannot follow its whole prompt within max_length: the held-out
    # metrics are over the others, and the summary says how many were left out
    from dpo.train import held_out_ranking_metrics

    trainer = DPOTrainer(load_config(DPOConfig, None, small_dpo_run), echo=lambda _: None)
    trainer.setup()
    fitting = trainer.eval_rankings[:4]
    long = Ranking(prompt=fitting[0].prompt, responses=["word " * trainer.cfg.max_length, "short"], ranks=[0, 1])
    metrics = held_out_ranking_metrics(trainer.model, trainer.tokenizer, [*fitting, long], trainer.cfg,
                                       trainer.accelerator)
    assert metrics["eval/rankings_left_out"] == 1
    assert metrics["eval/num_rankings"] == len(fitting)


def test_the_logged_learning_rate_is_the_one_each_step_took(small_dpo_run):
    # no warm-up, linear decay to 0 over 4 steps: the steps take lr * 1, 3/4, 2/4, 1/4
    trainer = DPOTrainer(load_config(DPOConfig, None, [*small_dpo_run, "warmup_ratio=0.0", "max_steps=4",
                                                       "log_every=1", "num_eval_prompts=0"]), echo=lambda _: None)
    trainer.setup()
    trainer.train()
    assert [r["train/lr"] for r in read_metrics(trainer.run_dir / "metrics.jsonl")] == pytest.approx(
        [5e-3, 3.75e-3, 2.5e-3, 1.25e-3])


def test_a_new_run_refuses_a_rankings_file_its_data_format_does_not_read(small_dpo_run, tmp_path):
    # data.path without data.format trained on the synthetic task's rankings without a word
    from align.synthetic import make_rankings
    from dpo.train import run_dpo

    rankings = tmp_path / "rankings.jsonl"
    write_kwise(make_rankings(8, k=3, seed=1), rankings)
    with pytest.raises(ConfigError, match=r"^data.path is set but data.format=synthetic does not read it"):
        run_dpo(load_config(DPOConfig, None, [*small_dpo_run, f"data.path={rankings}"]), echo=lambda _: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
