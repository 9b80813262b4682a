"""Batches from host memory to the training device, in the layout the networks use."""

from __future__ import annotations

import torch


class HostToDevice:
    """Copies image batches (and their labels) to ``device``.

    With ``pin_memory`` (CUDA only) each batch is first copied into one of two pinned host
    buffers and from there to the GPU without blocking, so the host prepares the next batch
    while the copy runs. Two buffers, each reused only after a CUDA event says its previous
    copy finished: a pinned buffer overwritten during its copy would corrupt that batch.

    With ``channels_last`` the images arrive in NHWC memory layout (same shape and values).
    """

    def __init__(
        self, device: torch.device, *, pin_memory: bool = False, channels_last: bool = False
    ) -> None:
        if pin_memory and device.type != "cuda":
            raise ValueError(f"pinned host memory speeds up copies to a GPU, not to {device}")
        self.device = device
        self.pin_memory = pin_memory
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._next = 0

    def images(self, batch: torch.Tensor) -> torch.Tensor:
        if not self.pin_memory:
            return batch.to(self.device).contiguous(memory_format=self.memory_format)
        slot = self._next
        self._next = 1 - slot
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()
        buffer = self._buffers[slot]
        if buffer is None or buffer.shape != batch.shape or buffer.dtype != batch.dtype:
            buffer = torch.empty(batch.shape, dtype=batch.dtype, pin_memory=True)
            self._buffers[slot] = buffer
        buffer.copy_(batch)
        on_device = buffer.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._copied[slot] = event
        return on_device.contiguous(memory_format=self.memory_format)

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        # A few bytes per batch: a plain copy costs less than the bookkeeping above.
        return labels.to(self.device)
