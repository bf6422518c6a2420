"""`align` in processes of its own: one, or two CPU ranks through `accelerate launch` (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from annotation.devserver import free_port

REPO = Path(__file__).resolve().parents[1]
# `accelerate launch` of the interpreter running the tests, not whichever `accelerate` is first on PATH
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LAUNCHERS = {  # --multi_gpu without --cpu: with no GPU, two CPU processes on gloo
    "ddp": ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no"],
    "fsdp2": ["--config_file", str(REPO / "configs" / "accelerate" / "fsdp2_cpu.yaml")],
}


def run_align(*args: str, launcher: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m align ARGS` in one process, or under `accelerate launch` with LAUNCHERS[launcher]."""
    if launcher is None:
        cmd = [sys.executable, "-m", "align", *args]
    else:
        cmd = [*ACCELERATE_LAUNCH, *LAUNCHERS[launcher], "--main_process_port", str(free_port()), "-m", "align", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)
