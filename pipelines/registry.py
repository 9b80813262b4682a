"""Packaging, registering and retrieving the generator in the MLflow model registry.

Alias policy (docs/models.md):

- every new version gets ``challenger`` (so ``@challenger`` is always the newest candidate);
- it also gets ``champion`` when there is no champion yet, or when its Fréchet distance is
  strictly lower than the champion's *and* both were evaluated the same way: same data digest
  (``ganpipe.data_digest``: same held-out images) and same evaluation protocol
  (``ganpipe.eval_protocol``: same number of samples, same feature extractor training). A
  distance measured on other data is a different number, not a better or worse one, so such a
  version stays challenger and the reason is logged; ``ganpipe promote`` moves champion by hand.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import PIL
import torch

import gan
from gan.state import load_generator_weights

PYFUNC_FILE = Path(__file__).with_name("generator_pyfunc.py")
CHAMPION, CHALLENGER = "champion", "challenger"
DISTANCE_TAG = "frechet_distance"
DATA_DIGEST_TAG = "ganpipe.data_digest"
EVAL_PROTOCOL_TAG = "ganpipe.eval_protocol"
SAMPLING_MODE_TAG = "ganpipe.sampling_mode"
PROMOTED_TAG = "ganpipe.promoted"
SAMPLING_MODES = ("eval", "train")


class RegistryError(ValueError):
    """A registry lookup that cannot succeed; the message names what is missing and what exists."""


def sampling_mode(config: Any) -> str:
    """``eval.sampling_mode`` when the config has it (batch-norm statistics used when sampling)."""
    mode = getattr(config.eval, "sampling_mode", "eval")
    if mode not in SAMPLING_MODES:
        raise ValueError(f"eval.sampling_mode {mode!r}: use one of {', '.join(SAMPLING_MODES)}")
    return mode


def eval_protocol(config: Any) -> str:
    """The evaluation settings that change what a Fréchet distance means, as readable text."""
    return f"samples={config.eval.samples},classifier_epochs={config.eval.classifier_epochs}"


def generator_spec(config: Any, shape: list[int], num_classes: int = 0) -> dict[str, Any]:
    """Constructor arguments of the served generator and how it samples.

    Served with plain batch norm: sync batch norm is the same computation in one process.
    ``num_classes`` > 0: class-conditional (the generator's label embedding).
    """
    m = config.model
    return {
        "generator": {
            "latent_dim": m.latent_dim,
            "resolution": config.data.resolution,
            "channels": int(shape[0]),
            "width": m.g_width,
            "norm": "none" if m.g_norm == "none" else "batch",
            "g_output_norm": m.g_output_norm,
            "num_classes": int(num_classes),
        },
        "trained_with_norm": m.g_norm,
        "weights": "ema" if config.ema.enabled else "generator",
        "sampling_mode": sampling_mode(config),
    }


def evaluated_generator(config: Any, checkpoint: str, channels: int) -> torch.nn.Module:
    """The generator exactly as the evaluate step scored it: EMA weights when there are some,
    standing batch-norm statistics when ``eval.standing_stats_batches`` asks for them."""
    from pipelines.steps.evaluate import load_generator

    weights = load_generator_weights(checkpoint)
    # The weights say whether G is conditional: its label embedding has one row per class.
    num_classes = int(weights["embed.weight"].shape[0]) if "embed.weight" in weights else 0
    return load_generator(config, checkpoint, channels, num_classes)


def model_signature(spec: dict[str, Any]) -> Any:
    """Input table (seed, optional count and label), uint8 image output, the ``format`` param."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    c, r = spec["generator"]["channels"], spec["generator"]["resolution"]
    return ModelSignature(
        inputs=Schema(
            [
                ColSpec("long", "seed"),
                ColSpec("long", "count", required=False),
                # Declared although unconditional models refuse it: MLflow silently drops
                # undeclared columns, and a dropped label would give unconditioned images.
                ColSpec("long", "label", required=False),
            ]
        ),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, r, r, c))]),
        params=ParamSchema([ParamSpec("format", "string", "array")]),
    )


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

    generator = evaluated_generator(config, checkpoint, int(shape[0]))
    spec = generator_spec(config, shape, generator.num_classes)
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "generator.pt"
        torch.save(generator.state_dict(), weights)
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="generator",
                python_model=str(PYFUNC_FILE),
                artifacts={"weights": str(weights), "spec": str(spec_path)},
                code_paths=[str(Path(gan.__file__).parent)],
                signature=model_signature(spec),
                input_example=pd.DataFrame({"seed": [0, 1, 2, 3]}),
                pip_requirements=[
                    f"torch=={torch.__version__.split('+')[0]}",
                    f"mlflow=={mlflow.__version__}",
                    f"numpy=={np.__version__}",
                    f"pandas=={pd.__version__}",
                    f"pillow=={PIL.__version__}",
                ],
                registered_model_name=model_name,
            )
    return str(info.registered_model_version)


