"""The `align` command line: fast help, and user mistakes as one line with exit code 2."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest

from tests.cli_in_process import run_align_in_process

STAGES = ["annotate", "reward", "ppo", "dpo", "export", "demo", "memory-plan", "init-demo-model"]  # --help's order


@pytest.fixture
def run_align(capsys):
    """`align ARGS` in this process (tests.cli_in_process): the mistakes below are about words and exit codes."""
    return lambda *args: run_align_in_process(capsys, *args)


def test_help_lists_every_stage_without_importing_torch():
    code = (
        "import sys\n"
        "from align.commands.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'fastapi', 'sqlalchemy') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # a command's first line in its panel ("│ name  help"), not a wrapped help line or an option
    listed = [line.split()[1] for line in out.stdout.splitlines()
              if line.startswith("│ ") and line[2] not in " -" and len(line.split()) > 2]
    assert listed == STAGES  # the pipeline's order, then its tools
    assert "HEAVY []" in out.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["init-demo-model", "--size", "huge", "--out", "/tmp/align-never-written"], "unknown demo model size 'huge'"),
        (["no-such-stage"], "No such command"),
    ],
)
def test_user_mistakes_exit_2_without_traceback(args, expected, run_align):
    out = run_align(*args)
    assert out.returncode == 2
    assert expected in out.stderr
    assert "Traceback" not in out.stderr


# Every stage config refuses a typo, a negative learning rate and a missing file the same way.
STAGE_COMMANDS = {
    "reward": (["reward", "train"], "reward.config:RewardConfig", "train.learning_rate"),
    "ppo": (["ppo"], "ppo.config:PPOConfig", "learning_rate"),
    "dpo": (["dpo"], "dpo.config:DPOConfig", "learning_rate"),
    "demo": (["demo", "--out", "/tmp/align-never-written"], "align.commands.demo:DemoConfig", "reward.train.learning_rate"),
}


def _describe(target: str) -> list[tuple]:
    import importlib

    from align.config import describe

    module, name = target.split(":")
    return describe(getattr(importlib.import_module(module), name))


def _leaf_keys(target: str) -> list[str]:
    return [row[0] for row in _describe(target)]


@pytest.mark.parametrize("stage", sorted(STAGE_COMMANDS))
def test_stage_help_lists_every_config_key_with_its_help(stage):
    import os

    command, target, _ = STAGE_COMMANDS[stage]
    out = subprocess.run([sys.executable, "-m", "align", *[c for c in command[:2] if not c.startswith("-")], "--help"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "COLUMNS": "250"})
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # rich wraps long help texts
    for key, _, _, help_text in _describe(target):
        assert f" {key} (" in text, f"{key} missing from {' '.join(command[:2])} --help"
        assert " ".join(help_text.split()) in text, f"the help of {key} is missing"


@pytest.mark.parametrize("stage", sorted(STAGE_COMMANDS))
def test_stage_config_typo_suggests_the_key(stage, run_align):
    command, target, _ = STAGE_COMMANDS[stage]
    key = next(k for k in _leaf_keys(target) if len(k.rsplit(".", 1)[-1]) > 4)
    out = run_align(*command, f"{key}x=1")
    assert out.returncode == 2, out.stderr
    assert f"did you mean '{key}'?" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


@pytest.mark.parametrize("stage", sorted(STAGE_COMMANDS))
def test_stage_config_refuses_a_negative_learning_rate(stage, run_align):
    command, _, lr_key = STAGE_COMMANDS[stage]
    out = run_align(*command, f"{lr_key}=-0.001")
    assert out.returncode == 2, out.stderr
    assert lr_key.removeprefix("reward.") in out.stderr and "must be" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("stage", sorted(STAGE_COMMANDS))
def test_stage_config_refuses_a_missing_file(stage, tmp_path, run_align):
    command, _, _ = STAGE_COMMANDS[stage]
    out = run_align(*command, "--config", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2 and "config file not found" in out.stderr and "Traceback" not in out.stderr


def test_missing_data_file_is_refused(tmp_path, run_align):
    out = run_align("reward", "train", "data.format=kwise", f"data.path={tmp_path / 'none.jsonl'}")
    assert out.returncode == 2 and "data.path: file not found" in out.stderr


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_rank_of_a_multi_process_run_exits_with_its_code_and_output_without_finalization(world_size):
    # a rank (WORLD_SIZE > 1) leaves without the interpreter's finalization, where a process group
    # kept alive by DDP/FSDP2 modules can abort it; its output and exit code are the command's
    import os

    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('FINALIZED'))\n"
            "from align.commands.cli import main\n"
            "main(sys.argv[1:])\n")
    env = {**os.environ, "WORLD_SIZE": world_size}
    done = subprocess.run([sys.executable, "-c", code, "memory-plan", "Qwen2.5-0.5B"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "total: held + the training phase" in done.stdout  # the last line, flushed
    assert ("FINALIZED" in done.stdout) == (world_size == "1")
    mistake = subprocess.run([sys.executable, "-c", code, "dpo", "bta=1"], capture_output=True, text=True,
                             timeout=120, env=env)
    assert mistake.returncode == 2
    assert mistake.stderr.strip() == "error: unknown config key 'bta' for DPOConfig; did you mean 'beta'?"
    assert ("FINALIZED" in mistake.stdout) == (world_size == "1")


def test_ctrl_c_says_it_was_interrupted_and_how_a_run_continues(monkeypatch, capsys, tmp_path):
    # typer turns Ctrl-C into a silent exit 130: the user is told, with the way back into a run
    import typer

    import align.commands.cli as cli

    interrupted = typer.Typer()

    @interrupted.command()
    def stage() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "app", interrupted)
    monkeypatch.setattr(cli, "_register_stages", lambda: None)
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"
    # how each interrupted command carries on, as far as its run got
    import os
    import time

    began = time.time()
    hint = lambda *args: cli._continue_hint(list(args), began)  # noqa: E731
    assert hint("ppo", "--config", "c.yaml") == (
        " (a run continues from its latest checkpoint: align ppo --resume RUN, RUN its output_dir)")
    assert hint("reward", "train", "x=1").endswith("align reward train --resume RUN, RUN its output_dir)")
    run = tmp_path / "my run"
    assert hint("dpo", f"output_dir={run}").endswith("before it began writing its run folder: run the command again)")
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / ".step-000002.tmp-k9").mkdir()  # a save cut short
    assert hint("dpo", f"output_dir={run}").endswith("before its first checkpoint: run the command again, with "
                                                     "overwrite=true)")
    (run / "checkpoints" / "step-000002").mkdir()
    assert hint("dpo", f"output_dir={run}").endswith(f"align dpo --resume '{run}')")
    assert hint("ppo", "--resume", str(run), "save_every=5").endswith(f"align ppo --resume '{run}')")
    assert hint("ppo", f"--resume={run}").endswith(f"align ppo --resume '{run}')")
    # an earlier run's folder (overwrite=true): stopped before this run replaced it, its checkpoints are not this run's
    os.utime(run / "config.yaml", (began - 60, began - 60))
    assert hint("dpo", f"output_dir={run}", "overwrite=true").endswith("before it began writing its run folder: run "
                                                                       "the command again)")
    assert hint("dpo", f"--resume={run}").endswith(f"align dpo --resume '{run}')")  # resumed: the run's own
    assert "--continue" in hint("demo", "--out", "d")
    assert "--serve serves it again" in hint("demo", "--serve", "--out", "d")
    assert hint("export", "run", "--out", "x") == ""


@pytest.mark.parametrize("error", [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")])
def test_a_full_or_read_only_disk_is_one_line_with_the_way_back(monkeypatch, capsys, tmp_path, error):
    import typer

    import align.commands.cli as cli

    checkpoint = tmp_path / "run" / "checkpoints" / "iter-000004"
    failing = typer.Typer()

    @failing.command()
    def ppo(overrides: list[str]) -> None:
        raise OSError(*error, str(checkpoint))

    monkeypatch.setattr(cli, "app", failing)
    monkeypatch.setattr(cli, "_register_stages", lambda: None)
    with pytest.raises(SystemExit) as info:
        cli.main(["ppo", f"output_dir={tmp_path / 'run'}"])
    assert info.value.code == 1
    assert capsys.readouterr().err == (f"error: {error[1]} writing {checkpoint} (it stopped before it began writing "
                                       "its run folder: run the command again)\n")


def test_a_stage_stopped_by_sigterm_says_how_it_continues_and_dies_of_the_signal(tmp_path):
    # a scheduler's preemption: one line with the way back in, then the signal's own exit status
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    (run / "checkpoints" / "iter-000002").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    script = f"""
import time, typer
import align.commands.cli as cli
app = typer.Typer()
@app.command(context_settings={{"allow_extra_args": True, "ignore_unknown_options": True}})
def ppo() -> None:
    open({str(tmp_path / 'ready')!r}, 'w').close()
    time.sleep(60)
