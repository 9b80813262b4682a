"""The pipeline against a real ``mlflow server`` on PostgreSQL: a whole run, concurrent writers,
and a server that dies and comes back while metrics are being logged."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.config import load_config
from pipelines.runner import run_pipeline
from pipelines.server import wait_until_ready
from pipelines.steps.default_dag import default_dag

from .mlflow_server import (
    free_port,
    postgres_reachable,
    start_mlflow_server,
    stop_mlflow_server,
)

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
STEPS = ["prepare", "validate", "fit_features", "train", "evaluate", "register"]

# One writer process: logs POINTS values of "loss" and "lr" to RUN_ID, one call per step, one
# every INTERVAL seconds, and a sample image every IMAGE_EVERY steps as the train step does, then
# finishes the run (which flushes what is still buffered).
IMAGE_EVERY = 25  # as in WRITER
OUTAGE_S = 30  # how long the killed server stays away (issue #8: half a minute)
WRITER = """
import sys, time
import numpy as np
from pipelines.tracking import RunLogger
uri, run_id, points, interval = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
logger = RunLogger(uri, run_id)
for step in range(points):
    logger.log_metrics({"loss": 1000 + step, "lr": step / 1000}, step=step)
    if step % 25 == 0:  # IMAGE_EVERY
        logger.log_image(np.full((4, 4, 3), step % 256, np.uint8), key="samples", step=step)
    time.sleep(interval)
