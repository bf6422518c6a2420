"""align vs TRL 1.12's PPOTrainer on one GPU, at a real model shape, in one command.

    python bench/gpu_bench.py                  # Qwen2.5-0.5B body (387M with the 32k tokenizer)
    python bench/gpu_bench.py --shape 1.5b     # Qwen2.5-1.5B body: does reward training + PPO fit?
    python bench/gpu_bench.py --response-length 256 --no-trl    # critic mode at 256 new tokens
    python bench/gpu_bench.py --sample-merged   # + align sampling bf16 rollouts with the adapter merged
    python bench/gpu_bench.py --eager reward_model   # + the critic side decoding eagerly, layers not compiled
    python bench/gpu_bench.py --uncompiled      # + the value-head side with torch_compile=false
    python bench/gpu_bench.py --roads           # + RLOO and GRPO, the critic-free methods
    python bench/gpu_bench.py --no-trl --profile   # + a profiled run: where an iteration's time goes
    python bench/gpu_bench.py --shape tiny --device cpu --no-trl  # what tests/test_gpu_bench.py runs

What it does, each heavy step in a fresh process (clean timings and peak memory):

1. trains a byte-level BPE tokenizer (32,000 tokens; `tiny`: 512) on the HH-RLHF and OpenAssistant
   text in ../shared/data, with align's demo chat template;
2. builds a random-init Qwen2 of the chosen shape (tied embeddings) and saves it;
3. `align reward train` on the HH-RLHF pairs (full fine-tuning, bf16 storage, fp32 trained weights);
4. `align ppo` twice: value head on the policy's LoRA trunk (align's default) and value_model=reward_model
   (a separate critic, TRL's arrangement), with the issue's settings: 64 episodes x 128 new tokens,
   4 PPO epochs, one minibatch of 4 micro-batches of 16, bf16, LoRA r=16 on all seven projections,
   prompts from OpenAssistant's prompt lottery;
5. TRL 1.12 `PPOTrainer` with the same settings, in its own packages (TRL 1.12 and `datasets`
   installed with `pip --target` beside the running torch / transformers / peft / accelerate, from the
   index or from --trl-wheels' folder, or an interpreter given with --trl-python; where they cannot be
   installed, TRL's row is reported failed with pip's reason and align's rows still run);
6. prints seconds per iteration (mean over the iterations after the first) with the rollout / score /
   optimise split and the sampling part of the rollout (align reports it; TRL does not), rollout
   tokens/s (generated tokens over the rollout phase, which includes the pi_old / pi_ref forwards),
   peak GPU memory (allocated, and reserved by PyTorch's caching allocator: what must fit the card)
   and an MFU estimate. results.json is rewritten after every row.

MFU = model FLOPs / (seconds x peak bf16 FLOP/s). Model FLOPs per iteration count 2 N per token for each
forward-only pass (sampling, pi_old and pi_ref forwards, reward scoring) and 6 N per token per PPO epoch
(PaLM's convention, Chowdhery et al. 2022, appendix B; LoRA skips the frozen weights' gradients, so
the optimisation's real FLOPs are nearer 4 N), N = the trunk's parameters without the input embedding
on every token, plus the output layer's on the response tokens only (the reward model has none), per
model that runs; attention's own FLOPs are left out (small at these lengths). The same count, the iteration's useful
work, divides both trainers' times. It is not each trainer's own work: TRL also computes logits at the
prompt positions, which the count does not credit (its MFU reads low by that much), and TRL 1.12 reads
pi_old from the sampler's logits where align (in bf16) runs a pi_old forward, which the count credits
to both (TRL's MFU reads high by one policy forward). Peak FLOP/s from the device name (PEAK_BF16_TFLOPS;
the run prints which entry it assumed; --peak-tflops to set).
`MFU roll` and `MFU opt` divide the rollout's forwards (sampling, pi_old, pi_ref, a critic's values) by
the rollout's seconds and the PPO epochs' 6 N per token by the optimisation's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the modules below, by their package's name; appended, after the environment's own packages: TRL's
# worker imports from the checkout only them and align.run's peak memory reader, nothing that trains
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from bench.gpu_align import align_worker, reward_worker  # noqa: E402
from bench.gpu_report import device_peak_tflops, library_versions, table  # noqa: E402
from bench.gpu_setup import SHAPES, build_model, prompts, reused_as_built  # noqa: E402
from bench.gpu_trl import TRL_VERSION, trl_packages, trl_worker  # noqa: E402

# ============================================================================ 3-5. workers (fresh processes)


WORKERS = {"reward": reward_worker, "align": align_worker, "trl": trl_worker}


def run_worker(python: str, kind: str, job: dict, workdir: Path, env_extra: dict) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    job_file, result_file = workdir / f"{kind}-job.json", workdir / f"{kind}-result.json"
    job_file.write_text(json.dumps(job))
    # align's workers see the checkout before the environment's own path; TRL's sees neither (its
    # packages come through the job's paths)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1",
           "PYTHONPATH": path if kind != "trl" else "", **env_extra}
    log_file = workdir / f"{kind}.log"
    with log_file.open("w") as log:
        done = subprocess.run([python, __file__, "--worker", kind, str(job_file), str(result_file)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:  # the log's last line (an exception's message) labels the failed row
        log_text = log_file.read_text()
        last = next((line for line in reversed(log_text.splitlines()) if line.strip()), "no output")
        raise RuntimeError(f"the {kind} run failed (exit {done.returncode}): {last}\nend of {log_file}:\n"
                           f"{log_text[-3000:]}")
    return json.loads(result_file.read_text())


# ============================================================================ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="0.5b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when present")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/align-gpu-bench"))
    parser.add_argument("--iterations", type=int, default=4, help="PPO iterations (the first is not timed)")
    parser.add_argument("--batch-size", type=int, default=64, help="episodes per iteration")
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--response-length", type=int, default=128)
    parser.add_argument("--reward-steps", type=int, default=40)
    parser.add_argument("--reward-batch-size", type=int, default=16, help="HH pairs per reward step")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="in reward training and PPO (on for 1.5b)")
    parser.add_argument("--value-models", default="policy_trunk,reward_model")
    parser.add_argument("--sample-merged", action="store_true",
                        help="also run the value-head side with sample_merged=true (bf16 rollouts with the adapter merged)")
    parser.add_argument("--eager", default="", metavar="VALUE_MODELS",
                        help="also run these sides (policy_trunk,reward_model) as before the GPU defaults: decoding "
                        "eagerly (cuda_graphs=false), layers not compiled (torch_compile=false)")
    parser.add_argument("--roads", action="store_true",
                        help="also run RLOO and GRPO (method=rloo|grpo, 4 samples per prompt: 16 prompts x 4 = the same "
                        "episodes per iteration)")
    parser.add_argument("--uncompiled", action="store_true",
                        help="also run the value-head side with torch_compile=false (decoding still graphed)")
    parser.add_argument("--profile", action="store_true",
                        help="also run the value-head side under torch.profiler: its operator table is written to "
                        "WORK/SHAPE/profile/profile.txt (that run's timings carry the profiler's overhead)")
    parser.add_argument("--fsdp", action="store_true",
                        help="also run the value-head side under FSDP2 in one process (configs/accelerate/fsdp2_gpu.yaml's "
                        "settings): its time and peak memory against plain one-GPU training")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the model and reward model an earlier run built in the same --work (same shape)")
    parser.add_argument("--no-trl", action="store_true", help="align only")
    parser.add_argument("--trl-python", help="an interpreter with TRL 1.12 and datasets (default: pip --target)")
    parser.add_argument("--trl-wheels", type=Path, default=None, metavar="DIR",
                        help="install TRL (and datasets with what it lacks) from the wheels in DIR, not from the index")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for the MFU")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "JOB", "RESULT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        kind, job_file, result_file = args.worker
        result = WORKERS[kind](json.loads(Path(job_file).read_text()))
        Path(result_file).write_text(json.dumps(result))
        return result

    sys.path.insert(0, str(REPO))
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    env_extra = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}
    dtype = "bfloat16" if device == "cuda" else "float32"
    if not (args.data / "hh-rlhf").is_dir():
        raise SystemExit(f"{args.data}: the shared data folder (hh-rlhf/, oasst/) is needed")
    work = args.work / args.shape
    work.mkdir(parents=True, exist_ok=True)
    settings = {"shape": args.shape, "iterations": args.iterations, "batch_size": args.batch_size,
                "micro_batch_size": args.micro_batch_size, "epochs": args.epochs,
                "response_length": args.response_length, "dtype": dtype, "attn": "sdpa",
                # the 1.5B shape checks that reward training and PPO fit one 80 GB GPU: checkpointed
                "gradient_checkpointing": args.gradient_checkpointing or args.shape == "1.5b",
                "reward_steps": args.reward_steps,
                "reward_batch_size": args.reward_batch_size, "reward_max_length": 512 if args.shape != "tiny" else 128,
                "normalize_prompts": min(64, args.batch_size), "threads": args.threads, "seed": args.seed}
    timings = {}

    t = time.perf_counter()
    model_dir, info_file = work / "model", work / "model-info.json"
    if args.reuse and info_file.exists():  # an earlier run's model, same shape (the folder) and seed
        info = json.loads(info_file.read_text())
        reused_as_built(info.get("seed"), args.seed, "model", info_file)
    else:
        info = build_model(model_dir, args.shape, args.data, device, args.seed)
        info_file.write_text(json.dumps({**info, "seed": args.seed}))
    timings["build_s"] = time.perf_counter() - t
    print(f"[{args.shape}] {info['parameters'] / 1e6:.0f}M parameters, {info['vocab']} tokens "
          f"({timings['build_s']:.0f} s to build)", flush=True)

    from align.chat import render_prompt
    from align.modeling import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    prompt_list = prompts(args.data)
    prompt_file = work / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompt_list), encoding="utf-8")
    rendered = [render_prompt(tokenizer, p) for p in prompt_list]
    prompt_tokens = sum(min(128, len(tokenizer(r, add_special_tokens=False)["input_ids"])) for r in rendered) / len(rendered)

    base = {"settings": settings, "model": str(model_dir)}
    reward_result = work / "reward" / "reward-result.json"
    reward_job = {key: settings[key] for key in ("seed", "reward_steps", "reward_batch_size", "reward_max_length",
                                                "gradient_checkpointing")}
    if args.reuse and reward_result.exists():
        reward = json.loads(reward_result.read_text())
        reused_as_built(reward.get("job"), reward_job, "reward model", reward_result)
    else:
        reward = run_worker(sys.executable, "reward", {**base, "out": str(work / "reward"),
                                                      "hh": str(args.data / "hh-rlhf" / "harmless-base-test.jsonl.gz")},
                            work / "reward", env_extra)
        reward_result.write_text(json.dumps({**reward, "job": reward_job}))
    reserved = f", reserved {reward['reserved_gib']:.2f} GiB" if reward.get("reserved_gib") is not None else ""
    print(f"reward model: {reward['steps']} steps in {reward['train_s']:.1f} s "
          f"({reward['train_s'] / reward['steps']:.2f} s/step), peak {reward['peak_gib']:.2f} GiB{reserved}", flush=True)

    # (name, interpreter, worker, job): align's arrangements, then TRL, then the variants
    align_job = {**base, "reward": reward["model_dir"], "prompts": str(prompt_file)}
    names = {"policy_trunk": "align (value head)", "reward_model": "align (critic)"}
    runs = [(names[v], sys.executable, "align", {**align_job, "value_model": v, "out": str(work / v)})
            for v in args.value_models.split(",") if v]
    results, failed = {}, {}
    if not args.no_trl:
        try:  # a machine without network or wheels: TRL's row fails, align's still run
            paths = {} if args.trl_python else trl_packages(args.work / "trl", args.trl_wheels)
        except RuntimeError as err:
            print(err, flush=True)
            failed[f"TRL {TRL_VERSION}"] = str(err)
        else:
            runs.append((f"TRL {TRL_VERSION}", args.trl_python or sys.executable, "trl",
                         {**base, **paths, "out": str(work / "trl"), "reward_model_dir": reward["model_dir"],
                          "rendered_prompts": rendered}))
    eager = ["cuda_graphs=false", "torch_compile=false"]
    variants = [(f"{names[v][:-1]}, eager)", v, {"overrides": eager}, f"{v}-eager")
                for v in args.eager.split(",") if v]  # then the value-head side's
    variants += [(name, "policy_trunk", job, out) for wanted, name, job, out in [
        (args.fsdp, "align (FSDP2, 1 process)", {"fsdp": True}, "fsdp"),
        (args.roads, "align RLOO", {"overrides": ["method=rloo", "samples_per_prompt=4"]}, "rloo"),
        (args.roads, "align GRPO", {"overrides": ["method=grpo", "samples_per_prompt=4"]}, "grpo"),
        (args.uncompiled, "align (not compiled)", {"overrides": ["torch_compile=false"]}, "uncompiled"),
        (args.sample_merged, "align (merged sampling)", {"overrides": ["sample_merged=true"]}, "merged"),
        (args.profile, "align (profiled)", {"profile": True}, "profile")] if wanted]
    runs += [(name, sys.executable, "align", {**align_job, "value_model": value_model, **job, "out": str(work / out)})
             for name, value_model, job, out in variants]
    name, peak, peak_source = device_peak_tflops() if device == "cuda" else ("cpu", None, "cpu: no MFU")
    if args.peak_tflops:
        peak, peak_source = args.peak_tflops, f"--peak-tflops {args.peak_tflops:g}"
    print(f"{name}: MFU against {peak_source}", flush=True)
    versions = library_versions()

    def write_results() -> dict:  # after every row: a run cut off by its deadline keeps the rows it finished
        out = {"settings": settings, "model": info, "reward": reward, "runs": results, "failed": failed,
               "device": name, "peak_tflops": peak, "peak_source": peak_source, "versions": versions,
               "table": table(results, info, settings, prompt_tokens, peak)}
        (work / "results.json").write_text(json.dumps(out, indent=2))
        return out

    for run_name, python, kind, job in runs:
        print(f"running {run_name} ...", flush=True)
        try:
            results[run_name] = run_worker(python, kind, job, Path(job["out"]), env_extra)
        except RuntimeError as err:  # one side failing must not hide the others' figures
            print(err, flush=True)
            failed[run_name] = str(err).splitlines()[0]
        else:
            print(table({run_name: results[run_name]}, info, settings, prompt_tokens, peak), flush=True)
        write_results()

    out = write_results()
    print(f"\n{args.shape} shape ({info['parameters'] / 1e6:.0f}M), {name}, {settings['batch_size']} episodes x "
          f"{settings['response_length']} new tokens, {settings['epochs']} epochs, {dtype}, mean prompt "
          f"{prompt_tokens:.0f} tokens; MFU against {peak_source}\n{out['table']}")
    for run, why in failed.items():
        print(f"{run}: FAILED, {why}")
    print(", ".join(f"{k} {v}" for k, v in versions.items()))
    if failed:
        raise SystemExit(1)
    return out


if __name__ == "__main__":
    main()
