"""What a run records besides its metrics, on a real SQLite MLflow store, without Ray: the
prepared splits as MLflow dataset inputs, system metrics while a block runs, the environment of a
pipeline run."""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import platform
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.config import load_config
from pipelines.dag import StepContext
from pipelines.steps.prepare import prepare
from pipelines.steps.validate import validate
from pipelines.tracking import RunLogger, ensure_experiment, start_pipeline_run

CPU = "system/cpu_utilization_percentage"
MEMORY = "system/system_memory_usage_megabytes"


def _logger(tmp_path: Path) -> tuple[RunLogger, MlflowClient]:
    config = load_config("smoke", [f"workdir={tmp_path / 'w'}"])
    client = MlflowClient(config.resolved_tracking_uri)
    run = client.create_run(ensure_experiment(config))
    return RunLogger(config.resolved_tracking_uri, run.info.run_id), client


def _monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]


def _busy(seconds: float) -> None:
    """Keep one core busy, so that the machine's CPU utilisation cannot read 0."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(1000))


def test_validate_records_both_splits_as_dataset_inputs(tmp_path):
    config = load_config(
        "smoke", [f"workdir={tmp_path / 'w'}", "data.resolution=8", "data.shards=2"]
    )
    client = MlflowClient(config.resolved_tracking_uri)
    experiment = ensure_experiment(config)
    runs = [client.create_run(experiment).info.run_id for _ in range(2)]
    loggers = [RunLogger(config.resolved_tracking_uri, run) for run in runs]
    out = tmp_path / "out"
    out.mkdir()
    prepared = prepare(StepContext("prepare", config, loggers[0], out, "p"))
    validate(StepContext("validate", config, loggers[1], out, "p"), prepared["dataset"])

    manifest = json.loads((Path(prepared["dataset"]) / "manifest.json").read_text())
    inputs = client.get_run(runs[1]).inputs.dataset_inputs
    by_context = {
        {t.key: t.value for t in i.tags}["mlflow.data.context"]: i.dataset for i in inputs
    }
    assert sorted(by_context) == ["evaluation", "training"]
    for context, split in (("training", "train"), ("evaluation", "holdout")):
        dataset, entry = by_context[context], manifest["splits"][split]
        assert dataset.name == f"digits-{split}"
        assert dataset.digest == entry["digest"][:36]  # MLflow's limit; whole sha256 in profile
        assert dataset.source_type == "local"
        assert json.loads(dataset.source) == {"uri": Path(prepared["dataset"]).as_uri()}
        profile = json.loads(dataset.profile)
        assert profile["sha256"] == entry["digest"]
        assert profile["dataset_sha256"] == manifest["digest"]
        assert profile["rows"] == entry["count"]
        assert profile["data_source"] == "digits"
        assert profile["shards"] == [f["file"] for f in entry["files"]]
        schema = json.loads(dataset.schema)["mlflow_colspec"]
        assert schema[0]["tensor-spec"]["shape"] == [-1, *manifest["shape"]]
    assert client.get_run(runs[0]).inputs.dataset_inputs == []  # prepare records none


def test_system_metrics_sampled_while_the_block_runs_and_stopped_when_it_raises(tmp_path):
    logger, client = _logger(tmp_path)
    with pytest.raises(RuntimeError, match="training broke"), logger.system_metrics(0.2):
        _busy(0.9)
        raise RuntimeError("training broke")
    assert _monitor_threads() == []

    cpu = client.get_metric_history(logger.run_id, CPU)
    # At least one interval of 0.2 s, and the partial one at the end.
    assert len(cpu) >= 2, cpu
    assert [m.step for m in cpu] == list(range(len(cpu)))
    # The first sample measures too (psutil's first reading would be 0.0 without a baseline).
    assert all(m.value > 0 for m in cpu), cpu
    memory = client.get_metric_history(logger.run_id, MEMORY)
    assert len(memory) == len(cpu) and all(m.value > 0 for m in memory)


def test_a_last_interval_of_a_few_milliseconds_gets_no_sample_of_its_own(tmp_path):
    """psutil's CPU figure over a few milliseconds reads 0 % or 100 % whatever the load (it
    counts 10 ms clock ticks): a block that ends just after a periodic sample adds no sample
    for the sliver after it."""
    logger, client = _logger(tmp_path)
    with logger.system_metrics(0.2):
        deadline = time.monotonic() + 30
        while not client.get_metric_history(logger.run_id, CPU):  # the first periodic sample
            assert time.monotonic() < deadline, "no system metrics sample within 30 s"
            time.sleep(0.005)
    cpu = client.get_metric_history(logger.run_id, CPU)
    # One sample, or two when the poll above took 0.1 s or more: never two within 0.1 s.
    gaps_ms = [b.timestamp - a.timestamp for a, b in itertools.pairwise(cpu)]
    assert len(cpu) <= 2 and all(gap >= 95 for gap in gaps_ms), (len(cpu), gaps_ms)


def test_a_block_shorter_than_the_interval_still_gets_a_sample_and_resume_continues(tmp_path):
    logger, client = _logger(tmp_path)
    with logger.system_metrics(interval_s=30):  # ends long before the first interval
        _busy(0.3)
    with logger.system_metrics(interval_s=30, resume=True):  # a retried step, same run
        _busy(0.3)
    assert [m.step for m in client.get_metric_history(logger.run_id, CPU)] == [0, 1]


def test_a_refused_write_stops_the_sampling_not_the_block(tmp_path, capsys):
    _, client = _logger(tmp_path)
    orphan = RunLogger(client.tracking_uri, "0123456789abcdef0123456789abcdef")  # no such run
    with orphan.system_metrics(interval_s=0.1):
        _busy(0.3)
        finished = True
    assert finished
    assert _monitor_threads() == []
    err = capsys.readouterr().err
    assert "system metrics of run 0123456789abcdef0123456789abcdef stopped early" in err


def test_pipeline_run_records_its_environment_as_tags(tmp_path):
    config = load_config("smoke", [f"workdir={tmp_path / 'w'}"])
    logger = start_pipeline_run(config)
    tags = MlflowClient(config.resolved_tracking_uri).get_run(logger.run_id).data.tags
    env = {
        k.removeprefix("ganpipe.env."): v for k, v in tags.items() if k.startswith("ganpipe.env.")
    }
    for package in ("torch", "ray", "mlflow", "numpy", "pyarrow"):
        assert env[package] == importlib.metadata.version(package)
    assert env["torch"] == torch.__version__
    assert env["python"] == platform.python_version()
    assert env["platform"] == platform.platform()
    assert env["cuda_available"] == str(torch.cuda.is_available()).lower()
    assert env["cuda"] == (torch.version.cuda or "none")
    assert ("gpus" in env) == torch.cuda.is_available()
