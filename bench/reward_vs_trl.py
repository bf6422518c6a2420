"""K-wise reward training (align) vs TRL's RewardTrainer on the pairwise expansion.

Same data (synthetic task, K=4 rankings from simulated annotators at 73% agreement), same
model and head initialisation, same optimiser (AdamW, linear warm-up/decay, grad clip 1),
same step budget: one epoch where every optimizer step sees the same number of rankings,
i.e. `batch_size` rankings for align and the C(K,2) * batch_size pairs they imply for TRL.
Both are fp32 (TRL would otherwise autocast to bf16 on CPU) and are scored by the same
evaluation code against the gold judge's order on held-out prompts.

Each trainer runs in its own subprocess, so peak memory (max RSS) is its own.

    python bench/reward_vs_trl.py                      # 2000 rankings, the demo model
    python bench/reward_vs_trl.py --rankings 500 --model /path/to/checkpoint
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def peak_rss_mb() -> float:
    from align.run import peak_memory_mb  # VmHWM: this process's own peak (ru_maxrss counts the parent's)

    return peak_memory_mb()


def cpu_seconds() -> float:
    """User + system CPU time of this process: a fairer clock than wall time on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def align_config(args, out: Path):
    from align.config import load_config
    from reward.config import RewardConfig

    return load_config(RewardConfig, None, [
        f"output_dir={out}",
        f"model.name_or_path={args.model}",
        f"model.max_length={args.max_length}",
        f"model.train_layers={args.train_layers if args.train_layers else 'null'}",
        "data.format=synthetic",
        f"data.num_rankings={args.rankings}",
        f"data.num_eval_rankings={args.eval_rankings}",
        f"data.k={args.k}",
        f"data.agreement={args.agreement}",
        f"train.batch_size={args.batch_size}",
        f"train.epochs={args.epochs}",
        f"train.learning_rate={args.lr}",
        f"train.warmup_ratio={args.warmup_ratio}",
        f"train.seed={args.seed}",
        f"train.length_buckets={args.length_buckets}",
        "eval.normalize=false",  # TRL has no normalisation step: compare training alone
        "train.save_every=0",  # nor checkpoints (save_strategy="no")
    ])


