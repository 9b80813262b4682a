"""Runs a DAG on Ray: each step is a Ray task with its own resources, tracked as a nested run.

Steps run one after another in dependency order for now; caching, resume and parallel branches
key on the fingerprints recorded here.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import Config, config_from_dict
from pipelines.dag import Dag, StepContext, fingerprint
from pipelines.tracking import RunLogger, start_pipeline_run, start_step_run


class StepFailed(RuntimeError):
    """A step raised; carries the step name and the cause's one-line message across Ray."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(step, message)  # both args, so that the exception pickles
        self.step = step
        self.message = message

    def __str__(self) -> str:
        return f"step {self.step!r} failed: {self.message}"


@dataclass
class PipelineResult:
    run_id: str
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)


def init_ray(num_cpus: int | None = None) -> None:
    """Start (or join) a local Ray instance unless one is already connected."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        address=os.environ.get("RAY_ADDRESS"),
        num_cpus=num_cpus,
        include_dashboard=True,
        configure_logging=True,
        logging_level="WARNING",
    )


def _execute(
    dag: Dag,
    name: str,
    config_dict: dict,
    logger: RunLogger,
    output_dir: str,
    run_id: str,
    inputs: dict[str, Any],
) -> dict[str, Any]:
    """Runs inside the step's Ray task."""
    config = config_from_dict(config_dict)
    ctx = StepContext(name, config, logger, Path(output_dir), run_id)
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    try:
        outputs = dag.step(name).fn(ctx, **inputs)
    except Exception as exc:
        # A plain exception with the message travels back intact; the traceback goes to MLflow.
        logger.log_dict({"traceback": traceback.format_exc()}, "error.json")
        raise StepFailed(name, f"{type(exc).__name__}: {exc}") from None
    missing = set(dag.step(name).outputs) - set(outputs)
    if missing:
        raise StepFailed(name, f"did not produce outputs {sorted(missing)}")
    return outputs


def run_pipeline(dag: Dag, config: Config, *, run_name: str | None = None) -> PipelineResult:
    """Run every step of ``dag`` on Ray under one MLflow parent run."""
    import ray

    init_ray()
    parent = start_pipeline_run(config, run_name=run_name)
    parent.log_dict({"mermaid": dag.mermaid()}, "dag.json")
    result = PipelineResult(run_id=parent.run_id)
    fingerprints: dict[str, str] = {}
    print(f"pipeline run {parent.run_id}", flush=True)
    execute = ray.remote(_execute)
    try:
        for step in dag.order():
            inputs = {
                arg: result.outputs[ref.split(".", 1)[0]][ref.split(".", 1)[1]]
                for arg, ref in step.inputs.items()
            }
            fp = fingerprint(step, config, {s: fingerprints[s] for s in step.upstream()})
            fingerprints[step.name] = fp
            logger = start_step_run(config, parent, step.name, fp, step.params(config))
            output_dir = Path(config.workdir).resolve() / "outputs" / parent.run_id / step.name
            print(f"[{step.name}] started", flush=True)
            started = time.perf_counter()
            ref = execute.options(
                num_cpus=step.num_cpus, num_gpus=step.num_gpus, max_retries=0, name=step.name
            ).remote(
                dag, step.name, config.to_dict(), logger, str(output_dir), parent.run_id, inputs
            )
            try:
                outputs = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                logger.finish("FAILED")
                cause = exc.cause if isinstance(exc.cause, StepFailed) else None
                raise cause or StepFailed(step.name, str(exc)) from None
            except BaseException:
                logger.finish("KILLED")
                raise
            duration = time.perf_counter() - started
            result.outputs[step.name] = outputs
            result.durations[step.name] = duration
            logger.log_metrics({"duration_s": duration})
            logger.log_dict(outputs, "outputs.json")
            logger.finish("FINISHED")
            print(f"[{step.name}] finished in {duration:.1f}s", flush=True)
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.log_metrics({f"duration_s.{k}": v for k, v in result.durations.items()})
    parent.finish("FINISHED")
    return result
