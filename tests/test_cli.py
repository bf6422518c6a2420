"""The `align` command line: fast help, and user mistakes as one line with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

STAGES = ["annotate", "reward", "ppo", "export", "demo", "init-demo-model"]


def run_align(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_stage_without_importing_torch():
    code = (
        "import sys\n"
        "from align.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'fastapi', 'sqlalchemy') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for stage in STAGES:
        assert stage in out.stdout
    assert "HEAVY []" in out.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["init-demo-model", "--size", "huge", "--out", "/tmp/align-never-written"], "unknown demo model size 'huge'"),
        (["no-such-stage"], "No such command"),
    ],
)
def test_user_mistakes_exit_2_without_traceback(args, expected):
    out = run_align(*args)
    assert out.returncode == 2
    assert expected in out.stderr
    assert "Traceback" not in out.stderr
