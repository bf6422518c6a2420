"""Two CPU processes under `accelerate launch` (DDP, gloo) finish a run with identical weights."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from tests.launch import ACCELERATE_LAUNCH, REPO, free_port


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_cpu_ranks_finish_with_identical_parameters(small_run, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    overrides = [o for o in small_run if not o.startswith("output_dir=")] + [f"output_dir={run}", "save_every=2"]
    # --multi_gpu without --cpu: with no GPU this starts two CPU processes on gloo
    # (`--cpu --num_processes 2` would silently start one).
    cmd = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(REPO / "tests" / "ppo" / "ddp_worker.py"), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    rank0 = load_file(str(run / "per_rank" / "rank0.safetensors"))
    rank1 = load_file(str(run / "per_rank" / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
    assert any(rank0[n].abs().sum() > 0 for n in rank0 if n.startswith("value_head.")), "nothing was trained"

    # batch_size counts both ranks' episodes: each rolled out its half of what one process would draw.
    info0, info1 = (json.loads((run / "per_rank" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert info0["episodes"] == info1["episodes"] == 8 // 2
    assert info0["first_prompts"] != info1["first_prompts"]
    assert info0["first_prompts"] + info1["first_prompts"] == info0["one_process_prompts"]
    # the DDP module outlives the trainer: freed, its reducer could deadlock the rank's exit in gloo's teardown
    for rank in (0, 1):
        assert json.loads((run / "per_rank" / f"rank{rank}_after.json").read_text())["ddp_modules_alive"] == 1

    summary = json.loads((run / "summary.json").read_text())
    assert summary["train/num_processes"] == 2 and summary["episodes"] == 3 * 8
    assert (run / "checkpoints" / "iter-000002" / "rng_states.pt").exists()
    assert len(torch.load(run / "checkpoints" / "iter-000002" / "rng_states.pt", weights_only=False)) == 2
