"""Runs a DAG on Ray: ready steps run at once as Ray tasks, finished work is never redone.

- Cache: a step whose fingerprint already finished (an MLflow step run with that fingerprint,
  and its content-addressed output folder holding the completion marker) is not run again; its
  outputs are reused and its step run says ``cached``.
- Atomic outputs: a step writes into ``<workdir>/outputs/<step>/<fingerprint>``; the runner
  writes the completion marker there last, so a half-written output is never taken as finished.
  An unfinished folder is handed to the next attempt as it is: training resumes from the Ray
  Train checkpoints inside it.
- Parallel: every step whose inputs are ready is submitted at once, with its own resources.
- Retries: a step declares how often and on which exceptions it is run again.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import Config, config_from_dict
from pipelines.dag import Dag, Step, StepContext
from pipelines.storage import write_json_atomic
from pipelines.tracking import (
    RunLogger,
    find_finished_step_runs,
    git_commit,
    reopen_run,
    start_pipeline_run,
    start_step_run,
)

DONE_MARKER = "_ganpipe_done.json"


class StepFailed(RuntimeError):
    """A step raised; carries the step name, the cause's message and whether a retry may help."""

    def __init__(self, step: str, message: str, retryable: bool = False) -> None:
        super().__init__(step, message, retryable)  # all args, so that the exception pickles
        self.step = step
        self.message = message
        self.retryable = retryable

    def __str__(self) -> str:
        return f"step {self.step!r} failed: {self.message}"


@dataclass
class StepOutcome:
    status: str  # "ran", "cached", "failed", "killed"
    run_id: str
    outputs: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0
    ended: float = 0.0
    attempts: int = 0

    @property
    def duration(self) -> float:
        return self.ended - self.started


@dataclass
class PipelineResult:
    run_id: str
    steps: dict[str, StepOutcome] = field(default_factory=dict)

    @property
    def outputs(self) -> dict[str, dict[str, Any]]:
        return {name: s.outputs for name, s in self.steps.items()}

    @property
    def durations(self) -> dict[str, float]:
        return {name: s.duration for name, s in self.steps.items()}


def init_ray(num_cpus: int | None = None) -> None:
    """Start (or join, with RAY_ADDRESS) a local Ray instance unless one is connected.

    The embedded instance advertises one CPU more than the machine has: training workers take
    every core, and a light step (the feature classifier) still gets a slot beside them.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS")
    if num_cpus is None and not address:
        num_cpus = (os.cpu_count() or 1) + 1
    ray.init(
        address=address,
        num_cpus=None if address else num_cpus,
        include_dashboard=True,
        configure_logging=True,
        logging_level="WARNING",
    )


def output_dir(config: Config, step: str, fingerprint: str) -> Path:
    return Path(config.workdir).resolve() / "outputs" / step / fingerprint[:20]


def _finished_outputs(directory: Path, fingerprint: str) -> dict[str, Any] | None:
    marker = directory / DONE_MARKER
    if not marker.is_file():
        return None
    record = json.loads(marker.read_text())
    return record["outputs"] if record.get("fingerprint") == fingerprint else None


def _execute(
    step: Step,
    config_dict: dict,
    logger: RunLogger,
    directory: str,
    run_id: str,
    attempt: int,
    inputs: dict[str, Any],
) -> dict[str, Any]:
    """Runs inside the step's Ray task."""
    config = config_from_dict(config_dict)
    ctx = StepContext(step.name, config, logger, Path(directory), run_id, attempt)
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    try:
        outputs = step.fn(ctx, **inputs)
        logger.flush()  # metrics this process buffered while the tracking server was away
    except Exception as exc:
        # The traceback goes to MLflow; a plain, picklable exception travels back to the driver.
        logger.log_dict({"traceback": traceback.format_exc()}, f"error-attempt{attempt}.json")
        retryable = bool(step.retry_on) and isinstance(exc, step.retry_on)
        raise StepFailed(step.name, f"{type(exc).__name__}: {exc}", retryable) from None
    missing = set(step.outputs) - set(outputs)
    if missing:
        raise StepFailed(step.name, f"did not produce outputs {sorted(missing)}")
    return outputs


def _cause(step: str, exc: BaseException) -> StepFailed:
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, StepFailed):
        return exc.cause
    if isinstance(exc, ray.exceptions.WorkerCrashedError | ray.exceptions.RayActorError):
        return StepFailed(step, f"its process died ({type(exc).__name__})", retryable=True)
    return StepFailed(step, f"{type(exc).__name__}: {exc}")


