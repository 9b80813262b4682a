"""MLflow bookkeeping: one parent run per pipeline run, one nested run per step.

Every write goes through an ``MlflowClient`` bound to an explicit run id (no global active run).
Few processes write, and rarely: the driver between steps and the steps running at that moment
(training writes once per report, not once per step). SQLite serialises such writers; many
concurrent writers (a PBT population) need a tracking server in front of a database instead.

A tracking server can go away (a restart, a deploy, a network blip). Metrics logged meanwhile
are kept in memory and delivered when it answers again, so training never stops for it; other
writes wait for it. Either gives up, with one clear error, once the server has been unreachable
for longer than the retry window (``GANPIPE_TRACKING_RETRY_S``, default 300 s).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import re
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipelines.config import Config

PARENT_TAG = "mlflow.parentRunId"
STEP_TAG = "ganpipe.step"
FINGERPRINT_TAG = "ganpipe.fingerprint"
PIPELINE_TAG = "ganpipe.pipeline_run"
KIND_TAG = "ganpipe.kind"  # "pipeline" on parent runs
ENV_TAG_PREFIX = "ganpipe.env."  # the software a pipeline run ran on, one tag per component
ENV_PACKAGES = ("torch", "ray", "mlflow", "numpy", "pyarrow")

# MLflow's store keeps a dataset digest in 36 characters; a sha256 has 64 hex digits.
MAX_DATASET_DIGEST = 36
SPLIT_CONTEXTS = {"train": "training", "holdout": "evaluation"}  # manifest split -> MLflow's

# System metrics (CPU, memory, disk, network, GPU) every few seconds: fine enough to see a stall
# or a full memory, sparse enough to cost nothing beside training (bench/tracking_overhead.py).
# MLflow's MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it.
SYSTEM_METRICS_INTERVAL_S = 5.0
MONITOR_THREAD = "SystemMetricsMonitor"
# psutil's CPU figure counts clock ticks (10 ms each): over a few milliseconds it reads 0 % or
# 100 % whatever the load, so the last, partial interval is sampled only when at least this long.
MIN_FINAL_INTERVAL_S = 0.1

RETRY_WINDOW_ENV = "GANPIPE_TRACKING_RETRY_S"
BUFFER_LIMIT_ENV = "GANPIPE_TRACKING_BUFFER"
DEFAULT_RETRY_WINDOW_S = 300.0
DEFAULT_BUFFER_LIMIT = 100_000  # metric values held per run while the server is away
MAX_METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit
MAX_RETRY_DELAY_S = 15.0

# MLflow's HTTP client retries a refused request 7 times with a backoff of up to minutes, and
# waits 120 s for an answer: one metric call during an outage would stall training for minutes.
# We retry ourselves (and buffer meanwhile), so a failed call should cost seconds. Values the
# user set in the environment are kept.
FAST_FAIL_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}

T = TypeVar("T")


class TrackingUnavailable(RuntimeError):
    """The tracking server stayed unreachable past the retry window, or the buffer filled."""


def is_server_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the server could not be reached (connection refused or reset,
    timeout, 5xx after retries), as opposed to the server refusing the request."""
    import requests

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, requests.exceptions.RequestException | ConnectionError):
            return True
        current = current.__cause__ or current.__context__
    return False


def _reason(exc: BaseException) -> str:
    """The few words of a connection failure worth a log line ("Connection refused")."""
    text = str(exc)
    if match := re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text):
        return match.group(1).strip()
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:200]


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


_quiet_retries_installed = False


def _use_fast_failing_http_client() -> None:
    global _quiet_retries_installed
    for name, value in FAST_FAIL_HTTP_ENV.items():
        os.environ.setdefault(name, value)
    if not _quiet_retries_installed:
        # urllib3 warns on every retried request; during an outage our one line says it all.
        logging.getLogger("urllib3.connectionpool").addFilter(
            lambda record: not record.getMessage().startswith("Retrying")
        )
        _quiet_retries_installed = True


def client_for(config: Config) -> MlflowClient:
    uri = config.resolved_tracking_uri
    if _is_http(uri):
        _use_fast_failing_http_client()
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(config: Config) -> str:
    """The experiment's id, created on first use. Its artifacts go to ``storage.artifact_uri``
    (a path or s3://…), else under the workdir; with a tracking server and no
    ``storage.artifact_uri`` the server decides."""
    client = client_for(config)
    experiment = client.get_experiment_by_name(config.experiment)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(
        config.experiment, artifact_location=config.resolved_artifact_uri
    )


