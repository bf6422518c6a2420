"""`align memory-plan`: print what a stage holds in memory, per device, for a model's shape.

One model, stage and setting: the breakdown term by term. Several (models, `--stage` repeated,
`--checkpointing both`): one line each. The figures are computed by align.memory_plan, not measured.
"""

from __future__ import annotations

from typing import Annotated

import typer

from align.errors import UserError

STAGE_HELP = ("reward (reward model training), ppo (value head on the policy trunk), ppo-critic "
              "(value_model=reward_model: a full fp32 critic), rloo, grpo (no value model), dpo. Repeat for several.")


UNITS = {"GiB": 2**30, "MiB": 2**20}


def size(n: int, unit: str) -> str:
    return f"{n / UNITS[unit]:8.2f}"


def breakdown(plan, card_gib: float, unit: str = "GiB") -> str:
    """The plan of one setting, a term a line, then the total per device and whether it fits."""
    s = plan.settings
    per = f" per rank of {s.fsdp_ranks} (FSDP2)" if s.fsdp_ranks > 1 else ""
    lines = [f"{plan.shape.name}: {plan.parameters / 1e9:.3f}B parameters, {plan.trainable / 1e6:.2f}M trained; "
             f"stage {s.stage}, {s.dtype}, gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}{per}",
             f"{'term':52s} {'phase':14s} {unit:>8s}"]
    lines += [f"{t.name:52s} {t.phase:14s} {size(t.bytes, unit)}" for t in plan.terms]
    verdict = "fits" if plan.total <= card_gib * 2**30 else "does NOT fit"
    lines.append(f"{'total: held + the ' + str(plan.peak_phase) + ' phase':52s} {'':14s} {size(plan.total, unit)}"
                 f"   ({verdict} a {card_gib:g} GiB device)")
    return "\n".join(lines)


def summary_header() -> str:
    return (f"{'model':15s} {'stage':10s} {'ckpt':4s} {'weights':>8s} {'trained':>8s} {'reward':>8s} {'critic':>8s} "
            f"{'KV':>8s} {'activ.':>8s} {'logits':>8s} {'total':>8s}  fits")


def summary_row(plan, card_gib: float, unit: str = "GiB") -> str:
    """One line: the main terms in GiB (critic: its fp32 state plus its autocast copies and activations)."""
    critic = sum(t.bytes for t in plan.terms if t.name.startswith("critic"))
    fits = "yes" if plan.total <= card_gib * 2**30 else "no"
    return (f"{plan.shape.name[:15]:15s} {plan.settings.stage:10s} {'on' if plan.settings.gradient_checkpointing else 'off':4s} "
            f"{size(plan.term('base weights (frozen)'), unit)} {size(sum(t.bytes for t in plan.terms if 'AdamW' in t.name and not t.name.startswith('critic')), unit)} "
            f"{size(plan.term('reward model'), unit)} {size(critic, unit)} {size(plan.term('KV cache (kept between rollouts)'), unit)} "
            f"{size(plan.term('activations'), unit)} {size(plan.term('log-prob logits'), unit)} {size(plan.total, unit)}  {fits}")


