"""`align ppo` against TRL 1.12's experimental PPOTrainer, same task and budget, side by side.

TRL removed its PPO trainer in 1.13; 1.12 is the last release that has it
(`trl.experimental.ppo`). This script installs TRL 1.12 into a separate virtual environment
(default /tmp/align-bench-venv-trl112; torch pinned to the running version with `pip -c`, and
transformers / peft / accelerate pinned to the running versions too, so only the trainer
differs), then runs both trainers in fresh processes on:

* the same tiny policy (SFT checkpoint) with a new LoRA adapter of the same shape,
* the same reward model (its normalisation folded into the head for TRL); TRL needs a separate
  value model initialised from it, align runs twice: `align` = its default value head on the
  policy's LoRA trunk, `align-critic` = TRL's arrangement (`value_model=reward_model`),
* the same prompts (rendered with the same chat template), episodes per iteration, micro-batch
  size, PPO epochs (one optimiser step per epoch over 4 accumulated micro-batches; align's
  loss is the token mean over the minibatch, TRL's the mean of the micro-batches' means),
  learning rate (constant), response length, temperature, fixed KL coefficient, missing-eos penalty,
* fp32 on the CPU for both (TRL defaults to bf16 autocast and gradient checkpointing: both off).

Left at each trainer's own defaults, as a user gets them (printed with the settings): align's value
head or critic learns at `value_lr_scale` (10) times the learning rate, gradients are clipped at a
norm of 1.0 and AdamW's epsilon is 1e-5; TRL 1.12 trains policy and value at one rate, clips
nothing and uses epsilon 1e-8. `--value-lr-scale 1` gives align TRL's single rate.

Then it samples held-out prompts from the SFT model and from each trained adapter with one
shared evaluation function and prints seconds per iteration, episodes per second, peak
memory (max RSS of the training process) and the reward gain side by side.

    python bench/ppo_vs_trl.py --reward runs/demo/reward [--policy demo] [--iterations 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TRL_VERSION = "1.12.0"
DEFAULT_VENV = Path("/tmp/align-bench-venv-trl112")
REPO = Path(__file__).resolve().parents[1]


# ============================================================================ shared settings


def bench_settings(args: argparse.Namespace) -> dict:
    return {
        "iterations": args.iterations,
        "batch_size": args.batch_size,  # episodes per iteration
        "micro_batch_size": args.micro_batch_size,
        "num_ppo_epochs": args.epochs,
        "response_length": args.response_length,
        "temperature": 1.0,
        "learning_rate": args.learning_rate,
        "kl_coef": 0.05,
        "missing_eos_penalty": 1.0,
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "seed": args.seed,
        "threads": args.threads,
        "value_lr_scale": args.value_lr_scale,  # align only: TRL trains policy and value with one rate
    }


def align_defaults_unmatched(settings: dict) -> dict:
    """What align trains with that TRL has no counterpart for, as the run resolves it."""
    from ppo.config import PPOConfig

    defaults = PPOConfig()
    scale = settings["value_lr_scale"] if settings["value_lr_scale"] is not None else defaults.value_lr_scale
    return {"align value_lr_scale": scale, "align max_grad_norm": defaults.max_grad_norm,
            "align adam_eps": defaults.adam_eps}


# ============================================================================ workers


def peak_rss_mib() -> float:
    """This worker's own peak resident memory (align.run.peak_memory_mb: VmHWM; ru_maxrss would count
    the parent's too). TRL's worker imports this one module of the checkout, nothing that trains."""
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))
    from align.run import peak_memory_mb

    return peak_memory_mb()


def align_worker(job: dict) -> dict:
    """Runs in the main environment: `run_ppo` with the bench settings."""
    import torch

    from align.config import load_config
    from ppo.config import PPOConfig
    from ppo.trainer import run_ppo

    torch.set_num_threads(job["settings"]["threads"])
    s = job["settings"]
    g = s["batch_size"] // s["micro_batch_size"]
    cfg = load_config(PPOConfig, None, [
        f"policy_model={job['policy']}", f"reward_model={job['reward']}", f"output_dir={job['out']}",
        "overwrite=true", f"value_model={job['value_model']}", "prompts=synthetic", f"num_prompts={job['num_prompts']}",
        "num_eval_prompts=0", f"num_iterations={s['iterations']}", f"batch_size={s['batch_size']}",
        "num_mini_batches=1", f"gradient_accumulation_steps={g}", f"num_ppo_epochs={s['num_ppo_epochs']}",
        f"response_length={s['response_length']}", f"temperature={s['temperature']}",
        f"learning_rate={s['learning_rate']}", "lr_scheduler=constant", "kl.adaptive=false",
        f"kl.coef={s['kl_coef']}", "kl.estimator=k1", f"missing_eos_penalty={s['missing_eos_penalty']}",
        f"lora.r={s['lora_r']}", f"lora.alpha={s['lora_alpha']}", f"lora.target_modules={s['lora_targets']}",
        "save_every=0", f"seed={s['seed']}", "progress=false",
        *([f"value_lr_scale={s['value_lr_scale']}"] if s["value_lr_scale"] is not None else []),
    ])
    summary = run_ppo(cfg)
    from align.run import read_metrics

    rows = read_metrics(Path(job["out"]) / "metrics.jsonl")
    return {
        "train_seconds": summary["timing/train_s"],
        "iterations": len(rows),
        "episodes": summary["episodes"],
        "scores": [r["objective/scores"] for r in rows],
        "kl": [r["objective/kl"] for r in rows],
        "adapter": str(Path(job["out"]) / "policy"),
        "peak_rss_mib": peak_rss_mib(),
    }


def trl_worker(job: dict) -> dict:
    """Runs in the TRL 1.12 environment: only torch / transformers / peft / datasets / trl here."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    s = job["settings"]
    torch.set_num_threads(s["threads"])
    torch.manual_seed(s["seed"])
    tokenizer = AutoTokenizer.from_pretrained(job["policy"], local_files_only=True)
    tokenizer.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(job["policy"], dtype=torch.float32, local_files_only=True)
    reward_dir = Path(job["reward_model_dir"])
    norm = json.loads((reward_dir / "reward_normalization.json").read_text())

    def sequence_classifier(normalised: bool):
        model = AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1, dtype=torch.float32,
                                                                   local_files_only=True)
        model.config.pad_token_id = tokenizer.pad_token_id
        if normalised:  # fold gain * r + bias into the head, so TRL sees align's normalised reward
            old = model.score
            head = torch.nn.Linear(old.in_features, 1, bias=True)
            with torch.no_grad():
                head.weight.copy_(old.weight * norm["gain"])
                head.bias.fill_(norm["bias"] + (0.0 if old.bias is None else float(old.bias) * norm["gain"]))
            model.score = head
        return model

    reward_model, value_model = sequence_classifier(True), sequence_classifier(False)
    dataset = Dataset.from_dict({"input_ids": [
        tokenizer(text, add_special_tokens=False)["input_ids"] for text in job["rendered_prompts"]]})
    g = s["batch_size"] // s["micro_batch_size"]
    config = PPOConfig(
        output_dir=job["out"], per_device_train_batch_size=s["micro_batch_size"], gradient_accumulation_steps=g,
        num_mini_batches=1, num_ppo_epochs=s["num_ppo_epochs"], total_episodes=s["iterations"] * s["batch_size"],
        response_length=s["response_length"], temperature=s["temperature"], learning_rate=s["learning_rate"],
        lr_scheduler_type="constant", kl_coef=s["kl_coef"], kl_estimator="k1",
        missing_eos_penalty=s["missing_eos_penalty"], stop_token="eos", local_rollout_forward_batch_size=s["batch_size"],
        num_sample_generations=0, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        report_to="none", logging_steps=1, save_strategy="no", seed=s["seed"], dataloader_num_workers=0,
    )
    lora = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=0.0,
                      target_modules=s["lora_targets"], task_type="CAUSAL_LM")
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=None,
                         reward_model=reward_model, train_dataset=dataset, value_model=value_model,
                         peft_config=lora)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    adapter = Path(job["out"]) / "policy"
    trainer.model.policy.save_pretrained(str(adapter))
    rows = [r for r in trainer.state.log_history if "objective/scores" in r]
    return {
        "train_seconds": seconds,
        "iterations": config.num_total_batches,
        "episodes": config.num_total_batches * config.batch_size,
        "scores": [r["objective/scores"] for r in rows],
        "kl": [r["objective/kl"] for r in rows],
        "adapter": str(adapter),
        "peak_rss_mib": peak_rss_mib(),
    }


