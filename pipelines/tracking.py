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

import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipelines.config import Config

PARENT_TAG = "mlflow.parentRunId"
STEP_TAG = "ganpipe.step"
FINGERPRINT_TAG = "ganpipe.fingerprint"
PIPELINE_TAG = "ganpipe.pipeline_run"
KIND_TAG = "ganpipe.kind"  # "pipeline" on parent runs

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
    """The experiment's id, created on first use; without a server its artifacts go under the
    workdir (a server decides where its artifacts go)."""
    client = client_for(config)
    experiment = client.get_experiment_by_name(config.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if not _is_http(config.resolved_tracking_uri):
        location = (Path(config.workdir).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(config.experiment, artifact_location=location)


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
        """Metric values logged but not yet delivered."""
        return len(self._pending)

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
        with self._lock:
            while self._pending:
                outage = self._outage()
                if outage is not None and time.monotonic() < outage.next_attempt:
                    if not wait:
                        return
                    time.sleep(outage.next_attempt - time.monotonic())
                batch = self._pending[:MAX_METRICS_PER_REQUEST]
                try:
                    self.client.log_batch(self.run_id, metrics=batch)
                except Exception as exc:
                    if not is_server_unreachable(exc):
                        # The server refused these values: retrying would fail every later call.
                        del self._pending[: len(batch)]
                        raise
                    self._record_failure(exc)
                    if not wait:
                        return
                    continue
                del self._pending[: len(batch)]
                self._record_success()

    # -- writes ----------------------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)  # the time of logging, kept however late it is delivered
        entries = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
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

    def flush(self) -> None:
        """Deliver every buffered metric, waiting for the server up to the retry window."""
        self._deliver(wait=True)

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

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        self._call(lambda: self.client.set_terminated(self.run_id, status=status))


def start_pipeline_run(config: Config, run_name: str | None = None) -> RunLogger:
    client = client_for(config)
    run = client.create_run(ensure_experiment(config), run_name=run_name)
    logger = RunLogger(config.resolved_tracking_uri, run.info.run_id, run.info.experiment_id)
    logger.log_params(config.flat())
    logger.set_tags({PIPELINE_TAG: run.info.run_id, KIND_TAG: "pipeline"})
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
