"""The runner on a real local Ray and a real MLflow store: cache, invalidation, parallel branches,
retries, half-written outputs."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipelines.config import load_config
from pipelines.dag import Dag, Step
from pipelines.runner import DONE_MARKER, StepFailed, output_dir, run_pipeline

from . import toy_steps as toy

pytestmark = pytest.mark.integration


def chain(last=toy.plus_one) -> Dag:
    """a -> b -> c; a reads data.*, b reads train.*, c reads nothing."""
    return Dag(
        (
            Step("a", toy.source, outputs=("value",), config_sections=("data",), num_cpus=0.1),
            Step("b", toy.double, {"value": "a.value"}, ("value",), ("train",), num_cpus=0.1),
            Step("c", last, {"value": "b.value"}, ("value",), num_cpus=0.1),
        )
    )


def statuses(result) -> dict[str, str]:
    return {name: step.status for name, step in result.steps.items()}


@pytest.fixture
def config(tmp_path):
    return load_config("smoke", [f"workdir={tmp_path}", "data.seed=3"])


def test_rerun_is_fully_cached_and_says_so(ray_session, config, capsys):
    first = run_pipeline(chain(), config)
    assert statuses(first) == {"a": "ran", "b": "ran", "c": "ran"}
    assert first.outputs["c"]["value"] == 3 * 2 + 0 + 1

    second = run_pipeline(chain(), config)
    assert statuses(second) == {"a": "cached", "b": "cached", "c": "cached"}
    assert second.outputs == first.outputs
    assert "[c] cached (from run" in capsys.readouterr().out

    client = MlflowClient(config.resolved_tracking_uri)
    tags = client.get_run(second.steps["b"].run_id).data.tags
    assert tags["ganpipe.cache"] == "hit"
    assert tags["ganpipe.cached_from"] == first.steps["b"].run_id
    assert client.get_run(first.steps["b"].run_id).data.tags["ganpipe.cache"] == "miss"
    parent = client.get_run(second.run_id).data.tags
    assert parent["ganpipe.step.a"] == "cached"


def test_a_parameter_change_reruns_that_step_and_downstream_only(ray_session, config, tmp_path):
    run_pipeline(chain(), config)
    changed = load_config("smoke", [f"workdir={tmp_path}", "data.seed=3", "train.seed=5"])
    result = run_pipeline(chain(), changed)
    assert statuses(result) == {"a": "cached", "b": "ran", "c": "ran"}
    assert result.outputs["c"]["value"] == 3 * 2 + 5 + 1


def test_a_code_change_reruns_that_step(ray_session, config):
    run_pipeline(chain(), config)
    result = run_pipeline(chain(last=toy.plus_one_changed), config)
    assert statuses(result) == {"a": "cached", "b": "cached", "c": "ran"}


def test_force_and_no_cache(ray_session, config):
    run_pipeline(chain(), config)
    assert statuses(run_pipeline(chain(), config, force=("b",))) == {
        "a": "cached",
        "b": "ran",
        "c": "ran",
    }
    assert set(statuses(run_pipeline(chain(), config, use_cache=False)).values()) == {"ran"}


def test_a_half_written_output_is_not_taken_as_finished(ray_session, config):
    dag = chain()
    run_pipeline(dag, config)
    fingerprints = dag.fingerprints(config)
    (output_dir(config, "b", fingerprints["b"]) / DONE_MARKER).unlink()
    result = run_pipeline(dag, config)
    assert statuses(result) == {"a": "cached", "b": "ran", "c": "cached"}


def test_independent_steps_overlap_in_time(ray_session, config):
    dag = Dag(
        (
            Step("a", toy.source, outputs=("value",), num_cpus=0.1),
            Step("left", toy.sleeper, {"value": "a.value"}, ("started", "ended"), num_cpus=0.5),
            Step("right", toy.sleeper, {"value": "a.value"}, ("started", "ended"), num_cpus=0.5),
        )
    )
    result = run_pipeline(dag, config)
    left, right = result.outputs["left"], result.outputs["right"]
    overlap = min(left["ended"], right["ended"]) - max(left["started"], right["started"])
    assert overlap > 2.0, (left, right)


def test_retry_then_success_is_recorded(ray_session, config):
    dag = Dag(
        (
            Step("a", toy.source, outputs=("value",), num_cpus=0.1),
            Step(
                "flaky", toy.flaky, {"value": "a.value"}, ("value", "attempt"),
                num_cpus=0.1, retries=2, retry_on=(OSError,),
            ),
        )
    )  # fmt: skip
    result = run_pipeline(dag, config)
    assert result.steps["flaky"].status == "ran"
    assert result.steps["flaky"].attempts == 2
    assert result.outputs["flaky"]["attempt"] == 2
    tags = MlflowClient(config.resolved_tracking_uri).get_run(result.steps["flaky"].run_id)
    assert tags.data.tags["ganpipe.retried"] == "true"
    assert tags.data.tags["ganpipe.attempts"] == "2"
    assert "OSError: transient" in tags.data.tags["ganpipe.last_error"]


def test_other_exceptions_are_not_retried(ray_session, config):
    dag = Dag(
        (
            Step("a", toy.source, outputs=("value",), num_cpus=0.1),
            Step(
                "broken", toy.broken, {"value": "a.value"}, ("value",),
                num_cpus=0.1, retries=3, retry_on=(OSError,),
            ),
        )
    )  # fmt: skip
    with pytest.raises(StepFailed, match="ValueError: a bug") as info:
        run_pipeline(dag, config)
    assert info.value.step == "broken"
    client = MlflowClient(config.resolved_tracking_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name(config.experiment).experiment_id],
        "tags.`ganpipe.step` = 'broken'",
    )
    assert [r.data.tags["ganpipe.attempts"] for r in runs] == ["1"]
    assert runs[0].info.status == "FAILED"
