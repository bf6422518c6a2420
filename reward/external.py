"""A reward model trained elsewhere, made one that align's stages read: `align reward import`.

A sequence-classification checkpoint with one output (TRL's RewardTrainer, OpenRLHF, a reward model
from the Hub) scores on whatever scale its training left it. align's stages read normalised rewards:
gain * raw + bias, of mean 0 and std 1 on the SFT model's own samples (`reward/model.py`), so that a
KL coefficient means the same whichever reward model PPO, RLOO or GRPO is given. Import fits that
normalisation on samples of the policy the run will start from, measures the model's pairwise
accuracy on the rankings given (those the stages will train on, or held-out ones), and writes a
reward model directory that `align ppo reward_model=DIR`, `align reward score|eval` and
`align export` read like one `align reward train` wrote:

    DIR/config.json + weights      the checkpoint as it came, in its own dtype; a tokenizer without
                                   a pad token gets <pad> (and its embedding row)
    DIR/tokenizer files            its tokenizer
    DIR/reward_normalization.json  {"gain", "bias"}
    DIR/reward_model_info.json     imported_from, rendering, the normalisation's policy and data, the summary

It is read as it was trained, not as align's own reward models are (`rendering`): by default the
whole conversation through its chat template (`align.chat.render_conversation`, TRL's reward
trainer's form; a template may write a newline after the end of the turn, and the score is read
there), and with its own padding: where pad == eos the head reads the last token that is not eos,
as it did in training. An encoder trained on (question, answer) text pairs (OpenAssistant's DeBERTa
and ELECTRA reward models: tokenizer(question, answer)) is read as such pairs: TEXT_PAIR.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from align.errors import UserError
from reward.run_dir import CONVERSATION, IMPORT_RENDERINGS, IMPORTED_FROM, INFO_FILE, TEXT_PAIR, is_reward_model

log = logging.getLogger("align")


def check_source(path: Path) -> None:
    """The checkpoint to import, before anything loads: a sequence-classification model with one output,
    or one line saying what it is instead."""
    from align.modeling import check_model_files
    from reward.model import merge_adapter_command

    if not path.exists():
        raise UserError(f"reward model to import not found: {path}")
    if is_reward_model(path):
        raise UserError(f"{path} is already a reward model align reads: give it as it is (reward_model={path})")
    if (path / "adapter_config.json").is_file():
        command = merge_adapter_command(path, "AutoPeftModelForSequenceClassification", "num_labels=1")
        raise UserError(f"{path} is a LoRA adapter: merge it into its base first, into a checkpoint DIR, and import "
                        f'that: python -c "{command}"')
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a model checkpoint (no config.json)")
    check_model_files(path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    if not any(str(name).endswith("ForSequenceClassification") for name in architectures):
        raise UserError(f"{path} has no reward head (architectures: {', '.join(map(str, architectures)) or 'none'}): "
                        "a reward model to import is a sequence-classification checkpoint with one output; to train one "
                        "on your rankings, use `align reward train`")
    outputs = len(config.get("id2label") or {}) or int(config.get("num_labels", 2))
    if outputs != 1:
        raise UserError(f"{path} has {outputs} outputs (id2label): align reads one score per response, so a "
                        "classifier or a multi-objective reward model needs its scores combined into one first")


def check_rendering(source: Path, rendering: str) -> None:
    """`rendering` is one the import offers, and a text pair is read by an encoder (a causal LM's reward
    is read at the end of one text, so a pair would only be two texts run together)."""
    from align.modeling import checkpoint_is_encoder

    if rendering not in IMPORT_RENDERINGS:
        raise UserError(f"--rendering {rendering!r} is not one of {', '.join(IMPORT_RENDERINGS)}")
    if rendering == TEXT_PAIR and not checkpoint_is_encoder(source):
        raise UserError(f"--rendering {TEXT_PAIR} is for an encoder (BERT, DeBERTa, ELECTRA, ...) trained on (question, "
                        f"answer) pairs; {source} is a causal LM: leave --rendering out, to read the conversation")


def _reading(tokenizer, rendering: str) -> str:
    """How each (prompt, response) is read, in words, for the command's first line."""
    if rendering == TEXT_PAIR:
        sep = tokenizer.sep_token or "its separator"
        return (f"the prompt and the response as a text pair ({tokenizer.cls_token or ''} question {sep} response "
                f"{sep}; a conversation's turns joined by {sep})")
    if getattr(tokenizer, "chat_template", None):
        return "the whole conversation through its chat template"
    return "no chat template, so the prompt as HH-RLHF dialogue, then the response and eos"


def check_out(out: Path, source: Path, force: bool) -> None:
    """Where the imported model goes, before anything loads: a new directory in a folder that can be
    made, never the source or a directory that holds it; --force replaces only an earlier import (or
    an empty directory), never a trained reward run, an export or anything else."""
    from align.run import make_directory, read_mapping, replaceable_folder

    target, source = out.resolve(), source.resolve()
    if target == source or target in source.parents or source in target.parents:
        raise UserError(f"--out {out} overlaps the checkpoint being imported ({source}): choose another --out")
    if out.exists() and not force:
        raise UserError(f"{out} already exists; choose another --out or pass --force to replace it")
    if out.exists() and not replaceable_folder(out, lambda d: IMPORTED_FROM in read_mapping(d / INFO_FILE)):
        raise UserError(f"--out {out} is not an earlier `align reward import` and will not be replaced: "
                        "choose another --out")
    make_directory(out.parent)


