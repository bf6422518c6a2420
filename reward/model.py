"""The reward model: a causal LM checkpoint with a one-output linear head, read at the last real token,
or a bidirectional encoder (BERT, RoBERTa, DeBERTa-v2, ModernBERT) read through its own
sequence-classification head (its [CLS] token / pooler).

Causal LMs see `prompt + response + eos`, rendered by the checkpoint's chat template, and their K
responses continue one encoding of the shared prompt. Encoders see the same text wrapped in their
own special tokens ([CLS] ... [SEP]), truncated on the left so the end of the conversation, where
the responses differ, is kept; each sequence is run whole (attention is bidirectional, so a prompt
encoding cannot be shared).

Layout of a saved reward model (`RUN/model/`), loadable with plain transformers (+ peft):

    config.json + model.safetensors      full fine-tuning: an AutoModelForSequenceClassification
    adapter_config.json + adapter_model  LoRA: a PEFT adapter whose modules_to_save hold the head (`score`, ...)
    tokenizer files                      causal LM: pad token distinct from eos; encoder: its own
    reward_normalization.json            {"gain", "bias"}: reward = gain * raw + bias, always applied
    reward_model_info.json               what data and config produced it (+ eval summary)

`load_reward_model(path)` returns a `RewardModel` whose `.score(prompts, responses)` gives
normalised rewards (N,).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from align.errors import UserError
from reward.run_dir import ALIGN, CONVERSATION, IMPORT_RENDERINGS, INFO_FILE, NORMALIZATION_FILE, TEXT_PAIR, recorded_max_length
from reward.run_dir import model_dir as find_model_dir

log = logging.getLogger("align")



# --------------------------------------------------------------------------- building


def score_head(model: nn.Module) -> nn.Linear:
    """The one-output linear layer the reward comes out of: `score` (causal LMs), `classifier`
    (BERT, DeBERTa-v2, ModernBERT) or `classifier.out_proj` (RoBERTa)."""
    for name in ("score", "classifier", "classifier.out_proj"):
        module = model.get_submodule(name) if _has_submodule(model, name) else None
        if isinstance(module, nn.Linear):
            return module
    raise UserError(f"{type(model).__name__} has no score/classifier linear head")


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def head_modules(model: nn.Module) -> list[str]:
    """The top-level modules outside the pretrained trunk (`score`; `classifier`; DeBERTa's `pooler`,
    ModernBERT's `head`): new or task-specific, so under LoRA they are trained in full."""
    return [name for name, child in model.named_children()
            if name != model.base_model_prefix and any(True for _ in child.parameters())]


def init_score_head(model: nn.Module, seed: int = 0) -> None:
    """'The N implementation details of RLHF with PPO' (Huang et al. 2022), detail 'reward head init':
    weight ~ Normal(0, 1/sqrt(d_model + 1)), bias 0 (Llama's score head has no bias)."""
    head = score_head(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        std = 1.0 / math.sqrt(head.in_features + 1)
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * std)
        if head.bias is not None:
            head.bias.zero_()


def build_reward_model(base_path: str | Path, tokenizer, *, lora: Any | None = None, seed: int = 0,
                       train_layers: int | None = None, freeze_embeddings: bool = False,
                       attn_implementation: str = "auto", dtype: torch.dtype = torch.float32) -> nn.Module:
    """AutoModelForSequenceClassification(num_labels=1) on `base_path`, in `dtype`, dropout off.

    `lora`: a RewardLoraOptions with `enabled=True` wraps the model in PEFT adapters on the linear
    layers `align.lora.resolve_lora_targets` picks (checked to reach every trained block), the
    head in modules_to_save (trained in full and saved with the adapter); otherwise full fine-tuning.
    `train_layers`: only the top N transformer blocks (+ final norm, head) are trained, whatever the
    family calls them (`align.modeling.find_blocks`).
    The embeddings grow to the tokenizer when it has more tokens (an added `<pad>`), as in PPO.
    `freeze_embeddings`: the token embeddings stay as they are (full fine-tuning).
    `attn_implementation`: "auto" (transformers' default), "eager" or "sdpa".
    `dtype`: the weights' storage dtype (bf16 halves them; the trainer keeps what it trains in fp32).
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from align.lora import lora_summary, resolve_lora_targets, with_adapter
    from align.modeling import (
        adapter_base_name,
        check_model_files,
        find_blocks,
        fit_embeddings,
        is_encoder,
        reading_checkpoint,
    )

    base_path = Path(base_path)
    if (base_path / "adapter_config.json").exists():  # (`align export` takes align's runs, not an adapter folder)
        raise UserError(f"{base_path} is a LoRA adapter, not a checkpoint: give its base ({adapter_base_name(base_path)}) "
                        f"as model.name_or_path, or merge the adapter into a checkpoint DIR and give that: "
                        f'python -c "{merge_adapter_command(base_path, "AutoPeftModelForCausalLM")}"')
    check_model_files(base_path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized" is expected: we initialise it below
    try:  # (inside reading_checkpoint, which says any other ValueError of a load as one line)
        with reading_checkpoint(base_path):
            try:
                model = AutoModelForSequenceClassification.from_pretrained(
                    base_path, num_labels=1, dtype=dtype,
                    attn_implementation=None if attn_implementation == "auto" else attn_implementation)
            except ValueError as exc:
                if "Unrecognized configuration class" not in str(exc):
                    raise
                model_type = json.loads((base_path / "config.json").read_text()).get("model_type")
                raise UserError(f"{base_path}: transformers has no sequence-classification head for its model type "
                                f"{model_type!r}, so it cannot be a reward model; train the reward model on a "
                                "checkpoint of another family (PPO and DPO take this one as the policy)") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if not is_encoder(model.config):
        fit_embeddings(model, tokenizer)
    configure_padding(model, tokenizer)
    disable_dropout(model)
    init_score_head(model, seed)
    num_layers = len(find_blocks(model)[1])
    if train_layers is not None and train_layers > num_layers:
        raise UserError(f"model.train_layers={train_layers} but the model has only {num_layers} layers")
    top = list(range(num_layers - train_layers, num_layers)) if train_layers else None
    if lora is not None and lora.enabled:
        from peft import LoraConfig, TaskType

        targets = resolve_lora_targets(model, list(lora.target_modules), layers=top)
        log.info("reward model: LoRA on %s", lora_summary(targets))
        peft_config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,  # qualified names, so exactly the checked layers
            modules_to_save=head_modules(model),
        )
        model = with_adapter(model, peft_config, targets)
    elif top is not None:
        freeze_below(model, top[0])
    if freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    return model


def merge_adapter_command(adapter: Path, peft_class: str, options: str = "") -> str:
    """A Python one-liner that merges the LoRA adapter at `adapter` into its base and saves the result,
    tokenizer included, as a checkpoint DIR (`peft_class`: the AutoPeftModel class of its task;
    `options`: keyword arguments of its loading, "num_labels=1" for a reward head)."""
    path = repr(str(adapter))
    return (f"from peft import {peft_class} as M; from transformers import AutoTokenizer as T; "
            f"M.from_pretrained({path}{', ' + options if options else ''}).merge_and_unload().save_pretrained('DIR'); "
            f"T.from_pretrained({path}).save_pretrained('DIR')")


def freeze_below(model: nn.Module, first_trained: int) -> None:
    """Full fine-tuning of the top blocks only: the blocks below `first_trained` and the embedding
    stage frozen, so autograd never goes below the first trained block. The embedding stage is every
    nn.Embedding (tokens, and the learned positions of GPT-2, OPT, BERT) and every module named
    `*embed*` (BERT's `embeddings` also holds a LayerNorm, which would pull the gradient through
    all the blocks). Blocks are found by `find_blocks` (`model.layers`, `transformer.h`,
    `gpt_neox.layers`, `model.decoder.layers`, `bert.encoder.layer`, ...)."""
    from align.lora import leaf
    from align.modeling import find_blocks

    _, blocks = find_blocks(model)
    embedding = [m for name, m in model.named_modules() if isinstance(m, nn.Embedding) or "embed" in leaf(name)]
    for module in [*blocks[:first_trained], *embedding]:
        module.requires_grad_(False)


def prepare_tokenizer(tokenizer, rendering: str = ALIGN) -> None:
    """Right padding, and left truncation so a too-long text keeps the response's end and its eos
    (the token the reward is read at) rather than the start of the prompt. An encoder's own
    [CLS] and [SEP] are added after truncation, so they stay. A model trained elsewhere
    (`rendering` CONVERSATION) keeps the padding it was trained with, pad == eos included."""
    if tokenizer.pad_token_id is None or (rendering == ALIGN and tokenizer.pad_token_id == tokenizer.eos_token_id):
        raise UserError("the tokenizer's pad token must exist and differ from eos (use align.modeling.load_tokenizer)")
    tokenizer.padding_side = "right"
    # a text pair is cut as those models were trained, tokenizer(question, answer, truncation=True): from the
    # end of the longer text (Open-Assistant's reward trainer)
    tokenizer.truncation_side = "right" if rendering == TEXT_PAIR else "left"


def configure_padding(model: nn.Module, tokenizer, rendering: str = ALIGN) -> None:
    """The head reads the rightmost token that is not padding, so pad must differ from eos:
    with pad == eos the eos that ends every response would be taken for padding (a model trained
    elsewhere that way is read that way: `prepare_tokenizer`)."""
    prepare_tokenizer(tokenizer, rendering)
    model.config.pad_token_id = tokenizer.pad_token_id


def disable_dropout(model: nn.Module) -> None:
    """Reward modelling with dropout makes r(x, y) noisy (N implementation details: dropout off).

    The model trains in train mode (gradient checkpointing needs it), so every form of dropout is
    set to 0: the `nn.Dropout` modules, and the rates attention layers keep as plain numbers and apply
    in train mode (Llama, Qwen2, Mistral, Gemma, ModernBERT: `self.attention_dropout`, read from the
    config), with the config's own rates for anything that reads them later."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float) and not isinstance(value, bool):
                setattr(module, name, 0.0)
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules()) if c is not None}
    for config in configs.values():
        for name, value in list(vars(config).items()):
            if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
                setattr(config, name, 0.0)