def run_pipeline(
    dag: Dag,
    config: Config,
    *,
    run_name: str | None = None,
    resume_run_id: str | None = None,
    force: tuple[str, ...] = (),
    use_cache: bool = True,
) -> PipelineResult:
    """Run ``dag`` on Ray under one MLflow parent run (a new one, or ``resume_run_id``'s).

    ``force`` names steps to run again even when cached, with everything downstream of them;
    ``use_cache=False`` runs every step.
    """
    import ray

    for name in force:
        dag.step(name)  # raises KeyError naming the steps
    init_ray()
    if resume_run_id:
        parent = reopen_run(config, resume_run_id)
    else:
        parent = start_pipeline_run(config, run_name=run_name)
        parent.set_tags({"ganpipe.git_commit": git_commit()})
        parent.log_text(f"```mermaid\n{dag.mermaid()}\n```\n", "dag.md")
    print(f"pipeline run {parent.run_id}", flush=True)

    fingerprints = dag.fingerprints(config)
    rerun = dag.downstream(set(force))
    result = PipelineResult(run_id=parent.run_id)
    execute = ray.remote(_execute)
    # Ray Train's placement-group cleaner (in a step's descendants) finds its cluster through the
    # State API, which gives up when a machine runs two Ray instances unless RAY_ADDRESS names
    # one; a leaked placement group then starves every later worker group.
    gcs_address = os.environ.get("RAY_ADDRESS") or ray.get_runtime_context().gcs_address
    step_environment = {"env_vars": {"RAY_ADDRESS": gcs_address}}
    running: dict[Any, tuple[Step, RunLogger, int, float]] = {}

    def record(name: str, outcome: StepOutcome) -> None:
        result.steps[name] = outcome
        parent.set_tags({f"ganpipe.step.{name}": outcome.status})

    def submit(step: Step, attempt: int, logger: RunLogger | None = None) -> None:
        fp = fingerprints[step.name]
        inputs = {}
        for arg, ref in step.inputs.items():
            source, output = ref.split(".", 1)
            inputs[arg] = result.steps[source].outputs[output]
        if logger is None:
            logger = start_step_run(parent, step.name, fp, step.params(config))
            logger.set_tags({"ganpipe.cache": "miss", "ganpipe.inputs": json.dumps(inputs)})
        suffix = f" (attempt {attempt})" if attempt > 1 else ""
        print(f"[{step.name}] started{suffix}", flush=True)
        ref = execute.options(
            num_cpus=step.num_cpus, num_gpus=step.num_gpus, max_retries=0, name=step.name,
            runtime_env=step_environment,
        ).remote(
            step, config.to_dict(), logger, str(output_dir(config, step.name, fp)),
            parent.run_id, attempt, inputs,
        )  # fmt: skip
        running[ref] = (step, logger, attempt, time.time())

    def reuse(step: Step) -> bool:
        fp = fingerprints[step.name]
        if not use_cache or step.name in rerun:
            return False
        outputs = _finished_outputs(output_dir(config, step.name, fp), fp)
        previous = find_finished_step_runs(parent, step.name, fp) if outputs is not None else []
        if not previous:
            return False
        now = time.time()
        logger = start_step_run(parent, step.name, fp, step.params(config))
        logger.set_tags({"ganpipe.cache": "hit", "ganpipe.cached_from": previous[0]})
        logger.log_dict(outputs, "outputs.json")
        logger.finish("FINISHED")
        record(step.name, StepOutcome("cached", logger.run_id, outputs, now, now))
        print(f"[{step.name}] cached (from run {previous[0]})", flush=True)
        return True

    def finish(step: Step, logger: RunLogger, attempt: int, started: float, outputs: dict) -> None:
        fp = fingerprints[step.name]
        directory = output_dir(config, step.name, fp)
        write_json_atomic(  # last: its presence means the outputs are complete
            directory / DONE_MARKER,
            {"step": step.name, "fingerprint": fp, "outputs": outputs, "run_id": logger.run_id},
        )
        outcome = StepOutcome("ran", logger.run_id, outputs, started, time.time(), attempt)
        record(step.name, outcome)
        logger.log_metrics({"duration_s": outcome.duration})
        logger.set_tags({"ganpipe.attempts": attempt, "ganpipe.output_dir": str(directory)})
        if attempt > 1:
            logger.set_tags({"ganpipe.retried": "true"})
        logger.log_dict(outputs, "outputs.json")
        logger.finish("FINISHED")
        print(f"[{step.name}] finished in {outcome.duration:.1f}s", flush=True)

    def stop_all(failed: StepFailed) -> None:
        for ref, (other, other_logger, _, started) in running.items():
            ray.cancel(ref, force=True)
            other_logger.finish("KILLED")
            record(other.name, StepOutcome("killed", other_logger.run_id, {}, started))
        running.clear()
        parent.set_tags({"ganpipe.failed_step": failed.step})
        parent.finish("FAILED")

    try:
        started_steps: set[str] = set()
        while True:
            for step in dag.order():  # in order, so a cached step's successors start in this pass
                done = {n for n, s in result.steps.items() if s.status in ("ran", "cached")}
                if step.name in started_steps or not step.upstream() <= done:
                    continue
                started_steps.add(step.name)
                if not reuse(step):
                    submit(step, attempt=1)
            if not running:
                break
            [ref], _ = ray.wait(list(running), num_returns=1)
            step, logger, attempt, started = running.pop(ref)
            try:
                outputs = ray.get(ref)
            except Exception as exc:
                failure = _cause(step.name, exc)
                if failure.retryable and attempt <= step.retries:
                    print(f"[{step.name}] {failure.message}; retrying", flush=True)
                    logger.set_tags({"ganpipe.last_error": failure.message[:4000]})
                    submit(step, attempt + 1, logger)
                    continue
                logger.set_tags({"ganpipe.attempts": attempt})
                logger.finish("FAILED")
                record(step.name, StepOutcome("failed", logger.run_id, {}, started))
                stop_all(failure)
                raise failure from None
            finish(step, logger, attempt, started, outputs)
    except StepFailed:
        raise
    except BaseException as exc:  # Ctrl-C, or the tracking store or Ray failing under us
        try:
            stop_all(StepFailed("driver", f"{type(exc).__name__}: {exc}"))
        except Exception as cleanup_error:  # the store may be what failed: keep the first error
            print(f"could not record the stop in MLflow: {cleanup_error}", file=sys.stderr)
        raise
    parent.log_metrics({f"duration_s.{k}": v for k, v in result.durations.items()})
    parent.finish("FINISHED")
    return result
