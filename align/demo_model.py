"""The embedded demo model: built here, since no weights can be downloaded.

`build_demo_model` trains a byte-level BPE tokenizer on the synthetic corpus, initialises a
small Llama-architecture causal LM, and fine-tunes it on synthetic instruction data that
mixes good and bad responses (`align.synthetic`), so its samples span the gold judge's
range and leave room for the reward model and PPO to improve. The result is a standard
Hugging Face checkpoint (`config.json`, `model.safetensors`, `tokenizer.json`,
`generation_config.json`) that `AutoModelForCausalLM` / `AutoTokenizer` load offline.
Deterministic for a seed on a given machine. `align_demo_model.json` beside the weights records
the size, seed and recipe it was built with.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.chat import DEMO_CHAT_TEMPLATE, render_prompt
from align.run import atomic_directory

log = logging.getLogger("align")

# Bump when the recipe changes, so stale cached models are rebuilt.
RECIPE_VERSION = 2
RECORD_FILE = "align_demo_model.json"  # {"size", "seed", "recipe_version"}: what a built checkpoint is
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


@dataclass(frozen=True)
class Size:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    sft_steps: int  # 0: random weights (test fixtures)
    sft_batch_size: int
    sft_lr: float


SIZES: dict[str, Size] = {
    "test": Size(384, 32, 2, 2, 64, 0, 0, 0.0),
    "tiny": Size(1024, 128, 4, 4, 352, 450, 32, 3e-3),  # ~0.94M parameters
    "small": Size(2048, 256, 6, 4, 688, 600, 32, 1.5e-3),  # ~5.3M parameters
}
DEMO_SIZES = ("tiny", "small")  # what users build; `test` (random weights) is the tests' fixture


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGN_CACHE_DIR", "~/.cache/align")).expanduser()


def demo_model_dir(size: str = "tiny", seed: int = 0) -> Path:
    return cache_dir() / f"demo-{size}-seed{seed}-v{RECIPE_VERSION}"


def is_complete(path: Path) -> bool:
    return all((path / f).exists() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def built_as(path: Path) -> tuple[str, int, int | None] | None:
    """The (size, seed, recipe_version) a demo checkpoint records it was built with (the version None
    where the record gives none); None when it records no size and seed (a checkpoint built before
    the record was written, or not by align)."""
    try:
        record = json.loads((path / RECORD_FILE).read_text(encoding="utf-8"))
        version = record.get("recipe_version")
        return str(record["size"]), int(record["seed"]), None if version is None else int(version)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def ensure_demo_model(size: str = "tiny", seed: int = 0) -> Path:
    """The cached demo model, built (with a progress bar) on first use."""
    path = demo_model_dir(size, seed)
    if not is_complete(path):  # align's own cache: an incomplete folder there is replaced
        log.info("building the %s demo model in %s (first use; cached afterwards)", size, path)
        _build(path, size, seed, progress=True)
    return path


# --------------------------------------------------------------------------- tokenizer


def tokenizer_corpus(seed: int, n: int = 6000) -> list[str]:
    from align.synthetic import TOPICS, make_prompts, sample_response

    rng = random.Random(f"corpus:{seed}")
    texts = [p for p in make_prompts(600, seed=seed, split="train")]
    texts += [sample_response(p, rng) for p in make_prompts(n, seed=seed, split="train")]
    texts += [f for t in TOPICS for f in t.facts]
    return texts


def build_tokenizer(vocab_size: int, seed: int = 0) -> Any:
    """A byte-level BPE tokenizer trained on the synthetic corpus, with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        model_max_length=512,
        padding_side="left",
    )
    fast.chat_template = DEMO_CHAT_TEMPLATE
    return fast


# --------------------------------------------------------------------------- model


