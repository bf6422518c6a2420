"""Three roads from the same rankings, side by side on the demo: PPO, RLOO and GRPO (a reward
model, then online RL), K-wise and pairwise DPO (the rankings alone), and TRL's current
`DPOTrainer` and `GRPOTrainer` beside them.

Everything starts from the same data, built once the way `align demo` builds it: the demo SFT
model, 800 prompts with 4 candidates sampled from it, ranked by 3 simulated annotators (73%
pairwise agreement) through the annotation app's service layer, and one reward model trained on
those rankings (configs/demo/reward.yaml). Then, for every seed:

* `align ppo` with configs/demo/ppo.yaml, rloo.yaml and grpo.yaml against that reward model;
* `align dpo` with configs/demo/dpo.yaml, loss kwise and pairwise (the C(K,2) pairs cut from the
  same rankings, one epoch), for each beta of `--betas` (on the first of `--seeds`; the other seeds run the config's beta);
* TRL's `DPOTrainer` on the same pairs, with the same LoRA, beta, learning rate, schedule, batch,
  epochs and length limit (TRL's own defaults otherwise: the reference recomputed every step);
* TRL's `GRPOTrainer` with the same reward model (missing-eos penalty included), prompts, 64
  completions per generation round in groups of 4, minibatches of 16 (accumulated over grpo.yaml's
  micro-batches of 8), 4 passes per round, clip, fixed KL coefficient, learning rate, response
  length and temperature as grpo.yaml.

Each run is a fresh process (2 at a time on 2 cores, one thread each). Each is scored by the same
evaluation code (`ppo.evaluation.evaluate`): 128 held-out synthetic prompts sampled from the SFT
model and the policy at temperature 0.7, 48 tokens, the gold judge's gain in SFT standard
deviations and the per-sequence KL to the reference; the DPO rows also report the held-out
ranking accuracy of their implicit reward on the held-out prompts' rankings. Wall time is the
process's whole life (loading, training, evaluation); peak memory its max RSS.

    python bench/roads.py [--seeds 0 1 2] [--betas 0.05 0.1 0.2] [--jobs 2] [--out runs/bench-roads]
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

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "demo"
EVAL_PROMPTS = 128


# ============================================================================ data, once


def prepare_data(out: Path) -> tuple[Path, Path]:
    """The demo's rankings and reward model, built once into OUT/data (reused when present)."""
    from align.commands.demo import DemoConfig
    from align.commands.demo_annotation import export_rankings, fill_project, simulate_annotators
    from align.config import load_config
    from reward.config import RewardConfig
    from reward.train import train_reward_model

    data = out / "data"
    rankings, reward = data / "rankings.kwise.jsonl", data / "reward"
    if rankings.exists() and (reward / "summary.json").exists():
        return rankings, reward
    data.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{data / 'annotation.db'}"
    cfg = load_config(DemoConfig, None, [])
    simulate_annotators(fill_project(db_url, cfg), cfg)
    export_rankings(db_url, rankings)
    train_reward_model(load_config(RewardConfig, CONFIGS / "reward.yaml", [
        f"output_dir={reward}", f"model.name_or_path={cfg.model}", "data.format=kwise", f"data.path={rankings}",
        "train.save_every=0", "overwrite=true"]))
    return rankings, reward


# ============================================================================ the runs


def plan(args: argparse.Namespace, rankings: Path, reward: Path) -> list[dict]:
    """One entry per run: its row label, seed, beta and command."""
    align = [sys.executable, "-m", "align"]
    runs = []
    for seed in args.seeds:
        common = [f"seed={seed}", "progress=false", "overwrite=true", f"num_eval_prompts={EVAL_PROMPTS}"]
        for method in ("ppo", "rloo", "grpo"):
            runs.append({"row": f"align {method.upper()}", "seed": seed, "beta": None, "cmd": [
                *align, "ppo", "--config", str(CONFIGS / f"{method}.yaml"), f"reward_model={reward}", "save_every=0",
                *common]})
        for beta in args.betas if seed == args.seeds[0] else [config_beta()]:
            over = [f"beta={beta}"]
            dpo = [*align, "dpo", "--config", str(CONFIGS / "dpo.yaml"), f"data.path={rankings}", "save_every=0",
                   *common, *over]
            runs.append({"row": "align DPO, K-wise", "seed": seed, "beta": beta, "cmd": dpo})
            runs.append({"row": "align DPO, pairwise", "seed": seed, "beta": beta, "cmd": [*dpo, "loss=pairwise",
                                                                                          "epochs=1"]})
            runs.append({"row": "TRL DPOTrainer, pairwise", "seed": seed, "beta": beta, "cmd": [
                sys.executable, __file__, "--trl", "dpo", "--rankings", str(rankings), "--seed", str(seed),
                "--beta", str(beta)]})
        runs.append({"row": "TRL GRPOTrainer", "seed": seed, "beta": None, "cmd": [
            sys.executable, __file__, "--trl", "grpo", "--reward", str(reward), "--seed", str(seed)]})
    for i, run in enumerate(runs):
        run["dir"] = str(args.out / "runs" / f"{i:03d}-{run['row'].split(',')[0].replace(' ', '-').lower()}-s{run['seed']}")
        run["cmd"] = [*run["cmd"], (f"output_dir={run['dir']}" if "--trl" not in run["cmd"] else f"--output-dir={run['dir']}")]
    return runs


