"""Sharded data parallelism (FSDP2, torch's `fully_shard`) for the training stages.

`accelerate launch --config_file configs/accelerate/fsdp2_*.yaml` names FSDP version 2 and its
settings (reshard after forward, which layer classes make a unit, CPU offload, mixed precision);
the stages read them from accelerate's `FullyShardedDataParallelPlugin` and apply `fully_shard`
here themselves rather than through `Accelerator.prepare`, for two reasons:

* accelerate selects FSDP only on accelerators: launched on CPU ranks (gloo, which has the
  reduce-scatter FSDP2 needs) it sets up plain multi-CPU data parallelism, so the same stage
  would shard on GPUs and replicate on the CPU ranks its tests run on;
* the units are the decoder layers of every transformer inside the stage's module (the policy's
  and a separate critic's), found from each one's `_no_split_modules`; accelerate looks only at
  the outer module, which for PPO is align's own `ActorCritic`.

Each rank then holds 1/N of every parameter, frozen base weights in their own dtype (bf16 on
GPUs) and the trained ones (LoRA, value head) with their AdamW state in fp32; a unit's full
weights exist only while it runs. Checkpoints are sharded (torch's distributed checkpoint, each
rank writes its part); the adapter a run exports is gathered to the main rank in full.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from align.errors import UserError

log = logging.getLogger("align")


def make_accelerator(stage: str) -> Any:
    """The `Accelerator` of `stage` (its command: 'align ppo'). Without a GPU, accelerate sets up gloo
    data parallelism for several launched processes only when told it runs on the CPU; on a GPU machine
    it picks NCCL (or DeepSpeed from its config: experimental, PPO's alone, see `check_engine`).

    The stage's own `dtype` decides precision. accelerate's `mixed_precision` would run the
    prepared module's forward under autocast but not the sampler's or the reference's, so PPO's
    first ratio would not be 1 and DPO's implicit rewards would not start at 0; it is refused
    (DeepSpeed, which takes its precision from its own config, aside)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    # A stage may forward the prepared module several times before its backward (the reward stage: the
    # prompts, then each length slice of the responses), and ranks whose parts differ in size may cut
    # them into different numbers of slices. DDP broadcasts the module's buffers in every forward, a
    # collective, so unequal counts left the ranks waiting on each other for ever; no align model has a
    # buffer that training changes (no batch norm), so there is nothing to broadcast.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    if accelerator.mixed_precision != "no" and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise UserError(f"the accelerate config sets mixed_precision: {accelerator.mixed_precision}; align's stages "
                        "set their precision with their own dtype key (dtype: bfloat16): set mixed_precision: 'no' "
                        "(or launch with --mixed_precision no)")
    check_engine(accelerator.distributed_type, stage)
    return accelerator


def check_engine(distributed_type: Any, stage: str) -> None:
    """DeepSpeed ZeRO is experimental and only PPO's (README: PPO's settings under it are checked as it
    starts); the other stages' optimiser step reads the gradient norm, which DeepSpeed's clipping
    does not return, and their checkpoints are not DeepSpeed's: one line, before any model loads."""
    from accelerate.utils import DistributedType

    if distributed_type == DistributedType.DEEPSPEED and stage != "align ppo":
        raise UserError(f"the accelerate config uses DeepSpeed, which {stage} does not run under (it is experimental "
                        "and align ppo's alone): launch it with a DDP or FSDP2 config (configs/accelerate/)")


def set_cpu_threads(requested: int | None) -> int:
    """Set torch's CPU threads for this process to a stage's `num_threads` (None: torch's choice, which a
    launch of several processes sets to 1) and return the count. Where the processes a launch started on
    this machine (LOCAL_WORLD_SIZE) would together ask for more threads than it has cores, each gets its
    share of the cores, said once: two ranks of 2 threads on 2 cores trained the demo's reward model
    11 to 16 times slower than ranks of 1, their threads waiting on each other at every collective."""
    if requested is None:
        return torch.get_num_threads()
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    processes = int(local) if local.isdigit() and int(local) > 0 else 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = requested if requested * processes <= cores else max(1, cores // processes)
    if threads != requested and os.environ.get("LOCAL_RANK", "0") == "0":
        log.info("num_threads=%d for each of %d processes is more than this machine's %d cores: %d each",
                 requested, processes, cores, threads)
    torch.set_num_threads(threads)
    return threads


_KEPT_UNTIL_EXIT: list[Any] = []


def keep_until_exit(*objects: Any) -> None:
    """Hold a multi-process run's wrapped model (DDP or FSDP2) for the rest of the process.

    Freed when the stage that made it returns, a DDP module's reducer destroys its gloo process
    group while holding the GIL, and a gloo thread that waits for the GIL deadlocks it
    (pytorch/pytorch#56297, #75097): the run has finished and written everything, but the rank
    never exits. `align.commands.cli.exit_process` leaves a multi-process run without the
    interpreter's finalization, so what is kept here is never destroyed. One process: nothing kept."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        _KEPT_UNTIL_EXIT.extend(objects)


def fsdp_plugin() -> Any | None:
    """accelerate's FSDP plugin when `accelerate launch` was given an FSDP config, else None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise UserError(f"the accelerate config asks for FSDP version {plugin.fsdp_version}; align shards with "
                        "FSDP2: set `fsdp_version: 2` under fsdp_config (configs/accelerate/fsdp2_*.yaml)")
    if plugin.activation_checkpointing:
        raise UserError("fsdp_activation_checkpointing: use the stage's own `gradient_checkpointing` key instead "
                        "(align checkpoints the decoder layers itself)")
    return plugin


