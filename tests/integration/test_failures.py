"""A step that fails leaves no half-written output and no model version behind."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipelines.config import load_config
from pipelines.runner import StepFailed, run_pipeline
from pipelines.steps.default_dag import default_dag

pytestmark = pytest.mark.integration


def test_bad_source_fails_in_prepare_with_a_clear_message(ray_session, tmp_path):
    source = tmp_path / "floats.npz"
    np.savez(source, images=np.random.rand(20, 8, 8), labels=np.arange(20) % 2)
    config = load_config("smoke", [f"workdir={tmp_path / 'w'}", f"data.source={source}"])

    with pytest.raises(StepFailed) as info:
        run_pipeline(default_dag(), config)
    assert info.value.step == "prepare"
    assert "'images' must be uint8" in str(info.value)

    outputs = tmp_path / "w" / "outputs"
    assert not list(outputs.rglob("dataset")), "no dataset folder may exist after a failure"
    assert not list(outputs.rglob(".tmp-*")), "temporary folders are cleaned up"
    client = MlflowClient(config.resolved_tracking_uri)
    assert client.search_registered_models() == []
    runs = client.search_runs([client.get_experiment_by_name(config.experiment).experiment_id])
    statuses = {r.data.tags.get("ganpipe.step", "pipeline"): r.info.status for r in runs}
    assert statuses == {"pipeline": "FAILED", "prepare": "FAILED"}