def config_beta() -> float:
    """configs/demo/dpo.yaml's beta: what the seeds after the first run."""
    import yaml

    return float(yaml.safe_load((CONFIGS / "dpo.yaml").read_text())["beta"])


def execute(runs: list[dict], jobs: int) -> None:
    """Run the commands `jobs` at a time, each in its own process; wall time measured here, peak
    memory by the run itself (`memory/peak_rss_mb`, the high-water mark of its own address space)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    pending, active = list(runs), {}
    while pending or active:
        while pending and len(active) < jobs:
            run = pending.pop(0)
            Path(run["dir"]).mkdir(parents=True, exist_ok=True)
            log = open(Path(run["dir"]).with_suffix(".log"), "w")  # noqa: SIM115 (closed when the run ends)
            proc = subprocess.Popen(run["cmd"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            active[proc.pid] = (run, proc, log, time.perf_counter())
        pid, status = os.wait()
        if pid not in active:
            continue
        run, proc, log, start = active.pop(pid)
        log.close()
        run.update(wall_s=time.perf_counter() - start, status=status)
        summary = Path(run["dir"]) / "summary.json"
        run["summary"] = json.loads(summary.read_text()) if status == 0 and summary.exists() else {}
        run["peak_mb"] = run["summary"].get("memory/peak_rss_mb")
        print(f"  {run['row']:<26} seed {run['seed']} beta {run['beta']}: "
              f"{'ok' if run['summary'] else 'FAILED, see ' + str(Path(run['dir']).with_suffix('.log'))} "
              f"in {run['wall_s']:.0f} s", flush=True)


# ============================================================================ the table


def mean_spread(values: list[float | None], *, signed: bool = False) -> str:
    """Mean ± sample standard deviation of the values present; a run that lacks one is named."""
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    sign = "+" if signed else ""
    text = (f"{present[0]:{sign}.2f}" if len(present) == 1
            else f"{statistics.fmean(present):{sign}.2f} ± {statistics.stdev(present):.2f}")
    return text if len(present) == len(values) else f"{text} ({len(present)} of {len(values)} runs)"


def training_seconds(summary: dict) -> float:
    """The training's time, as TRL's trainers time theirs: align's DPO times its one pass of reference
    log-probs apart (`timing/reference_s`), TRL's DPOTrainer runs the reference inside every step."""
    return summary["timing/train_s"] + summary.get("timing/reference_s", 0.0)


