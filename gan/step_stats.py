"""What a training iteration records for monitoring, and the window that averages it.

A run logs means over a window of ``train.report_every`` steps: the losses, D's outputs on reals
and fakes, the gradient norms. Derived at every step, those figures cost the host a dozen and a
half small operators per step beyond the training itself (``bench/step_ops.py``), each slow right
after the convolutions have filled the caches, and on a fast GPU each a launch the host must
issue. So a step keeps only the detached tensors the figures come from, and
:class:`StatsWindow` derives every figure once per window, over all its steps at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# The figures a training loop reports as window means, in the order of StatsWindow.means().
FIGURES = (
    "loss_d", "loss_g", "d_real", "d_fake", "r1", "gp",
    "lecam", "consistency", "grad_norm_g", "grad_norm_d",
)  # fmt: skip

# Regularizers a step may apply; unused ones are None, not zeros (no operator for nothing).
PENALTIES = ("r1", "gp", "lecam", "consistency")


@dataclass(frozen=True)
class StepStats:
    """Detached tensors of one iteration; every figure is derived from them on demand.

    ``loss_d`` is the adversarial D loss without penalties, ``loss_g`` G's loss; with
    ``d_updates > 1`` (``d_steps``) ``loss_d`` and every D figure are means over the D updates.
    ``real_logits``/``fake_logits`` are D's logits on the (augmented) reals and fakes of every D
    update, one update after the other along dim 0. ``grad_norms_d``/``grad_norms_g`` are the L2
    norms of each parameter's gradient before the optimizer steps (under DDP: of the averaged
    gradients), D's for every update one after the other. The penalties ``r1``, ``gp``,
    ``lecam`` and ``consistency`` are unweighted, None when unused; ``r1`` is the mean over the
    updates that applied it (lazy regularization), None if none did.
    """

    loss_d: torch.Tensor
    loss_g: torch.Tensor
    real_logits: torch.Tensor
    fake_logits: torch.Tensor
    grad_norms_d: tuple[torch.Tensor, ...] = ()
    grad_norms_g: tuple[torch.Tensor, ...] = ()
    d_updates: int = 1
    r1: torch.Tensor | None = None
    gp: torch.Tensor | None = None
    lecam: torch.Tensor | None = None
    consistency: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.d_updates < 1 or len(self.grad_norms_d) % self.d_updates:
            raise ValueError(
                f"grad_norms_d holds {len(self.grad_norms_d)} norms, not a whole number per "
                f"each of d_updates={self.d_updates}"
            )

    @property
    def d_real(self) -> torch.Tensor:
        """Mean sigmoid of D's logits on the reals, whatever the loss."""
        return torch.sigmoid(self.real_logits).mean()

    @property
    def d_fake(self) -> torch.Tensor:
        """Mean sigmoid of D's logits on the fakes."""
        return torch.sigmoid(self.fake_logits).mean()

    @property
    def real_sign(self) -> torch.Tensor:
        """Mean of sign(D(real)), adaptive augmentation's overfitting signal."""
        return torch.sign(self.real_logits).mean()

    @property
    def grad_norm_d(self) -> torch.Tensor:
        """L2 norm of all of D's gradients, the mean over its updates (zero without any)."""
        return _mean_total_norm([(self.grad_norms_d, self.d_updates)], self.loss_d)

    @property
    def grad_norm_g(self) -> torch.Tensor:
        """L2 norm of all of G's gradients (zero without any)."""
        return _mean_total_norm([(self.grad_norms_g, 1)], self.loss_g)


class StatsWindow:
    """The steps of one report window, and the mean of every figure over them.

    :meth:`add` only keeps a step's tensors; :meth:`means` derives all figures in a few
    operators over the whole window. An unused penalty counts as zero, and one applied on some
    steps only (R1 every ``r1_interval`` updates) is averaged over all steps, zeros included.
    """

    def __init__(self) -> None:
        self._steps: list[StepStats] = []

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, stats: StepStats) -> None:
        self._steps.append(stats)

    def clear(self) -> None:
        self._steps.clear()

    def means(self) -> torch.Tensor:
        """The :data:`FIGURES` as one float32 tensor on the steps' device, each the mean over the
        window's steps of that step's figure."""
        steps = self._steps
        if not steps:
            raise ValueError("the window holds no steps: add() at least one before means()")
        like = steps[0].loss_d
        figures = {
            "loss_d": torch.stack([s.loss_d for s in steps]).mean(),
            "loss_g": torch.stack([s.loss_g for s in steps]).mean(),
            "d_real": _mean_per_step(_stacked([s.real_logits for s in steps]), torch.sigmoid),
            "d_fake": _mean_per_step(_stacked([s.fake_logits for s in steps]), torch.sigmoid),
            "grad_norm_g": _mean_total_norm([(s.grad_norms_g, 1) for s in steps], like),
            "grad_norm_d": _mean_total_norm([(s.grad_norms_d, s.d_updates) for s in steps], like),
        }
        for name in PENALTIES:
            applied = [v for v in (getattr(s, name) for s in steps) if v is not None]
            figures[name] = (
                torch.stack(applied).sum() / len(steps) if applied else torch.zeros_like(like)
            )
        return torch.stack([figures[name] for name in FIGURES]).float()


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """One tensor with the steps along dim 0, or the list itself if their shapes differ."""
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors)
    return tensors


def _mean_per_step(
    logits: torch.Tensor | list[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Mean over steps of each step's mean of ``fn(logits)``."""
    if isinstance(logits, torch.Tensor):  # equal sizes: the mean of the means is the mean
        return fn(logits).mean()
    return torch.stack([fn(t).mean() for t in logits]).mean()


def _mean_total_norm(
    per_step: list[tuple[tuple[torch.Tensor, ...], int]], like: torch.Tensor
) -> torch.Tensor:
    """Mean over steps of the mean over a step's updates of the L2 norm of all gradients of an
    update, from each step's per-parameter norms and its number of updates (the updates' norms
    one after the other); zero for a step without gradients."""
    if not any(norms for norms, _ in per_step):
        return torch.zeros_like(like)
    if (
        len({(len(norms), updates) for norms, updates in per_step}) == 1
    ):  # the same parameters and updates every step: one norm per row
        updates = per_step[0][1]
        flat = [n for norms, _ in per_step for n in norms]
        rows = torch.stack(flat).view(len(per_step) * updates, -1)
        return torch.linalg.vector_norm(rows, dim=1).mean()
    totals = [
        torch.linalg.vector_norm(torch.stack(norms).view(updates, -1), dim=1).mean()
        if norms
        else torch.zeros_like(like)
        for norms, updates in per_step
    ]
    return torch.stack(totals).mean()
