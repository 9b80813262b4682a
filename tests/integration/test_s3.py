"""The smoke pipeline with every store on S3 (moto's S3 server over HTTP): the data source, the
prepared shards, step outputs, Ray Train's checkpoints and MLflow's artifacts all live in the
bucket, and the secret key of the credentials appears nowhere it could leak."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import ray
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_digits

from pipelines.config import load_config
from pipelines.runner import run_pipeline
from pipelines.steps.default_dag import default_dag

pytestmark = pytest.mark.integration
BINARY = (".parquet", ".pt", ".png", ".pkl", ".db")


def _keys(client, bucket: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_smoke_pipeline_with_every_store_on_s3(ray_session, s3_server, tmp_path, capfd):
    s3 = s3_server.client()
    bucket = s3_server.bucket()
    digits = load_digits()
    buffer = io.BytesIO()  # the source itself on S3: the bundled digits as a .npz
    np.savez(buffer, images=(digits.images * 255 / 16).astype(np.uint8), labels=digits.target)
    s3.put_object(Bucket=bucket, Key="source/digits.npz", Body=buffer.getvalue())
    local = tmp_path / "local"
    config = load_config(
        "smoke",
        [
            f"workdir=s3://{bucket}/runs",
            f"data.source=s3://{bucket}/source/digits.npz",
            f"storage.s3_endpoint_url={s3_server.endpoint}",
            f"storage.local_dir={local}",
            f"experiment=s3-{bucket}",
        ],
    )
    result = run_pipeline(default_dag(), config)
    assert {s.status for s in result.steps.values()} == {"ran"}

    # Every output names its objects, and they are there, each prefix with its manifest.
    outputs = f"s3://{bucket}/runs/outputs/"
    assert result.outputs["prepare"]["dataset"].startswith(outputs + "prepare/")
    assert result.outputs["train"]["checkpoint"].startswith(outputs + "train/")
    keys = _keys(s3, bucket)
    for step in result.steps:
        done = [k for k in keys if k.startswith(f"runs/outputs/{step}/")]
        names = {k.rsplit("/", 1)[-1] for k in done}
        assert {"_COMPLETE.json", "_ganpipe_done.json"} <= names, step
    shards = [k for k in keys if k.startswith("runs/outputs/prepare/") and k.endswith(".parquet")]
    assert len(shards) == config.data.shards + 1  # the training shards and the held-out one
    checkpoint = result.outputs["train"]["checkpoint"][len(f"s3://{bucket}/") :]
    assert checkpoint.startswith("runs/outputs/train/") and "/ray/train/checkpoint_" in checkpoint
    assert f"{checkpoint}/state.pt" in keys  # Ray Train wrote it to S3 itself
    assert any(k.startswith("runs/outputs/evaluate/") and k.endswith("samples.png") for k in keys)
    # Ray Train wrote no checkpoint to the local staging folder (the cache holds copies).
    assert not list((local / "staging").rglob("checkpoint_*"))

    # MLflow: the artifacts (sample grid, registered model) are in the bucket, and the model
    # loads back from there.
    client = MlflowClient(config.resolved_tracking_uri)
    experiment = client.get_experiment_by_name(config.experiment)
    assert experiment.artifact_location == f"s3://{bucket}/runs/mlartifacts"
    artifacts = [k for k in keys if k.startswith("runs/mlartifacts/")]
    assert any(k.endswith("samples/samples.png") for k in artifacts)
    assert any(k.endswith("checkpoint/state.pt") for k in artifacts)
    assert any(k.endswith("/MLmodel") for k in artifacts)
    location = client.get_model_version_download_uri(
        config.register.model_name, result.outputs["register"]["version"]
    )
    assert location.startswith(f"s3://{bucket}/runs/mlartifacts/")
    model = mlflow.pyfunc.load_model(location)  # straight from the bucket
    images = model.predict(pd.DataFrame({"seed": [0, 1]}))
    assert images.shape == (2, 16, 16, 1)

    # A rerun finds every step's marker in the bucket and reuses it.
    again = run_pipeline(default_dag(), config)
    assert {s.status for s in again.steps.values()} == {"cached"}

    # The secret key is nowhere: MLflow's params, tags, metric keys (through the API and in the
    # store's file), every text object in the bucket, the local staging and cache, the logs.
    secret = s3_server.secret
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2 * (1 + len(result.steps))
    for run in runs:
        for mapping in (run.data.params, run.data.tags):
            assert not any(secret in f"{k}={v}" for k, v in mapping.items()), run.info.run_id
        assert not any(secret in key for key in run.data.metrics)
    database = config.resolved_tracking_uri.removeprefix("sqlite:///")
    with sqlite3.connect(database) as db:
        for (table,) in db.execute("select name from sqlite_master where type='table'"):
            for row in db.execute(f"select * from {table}"):  # noqa: S608 (our own table names)
                assert secret not in repr(row), table
    texts = [k for k in keys if not k.endswith(BINARY)]
    assert any(k.endswith("outputs.json") for k in texts)
    for key in texts:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert secret.encode() not in body, key
    for path in local.rglob("*"):
        if path.is_file() and not path.name.endswith(BINARY):
            assert secret.encode() not in path.read_bytes(), path
    out, err = capfd.readouterr()
    assert "[train] step 30/30" in out + err  # the logs were captured
    assert secret not in out + err
    ray_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in ray_logs.rglob("*"):  # every worker's, the raylet's, Train's and Tune's
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