def import_reward_model(source: Path, *, policy: str, data: Path, format: str, out: Path, prompts: int = 128,
                        response_length: int = 48, max_length: int = 1024, seed: int = 0, batch_size: int = 64,
                        force: bool = False, rendering: str = CONVERSATION,
                        echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Import `source` into `out` (see the module docstring); returns the summary it records."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align.files import input_file_problem
    from align.formats import merge_repeated_responses
    from align.generation import generate_responses
    from align.hf import quiet_transformers
    from align.modeling import (
        checkpoint_dtype,
        fit_embeddings,
        fit_max_length,
        load_causal_lm,
        load_tokenizer,
        reading_checkpoint,
        resolve_model_path,
    )
    from align.precision import autocast, default_device
    from align.run import atomic_directory
    from reward.data import file_digest, read_source, with_pairs
    from reward.evaluate import evaluate_rankings
    from reward.model import configure_padding, normalization_on_samples, normalization_prompts, save_reward_model

    t0 = time.perf_counter()
    check_source(source)
    check_rendering(source, rendering)
    check_out(out, source, force)
    problem = input_file_problem(data)
    if problem:
        raise UserError(f"--data {problem}")
    policy_path = resolve_model_path(policy).resolve()
    rankings = [merge_repeated_responses(r) for r in read_source(format, data)]
    if not rankings:
        raise UserError(f"{data}: no rankings in it")
    scored = with_pairs(rankings)
    chosen = normalization_prompts(rankings, prompts, seed)
    if len(chosen) < 2:  # one sample has no spread to scale
        raise UserError(f"{data}: {len(chosen)} distinct prompt; the normalisation needs the policy's answers to at "
                        "least 2")
    if len(chosen) < prompts:
        log.info("%s holds %d distinct prompts: the policy answers each of them once (--prompts %d)", data,
                 len(chosen), prompts)

    quiet_transformers()
    device = default_device()
    stored = checkpoint_dtype(source) or torch.float32
    # scored in bf16 on a GPU, as the stages score; the weights stay in the checkpoint's own dtype,
    # but for a half-precision checkpoint on the CPU, read in fp32 and written back exactly
    load_dtype = torch.float32 if device.type == "cpu" else stored
    with reading_checkpoint(source):
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(source, dtype=load_dtype, local_files_only=True)
    if tokenizer.pad_token is None:  # batches need one; a new token never occurs in text, so reads are unchanged
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        fit_embeddings(model, tokenizer)
    configure_padding(model, tokenizer, rendering)
    model.to(device).eval()
    max_length = fit_max_length(max_length, model, "--max-length")
    score_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    echo(f"reading each (prompt, response) as {source} was trained: " + _reading(tokenizer, rendering))

    # 1. the policy answers prompts of the rankings, as `align reward train` normalises on the SFT model
    policy_tokenizer = load_tokenizer(policy_path)
    sft = load_causal_lm(policy_path, dtype=score_dtype, tokenizer=policy_tokenizer).to(device)
    samples = generate_responses(sft, policy_tokenizer, chosen, max_new_tokens=response_length, seed=seed)
    del sft
    # 2. gain and bias that put those answers' rewards at mean 0, std 1
    gain, bias, raw = normalization_on_samples(model, tokenizer, chosen, [s[0] for s in samples],
                                               max_length=max_length, batch_size=batch_size, device=device,
                                               dtype=score_dtype, rendering=rendering)
    # 3. the pairwise accuracy on the rankings given (the model may have been trained on them elsewhere)
    summary: dict[str, Any] = {
        "reward/gain": gain, "reward/bias": bias, "reward/normalization_samples": len(raw),
        "reward/raw_mean": raw.mean().item(), "reward/raw_std": raw.std().item(),
    }
    if scored:
        with autocast(device, score_dtype):
            summary.update(evaluate_rankings(model, tokenizer, scored, max_length=max_length, batch_size=batch_size,
                                             gain=gain, rendering=rendering))
    summary["timing/total_s"] = time.perf_counter() - t0
    info = {
        IMPORTED_FROM: str(source.resolve()),
        "rendering": rendering,
        "base_model": str(source.resolve()),
        "data": {"format": format, "path": str(data.resolve()), "sha256": file_digest(data)},
        "config": {"model": {"max_length": max_length},  # under the names `align reward train` records
                   "eval": {"normalize_policy": str(policy_path), "normalize_prompts": prompts,
                            "normalize_response_length": response_length, "batch_size": batch_size},
                   "train": {"seed": seed}},
        "summary": summary,
    }
    model.to(stored)  # the checkpoint as it came, not an fp32 copy of a bf16 one
    with atomic_directory(out, overwrite=force) as tmp:
        save_reward_model(model, tokenizer, tmp, gain=gain, bias=bias, info=info)
    echo(_report(summary, len(scored), out))
    return summary


def _report(summary: dict[str, Any], scored_rankings: int, out: Path) -> str:
    from reward.evaluate import format_table

    lines = [format_table(summary)]
    if not scored_rankings:
        lines.append("no ranking in --data states a preference (all tied or one response): no accuracy measured")
    lines.append(f"imported reward model -> {out} (give it as reward_model={out})")
    return "\n".join(lines)
