"""Exponential moving average of the generator's weights (Karras et al.; Yazıcı et al. 2019)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gan.state import unwrap


class GeneratorEMA:
    """A copy of the generator whose parameters follow an exponential moving average.

    ``module`` is a deep copy of ``generator`` (unwrapped from DDP), in eval mode and with
    ``requires_grad`` off. :meth:`update` (call it after each generator step):

    * ``step < start_step``: copies the parameters (the average starts from the weights at
      ``start_step``, not from the random initialization);
    * otherwise ``p_ema = decay * p_ema + (1 - decay) * p`` for every parameter;
    * always copies every buffer (batch-norm running_mean/var and num_batches_tracked, spectral
      norm vectors) from the generator, so the EMA generator carries the generator's batch-norm
      statistics. For statistics that match the averaged weights, run
      :func:`gan.nn.normalization.recompute_bn_statistics` on ``module`` before sampling.

    :meth:`state_dict` is the EMA generator's own ``state_dict``, so it loads into a plain
    generator for sampling or serving. ``decay`` and ``start_step`` are configuration, not state.
    """

    def __init__(self, generator: nn.Module, decay: float = 0.999, start_step: int = 0) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if start_step < 0:
            raise ValueError(f"EMA start_step must be >= 0, got {start_step}")
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.module = copy.deepcopy(unwrap(generator))
        self.module.eval()
        self.module.requires_grad_(False)

    def _pairs(
        self, ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor], kind: str
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if ours.keys() != theirs.keys():
            raise ValueError(
                f"the generator's {kind} do not match the EMA copy's: "
                f"missing {sorted(ours.keys() - theirs.keys())}, "
                f"unexpected {sorted(theirs.keys() - ours.keys())}"
            )
        return [(ours[k], theirs[k]) for k in ours]

    @torch.no_grad()
    def update(self, generator: nn.Module, step: int) -> None:
        """Average (or, before ``start_step``, copy) the parameters of ``generator``; copy its
        buffers."""
        source = unwrap(generator)
        params = self._pairs(
            dict(self.module.named_parameters()), dict(source.named_parameters()), "parameters"
        )
        if step < self.start_step:
            for p_ema, p in params:
                p_ema.copy_(p)
        else:
            for p_ema, p in params:
                p_ema.mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)
        for b_ema, b in self._pairs(
            dict(self.module.named_buffers()), dict(source.named_buffers()), "buffers"
        ):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        """The EMA generator's ``state_dict`` (loadable into a plain generator)."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state_dict)

    def to(self, *args: Any, **kwargs: Any) -> GeneratorEMA:
        self.module.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Samples from the EMA generator (in whatever mode ``module`` is in; eval by default)."""
        return self.module(z) if labels is None else self.module(z, labels)


__all__ = ["GeneratorEMA"]