@dataclass
class _Outage:
    """One process's view of one tracking server being away, shared by all its RunLoggers so
    that the loss is reported once and the retries back off together."""

    since: float
    next_attempt: float
    delay: float = 1.0
    reported: bool = False


_outages: dict[str, _Outage] = {}
_outages_lock = threading.Lock()


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be > 0")
    return value


def _epoch_ms(at: float | None) -> int:
    """MLflow's timestamp (milliseconds since the epoch) of ``at`` in Unix seconds, or of now."""
    return int((time.time() if at is None else at) * 1000)


class RunLogger:
    """Writes to one MLflow run; safe to pickle into a Ray task (only its settings travel: each
    process keeps its own buffer and delivers it).

    ``log_metrics`` never raises because the server is away: the values wait in memory (at most
    ``buffer_limit``) and go out with the next call that reaches it. Other writes retry until the
    server answers. Both raise TrackingUnavailable once the server has been away for longer
    than ``retry_window_s``. ``flush`` (called by ``finish``) waits for the buffer to drain.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        experiment_id: str = "",
        retry_window_s: float | None = None,
        buffer_limit: int | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.retry_window_s = (
            _env_float(RETRY_WINDOW_ENV, DEFAULT_RETRY_WINDOW_S)
            if retry_window_s is None
            else retry_window_s
        )
        self.buffer_limit = (
            int(_env_float(BUFFER_LIMIT_ENV, DEFAULT_BUFFER_LIMIT))
            if buffer_limit is None
            else buffer_limit
        )
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        self._pending: list[Metric] = []
        self._pending_images: list[tuple[Any, str, int, int]] = []  # image, key, step, time
        self._lock = threading.RLock()
        self._client: MlflowClient | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The buffer stays with the process that logged it (it delivers it itself).
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_process_state()

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            if _is_http(self.tracking_uri):
                _use_fast_failing_http_client()
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def pending(self) -> int:
        """Metric values and images logged but not yet delivered."""
        return len(self._pending) + len(self._pending_images)

    # -- the outage bookkeeping ------------------------------------------------------------

    def _outage(self) -> _Outage | None:
        return _outages.get(self.tracking_uri)

    def _record_failure(self, exc: BaseException) -> _Outage:
        now = time.monotonic()
        with _outages_lock:
            outage = _outages.get(self.tracking_uri)
            if outage is None:
                outage = _outages[self.tracking_uri] = _Outage(since=now, next_attempt=now)
            outage.next_attempt = now + outage.delay
            outage.delay = min(outage.delay * 2, MAX_RETRY_DELAY_S)
            report = not outage.reported
            outage.reported = True
        if report:
            print(
                f"ganpipe: tracking server {self.tracking_uri} unreachable ({_reason(exc)}); "
                f"buffering metrics and retrying for up to {self.retry_window_s:g}s",
                file=sys.stderr,
                flush=True,
            )
        if now - outage.since > self.retry_window_s:
            raise TrackingUnavailable(
                f"tracking server {self.tracking_uri} unreachable for {now - outage.since:.0f}s, "
                f"longer than the retry window of {self.retry_window_s:g}s "
                f"({RETRY_WINDOW_ENV}); {len(self._pending)} metric values of run "
                f"{self.run_id} were not delivered. Start the server again (ganpipe server) and "
                "rerun the same command to resume."
            ) from exc
        return outage

    def _record_success(self) -> None:
        with _outages_lock:
            outage = _outages.pop(self.tracking_uri, None)
        if outage is not None and outage.reported:
            print(
                f"ganpipe: tracking server {self.tracking_uri} reachable again after "
                f"{time.monotonic() - outage.since:.0f}s; sending what was buffered",
                file=sys.stderr,
                flush=True,
            )

    def _call(self, write: Callable[[], T]) -> T:
        """Run ``write``, waiting out an outage of the server (up to the retry window)."""
        while True:
            outage = self._outage()
            if outage is not None:
                time.sleep(max(0.0, outage.next_attempt - time.monotonic()))
            try:
                result = write()
            except Exception as exc:
                if not is_server_unreachable(exc):
                    raise
                self._record_failure(exc)
                continue
            self._record_success()
            return result

    def _deliver(self, wait: bool) -> None:
        """Send the buffered metrics; with ``wait``, until none is left (or the window ends)."""
        self._drain(
            self._pending,
            MAX_METRICS_PER_REQUEST,
            lambda batch: self.client.log_batch(self.run_id, metrics=batch),
            wait,
        )

    def _deliver_images(self, wait: bool) -> None:
        def send(batch: list[tuple[Any, str, int, int]]) -> None:
            image, key, step, timestamp = batch[0]
            self.client.log_image(
                self.run_id, image, key=key, step=step, timestamp=timestamp, synchronous=True
            )

        self._drain(self._pending_images, 1, send, wait)

    def _drain(
        self, queue: list[Any], size: int, send: Callable[[list[Any]], None], wait: bool
    ) -> None:
        """Send ``queue`` oldest first, ``size`` entries per request, while the server answers;
        with ``wait``, until it is empty (or the retry window ends). Sent entries leave it."""
        with self._lock:
            while queue:
                outage = self._outage()
                if outage is not None and time.monotonic() < outage.next_attempt:
                    if not wait:
                        return
                    time.sleep(outage.next_attempt - time.monotonic())
                batch = queue[:size]
                try:
                    send(batch)
                except Exception as exc:
                    if not is_server_unreachable(exc):
                        # The server refused these entries: retrying would fail every later call.
                        del queue[: len(batch)]
                        raise
                    self._record_failure(exc)
                    if not wait:
                        return
                    continue
                del queue[: len(batch)]
                self._record_success()

    # -- writes ----------------------------------------------------------------------------

    def log_metrics(
        self, metrics: dict[str, float], step: int | None = None, at: float | None = None
    ) -> None:
        """Log ``metrics`` at ``step``, timestamped ``at`` (Unix seconds; default now), the time
        kept however late the values are delivered."""
        when = _epoch_ms(at)
        entries = [Metric(k, float(v), when, step or 0) for k, v in metrics.items()]
        with self._lock:
            if len(self._pending) + len(entries) > self.buffer_limit:
                outage = self._outage()
                away = f" for {time.monotonic() - outage.since:.0f}s" if outage else ""
                raise TrackingUnavailable(
                    f"tracking server {self.tracking_uri} unreachable{away} and "
                    f"{len(self._pending)} metric values of run {self.run_id} are waiting "
                    f"(the limit, {BUFFER_LIMIT_ENV}); log less often or raise the limit"
                )
            self._pending.extend(entries)
            self._deliver(wait=False)
            self._deliver_images(wait=False)  # images held back by an outage go out too

    def log_image(self, image: Any, key: str, step: int, at: float | None = None) -> None:
        """Log ``image`` (PIL or array) as image ``key`` of ``step`` (the UI's image slider),
        timestamped ``at`` (Unix seconds; default now). Like metrics it waits in memory while
        the server is away, so that a training report never waits for the server; ``flush``
        delivers it."""
        when = _epoch_ms(at)
        with self._lock:
            self._pending_images.append((image, key, step, when))
            self._deliver_images(wait=False)

    def flush(self) -> None:
        """Deliver every buffered metric and image, waiting for the server up to the retry
        window."""
        self._deliver(wait=True)
        self._deliver_images(wait=True)

    def log_params(self, params: dict[str, Any]) -> None:
        entries = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(entries), 100):
            chunk = entries[i : i + 100]
            self._call(lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk))

    def set_tags(self, tags: dict[str, Any]) -> None:
        entries = [RunTag(k, str(v)) for k, v in tags.items()]
        self._call(lambda: self.client.log_batch(self.run_id, tags=entries))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_text(self, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(text)
            self.log_artifact(path)

    def log_dict(self, payload: Any, name: str) -> None:
        self.log_text(json.dumps(payload, indent=2, sort_keys=True, default=str), name)

    def log_datasets(self, datasets: Sequence[tuple[Dataset, str]]) -> None:
        """Record ``(dataset, context)`` pairs as the run's dataset inputs (the UI's "Datasets
        used"); the context is MLflow's ``mlflow.data.context`` tag: training, evaluation …"""
        entries = [
            DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])
            for dataset, context in datasets
        ]
        self._call(lambda: self.client.log_inputs(self.run_id, datasets=entries))

    @contextmanager
    def system_metrics(
        self, interval_s: float = SYSTEM_METRICS_INTERVAL_S, resume: bool = False
    ) -> Iterator[None]:
        """Log this machine's CPU, memory, disk, network (and GPU, with NVML) figures as
        ``system/…`` metrics of the run every ``interval_s`` seconds while the block runs, and
        once more when it ends, however it ends. ``resume`` continues the sample numbering of
        an earlier attempt of the same run instead of starting again at 0."""
        monitor = _SystemMetrics(self, interval_s, resume)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        self._call(lambda: self.client.set_terminated(self.run_id, status=status))