def run_align(args) -> dict:
    import torch

    from reward.train import train_reward_model

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        summary = train_reward_model(align_config(args, Path(tmp) / "run"), echo=lambda s: None)
    return {
        "wall_s": summary["timing/train_s"],
        "cpu_s": summary["timing/train_cpu_s"],
        "forward_passes": summary["train/responses_forwarded"],
        "steps": summary["train/steps"],
        "peak_rss_mb": peak_rss_mb(),
        "accuracy": summary["eval/accuracy"],
        "eval_pairs": summary["eval/num_pairs"],
    }


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    from align.chat import encode_rendered, render_example
    from align.modeling import load_tokenizer, resolve_model_path
    from reward.data import expand_to_pairs, load_reward_data
    from reward.evaluate import evaluate_rankings
    from reward.model import build_reward_model

    cfg = align_config(args, Path("unused"))
    base = resolve_model_path(args.model).resolve()
    tokenizer = load_tokenizer(base)
    data = load_reward_data(cfg.data)
    pairs = expand_to_pairs(data.train, args.seed)  # TRL/OpenRLHF-style: every pair its own example

    def ids(prompt, response):  # the very same token ids align trains on (cut on the left, the bos kept)
        return encode_rendered(tokenizer, [render_example(tokenizer, prompt, response)], args.max_length)[0]

    dataset = Dataset.from_list([{"chosen_ids": ids(p.prompt, p.responses[0]), "rejected_ids": ids(p.prompt, p.responses[1])}
                                 for p in pairs])
    torch.manual_seed(args.seed)
    model = build_reward_model(base, tokenizer, seed=args.seed, train_layers=args.train_layers)  # same init as align
    pairs_per_ranking = math.comb(args.k, 2)
    steps = args.epochs * math.ceil(len(data.train) / args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        trl_args = TRLRewardConfig(
            output_dir=tmp,
            per_device_train_batch_size=args.batch_size * pairs_per_ranking,
            max_steps=steps,
            learning_rate=args.lr,
            lr_scheduler_type="linear",
            warmup_steps=int(args.warmup_ratio * steps),
            max_grad_norm=1.0,
            weight_decay=0.0,
            bf16=False,  # TRL defaults to bf16 autocast on CPU; align trains in fp32
            fp16=False,
            gradient_checkpointing=False,
            max_length=None,
            logging_steps=max(1, steps // 10),
            save_strategy="no",
            report_to="none",
            seed=args.seed,
            use_cpu=True,
            dataloader_drop_last=False,
            disable_tqdm=True,
        )
        trainer = RewardTrainer(model=model, args=trl_args, train_dataset=dataset, processing_class=tokenizer)
        t, cpu0 = time.perf_counter(), cpu_seconds()
        trainer.train()
        wall = time.perf_counter() - t
        cpu = cpu_seconds() - cpu0
    trained = trainer.model.eval()
    metrics = evaluate_rankings(trained, tokenizer, data.eval, max_length=args.max_length, batch_size=64)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "forward_passes": 2 * min(args.epochs * len(pairs), steps * args.batch_size * pairs_per_ranking),
        "steps": trainer.state.global_step,
        "peak_rss_mb": peak_rss_mb(),
        "accuracy": metrics["eval/accuracy"],
        "eval_pairs": metrics["eval/num_pairs"],
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="model spec (demo, demo:small, or a local checkpoint)")
    p.add_argument("--rankings", type=int, default=2000)
    p.add_argument("--eval-rankings", type=int, default=300)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--agreement", type=float, default=0.73)
    p.add_argument("--batch-size", type=int, default=32, help="rankings per step (TRL: the pairs they imply)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--train-layers", type=int, default=None, help="train only the top N layers (both trainers)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the rankings (both trainers)")
    p.add_argument("--length-buckets", type=int, default=4, help="align only; 1 = all continuations of a batch in one padded pass (after its prompt pass)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per trainer; 1 makes CPU time a load-independent measure on a shared machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["align", "trl"], help="run one trainer and print its JSON (used internally)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.only:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = run_align(args) if args.only == "align" else run_trl(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    results = {}
    for name in ("align", "trl"):
        proc = subprocess.run([sys.executable, __file__, *argv, "--only", name], capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{name} run failed (exit {proc.returncode})")
        results[name] = json.loads(lines[-1][len("RESULT "):])
    a, t = results["align"], results["trl"]
    print(f"\nreward model, synthetic K={args.k}, {args.rankings} rankings at {args.agreement:.0%} agreement, "
          f"model={args.model}, {a['steps']} steps of {args.batch_size} rankings")
    rows = [
        ("wall time, training (s)", f"{a['wall_s']:.1f}", f"{t['wall_s']:.1f}", f"{a['wall_s'] / t['wall_s']:.2f}"),
        ("CPU time, training (s)", f"{a['cpu_s']:.1f}", f"{t['cpu_s']:.1f}", f"{a['cpu_s'] / t['cpu_s']:.2f}"),
        ("forward passes (sequences)", str(a["forward_passes"]), str(t["forward_passes"]), f"{a['forward_passes'] / t['forward_passes']:.2f}"),
        ("optimizer steps", str(a["steps"]), str(t["steps"]), ""),
        ("peak memory, max RSS (MiB)", f"{a['peak_rss_mb']:.0f}", f"{t['peak_rss_mb']:.0f}", f"{a['peak_rss_mb'] / t['peak_rss_mb']:.2f}"),
        ("held-out accuracy vs gold", f"{a['accuracy']:.4f}", f"{t['accuracy']:.4f}", f"{a['accuracy'] - t['accuracy']:+.4f}"),
        ("held-out pairs", str(a["eval_pairs"]), str(t["eval_pairs"]), ""),
    ]
    header = ("", "align K-wise", "TRL pairwise", "align/TRL")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    ok = a["accuracy"] >= t["accuracy"] and a["wall_s"] <= 0.5 * t["wall_s"]
    print(f"\ntarget (accuracy >= TRL's, wall time <= half of TRL's): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
