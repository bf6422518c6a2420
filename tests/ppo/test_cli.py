"""User mistakes in `align ppo` give one line on stderr and exit code 2, and touch nothing."""

from __future__ import annotations

import json

import pytest

from align.commands.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(["ppo", *args])
    err = capsys.readouterr().err.strip()
    return exc.value.code, err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["clip_coeff=0.1"], "did you mean 'clip_coef'"),
        (["kl.estimator=k2"], "kl.estimator: 'k2' is not one of 'k1', 'k3'"),
        (["batch_size=10", "num_mini_batches=4"], "must be divisible by num_mini_batches"),
        (["batch_size=8", "num_mini_batches=2", "gradient_accumulation_steps=3"], "gradient_accumulation_steps"),
        (["gae_lambda=1.5"], "gae_lambda: must be <= 1.0"),
        (["temperature=0"], "temperature: must be >= 0.01"),
        (["prompts=/nonexistent/prompts.jsonl"], "prompts: file not found"),
        (["eval_prompts=/"], "eval_prompts: / is a directory, not a file"),
        (["report_to=mlflow"], "report_to"),
        (["lora.dropout=0.05"], "lora.dropout=0.05: PPO runs without dropout"),
        (["num_prompts=1000000000"], "num_prompts: must be <= 1000000"),  # it built the list until memory ran out
    ],
)
def test_config_errors_exit_2_with_one_line(args, expected, capsys, tmp_path):
    code, err = run_cli([*args, f"output_dir={tmp_path / 'run'}"], capsys)
    assert code == 2
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert expected in err
    assert not (tmp_path / "run").exists()


def test_batch_size_is_shared_among_the_processes():
    """batch_size counts every process's episodes; each prompt's samples stay on one process."""
    from align.errors import UserError
    from ppo.config import BatchShape, PPOConfig

    cfg = PPOConfig(method="rloo", batch_size=64, samples_per_prompt=4, num_mini_batches=2,
                    gradient_accumulation_steps=2)
    assert cfg.batch_shape(1) == BatchShape(episodes=64, prompts=16, mini_batch=32, micro_batch=16)
    assert cfg.batch_shape(4) == BatchShape(episodes=16, prompts=4, mini_batch=8, micro_batch=4)
    with pytest.raises(UserError, match=r"batch_size \(64\) must be divisible by the number of processes \(3\)"):
        cfg.batch_shape(3)
    with pytest.raises(UserError, match=r"batch_size / 32 processes \(2\) must be divisible by samples_per_prompt"):
        cfg.batch_shape(32)  # a prompt's 4 samples would straddle two processes
    with pytest.raises(UserError, match=r"each of the 32 processes, batch_size / 32 processes / num_mini_batches \(1\)"):
        PPOConfig(batch_size=64, num_mini_batches=2, gradient_accumulation_steps=2).batch_shape(32)