# ============================================================================ orchestration


def ensure_trl_venv(venv: Path) -> Path:
    """A venv with TRL 1.12 and the running torch/transformers/peft/accelerate versions."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", f"import trl, sys; sys.exit(trl.__version__ != {TRL_VERSION!r})"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    import accelerate
    import peft
    import torch
    import transformers

    torch_version = torch.__version__.split("+")[0]
    print(f"installing TRL {TRL_VERSION} into {venv} (torch=={torch_version}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text(f"torch=={torch_version}\n")
    cmd = [str(venv / "bin" / "pip"), "install", "-q", "-c", str(constraints), f"torch=={torch_version}",
           f"trl=={TRL_VERSION}", f"transformers=={transformers.__version__}", f"peft=={peft.__version__}",
           f"accelerate=={accelerate.__version__}", "datasets"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"could not install TRL {TRL_VERSION}: {done.stderr.strip()[-2000:]}")
    return python


def run_worker(python: str, kind: str, job: dict, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    job_file, result_file = workdir / f"{kind}-job.json", workdir / f"{kind}-result.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": str(job["settings"]["threads"]), "TOKENIZERS_PARALLELISM": "false",
           "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONPATH": str(REPO) if kind == "align" else ""}
    log_file = workdir / f"{kind}.log"
    with log_file.open("w") as log:
        done = subprocess.run([python, __file__, "--worker", kind, str(job_file), str(result_file)],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = log_file.read_text()[-3000:]
        raise SystemExit(f"the {kind} run failed (exit {done.returncode}); end of {log_file}:\n{tail}")
    return json.loads(result_file.read_text())


def evaluate_adapters(policy: Path, reward: str, adapters: dict[str, str], n: int, settings: dict) -> dict:
    """One evaluation for every trainer: held-out samples of SFT vs each adapter, RM and gold scores."""
    import statistics

    import torch
    from peft import PeftModel

    from align.generation import generate_responses
    from align.modeling import load_causal_lm, load_tokenizer
    from align.synthetic import gold_score, make_prompts
    from reward.model import load_reward_model

    torch.set_num_threads(settings["threads"])
    prompts = make_prompts(n, seed=settings["seed"] + 1, split="heldout")
    tokenizer = load_tokenizer(policy)
    rm = load_reward_model(reward)

    def sample(model) -> list[str]:
        return [r[0] for r in generate_responses(model, tokenizer, prompts, max_new_tokens=settings["response_length"],
                                                 temperature=settings["temperature"], seed=settings["seed"])]

    def scores(responses: list[str]) -> dict:
        return {"reward": rm.score(prompts, responses).mean().item(),
                "gold": statistics.fmean(gold_score(p, r) for p, r in zip(prompts, responses))}

    out = {"sft": scores(sample(load_causal_lm(policy, tokenizer=tokenizer).eval()))}
    for name, adapter in adapters.items():
        model = PeftModel.from_pretrained(load_causal_lm(policy, tokenizer=tokenizer), adapter).eval()
        out[name] = scores(sample(model))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="demo", help="SFT checkpoint ('demo' or a directory)")
    parser.add_argument("--reward", default="runs/demo/reward", help="reward-model run dir from `align reward train`")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="episodes per iteration")
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--response-length", type=int, default=48)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--value-lr-scale", type=float, default=None,
                        help="align's value_lr_scale (default: align's own default)")
    parser.add_argument("--num-prompts", type=int, default=2048)
    parser.add_argument("--eval-prompts", type=int, default=1024,
                        help="held-out prompts for the gains (at 256 a mean gain has a standard error near 0.09)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="where TRL 1.12 is installed")
    parser.add_argument("--out", type=Path, default=Path("/tmp/align-bench-ppo-vs-trl"))
    parser.add_argument("--only", choices=["align", "trl"], help="run one side only")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "JOB", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, job_file, result_file = args.worker
        job = json.loads(Path(job_file).read_text())
        result = (align_worker if kind == "align" else trl_worker)(job)
        Path(result_file).write_text(json.dumps(result))
        return

    sys.path.insert(0, str(REPO))
    from align.chat import render_prompt
    from align.modeling import load_tokenizer, resolve_model_path
    from align.synthetic import make_prompts
    from reward.run_dir import model_dir

    settings = bench_settings(args)
    policy = resolve_model_path(args.policy).resolve()
    reward_dir = model_dir(args.reward).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(policy)
    prompts = make_prompts(args.num_prompts, seed=args.seed, split="train")
    base_job = {"settings": settings, "policy": str(policy), "reward": str(Path(args.reward).resolve()),
                "reward_model_dir": str(reward_dir), "num_prompts": args.num_prompts,
                "rendered_prompts": [render_prompt(tokenizer, p) for p in prompts]}

    # align twice: its default (a value head on the policy's LoRA trunk: one forward gives logits
    # and values) and TRL's own arrangement (a separate critic initialised from the reward model).
    runs = {"align": ("align", "policy_trunk"), "align-critic": ("align", "reward_model"), "trl": ("trl", None)}
    results = {}
    for name, (kind, value_model) in runs.items():
        if args.only and kind != args.only:
            continue
        python = sys.executable if kind == "align" else str(ensure_trl_venv(args.venv))
        print(f"running {name} ({args.iterations} iterations x {args.batch_size} episodes) ...", flush=True)
        job = {**base_job, "out": str(args.out / name), "value_model": value_model}
        results[name] = run_worker(python, kind, job, args.out / name)

    print("evaluating both policies on the same held-out prompts ...", flush=True)
    evals = evaluate_adapters(policy, args.reward, {k: r["adapter"] for k, r in results.items()},
                              args.eval_prompts, settings)
    report(results, evals, settings)
    (args.out / "results.json").write_text(json.dumps({"settings": settings, "runs": results, "eval": evals},
                                                      indent=2))


def report(results: dict, evals: dict, settings: dict) -> None:
    def first_last(scores: list[float], k: int = 3) -> float:
        return sum(scores[-k:]) / len(scores[-k:]) - sum(scores[:k]) / len(scores[:k]) if scores else float("nan")

    rows = [
        ("seconds / iteration", lambda r, e: f"{r['train_seconds'] / r['iterations']:.2f}"),
        ("episodes / second", lambda r, e: f"{r['episodes'] / r['train_seconds']:.2f}"),
        ("peak memory (MiB, max RSS)", lambda r, e: f"{r['peak_rss_mib']:.0f}"),
        ("train score gain (last3-first3)", lambda r, e: f"{first_last(r['scores']):+.3f}"),
        ("final train KL (nats/seq)", lambda r, e: f"{r['kl'][-1]:.3f}" if r["kl"] else "n/a"),
        ("held-out RM score gain vs SFT", lambda r, e: f"{e['reward'] - evals['sft']['reward']:+.3f}"),
        ("held-out gold gain vs SFT", lambda r, e: f"{e['gold'] - evals['sft']['gold']:+.3f}"),
    ]
    names = list(results)
    print()
    print(f"{'':34s}" + "".join(f"{n:>14s}" for n in names))
    for label, fn in rows:
        print(f"{label:34s}" + "".join(f"{fn(results[n], evals[n]):>14s}" for n in names))
    for name in (n for n in names if n.startswith("align") and "trl" in results):
        a, t = results[name], results["trl"]
        speedup = (a["episodes"] / a["train_seconds"]) / (t["episodes"] / t["train_seconds"])
        print(f"\n{name} / TRL episodes per second: {speedup:.2f}x; peak memory {a['peak_rss_mib'] / t['peak_rss_mib']:.2f}x")
    print(f"SFT held-out: RM {evals['sft']['reward']:+.3f}, gold {evals['sft']['gold']:+.3f}; settings {settings}; "
          f"not matched (align's own defaults): {align_defaults_unmatched(settings)}")


if __name__ == "__main__":
    main()
