"""`align export`: a policy run's policy (PPO, RLOO, GRPO or DPO) or a reward model run as an ordinary checkpoint.

* `--merge` (default): the LoRA adapter is merged into the base and saved as safetensors
  with the tokenizer, chat template and generation config, loadable by
  `AutoModelForCausalLM.from_pretrained` and so by inference servers that read Hugging
  Face checkpoints.
* `--adapter`: only the PEFT adapter (+ tokenizer), loadable with
  `PeftModel.from_pretrained(base, DIR)`; its `base_model_name_or_path` names the base. A fully
  fine-tuned reward model has no adapter and is copied whole either way. A policy trained on an SFT
  model that is itself a LoRA adapter applies on that SFT model merged: the card's loading code merges
  each adapter of the chain in before this one goes on, and a line says so.

Either way DIR/README.md is a model card saying what the folder holds and recording the base
checkpoint, the data, the stage's settings (the reward model and PPO/RLOO/GRPO settings, or DPO's
rankings and settings) and the held-out results (accuracy, KL, reward and gold gains). The
export is written into a hidden temporary directory beside DIR and renamed into place only
when complete, so a crash or a kill leaves no half export behind. `--force` replaces only an
earlier export (a folder holding such a model card) or an empty folder, and never a checkpoint the
export reads (the run, the bases down its adapter chain, a PPO run's reward model). A policy run records
the model chain it was trained on (RUN/trained_on.json); a base rebuilt in place since is refused in one
line naming it and the files that changed (a run finished before runs kept the record: not checked).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.errors import UserError
from align.modeling import check_model_files
from align.run import atomic_directory

if TYPE_CHECKING:
    from reward.run_dir import RewardRun

log = logging.getLogger("align")

POLICY_KINDS = ("ppo", "dpo")  # runs whose RUN/policy is a LoRA adapter on the SFT checkpoint

def run_kind(run: Path) -> str:
    """'ppo' for a run of `align ppo` (RUN/policy is an adapter), 'dpo' for one of `align dpo` (the
    same layout), 'reward' for a reward-model run."""
    from dpo.run_dir import is_dpo_run
    from ppo.run_dir import POLICY_DIR, is_ppo_run
    from reward.run_dir import MODEL_DIR, NORMALIZATION_FILE, is_reward_model

    if is_ppo_run(run):
        return "dpo" if is_dpo_run(run) else "ppo"
    if is_reward_model(run):
        return "reward"
    if not run.exists():
        raise UserError(f"run directory not found: {run}")
    raise UserError(f"{run} is neither a PPO or DPO run (no {POLICY_DIR}/adapter_config.json) nor a reward run "
                    f"(no {MODEL_DIR}/{NORMALIZATION_FILE}); is the run finished?")


def export_run(run: str | Path, out: str | Path, *, merge: bool = True, force: bool = False) -> Path:
    run, out = Path(run), Path(out)
    kind = run_kind(run)
    if _overlaps(out, run):  # --force would replace the run
        raise UserError(f"--out {out} overlaps the run {run}: choose a directory outside it")
    source = _source_dir(run, kind)
    check_model_files(source)  # one line for a damaged run, never an export without weights
    _check_weights_whole(source)  # an export that copies them would pass a truncated file on
    if kind in POLICY_KINDS:
        _check_trained_on(run, source)
    for checkpoint in _checkpoints_read(run, kind, source):
        if _overlaps(out, checkpoint):  # --force would replace a base the export itself stands on
            raise UserError(f"--out {out} overlaps {checkpoint}, a checkpoint the export reads: "
                            "choose a directory outside it")
    if out.exists() or out.is_symlink():
        if not force:
            raise UserError(f"{out} already exists; choose another --out or pass --force to replace it")
        if not _replaceable(out):
            raise UserError(f"--out {out} is not an earlier export (no model card written by align export) "
                            "and will not be replaced: choose another --out")
    _prepare_output_folder(out)
    _remove_stale_temporaries(out)
    with atomic_directory(out, overwrite=force) as tmp:
        if kind in POLICY_KINDS:
            _export_policy(run, tmp, merge)
        else:
            _export_reward(run, tmp, merge)
        # what was written: a fully fine-tuned reward model is whole whichever was asked, and nothing merged
        form = ("adapter" if (tmp / "adapter_config.json").exists()
                else "merged" if (source / "adapter_config.json").exists() else "full")
        (tmp / "README.md").write_text(model_card(run, kind, form), encoding="utf-8")
    log.info("exported the %s of %s (%s) to %s", "policy" if kind in POLICY_KINDS else "reward model", run,
             FORMS[form], out)
    return out


def _source_dir(run: Path, kind: str) -> Path:
    """The directory an export reads: the policy's adapter, or the reward model."""
    from ppo.run_dir import PPORun
    from reward.run_dir import model_dir

    return PPORun(run).policy_dir if kind in POLICY_KINDS else model_dir(run)


