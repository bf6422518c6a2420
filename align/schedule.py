"""The learning-rate schedule of every stage: linear warm-up, then a constant, linear or cosine shape.

Warm-up step s (0-based) runs at (s + 1) / warmup_steps of the peak, so the first optimiser step
already learns; transformers' schedules (and TRL's trainers) start at 0, which in PPO spends the first
minibatch of a rollout on nothing. After the warm-up, linear and cosine decay over the remaining
steps towards `floor` (a fraction of the peak); constant stays at the peak.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Shape = Literal["constant", "linear", "cosine"]


def lr_factor(step: int, total_steps: int, warmup_steps: int, shape: Shape = "linear", floor: float = 0.0) -> float:
    """The fraction of the peak learning rate at optimiser step `step` (0-based) of `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if shape == "constant":
        return 1.0
    remaining = max(1, total_steps - warmup_steps)
    if shape == "linear":
        decay = max(0.0, (total_steps - step) / remaining)
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / remaining)))
    return floor + (1.0 - floor) * decay


def lr_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, shape: Shape = "linear",
                floor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_factor` as a scheduler. Stepped by hand, once per optimiser step (accelerate's wrapper would
    step it once per process)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, shape, floor))

