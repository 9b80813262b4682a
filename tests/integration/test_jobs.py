"""`ganpipe submit | status | logs | stop` against a real Ray head with its dashboard.

The head is this module's own `ray start --head --block` on loopback, with token authentication
on (as Ray 2.60 has it for local clusters) and a token in a file of its own, so that neither
~/.ray/auth_token nor the Ray instance other integration tests share is touched. Teardown ends
exactly the processes it started, those whose command line names its temp dir (`ray start`
among them): SIGTERM, then SIGKILL to what is left after 5 s.

The checks at the top need no cluster: what is submitted (entrypoint, runtime_env, pins).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipelines import jobs
from pipelines.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
HEAD_START_TIMEOUT_S = 180


# ---------------------------------------------------------------- what is submitted (no Ray)


def test_entrypoint_runs_the_uploaded_code_with_preset_and_overrides(tmp_path):
    sub = jobs.prepare_run("smoke", [f"workdir={tmp_path}", "train.steps=7"])
    assert sub.entrypoint == (
        f"python -m pipelines.cli run -c smoke workdir={tmp_path} train.steps=7"
    )
    assert sub.runtime_env["working_dir"] == str(ROOT)
    assert "pip" not in sub.runtime_env  # the cluster image provides the dependencies
    for pattern in (".git", ".venv", "ganpipe-runs", "*.db", "mlartifacts"):
        assert pattern in sub.runtime_env["excludes"]
    assert sub.notes == ()


def test_relative_workdir_is_noted_and_not_uploaded():
    sub = jobs.prepare_run(None, ["workdir=runs/a"])
    assert "/runs/a" in sub.runtime_env["excludes"]
    assert any("workdir 'runs/a' is relative" in note for note in sub.notes)


def test_config_is_checked_before_anything_is_uploaded():
    with pytest.raises(ConfigError, match="train.workers"):
        jobs.prepare_run("smoke", ["train.workers=0"])
    with pytest.raises(ConfigError, match="unknown preset"):
        jobs.prepare_run("no-such-preset", [])


def test_a_data_source_missing_here_is_left_to_the_cluster():
    sub = jobs.prepare_run("smoke", ["data.source=/datasets/mnist", "workdir=/tmp/w"])
    assert "data.source=/datasets/mnist" in sub.entrypoint
    assert any("/datasets/mnist" in note and "cluster checks" in note for note in sub.notes)


def test_preset_file_must_travel_with_the_upload(tmp_path):
    inside = ROOT / "configs" / "smoke.yaml"
    sub = jobs.prepare_run(str(inside), ["workdir=/tmp/w"])
    assert "-c configs/smoke.yaml" in sub.entrypoint  # relative to the job's working dir
    outside = tmp_path / "mine.yaml"
    outside.write_text(yaml.safe_dump({"train": {"steps": 5}}))
    with pytest.raises(jobs.JobsError, match="outside it"):
        jobs.prepare_run(str(outside), [])


def test_pip_pins_installed_versions_but_not_ray_or_torch():
    from importlib.metadata import version

    sub = jobs.prepare_run(None, ["workdir=/tmp/w"], pip=True)
    pins = dict(p.split("==") for p in sub.runtime_env["pip"])
    assert pins["mlflow"] == version("mlflow")
    assert pins["numpy"] == version("numpy")
    assert not any(name.startswith(("ray", "torch")) for name in pins)
    assert not any(name in ("pytest", "ruff") for name in pins)  # the dev extra stays home


def test_address_comes_from_flag_then_environment(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert jobs.resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.5:8265/")
    assert jobs.resolve_address(None) == "http://10.0.0.5:8265"
    assert jobs.resolve_address("https://ray.internal") == "https://ray.internal"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    with pytest.raises(jobs.JobsError, match="RAY_ADDRESS '10.0.0.5:6379' is not"):
        jobs.resolve_address(None)


def test_token_is_read_in_rays_order(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert jobs.read_token() == (None, "none")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert jobs.read_token() == ("home-token", "~/.ray/auth_token")
    (tmp_path / "t").write_text(" file-token \n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert jobs.read_token()[0] == "file-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert jobs.read_token()[0] == "env-token"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(jobs.JobsError, match="RAY_AUTH_TOKEN_PATH=.*cannot be read"):
        jobs.read_token()


def _ganpipe(args: list[str], env: dict[str, str], timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    """The CLI's refusal: exit 1, one `ganpipe: error:` line on stderr, no traceback."""
    assert done.returncode == 1, (done.stdout[-2000:], done.stderr[-2000:])
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("ganpipe: error:")]
    assert len(errors) == 1, done.stderr
    return errors[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_is_one_clear_line():
    env = {**os.environ, "RAY_AUTH_TOKEN": "x"}
    done = _ganpipe(["status", "--address", f"http://127.0.0.1:{_free_port()}"], env)
    assert "cannot reach the Ray dashboard" in _one_line_error(done)


# ---------------------------------------------------------------- a real head


@dataclass
class Head:
    address: str
    token_file: Path
    temp_dir: Path

    def client_env(self, **changes: str | None) -> dict[str, str]:
        """The environment of a user who holds the token file (and nothing else of Ray's)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        env["RAY_AUTH_TOKEN_PATH"] = str(self.token_file)
        env["HOME"] = str(self.temp_dir / "home")  # no ~/.ray/auth_token of another cluster
        for key, value in changes.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env


def _wait_for_dashboard(proc: subprocess.Popen, address: str, token: str, log: Path) -> None:
    import requests

    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            response = requests.get(
                f"{address}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=5
            )
            if response.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    pytest.fail(f"dashboard not up after {HEAD_START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


def _pids_naming(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (read from /proc: Linux only)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    pids.append(int(entry.name))
            except OSError:  # ended meanwhile
                pass
    return pids


def _end_head(proc: subprocess.Popen, temp_dir: Path) -> None:
    # Everything that names our temp dir is ours: `ray start` itself, the GCS, raylet, agents,
    # job drivers and workers. SIGTERM to all at once, SIGKILL to what is left after 5 s: once a
    # job has run, `ray start --block`'s own graceful stop takes 30 s, all of it spent waiting.
    for sig, grace_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        for pid in _pids_naming(str(temp_dir)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while _pids_naming(str(temp_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    # Short on purpose: Ray puts unix sockets under it, and their paths are limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="gpj", dir="/tmp"))
    (temp_dir / "home").mkdir()
    token = secrets.token_hex(32)
    token_file = temp_dir / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    port, dash, client, agent, agent_grpc, metrics, rt_env = (_free_port() for _ in range(7))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(
        RAY_AUTH_MODE="token",  # explicit, as production clusters should have it
        RAY_AUTH_TOKEN_PATH=str(token_file),  # inherited by the job's driver and workers
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python`
    )
    command = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rt_env}",
        # Like the embedded Ray: cores + 1, so the feature classifier runs beside training.
        "--num-cpus=3",
        f"--object-store-memory={300 * 1024**2}",  # the machine is shared; the pipeline is small
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log = temp_dir / "head.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_dashboard(proc, address, token, log)
        yield Head(address, token_file, temp_dir)
    finally:
        _end_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.integration
def test_submit_without_a_token_is_refused_with_how_to_provide_it(head, tmp_path):
    env = head.client_env(RAY_AUTH_TOKEN_PATH=None)
    args = ["submit", "--address", head.address, "-c", "smoke", f"workdir={tmp_path}"]
    done = _ganpipe(args, env)
    line = _one_line_error(done)
    assert "requires a token and none was found" in line
    assert "RAY_AUTH_TOKEN" in line and "ray get-auth-token" in line


@pytest.mark.integration
def test_wrong_token_is_refused_naming_where_it_came_from(head):
    env = head.client_env(RAY_AUTH_TOKEN="0" * 64)
    done = _ganpipe(["status", "--address", head.address], env)
    assert "refused the token from RAY_AUTH_TOKEN" in _one_line_error(done)


@pytest.mark.integration
def test_unknown_job_id_is_one_clear_line(head):
    done = _ganpipe(["status", "no-such-job", "--address", head.address], head.client_env())
    assert "no job 'no-such-job'" in _one_line_error(done)


@pytest.mark.integration
def test_explicit_address_wins_over_ray_address(head):
    # Ray's own client would take RAY_ADDRESS over its address argument.
    env = head.client_env(RAY_ADDRESS=f"http://127.0.0.1:{_free_port()}")
    done = _ganpipe(["status", "--address", head.address], env)
    assert done.returncode == 0, done.stderr


@pytest.mark.integration
def test_stop_ends_a_running_job(head, tmp_path):
    env = head.client_env()
    args = ["submit", "--address", head.address, "-c", "smoke", f"workdir={tmp_path}"]
    done = _ganpipe(args, env)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert job_id.startswith("ganpipe-")

    stopped = _ganpipe(["stop", job_id, "--address", head.address], env)
    assert stopped.returncode == 0, stopped.stderr
    assert f"stopping {job_id}" in stopped.stdout

    deadline = time.monotonic() + 120
    while True:
        status = _ganpipe(["status", job_id, "--address", head.address], env)
        assert status.returncode == 0, status.stderr
        if "STOPPED" in status.stdout.splitlines()[0] or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert status.stdout.splitlines()[0] == f"{job_id}  STOPPED"
    # Following a stopped job ends at once, and not with success.
    followed = _ganpipe(["logs", job_id, "--follow", "--address", head.address], env)
    assert f"job {job_id} STOPPED" in _one_line_error(followed)


@pytest.mark.integration
def test_submit_follow_runs_the_pipeline_and_registers_the_model(head, tmp_path):
    from mlflow import MlflowClient

    workdir = tmp_path / "w"
    env = head.client_env()
    done = _ganpipe(
        [
            "submit",
            "--address",
            head.address,
            "--follow",
            "--preset",
            "smoke",
            f"workdir={workdir}",
            "register.model_name=jobs-model",
        ],
        env,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-3000:])
    job_id = done.stdout.splitlines()[0]
    assert job_id.startswith("ganpipe-")
    # The job's own output streamed back: the pipeline's closing lines.
    assert "Registered: models:/jobs-model@champion" in done.stdout
    assert f"job {job_id} SUCCEEDED" in done.stderr

    # The model is in the run's MLflow store, written by the job on the cluster.
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    assert client.get_registered_model("jobs-model").name == "jobs-model"
    champion = client.get_model_version_by_alias("jobs-model", "champion")
    assert str(champion.version) == "1"
    assert champion.status == "READY"

    status = _ganpipe(["status", job_id, "--address", head.address], env)
    assert status.stdout.splitlines()[0] == f"{job_id}  SUCCEEDED"
    assert "python -m pipelines.cli run -c smoke" in status.stdout
    # The driver joined this cluster (a Ray job id of its own), it did not start a local Ray.
    assert re.search(r"^  ray job     [0-9a-f]+$", status.stdout, re.MULTILINE), status.stdout
    logs = _ganpipe(["logs", job_id, "--address", head.address], env)
    assert "Registered: models:/jobs-model@champion" in logs.stdout
    listed = _ganpipe(["status", "--address", head.address], env)
    assert f"{job_id}  SUCCEEDED" in listed.stdout
