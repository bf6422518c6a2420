"""bench/gpu_bench.py's TRL row, step 5 (run in a fresh process): TRL 1.12's PPOTrainer with the same
settings, in packages installed with `pip --target` beside the running torch / transformers / peft /
accelerate."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench.gpu_setup import SEVEN, peak_memory_gib, peak_reserved_gib

TRL_VERSION = "1.12.0"


def trl_worker(job: dict) -> dict:
    """TRL 1.12's PPOTrainer: only torch / transformers / peft / datasets / trl here."""
    for path in job.get("trl_path_first", []):
        sys.path.insert(0, path)  # TRL 1.12 before any other installed TRL
    for path in job.get("trl_path_last", []):
        sys.path.append(path)  # datasets and its dependencies only where the environment lacks them
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    s = job["settings"]
    bf16 = s["dtype"] == "bfloat16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    torch.manual_seed(s["seed"])
    tokenizer = AutoTokenizer.from_pretrained(job["model"], local_files_only=True)
    tokenizer.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(job["model"], dtype=dtype, local_files_only=True)
    reward_dir = Path(job["reward_model_dir"])

    def classifier():
        model = AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1, dtype=dtype,
                                                                   local_files_only=True)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    dataset = Dataset.from_dict({"input_ids": [tokenizer(t, add_special_tokens=False)["input_ids"][-128:]
                                               for t in job["rendered_prompts"]]})
    micro = s["batch_size"] // s["micro_batch_size"]
    config = PPOConfig(
        output_dir=job["out"], per_device_train_batch_size=s["micro_batch_size"], gradient_accumulation_steps=micro,
        num_mini_batches=1, num_ppo_epochs=s["epochs"], total_episodes=s["iterations"] * s["batch_size"],
        response_length=s["response_length"], temperature=1.0, learning_rate=1e-5, lr_scheduler_type="constant",
        kl_coef=0.05, kl_estimator="k1", missing_eos_penalty=1.0, stop_token="eos",
        local_rollout_forward_batch_size=s["batch_size"], num_sample_generations=0, bf16=bf16, fp16=False,
        gradient_checkpointing=s["gradient_checkpointing"], use_cpu=not torch.cuda.is_available(), report_to="none",
        logging_steps=1, save_strategy="no", seed=s["seed"], dataloader_num_workers=0,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=SEVEN, task_type="CAUSAL_LM")
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=None,
                         reward_model=classifier(), train_dataset=dataset, value_model=classifier(),
                         peft_config=lora, callbacks=[Clock()])
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    times = [b - a for a, b in zip([start, *ends], ends)] if ends else [total / s["iterations"]] * s["iterations"]
    return {"iterations": [{"timing/iteration_s": t} for t in times], "peak_gib": peak_memory_gib(),
            "reserved_gib": peak_reserved_gib(), "train_s": total}


def pip_install(target: Path, packages: list[str], wheels: Path | None, deps: bool) -> None:
    """`pip install --target target packages`, from the wheel folder `wheels` alone when given (a machine
    without network: pip must not try the index); the reason in one line when pip fails."""
    source = ["--no-index", "--find-links", str(wheels)] if wheels else []
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--no-cache-dir", "--target", str(target),
               *source, *([] if deps else ["--no-deps"]), *packages]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise RuntimeError(f"pip could not install {' '.join(packages)} (exit {done.returncode}): "
                           f"{lines[-1] if lines else 'no message'}")


def trl_packages(target: Path, wheels: Path | None = None) -> dict:
    """TRL 1.12 (and `datasets` if missing) installed with `pip --target` beside the running packages:
    TRL goes first on the worker's path, anything else after the environment's own packages, so the
    same torch / transformers / peft / accelerate run both trainers. `wheels`: a folder holding the
    TRL wheel and those of `datasets` and whatever of its dependencies the environment lacks (installed
    as they are, without dependencies). Raises RuntimeError naming what pip could not install."""
    first, last = target / "trl", target / "deps"
    if not (first / "trl").is_dir():
        print(f"installing TRL {TRL_VERSION} into {first} ...", flush=True)
        pip_install(first, [f"trl=={TRL_VERSION}"], wheels, deps=False)
    try:
        import datasets  # noqa: F401
    except ImportError:
        if not last.is_dir() and wheels:
            pip_install(last, sorted(str(w) for w in wheels.glob("*.whl") if not w.name.startswith("trl-")), wheels,
                        deps=False)
        elif not last.is_dir():
            pip_install(last, ["datasets"], None, deps=True)
    return {"trl_path_first": [str(first)], "trl_path_last": [str(last)]}
