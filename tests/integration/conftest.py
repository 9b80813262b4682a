"""One local Ray instance for all integration tests, and one smoke pipeline run they inspect."""

from __future__ import annotations

import pytest

from pipelines.config import load_config
from pipelines.runner import init_ray, run_pipeline
from pipelines.steps.default_dag import default_dag

from .mlflow_server import mlflow_server, tracking_backend  # noqa: F401  (session fixtures)


@pytest.fixture(scope="session")
def ray_session(s3_server):
    # After s3_server: Ray's processes inherit its credentials (tests/conftest.py).
    import ray

    init_ray(num_cpus=3)  # like the embedded default: cores + 1
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke")


@pytest.fixture(scope="session")
def smoke_run(ray_session, smoke_workdir):
    config = load_config("smoke", [f"workdir={smoke_workdir}"])
    result = run_pipeline(default_dag(), config)
    return config, result
