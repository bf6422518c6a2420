"""Two CPU ranks through accelerate (gloo) train the same model as one process, within noise."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_cpu_ranks_match_single_process(tiny_random_model, tmp_path):
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    args = [f"model.name_or_path={tiny_random_model}", "model.max_length=160", "data.num_rankings=96", "data.num_eval_rankings=30",
            "train.batch_size=16", "train.learning_rate=3e-3", "eval.normalize_prompts=8", "eval.normalize_max_new_tokens=16",
            "train.num_threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    multi = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "align", "reward", "train", f"output_dir={tmp_path / 'multi'}", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "align", "reward", "train", f"output_dir={tmp_path / 'single'}", *args],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    m = json.loads((tmp_path / "multi" / "summary.json").read_text())
    s = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert m["train/num_processes"] == 2 and s["train/num_processes"] == 1
    assert m["train/forward_passes"] == s["train/forward_passes"]  # every response once, across both ranks
    assert m["train/steps"] == s["train/steps"]
    # same global batches, gradients averaged by DDP: the same model up to float reduction order
    assert abs(m["eval/accuracy"] - s["eval/accuracy"]) <= 0.02
    assert abs(m["eval/loss"] - s["eval/loss"]) <= 0.02
