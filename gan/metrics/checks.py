"""Input checks shared by the metrics: feature sets are finite float64 (N, D) arrays."""

from __future__ import annotations

import numpy as np


def check_feature_set(
    name: str, features: np.ndarray, *, min_rows: int, purpose: str = ""
) -> np.ndarray:
    """Validate an (N, D) array of finite values with at least ``min_rows`` rows; return float64.

    ``purpose`` completes the row-count message, e.g. " to estimate a covariance".
    """
    arr = np.asarray(features, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows{purpose}, got {arr.shape[0]}")
    if arr.shape[1] < 1:
        raise ValueError(f"{name} has no feature columns")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def check_same_dimension(**arrays: np.ndarray) -> None:
    """Raise ValueError unless all (N, D) arrays share the same D."""
    dims = {name: arr.shape[1] for name, arr in arrays.items()}
    if len(set(dims.values())) > 1:
        listed = ", ".join(f"{name}: {d}" for name, d in dims.items())
        raise ValueError(f"feature dimensions differ ({listed})")