class _SystemMetrics(SystemMetricsMonitor):
    """MLflow's system-metrics monitor (same collectors, same ``system/…`` names) bound to a
    RunLogger instead of the global active run.

    MLflow's own loop asks the server for the run's status every interval and stops for good
    at the first failed call, logs through a client of its own, and drops the samples of the
    last, partial interval. Here the values go through the RunLogger, so they wait out a
    tracking-server outage with the training metrics; the thread stops when told to and logs
    what it sampled until then, so even a short step gets a point. A last interval shorter than
    ``MIN_FINAL_INTERVAL_S`` after an earlier sample is left out: its CPU figure would be noise.
    """

    def __init__(self, logger: RunLogger, interval_s: float, resume: bool) -> None:
        # MLflow says at INFO, in every train step, that a machine without a GPU has no GPU
        # metrics; the run's metric names say which were collected.
        mlflow_logger = logging.getLogger(SystemMetricsMonitor.__module__)
        level = mlflow_logger.level
        mlflow_logger.setLevel(logging.WARNING)
        try:
            super().__init__(
                logger.run_id,
                sampling_interval=interval_s,
                resume_logging=resume,
                tracking_uri=logger.tracking_uri,
            )
        finally:
            mlflow_logger.setLevel(level)
        self.logger = logger
        self.failure: BaseException | None = None

    def start(self) -> None:
        self._process = threading.Thread(target=self.monitor, daemon=True, name=MONITOR_THREAD)
        self._process.start()

    def monitor(self) -> None:
        import psutil

        # psutil's first cpu_percent() has nothing to compare with and says 0.0; this call
        # starts the interval the first sample covers.
        psutil.cpu_percent()
        samples = 0
        sampled_at: float | None = None
        try:
            while True:
                stopping = self._shutdown_event.wait(self.sampling_interval)
                too_short = (
                    sampled_at is not None and time.monotonic() - sampled_at < MIN_FINAL_INTERVAL_S
                )
                if stopping and too_short:
                    if samples:
                        self.publish_metrics(self.aggregate_metrics())
                    return
                self.collect_metrics()
                sampled_at = time.monotonic()
                samples += 1
                if stopping or samples >= self.samples_before_logging:
                    self.publish_metrics(self.aggregate_metrics())
                    samples = 0
                if stopping:
                    return
        except Exception as exc:  # training goes on without system metrics; finish() says why
            self.failure = exc

    def publish_metrics(self, metrics: dict[str, float]) -> None:
        prefix = self._metrics_prefix + (f"{self.node_id}/" if self.node_id else "")
        self.logger.log_metrics({prefix + k: v for k, v in metrics.items()}, self._logging_step)
        self._logging_step += 1
        for monitor in self.monitors:
            monitor.clear_metrics()

    def finish(self) -> None:
        if self._process is None:
            return
        self._shutdown_event.set()
        self._process.join()
        self._process = None
        if self.failure is not None:
            print(
                f"ganpipe: system metrics of run {self.logger.run_id} stopped early: "
                f"{type(self.failure).__name__}: {self.failure}",
                file=sys.stderr,
                flush=True,
            )


