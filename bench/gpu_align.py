"""bench/gpu_bench.py's align rows, steps 3-4 (each run in a fresh process): `align reward train`,
then `align ppo` with either value model, plain, under FSDP2 in one process or under torch.profiler."""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.gpu_setup import SEVEN, peak_memory_gib, peak_reserved_gib

REPO = Path(__file__).resolve().parents[1]


def reward_worker(job: dict) -> dict:
    from align.config import load_config
    from reward.config import RewardConfig
    from reward.train import train_reward_model

    s = job["settings"]
    cfg = load_config(RewardConfig, None, [
        f"model.name_or_path={job['model']}", f"output_dir={job['out']}", "overwrite=true", "train.save_every=0",
        f"model.max_length={s['reward_max_length']}", f"model.dtype={s['dtype']}",
        f"model.attn_implementation={s['attn']}", "data.format=hh", f"data.path={job['hh']}",
        f"train.max_steps={s['reward_steps']}", f"train.batch_size={s['reward_batch_size']}",
        "train.learning_rate=1e-5", f"train.gradient_checkpointing={s['gradient_checkpointing']}",
        "train.log_every=10", f"eval.normalize_prompts={s['normalize_prompts']}",
        f"eval.normalize_response_length={s['response_length']}", f"eval.batch_size={s['batch_size']}",
        *([f"train.num_threads={s['threads']}"] if s["threads"] else []),
    ])
    start = time.perf_counter()
    summary = train_reward_model(cfg, echo=lambda text: None)
    return {"seconds": time.perf_counter() - start, "train_s": summary["timing/train_s"],
            "steps": summary["train/steps"], "eval_accuracy": summary["eval/accuracy"],
            "peak_gib": peak_memory_gib(), "reserved_gib": peak_reserved_gib(), "model_dir": summary["model_dir"]}


def profiled(run, out: Path):
    """`run()` under torch.profiler; the operators' totals, by self device time (CPU time without a
    GPU), go to `out`. The profiler's overhead makes this run's timings no comparison."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        result = run()
    averages = prof.key_averages()
    tables = [averages.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60)]
    if cuda:  # the host's side too: launches and synchronisations show there, not in the kernels' times
        tables.insert(0, averages.table(sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=60))
    out.write_text("\n\n".join(tables))
    return result


def fsdp_environment(config: Path) -> dict[str, str]:
    """The variables `accelerate launch` sets from an FSDP config's fsdp_config (FSDP_VERSION, ...)."""
    import yaml

    settings = yaml.safe_load(config.read_text())["fsdp_config"]
    import socket

    with socket.socket() as s:  # a process group of one, as `accelerate launch --num_processes 1` would start
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"ACCELERATE_USE_FSDP": "true", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            **{k.upper(): str(v).lower() if isinstance(v, bool) else str(v) for k, v in settings.items()}}


def align_worker(job: dict) -> dict:
    from align.config import load_config
    from align.run import read_metrics
    from ppo.config import PPOConfig
    from ppo.trainer import run_ppo

    s = job["settings"]
    micro = s["batch_size"] // s["micro_batch_size"]
    cfg = load_config(PPOConfig, None, [
        f"policy_model={job['model']}", f"reward_model={job['reward']}", f"output_dir={job['out']}", "overwrite=true",
        f"value_model={job['value_model']}", f"prompts={job['prompts']}", "num_eval_prompts=0",
        f"num_iterations={s['iterations']}", f"batch_size={s['batch_size']}", "num_mini_batches=1",
        f"gradient_accumulation_steps={micro}", f"num_ppo_epochs={s['epochs']}",
        f"response_length={s['response_length']}", "temperature=1.0", "learning_rate=1e-5",
        "lr_scheduler=constant", "kl.adaptive=false", "kl.coef=0.05", "missing_eos_penalty=1.0",
        "lora.r=16", "lora.alpha=32", f"lora.target_modules={SEVEN}", f"dtype={s['dtype']}",
        f"gradient_checkpointing={s['gradient_checkpointing']}", "save_every=0", "progress=false",
        f"seed={s['seed']}", *([f"num_threads={s['threads']}"] if s["threads"] else []),
        *job.get("overrides", []),
    ])
    if job.get("fsdp"):  # what `accelerate launch --config_file configs/accelerate/fsdp2_gpu.yaml` passes on
        os.environ.update(fsdp_environment(REPO / "configs" / "accelerate" / "fsdp2_gpu.yaml"))
    if job.get("profile"):
        summary = profiled(lambda: run_ppo(cfg), Path(job["out"]) / "profile.txt")
    else:
        summary = run_ppo(cfg)
    rows = read_metrics(Path(job["out"]) / "metrics.jsonl")
    return {
        "iterations": [{k: r[k] for k in ("timing/rollout_s", "timing/sample_s", "timing/score_s", "timing/optimise_s",
                                          "timing/iteration_s", "response/length")} for r in rows],
        "peak_gib": peak_memory_gib(), "reserved_gib": peak_reserved_gib(), "train_s": summary["timing/train_s"],
    }
