"""RunLogger against a tracking server that does not answer (a real refused connection on a
closed local port), and which tracking store a config resolves to.

Delivery after the server comes back is tested against a real ``mlflow server`` in
tests/integration/test_tracking_server.py.
"""

from __future__ import annotations

import pickle
import socket
import time

import pytest
from mlflow.exceptions import MlflowException

from pipelines.config import Config
from pipelines.tracking import RunLogger, TrackingUnavailable, is_server_unreachable


@pytest.fixture
def dead_uri(monkeypatch) -> str:
    """A URI nobody listens on; MLflow's own HTTP retries off so that each attempt is quick."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_metrics_are_buffered_and_the_outage_reported_once(dead_uri, capsys):
    first = RunLogger(dead_uri, "run-a", retry_window_s=60)
    second = RunLogger(dead_uri, "run-b", retry_window_s=60)
    started = time.monotonic()
    for step in range(50):
        first.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-3}, step=step)
        second.log_metrics({"loss": 2.0}, step=step)
    elapsed = time.monotonic() - started

    assert (first.pending, second.pending) == (100, 50)
    # Later calls wait for the retry time instead of each trying the dead server again.
    assert elapsed < 10, f"150 log calls during an outage took {elapsed:.1f}s"
    report = [line for line in capsys.readouterr().err.splitlines() if "ganpipe:" in line]
    assert len(report) == 1, report
    assert f"tracking server {dead_uri} unreachable (Connection refused)" in report[0]
    assert "retrying for up to 60s" in report[0]


def test_past_the_retry_window_flush_fails_naming_the_server_and_the_loss(dead_uri):
    logger = RunLogger(dead_uri, "run-w", retry_window_s=0.5)
    logger.log_metrics({"loss": 1.0}, step=1)
    with pytest.raises(TrackingUnavailable) as caught:
        logger.flush()
    message = str(caught.value)
    assert dead_uri in message
    assert "longer than the retry window of 0.5s (GANPIPE_TRACKING_RETRY_S)" in message
    assert "1 metric values of run run-w were not delivered" in message


def test_other_writes_wait_and_then_fail_clearly_too(dead_uri):
    logger = RunLogger(dead_uri, "run-t", retry_window_s=0.5)
    with pytest.raises(TrackingUnavailable, match="GANPIPE_TRACKING_RETRY_S"):
        logger.set_tags({"a": "b"})


def test_a_full_buffer_fails_clearly_instead_of_dropping_values(dead_uri):
    logger = RunLogger(dead_uri, "run-f", retry_window_s=60, buffer_limit=10)
    for step in range(5):
        logger.log_metrics({"a": 1.0, "b": 2.0}, step=step)
    with pytest.raises(TrackingUnavailable, match="GANPIPE_TRACKING_BUFFER") as caught:
        logger.log_metrics({"a": 1.0}, step=6)
    assert "10 metric values of run run-f are waiting" in str(caught.value)
    assert logger.pending == 10


def test_settings_come_from_the_environment_and_bad_values_are_refused(monkeypatch):
    monkeypatch.setenv("GANPIPE_TRACKING_RETRY_S", "42")
    monkeypatch.setenv("GANPIPE_TRACKING_BUFFER", "7")
    logger = RunLogger("http://127.0.0.1:1", "r")
    assert (logger.retry_window_s, logger.buffer_limit) == (42.0, 7)
    monkeypatch.setenv("GANPIPE_TRACKING_RETRY_S", "soon")
    with pytest.raises(ValueError, match="GANPIPE_TRACKING_RETRY_S='soon' is not a number"):
        RunLogger("http://127.0.0.1:1", "r")


def test_a_pickled_logger_carries_its_settings_not_its_buffer(dead_uri):
    logger = RunLogger(dead_uri, "run-p", "7", retry_window_s=33, buffer_limit=99)
    logger.log_metrics({"loss": 1.0}, step=1)
    copy = pickle.loads(pickle.dumps(logger))
    assert (copy.tracking_uri, copy.run_id, copy.experiment_id) == (dead_uri, "run-p", "7")
    assert (copy.retry_window_s, copy.buffer_limit) == (33, 99)
    assert (logger.pending, copy.pending) == (1, 0)  # delivered once, by the process that logged


def test_a_refused_request_is_not_taken_for_an_outage(tmp_path):
    """The store answers but refuses (no such run): raise at once and keep nothing that would
    fail every later call."""
    logger = RunLogger(f"sqlite:///{tmp_path / 'mlflow.db'}", "0" * 32)
    with pytest.raises(MlflowException) as caught:
        logger.log_metrics({"loss": 1.0})
    assert not is_server_unreachable(caught.value)
    assert logger.pending == 0


def test_tracking_uri_precedence_config_then_environment_then_workdir(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    embedded = Config(workdir=str(tmp_path)).resolved_tracking_uri
    assert embedded == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert Config(workdir=str(tmp_path)).resolved_tracking_uri == "http://tracking.example:5000"
    explicit = Config(workdir=str(tmp_path), tracking_uri="http://127.0.0.1:5001")
    assert explicit.resolved_tracking_uri == "http://127.0.0.1:5001"


def test_images_wait_with_the_metrics_during_an_outage(dead_uri):
    import numpy as np

    logger = RunLogger(dead_uri, "run-i", retry_window_s=60)
    started = time.monotonic()
    for step in range(5):
        logger.log_image(np.zeros((4, 4, 3), np.uint8), key="samples", step=step)
        logger.log_metrics({"loss": 1.0}, step=step)
    # A training report never waits for the server: its sample grid is kept like its metrics.
    assert time.monotonic() - started < 10
    assert logger.pending == 10
