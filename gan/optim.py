"""Optimizers by name, and overwriting the learning rate of an existing optimizer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")


def make_optimizer(
    name: str,
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    *,
    lr: float,
    betas: tuple[float, float] = (0.5, 0.999),
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    eps: float = 1e-8,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of :data:`OPTIMIZERS`) over ``params``.

    * ``adam`` / ``adamw``: ``betas``, ``eps``, ``weight_decay`` (L2 in the gradient for Adam,
      decoupled for AdamW; note that 0.0, the default here, makes AdamW behave like Adam, unlike
      torch's AdamW default of 0.01); ``fused``: one kernel updates every parameter (CUDA
      and CPU; same arithmetic as the loop over parameters, up to rounding);
    * ``rmsprop``: torch's default smoothing ``alpha=0.99``, ``momentum``, ``eps``,
      ``weight_decay`` (``betas`` unused);
    * ``sgd``: ``momentum`` (heavy-ball, no Nesterov), ``weight_decay`` (``betas``, ``eps`` unused).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")
    if not lr > 0:  # also rejects NaN
        raise ValueError(f"lr must be > 0, got {lr}")
    if fused and name not in ("adam", "adamw"):
        raise ValueError(f"fused kernels exist for adam and adamw only, not {name!r}")
    # fused=None leaves torch's own choice (the foreach implementation) as it was.
    adam = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused or None)
    if name == "adam":
        return torch.optim.Adam(params, **adam)
    if name == "adamw":
        return torch.optim.AdamW(params, **adam)
    if name == "rmsprop":
        return torch.optim.RMSprop(
            params, lr=lr, alpha=0.99, eps=eps, weight_decay=weight_decay, momentum=momentum
        )
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _write(group: dict[str, Any], key: str, value: float) -> None:
    if isinstance(group[key], torch.Tensor):
        group[key].fill_(value)
    else:
        group[key] = value


def set_learning_rate(
    optimizer: torch.optim.Optimizer, lr: float, *, keep_schedule_position: bool = True
) -> None:
    """Make ``lr`` the (base) learning rate of every param group of ``optimizer``.

    Why: ``optimizer.load_state_dict`` restores the param groups' hyper-parameters, the rates
    included, from the checkpoint. When the checkpoint came from a run with another rate (a
    population-based-training exploit copies a better trial's checkpoint and then perturbs its
    hyper-parameters; or a resume with a changed config), the loaded rate silently wins over the
    configured one. A scheduler keeps its base rate in each group's ``initial_lr`` (also restored
    by ``load_state_dict``), and :class:`gan.schedules.PolicyScheduler` re-reads it at every step,
    so writing only ``lr`` would last one step before the scheduler put the old base back. Hence
    both are written.

    With ``keep_schedule_position`` (default) and a group that has an ``initial_lr`` (i.e. is
    driven by a scheduler), ``lr`` becomes the new base times the schedule's current multiplier
    (``lr / initial_lr`` before the call), so the very next step is already on the new curve
    rather than at the new peak; without ``initial_lr`` (no scheduler) or with
    ``keep_schedule_position=False``, ``lr`` is written as given.
    """
    if not lr > 0:  # also rejects NaN
        raise ValueError(f"lr must be > 0, got {lr}")
    for group in optimizer.param_groups:
        new_lr = lr
        if "initial_lr" in group:
            old_base = float(group["initial_lr"])
            if keep_schedule_position and old_base > 0:
                new_lr = lr * (float(group["lr"]) / old_base)
            _write(group, "initial_lr", lr)
        _write(group, "lr", new_lr)
