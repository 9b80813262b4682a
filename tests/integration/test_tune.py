"""Population-based training on a real Ray Tune: an exploit really happens and really transfers
the donor's state, with the mutated learning rate in effect afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.config import load_config
from pipelines.faults import FAULT_CRASH_MARKER_ENV, FAULT_CRASH_STEP_ENV
from pipelines.runner import run_pipeline
from pipelines.steps.default_dag import tune_dag
from pipelines.train import CHECKPOINT_OWNER, weights_digest

pytestmark = pytest.mark.integration


CRASH_AT = 15  # one trial's worker raises after this step, between its checkpoints 10 and 20


@pytest.fixture(scope="module")
def population(smoke_run, tmp_path_factory):
    """Two one-worker trials, ranked synchronously at step 20 of 30: the worse one must clone
    the better one there. Constant rates, so the rate in effect is the mutated value itself.
    One trial crashes once at step 15 (a fault injected in its worker, no Ray Train restart
    within the trial): Tune must restart it from its own step-10 checkpoint."""
    smoke_config, _ = smoke_run
    config = load_config(
        "smoke",
        [
            f"workdir={smoke_config.workdir}", "register.model_name=ganpipe-tune-test",
            "train.workers=1", "train.eval_every=10", "tune.population=2",
            "tune.perturbation_interval=20", "tune.quantile_fraction=0.5",
            "tune.synchronous=true", "optim.warmup=none", "optim.warmup_steps=0",
            "optim.decay=none", "train.max_failures=0", "tune.max_failures=1",
        ],
    )  # fmt: skip
    marker = tmp_path_factory.mktemp("fault") / "crashed"
    with pytest.MonkeyPatch.context() as env:
        env.setenv(FAULT_CRASH_STEP_ENV, str(CRASH_AT))
        env.setenv(FAULT_CRASH_MARKER_ENV, str(marker))
        result = run_pipeline(tune_dag(), config)
    assert marker.exists(), "the injected crash did not happen"
    client = MlflowClient(config.resolved_tracking_uri)
    tune_run = result.steps["tune"].run_id
    lineage = json.loads(Path(client.download_artifacts(tune_run, "lineage.json")).read_text())
    return config, result, client, lineage


def test_the_data_steps_are_reused_and_the_best_trial_is_registered(population):
    config, result, _, lineage = population
    assert {n: s.status for n, s in result.steps.items()} == {
        "prepare": "cached", "validate": "cached", "fit_features": "cached",
        "tune": "ran", "evaluate": "ran", "register": "ran",
    }  # fmt: skip
    assert result.outputs["register"]["model_name"] == "ganpipe-tune-test"
    best_folder = Path(result.outputs["tune"]["checkpoint"])
    owner = json.loads((best_folder / CHECKPOINT_OWNER).read_text())
    assert owner["step"] == config.train.steps
    assert lineage["trial_ids"][lineage["best_trial"]] == owner["owner"]


def test_the_clone_continues_from_the_donors_state_with_the_mutated_rate(population):
    config, result, client, lineage = population
    assert len(lineage["exploits"]) == 1  # one ranking (step 20), two trials, quantile 0.5
    exploit = lineage["exploits"][0]
    assert exploit["step"] == 20
    assert exploit["new"] != exploit["old"]

    # The weights the clone loaded are the donor's at the exploit step.
    pbt_folder = Path(result.outputs["tune"]["checkpoint"]).parent.parent
    donor_id = lineage["trial_ids"][exploit["donor"]]
    donor_states = [
        folder.parent / "state.pt"
        for folder in pbt_folder.rglob(CHECKPOINT_OWNER)
        if json.loads(folder.read_text()) == {"owner": donor_id, "step": 20}
    ]
    assert donor_states
    state = torch.load(donor_states[0], weights_only=True)
    assert exploit["weights_sha256"] == weights_digest(state["generator"], state["discriminator"])

    # Its step counter went on from 20, with the mutated rates in the optimizers.
    children = client.search_runs(
        [client.get_run(result.run_id).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{result.steps['tune'].run_id}'",
    )
    clone = next(r for r in children if r.info.run_name == exploit["trial"])
    for name in ("lr_g", "lr_d"):
        history = client.get_metric_history(clone.info.run_id, name)
        assert [m.step for m in history] == [10, 20, 30]
        assert history[-1].value == pytest.approx(exploit["new"][name], rel=1e-9)
    distances = client.get_metric_history(clone.info.run_id, "eval_distance")
    assert [m.step for m in distances] == [10, 20, 30]


def test_every_trial_has_a_nested_run_and_the_lineage_is_plotted(population):
    _, result, client, lineage = population
    tune_run = result.steps["tune"].run_id
    children = client.search_runs(
        [client.get_run(result.run_id).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{tune_run}'",
    )
    assert sorted(r.info.run_name for r in children) == ["trial_0", "trial_1"]
    assert {r.info.status for r in children} == {"FINISHED"}
    artifacts = {a.path for a in client.list_artifacts(tune_run)}
    assert {"lineage.json", "lineage.png", "checkpoint"} <= artifacts
    assert set(lineage["initial"]) == {"trial_0", "trial_1"}


def test_a_crashed_trial_restarts_from_its_own_checkpoint_and_the_population_goes_on(population):
    config, result, client, lineage = population
    # Its own step-10 checkpoint, not a clone: recorded as a restart, not as an exploit.
    assert [r["step"] for r in lineage["restarts"]] == [10]
    assert lineage["restarts"][0]["trial"] in lineage["trial_ids"]
    assert all(e["step"] == 20 for e in lineage["exploits"])
    children = client.search_runs(
        [client.get_run(result.run_id).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{result.steps['tune'].run_id}'",
    )
    assert len(children) == config.tune.population
    for run in children:  # every trial evaluated at every interval, each step once
        history = client.get_metric_history(run.info.run_id, "eval_distance")
        assert [m.step for m in history] == [10, 20, 30], run.info.run_name
