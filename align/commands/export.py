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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from align.commands.model_card import CARD_TITLES, FORMS, POLICY_KINDS, model_card, policy_bases, sft_adapter_note
from align.errors import UserError
from align.modeling import check_model_files
from align.run import atomic_directory, make_directory, remove_path

log = logging.getLogger("align")


def run_kind(run: Path) -> str:
    """'ppo' for a run of `align ppo` (RUN/policy is an adapter), 'dpo' for one of `align dpo` (the
    same layout), 'reward' for a reward-model run."""
    from dpo.run_dir import is_dpo_run
    from ppo.run_dir import POLICY_DIR, is_policy_run
    from reward.run_dir import MODEL_DIR, NORMALIZATION_FILE, is_reward_model

    if is_policy_run(run):
        return "dpo" if is_dpo_run(run) else "ppo"
    if is_reward_model(run):
        return "reward"
    if not run.exists():
        raise UserError(f"run directory not found: {run}")
    try:
        children = sorted(run.iterdir()) if run.is_dir() else []
    except OSError:  # a folder this user may not list: said as any other folder that is no run
        children = []
    runs = [child for child in children if child.is_dir() and (is_policy_run(child) or is_reward_model(child))]
    if runs:  # a folder of runs, as `align demo` leaves one (with its policy exported already, in export/)
        exported = f"; its policy is exported already, in {run / 'export'}" if (run / "export" / "README.md").is_file() else ""
        raise UserError(f"{run} is not a run but holds {len(runs)}: export one of {', '.join(map(str, runs))}{exported}")
    unfinished = _unfinished_stage(run)
    if unfinished:
        raise UserError(f"{run} is an unfinished {unfinished} run (checkpoints, no final model yet): finish it with "
                        f"`{unfinished} --resume {run}`, then export it")
    raise UserError(f"{run} is neither a PPO or DPO run (no {POLICY_DIR}/adapter_config.json) nor a reward run "
                    f"(no {MODEL_DIR}/{NORMALIZATION_FILE}); is the run finished?")


def _unfinished_stage(run: Path) -> str | None:
    """The command that wrote `run`, where it holds a config and checkpoints but no final model: PPO's
    checkpoints are iterations, the reward stage's config has a `train` section, DPO's is flat."""
    from align.checkpoint import latest_checkpoint
    from align.config import ConfigError, read_yaml_mapping
    from align.run import CONFIG_FILE
    from align.training import CHECKPOINT_PREFIX as STEP_PREFIX
    from ppo.checkpoint import CHECKPOINT_PREFIX as PPO_PREFIX

    if not (run / CONFIG_FILE).is_file():
        return None
    if latest_checkpoint(run, PPO_PREFIX):
        return "align ppo"
    if latest_checkpoint(run, STEP_PREFIX) is None:
        return None
    try:
        return "align reward train" if "train" in read_yaml_mapping(run / CONFIG_FILE) else "align dpo"
    except ConfigError:
        return None


def export_run(run: str | Path, out: str | Path, *, merge: bool = True, force: bool = False,
               echo: Callable[[str], None] | None = None) -> Path:
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
                else "merged" if (source / "adapter_config.json").exists()
                else "imported" if kind not in POLICY_KINDS and _imported(source) else "full")
        (tmp / "README.md").write_text(model_card(run, kind, form, tmp), encoding="utf-8")
    what = "PEFT adapter on its base checkpoint" if form == "adapter" else FORMS[form]  # (the card names the base above)
    (echo or log.info)(f"exported the {'policy' if kind in POLICY_KINDS else 'reward model'} of {run} to {out}: {what}")
    return out


def _source_dir(run: Path, kind: str) -> Path:
    """The directory an export reads: the policy's adapter, or the reward model."""
    from ppo.run_dir import PolicyRun
    from reward.run_dir import model_dir

    return PolicyRun(run).policy_dir if kind in POLICY_KINDS else model_dir(run)


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
        from ppo.run_dir import PolicyRun
        from reward.run_dir import is_reward_model

        reward = PolicyRun(run).config().get("reward_model")
        if reward and is_reward_model(str(reward)):
            found.append(Path(str(reward)))
    return found


def _replaceable(out: Path) -> bool:
    """What --force may replace: an earlier export (a checkpoint whose model card says align exported it)
    or an empty folder; never another folder, or a file that happens to be in the way."""
    from align.run import replaceable_folder

    return replaceable_folder(out, _earlier_export)


def _earlier_export(out: Path) -> bool:
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
    try:
        make_directory(out.parent)
    except UserError as exc:
        raise UserError(f"--out {out}: {exc}") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: the folder {out.parent} is not writable")


def _remove_stale_temporaries(out: Path) -> None:
    """Hidden temporaries that a killed export left beside `out` (never the real output): a new copy
    being written, or an earlier one being removed (align.run.atomic_directory)."""
    for stale in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        remove_path(stale)


def _copy_files(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        if item.is_file():
            shutil.copy2(item, dst / item.name)


def _export_policy(run: Path, out: Path, merge: bool) -> None:
    from align.modeling import load_causal_lm, load_tokenizer
    from ppo.run_dir import PolicyRun

    policy_run = PolicyRun(run)
    policy = policy_run.policy_dir
    if not merge:
        _copy_files(policy, out)
        bases = policy_bases(policy)
        if len(bases) > 1:
            log.warning("%s", sft_adapter_note(bases))
        return
    tokenizer = load_tokenizer(policy)
    model = load_causal_lm(policy, tokenizer=tokenizer)  # base + adapter, merged in fp32
    _in_base_dtype(model, policy).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _sample_as_trained(out, model, float(policy_run.config().get("temperature", 1.0)))


def _sample_as_trained(out: Path, model: Any, temperature: float) -> None:
    """PPO, RLOO and GRPO optimise the policy's samples at the run's temperature (their log-probs are
    the logits over it, no top-k or top-p: ppo.sampling), and a DPO run's held-out figures are of
    samples drawn so at its `temperature`: the exported generation_config.json samples so too
    (`generate()`, and inference servers that take their defaults from it), not with the base's
    filters (a base's top_p 0.9, transformers' own top_k 50 where the file names none, a repetition
    penalty) that would sample another policy. Its other settings (end-of-sequence ids, lengths) stay."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(out)
    except OSError:  # the base had none
        config = GenerationConfig.from_model_config(model.config)
    config.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, min_p=None, typical_p=1.0,
                  repetition_penalty=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, no_repeat_ngram_size=0)
    config.save_pretrained(out)


def _in_base_dtype(model: Any, adapter: Path) -> Any:
    """The merged model cast to the dtype its base checkpoint stores (a bf16 base exports as bf16,
    not at twice its size in fp32). The merge itself ran in fp32, so W + BA is rounded only once."""
    from align.modeling import checkpoint_dtype

    dtype = checkpoint_dtype(adapter)
    return model.to(dtype) if dtype is not None else model


def _imported(reward_model: Path) -> bool:
    """A reward model `align reward import` wrote (trained elsewhere), not one align trained."""
    from reward.run_dir import IMPORTED_FROM, RewardRun

    return IMPORTED_FROM in RewardRun(reward_model).info()


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
