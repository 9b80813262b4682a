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

    ``loss_d`` is the adversarial D loss without penalties, ``loss_g`` G's loss; with several D
    updates a step (``d_steps``) ``loss_d`` and every D figure are means over the updates.
    ``real_logits``/``fake_logits`` are D's logits on the (augmented) reals and fakes of every D
    update, one update after the other along dim 0. ``grad_norms_d`` holds, for each D update,
    the L2 norm of each gradient D's optimizer stepped with (under DDP: the averaged gradients);
    ``grad_norms_g`` the same for G's one update. The penalties ``r1``, ``gp``, ``lecam`` and
    ``consistency`` are unweighted, None when unused; ``r1`` is the mean over the updates that
    applied it (lazy regularization), None if none did.
    """

    loss_d: torch.Tensor
    loss_g: torch.Tensor
    real_logits: torch.Tensor
    fake_logits: torch.Tensor
    grad_norms_d: tuple[tuple[torch.Tensor, ...], ...] = ()
    grad_norms_g: tuple[torch.Tensor, ...] = ()
    r1: torch.Tensor | None = None
    gp: torch.Tensor | None = None
    lecam: torch.Tensor | None = None
    consistency: torch.Tensor | None = None

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
        return _mean_total_norm([self.grad_norms_d], self.loss_d)

    @property
    def grad_norm_g(self) -> torch.Tensor:
        """L2 norm of all of G's gradients (zero without any)."""
        return _mean_total_norm([(self.grad_norms_g,)], self.loss_g)


class StatsWindow:
    """The steps of one report window, and the mean of every figure over them.

    :meth:`add` only keeps a step's tensors; :meth:`means` derives all figures in a few
    operators over the whole window. An unused penalty counts as zero, and one applied on some
    steps only (R1 every ``r1_interval`` updates) is averaged over all steps, zeros included.
    Every :data:`FOLD_STEPS` steps the kept ones are folded into sums of their figures, so a long
    window (``train.report_every``) holds a bounded number of tensors.
    """

    FOLD_STEPS = 64

    def __init__(self) -> None:
        self._steps: list[StepStats] = []
        self._folded_sums: torch.Tensor | None = None
        self._folded_count = 0

    def __len__(self) -> int:
        return self._folded_count + len(self._steps)

    def add(self, stats: StepStats) -> None:
        self._steps.append(stats)
        if len(self._steps) >= self.FOLD_STEPS:
            sums = _figure_means(self._steps) * len(self._steps)
            self._folded_sums = sums if self._folded_sums is None else self._folded_sums + sums
            self._folded_count += len(self._steps)
            self._steps.clear()

    def clear(self) -> None:
        self._steps.clear()
        self._folded_sums, self._folded_count = None, 0

    def means(self) -> torch.Tensor:
        """The :data:`FIGURES` as one float32 tensor on the steps' device, each the mean over the
        window's steps of that step's figure."""
        if not len(self):
            raise ValueError("the window holds no steps: add() at least one before means()")
        if self._folded_sums is None:
            return _figure_means(self._steps)
        sums = self._folded_sums
        if self._steps:
            sums = sums + _figure_means(self._steps) * len(self._steps)
        return sums / len(self)


def _figure_means(steps: list[StepStats]) -> torch.Tensor:
    """The mean over ``steps`` of each of their :data:`FIGURES`, as one float32 tensor."""
    like = steps[0].loss_d
    figures = {
        "loss_d": torch.stack([s.loss_d for s in steps]).mean(),
        "loss_g": torch.stack([s.loss_g for s in steps]).mean(),
        "d_real": _mean_per_step([s.real_logits for s in steps], torch.sigmoid),
        "d_fake": _mean_per_step([s.fake_logits for s in steps], torch.sigmoid),
        "grad_norm_g": _mean_total_norm([(s.grad_norms_g,) for s in steps], like),
        "grad_norm_d": _mean_total_norm([s.grad_norms_d for s in steps], like),
    }
    for name in PENALTIES:
        applied = [v for v in (getattr(s, name) for s in steps) if v is not None]
        figures[name] = (
            torch.stack(applied).sum() / len(steps) if applied else torch.zeros_like(like)
        )
    return torch.stack([figures[name] for name in FIGURES]).float()


def _mean_per_step(
    logits: list[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Mean over steps of each step's mean of ``fn(logits)``."""
    if all(t.shape == logits[0].shape for t in logits):  # the mean of equal-sized means
        return fn(torch.stack(logits)).mean()
    return torch.stack([fn(t).mean() for t in logits]).mean()


def _mean_total_norm(
    steps: list[tuple[tuple[torch.Tensor, ...], ...]], like: torch.Tensor
) -> torch.Tensor:
    """Mean over ``steps`` of the mean over a step's updates of the L2 norm of all gradients of
    an update, from each update's per-parameter norms; an update without gradients counts 0."""
    updates = [norms for step in steps for norms in step]
    if not any(updates):
        return torch.zeros_like(like)
    if len({len(step) for step in steps}) == 1 and len({len(n) for n in updates}) == 1:
        # The same updates and parameters every step: one row per update, one kernel for all.
        rows = torch.stack([n for norms in updates for n in norms]).view(len(updates), -1)
        return torch.linalg.vector_norm(rows, dim=1).mean()
    per_step = [
        torch.stack([_total_norm(norms, like) for norms in step]).mean()
        if step
        else torch.zeros_like(like)
        for step in steps
    ]
    return torch.stack(per_step).mean()


def _total_norm(norms: tuple[torch.Tensor, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros_like(like)
