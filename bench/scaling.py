"""One process against two on the demo: `align reward train` and `align ppo` alone, under DDP
(configs/accelerate/ddp_cpu.yaml) and under FSDP2 (configs/accelerate/fsdp2_cpu.yaml), each launched
the way a user launches it, one thread per process. A table, not a target: on two CPU cores two
processes can at best double the work per second, and the demo model is small enough that what
the processes exchange weighs.

* reward: configs/demo/reward.yaml on the demo's 800 rankings (the data bench/roads.py builds),
  one epoch; the global batch of 16 rankings is split across the processes;
* ppo: configs/demo/ppo.yaml against that reward model, `--iterations` iterations, no held-out
  evaluation; the batch of 64 episodes is split across the processes, as the reward stage's is;
* ppo, FSDP2 with `sample_gathered=false`: each layer's weights gathered for every decoding step
  instead of once per rollout, what gathering once saves.

Throughput: rankings per second of training (reward), episodes per second (ppo), with the rollout
and optimisation seconds of an iteration (mean over iterations after the first); peak memory is the
main process's high-water mark.

    python bench/scaling.py [--iterations 20] [--out runs/bench-scaling]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = REPO / "configs" / "accelerate"
DEMO = REPO / "configs" / "demo"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "29612"]
MODES = {  # label -> the command prefix that starts `align ...`
    "1 process": [sys.executable, "-m", "align"],
    "2 processes, DDP": [*LAUNCH, "--config_file", str(ACCELERATE / "ddp_cpu.yaml"), "-m", "align"],
    "2 processes, FSDP2": [*LAUNCH, "--config_file", str(ACCELERATE / "fsdp2_cpu.yaml"), "-m", "align"],
}


def plan(args: argparse.Namespace, rankings: Path, reward: Path) -> list[dict]:
    runs = []
    for mode, prefix in MODES.items():
        runs.append({"stage": "reward", "mode": mode, "cmd": [
            *prefix, "reward", "train", "--config", str(DEMO / "reward.yaml"), "data.format=kwise",
            f"data.path={rankings}", "train.epochs=1", "train.num_threads=1", "train.save_every=0", "overwrite=true",
            *([f"train.max_steps={args.reward_steps}"] if args.reward_steps else [])]})
    ppo = ["ppo", "--config", str(DEMO / "ppo.yaml"), f"reward_model={reward}", f"num_iterations={args.iterations}",
           "num_eval_prompts=0", "save_every=0", "progress=false", "overwrite=true"]
    for mode, prefix in MODES.items():
        runs.append({"stage": "ppo", "mode": mode, "cmd": [*prefix, *ppo]})
    runs.append({"stage": "ppo", "mode": "2 processes, FSDP2, sample_gathered=false",
                 "cmd": [*MODES["2 processes, FSDP2"], *ppo, "sample_gathered=false"]})
    for i, run in enumerate(runs):
        run["dir"] = str(args.out / f"{i:02d}-{run['stage']}")
        run["cmd"].append(f"output_dir={run['dir']}")
    return runs


def execute(run: dict) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(Path(run["dir"] + ".log"), "w") as log:
        done = subprocess.run(run["cmd"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    run["wall_s"] = time.perf_counter() - start
    summary = Path(run["dir"]) / "summary.json"
    run["summary"] = json.loads(summary.read_text()) if done.returncode == 0 and summary.exists() else {}
    metrics = Path(run["dir"]) / "metrics.jsonl"
    run["metrics"] = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    print(f"  {run['stage']:<6} {run['mode']:<40} {'ok' if run['summary'] else 'FAILED'} in {run['wall_s']:.0f} s",
          flush=True)


def row(run: dict) -> str:
    s, rows = run["summary"], run["metrics"][1:]  # the first iteration also pays for warming up
    if not s:
        return f"| {run['stage']} | {run['mode']} | failed | | | | |"
    if run["stage"] == "reward":
        # rankings trained: every step's batch (over all processes), the split once per epoch at most;
        # with --reward-steps the run stops before its epochs end
        cfg = yaml.safe_load((Path(run["dir"]) / "config.yaml").read_text())["train"]
        trained = min(s["train/steps"] * cfg["batch_size"], s["train/rankings"] * cfg["epochs"])
        rate = trained / s["timing/train_s"]
        return (f"| reward | {run['mode']} | {s['timing/train_s']:.0f} | {rate:.1f} rankings/s | - | - | "
                f"{s['memory/peak_rss_mb']:.0f} |")
    world, batch = s["train/num_processes"], rows[0]["episodes"] / rows[0]["iteration"] if rows else 0
    rate = s["iteration"] * batch / s["timing/train_s"]

    def mean(key):
        return statistics.fmean(r[key] for r in rows) if rows else float("nan")

    return (f"| ppo | {run['mode']} | {s['timing/train_s']:.0f} | {rate:.1f} episodes/s ({world} x "
            f"{batch / world:.0f} per iteration) | {mean('timing/rollout_s'):.2f} | {mean('timing/optimise_s'):.2f} | "
            f"{s['memory/peak_rss_mb']:.0f} |")


def table(runs: list[dict]) -> str:
    return "\n".join(["| stage | processes | train s | throughput | rollout s/it | optimise s/it | peak MiB (main) |",
                      "|---|---|---|---|---|---|---|", *map(row, runs)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=20, help="PPO iterations per run")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-scaling")
    parser.add_argument("--reward-steps", type=int, help="stop the reward runs after this many steps (a quick try)")
    parser.add_argument("--data", type=Path, help="a bench/roads.py output folder whose data/ to reuse")
    parser.add_argument("--table", action="store_true", help="print the table of OUT/runs.json again, run nothing")
    parser.add_argument("--only", nargs="+", help="run only the rows whose mode starts with one of these, replacing "
                        "them in OUT/runs.json")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads((args.out / "runs.json").read_text())))
        return
    data = args.data or args.out
    subprocess.run([sys.executable, str(REPO / "bench" / "roads.py"), "--prepare", "--out", str(data)], check=True)
    rankings, reward = data / "data" / "rankings.kwise.jsonl", data / "data" / "reward"
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs; one run at a time, one thread per process", flush=True)
    runs = plan(args, rankings, reward)
    if args.only:
        runs = [r for r in runs if r["mode"].startswith(tuple(args.only))]
    for run in runs:
        execute(run)
    if args.only and (args.out / "runs.json").exists():  # the other rows as they were
        done = {(r["stage"], r["mode"]): r for r in runs}
        runs = [done.pop((r["stage"], r["mode"]), r) for r in json.loads((args.out / "runs.json").read_text())]
        runs += list(done.values())
    (args.out / "runs.json").write_text(json.dumps(runs, indent=1, default=str))
    print("\n" + table(runs))


if __name__ == "__main__":
    main()
