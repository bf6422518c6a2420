"""PPO sharded with FSDP2 on two CPU ranks (gloo), launched through `accelerate launch` with the
shipped configs/accelerate/fsdp2_cpu.yaml and fsdp2_multinode.yaml: one optimiser step equals one rank's (under
DDP too, ddp_cpu.yaml), with ranks whose responses differ in length; each rank stores half the frozen weights, two "machines" meet on localhost, a killed run resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.launch import ACCELERATE_LAUNCH, REPO, free_port

FSDP_CONFIG = REPO / "configs" / "accelerate" / "fsdp2_cpu.yaml"
DDP_CONFIG = REPO / "configs" / "accelerate" / "ddp_cpu.yaml"
MULTINODE_CONFIG = REPO / "configs" / "accelerate" / "fsdp2_multinode.yaml"
WORKER = REPO / "tests" / "ppo" / "fsdp_worker.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def accelerate_launch(*args: str, machine: int | None = None, port: int | None = None) -> list[str]:
    """The command line of `accelerate launch` with a shipped FSDP2 config: fsdp2_cpu.yaml (2 processes
    on this machine) or, given `machine`, fsdp2_multinode.yaml as that machine of 2 (one process each,
    machine 0 at 127.0.0.1)."""
    cmd = [*ACCELERATE_LAUNCH, "--main_process_port", str(port or free_port())]
    if machine is None:
        return [*cmd, "--config_file", str(FSDP_CONFIG), *args]
    return [*cmd, "--config_file", str(MULTINODE_CONFIG), "--num_processes", "2", "--machine_rank", str(machine),
            "--main_process_ip", "127.0.0.1", *args]


def run(cmd: list[str], timeout: int = 300) -> None:
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]


def step_overrides(ppo_policy_path: Path, random_reward_model: Path) -> list[str]:
    return [f"policy_model={ppo_policy_path}", f"reward_model={random_reward_model}", "num_prompts=16",
            "num_eval_prompts=0", "response_length=5", "learning_rate=1e-2", "progress=false", "seed=3"]


def assert_same_step(one_dir: Path, two_dir: Path) -> None:
    """The two-rank step (each rank half the rows, one with 1-2 response tokens a row, the other 5)
    is the one-rank step on the whole batch."""
    from safetensors.torch import load_file

    one_before, one = load_file(str(one_dir / "before.safetensors")), load_file(str(one_dir / "step.safetensors"))
    two_before, two = load_file(str(two_dir / "before.safetensors")), load_file(str(two_dir / "step.safetensors"))
    assert one.keys() == two.keys() and any(".lora_B." in k for k in one)
    for name in one:  # the same start, a real update, and the same update up to float rounding
        assert torch.equal(one_before[name], two_before[name]), name
    update = max((one[k] - one_before[k]).abs().max().item() for k in one)
    assert update > 1e-3
    for name in one:  # tolerance: 1e-4 of the step's largest change (gloo sums the halves in another order)
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-4 * update, msg=name)
    # the logged statistics are the token means of the whole batch, the loss optimised, as in one rank (a
    # plain mean of the ranks' own token means weighs rank 0's 1-2 token responses as rank 1's 5)
    one_stats, two_stats = (json.loads((d / "stats.json").read_text()) for d in (one_dir, two_dir))
    assert one_stats.keys() == two_stats.keys() and {"policy/loss", "val/loss", "train/loss"} <= one_stats.keys()
    for key, value in one_stats.items():
        assert two_stats[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_one_ddp_step_on_two_ranks_matches_one_rank(ppo_policy_path, random_reward_model, tmp_path):
    overrides = step_overrides(ppo_policy_path, random_reward_model)
    run([sys.executable, str(WORKER), str(tmp_path / "one"), *overrides, f"output_dir={tmp_path / 'run-one'}"])
    run([*ACCELERATE_LAUNCH, "--main_process_port", str(free_port()),
         "--config_file", str(DDP_CONFIG), str(WORKER), str(tmp_path / "two"), *overrides,
         f"output_dir={tmp_path / 'run-two'}"])
    assert json.loads((tmp_path / "two" / "rank1.json").read_text())["world"] == 2
    assert_same_step(tmp_path / "one", tmp_path / "two")


def test_one_step_on_two_machines_matches_one_rank(ppo_policy_path, random_reward_model, tmp_path):
    overrides = step_overrides(ppo_policy_path, random_reward_model)
    # one process, unsharded: the reference step on the whole batch
    run([sys.executable, str(WORKER), str(tmp_path / "one"), *overrides, f"output_dir={tmp_path / 'run-one'}"])
    # two "machines" of one process each rendezvous on localhost (accelerate's multi-node path)
    port = free_port()
    machines = [subprocess.Popen(accelerate_launch(str(WORKER), str(tmp_path / "two"), *overrides,
                                                   f"output_dir={tmp_path / 'run-two'}", machine=r, port=port),
                                 cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for r in (0, 1)]
    for machine in machines:
        out, _ = machine.communicate(timeout=300)
        assert machine.returncode == 0, out[-4000:]

    assert_same_step(tmp_path / "one", tmp_path / "two")

    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["sharded"] for r in ranks)
    total = ranks[0]["frozen_total"]
    assert sum(r["frozen_local"] for r in ranks) == total  # every frozen element on exactly one rank
    for r in ranks:
        assert abs(r["frozen_local"] - total / 2) <= 0.02 * total, r  # about half each
        assert r["trained_local"] < r["trained_total"]


def metric_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("timing/")} for row in rows]


def test_killed_run_resumes_exactly(small_run, tmp_path):
    from safetensors.torch import load_file

    overrides = [o for o in small_run if not o.startswith(("output_dir=", "num_iterations=", "save_every="))]
    overrides += ["num_iterations=6", "save_every=2", "num_eval_prompts=0"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(accelerate_launch("-m", "align", "ppo", *overrides, f"output_dir={straight}"))

    proc = subprocess.Popen(accelerate_launch("-m", "align", "ppo", *overrides, f"output_dir={killed}"),
                            cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "iter-000002").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher, mid-run: the ranks, in sessions of their own, die with it
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it was killed"

    resumed = subprocess.run(accelerate_launch("-m", "align", "ppo", "--resume", str(killed)), cwd=REPO, env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed {killed} at iteration 2" in resumed.stderr  # not a run its ranks went on to finish
    assert metric_rows(killed) == metric_rows(straight)
    a, b = (load_file(str(d / "policy" / "adapter_model.safetensors")) for d in (straight, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in a.items())  # it trained

    # the adapter gathered from the shards exports as one ordinary checkpoint that generates as the policy does
    from transformers import AutoModelForCausalLM

    from align.commands.export import export_run
    from tests.test_export import greedy, trained_policy

    policy, tokenizer = trained_policy(killed)
    exported = AutoModelForCausalLM.from_pretrained(export_run(killed, tmp_path / "export"), local_files_only=True)
    assert greedy(exported, tokenizer) == greedy(policy, tokenizer)


def test_ranks_sampling_layer_by_layer_step_together_when_one_ranks_rows_end_first(ppo_policy_path, random_reward_model,
                                                                                    tmp_path):
    """sample_gathered=false: every decoding step is a collective, so a rank whose rows have all ended
    keeps stepping with the other (if it stopped, the other rank's next gather would wait for it
    forever: the launch's timeout). Rank 0's rows end at their first token, rank 1's run the whole
    length, and each rank's rollout is what it sampled before the end tokens changed."""
    overrides = [f"policy_model={ppo_policy_path}", f"reward_model={random_reward_model}", "num_prompts=16",
                 "num_eval_prompts=0", "response_length=6", "progress=false", "seed=3",
                 f"output_dir={tmp_path / 'run'}"]
    run(accelerate_launch(str(REPO / "tests" / "ppo" / "fsdp_sampling_worker.py"), str(tmp_path / "out"), *overrides),
        timeout=240)
    ended, ran = (json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1))
    # rank 0: the token each row began with is now its end token: one token per row, then padding
    assert all(row[0] == ended["end"] for row in ended["first"])
    assert ended["second_mask"] == [[1] + [0] * 5] * 2
    assert all(row[1:] == [ended["pad"]] * 5 for row in ended["second"])
    # rank 1: the whole length, the same tokens as its first rollout as far as that one went
    assert ran["second_mask"] == [[1] * 6] * 2
    for first, mask, second in zip(ran["first"], ran["first_mask"], ran["second"]):
        assert second[: sum(mask)] == first[: sum(mask)]
