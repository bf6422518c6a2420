"""The model card an export writes (DIR/README.md): what the folder holds and how to load it, the
base checkpoint, the data, the stage's settings and the held-out results, from the run's own files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reward.run_dir import RewardRun

log = logging.getLogger("align")

POLICY_KINDS = ("ppo", "dpo")  # runs whose RUN/policy is a LoRA adapter on the SFT checkpoint


def policy_bases(policy: Path) -> list[Path]:
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
    """For each LoRA adapter of an SFT chain (`policy_bases`), innermost first: the rows of the token
    embeddings or output layer it saved whole (an SFT that added chat tokens: align.modeling.adapter_vocab_size),
    which its base must grow to before it loads; None where it saved none, or where the checkpoint is not
    here to name those layers. The layers' names come from the architecture built on the meta device: no
    weights are loaded."""
    from transformers import AutoConfig

    from align.modeling import adapter_vocab_size, meta_model

    adapters = list(reversed(bases[:-1]))
    if not adapters:
        return []
    try:
        model = meta_model(AutoConfig.from_pretrained(bases[-1], local_files_only=True), causal_lm=True)
    except (OSError, ValueError):  # the checkpoint is not here (an adapter export does not need it)
        return [None] * len(adapters)
    return [adapter_vocab_size(model, adapter) for adapter in adapters]


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
    from reward.run_dir import IMPORTED_FROM

    summary, data = reward.summary(), reward.info().get("data") or reward.config().get("data", {})
    lines = [f"- reward model: `{reward.path.resolve()}`", *_data_lines(data)]
    labels = [("train/rankings", "training rankings"), ("eval/num_rankings", "held-out rankings"),
              ("eval/label_source", "held-out labels from"), ("eval/num_pairs", "held-out pairs"),
              ("eval/accuracy", "held-out pairwise accuracy"),
              ("eval_annotators/accuracy", "held-out accuracy against the annotators")]
    imported = reward.info().get(IMPORTED_FROM)
    if imported:  # trained elsewhere, on data align does not know: its rankings are not known to be held out
        policy = reward.config().get("eval", {}).get("normalize_policy", "?")
        lines.insert(1, f"- trained elsewhere (`{imported}`), imported by align: rewards normalised on samples "
                        f"of `{policy}`; read as it was trained, `rendering: {reward.info().get('rendering')}` "
                        "(`align reward import --help`)")
        labels = [("eval/num_rankings", "rankings scored at import"), ("eval/num_pairs", "pairs scored at import"),
                  ("eval/accuracy", "pairwise accuracy on them (the model may have been trained on them elsewhere)")]
    for key, label in labels:
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
         "full": "full weights of a fully fine-tuned model (safetensors), as trained: no adapter merged",
         "imported": "a reward model trained elsewhere, imported by `align reward import`: its checkpoint as it came "
                     "in safetensors, a <pad> token added where its tokenizer had no pad token"}


def sft_adapter_note(bases: list[Path]) -> str:
    """One line for an adapter trained on an SFT model that is itself a LoRA adapter (`bases`: its chain,
    `policy_bases`): the adapter applies on the merged SFT model, not on the checkpoint underneath."""
    merged = " and ".join(f"`{adapter}`" for adapter in reversed(bases[:-1]))
    return (f"this adapter applies on the merged SFT model: `{bases[-1]}` with the LoRA adapter{'s' * (len(bases) > 2)} "
            f"{merged} merged in, not on `{bases[-1]}` alone; a serving engine that loads LoRA adapters onto a base "
            "checkpoint needs that merged SFT model as its base (merge the SFT adapter into it first), or takes "
            "the aligned model whole (`align export RUN --out DIR --merge`)")


def model_card(run: Path, kind: str, form: str, folder: Path | None = None) -> str:
    """The exported folder's README.md; `form`: what it holds (a key of FORMS); `folder`: where the export
    was written (a reward model's card shows how plain transformers scores with it, `reward_recipe`)."""
    from ppo.run_dir import PolicyRun
    from reward.run_dir import RewardRun, is_reward_model

    if kind in POLICY_KINDS:
        policy_run = PolicyRun(run)
        config, summary = policy_run.config(), policy_run.summary()
        base = policy_run.adapter_config().get("base_model_name_or_path", config.get("policy_model", "?"))
        bases = policy_bases(policy_run.policy_dir)
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
        lines[-1:-1] = ["- " + sft_adapter_note(bases)]
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
        # the rankings trained on and scored; those max_length left out apart (never trained on nor scored)
        too_long = "a response does not follow its whole prompt within max_length"
        for key, label in [("train/rankings", "training rankings"),
                           ("train/rankings_left_out", f"training rankings left out ({too_long})"),
                           ("eval/num_rankings", "held-out rankings"),
                           ("eval/rankings_left_out", f"held-out rankings left out ({too_long})"),
                           ("eval/label_source", "held-out labels from"),
                           ("eval/accuracy", "held-out pairwise accuracy of the implicit reward")]:
            if key in summary and not (key.endswith("_left_out") and not summary[key]):
                lines.append(f"- {label}: {_fmt(summary[key])}")
        if summary.get("eval/num_rankings") == 0:
            lines.append("- held-out pairwise accuracy of the implicit reward: none, no held-out ranking fits max_length")
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
            if "temperature" in config:
                lines += ["", f"Held-out responses sampled at temperature {_fmt(config['temperature'])}"
                          + (", no top-k or top-p, as generation_config.json samples." if kind == "dpo" and form == "merged"
                             else ".")]
        else:
            lines.append("No held-out samples: the run's summary has none (it sampled no held-out prompts, or its "
                         "final evaluation did not finish).")
        if kind == "ppo" and "temperature" in config:
            # the objective was the reward of samples at this temperature: another one samples another policy
            lines += ["", f"Trained on its samples at temperature {_fmt(config['temperature'])}: sample at it too"
                      + (", no top-k or top-p (generation_config.json sets them)." if form == "merged"
                         else ", no top-k or top-p.")]
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
    elif form != "adapter" and folder is not None:  # an ordinary checkpoint: transformers alone reads it
        from align.commands.reward_recipe import reward_recipe
        from reward.run_dir import ALIGN, recorded_max_length

        info = RewardRun.open(run).info()
        lines += [*reward_recipe(folder, info.get("rendering", ALIGN), recorded_max_length(info)), "",
                  "# with align installed, the same scores in batches: reward.model.load_reward_model(DIR).score("
                  "prompts, responses)"]
    else:
        lines += ["from reward.model import load_reward_model", "rm = load_reward_model(DIR)  # normalised scores",
                  "rm.score(prompts, responses)"]
    lines += ["```", ""]
    return "\n".join(lines)
