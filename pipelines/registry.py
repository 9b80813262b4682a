"""Packaging, registering and retrieving the generator in the MLflow model registry.

Alias policy: a new version becomes ``champion`` when it has a lower evaluation distance than the
current champion (or there is none) and ``challenger`` otherwise.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import gan
from gan.state import load_generator_weights

PYFUNC_FILE = Path(__file__).with_name("generator_pyfunc.py")
DISTANCE_TAG = "frechet_distance"
CHAMPION, CHALLENGER = "champion", "challenger"


def generator_spec(config: Any, shape: list[int]) -> dict[str, Any]:
    """Constructor arguments of the served generator (plain batch norm: eval mode is per-worker)."""
    m = config.model
    return {
        "generator": {
            "latent_dim": m.latent_dim,
            "resolution": config.data.resolution,
            "channels": int(shape[0]),
            "width": m.g_width,
            "norm": "none" if m.g_norm == "none" else "batch",
            "g_output_norm": m.g_output_norm,
        },
        "trained_with_norm": m.g_norm,
        "weights": "ema" if config.ema.enabled else "generator",
        "sampling_mode": "eval",
    }


def log_generator(
    *,
    run_id: str,
    tracking_uri: str,
    config: Any,
    checkpoint: str,
    shape: list[int],
    model_name: str,
) -> str:
    """Log the generator as a pyfunc model in ``run_id`` and register it; return the version."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    spec = generator_spec(config, shape)
    c, r = spec["generator"]["channels"], spec["generator"]["resolution"]
    signature = ModelSignature(
        inputs=Schema([ColSpec("long", "seed"), ColSpec("long", "count", required=False)]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, r, r, c))]),
    )
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "generator.pt"
        torch.save(load_generator_weights(checkpoint), weights)
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="generator",
                python_model=str(PYFUNC_FILE),
                artifacts={"weights": str(weights), "spec": str(spec_path)},
                code_paths=[str(Path(gan.__file__).parent)],
                signature=signature,
                input_example=pd.DataFrame({"seed": [0, 1, 2, 3]}),
                pip_requirements=[
                    f"torch=={torch.__version__.split('+')[0]}",
                    f"mlflow=={mlflow.__version__}",
                    f"numpy=={np.__version__}",
                    f"pandas=={pd.__version__}",
                ],
                registered_model_name=model_name,
            )
    return str(info.registered_model_version)


def apply_alias_policy(client: Any, name: str, version: str, distance: float) -> str:
    """Tag the version with its distance and give it ``champion`` or ``challenger``."""
    client.set_model_version_tag(name, version, DISTANCE_TAG, repr(distance))
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except Exception:  # no champion yet
        champion = None
    best = float(champion.tags.get(DISTANCE_TAG, "inf")) if champion is not None else float("inf")
    alias = CHAMPION if distance < best else CHALLENGER
    client.set_registered_model_alias(name, alias, version)
    return alias
