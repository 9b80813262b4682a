"""Divergence: a loss or a weight that stops being finite is rolled back, not trained on.

Every ``train.report_every`` steps the worker loop asks :meth:`DivergenceGuard.healthy` whether
the window's averaged figures and every weight of G, D (and the EMA generator) are finite; the
figures are averaged over all workers already and the verdict is all-reduced, so every worker
decides the same. A divergence restores the state of the last checkpoint (kept on each worker's
local disk, :meth:`DivergenceGuard.snapshot`), multiplies both learning rates by
``train.rollback_lr_factor`` and trains on; after ``train.nan_rollbacks`` rollbacks the next
divergence ends training with :class:`TrainingDiverged`.

The count travels in the checkpoint (``extras["divergence"]``), and the lowered rates travel in
the optimizers' state, so a worker restarted after a crash keeps both.

Its test: a NaN written into a weight by ``pipelines/faults.py``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from gan.optim import set_learning_rate
from gan.state import STATE_FILE, save_state
from pipelines.loop import TrainingState

EXTRAS_KEY = "divergence"  # the guard's entry in a checkpoint's extras


class TrainingDiverged(RuntimeError):
    """Training kept diverging after the configured number of rollbacks."""


class DivergenceGuard:
    """Detects non-finite losses or weights and rolls the state back to its last snapshot."""

    def __init__(
        self,
        state: TrainingState,
        *,
        max_rollbacks: int,
        lr_factor: float,
        rank: int,
        world: int,
    ) -> None:
        self.state = state
        self.max_rollbacks = max_rollbacks
        self.lr_factor = lr_factor
        self.rank, self.world = rank, world
        self.rollbacks = 0
        self.snapshot_step: int | None = None
        # Local to this worker: a rollback must not depend on the checkpoint store answering.
        self._directory = Path(tempfile.mkdtemp(prefix="ganpipe-last-good-"))

    # -- persisted in checkpoints (``extras``) -----------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks}

    def load_state_dict(self, values: dict[str, Any]) -> None:
        self.rollbacks = int(values["rollbacks"])

    def load_from_checkpoint(self, directory: str | Path) -> None:
        """The rollback count of the checkpoint a restarted worker resumes from, if it has one."""
        saved = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
        values = saved.get("extras", {}).get(EXTRAS_KEY)
        if values is not None:
            self.load_state_dict(values)

    # -- the checks ---------------------------------------------------------------------------

    def _weights_finite(self) -> bool:
        modules = [self.state.generator, self.state.discriminator]
        if self.state.ema is not None:
            modules.append(self.state.ema.module)
        # One read for all of them: on a GPU each read waits for the device.
        finite = [
            torch.isfinite(p).all()
            for module in modules
            for p in [*module.parameters(), *module.buffers()]
            if p.is_floating_point()
        ]
        return bool(torch.stack(finite).all())

    def healthy(self, figures: torch.Tensor, any_worker: Any = None) -> bool:
        """Whether ``figures`` (the window's averaged losses and norms) and every weight are
        finite. ``any_worker`` maps a 0/1 tensor to its mean over all workers, so that every
        worker takes the same decision even if only one sees a bad weight."""
        ok = bool(torch.isfinite(figures).all()) and self._weights_finite()
        # On the weights' device: NCCL all-reduces CUDA tensors only.
        device = next(self.state.generator.parameters()).device
        bad = torch.tensor([0.0 if ok else 1.0], device=device)
        if any_worker is not None:
            bad = any_worker(bad)
        return float(bad.item()) == 0.0

    def snapshot(self, step: int, worker_rngs: list[torch.Tensor]) -> None:
        """Keep the state of ``step`` (a healthy checkpoint) on this worker's disk."""
        parts = self.state.checkpoint_parts()
        parts["extras"] = {**parts["extras"], EXTRAS_KEY: self}
        save_state(self._directory, step=step, worker_rngs=worker_rngs, **parts)
        self.snapshot_step = step

    def copy_snapshot(self, directory: str | Path) -> None:
        """Put the last snapshot's state file into ``directory`` (the checkpoint to report)."""
        shutil.copy2(self._directory / STATE_FILE, Path(directory) / STATE_FILE)

    def roll_back(self, at_step: int) -> int:
        """Restore the last snapshot with both learning rates lowered; return its step.

        Raises TrainingDiverged once ``max_rollbacks`` rollbacks were spent."""
        if self.snapshot_step is None:
            raise TrainingDiverged(f"training diverged at step {at_step} before any snapshot")
        if self.rollbacks >= self.max_rollbacks:
            raise TrainingDiverged(
                f"training diverged (non-finite loss or weights) at step {at_step} after "
                f"{self.rollbacks} rollback(s) to the last good checkpoint with learning rates "
                f"x{self.lr_factor:g} each (train.nan_rollbacks={self.max_rollbacks}); lower "
                "optim.lr_g / optim.lr_d, or raise train.nan_rollbacks"
            )
        # The rates in effect now already carry earlier rollbacks; the snapshot may not.
        bases = [_base_rate(opt) for opt in (self.state.opt_g, self.state.opt_d)]
        step = self.state.restore(str(self._directory), self.rank, self.world)
        for optimizer, base in zip((self.state.opt_g, self.state.opt_d), bases, strict=True):
            set_learning_rate(optimizer, base * self.lr_factor)
        self.rollbacks += 1
        return step

    def close(self) -> None:
        shutil.rmtree(self._directory, ignore_errors=True)


def _base_rate(optimizer: torch.optim.Optimizer) -> float:
    """The peak rate a scheduler scales (``initial_lr``), or the rate itself without one."""
    group = optimizer.param_groups[0]
    return float(group.get("initial_lr", group["lr"]))