class SplitDataset(MetaDataset):
    """A prepared split as an MLflow dataset: metadata only, the shards stay where they are.
    MetaDataset carries no profile; this one says what the split holds."""

    def __init__(
        self,
        source: DatasetSource,
        name: str,
        digest: str,
        schema: Schema,
        profile: dict[str, Any],
    ) -> None:
        self._profile = profile
        super().__init__(source, name=name, digest=digest, schema=schema)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile, sort_keys=True)}


def split_dataset(directory: str | Path, manifest: dict[str, Any], split: str) -> SplitDataset:
    """One split of a prepared dataset. Source: the prepared folder's URI; digest: the split's
    content digest from the manifest (its first 36 hex digits, MLflow's limit; the whole sha256
    is in the profile); schema: the image and label tensors; profile: counts, classes, shards
    and the configured data.source."""
    entry = manifest["splits"][split]
    uri = str(directory) if "://" in str(directory) else Path(directory).resolve().as_uri()
    with warnings.catch_warnings():
        # file:// matches MLflow's "" and "file" schemes, both local: it warns that it chose.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(uri)
    origin = str(manifest["source"])
    schema = Schema(
        [
            TensorSpec(np.dtype(np.uint8), (-1, *manifest["shape"]), "image"),
            TensorSpec(np.dtype(np.int64), (-1,), "label"),
        ]
    )
    profile = {
        "split": split,
        "rows": entry["count"],
        "num_classes": manifest["num_classes"],
        "class_histogram": entry["class_histogram"],
        "shards": [f["file"] for f in entry["files"]],
        "sha256": entry["digest"],
        "dataset_sha256": manifest["digest"],  # the ganpipe.data_digest tag of models and runs
        "data_source": origin,
        "data_source_format": manifest.get("source_format", ""),
    }
    name = f"{Path(origin.rstrip('/')).name or origin}-{split}"
    digest = entry["digest"][:MAX_DATASET_DIGEST]
    return SplitDataset(source, name=name, digest=digest, schema=schema, profile=profile)


