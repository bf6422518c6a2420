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
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRL_VERSION = "1.12.0"
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# hidden, MLP, layers, query heads, key-value heads, tokenizer size (Qwen2.5 config.json bodies)
SHAPES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab": 512},
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab": 32000},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "vocab": 32000},
}
# dense bf16 TFLOP/s by a piece of the device name, the more specific pieces first (the datasheets:
# H100 SXM and H200 SXM 989, H100 PCIe 756, H100 NVL and H200 NVL 835; their figures with sparsity halved)
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("A10G", 125.0)]


# ============================================================================ 1-2. tokenizer and model


def corpus(data: Path) -> list[str]:
    """The HH-RLHF transcripts and every OpenAssistant message and prompt."""
    texts = []
    with gzip.open(data / "hh-rlhf" / "harmless-base-test.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts += [row["chosen"], row["rejected"]]

    def walk(node: dict) -> None:
        texts.append(node.get("text", ""))
        for child in node.get("replies", []):
            walk(child)

    for line in (data / "oasst" / "en_100_tree.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            walk(json.loads(line)["prompt"])
    texts += prompts(data)
    return texts


def prompts(data: Path) -> list[str]:
    lines = (data / "oasst" / "prompt_lottery_en_250_text.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def build_tokenizer(data: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from align.chat import DEMO_CHAT_TEMPLATE
    from align.demo_model import SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(data), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=SPECIAL_TOKENS[3:], model_max_length=32768)
    fast.chat_template = DEMO_CHAT_TEMPLATE
    return fast


def reused_as_built(built: object, wanted: object, what: str, record: Path) -> None:
    """--reuse takes an earlier run's model or reward model only where it was built as this run asks."""
    if built != wanted:
        raise SystemExit(f"--reuse: the {what} in {record.parent} was built with {built}, this run asks for "
                         f"{wanted}; leave out --reuse (or match those settings)")


def build_model(out: Path, shape: str, data: Path, device: str, seed: int) -> dict:
    """Tokenizer + random-init Qwen2 saved at `out` (bf16 on a GPU, fp32 on the CPU); returns its sizes."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    spec = dict(SHAPES[shape])
    tokenizer = build_tokenizer(data, spec.pop("vocab"))
    config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=32768, rope_theta=1_000_000.0,
                         tie_word_embeddings=True, use_sliding_window=False, rms_norm_eps=1e-6,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **spec)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    model.to(dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    del model
    if device != "cpu":  # the workers that follow measure a card this process holds no cached blocks of
        torch.cuda.empty_cache()
    return {"parameters": params, "non_embedding": params - embed, "vocab": len(tokenizer)}


# ============================================================================ 3-5. workers (fresh processes)


def peak_memory_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    if str(REPO) not in sys.path:  # TRL's worker imports this one module of the checkout, nothing that trains
        sys.path.append(str(REPO))
    from align.run import peak_memory_mb  # VmHWM: ru_maxrss would count the parent's memory too

    return peak_memory_mb() / 1024


def peak_reserved_gib() -> float | None:
    """The caching allocator's peak reserve (what the GPU must hold: allocations plus the allocator's
    cached and fragmented blocks), None on the CPU."""
    import torch

    return torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None


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


# ============================================================================ 6. the table


def phase_flops(info: dict, settings: dict, prompt_tokens: float, response_tokens: float,
                critic: bool) -> dict[str, float]:
    """Model FLOPs of one PPO iteration's rollout, score and optimise phases (see the module docstring).
    The trunk runs on every token; the output layer (vocab x hidden, tied) only where a response
    token's log-prob is read: align computes logits for the response positions alone, and the
    reward model has a score head instead."""
    trunk, head = info["non_embedding"], info["vocab"] * SHAPES_HIDDEN[settings["shape"]]
    seq = prompt_tokens + response_tokens
    b = settings["batch_size"]
    trained = settings["epochs"] * b * seq
    # sampling (the prompt once, then each new token), pi_old (bf16: recomputed by the training forward), pi_ref
    phases = {"rollout": 2 * trunk * 3 * b * seq + 2 * head * 3 * b * response_tokens,
              "score": 2 * trunk * b * seq,
              "optimise": 6 * (trunk * trained + head * settings["epochs"] * b * response_tokens)}
    if critic:  # the critic's forward in the rollout and its training
        phases["rollout"] += 2 * info["non_embedding"] * b * seq
        phases["optimise"] += 6 * info["non_embedding"] * trained
    return phases


def flops_per_iteration(info: dict, settings: dict, prompt_tokens: float, response_tokens: float,
                        critic: bool) -> float:
    """Model FLOPs of one PPO iteration (see the module docstring)."""
    return sum(phase_flops(info, settings, prompt_tokens, response_tokens, critic).values())


SHAPES_HIDDEN = {k: v["hidden_size"] for k, v in SHAPES.items()}


def mean_after_first(values: list[float]) -> float:
    kept = values[1:] if len(values) > 1 else values
    return sum(kept) / len(kept)


def table(results: dict, info: dict, settings: dict, prompt_tokens: float, peak_tflops: float | None) -> str:
    head = (f"{'run':28s} {'s/iter':>7s} {'rollout':>8s} {'sample':>7s} {'score':>6s} {'optimise':>9s} {'tok/s':>8s} "
            f"{'peak GiB':>9s} {'reserved':>8s} {'MFU':>6s} {'MFU roll':>8s} {'MFU opt':>8s}")
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        its = r["iterations"]
        sec = mean_after_first([i["timing/iteration_s"] for i in its])

        def split(key: str, its=its) -> str:
            return f"{mean_after_first([i[key] for i in its]):.2f}" if key in its[0] else "-"

        resp = mean_after_first([i["response/length"] for i in its]) if "response/length" in its[0] else None
        if resp is None:  # TRL: take align's measured length as the same work
            resp = next((mean_after_first([i["response/length"] for i in x["iterations"]])
                         for x in results.values() if "response/length" in x["iterations"][0]), settings["response_length"])
        tok_s = (f"{settings['batch_size'] * resp / mean_after_first([i['timing/rollout_s'] for i in its]):.0f}"
                 if "timing/rollout_s" in its[0] else "-")
        phases = phase_flops(info, settings, prompt_tokens, resp, critic="critic" in name or "TRL" in name)

        def mfu(flops: float, key: str | None = None, its=its, sec=sec) -> str:
            if not peak_tflops or (key is not None and key not in its[0]):
                return "-"
            seconds = sec if key is None else mean_after_first([i[key] for i in its])
            return f"{100 * flops / (seconds * peak_tflops * 1e12):.1f}%"

        reserved = f"{r['reserved_gib']:.2f}" if r.get("reserved_gib") is not None else "-"
        lines.append(f"{name:28s} {sec:7.2f} {split('timing/rollout_s'):>8s} {split('timing/sample_s'):>7s} "
                     f"{split('timing/score_s'):>6s} {split('timing/optimise_s'):>9s} {tok_s:>8s} {r['peak_gib']:9.2f} "
                     f"{reserved:>8s} {mfu(sum(phases.values())):>6s} "
                     f"{mfu(phases['rollout'], 'timing/rollout_s'):>8s} {mfu(phases['optimise'], 'timing/optimise_s'):>8s}")
    return "\n".join(lines)


def library_versions() -> dict[str, str]:
    """The versions the README's table must state beside the card (the rollout's KV cache relies on
    transformers' cache and mask code within the range pyproject pins)."""
    import importlib.metadata

    import torch

    versions = {name: importlib.metadata.version(name) for name in ("torch", "transformers", "peft", "accelerate")}
    versions["cuda"] = torch.version.cuda or "-"
    return versions


def peak_tflops_of(device_name: str) -> tuple[float | None, str]:
    """The dense bf16 peak assumed for a device name, and which entry of PEAK_BF16_TFLOPS gave it."""
    for piece, tflops in PEAK_BF16_TFLOPS:
        if piece in device_name:
            return tflops, f"{piece}'s {tflops:g} TFLOP/s bf16 dense"
    return None, "unknown device: no MFU (--peak-tflops sets one)"


def device_peak_tflops() -> tuple[str, float | None, str]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", None, "cpu: no MFU"
    name = torch.cuda.get_device_name(0)
    return (name, *peak_tflops_of(name))


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
