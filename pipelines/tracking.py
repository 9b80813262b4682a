"""MLflow bookkeeping: one parent run per pipeline run, one nested run per step.

Every write goes through an ``MlflowClient`` bound to an explicit run id (no global active run).
Few processes write, and rarely: the driver between steps and the steps running at that moment
(training writes once per report, not once per step). SQLite serialises such writers; many
concurrent writers (a PBT population) need a tracking server in front of a database instead.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipelines.config import Config

PARENT_TAG = "mlflow.parentRunId"
STEP_TAG = "ganpipe.step"
FINGERPRINT_TAG = "ganpipe.fingerprint"
PIPELINE_TAG = "ganpipe.pipeline_run"
KIND_TAG = "ganpipe.kind"  # "pipeline" on parent runs


def client_for(config: Config) -> MlflowClient:
    return MlflowClient(tracking_uri=config.resolved_tracking_uri)


def ensure_experiment(config: Config) -> str:
    """The experiment's id, created on first use with its artifacts under the workdir."""
    client = client_for(config)
    experiment = client.get_experiment_by_name(config.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if not config.tracking_uri:
        location = (Path(config.workdir).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(config.experiment, artifact_location=location)


class RunLogger:
    """Writes to one MLflow run; safe to pickle into a Ray task (it holds only strings)."""

    def __init__(self, tracking_uri: str, run_id: str, experiment_id: str = "") -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.experiment_id = experiment_id

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        entries = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=entries)

    def log_params(self, params: dict[str, Any]) -> None:
        entries = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(entries), 100):
            self.client.log_batch(self.run_id, params=entries[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(text)
            self.client.log_artifact(self.run_id, str(path))

    def log_dict(self, payload: Any, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
            self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


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
    run = parent.client.create_run(
        parent.experiment_id,
        run_name=step,
        tags={
            PARENT_TAG: parent.run_id,
            PIPELINE_TAG: parent.run_id,
            STEP_TAG: step,
            FINGERPRINT_TAG: fingerprint,
        },
    )
    logger = RunLogger(parent.tracking_uri, run.info.run_id, parent.experiment_id)
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
