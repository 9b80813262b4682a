"""Kill the pipeline's driver during training; `ganpipe run --resume` continues from the last
checkpoint, not from step 0, and reuses the steps that finished."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from pipelines.config import load_config

pytestmark = pytest.mark.integration
ARGS = [
    "-c", "smoke", "train.steps=300", "train.checkpoint_every=50", "train.report_every=25",
    "train.eval_every=50",
    "register.model_name=resume-model",
]  # fmt: skip


def _wait_for_cpus(expected: float, timeout: float = 90) -> None:
    import ray

    deadline = time.time() + timeout
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) >= expected:
            return
        time.sleep(1)
    raise AssertionError(f"Ray did not free the killed run's CPUs: {ray.available_resources()}")


def test_killed_driver_resumes_training_from_its_checkpoint(smoke_run):
    import ray

    total_cpus = ray.cluster_resources()["CPU"]
    workdir = smoke_run[0].workdir  # its data and feature steps come from the cache
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    cli = [sys.executable, "-m", "pipelines.cli", "run"]
    driver = subprocess.Popen(
        [*cli, *ARGS, f"workdir={workdir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    run_id, seen = None, []
    deadline = time.time() + 300
    for line in driver.stdout:
        seen.append(line)
        if match := re.search(r"pipeline run ([0-9a-f]{32})", line):
            run_id = match.group(1)
        if re.search(r"\[train\] step (1[5-9]\d|2\d\d)/300", line) or time.time() > deadline:
            break
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert run_id, "".join(seen[-30:])
    assert any("[checkpoint]" in line for line in seen), "".join(seen[-30:])
    _wait_for_cpus(total_cpus)

    resumed = subprocess.run(
        [*cli, "--resume", run_id, f"workdir={workdir}"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    for step in ("prepare", "validate", "fit_features"):
        assert f"[{step}] cached" in resumed.stdout

    config = load_config(None, [f"workdir={workdir}"])
    client = MlflowClient(config.resolved_tracking_uri)
    experiment = client.get_experiment_by_name(config.experiment).experiment_id
    train_runs = client.search_runs(
        [experiment],
        f"tags.`ganpipe.step` = 'train' and tags.`mlflow.parentRunId` = '{run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    assert [r.info.status for r in train_runs] == ["KILLED", "FINISHED"]
    killed_steps = [m.step for m in client.get_metric_history(train_runs[0].info.run_id, "loss_d")]
    resumed_steps = [m.step for m in client.get_metric_history(train_runs[1].info.run_id, "loss_d")]
    assert max(killed_steps) >= 150
    # It went on from a checkpoint (every 50 steps) taken before the kill, not from step 0.
    assert 50 < min(resumed_steps) <= max(killed_steps) + 25
    assert max(resumed_steps) == 300
    # Every worker resumed its own batch and noise stream: where the killed run had already
    # reported a step past its checkpoint, the resumed run reports the same loss.
    killed = {
        m.step: m.value for m in client.get_metric_history(train_runs[0].info.run_id, "loss_d")
    }
    resumed = {
        m.step: m.value for m in client.get_metric_history(train_runs[1].info.run_id, "loss_d")
    }
    for step in sorted(set(killed) & set(resumed)):
        assert resumed[step] == pytest.approx(killed[step], rel=1e-5), step
    assert client.get_run(run_id).info.status == "FINISHED"