def _check_weights_whole(directory: Path) -> None:
    """Each safetensors file in `directory` whole, or one line naming the damaged one, before anything is
    written: an adapter, and a fully fine-tuned reward model, are copied without being loaded. Opening a
    file reads only its header, which must account for every byte of it (a cut or padded file fails)."""
    from safetensors import safe_open

    from align.modeling import reading_checkpoint

    for path in sorted(directory.glob("*.safetensors")):
        with reading_checkpoint(path), safe_open(str(path), framework="numpy"):
            pass


def _check_trained_on(run: Path, policy: Path) -> None:
    """The SFT checkpoint the policy's adapter names (its adapter chain followed) holds what the run was
    trained on, as RUN/trained_on.json records it (align.lora.save_policy_adapter), or one line naming it
    and what changed: a base rebuilt in place since (another seed, another family of the same shapes)
    would take the adapter without a word. A run finished before runs kept the record: not checked."""
    from align.modeling import adapter_chain
    from align.provenance import MODELS_RECORD_FILE, check_models_record

    base = adapter_chain(policy, find_only=True)[1:2]  # none where the adapter names no base
    check_models_record(run / MODELS_RECORD_FILE, {"policy_model": base[0]} if base else {},
                        purpose="export the run")


def _policy_bases(policy: Path) -> list[Path]:
    """What the policy's adapter stands on, as loading follows it: the SFT checkpoint it names, then,
    where that is itself a LoRA adapter (align merges the chain before training its own adapter), each
    base in turn down to the full checkpoint, that last. Nothing is loaded or built: a base not found
    here, or one align builds ('demo'), ends the list as its adapter names it."""
    from align.modeling import adapter_base_name, adapter_chain, is_adapter_dir

    chain = adapter_chain(policy, find_only=True)
    if len(chain) > 1 and is_adapter_dir(chain[-1]) and adapter_base_name(chain[-1]):
        chain.append(Path(str(adapter_base_name(chain[-1]))))
    return [path.resolve() if path.is_dir() else path for path in chain[1:]]


def _saved_vocab_rows(bases: list[Path]) -> list[int | None]:
    """For each LoRA adapter of an SFT chain (`_policy_bases`), innermost first: the rows of the token
    embeddings or output layer it saved whole (an SFT that added chat tokens: PEFT's save_embedding_layers,
    modules_to_save), which its base must grow to before it loads; None where it saved none, or where the
    checkpoint is not here to name those layers. Read from the files' headers, and the layers' names from
    the architecture built on the meta device: no weights are loaded."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    adapters = list(reversed(bases[:-1]))
    if not adapters:
        return []
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(bases[-1], local_files_only=True))
    except (OSError, ValueError):  # the checkpoint is not here (an adapter export does not need it)
        return [None] * len(adapters)
    layers = {model.get_input_embeddings(), model.get_output_embeddings()}
    keys = {f"base_model.model.{name}{part}.weight" for name, module in model.named_modules() if module in layers
            for part in ("", ".modules_to_save")}
    found: list[int | None] = []
    for adapter in adapters:
        weights = adapter / "adapter_model.safetensors"
        rows = []
        if weights.is_file():
            with safe_open(str(weights), framework="pt") as f:
                rows = [f.get_slice(key).get_shape()[0] for key in keys & set(f.keys())]
        found.append(max(rows) if rows else None)
    return found


def _overlaps(out: Path, other: Path) -> bool:
    """`out` is `other`, holds it, or lies inside it (links followed)."""
    target, other = out.resolve(), other.resolve()
    return target == other or target in other.parents or other in target.parents


def _checkpoints_read(run: Path, kind: str, source: Path) -> list[Path]:
    """Every checkpoint outside the run that the export loads weights, a tokenizer or a model card's
    figures from: each base down the adapter chain, as loading follows it (a base that cannot be
    found is named as the adapter names it: an adapter export never loads it, and an --out there
    would make the adapter its own base), and a PPO run's reward model."""
    from align.modeling import adapter_chain

    found = adapter_chain(source, find_only=True)[1:]
    if kind == "ppo":
        from ppo.run_dir import PPORun
        from reward.run_dir import is_reward_model

        reward = PPORun(run).config().get("reward_model")
        if reward and is_reward_model(str(reward)):
            found.append(Path(str(reward)))
    return found


