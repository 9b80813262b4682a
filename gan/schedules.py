"""Learning-rate policies: a warm-up followed by a decay, as a multiplier of the base rate.

The policy is a pure function of the step, wrapped in ``torch.optim.lr_scheduler.LambdaLR`` so its
position is part of the optimizer checkpoint and a resumed run continues the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

DECAYS = ("none", "exponential", "cosine")


@dataclass(frozen=True)
class SchedulePolicy:
    """Linear warm-up over ``warmup_steps``, then ``decay`` to ``min_factor`` at ``total_steps``.

    ``exponential`` multiplies by a constant per step chosen so that the factor reaches
    ``min_factor`` at ``total_steps``; ``cosine`` follows half a cosine down to ``min_factor``.
    """

    total_steps: int
    warmup_steps: int = 0
    decay: str = "none"
    min_factor: float = 0.1

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise ValueError(f"unknown decay {self.decay!r}; allowed: {', '.join(DECAYS)}")
        if self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError("total_steps must be >= 1 and warmup_steps >= 0")
        if not 0.0 < self.min_factor <= 1.0:
            raise ValueError(f"min_factor must be in (0, 1], got {self.min_factor}")

    def factor(self, step: int) -> float:
        """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        if self.decay == "exponential":
            return self.min_factor**progress
        if self.decay == "cosine":
            return self.min_factor + (1 - self.min_factor) * 0.5 * (
                1 + math.cos(math.pi * progress)
            )
        return 1.0


def make_scheduler(
    optimizer: torch.optim.Optimizer, policy: SchedulePolicy
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler whose ``step()`` moves ``optimizer`` along ``policy``."""
    factor: Callable[[int], float] = policy.factor
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