@dataclass(frozen=True)
class AliasDecision:
    alias: str  # CHAMPION when the version took it, else CHALLENGER
    previous_champion: str | None  # the champion's version before this decision
    reason: str  # one sentence for the log


def _champion(client: Any, name: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # the alias is not set
        return None


def apply_alias_policy(
    client: Any, name: str, version: str, distance: float, data_digest: str, protocol: str
) -> AliasDecision:
    """Record how ``version`` was evaluated, make it challenger, and champion if it wins."""
    for key, value in {
        DISTANCE_TAG: repr(distance),
        DATA_DIGEST_TAG: data_digest,
        EVAL_PROTOCOL_TAG: protocol,
    }.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version)

    champion = _champion(client, name)
    if champion is None:
        decision = AliasDecision(CHAMPION, None, "there was no champion")
    else:
        tags, old = champion.tags, str(champion.version)
        theirs = tags.get(DISTANCE_TAG)
        if tags.get(DATA_DIGEST_TAG) != data_digest:
            reason = (
                f"champion v{old} was evaluated on other data (digest "
                f"{str(tags.get(DATA_DIGEST_TAG))[:12]} vs {data_digest[:12]}); distances are not "
                "comparable, "
                f"promote by hand with: ganpipe promote {name} {version}"
            )
            decision = AliasDecision(CHALLENGER, old, reason)
        elif tags.get(EVAL_PROTOCOL_TAG) != protocol or theirs is None:
            reason = (
                f"champion v{old} was evaluated differently ({tags.get(EVAL_PROTOCOL_TAG)} vs "
                f"{protocol}); distances are not comparable, promote by hand with: "
                f"ganpipe promote {name} {version}"
            )
            decision = AliasDecision(CHALLENGER, old, reason)
        elif distance < float(theirs):
            decision = AliasDecision(
                CHAMPION,
                old,
                f"distance {distance:.4g} beats champion v{old}'s {float(theirs):.4g}",
            )
        else:
            decision = AliasDecision(
                CHALLENGER,
                old,
                f"distance {distance:.4g} does not beat champion v{old}'s {float(theirs):.4g}",
            )
    if decision.alias == CHAMPION:
        client.set_registered_model_alias(name, CHAMPION, version)
    return decision


def promote(client: Any, name: str, version: str) -> str | None:
    """Make ``version`` the champion by hand; return the previous champion's version (or None).

    Raises RegistryError naming the registered models or versions that do exist.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models())
        raise RegistryError(
            f"no registered model {name!r}; registered: {', '.join(names) or 'none'}"
        ) from None
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        found = client.search_model_versions(f"name='{name}'")
        versions = ", ".join(sorted((str(v.version) for v in found), key=int)) or "none"
        raise RegistryError(
            f"model {name!r} has no version {version!r}; versions: {versions}"
        ) from None
    previous = _champion(client, name)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    was = f"v{previous.version}" if previous is not None else "none"
    client.set_model_version_tag(name, str(version), PROMOTED_TAG, f"{when} by hand (was {was})")
    return str(previous.version) if previous is not None else None
