"""Which layers of a model get LoRA adapters: every linear layer of every transformer block by default
(`all-linear`, whatever the family names them), checked to cover every block, written in the short
form serving engines load (`portable_lora_targets`), and held to what PEFT then adapted."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from align.errors import UserError
from align.modeling import find_blocks

log = logging.getLogger("align")

def _is_linear(module: Any) -> bool:
    """A linear layer LoRA can wrap: nn.Linear's own forward (a subclass with a forward of its own,
    as Phi-3.5-MoE's router returning the chosen experts, is not one), or GPT-2's transposed Conv1D."""
    from torch import nn

    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward) or \
        type(module).__name__ == "Conv1D"


def block_linear_layers(model: Any) -> list[list[str]]:
    """For each transformer block, the qualified names of its linear layers (what LoRA can adapt)."""
    prefix, blocks = find_blocks(model)
    return [[f"{prefix}.{i}.{name}" for name, module in block.named_modules() if name and _is_linear(module)]
            for i, block in enumerate(blocks)]


def routed_expert_parameters(model: Any) -> list[str]:
    """Parameters of fused routed experts (one 3-D tensor for all experts, as transformers 5 stores
    Mixtral's and Qwen-MoE's): not linear layers, so `all-linear` gives them no adapter."""
    prefix, blocks = find_blocks(model)
    return [f"{prefix}.{name}" for name, p in blocks.named_parameters() if p.ndim == 3]


def leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def matches(name: str, target: str) -> bool:
    """PEFT's rule for a list entry: the module's name is `target` or ends with `.target`."""
    return name == target or name.endswith("." + target)


def resolve_lora_targets(model: Any, target_modules: list[str], *, layers: list[int] | None = None) -> list[str]:
    """The qualified names of the linear layers that get LoRA adapters, checked to cover every block.

    `all-linear` is every linear layer inside the transformer blocks (PEFT's own `all-linear` also
    excludes only the output layer; here the heads - lm_head, score, classifier, pooler - are
    never included, the reward head being trained in full). A list of names (PEFT's suffix rule)
    must have every entry match a linear layer, and together they must reach every block: a name
    matching nothing, or some blocks only, is an error naming the model's linear layers (with a
    Llama list on OPT only q/k/v_proj match, on Phi-3 only o_proj/down_proj, and on GPT-2 nothing).
    `layers`: only these block indices (train_layers); the others get no adapter.
    Fused routed experts of an MoE model are not linear layers: a warning says they get none.
    """
    per_block = block_linear_layers(model)
    chosen = range(len(per_block)) if layers is None else layers
    in_blocks = [name for i in chosen for name in per_block[i]]
    available = sorted({leaf(n) for block in per_block for n in block})
    hint = f"this {type(model).__name__}'s linear layers are {', '.join(available)} (or use [all-linear])"
    if list(target_modules) == ["all-linear"]:
        targets = in_blocks
    else:
        if "all-linear" in target_modules:
            raise UserError("lora.target_modules: all-linear must be the only entry")
        every_linear = [n for block in per_block for n in block]  # a head (lm_head, score) is never adapted
        unmatched = [t for t in target_modules if not any(matches(n, t) for n in every_linear)]
        if unmatched:
            raise UserError(f"lora.target_modules: {unmatched} match no linear layer of the transformer blocks; {hint}")
        targets = [n for n in in_blocks if any(matches(n, t) for t in target_modules)]
        adapted = set(targets)
        missing = [i for i in chosen if not adapted & set(per_block[i])]
        if missing:
            raise UserError(f"lora.target_modules: {list(target_modules)} leave blocks {missing} without an adapter; {hint}")
    experts = routed_expert_parameters(model)
    if experts:
        log.warning("LoRA: the %d fused routed-expert weights of this MoE model (%s, ...) get no adapter "
                    "(they are not linear layers); attention, shared experts and dense layers do",
                    len(experts), experts[0])
    return targets


def portable_lora_targets(model: Any, targets: list[str]) -> dict[str, Any]:
    """LoraConfig arguments that adapt exactly `targets` (qualified names from `resolve_lora_targets`)
    in the form other engines read: short module names (`q_proj`, ...) and, when only some blocks
    are adapted, `layers_to_transform` with `layers_pattern`. Serving engines that load LoRA
    adapters by module name (vLLM, TGI, llama.cpp's converter) reject fully qualified paths.
    The short form is used only where PEFT's suffix rule then selects the same layers and nothing
    else (a vision tower's `q_proj` would break that); otherwise the qualified names stay."""
    prefix, blocks = find_blocks(model)
    start = prefix + "."

    def block_index(name: str) -> int | None:  # the block a module sits in; None outside the blocks
        number = name[len(start):].split(".", 1)[0] if name.startswith(start) else ""
        return int(number) if number.isdigit() else None

    short = sorted({leaf(t) for t in targets})
    layers = sorted({block_index(t) for t in targets})
    # what PEFT's suffix rule selects with the short names, in those blocks (and anywhere outside them)
    selected = {name for name, module in model.named_modules() if name and _is_linear(module)
                and any(matches(name, s) for s in short) and block_index(name) in (*layers, None)}
    if selected != set(targets):
        return {"target_modules": list(targets)}
    if len(layers) == len(blocks):
        return {"target_modules": short}
    return {"target_modules": short, "layers_to_transform": layers, "layers_pattern": leaf(prefix)}


def with_adapter(model: Any, config: Any, targets: list[str]) -> Any:
    """`model` with a fresh PEFT LoRA adapter of `config` on `targets`, checked (`check_adapted`). A
    target PEFT refuses for the family (a Mamba mixer's projections) is one line, not its traceback."""
    from peft import get_peft_model

    # B A has rank at most min(in, out) of its layer: an r past that of every adapted layer only takes memory
    # (lora.r=100000 took 24 GB); one past some layers' (GQA's narrow k/v projections) still serves the others
    width, widest = max((min(model.get_submodule(t).weight.shape), t) for t in targets)
    if config.r > width:
        raise UserError(f"lora.r={config.r} is more than any adapted layer can use: a LoRA update's rank is at most "
                        f"its layer's smaller dimension, {width} at the most here ({widest}); choose lora.r <= {width}")
    try:
        adapted = get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"LoRA: PEFT refused the targets chosen for this {model.config.model_type} model ({exc}); "
                        "name others (lora.target_modules)") from None
    check_adapted(adapted, targets)
    return adapted


def check_adapted(peft_model: Any, targets: list[str]) -> None:
    """One line when PEFT did not put an adapter on every layer align chose: peft converts the MLP
    targets of some MoE families (DeepSeek-V2/V3, GLM-4-MoE, ...) into parameters of the routed
    experts, which would leave the dense and shared-expert MLPs unadapted without a word."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    missed = [t for t in targets if not isinstance(base.get_submodule(t), LoraLayer)]
    if missed:
        raise UserError(f"LoRA: PEFT put no adapter on {len(missed)} of the {len(targets)} layers chosen for this "
                        f"{base.config.model_type} model ({', '.join(missed[:3])}{', ...' if len(missed) > 3 else ''}); "
                        "it maps this family's MLP layers to its experts. Name the targets that it adapts "
                        "(lora.target_modules), e.g. the attention projections")


def lora_summary(targets: list[str]) -> str:
    """'LoRA on q_proj, k_proj, ... (14 linear layers)': what the run log says was adapted."""
    names = list(dict.fromkeys(leaf(t) for t in targets))
    return f"{', '.join(names)} ({len(targets)} linear layers)"


def save_policy_adapter(policy: Any, tokenizer: Any, base_path: str | Path, out: Path,
                        state: dict[str, Any] | None = None) -> None:
    """`out` (RUN/policy): a policy's LoRA adapter as peft writes it, naming `base_path` (the SFT
    checkpoint) as its base, so `align export` and serving engines find it, and the tokenizer;
    written whole or not at all. `state`: the adapter's weights gathered in full from the ranks'
    shards (FSDP2), keyed as `policy`'s own state dict; None: `policy` holds them.
    Beside it, RUN/trained_on.json records the model chain under the adapter (`policy_model`:
    align.provenance.write_models_record), so that an export onto a base rebuilt in place since is
    refused. It is written first: an adapter is never there with an earlier run's record beside it;
    and not in RUN/policy, whose files an adapter export ships."""
    from align.provenance import MODELS_RECORD_FILE, write_models_record
    from align.run import atomic_directory

    write_models_record(out.parent / MODELS_RECORD_FILE, {"policy_model": Path(base_path)})
    policy.peft_config["default"].base_model_name_or_path = str(base_path)
    with atomic_directory(out, overwrite=True) as tmp:
        policy.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
