"""register: the generator as a pyfunc model version, with champion/challenger alias."""

from __future__ import annotations

import math
from typing import Any

from mlflow.tracking import MlflowClient

from pipelines.dag import StepContext
from pipelines.registry import (
    SAMPLING_MODE_TAG,
    apply_alias_policy,
    eval_protocol,
    log_generator,
    sampling_mode,
)
from pipelines.storage import localize
from pipelines.tracking import git_commit


def register(
    ctx: StepContext, checkpoint: str, shape: list[int], metrics: dict[str, Any], digest: str
) -> dict[str, Any]:
    distance = float(metrics["frechet_distance"])
    if not math.isfinite(distance):
        raise ValueError(f"evaluation distance is {distance}; a broken generator is not registered")
    name = ctx.config.register.model_name
    version = log_generator(
        run_id=ctx.logger.run_id,
        tracking_uri=ctx.logger.tracking_uri,
        config=ctx.config,
        checkpoint=str(localize(checkpoint, ctx.config)),
        shape=shape,
        model_name=name,
    )
    client = MlflowClient(tracking_uri=ctx.logger.tracking_uri)
    for key, value in {
        "ganpipe.pipeline_run": ctx.pipeline_run_id,
        "ganpipe.register_run": ctx.logger.run_id,
        "ganpipe.git_commit": git_commit(),
        SAMPLING_MODE_TAG: sampling_mode(ctx.config),
        **{f"metric.{k}": v for k, v in metrics.items()},
    }.items():
        client.set_model_version_tag(name, version, key, str(value))
    decision = apply_alias_policy(
        client, name, version, distance, digest, eval_protocol(ctx.config)
    )
    ctx.log(f"registered {name} version {version} as {decision.alias}: {decision.reason}")
    return {
        "model_name": name,
        "version": version,
        "alias": decision.alias,
        "model_uri": f"models:/{name}@{decision.alias}",
    }
