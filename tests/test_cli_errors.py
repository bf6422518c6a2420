"""User mistakes on the stage commands' edges (--resume, run directories, keys a stage lacks): one line
naming the problem, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from align.config import load_config, save_config
from tests.cli_in_process import run_align_in_process

# (command, config class, a key --resume may change)
STAGES = {
    "reward": (["reward", "train"], "reward.config:RewardConfig", "train.num_threads"),
    "ppo": (["ppo"], "ppo.config:PPOConfig", "num_threads"),
    "dpo": (["dpo"], "dpo.config:DPOConfig", "num_threads"),
}


def run_align(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """In a process of its own: for the test whose processes are what it is about."""
    return subprocess.run([sys.executable, "-m", "align", *args], capture_output=True, text=True, timeout=300,
                          **kwargs)


@pytest.fixture
def align(capsys):
    """`align ARGS` in this process (tests.cli_in_process): the tests below are about its words and exit code."""
    return lambda *args: run_align_in_process(capsys, *args)


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
def test_a_bad_override_on_resume_is_reported_as_itself(stage, tmp_path, align):
    command, _, key = STAGES[stage]
    saved_run(stage, tmp_path / "run")
    out = align(*command, "--resume", str(tmp_path / "run"), f"{key}=0")
    assert one_line_error(out) == f"error: {key}: must be >= 1, got 0"  # not "not a ... run to resume"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_another_stages_run_is_not_resumed(stage, tmp_path, align):
    command, _, _ = STAGES[stage]
    other = "dpo" if stage == "reward" else "reward"
    saved_run(other, tmp_path / "run")
    out = align(*command, "--resume", str(tmp_path / "run"))
    name = {"reward": "reward", "ppo": "PPO", "dpo": "DPO"}[stage]
    # the other stage's keys are named, with no "did you mean" one of this stage's
    message = one_line_error(out)
    assert message.startswith(f"error: {tmp_path / 'run'}: not a {name} run to resume (its config.yaml has keys a "
                              f"{name} run does not: ") and "did you mean" not in message


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_overwrite_replaces_only_a_run_of_the_same_stage(stage, tmp_path, align):
    # another stage's outputs (a DPO run's stage.txt, a PPO run's value head) would stay beside this run's
    # and be read as its own: overwrite=true refuses the folder before anything loads, and leaves it as it was
    command, _, _ = STAGES[stage]
    other = "dpo" if stage != "dpo" else "ppo"
    saved_run(other, tmp_path / "run")
    (tmp_path / "run" / "summary.json").write_text("{}")
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    for overwrite in ("overwrite=true", "overwrite=false"):  # neither offers a way it would then refuse
        message = one_line_error(align(*command, f"output_dir={tmp_path / 'run'}", overwrite))
        assert message.startswith(f"error: output_dir {tmp_path / 'run'} holds another stage's run (its config.yaml "
                                  "has ") and message.endswith("choose another output_dir")
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_a_run_directory_that_cannot_be_created_is_a_user_error(tmp_path):
    from align.errors import UserError
    from align.run import prepare_run_dir

    (tmp_path / "plainfile").write_text("")
    with pytest.raises(UserError) as info:
        prepare_run_dir(tmp_path / "plainfile" / "run", object())
    assert str(info.value) == (f"cannot create directory {tmp_path / 'plainfile' / 'run'}: "
                               f"{tmp_path / 'plainfile'} is a file, not a directory")


@pytest.mark.parametrize("where", ["plainfile", "plainfile/sub"])
def test_demo_out_that_cannot_be_created_is_one_line(tmp_path, where, align):
    (tmp_path / "plainfile").write_text("")
    out = align("demo", "--out", str(tmp_path / where))
    assert one_line_error(out) == (f"error: cannot create directory {tmp_path / where}: "
                                   f"{tmp_path / 'plainfile'} is a file, not a directory")


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_a_stage_output_dir_that_cannot_be_created_is_one_line(stage, tmp_path, tiny_random_model, align):
    # a link to a disk that is not mounted: nothing is in the way until the run directory is created
    (tmp_path / "runs").symlink_to(tmp_path / "unmounted")
    run = tmp_path / "runs" / "run"
    small = {"reward": [f"model.name_or_path={tiny_random_model}", "data.num_rankings=8", "data.num_eval_rankings=4",
                        "train.batch_size=4"],
             "dpo": [f"policy_model={tiny_random_model}", "data.num_rankings=8", "data.num_eval_rankings=4",
                     "batch_size=4", "num_eval_prompts=0", "progress=false"]}[stage]
    out = align(*STAGES[stage][0], f"output_dir={run}", *small)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    # the last line: the stage logs what it loaded before it creates the run directory
    assert out.stderr.strip().splitlines()[-1] == (f"error: cannot create directory {run}: "
                                                   f"{tmp_path / 'runs'} is a broken symbolic link")
    assert not (tmp_path / "unmounted").exists()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_an_output_dir_name_longer_than_the_file_system_allows_is_one_line(stage, tmp_path, align):
    run = tmp_path / ("r" * 300)  # NAME_MAX is 255 bytes on Linux file systems
    out = align(*STAGES[stage][0], f"output_dir={run}")
    assert one_line_error(out) == f"error: output_dir {run}: File name too long"


def test_a_user_error_is_said_by_the_first_process_of_a_launch_to_meet_it(monkeypatch, capsys, tmp_path):
    from align.commands.cli import main

    def said(*args: str) -> list[str]:
        with pytest.raises(SystemExit) as exc:
            main(list(args))
        assert exc.value.code == 2
        return capsys.readouterr().err.strip().splitlines()

    missing = tmp_path / "no-run"
    export = ("export", str(missing), "--out", str(tmp_path / "out"))
    said_once = [f"error: run directory not found: {missing}"]
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert said(*export) == said_once == said(*export)  # not launched: said every time
    monkeypatch.setenv("LOCAL_RANK", "1")
    # a process of a launch: the first to meet the words says them; another process of the same
    # launcher (here: this process again, whose parent is the same) meeting the same words says nothing
    assert said(*export) == said_once
    assert said(*export) == []
    other = tmp_path / "other-run"  # other words: said
    assert said("export", str(other), "--out", str(tmp_path / "out")) == [f"error: run directory not found: {other}"]


def test_the_claims_of_launches_that_have_ended_are_removed(monkeypatch, capsys, tmp_path):
    import os
    import subprocess
    import tempfile

    from align.commands.cli import _process_start, main

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this test's own claims
    said = tmp_path / "align-said"
    said.mkdir()
    ended = subprocess.Popen(["true"])
    ended.wait()  # a launcher that has ended: its pid names no process now
    live = f"{os.getpid()}-{_process_start(os.getpid())}-a1b2"  # a launcher still running (this test)
    for name in (f"{ended.pid}-12345-c3d4", "0a5661603ed2d346e9e41c48008db9ad4f403adc", live):
        (said / name).touch()
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "no-run"), "--out", str(tmp_path / "out")])
    assert capsys.readouterr().err.startswith("error: run directory not found")
    claims = sorted(p.name for p in said.iterdir())
    launcher = f"{os.getppid()}-{_process_start(os.getppid())}-"
    # the ended launcher's claim and an older align's unnamed one went; the running one's stayed
    assert len(claims) == 2 and live in claims and any(c.startswith(launcher) for c in claims if c != live)


def test_the_process_that_meets_an_error_first_says_it_whatever_its_rank(tmp_path):
    # the launcher may stop the other processes as soon as this one exits: it cannot leave the line
    # to another rank. Two processes of one parent (this test, standing in for the launcher), the
    # second started once the first has exited: the first says it, the second finds it said.
    import os

    words = ("ppo", f"output_dir={tmp_path / 'run'}", f"kl_coeff_{tmp_path.name}=0.1")  # words of this test alone
    first = run_align(*words, env={**os.environ, "LOCAL_RANK": "1"})
    assert first.returncode == 2 and first.stderr.startswith(f"error: unknown config key 'kl_coeff_{tmp_path.name}'")
    second = run_align(*words, env={**os.environ, "LOCAL_RANK": "0"})
    assert second.returncode == 2 and second.stderr == ""


@pytest.mark.multiproc
@pytest.mark.parametrize("when", ["loading the config", "splitting the batch"])
def test_a_config_error_under_accelerate_launch_is_one_line(tmp_path, when):
    from tests.launch import run_align as launch

    # a mistake found before the processes meet (a key's typo, where the first process to exit may
    # get the others stopped before they print) or once both are up (the split of batch_size over them)
    args, expected = {
        "loading the config": (["kl_coeff=0.1"], "error: unknown config key 'kl_coeff' for PPOConfig; did you "
                                                 "mean 'kl.coef'?"),
        "splitting the batch": (["batch_size=12", "num_mini_batches=4"],
                                "error: batch_size / 2 processes (6) must be divisible by num_mini_batches (4)"),
    }[when]
    for _ in range(3):  # which process meets it first varies from launch to launch
        out = launch("ppo", "--config", "configs/demo/ppo.yaml", *args, f"output_dir={tmp_path / 'run'}",
                     launcher="ddp")
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert errors == [expected], out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_setting_given_two_values_on_the_command_line_is_said(stage, tmp_path, align):
    command, _cls, key = STAGES[stage]
    section, _, leaf = key.rpartition(".")
    again = f"{section}={{{leaf}: 2}}" if section else f"{key}=2"  # dotted, then in its section's mapping
    out = align(*command, f"{key}=1", again, "--config", str(tmp_path / "missing.yaml"))  # then stops
    assert out.returncode == 2
    assert f"config key {key!r} is given twice ('{key}=1', then {again!r}): the last is taken" in out.stderr


def test_the_demo_says_a_stage_setting_given_two_values(tmp_path, align):
    out = align("demo", "--out", str(tmp_path / "demo"), "ppo.seed=1", "ppo.seed=2", f"model={tmp_path / 'none'}")
    assert out.returncode == 2 and "config key 'seed' is given twice ('seed=1', then 'seed=2')" in out.stderr


def test_a_section_given_as_a_mapping_keeps_the_config_files_other_keys():
    from align.resources import configs_dir
    from ppo.config import PPOConfig

    path = configs_dir() / "demo" / "ppo.yaml"
    whole = load_config(PPOConfig, path)
    cfg = load_config(PPOConfig, path, ["kl={coef: 0.3}", "lora={r: 4}"])
    assert cfg.kl.coef == 0.3 and cfg.lora.r == 4
    assert (cfg.kl.horizon, cfg.kl.target, cfg.lora.alpha, cfg.lora.target_modules) == (
        whole.kl.horizon, whole.kl.target, whole.lora.alpha, whole.lora.target_modules)