logger.finish()
print("pending after finish:", logger.pending)
"""


def _writer(uri: str, run_id: str, points: int, interval: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, uri, run_id, str(points), str(interval)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def _new_run(client: MlflowClient, experiment: str) -> str:
    experiment_id = client.create_experiment(experiment)
    return client.create_run(experiment_id).info.run_id


def _assert_every_point_arrived(client: MlflowClient, run_id: str, points: int) -> list:
    history = client.get_metric_history(run_id, "loss")
    by_step = {m.step: m.value for m in history}
    missing = sorted(set(range(points)) - set(by_step))
    assert not missing, f"{len(missing)} of {points} points missing, e.g. steps {missing[:10]}"
    assert all(by_step[s] == 1000 + s for s in range(points))
    assert len(client.get_metric_history(run_id, "lr")) == points
    return history


def test_smoke_pipeline_logs_everything_through_the_server(ray_session, mlflow_server, tmp_path):
    workdir = tmp_path / "w"
    config = load_config(
        "smoke",
        [f"workdir={workdir}", f"tracking_uri={mlflow_server}", "register.model_name=server-model"],
    )
    result = run_pipeline(default_dag(), config)

    client = MlflowClient(mlflow_server)
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.workers"] == "2"
    assert parent.data.params["tracking_uri"] == mlflow_server
    experiment = client.get_experiment(parent.info.experiment_id)
    # Artifacts go through the server (no client writes to a path of its own).
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    dag_md = client.download_artifacts(result.run_id, "dag.md", str(tmp_path))
    assert "train --> evaluate" in Path(dag_md).read_text()

    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{result.run_id}'"
    )
    by_step = {r.data.tags["ganpipe.step"]: r for r in children}
    assert sorted(by_step) == sorted(STEPS)
    assert all(r.info.status == "FINISHED" for r in children)
    train = by_step["train"]
    steps_logged = [m.step for m in client.get_metric_history(train.info.run_id, "loss_d")]
    assert steps_logged == [10, 20, 30]  # smoke: 30 steps, a report every 10
    listed = {a.path for a in client.list_artifacts(train.info.run_id, "checkpoint")}
    assert "checkpoint/state.pt" in listed
    outputs = client.download_artifacts(
        by_step["evaluate"].info.run_id, "outputs.json", str(tmp_path)
    )
    assert "frechet_distance" in json.loads(Path(outputs).read_text())["metrics"]

    register = result.outputs["register"]
    version = client.get_model_version("server-model", register["version"])
    assert version.run_id == by_step["register"].info.run_id
    assert version.status == "READY"
    # The model's files, too, went through the server.
    location = version.source
    if location.startswith("models:/"):  # a LoggedModel: models:/m-…
        location = client.get_logged_model(location.split("/")[1]).artifact_location
    assert location.startswith("mlflow-artifacts:"), version.source
    # Nothing went to the embedded store.
    assert not (workdir / "mlflow.db").exists()


def test_concurrent_writers_lose_no_point(mlflow_server):
    client = MlflowClient(mlflow_server)
    experiment_id = client.create_experiment(f"concurrent-{time.time_ns()}")
    run_ids = [client.create_run(experiment_id).info.run_id for _ in range(4)]
    writers = [_writer(mlflow_server, run_id, points=200, interval=0) for run_id in run_ids]
    for writer in writers:
        out, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err[-3000:]
        assert "pending after finish: 0" in out
        assert "unreachable" not in err

    spans = []
    for run_id in run_ids:
        history = _assert_every_point_arrived(client, run_id, 200)
        spans.append((min(m.timestamp for m in history), max(m.timestamp for m in history)))
        assert client.get_run(run_id).info.status == "FINISHED"
    # The writers ran at the same time: every one started before any one finished.
    assert max(start for start, _ in spans) < min(end for _, end in spans), spans


def test_server_killed_and_restarted_loses_no_metric(tracking_backend, tmp_path):
    """A server of its own (to kill) on the session's database, restarted on the same port
    after OUTAGE_S seconds, while the writer goes on logging metrics and images."""
    points, interval = 450, 0.1
    uri, server = start_mlflow_server(tmp_path, tracking_backend)
    port = int(uri.rsplit(":", 1)[1])
    try:
        client = MlflowClient(uri)
        run_id = _new_run(client, f"outage-{time.time_ns()}")
        writer = _writer(uri, run_id, points, interval)
        deadline = time.monotonic() + 120
        while len(client.get_metric_history(run_id, "loss")) < 20:
            assert writer.poll() is None, writer.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the writer delivered nothing"
            time.sleep(0.5)

        stop_mlflow_server(server, crash=True)  # SIGKILL: no goodbye to the clients
        killed_at = time.time()
        time.sleep(OUTAGE_S)
        assert writer.poll() is None, "the writer died with the server, or stopped logging"
        uri, server = start_mlflow_server(tmp_path, tracking_backend, port=port)
        back_at = time.time()

        out, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err[-3000:]
        assert "pending after finish: 0" in out
        history = _assert_every_point_arrived(client, run_id, points)
        assert client.get_run(run_id).info.status == "FINISHED"
        images = [a.path for a in client.list_artifacts(run_id, "images")]
    finally:
        stop_mlflow_server(server)

    # Values logged while the server was down arrived later, with the time they were logged.
    during_outage = [m for m in history if killed_at * 1000 < m.timestamp < back_at * 1000]
    assert len(during_outage) >= 0.5 * OUTAGE_S / interval, (killed_at, back_at)
    # Every sample image, too, each once (the UI's image slider has no gap).
    image_steps = sorted(
        int(re.search(r"\+step\+(\d+)\+", p).group(1)) for p in images if p.endswith(".png")
    )
    assert image_steps == list(range(0, points, IMAGE_EVERY)), images
    logged_at = [int(re.search(r"\+timestamp\+(\d+)\+", p).group(1)) for p in images]
    assert any(killed_at * 1000 < t < back_at * 1000 for t in logged_at)
    lost = [line for line in err.splitlines() if "unreachable" in line]
    back = [line for line in err.splitlines() if "reachable again" in line]
    assert len(lost) == 1, err[-3000:]
    assert f"tracking server {uri} unreachable (Connection refused)" in lost[0]
    assert len(back) == 1, err[-3000:]


def test_ganpipe_server_serves_the_database_it_is_given(mlflow_server, tracking_backend, tmp_path):
    """`ganpipe server` as a user starts it, on the database the session's server also uses: a
    run made through one server is read through the other."""
    client = MlflowClient(mlflow_server)
    run_id = _new_run(client, f"shared-{time.time_ns()}")
    port = free_port()
    cli = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "server", "--backend-store-uri", tracking_backend,
         "--port", str(port), "--workers", "1", "--workdir", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_until_ready(uri, cli, timeout_s=180)
        other = MlflowClient(uri)
        assert other.get_run(run_id).info.status == "RUNNING"
        other.set_terminated(run_id)
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        stop_mlflow_server(cli)
    banner = cli.stdout.read()
    assert f"use it with    ganpipe run tracking_uri=http://127.0.0.1:{port}" in banner
    assert f"artifacts      {tmp_path.resolve() / 'mlartifacts'}" in banner


def test_ganpipe_server_names_a_missing_database_and_how_to_create_it(tmp_path):
    if not postgres_reachable():
        pytest.skip("needs PostgreSQL")
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "server",
         "--backend-store-uri", "postgresql://postgres@127.0.0.1:5432/ganpipe_no_such_db"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "ganpipe: error: backend store postgresql://postgres@127.0.0.1:5432/ganpipe_no_such_db: "
        "database 'ganpipe_no_such_db' does not exist on 127.0.0.1:5432; create it with: "
        "createdb -h 127.0.0.1 -p 5432 -U postgres ganpipe_no_such_db"
    )