def global_batches(n: int, batch_size: int, *, epochs: int, max_steps: int | None, seed: int, world: int,
                   what: str = "examples") -> list[list[int]]:
    """Global batches of the indices 0..n-1: a seeded shuffle per epoch, then `batch_size` at a time;
    `max_steps` (when set) takes as many epochs as it needs and cuts there. A batch smaller than the
    number of processes `world` is dropped (every rank needs at least one element)."""
    import itertools
    import random

    batches: list[list[int]] = []
    for epoch in itertools.count():
        if epoch == epochs if max_steps is None else len(batches) >= max_steps:
            break
        order = list(range(n))
        random.Random(f"shuffle:{seed}:{epoch}").shuffle(order)
        found = [order[s: s + batch_size] for s in range(0, n, batch_size) if len(order[s: s + batch_size]) >= world]
        if not found:
            break
        batches += found
    batches = batches[:max_steps] if max_steps is not None else batches
    if not batches:
        raise UserError(f"no training steps: {n} training {what} are too few for batch_size {batch_size} on "
                        f"{processes_text(world)}")
    return batches


def processes_text(count: int) -> str:
    """"1 process", "2 processes": how many processes a run has, in messages."""
    return f"{count} process{'' if count == 1 else 'es'}"


def rank_slice(items: list, rank: int, world: int) -> list:
    """Rank `rank`'s contiguous part of `items` split over `world` ranks (sizes differ by at most one):
    how a global batch is split, so that gradients averaged over the ranks are the global batch's."""
    per, extra = divmod(len(items), world)
    start = rank * per + min(rank, extra)
    return items[start : start + per + (1 if rank < extra else 0)]