# --------------------------------------------------------------------------- forward


def encode(tokenizer, texts: Sequence[Rendered], max_length: int, *, encoder: bool = False) -> dict[str, torch.Tensor]:
    """Tokenize rendered prompt+response texts, right-padded. A causal LM's text already holds its
    special tokens (the chat template's bos, the eos; cut from the left, it keeps its bos:
    align.chat.encode_rendered); an encoder's get its own ([CLS] ... [SEP]); (question, answer) text
    pairs, `[CLS] question [SEP] answer [SEP]` with the token types the tokenizer gives them (a pair too
    long loses tokens from the longer text, on the side `prepare_tokenizer` sets)."""
    if texts and isinstance(texts[0], tuple):
        return tokenizer([q for q, _ in texts], [a for _, a in texts], padding=True, truncation="longest_first",
                         max_length=max_length, return_tensors="pt")
    if encoder:
        return tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    from align.chat import encode_rendered, pad_rows

    ids, mask = pad_rows(encode_rendered(tokenizer, list(texts), max_length), tokenizer.pad_token_id, left=False)
    return {"input_ids": ids, "attention_mask": mask}


def model_is_encoder(model: nn.Module) -> bool:
    """`align.modeling.is_encoder` for a (possibly DDP- or PEFT-wrapped) model."""
    from align.modeling import is_encoder

    return is_encoder(getattr(model, "module", model).config)


