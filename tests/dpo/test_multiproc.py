"""`align dpo` on two CPU ranks through accelerate (gloo; DDP and FSDP2), each accumulating its half
of a batch over micro-batches, trains the adapter one process trains in whole batches, and
evaluates the same held-out rankings; ranks with parts of unequal size run as many forwards; a
sharded run resumes from its sharded checkpoint to the adapter it ends with uninterrupted."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from align.run import read_metrics
from tests.launch import LAUNCHERS, run_align


def dpo_args(tiny_random_model, out: Path) -> list[str]:
    # 65 rankings: 9 batches of 7 split 4 + 3 and a last one of 2: the mean of the ranks' gradients is the
    # batch's only if each rank weighs its part by the global batch's size
    return [f"policy_model={tiny_random_model}", f"output_dir={out}", "data.num_rankings=65",
            "data.num_eval_rankings=16", "data.k=3", "batch_size=7", "epochs=1", "learning_rate=5e-3",
            "num_eval_prompts=4", "response_length=8", "progress=false", "seed=1", "num_threads=1", "log_every=1"]


@pytest.fixture(scope="module")
def single_process_run(tiny_random_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dpo-single") / "run"
    single = run_align("dpo", *dpo_args(tiny_random_model, out))
    assert single.returncode == 0, single.stderr[-3000:]
    return out


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_cpu_ranks_train_the_one_process_adapter(launcher, tiny_random_model, single_process_run, tmp_path):
    from peft import PeftConfig
    from safetensors.torch import load_file

    # each rank's 4 or 3 rankings in two micro-batches (DDP averages the gradients on the second)
    multi = run_align("dpo", *dpo_args(tiny_random_model, tmp_path / "multi"), "gradient_accumulation_steps=2",
                      launcher=launcher)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert multi.stderr.count("policy: LoRA on") == 1  # progress lines come from the first process alone
    assert multi.stdout.count("run directory:") == 1  # and the closing lines
    m = json.loads((tmp_path / "multi" / "summary.json").read_text())
    s = json.loads((single_process_run / "summary.json").read_text())
    assert (m["train/num_processes"], s["train/num_processes"]) == (2, 1)
    assert m["train/steps"] == s["train/steps"] > 1 and m["train/examples"] == s["train/examples"]
    assert m["train/responses_forwarded"] == s["train/responses_forwarded"]  # each rank half of every batch
    # the held-out rankings, computed half on each rank and gathered: the same rankings, the same verdicts
    assert m["eval/num_rankings"] == s["eval/num_rankings"] > 0 and m["eval/num_pairs"] == s["eval/num_pairs"]
    assert abs(m["eval/accuracy"] - s["eval/accuracy"]) <= 0.02
    assert abs(m["eval/loss"] - s["eval/loss"]) <= 0.02
    assert m["eval/num_prompts"] == s["eval/num_prompts"] == 4  # held-out samples (FSDP2: every rank, gathered)
    # the logged statistics are the global batch's (sums over the ranks), not the mean of the ranks' 4 and 3
    # rankings: margins up to float rounding; accuracy from step 2 (at step 1 the policy is the reference
    # and every margin is rounding), up to one of a batch's 21 pairs decided by rounding
    for multi_row, single_row in zip(read_metrics(tmp_path / "multi" / "metrics.jsonl"),
                                     read_metrics(single_process_run / "metrics.jsonl"), strict=True):
        where = f"step {single_row['step']}"
        assert multi_row["train/lr"] == single_row["train/lr"], where
        assert multi_row["train/reward_margin"] == pytest.approx(single_row["train/reward_margin"], abs=1e-4), where
        assert multi_row["train/logps_policy_minus_ref"] == pytest.approx(single_row["train/logps_policy_minus_ref"],
                                                                          abs=1e-3), where
        if single_row["step"] > 1:
            assert multi_row["train/accuracy"] == pytest.approx(single_row["train/accuracy"], abs=0.05), where
    # the adapter written by the main rank (FSDP2: gathered from the shards) is the one-process adapter, up
    # to float rounding. FSDP2 reads whole sequences where one process continues each prompt's cache, and
    # AdamW, dividing by the root of the second moment, turns rounding in a near-zero gradient into a step of
    # up to the learning rate: measured, 1 element of 17,408 off by 2.7e-4 (DDP: none past 2.6e-5), where
    # ranks weighing their parts by their own size instead of the batch's are off by 3.2e-2.
    atol = 1e-3 if launcher == "fsdp2" else 1e-4
    multi_weights, single_weights = (load_file(str(d / "policy" / "adapter_model.safetensors"))
                                     for d in (tmp_path / "multi", single_process_run))
    assert multi_weights.keys() == single_weights.keys() and multi_weights
    moved = 0.0
    for name, value in single_weights.items():
        torch.testing.assert_close(multi_weights[name], value, rtol=1e-3, atol=atol, msg=name)
        moved = max(moved, value.abs().max().item() if "lora_B" in name else 0.0)
    assert moved > 1e-2  # lora_B starts at 0: the adapters moved 10-100x the tolerance
    assert PeftConfig.from_pretrained(tmp_path / "multi" / "policy").base_model_name_or_path == str(tiny_random_model)


@pytest.mark.multiproc
@pytest.mark.slow
def test_sharded_ranks_with_unequal_parts_run_as_many_checkpointed_forwards(tiny_random_model, tmp_path):
    # batches of 7 split 4 + 3, 4 steps asked: both ranks run 3 micro-batches (under FSDP2 each forward
    # gathers the weights from both ranks; a rank running a fourth would wait for the other until the timeout)
    out = tmp_path / "run"
    run = run_align("dpo", *dpo_args(tiny_random_model, out), "batch_size=7", "gradient_accumulation_steps=4",
                    "gradient_checkpointing=true", "num_eval_prompts=0", launcher="fsdp2", timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train/num_processes"] == 2 and summary["train/steps"] == 10
    assert summary["train/responses_forwarded"] == 65 * 3


@pytest.mark.multiproc
@pytest.mark.slow
def test_sharded_run_resumes_from_its_checkpoint_to_the_same_adapter(tiny_random_model, tmp_path):
    from safetensors.torch import load_file

    from align.run import read_metrics

    out = tmp_path / "run"
    args = [*dpo_args(tiny_random_model, out), "gradient_accumulation_steps=2", "save_every=4", "num_eval_prompts=0"]
    first = run_align("dpo", *args, launcher="fsdp2", timeout=180)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000004", "step-000008"]
    assert (checkpoints / "step-000004" / "sharded").is_dir()  # each rank wrote its shards
    adapter = load_file(str(out / "policy" / "adapter_model.safetensors"))
    rows = [{k: v for k, v in r.items() if not k.startswith("timing/")} for r in read_metrics(out / "metrics.jsonl")]
    summary = json.loads((out / "summary.json").read_text())

    # back to where the run stood after step 4: what it wrote later removed
    shutil.rmtree(checkpoints / "step-000008")
    shutil.rmtree(out / "policy")
    (out / "summary.json").unlink()
    resumed = run_align("dpo", "--resume", str(out), launcher="fsdp2", timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = load_file(str(out / "policy" / "adapter_model.safetensors"))
    assert again.keys() == adapter.keys() and adapter
    for name, value in adapter.items():
        torch.testing.assert_close(again[name], value, rtol=0, atol=1e-6, msg=name)
    rows_again = [{k: v for k, v in r.items() if not k.startswith("timing/")}
                  for r in read_metrics(out / "metrics.jsonl")]
    assert [r["step"] for r in rows_again] == [r["step"] for r in rows] == list(range(1, 11))  # log_every=1
    for row, want in zip(rows_again, rows):
        assert row == pytest.approx(want, abs=1e-6)
    summary_again = json.loads((out / "summary.json").read_text())
    for key in ("eval/accuracy", "eval/loss", "train/responses_forwarded", "train/steps"):
        assert summary_again[key] == pytest.approx(summary[key], abs=1e-6), key


@pytest.mark.multiproc
@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_a_batch_smaller_than_the_processes_is_one_line_before_anything_loads(stage, tiny_random_model, tmp_path):
    args = (["dpo", *dpo_args(tiny_random_model, tmp_path / "run"), "batch_size=1"] if stage == "dpo" else
            ["reward", "train", f"model.name_or_path={tiny_random_model}", f"output_dir={tmp_path / 'run'}",
             "train.batch_size=1"])
    run = run_align(*args, launcher="ddp", timeout=120)
    # every rank meets it and exits; the first to meet it says it in one line (torchrun then reports
    # the failed children its own way)
    assert run.returncode != 0
    assert run.stderr.count("batch_size=1 is smaller than the 2 processes") == 1
    assert not re.search(r'File "[^"]*/(align|dpo|reward)/', run.stderr)  # no traceback of align's own
    assert not (tmp_path / "run").exists()
