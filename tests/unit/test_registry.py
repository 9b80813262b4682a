"""Alias policy on a real MLflow registry (SQLite store), without Ray."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipelines.registry import CHALLENGER, CHAMPION, DISTANCE_TAG, apply_alias_policy


@pytest.fixture
def client(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("gen")
    return client


def _new_version(client, tmp_path) -> str:
    source = tmp_path / "model"
    source.mkdir(exist_ok=True)
    return client.create_model_version("gen", source.as_uri()).version


def test_first_version_is_champion_then_only_a_better_one_takes_over(client, tmp_path):
    v1 = _new_version(client, tmp_path)
    assert apply_alias_policy(client, "gen", v1, 10.0) == CHAMPION

    v2 = _new_version(client, tmp_path)
    assert apply_alias_policy(client, "gen", v2, 12.0) == CHALLENGER
    assert client.get_model_version_by_alias("gen", CHAMPION).version == v1
    assert client.get_model_version_by_alias("gen", CHALLENGER).version == v2

    v3 = _new_version(client, tmp_path)
    assert apply_alias_policy(client, "gen", v3, 10.0) == CHALLENGER  # a tie does not take over

    v4 = _new_version(client, tmp_path)
    assert apply_alias_policy(client, "gen", v4, 7.5) == CHAMPION
    assert client.get_model_version_by_alias("gen", CHAMPION).version == v4
    assert client.get_model_version("gen", v4).tags[DISTANCE_TAG] == "7.5"