cli.app, cli._register_stages = app, lambda: None
cli.main(["ppo", "--resume", {str(run)!r}])
"""
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGTERM
    assert err == f"terminated (the run continues from its latest checkpoint: align ppo --resume {run})\n"


def test_the_commands_are_registered_once_however_often_main_runs(capsys):
    # each in-process call added every command again, and typer built every copy on each later call
    from align.commands import cli

    for _ in range(3):
        with pytest.raises(SystemExit):
            cli.main(["--help"])
    commands = [c.name for c in cli.app.registered_commands]
    assert len(commands) == len(set(commands)) and {"ppo", "dpo", "export", "demo"} <= set(commands)
    assert sorted(g.name for g in cli.app.registered_groups) == ["annotate", "reward"]


@pytest.mark.parametrize("env, expected", [
    ({}, "progress\nwarning\n"),
    ({"RANK": "1"}, "progress\nwarning\n"),  # RANK alone (a job's pod, a wrapper script): one process, all lines
    ({"RANK": "1", "LOCAL_RANK": "1"}, "[rank 1] warning\n"),  # a launch's second process: warnings alone
    ({"RANK": "0", "LOCAL_RANK": "0"}, "progress\nwarning\n"),
])
def test_progress_lines_come_from_the_first_process_of_a_launch(env, expected):
    import os

    code = ("import logging; from align.commands.cli import configure_logging; configure_logging(); "
            "log = logging.getLogger('align'); log.info('progress'); log.warning('warning')")
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == expected, done.stderr


def test_a_launchs_rank_dies_with_its_launcher_but_not_of_a_launcher_that_is_process_1(monkeypatch):
    # in a container that runs the launch as its command the launcher is process 1 (a rank that took that
    # for "adopted by init" killed itself at start); a launcher gone before the request: the rank ends
    import ctypes
    import os
    import signal

    from align.commands import cli

    monkeypatch.undo()  # the real _end_with_launcher (tests/conftest.py stands it in), on stand-in libc and kill

    requested, killed = [], []

    class Libc:
        def prctl(self, option, sig):
            requested.append((option, sig))

    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: Libc())
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append((pid, sig)))
    monkeypatch.setenv("LOCAL_RANK", "0")
    for parents, dies in (([1, 1], False), ([4242, 4242], False), ([4242, 1], True), ([4242, 77], True)):
        monkeypatch.setattr(os, "getppid", iter(parents).__next__)
        requested.clear(), killed.clear()
        cli._end_with_launcher()
        assert requested == [(1, signal.SIGKILL)]  # PR_SET_PDEATHSIG
        assert killed == ([(os.getpid(), signal.SIGKILL)] if dies else [])
    monkeypatch.delenv("LOCAL_RANK")
    requested.clear()
    cli._end_with_launcher()
    assert requested == []  # not a launch's rank: untouched