def test_resume_errors_exit_2(capsys, tmp_path, small_run):
    code, err = run_cli(["--resume", str(tmp_path)], capsys)
    assert code == 2 and "no config.yaml" in err and len(err.splitlines()) == 1

    (tmp_path / "config.yaml").write_text("seed: 1\n")
    code, err = run_cli(["--resume", str(tmp_path), "learning_rate=1.0"], capsys)
    assert code == 2 and "'learning_rate' cannot change on --resume" in err
    # memory-only settings may change: the documented fix for a sharded rollout that runs out of memory
    from align.cli_common import resumed_config
    from align.errors import UserError
    from ppo.config import RESUME_OVERRIDABLE, PPOConfig

    # restating the run's own value changes nothing: accepted (seed is the run's 1)
    assert resumed_config(PPOConfig, tmp_path, None, ["seed=1"], RESUME_OVERRIDABLE, "PPO").seed == 1
    with pytest.raises(UserError, match="'seed' cannot change on --resume"):
        resumed_config(PPOConfig, tmp_path, None, ["seed=2"], RESUME_OVERRIDABLE, "PPO")
    # a change that needs two keys: the first named, not the config the first alone would make invalid
    with pytest.raises(UserError, match="'method' cannot change on --resume"):
        resumed_config(PPOConfig, tmp_path, None, ["method=grpo", "samples_per_prompt=4"], RESUME_OVERRIDABLE, "PPO")
    with pytest.raises(UserError, match="'output_dir' cannot change on --resume"):  # not ignored either
        resumed_config(PPOConfig, tmp_path, None, [f"output_dir={tmp_path / 'elsewhere'}"], RESUME_OVERRIDABLE, "PPO")
    for same in (f"output_dir={tmp_path}", f"output_dir={tmp_path}/", f"output_dir={tmp_path}/../{tmp_path.name}"):
        assert resumed_config(PPOConfig, tmp_path, None, [same], RESUME_OVERRIDABLE, "PPO")
    (tmp_path / "config.yaml").write_text("")
    assert not resumed_config(PPOConfig, tmp_path, None, ["sample_gathered=false", "gradient_checkpointing=true"],
                              RESUME_OVERRIDABLE, "PPO").sample_gathered
    (tmp_path / "config.yaml").write_text("seed: 1\n")

    code, err = run_cli(["--resume", str(tmp_path), "--config", str(tmp_path / "config.yaml")], capsys)
    assert code == 2 and "drop --config" in err

    code, err = run_cli(["--resume", str(tmp_path), "progress=false", *[o for o in small_run if o.startswith(
        ("policy_model", "reward_model"))]], capsys)
    assert code == 2


def test_resume_refuses_training_prompts_that_changed(capsys, tmp_path, small_run):
    from align.synthetic import make_prompts

    def write_prompts(seed: int) -> None:
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in make_prompts(16, seed=seed, split="train")))

    prompts, run = tmp_path / "prompts.jsonl", tmp_path / "run"
    write_prompts(seed=0)
    code, err = run_cli([*[o for o in small_run if not o.startswith(("num_iterations=", "save_every="))],
                         f"prompts={prompts}", "num_iterations=1", "save_every=1"], capsys)
    assert code == 0, err
    assert (run / "checkpoints" / "iter-000001").is_dir()
    rows = (run / "metrics.jsonl").read_text()

    write_prompts(seed=1)  # the same number of other prompts: the sampler's position alone would not tell
    code, err = run_cli(["--resume", str(run)], capsys)
    assert code == 2 and "the training data differ from those the run was trained on" in err
    assert (run / "metrics.jsonl").read_text() == rows


def test_resume_refuses_a_reward_model_trained_again_in_its_folder(capsys, tmp_path, small_run):
    import shutil

    [given] = [o.split("=", 1)[1] for o in small_run if o.startswith("reward_model=")]
    reward, run = tmp_path / "reward", tmp_path / "run"
    shutil.copytree(given, reward)
    code, err = run_cli([*[o for o in small_run if not o.startswith(("num_iterations=", "save_every=", "reward_model="))],
                         f"reward_model={reward}", "num_iterations=1", "save_every=1"], capsys)
    assert code == 0, err
    rows = (run / "metrics.jsonl").read_text()

    # the same folder, another model: a training run writes new weights and normalisation into it
    [norm] = reward.rglob("reward_normalization.json")
    norm.write_text(json.dumps({"gain": 2.0, "bias": -1.0}))
    code, err = run_cli(["--resume", str(run)], capsys)
    assert code == 2 and "the model reward_model names" in err and "its files changed since" in err
    assert (run / "metrics.jsonl").read_text() == rows


def test_a_resume_holds_every_model_the_run_reads_to_the_checkpoint_s(tmp_path, tiny_random_model):
    from types import SimpleNamespace

    from ppo.checkpoint import model_paths

    reward = SimpleNamespace(path=tmp_path / "rw")
    trainer = SimpleNamespace(cfg=SimpleNamespace(ref_model=str(tiny_random_model)), sft_path=tmp_path / "sft",
                              reward_model=reward)
    assert model_paths(trainer) == {"policy_model": tmp_path / "sft", "reward_model": tmp_path / "rw",
                                    "ref_model": tiny_random_model}
    trainer.cfg.ref_model, trainer.reward_model = None, object()  # the policy's own base; a model handed in
    assert model_paths(trainer) == {"policy_model": tmp_path / "sft", "reward_model": None, "ref_model": None}


