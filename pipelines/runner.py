"""Runs a DAG on Ray: ready steps run at once as Ray tasks, finished work is never redone.

- Cache: a step whose fingerprint already finished (an MLflow step run with that fingerprint,
  and its content-addressed output folder holding the completion marker) is not run again; its
  outputs are reused and its step run says ``cached``.
- Atomic outputs: a step writes into ``<workdir>/outputs/<step>/<fingerprint>``; the runner
  writes the completion marker there last, so a half-written output is never taken as finished.
  With a workdir on S3 the step writes into a local staging folder that its process uploads
  (objects, then their manifest) before the runner writes the marker.
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

from gan.nn.batchnorm_kernels import CACHE_ENV, KERNELS_ENV
from gan.nn.stats_exchange import EXCHANGE_ENV
from pipelines import storage
from pipelines.config import Config, config_from_dict
from pipelines.dag import Dag, Step, StepContext
from pipelines.faults import fault_variables
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


def embedded_cpus() -> int:
    """The CPUs the embedded Ray advertises: the machine's cores and one more (see init_ray)."""
    return (os.cpu_count() or 1) + 1


def check_local_resources(config: Config, cpus: int | None = None, gpus: int | None = None) -> None:
    """Refuse, before Ray starts, a training the embedded Ray could never place: Ray Train
    would wait for the missing CPUs or GPUs without end. (A cluster, RAY_ADDRESS, may grow:
    Ray Train says there what it waits for.)"""
    from pipelines.config import ConfigError

    t = config.train
    cpus = embedded_cpus() if cpus is None else cpus
    need = t.workers * t.threads_per_worker
    if need > cpus:
        raise ConfigError(
            f"train.workers ({t.workers}) x train.threads_per_worker ({t.threads_per_worker}) "
            f"needs {need} CPUs; this machine's Ray has {cpus} ({cpus - 1} cores + 1): lower "
            "train.workers or train.threads_per_worker, or run on a cluster (ganpipe submit)"
        )
    if t.use_gpu:
        if gpus is None:
            import torch

            gpus = torch.cuda.device_count()
        if t.workers > gpus:
            raise ConfigError(
                f"train.use_gpu=true with train.workers={t.workers} needs {t.workers} GPUs; this "
                f"machine has {gpus}: set train.workers={gpus} or train.use_gpu=false"
                if gpus
                else "train.use_gpu=true but this machine has no CUDA GPU: set "
                "train.use_gpu=false, or run on a cluster with GPUs (ganpipe submit)"
            )


# Ray Train V2's controller takes at most one report per worker per poll, every 2 s by default,
# and a worker blocks on its next report until the last one is taken: report windows shorter
# than the poll throttled training to one report per 2 s (1,580 images/s against 2,400 in the
# workers, docs/benchmarks.md). Set for the embedded Ray and every step's processes; a value in
# the environment wins.
RAY_TRAIN_ENVIRONMENT = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def ray_train_environment() -> dict[str, str]:
    """The Ray Train settings above, and the ganpipe switches set in this process (where sync
    batch norm's statistics and, on CPU, DDP's gradients are summed; which of its CPU paths
    runs; where its compiled passes are cached) for the workers to see them too."""
    settings = {name: os.environ.get(name, value) for name, value in RAY_TRAIN_ENVIRONMENT.items()}
    for name in (EXCHANGE_ENV, KERNELS_ENV, CACHE_ENV):
        if name in os.environ:
            settings[name] = os.environ[name]
    return settings


