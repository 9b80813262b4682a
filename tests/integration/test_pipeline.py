"""The whole DAG on the smoke preset, on a real local Ray and a real MLflow store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from pipelines.steps.validate import load_split

pytestmark = pytest.mark.integration
STEPS = ["prepare", "validate", "fit_features", "train", "evaluate", "register"]


def test_every_step_is_a_finished_nested_run(smoke_run):
    config, result = smoke_run
    client = MlflowClient(config.resolved_tracking_uri)
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.workers"] == "2"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{result.run_id}'"
    )
    by_step = {r.data.tags["ganpipe.step"]: r for r in children}
    assert sorted(by_step) == sorted(STEPS)
    for run in children:
        assert run.info.status == "FINISHED"
        assert len(run.data.tags["ganpipe.fingerprint"]) == 64
        assert run.data.metrics["duration_s"] > 0


def test_the_feature_classifier_is_ready_before_training_measures_with_it(smoke_run):
    _, result = smoke_run
    features, train = result.steps["fit_features"], result.steps["train"]
    assert features.status == train.status == "ran"
    assert features.ended <= train.started


def test_training_starts_no_ray_data_process(smoke_run):
    """The workers read their shards themselves: Ray Train's DatasetManager actor (a process of
    its own at every start, pipelines.train.torch_trainer_class) is left out."""
    from ray.util.state import list_actors

    classes = [actor.class_name for actor in list_actors(limit=10_000, detail=False)]
    assert classes.count("RayTrainWorker") >= 2  # the smoke run's two workers, at least
    assert "DatasetManager" not in classes


def test_model_version_leads_back_to_run_data_and_commit(smoke_run):
    config, result = smoke_run
    client = MlflowClient(config.resolved_tracking_uri)
    version = client.get_model_version(
        config.register.model_name, result.outputs["register"]["version"]
    )
    assert version.tags["ganpipe.pipeline_run"] == result.run_id
    assert version.tags["ganpipe.data_digest"] == result.outputs["validate"]["digest"]
    assert len(version.tags["ganpipe.git_commit"].removesuffix("-dirty")) in (40, len("unknown"))
    dag_text = client.download_artifacts(result.run_id, "dag.md")
    assert "train --> evaluate" in Path(dag_text).read_text()


def test_rerun_with_new_training_settings_reuses_data_and_features(smoke_run):
    from pipelines.config import load_config
    from pipelines.runner import run_pipeline
    from pipelines.steps.default_dag import default_dag

    config, first = smoke_run
    again = run_pipeline(default_dag(), config)
    assert {s.status for s in again.steps.values()} == {"cached"}
    assert again.outputs["register"] == first.outputs["register"]  # no new model version

    # Reduce-on-plateau with a threshold no distance can meet: the second evaluation (step 20)
    # is a stall, and with patience 0 the rate is halved there.
    changed = load_config(
        "smoke",
        [
            f"workdir={config.workdir}", "train.steps=20", "train.eval_every=10",
            "optim.decay=plateau", "optim.plateau_patience=0", "optim.plateau_threshold=0.99",
        ],
    )  # fmt: skip
    result = run_pipeline(default_dag(), changed)
    assert {n: s.status for n, s in result.steps.items()} == {
        "prepare": "cached",
        "validate": "cached",
        "fit_features": "cached",
        "train": "ran",
        "evaluate": "ran",
        "register": "ran",
    }
    assert result.outputs["register"]["version"] == "2"
    state = torch.load(Path(result.outputs["train"]["checkpoint"]) / "state.pt", weights_only=True)
    assert state["sched_g"]["plateau_scale"] == state["sched_d"]["plateau_scale"] == 0.5
    distances = MlflowClient(config.resolved_tracking_uri).get_metric_history(
        result.steps["train"].run_id, "eval_distance"
    )
    assert [m.step for m in distances] == [10, 20]


def test_training_metrics_arrive_per_report(smoke_run):
    config, result = smoke_run
    client = MlflowClient(config.resolved_tracking_uri)
    train_run = client.search_runs(
        [client.get_run(result.run_id).info.experiment_id],
        f"tags.`ganpipe.step` = 'train' and tags.`mlflow.parentRunId` = '{result.run_id}'",
    )[0]
    for metric in ("loss_d", "loss_g", "d_real", "d_fake", "lr_g", "lr_d", "images_per_s"):
        history = client.get_metric_history(train_run.info.run_id, metric)
        assert [m.step for m in history] == [10, 20, 30], metric
        assert all(np.isfinite(m.value) for m in history)
    # Windows 20 and 30 reach the driver in one report (train.report_seconds); each is logged
    # at the time it ended, so they stand at least window 30's own training time apart.
    ips = {m.step: m for m in client.get_metric_history(train_run.info.run_id, "images_per_s")}
    window_30_ms = 1000 * config.train.report_every * config.train.batch_size / ips[30].value
    assert ips[30].timestamp - ips[20].timestamp >= window_30_ms - 1
    lr_g = [m.value for m in client.get_metric_history(train_run.info.run_id, "lr_g")]
    assert lr_g[-1] < lr_g[0]  # cosine decay to min_lr_factor
    assert lr_g[-1] == pytest.approx(config.optim.lr_g * config.optim.min_lr_factor)
    artifacts = [a.path for a in client.list_artifacts(train_run.info.run_id, "checkpoint")]
    assert artifacts == ["checkpoint/state.pt"]
    # The in-training evaluation (train.eval_every=30 in the smoke preset) and its sample grid.
    distance = client.get_metric_history(train_run.info.run_id, "eval_distance")
    assert [m.step for m in distance] == [30] and np.isfinite(distance[0].value)
    images = [a.path for a in client.list_artifacts(train_run.info.run_id, "images")]
    assert any(p.startswith("images/samples+step+30+") and p.endswith(".png") for p in images)


def test_dataset_shards_and_manifest(smoke_run):
    config, result = smoke_run
    dataset = Path(result.outputs["prepare"]["dataset"])
    manifest = json.loads((dataset / "manifest.json").read_text())
    train, _ = load_split(dataset, "train")
    holdout, _ = load_split(dataset, "holdout")
    assert len(train) + len(holdout) == 1797
    assert manifest["splits"]["train"]["count"] == len(train)
    assert len(manifest["splits"]["train"]["files"]) == config.data.shards
    assert sum(manifest["splits"]["holdout"]["class_histogram"]) == len(holdout)
    assert train.images.shape[1:] == (1, 16, 16)
    assert not list(dataset.parent.glob(".tmp-*"))


def test_evaluation_reports_floor_and_baseline(smoke_run):
    _, result = smoke_run
    metrics = result.outputs["evaluate"]["metrics"]
    assert 0 <= metrics["frechet_distance_floor"] < metrics["frechet_distance_gaussian"]
    assert metrics["frechet_distance_floor"] < metrics["frechet_distance_gmm"]
    assert metrics["frechet_distance"] > 0
    assert 1 <= metrics["class_coverage"] <= 10
    assert metrics["classifier_accuracy"] > 0.5
    with Image.open(result.outputs["evaluate"]["grid"]) as grid:
        assert grid.size[0] > 16 * 3


def test_registered_model_loads_in_a_fresh_process(smoke_run, tmp_path):
    config, result = smoke_run
    registered = result.outputs["register"]
    assert registered["alias"] == "champion"
    uri = f"models:/{config.register.model_name}@champion"
    code = (
        "import sys, mlflow, numpy as np, pandas as pd\n"
        f"mlflow.set_tracking_uri({config.resolved_tracking_uri!r})\n"
        f"model = mlflow.pyfunc.load_model({uri!r})\n"
        "images = model.predict(pd.DataFrame({'seed': [0, 1, 2, 3]}))\n"
        f"np.save({str(tmp_path / 'fresh.npy')!r}, images)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    fresh = np.load(tmp_path / "fresh.npy")
    assert fresh.shape == (4, 16, 16, 1) and fresh.dtype == np.uint8
    assert len({fresh[i].tobytes() for i in range(4)}) == 4  # different seeds, different images

    import mlflow

    mlflow.set_tracking_uri(config.resolved_tracking_uri)
    model = mlflow.pyfunc.load_model(uri)
    again = model.predict(pd.DataFrame({"seed": [2, 0]}))
    np.testing.assert_array_equal(again, fresh[[2, 0]])  # same seed, same image
    counted = model.predict(pd.DataFrame({"seed": [5], "count": [3]}))
    assert counted.shape == (3, 16, 16, 1)


def test_generate_cli_writes_a_png_grid(smoke_run, tmp_path):
    config, _ = smoke_run
    out = tmp_path / "grid.png"
    completed = subprocess.run(
        [
            sys.executable, "-m", "pipelines.cli", "generate",
            "--model", f"models:/{config.register.model_name}@champion",
            "-n", "16", "--out", str(out), "--workdir", config.workdir,
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    with Image.open(out) as grid:
        assert grid.size == (4 * 17 + 1, 4 * 17 + 1)


def test_generate_cli_names_a_missing_model(smoke_run):
    config, _ = smoke_run
    completed = subprocess.run(
        [
            sys.executable, "-m", "pipelines.cli", "generate",
            "--model", "models:/no-such-model@champion", "--workdir", config.workdir,
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 1
    assert "cannot load model 'models:/no-such-model@champion'" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_toolkit_options_run_end_to_end(ray_session, tmp_path):
    """Spectral norm, hinge loss, lazy R1, EMA, AdamW, a cyclic policy: wired from the config to
    the checkpoint, the metrics and the registered model."""
    import torch

    from pipelines.config import load_config
    from pipelines.runner import run_pipeline
    from pipelines.steps.default_dag import default_dag

    config = load_config(
        "smoke",
        [
            f"workdir={tmp_path}", "register.model_name=toolkit", "model.d_norm=spectral",
            "loss.kind=hinge", "loss.r1_gamma=1", "loss.r1_interval=2", "ema.enabled=true",
            "ema.decay=0.9", "train.freeze_g_stats_in_d_phase=true", "train.reuse_fakes=false",
            "optim.g_optimizer=adamw",
            "optim.decay=cyclic_triangular2", "optim.cycle_half_steps=5",
            "augment.kinds=translation,cutout", "augment.adaptive=true", "augment.p=0",
            "augment.interval=2", "augment.adjust_speed=100", "augment.target=-0.9",
            "loss.lecam_weight=0.1", "model.conditional=true",
        ],
    )  # fmt: skip
    result = run_pipeline(default_dag(), config)
    state = torch.load(Path(result.outputs["train"]["checkpoint"]) / "state.pt", weights_only=True)
    assert "generator_ema" in state
    assert not torch.equal(
        state["generator_ema"]["net.0.weight"], state["generator"]["net.0.weight"]
    )
    client = MlflowClient(config.resolved_tracking_uri)
    r1 = client.get_metric_history(result.steps["train"].run_id, "r1")
    assert [m.step for m in r1] == [10, 20, 30] and all(m.value > 0 for m in r1)
    lr = [m.value for m in client.get_metric_history(result.steps["train"].run_id, "lr_g")]
    assert len(set(lr)) == 3  # the cyclic policy moved the rate between reports
    # Adaptive augmentation: with a target below any plausible E[sign(D(real))], p rises from 0
    # (by 32 images / 100 per adjustment); it is logged per report and checkpointed.
    p = [m.value for m in client.get_metric_history(result.steps["train"].run_id, "augment_p")]
    assert len(p) == 3 and 0 < p[0] <= p[-1] <= 1
    assert state["extras"]["adaptive_augment"]["p"] == pytest.approx(p[-1])
    # ADA's and LeCam's state, and the divergence guard's rollback count.
    assert set(state["extras"]) == {"adaptive_augment", "lecam", "divergence"}
    for name in ("grad_norm_g", "grad_norm_d", "lecam"):
        history = client.get_metric_history(result.steps["train"].run_id, name)
        assert [m.step for m in history] == [10, 20, 30], name
    metrics = result.outputs["evaluate"]["metrics"]
    assert np.isfinite(metrics["frechet_distance"])
    # Class-conditional: both networks learned a label embedding, evaluate asked for each class.
    assert state["generator"]["embed.weight"].shape[0] == 10
    assert "embed.parametrizations.weight.original" in state["discriminator"]
    assert 0.0 <= metrics["label_accuracy"] <= 1.0

    import mlflow

    mlflow.set_tracking_uri(config.resolved_tracking_uri)
    model = mlflow.pyfunc.load_model("models:/toolkit@champion")
    same_seed = model.predict(pd.DataFrame({"seed": [1, 1], "label": [3, 7]}))
    assert same_seed.shape == (2, 16, 16, 1)
    assert not np.array_equal(same_seed[0], same_seed[1])  # the label, not the seed, differs