def forward_rewards(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(N, T) token ids -> (N,) raw reward at each sequence's last real token (an encoder's: at its
    [CLS]). `token_type_ids`: a text pair's segments, for an encoder that reads them (BERT, ELECTRA)."""
    types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **types).logits.squeeze(-1)


def forward_rewards_shared_prompts(model: nn.Module, batch: Any, buckets: int) -> torch.Tensor:
    """(N,) raw rewards of a `RankingBatch`, with each distinct prompt encoded once.

    The K responses of a ranking share their prompt, and causal attention makes the prompt's
    keys and values the same whatever follows. So the batch's U prompts go through the model
    once (left-padded, with the cache on) and each response continues from its prompt's
    cached keys and values: on the demo task a sixth of the tokens are saved (its prompts are
    short next to its responses; a step took 4-16% less time); the rewards and their gradients are those of the whole sequences (test; with LoRA
    dropout > 0 a prompt's K responses share one dropout draw over it). The
    continuations run in `buckets` length-sorted slices, each cut to its longest (synthetic
    responses vary 2x in length): less padding, still one pass per response.
    An encoder (bidirectional: no prompt encoding to share) reads each whole sequence, which the
    dataset then puts in `continuation_ids` (`RankingDataset(encoder=True)`), in the same slices
    (HH-RLHF dialogues under MiniLM's tokenizer: median 120 tokens, a tenth over 297).
    """
    from align.forward import forward_shared_prompts, length_slices

    if model_is_encoder(model):
        lengths = batch.continuation_mask.sum(dim=1)  # (N,)
        order, slices = length_slices(lengths, buckets)
        rewards = []
        for idx in slices:
            width = int(lengths[idx].max())
            rewards.append(forward_rewards(model, batch.continuation_ids[idx, :width], batch.continuation_mask[idx, :width]))
        return torch.cat(rewards)[torch.argsort(order)]
    _, order, continued = forward_shared_prompts(model, batch.prompt_ids, batch.prompt_mask, batch.prompt_index,
                                                 batch.continuation_ids, batch.continuation_mask, buckets)
    rewards = [out.logits.squeeze(-1) for *_, out in continued]
    return torch.cat(rewards)[torch.argsort(order)]  # (N,) back in input order


