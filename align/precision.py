"""Where and in what precision models run: the device, bf16 storage with fp32 trainable
parameters, and gradient checkpointing that leaves dropout alone.

Only torch is imported, inside the functions (keeps `align --help` fast).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def default_device() -> Any:
    """The first CUDA device when there is one, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_dtype(name: str | None) -> Any:
    """'float32' / 'bfloat16' (None: float32) -> the torch dtype."""
    import torch

    return {None: torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def upcast_trainable(model: Any) -> int:
    """Trainable parameters back to fp32 in a model stored in bf16: bf16 keeps 8 bits of mantissa,
    so an Adam update of lr ~1e-5 on a weight of ~1e-2 (relative 1e-3) would mostly round away
    (Micikevicius et al. 2018, "Mixed precision training": fp32 master weights). Frozen weights stay
    bf16 (half the memory); the forward runs under `autocast` so the mixed dtypes meet in bf16
    matmuls. Returns the number of parameters upcast."""
    import torch

    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            n += p.numel()
    return n


def autocast(device: Any, dtype: Any) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when dtype is bf16, else nothing (fp32 runs exactly as before)."""
    import torch

    if dtype != torch.bfloat16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def enable_gradient_checkpointing(model: Any) -> list[Any]:
    """Turn on transformers' per-layer activation checkpointing (non-reentrant: the frozen, no-grad
    embeddings of a LoRA model need no input hook) and return the checkpointed layers.

    transformers checkpoints a layer only while `layer.training` is set; PPO keeps its model in eval
    mode (dropout off, so rollout and training log-probs agree), so `checkpointing_active` flips only
    those layers' own flag around a training forward, never their dropout submodules.

    transformers 5.25 renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable`
    (the old name warns, and goes in v6); the installed version's name is used."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]


@contextlib.contextmanager
def checkpointing_active(layers: list[Any]) -> Iterator[None]:
    """Mark the checkpointed layers as training (only their own flag) for one forward and backward."""
    saved = [layer.training for layer in layers]
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer, was in zip(layers, saved):
            layer.training = was


def check_finite_gradient(grad_norm: Any, where: str) -> None:
    """Stop the run before a NaN or infinite gradient (from a non-finite loss or an overflow) is
    applied, naming where it happened. One read-back of the norm per optimiser step."""
    import torch

    from align.errors import TrainingDiverged

    if not torch.isfinite(torch.as_tensor(grad_norm)).item():
        raise TrainingDiverged(f"{where}: the gradient norm is {float(grad_norm)} (a non-finite loss or gradient); "
                               "the update was not applied. Lower the learning rate, or check the data and scores")