def _replaceable(out: Path) -> bool:
    """What --force may replace: an earlier export (a checkpoint whose model card says align exported it)
    or an empty folder; never another folder, or a file that happens to be in the way."""
    if not out.is_dir():
        return False
    try:
        if not any(out.iterdir()):
            return True
    except OSError:
        return False
    card = out / "README.md"
    if not card.is_file() or not ((out / "config.json").is_file() or (out / "adapter_config.json").is_file()):
        return False
    try:
        return any(line in CARD_TITLES for line in card.read_text(encoding="utf-8").splitlines())
    except (OSError, UnicodeDecodeError):
        return False


def _prepare_output_folder(out: Path) -> None:
    """The folder --out goes into, created if need be, or one line saying why it cannot be (a file in
    the way, no permission), before any weights are loaded."""
    parent = out.parent
    first_existing = next((p for p in (parent, *parent.parents) if p.exists() or p.is_symlink()), None)
    if first_existing is not None and not first_existing.is_dir():
        raise UserError(f"--out {out}: {first_existing} is a file, not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create the folder {parent} ({exc.strerror or exc})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: the folder {parent} is not writable")


def _remove_stale_temporaries(out: Path) -> None:
    """Hidden temporaries that a killed export left beside `out` (never the real output)."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _copy_files(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        if item.is_file():
            shutil.copy2(item, dst / item.name)


def _export_policy(run: Path, out: Path, merge: bool) -> None:
    from align.modeling import load_causal_lm, load_tokenizer
    from ppo.run_dir import PPORun

    policy = PPORun(run).policy_dir
    if not merge:
        _copy_files(policy, out)
        bases = _policy_bases(policy)
        if len(bases) > 1:
            log.warning("%s", _sft_adapter_note(bases))
        return
    tokenizer = load_tokenizer(policy)
    model = load_causal_lm(policy, tokenizer=tokenizer)  # base + adapter, merged in fp32
    _in_base_dtype(model, policy).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _in_base_dtype(model: Any, adapter: Path) -> Any:
    """The merged model cast to the dtype its base checkpoint stores (a bf16 base exports as bf16,
    not at twice its size in fp32). The merge itself ran in fp32, so W + BA is rounded only once."""
    from align.modeling import checkpoint_dtype

    dtype = checkpoint_dtype(adapter)
    return model.to(dtype) if dtype is not None else model


def _export_reward(run: Path, out: Path, merge: bool) -> None:
    from reward.run_dir import INFO_FILE, NORMALIZATION_FILE, model_dir

    source = model_dir(run)
    if not merge or not (source / "adapter_config.json").exists():
        _copy_files(source, out)  # adapter only, or a fully fine-tuned model already whole
        return
    from reward.model import load_reward_model

    reward = load_reward_model(source, device="cpu")  # fp32, and no GPU memory needed
    _in_base_dtype(reward.model, source).save_pretrained(out, safe_serialization=True)
    reward.tokenizer.save_pretrained(out)
    for name in (NORMALIZATION_FILE, INFO_FILE):  # the normalisation and the provenance travel along
        if (source / name).exists():
            shutil.copy2(source / name, out / name)


# --------------------------------------------------------------------------- model card


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def _data_lines(data: dict[str, Any]) -> list[str]:
    """The rankings a run trained on, as the run recorded them when it read them (its path absolute,
    with the file's sha256; a stage's config holds the path as it was given, maybe relative)."""
    if not data:
        return []
    source = data.get("path") or data.get("project") or data.get("format")
    lines = [f"- data: {data.get('format', '?')} ({source})"]
    if data.get("sha256"):
        lines.append(f"- data sha256: {data['sha256']}")
    return lines


def _reward_section(reward: RewardRun) -> list[str]:
    """What the reward model was trained on and how well it ranks held-out data (from its own run)."""
    summary, data = reward.summary(), reward.info().get("data") or reward.config().get("data", {})
    lines = [f"- reward model: `{reward.path.resolve()}`", *_data_lines(data)]
    for key, label in [("train/rankings", "training rankings"), ("eval/num_rankings", "held-out rankings"),
                       ("eval/label_source", "held-out labels from"), ("eval/num_pairs", "held-out pairs"),
                       ("eval/accuracy", "held-out pairwise accuracy"),
                       ("eval_annotators/accuracy", "held-out accuracy against the annotators")]:
        if key in summary:
            lines.append(f"- {label}: {_fmt(summary[key])}")
    return lines


def _typed_ppo_config(config: dict[str, Any]) -> Any:
    """The run's saved config as a PPOConfig, for what it derives (has_value_model, kl_in_loss); None for
    a config this version no longer reads. Its prompt files are not needed here and may have moved."""
    from align.config import from_dict
    from align.errors import ConfigError
    from ppo.config import PPOConfig

    try:
        return from_dict(PPOConfig, {**config, "prompts": "synthetic", "eval_prompts": "synthetic"})
    except ConfigError as exc:
        log.warning("the model card lists the run's settings as saved: its config no longer reads (%s)", exc)
        return None


# an export's model card has one of these lines: what tells an earlier export that --force may replace
CARD_TITLES = ("# Aligned policy exported by align", "# Reward model exported by align")
FORMS = {"adapter": "PEFT adapter on the base above", "merged": "merged weights (safetensors)",
         "full": "full weights of a fully fine-tuned model (safetensors), as trained: no adapter merged"}


def _sft_adapter_note(bases: list[Path]) -> str:
    """One line for an adapter trained on an SFT model that is itself a LoRA adapter (`bases`: its chain,
    `_policy_bases`): the adapter applies on the merged SFT model, not on the checkpoint underneath."""
    merged = " and ".join(f"`{adapter}`" for adapter in reversed(bases[:-1]))
    return (f"this adapter applies on the merged SFT model: `{bases[-1]}` with the LoRA adapter{'s' * (len(bases) > 2)} "
            f"{merged} merged in, not on `{bases[-1]}` alone; a serving engine that loads LoRA adapters onto a base "
            "checkpoint needs that merged SFT model as its base (merge the SFT adapter into it first), or takes "
            "the aligned model whole (`align export RUN --out DIR --merge`)")


def model_card(run: Path, kind: str, form: str) -> str:
    """The exported folder's README.md; `form`: what it holds (a key of FORMS)."""
    from ppo.run_dir import PPORun
    from reward.run_dir import RewardRun, is_reward_model

    if kind in POLICY_KINDS:
        ppo = PPORun(run)  # a DPO run has the same layout
        config, summary = ppo.config(), ppo.summary()
        base = ppo.adapter_config().get("base_model_name_or_path", config.get("policy_model", "?"))
        bases = _policy_bases(ppo.policy_dir)
        method = "dpo" if kind == "dpo" else config.get("method", "ppo")
    else:
        reward = RewardRun.open(run)
        config, summary, bases = reward.config(), reward.summary(), []
        base = reward.base_model() or "?"
    lines = [
        "---",
        "library_name: " + ("peft" if form == "adapter" else "transformers"),
        "tags: [align, rlhf, " + (f"{method}]" if kind in POLICY_KINDS else "reward-model]"),
        "---",
        "",
        CARD_TITLES[0] if kind in POLICY_KINDS else CARD_TITLES[1],
        "",
        f"- base checkpoint: `{base}`",
        f"- format: {FORMS[form]}",
        f"- source run: `{run.resolve()}`",
        "",
    ]
    if kind in POLICY_KINDS and form == "adapter" and len(bases) > 1:  # the SFT checkpoint is itself an adapter
        lines[-1:-1] = ["- " + _sft_adapter_note(bases)]
    if kind == "ppo":
        reward_path = Path(str(config.get("reward_model", "")))
        lines += ["## Reward model", ""]
        if is_reward_model(reward_path):
            lines += _reward_section(RewardRun.open(reward_path))
            if not reward_path.is_absolute():  # the run read it from the folder it started in, maybe not this one
                lines.append(f"- (the run's config names it `{reward_path}`, relative to the folder the run started "
                             "in; read here from the folder of this export)")
        else:
            lines.append(f"- `{reward_path}`" + ("" if reward_path.is_absolute() else
                                                 " (as the run's config names it: relative to the folder the run "
                                                 "started in)"))
        typed = _typed_ppo_config(config)
        kl = dict(config.get("kl", {}))
        if typed is not None and kl:
            kl["in_loss"] = typed.kl_in_loss  # null in the config means "by method"; the card says what ran
        value_keys = ("vf_coef", "gamma", "gae_lambda")  # the value model's: PPO only
        lines += ["", f"## {method.upper()} settings", ""]
        for key in ("method", "samples_per_prompt", "num_iterations", "batch_size", "response_length", "learning_rate",
                    "num_ppo_epochs", "num_mini_batches", "clip_coef", *value_keys, "seed"):
            if key in config and not (key in value_keys and typed is not None and not typed.has_value_model):
                lines.append(f"- {key}: {_fmt(config[key])}")
        if kl:
            lines.append("- KL penalty: " + ", ".join(f"{k}={_fmt(v)}" for k, v in kl.items()))
    if kind == "dpo":
        from align.run import read_mapping
        from dpo.run_dir import DATA_FILE

        data = read_mapping(run / DATA_FILE).get("data") or config.get("data", {})
        lines += ["## Rankings", "", *_data_lines(data)]
        for key, label in [("train/rankings", "training rankings"), ("eval/num_rankings", "held-out rankings"),
                           ("eval/label_source", "held-out labels from"),
                           ("eval/accuracy", "held-out pairwise accuracy of the implicit reward")]:
            if key in summary:
                lines.append(f"- {label}: {_fmt(summary[key])}")
        lines += ["", "## DPO settings", ""]
        # what ran: max_steps, when set, stops the run whatever epochs says
        length = "epochs" if config.get("max_steps") is None else "max_steps"
        for key in ("loss", "beta", "learning_rate", length, "batch_size", "seed"):
            if key in config:
                lines.append(f"- {key}: {_fmt(config[key])}")
        if "train/steps" in summary:
            lines.append(f"- optimizer steps taken: {_fmt(summary['train/steps'])}")
    if kind in POLICY_KINDS:
        lora = config.get("lora", {})
        if lora:
            lines.append("- LoRA: " + ", ".join(f"{k}={_fmt(v)}" for k, v in lora.items()))
        rows = [(name, a, b) for name, a, b in [("reward-model score", "eval/reward_sft", "eval/reward_policy"),
                                                ("gold judge score", "eval/gold_sft", "eval/gold_policy")]
                if a in summary or b in summary]
        lines += ["", "## Results on held-out prompts", ""]
        if rows or "eval/kl" in summary:
            lines += ["| metric | SFT | aligned |", "|---|---|---|"]
            lines += [f"| {name} | {_fmt(summary.get(a))} | {_fmt(summary.get(b))} |" for name, a, b in rows]
            if "eval/kl" in summary:
                lines.append(f"| KL to the reference (per sequence) | 0 | {_fmt(summary['eval/kl'])} |")
        else:
            lines.append("No held-out samples: the run's summary has none (it sampled no held-out prompts, or its "
                         "final evaluation did not finish).")
    else:
        lines += ["## Evaluation", ""] + _reward_section(reward)
    lines += ["", "Loading:", "", "```python"]
    if kind in POLICY_KINDS and form == "merged":
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(DIR)", "tokenizer = AutoTokenizer.from_pretrained(DIR)"]
    elif kind in POLICY_KINDS:
        # A base whose tokenizer had no pad token trained with a <pad> row added (align.modeling.fit_embeddings):
        # the tokenizer saved here has it, so the base grows the same way before the adapter goes on.
        # An SFT model that is itself a LoRA adapter is built as align trained on it: each adapter down its
        # chain merged in, innermost first. Loaded by name instead, transformers would attach the SFT
        # adapter unmerged and PEFT's put this one on the same layers in its place.
        checkpoint = bases[-1] if len(bases) > 1 else base
        lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "tokenizer = AutoTokenizer.from_pretrained(DIR)",
                  f"base = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r})"]
        if len(bases) > 1:
            lines.append("# the SFT model this adapter was trained on: its LoRA adapters merged in, innermost first")
        for adapter, rows in zip(reversed(bases[:-1]), _saved_vocab_rows(bases), strict=True):
            if rows is not None:  # PEFT loads an embedding saved whole only onto one of its size
                lines.append(f"base.resize_token_embeddings({rows})  # the tokens its SFT added, saved with the adapter")
            lines.append(f"base = PeftModel.from_pretrained(base, {str(adapter)!r}).merge_and_unload()")
        lines += ["if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:  # align added a <pad> token",
                  "    base.resize_token_embeddings(len(tokenizer))",
                  "model = PeftModel.from_pretrained(base, DIR)"]
    else:
        lines += ["from reward.model import load_reward_model", "rm = load_reward_model(DIR)  # normalised scores",
                  "rm.score(prompts, responses)"]
    lines += ["```", ""]
    return "\n".join(lines)
