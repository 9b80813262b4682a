"""What the smoke pipeline's runs record besides metrics: the dataset inputs of validate and
train, train's system metrics, the parent run's environment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration


def _step_runs(client: MlflowClient, parent_id: str) -> dict[str, object]:
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    return {r.data.tags["ganpipe.step"]: r for r in children}


def test_validate_and_train_runs_hold_the_splits_as_dataset_inputs(smoke_run):
    config, result = smoke_run
    client = MlflowClient(config.resolved_tracking_uri)
    folder = Path(result.outputs["validate"]["dataset"])
    manifest = json.loads((folder / "manifest.json").read_text())
    runs = _step_runs(client, result.run_id)
    for step in ("validate", "train"):
        inputs = client.get_run(runs[step].info.run_id).inputs.dataset_inputs
        found = {{t.key: t.value for t in i.tags}["mlflow.data.context"]: i.dataset for i in inputs}
        assert sorted(found) == ["evaluation", "training"], step
        for context, split in (("training", "train"), ("evaluation", "holdout")):
            dataset = found[context]
            assert dataset.digest == manifest["splits"][split]["digest"][:36], (step, split)
            assert json.loads(dataset.source)["uri"] == folder.as_uri()
            profile = json.loads(dataset.profile)
            assert profile["sha256"] == manifest["splits"][split]["digest"]
            assert profile["data_source"] == config.data.source
            # The same digest the registered model is tagged with.
            assert profile["dataset_sha256"] == result.outputs["validate"]["digest"]


def test_train_run_has_system_metrics(smoke_run):
    config, result = smoke_run
    client = MlflowClient(config.resolved_tracking_uri)
    train = client.get_run(_step_runs(client, result.run_id)["train"].info.run_id)
    for key in (
        "system/cpu_utilization_percentage",
        "system/system_memory_usage_megabytes",
        "system/system_memory_usage_percentage",
        "system/disk_usage_percentage",
        "system/network_receive_megabytes",
    ):
        history = client.get_metric_history(train.info.run_id, key)
        assert history, f"no {key}"
        assert [m.step for m in history] == list(range(len(history)))
    memory = client.get_metric_history(train.info.run_id, "system/system_memory_usage_megabytes")
    assert all(m.value > 0 for m in memory)
    # Sampled while the step ran (the monitor stopped before the run finished).
    assert all(train.info.start_time <= m.timestamp <= train.info.end_time for m in memory)
    if not torch.cuda.is_available():
        assert not any(k.startswith("system/gpu_") for k in train.data.metrics)


def test_pipeline_run_records_the_environment(smoke_run):
    config, result = smoke_run
    tags = MlflowClient(config.resolved_tracking_uri).get_run(result.run_id).data.tags
    assert tags["ganpipe.env.torch"] == torch.__version__
    for name in ("python", "platform", "ray", "mlflow", "numpy", "pyarrow", "cuda_available"):
        assert tags[f"ganpipe.env.{name}"], name