def prepared_datasets(
    directory: str | Path, manifest: dict[str, Any]
) -> list[tuple[SplitDataset, str]]:
    """Both splits of a prepared dataset with their MLflow contexts: the training split as
    "training", the held-out split as "evaluation"."""
    return [(split_dataset(directory, manifest, s), c) for s, c in SPLIT_CONTEXTS.items()]


def environment_tags() -> dict[str, str]:
    """The software this process runs on, as ``ganpipe.env.*`` tags: Python, the platform, the
    versions of torch, ray, mlflow, numpy and pyarrow, and CUDA (available, version, devices).
    Tags rather than an artifact: the UI shows them on the run's page and compares them across
    runs, and ``search_runs`` filters on them (``tags.`ganpipe.env.torch` = '2.13.0+cpu'``)."""
    import torch

    tags = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ENV_PACKAGES:
        try:
            tags[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            tags[package] = "not installed"
    available = torch.cuda.is_available()
    tags["cuda_available"] = str(available).lower()
    tags["cuda"] = torch.version.cuda or "none"  # the CUDA the torch build targets
    if available:
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        tags["gpus"] = ", ".join(names)
    return {ENV_TAG_PREFIX + k: v for k, v in tags.items()}


def start_pipeline_run(config: Config, run_name: str | None = None) -> RunLogger:
    client = client_for(config)
    run = client.create_run(ensure_experiment(config), run_name=run_name)
    logger = RunLogger(config.resolved_tracking_uri, run.info.run_id, run.info.experiment_id)
    logger.log_params(config.flat())
    logger.set_tags({PIPELINE_TAG: run.info.run_id, KIND_TAG: "pipeline", **environment_tags()})
    return logger


def start_step_run(
    parent: RunLogger, step: str, fingerprint: str, params: dict[str, Any]
) -> RunLogger:
    """A run of ``step`` nested under the pipeline run ``parent``, in its experiment."""
    tags = {
        PARENT_TAG: parent.run_id,
        PIPELINE_TAG: parent.run_id,
        STEP_TAG: step,
        FINGERPRINT_TAG: fingerprint,
    }
    run = parent._call(
        lambda: parent.client.create_run(parent.experiment_id, run_name=step, tags=tags)
    )
    logger = RunLogger(
        parent.tracking_uri,
        run.info.run_id,
        parent.experiment_id,
        retry_window_s=parent.retry_window_s,
        buffer_limit=parent.buffer_limit,
    )
    if params:
        logger.log_params(params)
    return logger


def reopen_run(config: Config, run_id: str) -> RunLogger:
    """An earlier pipeline run, marked RUNNING again so that a resume continues it."""
    client = client_for(config)
    run = client.get_run(run_id)  # raises if there is no such run
    if run.data.tags.get(KIND_TAG) != "pipeline":
        raise ValueError(f"run {run_id} is not a ganpipe pipeline run")
    client.update_run(run_id, status="RUNNING")
    # Step runs the dead driver left RUNNING will never finish: say so.
    stale = client.search_runs(
        [run.info.experiment_id],
        f"tags.`{PARENT_TAG}` = '{run_id}' and attributes.status = 'RUNNING'",
    )
    for step_run in stale:
        client.set_terminated(step_run.info.run_id, status="KILLED")
    return RunLogger(config.resolved_tracking_uri, run_id, run.info.experiment_id)


def find_finished_step_runs(parent: RunLogger, step: str, fingerprint: str) -> list[str]:
    """Ids of FINISHED runs of ``step`` with ``fingerprint`` in the experiment of ``parent``,
    newest first (the cache index)."""
    runs = parent.client.search_runs(
        [parent.experiment_id],
        f"tags.`{STEP_TAG}` = '{step}' and tags.`{FINGERPRINT_TAG}` = '{fingerprint}' "
        "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=5,
    )
    return [r.info.run_id for r in runs]


def pipeline_runs(config: Config, max_results: int = 20) -> list[Any]:
    """The newest pipeline (parent) runs of the experiment."""
    client = client_for(config)
    experiment = client.get_experiment_by_name(config.experiment)
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.`{KIND_TAG}` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=max_results,
    )
    return list(runs)


def git_commit() -> str:
    """The commit of the checkout the code runs from (with ``-dirty``), or ``unknown``."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
