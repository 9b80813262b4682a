"""`ganpipe run` as a user runs it: a subprocess, joined to the tests' Ray instance.

The run goes to the smoke run's workdir with another model name: the steps the smoke run
finished come from the cache, and register runs (the smoke run covers the steps themselves;
a second full run here took 48 s of the suite)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.integration


def _ganpipe(args: list[str], ray_address: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.fixture(scope="module")
def ray_address(ray_session):
    import ray

    return ray.get_runtime_context().gcs_address


def test_run_prints_figures_model_uri_and_next_commands(ray_address, smoke_run):
    workdir = smoke_run[0].workdir
    done = _ganpipe(
        ["run", "-c", "smoke", f"workdir={workdir}", "register.model_name=cli-model"], ray_address
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for step in ("prepare", "validate", "fit_features", "train", "evaluate"):
        assert f"[{step}] cached" in out, step
    assert "[register] finished" in out
    for line in ("generator", "floor (train images)", "Gaussian baseline", "classes covered"):
        assert line in out
    assert "Registered: models:/cli-model@champion" in out
    assert f"ganpipe ui --workdir {workdir}" in out
    assert (
        f"ganpipe generate --model models:/cli-model@champion -n 64 --out grid.png "
        f"--workdir {workdir}" in out
    )


def test_failed_step_is_one_clear_message_and_exit_1(ray_address, tmp_path):
    source = tmp_path / "few.npz"
    np.savez(source, images=np.zeros((3, 8, 8), np.uint8), labels=np.arange(3))
    done = _ganpipe(
        ["run", "-c", "smoke", f"workdir={tmp_path / 'w'}", f"data.source={source}"], ray_address
    )
    assert done.returncode == 1
    assert "ganpipe: error: step 'prepare' failed: ValueError:" in done.stderr
    assert "holds 3 images; need at least 4" in done.stderr
    assert "Traceback" not in done.stderr.split("ganpipe: error:")[1]