def init_model(tokenizer: Any, size: Size, seed: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def sft_batches(tokenizer: Any, examples: list[tuple[str, str]], batch_size: int, seed: int):
    """Endless shuffled batches of (input_ids, attention_mask, labels); loss on the response only."""
    import torch

    encoded = []
    for prompt, response in examples:
        p = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        r = tokenizer(response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        encoded.append((p + r, [-100] * len(p) + r))
    rng = random.Random(f"sft-order:{seed}")
    while True:
        rng.shuffle(encoded)
        for start in range(0, len(encoded) - batch_size + 1, batch_size):
            chunk = encoded[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((batch_size, width), tokenizer.pad_token_id)
            labels = torch.full((batch_size, width), -100)
            mask = torch.zeros((batch_size, width), dtype=torch.long)
            for i, (x, y) in enumerate(chunk):  # right padding for training
                ids[i, : len(x)] = torch.tensor(x)
                labels[i, : len(y)] = torch.tensor(y)
                mask[i, : len(x)] = 1
            yield ids, mask, labels


def supervised_finetune(model: Any, tokenizer: Any, size: Size, seed: int, progress: bool = True) -> list[float]:
    """A short SFT on synthetic (prompt, response) pairs; returns the loss curve."""
    import torch
    from tqdm.auto import tqdm

    from align.schedule import lr_schedule
    from align.synthetic import sft_examples

    torch.manual_seed(seed)
    examples = sft_examples(size.sft_steps * size.sft_batch_size // 2, seed=seed)
    batches = sft_batches(tokenizer, examples, size.sft_batch_size, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.sft_lr, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = lr_schedule(optimizer, size.sft_steps, max(1, size.sft_steps // 20), "cosine", floor=0.1)
    model.train()
    losses = []
    bar = tqdm(range(size.sft_steps), desc="SFT of the demo model", disable=not progress, unit="step")
    for _ in bar:
        ids, mask, labels = next(batches)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def _save(model: Any, tokenizer: Any, out: Path, size: str, seed: int) -> None:
    from transformers import GenerationConfig

    from align.hf import quiet_transformers

    quiet_transformers()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=64,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    record = {"size": size, "seed": seed, "recipe_version": RECIPE_VERSION}
    (out / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def build_demo_model(
    out: str | Path, size: str = "tiny", seed: int = 0, force: bool = False, progress: bool = True
) -> Path:
    """Build the demo SFT model into `out` (`align init-demo-model`): a complete checkpoint of this size,
    seed and recipe version already there is kept unless `force`; one of another size, seed or recipe
    version (an older recipe's model is another model), or one that records none of them (the cache
    folder's name records them for it), and anything else already at `out` (a user's folder or file)
    are refused unless `force`, before the build starts, so that nothing of the user's is replaced
    and no other model is passed off as the one asked for."""
    from align.errors import UserError

    if size not in DEMO_SIZES:
        raise UserError(f"unknown demo model size {size!r}; choose {' or '.join(DEMO_SIZES)}")
    out = Path(out)
    if is_complete(out) and not force:
        held = built_as(out)
        if held is None and out.resolve() == demo_model_dir(size, seed).resolve():
            held = (size, seed, RECIPE_VERSION)  # align's cache, keyed by size, seed and recipe version
        if held == (size, seed, RECIPE_VERSION):
            log.info("%s already holds the %s demo model of seed %d (use --force to rebuild)", out, size, seed)
            return out
        if held is not None and held[:2] == (size, seed):  # the model asked for, by another recipe
            version = held[2]
            which = "a newer" if version is not None and version > RECIPE_VERSION else "an older"
            named = "its record names no version" if version is None else f"version {version}"
            raise UserError(f"{out} holds the {size} demo model of seed {seed} built by {which} recipe ({named}; "
                            f"this align builds version {RECIPE_VERSION}); choose another --out or pass --force "
                            "to rebuild it")
        if held is None:  # maybe a demo model from before the record, maybe the user's own: never replaced
            raise UserError(f"{out} holds a checkpoint with no record of its demo size and seed ({RECORD_FILE}) "
                            "and will not be replaced, even with --force; choose another --out")
        raise UserError(f"{out} holds the {held[0]} demo model of seed {held[1]}, not the {size} one of seed {seed} "
                        "asked for; choose another --out or pass --force to rebuild it")
    if out.exists() or out.is_symlink():
        if not force:
            raise UserError(f"{out} already exists and is not a demo checkpoint; choose another --out "
                            "or pass --force to replace it")
        if not _replaceable(out):
            raise UserError(f"--out {out} is neither a demo checkpoint nor an empty folder and will not be "
                            "replaced, even with --force: choose another --out")
    return _build(out, size, seed, progress=progress)


def _replaceable(out: Path) -> bool:
    """What --force may replace: a demo checkpoint (it records its size and seed, or it is a folder
    of align's cache) or an empty folder; never a user's folder or file, a link, or another model."""
    from align.run import replaceable_folder

    return replaceable_folder(out, lambda d: built_as(d) is not None or d.resolve().parent == cache_dir().resolve())


def _build(out: Path, size: str, seed: int, progress: bool) -> Path:
    """Train and save the model into `out` (atomically: a crash leaves no half checkpoint),
    replacing whatever is there: the callers decided it may be replaced."""
    import torch

    spec = SIZES[size]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        tokenizer = build_tokenizer(spec.vocab_size, seed)
        model = init_model(tokenizer, spec, seed)
        if spec.sft_steps:
            supervised_finetune(model, tokenizer, spec, seed, progress=progress)
        with atomic_directory(out, overwrite=True) as tmp:  # another process finishing first is replaced alike
            _save(model, tokenizer, tmp, size, seed)
    finally:
        torch.set_num_threads(threads)
    return out


def build_random_model(out: str | Path, seed: int = 0) -> Path:
    """A randomly initialised tiny Llama + tokenizer in seconds: the fixture for fast tests
    (the `test` size, which `align init-demo-model` does not offer)."""
    return _build(Path(out), "test", seed, progress=False)
