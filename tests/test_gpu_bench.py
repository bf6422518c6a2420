"""The GPU benchmark's align side at a tiny shape on the CPU, so the script cannot rot unnoticed
(tokenizer and Qwen2 build, reward training, both value modes and the variants, the table; a side
that fails, TRL that cannot be installed included, is reported without hiding the others' rows),
and bench/gpu_session.sh's control flow with a stand-in interpreter (order, deadline, archive)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "bench" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_align_side_runs_at_a_tiny_shape_on_the_cpu(shared_data, tmp_path, monkeypatch):
    import json

    import pytest

    bench = load_bench()
    real_run_worker = bench.run_worker

    rows_written = []

    def critic_breaks(python, kind, job, workdir, env_extra):
        results = tmp_path / "tiny" / "results.json"
        if kind == "align":
            rows_written.append(set(json.loads(results.read_text())["runs"]) if results.exists() else None)
        if job.get("value_model") == "reward_model":
            raise RuntimeError("the align run failed (exit 1); planted")
        if job.get("overrides"):  # a variant of the same worker by its overrides: run here (no process's start-up)
            workdir.mkdir(parents=True, exist_ok=True)
            return bench.WORKERS[kind](job)
        return real_run_worker(python, kind, job, workdir, env_extra)

    monkeypatch.setattr(bench, "run_worker", critic_breaks)
    no_wheels = tmp_path / "wheels"  # TRL cannot be installed: pip may not try the index, the folder is empty
    no_wheels.mkdir()
    with pytest.raises(SystemExit) as exit_info:  # a failed side: exit 1 after the others' figures
        bench.main(["--shape", "tiny", "--device", "cpu", "--trl-wheels", str(no_wheels), "--data", str(shared_data),
                    "--work", str(tmp_path), "--iterations", "2", "--batch-size", "4", "--micro-batch-size", "2",
                    "--epochs", "1", "--response-length", "8", "--reward-steps", "2", "--reward-batch-size", "2",
                    "--threads", "1", "--sample-merged", "--eager", "policy_trunk", "--uncompiled", "--profile",
                    "--fsdp", "--roads"])
    assert exit_info.value.code == 1
    out = json.loads((tmp_path / "tiny" / "results.json").read_text())
    assert out["model"]["vocab"] > 256 and out["reward"]["steps"] == 2
    assert set(out["versions"]) == {"torch", "transformers", "peft", "accelerate", "cuda"}
    assert set(out["runs"]) == {"align (value head)", "align (value head, eager)", "align (merged sampling)",
                                "align (not compiled)", "align (profiled)", "align (FSDP2, 1 process)",
                                "align RLOO", "align GRPO"}
    assert set(out["failed"]) == {"align (critic)", "TRL 1.12.0"}
    assert out["failed"]["TRL 1.12.0"].startswith("pip could not install trl==1.12.0 (exit ")
    assert not (tmp_path / "trl" / "trl" / "trl").exists()
    # results.json is rewritten after every row: the second row's start finds the first's figures
    assert rows_written[:2] == [None, {"align (value head)"}] and len(rows_written) == 9
    assert out["peak_tflops"] is None and out["peak_source"] == "cpu: no MFU"
    for run in out["runs"].values():
        assert len(run["iterations"]) == 2
        for i in run["iterations"]:
            assert 0 < i["timing/sample_s"] <= i["timing/rollout_s"] < i["timing/iteration_s"]
    lines = out["table"].splitlines()
    assert lines[0].split()[:4] == ["run", "s/iter", "rollout", "sample"] and len(lines) == 10
    assert "reserved" in lines[0] and all(run["reserved_gib"] is None for run in out["runs"].values())  # the CPU
    profile = (tmp_path / "tiny" / "profile" / "profile.txt").read_text()
    assert "aten::" in profile and "Self CPU" in profile
    # --reuse takes the model and the reward model only as this run would build them
    common = ["--shape", "tiny", "--device", "cpu", "--no-trl", "--data", str(shared_data), "--work", str(tmp_path),
              "--reuse", "--value-models", ""]
    with pytest.raises(SystemExit, match=r"--reuse: the model in .* was built with 0, this run asks for 1"):
        bench.main([*common, "--seed", "1"])
    with pytest.raises(SystemExit, match=r"--reuse: the reward model in .*'reward_steps': 2.*'reward_steps': 3"):
        bench.main([*common, "--reward-steps", "3", "--reward-batch-size", "2", "--threads", "1"])


def test_mfu_flop_count_of_one_iteration():
    # trunk 1000 on every token, output layer 10 x 64 = 640 on response tokens; 2 episodes, prompt 3 +
    # response 5 = 8 tokens. Rollout: sampling, pi_old, pi_ref: trunk 2 x 1000 x 3 x 16 = 96,000, head
    # 2 x 640 x 3 x 10 = 38,400. Scoring: trunk only, 2 x 1000 x 16 = 32,000. One epoch: 6 x (1000 x 16
    # + 640 x 10) = 134,400. Total 300,800.
    from bench import gpu_report as bench
    settings = {"shape": "tiny", "batch_size": 2, "epochs": 1}
    info = {"non_embedding": 1000, "vocab": 10}
    phases = bench.phase_flops(info, settings, 3, 5, critic=False)
    assert phases == {"rollout": 134_400, "score": 32_000, "optimise": 134_400}
    assert bench.flops_per_iteration(info, settings, 3, 5, critic=False) == 300_800
    # a critic adds its forward (2 x 1000 x 16) and its training (6 x 1000 x 16)
    assert bench.flops_per_iteration(info, settings, 3, 5, critic=True) == 300_800 + 128_000


def test_peak_flops_are_told_apart_by_the_device_name():
    from bench import gpu_report as bench
    assert bench.peak_tflops_of("NVIDIA H100 80GB HBM3")[0] == 989.0  # SXM
    assert bench.peak_tflops_of("NVIDIA H100 PCIe")[0] == 756.0
    assert bench.peak_tflops_of("NVIDIA H100 NVL")[0] == 835.0
    assert bench.peak_tflops_of("NVIDIA H200 NVL")[0] == 835.0
    tflops, source = bench.peak_tflops_of("NVIDIA H200")
    assert tflops == 989.0 and "H200" in source
    assert bench.peak_tflops_of("Tesla T4") == (None, "unknown device: no MFU (--peak-tflops sets one)")


STAND_IN = """#!/bin/bash
# python as gpu_session.sh calls it: pytest passes, gpu_bench.py writes what its workers would
echo "$*" >> "$CALLS"
[ "$1" = -m ] && exit 0
shape=0.5b work=
while [ $# -gt 0 ]; do case $1 in --shape) shape=$2;; --work) work=$2;; esac; shift; done
mkdir -p "$work/$shape/policy_trunk" "$work/$shape/model"
tail -1 "$CALLS" > "$work/$shape/results.json"
echo "a worker's warning: could not be captured as a CUDA graph" > "$work/$shape/policy_trunk/align.log"
echo weights > "$work/$shape/model/model.safetensors"
"""


def run_session(tmp_path, **env):
    import os
    import subprocess

    python = tmp_path / "python"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "PYTHON": str(python), "CALLS": str(tmp_path / "calls"),
           "WORK": str(tmp_path / "work"), "DATA": str(tmp_path / "data"), **env}
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_session.sh")], env=env, capture_output=True, text=True,
                          timeout=120)


def test_gpu_session_runs_the_cuda_tests_first_and_archives_every_step_under_its_own_name(tmp_path):
    import tarfile

    done = run_session(tmp_path, OUT=str(tmp_path / "out"), WHEELS=str(tmp_path / "wheels"))  # OUT_DIR: $OUT
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0].startswith("-m pytest tests/cuda") and len(calls) == 6
    assert "--trl-wheels" in calls[1] and "--no-trl" not in calls[1] and "--reuse" not in calls[1]
    assert "--roads" in calls[3] and "--shape 1.5b" in calls[4] and "--response-length 256" in calls[5]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["work.tgz"]  # the device returns few files
    with tarfile.open(tmp_path / "out" / "work.tgz") as archive:
        names = {n.removeprefix("./") for n in archive.getnames()}

        def text(name):
            return archive.extractfile("./" + name).read().decode()

        # each step's results under its own name, though the steps rewrite one file in WORK
        assert text("bench-0.5b/0.5b/results.json").strip() == calls[1]
        assert text("bench-roads/0.5b/results.json").strip() == calls[3]
        assert text("bench-critic-256/0.5b/results.json").strip() == calls[5]
        assert text("bench-1.5b/1.5b/results.json").strip() == calls[4]
        assert "could not be captured" in text("bench-0.5b/0.5b/policy_trunk/align.log")
        assert "cuda-tests/step.log" in names and not any(n.endswith(".safetensors") for n in names)


def test_gpu_session_refuses_a_deadline_past_the_device_limit_and_skips_what_does_not_fit(tmp_path):
    refused = run_session(tmp_path, OUT_DIR=str(tmp_path / "out"), DEADLINE_S="600")
    assert refused.returncode == 2 and "DEADLINE_S=600" in refused.stderr and "570" in refused.stderr
    assert not (tmp_path / "calls").exists() and not (tmp_path / "out").exists()
    short = run_session(tmp_path, OUT_DIR=str(tmp_path / "out"), DEADLINE_S="45")  # 45 - 20 s: under a step's 30
    assert short.returncode == 0 and short.stdout.count("skipped") == 6 and not (tmp_path / "calls").exists()
