"""Batches from host memory to the training device, in the layout the networks use."""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor.to(device)`` without making the host wait for the GPU.

    A copy from pageable host memory to a GPU returns only once every kernel already queued on
    the stream has run (torch synchronizes the stream around it). Per step, that takes away the
    host's lead over the GPU, which is what hides the kernel launches of small models. Staged in
    pinned memory, the copy is queued like a kernel instead; torch's caching host allocator keeps
    the pinned block until the copy has run, so the source may be dropped at once.
    """
    if tensor.device == device:  # no operator for nothing: the step is bound by their number
        return tensor
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


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
            return to_device(batch, self.device).contiguous(memory_format=self.memory_format)
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
        # A few bytes per batch: the caching host allocator's pinned copy is enough.
        return to_device(labels, self.device)