def rank_micro_batches(items: list, rank: int, world: int, steps: int) -> list[list]:
    """Rank `rank`'s part of a global batch (`rank_slice`) in `steps` micro-batches of sizes that
    differ by at most one (gradient accumulation). Every rank gets as many, since under FSDP2 each
    forward gathers weights from all of them: fewer where the smallest part has fewer items than
    `steps` (an epoch's last, short batch), never an empty one."""
    part = rank_slice(items, rank, world)
    count = min(steps, len(items) // world)
    return [rank_slice(part, i, count) for i in range(count)]


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def layer_classes(model: nn.Module, names: Iterable[str] | None = None) -> tuple[type, ...]:
    """The classes whose instances become FSDP units: `names` (the config's
    `fsdp_transformer_layer_cls_to_wrap`) or every submodule's `_no_split_modules` (the decoder layer
    of each transformers model inside `model`)."""
    wanted = set(names or ())
    if not wanted:
        for module in model.modules():
            wanted.update(getattr(module, "_no_split_modules", None) or ())
    found = {type(m) for m in model.modules() if type(m).__name__ in wanted}
    if not found:
        raise UserError(f"FSDP: no layer of classes {sorted(wanted) or '(none named)'} in the model; set "
                        "fsdp_transformer_layer_cls_to_wrap in the accelerate config to its decoder layer class")
    return tuple(found)


def shard(model: nn.Module, plugin: Any, *, forward_methods: Iterable[str] = ()) -> nn.Module:
    """`fully_shard` each decoder layer, then the rest (embeddings, heads) as the root unit, in
    place. `forward_methods`: the module's methods besides `forward` that run its layers (their
    calls gather and free parameters like a forward does)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    kwargs = {"mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
              "offload_policy": plugin.cpu_offload}
    classes = layer_classes(model, plugin.transformer_cls_names_to_wrap)
    for module in reversed(list(model.modules())):  # bottom-up: inner units first
        if isinstance(module, classes):
            fully_shard(module, reshard_after_forward=plugin.reshard_after_forward, **kwargs)
    # The root holds what is used at both ends of a forward (embeddings, final norm, heads): kept
    # gathered from forward to backward, as torch's own default for the root does.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    # Log-probs come back as (B, T) views of flat (B * T) results; FSDP2 warns that an in-place op on
    # such a view would skip its backward hook. The stages never modify a forward's outputs in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return model


def release_gathered(model: nn.Module) -> None:
    """Free a sharded model's root unit after forwards without gradients. FSDP2 keeps the root unit
    (embeddings, final norm, heads) gathered from a forward until its backward; a model that only
    scores (PPO's reward model) never runs one, and would hold its root unit whole all run. A no-op
    for an unsharded model."""
    if is_sharded(model):
        model.reshard()


@contextlib.contextmanager
def gathered(model: nn.Module, reshard_after_forward: bool = True) -> Iterator[None]:
    """Every unit's full parameters for the duration of the block: token-by-token sampling then
    gathers each layer once per rollout instead of once per generated token (PPOConfig.sample_gathered
    has the measured difference). Memory: the whole model per rank while the block runs. A no-op for
    an unsharded model."""
    if not is_sharded(model):
        yield
        return
    units = [m for m in model.modules() if is_sharded(m)]
    layers = [m for m in units if m is not model]
    for unit in layers:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        for unit in layers:
            unit.set_reshard_after_forward(reshard_after_forward, recurse=False)


def local_numel(params: Iterable[torch.Tensor]) -> int:
    """Elements this rank stores: a sharded parameter's local shard, a plain one whole."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)


def global_sums(accelerator: Any, *sums: torch.Tensor | float) -> list[float]:
    """Each of this rank's `sums` added over every rank (float64; every rank must call): the
    statistics of a global batch are ratios of such sums, never means of the ranks' own means,
    which weigh a rank's part equally whatever its size."""
    local = torch.stack([torch.as_tensor(s, dtype=torch.float64).to(accelerator.device).reshape(()) for s in sums])
    return accelerator.reduce(local, "sum").tolist()


def micro_batch_sync(accelerator: Any, model: nn.Module, *, last: bool, sharded: bool) -> Any:
    """The context of one micro-batch's backward when gradients accumulate over several: under DDP
    they are all-reduced on the last micro-batch only (accelerate's `no_sync` before it); under FSDP2
    every micro-batch's are reduce-scattered, since a sharded module kept from syncing holds its
    gradients unsharded until the last one, as much memory as unsharded training would need."""
    return contextlib.nullcontext() if last or sharded else accelerator.no_sync(model)


def clip_and_check_gradients(accelerator: Any, params: list[torch.Tensor], max_norm: float, *, sharded: bool,
                             where: str) -> torch.Tensor:
    """Clip the accumulated gradients of `params` to a global norm of `max_norm` (over the shards
    under FSDP2) and stop the run, naming `where`, before a non-finite one is applied; the norm
    before clipping, NaN where the engine clips on its own and gives none (DeepSpeed)."""
    from align.precision import check_finite_gradient

    grad_norm = clip_grad_norm(params, max_norm) if sharded else accelerator.clip_grad_norm_(params, max_norm)
    if grad_norm is None:
        return torch.tensor(float("nan"))
    check_finite_gradient(grad_norm, where)  # a NaN weight would only surface later, as non-finite logits while sampling
    return grad_norm


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The global gradient norm over sharded parameters (each rank holds part of every gradient),
    then every gradient scaled to at most `max_norm`, as torch.nn.utils.clip_grad_norm_ does."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # the partial norms of the shards, reduced over the ranks
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def trained_only(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """`state` cut to the parameters that train, by their `named_parameters()` names: a state dict
    also lists a tied weight under its second name (lm_head.weight beside embed_tokens.weight),
    which torch's `ignore_frozen_params` lets through."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in names}


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters in full, on the CPU, on the main rank (empty on the others); every
    rank must call it. Names as `model.named_parameters()` gives them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return trained_only(model, get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)))


def full_state(model: nn.Module, *, trained_only: bool) -> dict[str, torch.Tensor]:
    """The whole state dict (or, `trained_only`, the trained parameters) gathered in full on the main
    rank's CPU (empty on the others); every rank must call it."""
    if trained_only:
        return full_trainable_state(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """The trained parameters and the optimiser state, each rank writing its own shards into
    `directory` (torch.distributed.checkpoint); every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": trained_only(model, model_state), "optimizer": optim_state}, checkpoint_id=str(directory))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Restore what `save_sharded` wrote, each rank reading the shards it holds (the same number of
    ranks, checked by the caller)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    state = {"model": trained_only(model, model_state), "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