Rendered = str | tuple[str, str]  # what a reward model reads of a (prompt, response): one text, or a text pair


def render_texts(tokenizer, prompts: Sequence[Any], responses: Sequence[str], rendering: str = ALIGN) -> list[Rendered]:
    """What a reward model reads: ALIGN, prompt with the generation prompt, response and eos
    (`align.chat.render_example`: what align's reward models train on); CONVERSATION, the whole
    conversation through the chat template (`align.chat.render_conversation`: a model trained
    elsewhere); TEXT_PAIR, (question, response) text pairs (`align.chat.render_question`: an encoder
    trained on pairs, as OpenAssistant's reward models are)."""
    from align.chat import render_conversation, render_example, render_question

    if len(prompts) != len(responses):
        raise UserError(f"{len(prompts)} prompts but {len(responses)} responses")
    if rendering == TEXT_PAIR:
        return [(render_question(tokenizer, p), r) for p, r in zip(prompts, responses)]
    render = render_conversation if rendering == CONVERSATION else render_example
    return [render(tokenizer, p, r) for p, r in zip(prompts, responses)]


@torch.no_grad()
def score_texts(model: nn.Module, tokenizer, texts: Sequence[Rendered], *, max_length: int,
                batch_size: int = 64) -> torch.Tensor:
    """(N,) raw rewards of rendered texts, in batches, model in eval mode. Sorting by length
    first keeps padding (and time) low; the result is in the input order."""
    from align.distributed import release_gathered

    was_training = model.training
    model.eval()
    lengths = [len(t) if isinstance(t, str) else len(t[0]) + len(t[1]) for t in texts]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    out = torch.empty(len(texts))
    device = next(model.parameters()).device
    encoder = model_is_encoder(model)
    # a text pair's second segment, for a model with segment embeddings (BERT, ELECTRA; not RoBERTa or DeBERTa-v3)
    segments = getattr(getattr(model, "module", model).config, "type_vocab_size", 0) > 1
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = encode(tokenizer, [texts[i] for i in idx], max_length, encoder=encoder)
        types = enc["token_type_ids"].to(device) if segments and "token_type_ids" in enc else None
        out[idx] = forward_rewards(model, enc["input_ids"].to(device), enc["attention_mask"].to(device), types).float().cpu()
    release_gathered(model)  # a sharded reward model would keep its root unit gathered until a backward
    model.train(was_training)
    return out


# --------------------------------------------------------------------------- normalisation


def fit_normalization(raw: torch.Tensor) -> tuple[float, float]:
    """gain, bias with gain * raw + bias of mean 0 and std 1 on `raw` (the SFT model's own samples)."""
    mean, std = raw.mean().item(), raw.std().item() if raw.numel() > 1 else 0.0
    gain = 1.0 / std if std > 1e-8 else 1.0
    return gain, -mean * gain


def normalization_prompts(rankings: Sequence[Any], count: int, seed: int) -> list[Any]:
    """`count` distinct prompts of `rankings` (in a seeded random order) for the SFT model to answer."""
    prompts, seen = [], set()
    for r in rankings:
        key = str(r.prompt)
        if key not in seen:
            seen.add(key)
            prompts.append(r.prompt)
    random.Random(f"normalize:{seed}").shuffle(prompts)
    return prompts[:count]


def normalization_on_samples(model: nn.Module, tokenizer, prompts: Sequence[Any], responses: Sequence[str], *,
                             max_length: int, batch_size: int, device: Any, dtype: torch.dtype = torch.float32,
                             rendering: str = ALIGN) -> tuple[float, float, torch.Tensor]:
    """gain, bias making the rewards of the SFT model's own `responses` to `prompts` mean 0, std 1, and
    those raw rewards (N,): PPO's rewards then start centred and on one scale whatever scale the model
    learned (or was given elsewhere), so a KL coefficient means the same for every reward model."""
    from align.precision import autocast

    prepare_tokenizer(tokenizer, rendering)  # generation switched a shared tokenizer to left padding
    with autocast(device, dtype):
        raw = score_texts(model, tokenizer, render_texts(tokenizer, prompts, responses, rendering),
                          max_length=max_length, batch_size=batch_size)
    gain, bias = fit_normalization(raw)
    mean, std = raw.mean().item(), raw.std().item() if raw.numel() > 1 else 0.0
    if std < 1e-3 * max(1.0, abs(mean)):  # a head that barely depends on the text: PPO would chase its noise
        log.warning("the reward model scores the policy's %d samples all but alike (raw mean %.4g, std %.3g): "
                    "what tells them apart is rounding noise, which PPO, RLOO or GRPO would follow; is its reward "
                    "head trained?", len(raw), mean, std)
    return gain, bias, raw