def init_ray(num_cpus: int | None = None) -> None:
    """Start (or join, with RAY_ADDRESS) a local Ray instance unless one is connected.

    The embedded instance advertises one CPU more than the machine has: training workers take
    every core, and a light step (the feature classifier) still gets a slot beside them.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.update(ray_train_environment())  # the embedded Ray's processes inherit it
    address = os.environ.get("RAY_ADDRESS")
    if num_cpus is None and not address:
        num_cpus = embedded_cpus()
    ray.init(
        address=address,
        num_cpus=None if address else num_cpus,
        include_dashboard=True,
        configure_logging=True,
        logging_level="WARNING",
    )


def output_dir(config: Config, step: str, fingerprint: str) -> Path:
    """The local folder a step writes into: its output folder, or with a workdir on S3 its
    staging folder (uploaded to ``output_uri`` when the step returns)."""
    staging = ("staging",) if storage.is_remote(config.workdir) else ()
    return config.resolved_local_dir.joinpath(*staging, "outputs", step, fingerprint[:20])


def output_uri(config: Config, step: str, fingerprint: str) -> str:
    """Where a step's outputs live: ``<workdir>/outputs/<step>/<fingerprint>``."""
    if storage.is_remote(config.workdir):
        return storage.join(config.workdir, "outputs", step, fingerprint[:20])
    return str(output_dir(config, step, fingerprint))


def _finished_outputs(config: Config, uri: str, fingerprint: str) -> dict[str, Any] | None:
    marker = storage.join(uri, DONE_MARKER)
    if not storage.exists(marker, config):
        return None
    if storage.is_remote(uri) and not storage.is_complete(uri, config):
        return None  # objects missing or cut short since: not an output to reuse
    record = storage.read_json(marker, config)
    return record["outputs"] if record.get("fingerprint") == fingerprint else None


def _publish(config: Config, ctx: StepContext, outputs: dict[str, Any]) -> dict[str, Any]:
    """Upload a step's staged folder to its S3 prefix; its outputs then name the objects."""
    storage.publish_dir(ctx.output_dir, ctx.output_uri, config)
    staged = str(ctx.output_dir)

    def moved(value: Any) -> Any:
        if isinstance(value, str) and (value == staged or value.startswith(staged + "/")):
            return ctx.output_uri + value[len(staged) :]
        return value

    return {name: moved(value) for name, value in outputs.items()}


def _execute(
    step: Step,
    config_dict: dict,
    logger: RunLogger,
    directory: str,
    uri: str,
    run_id: str,
    attempt: int,
    inputs: dict[str, Any],
) -> dict[str, Any]:
    """Runs inside the step's Ray task."""
    config = config_from_dict(config_dict)
    storage.configure_mlflow(config)
    ctx = StepContext(step.name, config, logger, Path(directory), run_id, attempt, uri)
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    try:
        outputs = step.fn(ctx, **inputs)
        if storage.is_remote(uri):
            outputs = _publish(config, ctx, outputs)
        logger.flush()  # metrics this process buffered while the tracking server was away
    except Exception as exc:
        # The traceback goes to MLflow; a plain, picklable exception travels back to the driver.
        text = storage.redact(traceback.format_exc())
        logger.log_dict({"traceback": text}, f"error-attempt{attempt}.json")
        retryable = bool(step.retry_on) and isinstance(exc, step.retry_on)
        message = storage.redact(f"{type(exc).__name__}: {exc}")
        raise StepFailed(step.name, message, retryable) from None
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
    # A missing bucket or refused credentials: one clear error now, not a failed step later.
    storage.check_storage(config)
    storage.configure_mlflow(config)
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
    # Test-only fault injection (pipelines/faults.py) reaches the steps' Ray Train workers.
    step_environment = {
        "env_vars": {"RAY_ADDRESS": gcs_address, **ray_train_environment(), **fault_variables()}
    }
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
            output_uri(config, step.name, fp), parent.run_id, attempt, inputs,
        )  # fmt: skip
        running[ref] = (step, logger, attempt, time.time())

    def reuse(step: Step) -> bool:
        fp = fingerprints[step.name]
        if not use_cache or step.name in rerun:
            return False
        outputs = _finished_outputs(config, output_uri(config, step.name, fp), fp)
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
        directory = output_uri(config, step.name, fp)
        storage.write_json(  # last: its presence means the outputs are complete
            storage.join(directory, DONE_MARKER),
            {"step": step.name, "fingerprint": fp, "outputs": outputs, "run_id": logger.run_id},
            config,
        )
        outcome = StepOutcome("ran", logger.run_id, outputs, started, time.time(), attempt)
        record(step.name, outcome)
        logger.log_metrics({"duration_s": outcome.duration})
        logger.set_tags({"ganpipe.attempts": attempt, "ganpipe.output_dir": directory})
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
