"""Normalization layers selectable by name from the config."""

from __future__ import annotations

from torch import nn

from gan.nn.sync_batchnorm import SyncBatchNorm

# "sync_batch" is batch norm whose statistics cover the global batch across all data-parallel
# workers; with one process it is exactly "batch".
NORMALIZATIONS = ("batch", "sync_batch", "none")


def make_norm(kind: str, num_features: int) -> nn.Module:
    """Return the normalization layer ``kind`` for ``num_features`` channels."""
    if kind == "batch":
        return nn.BatchNorm2d(num_features)
    if kind == "sync_batch":
        return SyncBatchNorm(num_features)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalization {kind!r}; allowed: {', '.join(NORMALIZATIONS)}")
