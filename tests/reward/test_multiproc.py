"""Two CPU ranks through accelerate (gloo), accumulating micro-batches, train the same model as one process
without them, within noise."""

import json
from pathlib import Path

import pytest
import torch

from align.run import read_metrics
from tests.launch import LAUNCHERS, run_align

# batches of 15 rankings split 8 + 7 and a last one of 6 (3 + 3), every term of the loss on: the ranks'
# averaged gradients are the one-process gradients only if each rank weighs its part by the global counts
ARGS = ["model.max_length=160", "data.num_rankings=96", "data.num_eval_rankings=30", "train.batch_size=15",
        "train.mismatch_coef=1.0", "train.center_coef=0.1", "train.learning_rate=3e-3", "eval.normalize_prompts=8",
        "eval.normalize_response_length=16", "train.num_threads=1", "train.log_every=1"]


@pytest.fixture(scope="module")
def single_process_run(tiny_random_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reward-single") / "run"
    single = run_align("reward", "train", f"output_dir={out}", f"model.name_or_path={tiny_random_model}", *ARGS)
    assert single.returncode == 0, single.stderr[-3000:]
    return out


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_cpu_ranks_match_single_process(launcher, tiny_random_model, single_process_run, tmp_path):
    from safetensors.torch import load_file

    # each rank's 8 rankings a step in 2 micro-batches (DDP: gradients averaged over the ranks on the second)
    multi = run_align("reward", "train", f"output_dir={tmp_path / 'multi'}", f"model.name_or_path={tiny_random_model}",
                      *ARGS, "train.gradient_accumulation_steps=2", launcher=launcher)
    assert multi.returncode == 0, multi.stderr[-3000:]
    m = json.loads((tmp_path / "multi" / "summary.json").read_text())
    s = json.loads((single_process_run / "summary.json").read_text())
    assert m["train/num_processes"] == 2 and s["train/num_processes"] == 1
    assert m["train/responses_forwarded"] == s["train/responses_forwarded"]  # every response once, across both ranks
    assert m["train/steps"] == s["train/steps"]
    # same global batches, gradients averaged over the ranks: the same model up to float reduction order
    assert abs(m["eval/accuracy"] - s["eval/accuracy"]) <= 0.02
    assert abs(m["eval/loss"] - s["eval/loss"]) <= 0.02
    # the logged statistics are the global batch's (sums over the ranks), not the mean of the ranks' 8 and 7
    for multi_row, single_row in zip(read_metrics(tmp_path / "multi" / "metrics.jsonl"),
                                     read_metrics(single_process_run / "metrics.jsonl"), strict=True):
        for key in ("train/accuracy", "train/reward_margin", "train/reward_mean", "train/reward_std", "train/lr"):
            assert multi_row[key] == pytest.approx(single_row[key], rel=1e-3, abs=1e-5), (key, multi_row["step"])
    # the checkpoint written from the ranks' shards (FSDP2: gathered on the main rank) is the one-rank model's
    multi_weights, single_weights = (load_file(str(d / "model" / "model.safetensors"))  # full fine-tuning
                                     for d in (tmp_path / "multi", single_process_run))
    assert multi_weights.keys() == single_weights.keys() and multi_weights
    for name, value in single_weights.items():
        torch.testing.assert_close(multi_weights[name], value, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.multiproc
def test_ranks_whose_parts_cut_into_unequal_length_slices_finish(tiny_random_model, tmp_path):
    # the last batch of 3 split 2 + 1: with the mismatch term each ranking is K+1 = 5 responses, so one rank
    # cuts its 10 into 4 length slices and the other reads its 5 whole, forwarding the DDP module 5 times
    # against 2; a collective in each forward (DDP's buffer broadcast) left both ranks waiting for ever
    out = tmp_path / "run"
    run = run_align("reward", "train", f"output_dir={out}", f"model.name_or_path={tiny_random_model}",
                    "model.max_length=160", "data.num_rankings=19", "data.num_eval_rankings=8", "data.k=4",
                    "train.batch_size=8", "train.length_buckets=4", "train.mismatch_coef=1.0", "train.num_threads=1",
                    "eval.normalize=false", launcher="ddp", timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["train/steps"] == 3
