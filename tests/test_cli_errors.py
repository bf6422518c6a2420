"""User mistakes on the stage commands' edges (--resume, run directories, keys a stage lacks): one line
naming the problem, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from align.config import load_config, save_config

# (command, config class, a key --resume may change)
STAGES = {
    "reward": (["reward", "train"], "reward.config:RewardConfig", "train.num_threads"),
    "ppo": (["ppo"], "ppo.config:PPOConfig", "num_threads"),
    "dpo": (["dpo"], "dpo.config:DPOConfig", "num_threads"),
}


def run_align(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align", *args], capture_output=True, text=True, timeout=300,
                          **kwargs)


def config_class(target: str) -> type:
    import importlib

    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    return out.stderr.strip()


def saved_run(stage: str, run) -> None:
    cls = config_class(STAGES[stage][1])
    save_config(load_config(cls, None, [f"output_dir={run}"]), run / "config.yaml")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_bad_override_on_resume_is_reported_as_itself(stage, tmp_path):
    command, _, key = STAGES[stage]
    saved_run(stage, tmp_path / "run")
    out = run_align(*command, "--resume", str(tmp_path / "run"), f"{key}=0")
    assert one_line_error(out) == f"error: {key}: must be >= 1, got 0"  # not "not a ... run to resume"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_another_stages_run_is_not_resumed(stage, tmp_path):
    command, _, _ = STAGES[stage]
    other = "dpo" if stage == "reward" else "reward"
    saved_run(other, tmp_path / "run")
    out = run_align(*command, "--resume", str(tmp_path / "run"))
    name = {"reward": "reward", "ppo": "PPO", "dpo": "DPO"}[stage]
    assert one_line_error(out).startswith(f"error: {tmp_path / 'run'}: not a {name} run to resume: unknown config key")
