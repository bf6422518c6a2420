"""kill -9 a run after its second checkpoint, `--resume` it: it ends where an uninterrupted run ends."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from align.run import read_metrics
from tests.resume_checks import assert_rows_kept

REPO = Path(__file__).resolve().parents[2]


def align_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from align.commands.cli import main; main()", *args]


def align_cmd_recording_iterations(record: Path, *args: str) -> list[str]:
    """align_cmd, and the number of each PPO iteration the process performs is appended to `record`."""
    program = ("import sys; from ppo.trainer import PPOTrainer; from tests.resume_checks import recording_steps; "
               "record = open(sys.argv.pop(1), 'a'); PPOTrainer.step = recording_steps(PPOTrainer.step, 'iteration', "
               "lambda n: print(n, file=record, flush=True)); from align.commands.cli import main; main()")
    return [sys.executable, "-c", program, str(record), *args]


def rows_left_by_kill(path: Path) -> list[dict]:
    """The metrics rows a killed run left, but for a last line the kill cut short."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def run_env() -> dict[str, str]:
    # Same thread count in every process, so the float reductions happen in the same order.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("timing/")} for r in rows]


def assert_close_rows(a: list[dict], b: list[dict], tol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for row_a, row_b in zip(a, b):
        assert row_a.keys() == row_b.keys()
        for key in row_a:
            assert row_a[key] == pytest.approx(row_b[key], abs=tol), f"iteration {row_a['iteration']}: {key}"


@pytest.mark.slow
def test_sigkill_after_second_checkpoint_then_resume_matches_uninterrupted_run(small_run, tmp_path):
    overrides = [o for o in small_run if not o.startswith(("output_dir=", "num_iterations=", "save_every="))]
    overrides += ["num_iterations=10", "save_every=2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    done = subprocess.run(align_cmd("ppo", *overrides, f"output_dir={straight}"), env=run_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(align_cmd("ppo", *overrides, f"output_dir={killed}"), env=run_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    second = killed / "checkpoints" / "iter-000004"
    deadline = time.monotonic() + 300
    while not second.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    assert second.exists() and not (killed / "summary.json").exists(), "the run was not interrupted mid-way"
    before = rows_left_by_kill(killed / "metrics.jsonl")
    assert [r["iteration"] for r in before][:4] == [1, 2, 3, 4]

    # the resumed process performs iterations 5-10, once each, and writes their rows after the killed run's
    # first four (a run that trained again from iteration 0 ends with the same rows, policy and summary)
    record = tmp_path / "iterations.txt"
    resumed = subprocess.run(align_cmd_recording_iterations(record, "ppo", "--resume", str(killed)), env=run_env(),
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert record.read_text().split() == [str(i) for i in range(5, 11)]
    new = assert_rows_kept(before, read_metrics(killed / "metrics.jsonl"), "iteration", 4)
    assert [r["iteration"] for r in new] == list(range(5, 11))

    assert_close_rows(comparable(read_metrics(killed / "metrics.jsonl")),
                      comparable(read_metrics(straight / "metrics.jsonl")))
    summary_a = json.loads((killed / "summary.json").read_text())
    summary_b = json.loads((straight / "summary.json").read_text())
    keys = [k for k in summary_b if k.startswith(("eval/", "objective/", "policy/", "val/"))]
    assert "eval/reward_policy" in keys
    for key in keys:
        assert summary_a[key] == pytest.approx(summary_b[key], abs=1e-5), key
