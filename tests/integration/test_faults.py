"""Faults injected for real into `ganpipe run` (a subprocess joined to the tests' Ray):

- a Ray Train worker process is SIGKILLed mid-training: the worker group restarts from the last
  checkpoint (train.max_failures) and the run finishes;
- a generator weight becomes NaN (the test-only hook GANPIPE_FAULT_NAN_STEP): the next report
  catches it, training rolls back to the last checkpoint with halved learning rates and
  finishes; past train.nan_rollbacks it stops with one clear error and nothing is registered.

Both faults hit the same run, so the MLflow history is checked once for what they could break:
every report step logged exactly once, none missing.
"""

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
from pipelines.faults import FAULT_NAN_STEP_ENV, FAULT_NAN_TIMES_ENV

pytestmark = pytest.mark.integration
STEPS, REPORT, CHECKPOINT, NAN_AT = 600, 50, 100, 500
ARGS = [
    "-c", "smoke", f"train.steps={STEPS}", f"train.report_every={REPORT}",
    f"train.checkpoint_every={CHECKPOINT}", "train.eval_every=0", "optim.decay=none",
    "train.max_failures=1", "train.nan_rollbacks=1", "train.rollback_lr_factor=0.5",
    "register.model_name=faults-model",
]  # fmt: skip


@pytest.fixture(scope="module")
def workdir(smoke_run):
    """The smoke run's: its data and feature steps come from the cache (the same config)."""
    return smoke_run[0].workdir


def _env(**extra: str) -> dict[str, str]:
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONUNBUFFERED": "1", **extra}  # fmt: skip
    for name in (FAULT_NAN_STEP_ENV, FAULT_NAN_TIMES_ENV):
        if name not in extra:
            env.pop(name, None)
    return env


def _kill_one_train_worker() -> int:
    from ray.util.state import list_actors

    workers = [
        a
        for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
        if "RayTrainWorker" in a.class_name and a.pid
    ]
    assert workers, "no live Ray Train worker to kill"
    pid = workers[-1].pid
    os.kill(pid, signal.SIGKILL)
    return pid


def _train_run(client: MlflowClient, config, pipeline_run: str):
    experiment = client.get_experiment_by_name(config.experiment).experiment_id
    [run] = client.search_runs(
        [experiment],
        f"tags.`ganpipe.step` = 'train' and tags.`mlflow.parentRunId` = '{pipeline_run}'",
    )
    return run


def test_worker_killed_and_nan_weights_training_recovers_and_logs_each_step_once(
    ray_session, workdir
):
    cli = [sys.executable, "-m", "pipelines.cli", "run", *ARGS, f"workdir={workdir}"]
    driver = subprocess.Popen(
        cli, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=_env(**{FAULT_NAN_STEP_ENV: str(NAN_AT)}), start_new_session=True,
    )  # fmt: skip
    seen, killed, run_id = [], None, None
    deadline = time.time() + 900
    try:
        for line in driver.stdout:
            seen.append(line)
            if match := re.search(r"pipeline run ([0-9a-f]{32})", line):
                run_id = match.group(1)
            step = re.search(r"\[train\] step (\d+)/", line)
            if killed is None and step and CHECKPOINT <= int(step.group(1)) < NAN_AT - REPORT:
                killed = (int(step.group(1)), _kill_one_train_worker())
            assert time.time() < deadline, "".join(seen[-40:])
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    out = "".join(seen)
    assert driver.returncode == 0, out[-5000:]
    assert killed is not None, f"training never reached step {CHECKPOINT}: {out[-3000:]}"
    killed_after = killed[0]
    assert "Registered: models:/faults-model@champion" in out

    config = load_config(None, [f"workdir={workdir}"])
    client = MlflowClient(config.resolved_tracking_uri)
    train = _train_run(client, config, run_id)
    assert train.info.status == "FINISHED"
    # Every report step exactly once: the restart after the kill and the rollback after the NaN
    # both re-report steps the driver had logged already; it keeps the first copy.
    steps = [m.step for m in client.get_metric_history(train.info.run_id, "loss_d")]
    assert steps == list(range(REPORT, STEPS + 1, REPORT)), (killed_after, steps)
    # The NaN at step NAN_AT was caught at that report, which was never logged with NaN: the
    # state went back to the checkpoint before it with both rates halved.
    lr_g = {m.step: m.value for m in client.get_metric_history(train.info.run_id, "lr_g")}
    assert lr_g[NAN_AT - REPORT] == pytest.approx(config.optim.lr_g)
    assert all(lr_g[s] == pytest.approx(config.optim.lr_g / 2) for s in lr_g if s >= NAN_AT)
    rollbacks = client.get_metric_history(train.info.run_id, "rollbacks")
    assert {m.step for m in rollbacks} == set(range(NAN_AT, STEPS + 1, REPORT))
    assert all(m.value == 1 for m in rollbacks)
    for name in ("loss_d", "loss_g"):
        values = [m.value for m in client.get_metric_history(train.info.run_id, name)]
        assert all(v == v and abs(v) != float("inf") for v in values), name
    # The worker group restarted from a checkpoint (rank 0 says from which).
    resumed = [int(s) for s in re.findall(r"resuming from the checkpoint of step (\d+)", out)]
    assert resumed and all(s % CHECKPOINT == 0 and CHECKPOINT <= s < NAN_AT for s in resumed)
    assert f"non-finite loss or weights at step {NAN_AT}: rolled back to step 400" in out


def test_divergence_past_the_rollback_limit_fails_clearly_and_registers_nothing(
    ray_session, workdir
):
    # Same data and features as above (cached); the NaN comes back after every rollback.
    args = [a for a in ARGS if not a.startswith("train.nan_rollbacks=")] + [
        "train.nan_rollbacks=1",
        "train.steps=300",
        "register.model_name=faults-diverged",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", *args, f"workdir={workdir}"],
        capture_output=True, text=True, timeout=900,
        env=_env(**{FAULT_NAN_STEP_ENV: "150", FAULT_NAN_TIMES_ENV: "99"}),
    )  # fmt: skip
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("ganpipe: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "step 'train' failed: TrainingDiverged: training diverged" in errors[0]
    assert "at step 150 after 1 rollback(s)" in errors[0]
    assert "lower optim.lr_g / optim.lr_d, or raise train.nan_rollbacks" in errors[0]
    assert "[evaluate] started" not in done.stdout
    client = MlflowClient(load_config(None, [f"workdir={workdir}"]).resolved_tracking_uri)
    names = {m.name for m in client.search_registered_models()}
    assert "faults-diverged" not in names
