"""A real ``mlflow server`` for tests, started the way ``ganpipe server`` starts it.

Its backend is a fresh PostgreSQL database (created here, dropped at the end), as a team runs it;
only when no PostgreSQL answers (``GANPIPE_TEST_POSTGRES``, default the local one) is it SQLite.

    uri, process = start_mlflow_server(tmp_path, backend=backend_uri)
    ...
    stop_mlflow_server(process)

or the session's server: a test that takes the ``mlflow_server`` fixture gets its URI, and
``tracking_backend`` the database behind it.
"""

from __future__ import annotations

import os
import socket
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from subprocess import Popen

import pytest

from pipelines.server import start_server, stop_server

ADMIN_URI = os.environ.get("GANPIPE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def postgres_reachable() -> bool:
    import psycopg

    try:
        with psycopg.connect(ADMIN_URI, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """The URI of a new, empty database, dropped (with its connections) on exit."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"ganpipe_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URI, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(ADMIN_URI).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(ADMIN_URI, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def fresh_backend(tmp_path: Path) -> Iterator[str]:
    """A fresh PostgreSQL database, or a SQLite file in ``tmp_path`` when none answers."""
    if postgres_reachable():
        with fresh_postgres_database() as uri:
            yield uri
        return
    warnings.warn(
        f"PostgreSQL at {ADMIN_URI} is not reachable: the tracking server uses SQLite",
        stacklevel=2,
    )
    yield f"sqlite:///{tmp_path / 'mlflow.db'}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(
    tmp_path: Path, backend: str | None = None, port: int | None = None, workers: int = 1
) -> tuple[str, Popen]:
    """Start ``mlflow server`` on ``backend`` (default: SQLite in ``tmp_path``) with artifacts
    served from ``tmp_path/mlartifacts``; return its URI and process once it answers.

    One worker: a server process handles concurrent requests in threads, and each extra worker
    costs seconds of start-up on a busy machine.
    """
    backend = backend or f"sqlite:///{tmp_path / 'mlflow.db'}"
    port = port or free_port()
    log = tmp_path / f"mlflow-server-{port}.log"
    try:
        process = start_server(
            backend, str(tmp_path / "mlartifacts"), port=port, workers=workers, log_path=log
        )
    except (RuntimeError, TimeoutError) as exc:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise RuntimeError(f"{exc}\n--- {log} ---\n{tail}") from None
    return f"http://127.0.0.1:{port}", process


def stop_mlflow_server(process: Popen, crash: bool = False) -> None:
    """Stop the server; ``crash`` kills it with SIGKILL, as a lost machine would."""
    import signal

    stop_server(process, signal.SIGKILL if crash else signal.SIGTERM)


@pytest.fixture(scope="session")
def tracking_backend(tmp_path_factory) -> Iterator[str]:
    """The session server's backend store URI (a fresh PostgreSQL database)."""
    with fresh_backend(tmp_path_factory.mktemp("mlflow-backend")) as backend:
        yield backend


@pytest.fixture(scope="session")
def mlflow_server(tracking_backend, tmp_path_factory) -> Iterator[str]:
    """The URI of one tracking server for the session, on ``tracking_backend``."""
    uri, process = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), tracking_backend)
    try:
        yield uri
    finally:
        stop_mlflow_server(process)
