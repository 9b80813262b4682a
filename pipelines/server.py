"""The MLflow tracking server a team runs: a database behind it, artifacts served through it.

``ganpipe server`` checks that the backend store answers before it starts ``mlflow server``, so
a PostgreSQL that is down or a database that was never created is one clear error instead of a
stack trace from inside MLflow's migrations.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
BACKEND_CONNECT_TIMEOUT_S = 5


class BackendUnavailable(RuntimeError):
    """The backend store cannot be used; the message names it and says how to fix it."""


def default_backend_uri(workdir: str | Path) -> str:
    """The workdir's SQLite store: the same file the embedded pipeline writes, so a server
    started on a workdir shows the runs made there."""
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def default_artifacts_destination(workdir: str | Path) -> str:
    return str(Path(workdir).resolve() / "mlartifacts")


def redact(uri: str) -> str:
    """``uri`` without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(uri).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL: nothing we know how to redact
        return uri


def check_backend(uri: str) -> None:
    """Raise BackendUnavailable unless the backend store ``uri`` can be opened now."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

    try:
        url = make_url(uri)
    except ArgumentError:
        raise BackendUnavailable(
            f"backend store URI {uri!r} is not a database URI; use e.g. "
            "postgresql://USER@HOST:5432/mlflow or sqlite:///path/mlflow.db"
        ) from None
    if url.get_backend_name() == "sqlite":
        folder = Path(url.database or "").resolve().parent
        if not folder.is_dir():
            raise BackendUnavailable(
                f"backend store {uri}: folder {folder} does not exist; create it first"
            )
        return  # the server creates the file and its tables

    connect_args = {}
    if url.get_backend_name() in ("postgresql", "mysql"):
        connect_args["connect_timeout"] = BACKEND_CONNECT_TIMEOUT_S
    try:
        engine = create_engine(url, connect_args=connect_args)
    except (NoSuchModuleError, ModuleNotFoundError) as exc:
        hint = ""
        if url.get_backend_name() == "postgresql":
            # SQLAlchemy 2.1 reads postgresql:// as psycopg (3), 2.0 as psycopg2; ganpipe
            # installs psycopg, which postgresql+psycopg:// selects on either.
            hint = "; pip install 'psycopg[binary]' and write the URI as postgresql+psycopg://…"
        raise BackendUnavailable(
            f"backend store {redact(uri)}: its database driver is not installed ({exc}){hint}"
        ) from None
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except OperationalError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0]
        where = f"{url.host or 'localhost'}:{url.port or ''}".rstrip(":")
        if url.database and f'database "{url.database}" does not exist' in reason:
            raise BackendUnavailable(
                f"backend store {redact(uri)}: database {url.database!r} does not exist on "
                f"{where}; create it with: createdb -h {url.host or 'localhost'} "
                f"-p {url.port or 5432} -U {url.username or 'postgres'} {url.database}"
            ) from None
        check = ""
        if url.get_backend_name() == "postgresql":
            check = f"; check with: pg_isready -h {url.host or 'localhost'} -p {url.port or 5432}"
        raise BackendUnavailable(
            f"backend store {redact(uri)} is unreachable: {reason} "
            f"(is the database server running on {where}?{check})"
        ) from None
    finally:
        engine.dispose()


def server_command(
    backend_store_uri: str,
    artifacts_destination: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    workers: int | None = None,
    allowed_hosts: str | None = None,
) -> list[str]:
    """``mlflow server`` through this interpreter, serving artifacts itself so that clients
    need no credentials for the artifact store (S3 or a folder)."""
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_store_uri,
        "--serve-artifacts", "--artifacts-destination", artifacts_destination,
        "--host", host, "--port", str(port),
    ]  # fmt: skip
    if workers:
        command += ["--workers", str(workers)]
    if allowed_hosts:
        command += ["--allowed-hosts", allowed_hosts]
    return command


def server_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment ``mlflow server`` runs with."""
    env = dict(os.environ if base is None else base)
    # MLflow's server-side job runner (GenAI evaluation jobs) starts extra consumer processes;
    # nothing in ganpipe submits such jobs.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def wait_until_ready(uri: str, process: subprocess.Popen | None, timeout_s: float) -> None:
    """Return once ``uri``/health answers; raise if ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {uri} did not answer within {timeout_s:.0f}s")


def start_server(
    backend_store_uri: str,
    artifacts_destination: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    workers: int | None = None,
    log_path: str | Path | None = None,
    ready_timeout_s: float = 180,
) -> subprocess.Popen:
    """Start ``mlflow server`` in its own process group and wait until it answers.

    Stop it with ``stop_server``: ``mlflow server`` forks uvicorn workers, and only the whole
    group going away frees the port.
    """
    check_backend(backend_store_uri)
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        process = subprocess.Popen(
            server_command(backend_store_uri, artifacts_destination, host, port, workers),
            stdout=log, stderr=subprocess.STDOUT, env=server_environment(),
            start_new_session=True,
        )  # fmt: skip
    finally:
        if log is not subprocess.DEVNULL:
            log.close()  # the child holds its own descriptor
    try:
        wait_until_ready(f"http://{host}:{port}", process, ready_timeout_s)
    except BaseException:
        stop_server(process)
        raise
    return process


def stop_server(
    process: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 30
) -> None:
    """Stop the server's whole process group (SIGKILL for a crash, SIGTERM for a shutdown)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # uvicorn's workers can outlive their parent and keep the port: the group must be gone.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.1)