def memory_plan_command(
    models: Annotated[list[str], typer.Argument(help="Presets (Qwen2.5-0.5B, Qwen2.5-1.5B, Qwen2.5-7B, Llama-3.1-8B, "
                                                "Llama-3.1-70B), config.json files or checkpoint directories.")],
    stage: Annotated[list[str] | None, typer.Option(help=STAGE_HELP)] = None,
    dtype: Annotated[str, typer.Option(help="Storage dtype of the frozen weights: bfloat16 or float32.")] = "bfloat16",
    reward_dtype: Annotated[str | None, typer.Option(help="PPO's reward model (and critic compute) dtype; default --dtype.")] = None,
    reward_model: Annotated[str | None, typer.Option(help="The reward model's shape for PPO (preset or config); "
                                                     "default the policy's.")] = None,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank r.")] = 16,
    lora_targets: Annotated[str, typer.Option(help="all-linear or comma-separated names (q_proj,v_proj,...).")] = "all-linear",
    reward_full_finetune: Annotated[bool, typer.Option(help="Reward stage: full fine-tuning (the config's default) "
                                                       "instead of LoRA.")] = False,
    prompt_length: Annotated[int, typer.Option(help="Prompt tokens.")] = 512,
    response_length: Annotated[int, typer.Option(help="Response tokens.")] = 512,
    micro_batch: Annotated[int, typer.Option(help="PPO/RLOO/GRPO: sequences per training forward; DPO, reward: "
                                             "rankings per training forward (batch_size / "
                                             "gradient_accumulation_steps on one device).")] = 4,
    forward_batch: Annotated[int | None, typer.Option(help="PPO: rows per no-grad forward (its minibatch); "
                                                      "default --micro-batch.")] = None,
    rollout_batch: Annotated[int, typer.Option(help="PPO/RLOO/GRPO: responses sampled per rollout per device (batch_size / processes).")] = 64,
    responses_per_prompt: Annotated[int, typer.Option(help="Reward, DPO: responses per ranking (K).")] = 4,
    checkpointing: Annotated[str, typer.Option(help="Gradient checkpointing: off, on or both.")] = "off",
    fsdp_ranks: Annotated[int, typer.Option(help="FSDP2 ranks sharing the weights and optimiser state (1: one device).")] = 1,
    prefetch_blocks: Annotated[int, typer.Option(help="FSDP2: blocks gathered ahead of the one computing.")] = 1,
    sample_gathered: Annotated[bool, typer.Option(help="FSDP2: sample with the whole policy gathered on each rank, "
                                                  "as `align ppo` does by default (sample_gathered).")] = True,
    logprob_chunk_tokens: Annotated[int, typer.Option(help="Positions per fp32 logits chunk (0: all at once).")] = 4096,
    card_gib: Annotated[float, typer.Option(help="Device memory to compare the total with, GiB.")] = 80.0,
    unit: Annotated[str, typer.Option(help="Unit of the tables: GiB or MiB.")] = "GiB",
) -> None:
    """Print the memory plan (bytes per device, computed from the code's dtype choices, not measured)."""
    from align.memory_plan import PlanSettings, load_shape, plan
    from ppo.sampling import cache_slots  # the rollout cache's length, as the sampler rounds it

    if checkpointing not in ("off", "on", "both"):
        raise UserError(f"--checkpointing must be off, on or both, got {checkpointing!r}")
    if unit not in UNITS:
        raise UserError(f"--unit must be GiB or MiB, got {unit!r}")
    if not 0 < card_gib < float("inf"):  # (nan compares false)
        raise UserError(f"--card-gib must be a positive number, got {card_gib}")
    shapes = [load_shape(m) for m in models]
    rshape = load_shape(reward_model) if reward_model else None
    plans = []
    for shape in shapes:
        for st in stage or ["ppo"]:
            for ckpt in {"off": [False], "on": [True], "both": [False, True]}[checkpointing]:
                settings = PlanSettings(
                    stage=st, dtype=dtype, reward_dtype=reward_dtype, lora_rank=lora_rank,
                    lora_targets=tuple(t.strip() for t in lora_targets.split(",") if t.strip()),
                    reward_lora=not reward_full_finetune, prompt_length=prompt_length, response_length=response_length,
                    micro_batch=micro_batch, forward_batch=forward_batch, rollout_batch=rollout_batch,
                    responses_per_prompt=responses_per_prompt, gradient_checkpointing=ckpt, fsdp_ranks=fsdp_ranks,
                    prefetch_blocks=prefetch_blocks, logprob_chunk_tokens=logprob_chunk_tokens,
                    sample_gathered=sample_gathered,
                    kv_cache_slots=cache_slots(prompt_length, response_length) if min(prompt_length, response_length) >= 1 else None)
                plans.append(plan(shape, settings, rshape))
    if len(plans) == 1:
        typer.echo(breakdown(plans[0], card_gib, unit))
        return
    typer.echo(f"{unit} per device{f' (per rank of {fsdp_ranks}, FSDP2)' if fsdp_ranks > 1 else ''}; {dtype}, LoRA "
               f"r={lora_rank} {lora_targets}; prompt {prompt_length} + response {response_length} tokens, micro-batch "
               f"{micro_batch}, rollout batch {rollout_batch}; fits: total <= {card_gib:g} GiB")
    typer.echo(summary_header())
    for p in plans:
        typer.echo(summary_row(p, card_gib, unit))