def table(runs: list[dict]) -> str:
    """Mean ± sample standard deviation over the seeds that ran per (row, beta) ('2 of 3' where a run
    failed); the config's beta for a DPO row is '-'. Peak memory: the largest over the seeds."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["row"], run["beta"]), []).append(run)
    lines = ["| method | beta | seeds | gold gain (SFT std) | KL per sequence | held-out acc. | train s | wall s | "
             "iterations/s | peak MiB (max) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (row, beta), group in groups.items():
        ok = [r for r in group if r["summary"]]
        if not ok:
            lines.append(f"| {row} | {beta or '-'} | 0 of {len(group)} | failed | | | | | | |")
            continue

        def col(key, rows=ok, **kw):
            return mean_spread([r["summary"].get(key) for r in rows], **kw)

        iters = [r["summary"].get("iteration") for r in ok]
        its = [n / r["summary"]["timing/train_s"] for n, r in zip(iters, ok) if n]
        lines.append(" | ".join([
            f"| {row}", beta and f"{beta}" or "-", f"{len(ok)}" + (f" of {len(group)}" if len(ok) < len(group) else ""),
            col("eval/gold_gain_in_sft_std", signed=True), col("eval/kl"), col("eval/accuracy"),
            f"{statistics.fmean(training_seconds(r['summary']) for r in ok):.0f}",
            f"{statistics.fmean(r['wall_s'] for r in ok):.0f}", f"{statistics.fmean(its):.3f}" if its else "-",
            f"{max(r['peak_mb'] or 0 for r in ok):.0f} |"]))
    return "\n".join(lines)


# ============================================================================ TRL's trainers


def trl_dpo(args: argparse.Namespace) -> dict:
    """TRL's DPOTrainer on the pairs cut from the training rankings (align's DPO settings)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from align.chat import render_prompt
    from align.config import load_config
    from align.modeling import load_causal_lm, load_tokenizer, resolve_model_path
    from dpo.config import DPOConfig
    from dpo.data import usable_rankings
    from dpo.model import PolicyLogprobs
    from dpo.train import held_out_ranking_metrics
    from reward.data import expand_to_pairs, load_reward_data

    cfg = load_config(DPOConfig, CONFIGS / "dpo.yaml", [f"data.path={args.rankings}", f"seed={args.seed}",
                                                        *([f"beta={args.beta}"] if args.beta else [])])
    sft = resolve_model_path(cfg.policy_model)
    tokenizer = load_tokenizer(sft)
    data = load_reward_data(cfg.data)
    train, _ = usable_rankings(data.train)
    pairs = expand_to_pairs(train, cfg.seed)
    dataset = Dataset.from_list([{"prompt": render_prompt(tokenizer, r.prompt), "chosen": r.responses[0],
                                  "rejected": r.responses[1]} for r in pairs])
    trl_args = TRLConfig(
        output_dir=args.output_dir, beta=cfg.beta, learning_rate=cfg.learning_rate, num_train_epochs=1,
        per_device_train_batch_size=cfg.batch_size, lr_scheduler_type="linear",
        warmup_steps=int(cfg.warmup_ratio * -(-len(pairs) // cfg.batch_size)),
        max_grad_norm=cfg.max_grad_norm, max_length=cfg.max_length, logging_steps=10, save_strategy="no",
        report_to=[], seed=cfg.seed, use_cpu=True, bf16=False, disable_dropout=True, dataloader_num_workers=0)
    trainer = DPOTrainer(model=load_causal_lm(sft, tokenizer=tokenizer), args=trl_args, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=lora_config(cfg.lora, LoraConfig))
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    policy = trainer.model.eval()
    module = PolicyLogprobs(policy, buckets=cfg.length_buckets, chunk_tokens=cfg.logprob_chunk_tokens,
                            pad_token_id=tokenizer.pad_token_id)  # align's reading of a LoRA policy's log-probs
    summary = held_out_ranking_metrics(module, tokenizer, usable_rankings(data.eval)[0], cfg, trainer.accelerator)
    return {**summary, **evaluate_policy(policy, tokenizer, args.seed), "timing/train_s": train_s,
            "train/examples": len(pairs)}


def trl_grpo(args: argparse.Namespace) -> dict:
    """TRL's GRPOTrainer against align's reward model, with configs/demo/grpo.yaml's settings."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from align.chat import render_prompt
    from align.config import load_config
    from align.modeling import load_causal_lm, load_tokenizer, resolve_model_path
    from ppo.config import PPOConfig
    from ppo.data import load_prompts
    from reward.model import load_reward_model

    cfg = load_config(PPOConfig, CONFIGS / "grpo.yaml", [f"reward_model={args.reward}", f"seed={args.seed}",
                                                         *([f"num_iterations={args.iterations}"] if args.iterations else [])])
    sft = resolve_model_path(cfg.policy_model)
    tokenizer = load_tokenizer(sft)
    raw_prompt = {render_prompt(tokenizer, p): p for p in load_prompts(cfg.prompts, cfg.num_prompts, cfg.seed, "train")}
    scorer = load_reward_model(cfg.reward_model)

    def reward(prompts, completions, completion_ids, **_):  # align's score and missing-eos penalty
        scores = scorer.score([raw_prompt[p] for p in prompts], [c.strip() for c in completions]).tolist()
        return [s - cfg.missing_eos_penalty * (tokenizer.eos_token_id not in ids) for s, ids in zip(scores, completion_ids)]

    trl_args = GRPOConfig(
        output_dir=args.output_dir, learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        per_device_train_batch_size=cfg.batch_shape(1).micro_batch,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        generation_batch_size=cfg.batch_size,
        num_generations=cfg.samples_per_prompt, num_iterations=cfg.num_ppo_epochs,
        max_steps=cfg.num_iterations * cfg.num_ppo_epochs * cfg.num_mini_batches,
        max_completion_length=cfg.response_length, temperature=cfg.temperature, top_p=1.0, beta=cfg.kl.coef,
        epsilon=cfg.clip_coef, max_grad_norm=cfg.max_grad_norm, logging_steps=16, save_strategy="no", report_to=[],
        seed=cfg.seed, use_cpu=True, bf16=False, disable_dropout=True, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=load_causal_lm(sft, tokenizer=tokenizer), reward_funcs=reward, args=trl_args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in raw_prompt]),
                          processing_class=tokenizer, peft_config=lora_config(cfg.lora, LoraConfig))
    from align.run import peak_memory_mb

    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    peak = peak_memory_mb()  # where align's online stages read theirs: after training, before the evaluation
    return {**evaluate_policy(trainer.model.eval(), tokenizer, args.seed), "timing/train_s": train_s,
            "iteration": cfg.num_iterations, "memory/peak_rss_mb": peak}


def lora_config(lora, lora_class):
    return lora_class(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), task_type="CAUSAL_LM", bias="none")


def evaluate_policy(policy, tokenizer, seed: int) -> dict:
    """The held-out sampling every row gets (`ppo.evaluation.evaluate`, as in align's own runs)."""
    from ppo.data import gold_judge, load_prompts
    from ppo.evaluation import PolicySampler, evaluate

    prompts = load_prompts("synthetic", EVAL_PROMPTS, seed + 1, "heldout")[:EVAL_PROMPTS]
    sampler = PolicySampler(policy, tokenizer, temperature=0.7, response_length=48, max_prompt_length=128)
    metrics, _ = evaluate(sampler, prompts, gold_judge("synthetic"), batch_size=64, seed=seed)
    return metrics


# ============================================================================ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.05, 0.1, 0.2],
                        help="DPO betas swept on the first seed (the others run configs/demo/dpo.yaml's)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--table", action="store_true", help="print the table of OUT/runs.json again, run nothing")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-roads")
    parser.add_argument("--only", nargs="+", help="run only the rows whose label starts with one of these (they "
                        "replace their earlier results in OUT/runs.json)")
    parser.add_argument("--trl", choices=["dpo", "grpo"], help=argparse.SUPPRESS)  # one TRL run, in this process
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)  # the data, in this process
    parser.add_argument("--rankings", help=argparse.SUPPRESS)
    parser.add_argument("--reward", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--beta", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    parser.add_argument("--iterations", type=int, help=argparse.SUPPRESS)  # a shorter TRL GRPO run, to try it
    args = parser.parse_args()
    if args.trl:
        import torch

        torch.set_num_threads(1)
        summary = (trl_dpo if args.trl == "dpo" else trl_grpo)(args)
        from align.run import peak_memory_mb, write_json_atomic

        # (DPO's peak at the end, after the evaluation, as align's DPO stage reads its own)
        write_json_atomic(Path(args.output_dir) / "summary.json", {"memory/peak_rss_mb": peak_memory_mb(), **summary})
        return

    if args.table:
        print(table(json.loads((args.out / "runs.json").read_text())))
        return
    if args.prepare:
        prepare_data(args.out)
        return
    # This process stays small (no torch): the runs are its children, whatever it holds they would count.
    versions = subprocess.run([sys.executable, "-c", "import torch, transformers, trl; print(f'torch "
                               "{torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}')"],
                              capture_output=True, text=True).stdout.strip()
    print(f"{versions}; {os.cpu_count()} CPUs; {args.jobs} runs at a time", flush=True)
    subprocess.run([sys.executable, __file__, "--prepare", "--out", str(args.out)], check=True)
    rankings, reward = args.out / "data" / "rankings.kwise.jsonl", args.out / "data" / "reward"
    runs = plan(args, rankings, reward)
    if args.only:
        runs = [r for r in runs if r["row"].startswith(tuple(args.only))]
    print(f"{len(runs)} runs on {rankings} ({sum(1 for _ in open(rankings))} rankings), reward model {reward}",
          flush=True)
    execute(runs, args.jobs)
    if args.only and (args.out / "runs.json").exists():  # rows run again replace theirs, in place; the others stay
        again = {(r["row"], r["seed"], r["beta"]): r for r in runs}
        earlier = json.loads((args.out / "runs.json").read_text())
        runs = [again.pop((r["row"], r["seed"], r["beta"]), r) for r in earlier] + list(again.values())
    (args.out / "runs.json").write_text(json.dumps(runs, indent=1, default=str))
    print("\n" + table(runs))


if __name__ == "__main__":
    main()
