"""Learning-rate policies: a warm-up followed by a main policy, as a multiplier of the base rate.

A :class:`SchedulePolicy` describes the curve; :func:`make_scheduler` attaches it to an optimizer as
a :class:`PolicyScheduler` (a ``torch.optim.lr_scheduler.LRScheduler``) whose ``state_dict`` holds
only plain numbers, so the position on the curve is part of a checkpoint that loads with
``torch.load(weights_only=True)`` and a resumed run continues the same curve.

Warm-up (``warmup``, over the first ``warmup_steps`` optimizer steps):

* ``none``: no warm-up (``warmup_steps`` must then be 0);
* ``linear``: ``(step + 1) / warmup_steps``;
* ``exponential``: ``warmup_start_factor ** (1 - (step + 1) / warmup_steps)``, a geometric ramp
  from ``warmup_start_factor`` up to 1.

Main policy (``decay``). Its step count ``k`` starts at 0 at the first step after warm-up
(``k = step - warmup_steps``), so with a warm-up of N steps the main curve is the no-warm-up curve
shifted by N:

* ``none``: constant 1;
* ``step``: ``gamma ** (k // step_size)``, floored at ``min_factor`` (torch ``StepLR`` until the
  floor is reached);
* ``exponential``: reaches ``min_factor`` at ``total_steps`` and stays there (torch
  ``ExponentialLR`` with ``gamma = min_factor ** (1 / (total_steps - warmup_steps))``);
* ``cosine``: half a cosine from 1 down to ``min_factor`` at ``total_steps``, then constant (torch
  ``CosineAnnealingLR`` with ``eta_min = base * min_factor``);
* ``cyclic_triangular`` / ``cyclic_triangular2``: triangle waves between ``cycle_low`` and 1 (the
  base rate is the high rate) with half-cycle ``cycle_half_steps``, starting at the low end;
  ``triangular2`` halves the amplitude every cycle (torch ``CyclicLR``);
* ``plateau``: reduce-on-plateau driven by a metric where lower is better, passed to
  :meth:`PolicyScheduler.report` (torch ``ReduceLROnPlateau(mode="min", threshold_mode="rel")``).

Two time-scale updates (TTUR) are two optimizers with two policies; nothing here is shared.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

WARMUPS = ("none", "linear", "exponential")
DECAYS = (
    "none",
    "step",
    "exponential",
    "cosine",
    "cyclic_triangular",
    "cyclic_triangular2",
    "plateau",
)


def _in_range(value: float, low: float, high: float, *, low_open: bool, high_open: bool) -> bool:
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    return above and below  # False for NaN


@dataclass(frozen=True)
class SchedulePolicy:
    """A warm-up of ``warmup_steps`` steps of kind ``warmup``, then the main policy ``decay``.

    See the module docstring for the curves. Fields only used by one policy are ignored by the
    others (but always validated).
    """

    total_steps: int
    warmup_steps: int = 0
    decay: str = "none"
    min_factor: float = 0.1
    warmup: str = "linear"
    warmup_start_factor: float = 0.01
    gamma: float = 0.5
    step_size: int = 1000
    cycle_low: float = 0.1
    cycle_half_steps: int = 500
    plateau_factor: float = 0.5
    plateau_patience: int = 3
    plateau_threshold: float = 1e-4
    plateau_cooldown: int = 0

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise ValueError(f"unknown decay {self.decay!r}; allowed: {', '.join(DECAYS)}")
        if self.warmup not in WARMUPS:
            raise ValueError(f"unknown warmup {self.warmup!r}; allowed: {', '.join(WARMUPS)}")
        for name, low in (
            ("total_steps", 1),
            ("warmup_steps", 0),
            ("step_size", 1),
            ("cycle_half_steps", 1),
            ("plateau_patience", 0),
            ("plateau_cooldown", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name} must be >= {low} (an integer), got {value!r}")
        if self.warmup == "none" and self.warmup_steps != 0:
            raise ValueError(
                f"warmup_steps must be 0 when warmup is 'none', got {self.warmup_steps}"
            )
        for name, low, high, low_open, high_open in (
            ("min_factor", 0.0, 1.0, True, False),
            ("warmup_start_factor", 0.0, 1.0, True, False),
            ("gamma", 0.0, 1.0, True, False),
            ("cycle_low", 0.0, 1.0, True, False),
            ("plateau_factor", 0.0, 1.0, True, True),
            ("plateau_threshold", 0.0, 1.0, False, True),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not _in_range(value, low, high, low_open=low_open, high_open=high_open):
                interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                raise ValueError(f"{name} must be in {interval}, got {value}")

    def warmup_factor(self, step: int) -> float:
        """The warm-up multiplier at ``step`` (0-based); 1 from ``warmup_steps`` on."""
        if step >= self.warmup_steps:
            return 1.0
        if self.warmup == "exponential":
            return self.warmup_start_factor ** (1 - (step + 1) / self.warmup_steps)
        return (step + 1) / self.warmup_steps

    def main_factor(self, k: int) -> float:
        """The main policy's multiplier at its own step ``k`` (0 = first step after warm-up).

        For ``plateau`` this is 1: its reductions depend on reported metrics, not on the step, and
        are applied by :class:`PolicyScheduler`.
        """
        if self.decay == "step":
            return max(self.gamma ** (k // self.step_size), self.min_factor)
        if self.decay in ("exponential", "cosine"):
            decay_steps = max(self.total_steps - self.warmup_steps, 1)
            progress = min(k / decay_steps, 1.0)
            if self.decay == "exponential":
                return self.min_factor**progress
            return self.min_factor + (1 - self.min_factor) * 0.5 * (
                1 + math.cos(math.pi * progress)
            )
        if self.decay in ("cyclic_triangular", "cyclic_triangular2"):
            # Same arithmetic as torch.optim.lr_scheduler.CyclicLR (step_size_down = step_size_up).
            total_size = 2 * self.cycle_half_steps
            cycle = math.floor(1 + k / total_size)
            x = 1.0 + k / total_size - cycle
            scale = x / 0.5 if x <= 0.5 else (x - 1) / (0.5 - 1)
            if self.decay == "cyclic_triangular2":
                scale *= 1 / (2.0 ** (cycle - 1))
            return self.cycle_low + (1 - self.cycle_low) * scale
        return 1.0

    def factor(self, step: int) -> float:
        """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

        For ``plateau`` this is the multiplier before any reduction (the warm-up ramp, then 1).
        """
        if step < self.warmup_steps:
            return self.warmup_factor(step)
        return self.main_factor(step - self.warmup_steps)


def _set_group_lr(group: dict[str, Any], lr: float) -> None:
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


class PolicyScheduler(torch.optim.lr_scheduler.LRScheduler):
    """Moves an optimizer's learning rates along a :class:`SchedulePolicy`.

    Call :meth:`step` once per optimizer step (after ``optimizer.step()``). For the ``plateau``
    policy, call :meth:`report` with a quality metric (lower is better) whenever one is measured;
    other policies ignore reports, so the caller need not branch.

    The base rate of each param group is read from its ``initial_lr`` at every step (torch's own
    record of the base rate; set at construction from ``lr``), so overwriting ``initial_lr``, e.g.
    with :func:`gan.optim.set_learning_rate` after a population-based-training exploit, moves the
    whole curve to the new base from the next step on.

    ``state_dict()`` holds only numbers and lists of numbers (not the policy: the scheduler is
    rebuilt from the config and then loaded), so it survives ``torch.load(weights_only=True)``.
    States saved by the former ``LambdaLR``-based scheduler load too.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, policy: SchedulePolicy) -> None:
        self.policy = policy
        # Plateau state: current reduction multiplier, best metric, consecutive reports without
        # improvement, reports left in cooldown, and reports seen after warm-up.
        self.plateau_scale = 1.0
        self.plateau_best = math.inf
        self.plateau_bad_reports = 0
        self.plateau_cooldown_left = 0
        self.plateau_reports = 0
        super().__init__(optimizer)

    def _current_factor(self) -> float:
        step = self.last_epoch
        if self.policy.decay == "plateau":
            return self.policy.warmup_factor(step) * self.plateau_scale
        return self.policy.factor(step)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        self.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
        factor = self._current_factor()
        return [base * factor for base in self.base_lrs]

    def report(self, metric: float) -> bool:
        """Feed a quality metric (lower is better); returns whether the rate was reduced.

        Only the ``plateau`` policy uses it, and only after warm-up: reports made while the rate is
        still ramping up are ignored (they neither set the best value nor count as stalls). The
        rule is torch's ``ReduceLROnPlateau(mode="min", threshold_mode="rel")``: a report improves
        when ``metric < best * (1 - plateau_threshold)``; after more than ``plateau_patience``
        consecutive reports without improvement (i.e. on the ``plateau_patience + 1``-th) the
        multiplier is multiplied by ``plateau_factor`` (floored at ``min_factor``) and the next
        ``plateau_cooldown`` reports do not count as stalls. A NaN metric counts as a stall.
        """
        p = self.policy
        if p.decay != "plateau" or self.last_epoch < p.warmup_steps:
            return False
        metric = float(metric)
        self.plateau_reports += 1
        if metric < self.plateau_best * (1.0 - p.plateau_threshold):
            self.plateau_best = metric
            self.plateau_bad_reports = 0
        else:
            self.plateau_bad_reports += 1
        if self.plateau_cooldown_left > 0:
            self.plateau_cooldown_left -= 1
            self.plateau_bad_reports = 0
        if self.plateau_bad_reports <= p.plateau_patience:
            return False
        old = self.plateau_scale
        self.plateau_scale = max(old * p.plateau_factor, p.min_factor)
        self.plateau_cooldown_left = p.plateau_cooldown
        self.plateau_bad_reports = 0
        factor = self._current_factor()
        self.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            _set_group_lr(group, base * factor)
        self._last_lr = [
            g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
            for g in self.optimizer.param_groups
        ]
        return self.plateau_scale < old

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "policy")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # "lr_lambdas" comes from checkpoints of the former LambdaLR-based scheduler.
        ignored = ("optimizer", "policy", "lr_lambdas")
        self.__dict__.update({k: v for k, v in state_dict.items() if k not in ignored})


def make_scheduler(optimizer: torch.optim.Optimizer, policy: SchedulePolicy) -> PolicyScheduler:
    """A scheduler whose ``step()`` moves ``optimizer`` along ``policy`` (and ``report()`` feeds
    the ``plateau`` policy). Sets each param group's rate to its value at step 0."""
    return PolicyScheduler(optimizer, policy)