def test_a_run_resumed_from_another_folder_is_told_where_its_relative_reward_model_is_read(capsys, tmp_path,
                                                                                           small_run, monkeypatch):
    import shutil

    [given] = [o.split("=", 1)[1] for o in small_run if o.startswith("reward_model=")]
    shutil.copytree(given, tmp_path / "rw")
    monkeypatch.chdir(tmp_path)  # started here, with the reward model named relative to it
    run = tmp_path / "run"
    code, err = run_cli([*[o for o in small_run if not o.startswith(("num_iterations=", "save_every=", "reward_model="))],
                         "reward_model=rw", "num_iterations=1", "save_every=1"], capsys)
    assert code == 0, err
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, err = run_cli(["--resume", str(run)], capsys)
    assert code == 2 and err.strip().splitlines()[-1].endswith(
        "not found: rw (rw is relative to the folder the run was started in: resume from that folder, or put the "
        "file back)")


def test_fresh_run_refuses_a_non_empty_output_dir(capsys, tmp_path, small_run):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"iteration": 1}\n')
    code, err = run_cli(small_run, capsys)
    assert code == 2 and "is not empty" in err and "--resume" not in err  # nothing to resume from
    (run / "checkpoints" / "iter-000001").mkdir(parents=True)
    code, err = run_cli(small_run, capsys)
    assert code == 2 and "is not empty" in err and f"align ppo --resume {run}" in err
    assert (run / "metrics.jsonl").read_text() == '{"iteration": 1}\n'


def test_missing_reward_model_exits_2(capsys, tmp_path, small_run):
    args = [o for o in small_run if not o.startswith("reward_model=")] + [f"reward_model={tmp_path / 'nope'}"]
    code, err = run_cli(args, capsys)
    assert code == 2 and "nope" in err and len(err.splitlines()) == 1


def test_accelerate_mixed_precision_is_refused_with_one_line(small_run, tmp_path):
    # in a process of its own: accelerate keeps its state per process
    import os
    import subprocess
    import sys

    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16"}
    done = subprocess.run([sys.executable, "-m", "align", "ppo", *small_run], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: the accelerate config sets mixed_precision: bf16")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_gzipped_prompts_file_is_taken(tmp_path):
    import gzip

    from align.config import load_config
    from ppo.config import PPOConfig
    from ppo.data import load_prompts

    path = tmp_path / "prompts.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('"q0"\n{"prompt": "q1"}\n')
    cfg = load_config(PPOConfig, None, [f"prompts={path}", f"eval_prompts={path}"])
    assert load_prompts(cfg.prompts, 0, 0, "train") == ["q0", "q1"]


def test_a_run_past_its_kl_budget_says_so_and_what_holds_the_kl(capsys, monkeypatch, small_run):
    import ppo.trainer

    monkeypatch.setattr(ppo.trainer, "run_ppo", lambda cfg, resume: {"eval/kl": 19.5, "objective/kl_coef": 0.87})

    def printed(*overrides: str) -> str:
        with pytest.raises(SystemExit) as exc:
            main(["ppo", *small_run, *overrides])
        assert exc.value.code == 0  # the run's samples are still the user's to judge
        return capsys.readouterr().out

    assert ("is 19.50 nats per sequence, 3.2x the budget kl.target=6; the coefficient is fixed (kl.adaptive=false, "
            "kl.coef=0.1)") in printed("kl.target=6", "kl.adaptive=false", "kl.coef=0.1")
    assert "the adaptive coefficient (now 0.87) did not bring it back" in printed("kl.target=6")
    assert "note:" not in printed("kl.target=13")  # 19.5 = 1.5 x 13: within the budget's margin