# --------------------------------------------------------------------------- saving and loading


def save_reward_model(model: nn.Module, tokenizer, out: Path, *, gain: float, bias: float, info: dict[str, Any],
                      state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the checkpoint (full model or PEFT adapter + head), tokenizer, normalisation and provenance.
    `state_dict`: the weights to write when the module holds only this rank's shards (FSDP)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, state_dict=state_dict)
    tokenizer.save_pretrained(out)
    (out / NORMALIZATION_FILE).write_text(json.dumps({"gain": gain, "bias": bias}, indent=2) + "\n", encoding="utf-8")
    (out / INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    return out


@dataclass
class RewardModel:
    """A loaded reward model; `.model` is a merged nn.Module in eval mode."""

    model: nn.Module
    tokenizer: Any
    gain: float
    bias: float
    max_length: int = 512
    path: Path | None = None
    rendering: str = ALIGN  # how it reads a (prompt, response): `render_texts`

    def score_raw(self, prompts: Sequence[Any], responses: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(N,) un-normalised rewards r(x, y)."""
        texts = render_texts(self.tokenizer, prompts, responses, self.rendering)
        return score_texts(self.model, self.tokenizer, texts, max_length=self.max_length, batch_size=batch_size)

    def score(self, prompts: Sequence[Any], responses: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(N,) normalised rewards gain * r(x, y) + bias (mean 0, std 1 on the SFT model's samples)."""
        return self.normalize(self.score_raw(prompts, responses, batch_size))

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw rewards (`score_raw`) as the stages read them: gain * raw + bias."""
        return self.gain * raw + self.bias

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_reward_model(path: str | Path, device: str | torch.device | None = None,
                      dtype: torch.dtype = torch.float32) -> RewardModel:
    """Load RUN or RUN/model: a full checkpoint or a PEFT adapter (merged here), with its normalisation.
    `device` None: the GPU when there is one, else the CPU; `dtype`: the weights' dtype (bf16 for scoring)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align.hf import quiet_transformers
    from align.modeling import check_model_files, fit_embeddings, fit_max_length, is_encoder, reading_checkpoint
    from align.precision import default_device

    quiet_transformers()  # no loading bars or notices on a command's output, as where the stages load models
    device = default_device() if device is None else device

    model_dir = find_model_dir(path)
    check_model_files(model_dir)
    with reading_checkpoint(model_dir):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if (model_dir / "adapter_config.json").exists():
        from peft import PeftModel

        from align.modeling import adapter_base_path

        try:  # beside the adapter where its path is relative and a checkpoint is there, as the policy's
            base = adapter_base_path(model_dir)
        except UserError as exc:
            raise UserError(f"the reward adapter at {model_dir}: its base checkpoint cannot be loaded ({exc})") from None
        check_model_files(base)
        with reading_checkpoint(base):
            model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=dtype)
        if not is_encoder(model.config):
            fit_embeddings(model, tokenizer)  # the <pad> added in training
        model.config.pad_token_id = tokenizer.pad_token_id
        with reading_checkpoint(model_dir):
            model = PeftModel.from_pretrained(model, model_dir).merge_and_unload()
    else:
        with reading_checkpoint(model_dir):
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype)
    info_path = model_dir / INFO_FILE
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
    rendering = info.get("rendering", ALIGN)
    if rendering not in (ALIGN, *IMPORT_RENDERINGS):  # a hand-edited file, or one from a later align
        raise UserError(f"{info_path}: its rendering {rendering!r} is not one this align reads "
                        f"({', '.join((ALIGN, *IMPORT_RENDERINGS))})")
    configure_padding(model, tokenizer, rendering)
    model.to(device).eval()
    norm = json.loads((model_dir / NORMALIZATION_FILE).read_text(encoding="utf-8"))
    max_length = recorded_max_length(info)
    max_length = fit_max_length(max_length, model, f"{model_dir}: model.max_length")  # as in its training
    return RewardModel(model=model, tokenizer=tokenizer, gain=float(norm["gain"]), bias=float(norm["bias"]),
                       max_length=max_length, path=model_dir, rendering=rendering)
