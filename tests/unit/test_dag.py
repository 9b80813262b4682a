import pytest

from pipelines.config import load_config
from pipelines.dag import Dag, Step, fingerprint
from pipelines.steps.default_dag import default_dag


def _noop(ctx, **inputs):
    return {}


def test_default_dag_order_and_edges():
    dag = default_dag()
    assert dag.names == ["prepare", "validate", "fit_features", "train", "evaluate", "register"]
    order = [s.name for s in dag.order()]
    assert order.index("fit_features") < order.index("evaluate")
    assert order.index("train") < order.index("evaluate") < order.index("register")
    mermaid = dag.mermaid()
    assert "prepare --> validate" in mermaid and "train --> evaluate" in mermaid
    assert dag.step("train").num_cpus == 0  # the Train workers hold the CPUs


def test_inputs_must_name_existing_steps_and_outputs():
    with pytest.raises(ValueError, match="step 'a' has no output 'missing'; its outputs: x"):
        Dag((Step("a", _noop, outputs=("x",)), Step("b", _noop, inputs={"y": "a.missing"})))
    with pytest.raises(ValueError, match="there is no step 'nope'; steps: a, b"):
        Dag((Step("a", _noop, outputs=("x",)), Step("b", _noop, inputs={"y": "nope.x"})))


def test_duplicate_names_are_refused():
    with pytest.raises(ValueError, match=r"duplicate step names: \['a'\]"):
        Dag((Step("a", _noop), Step("a", _noop)))


def test_cycles_are_refused():
    with pytest.raises(ValueError, match="a -> b depend on each other in a cycle"):
        Dag(
            (
                Step("a", _noop, inputs={"x": "b.y"}, outputs=("x",)),
                Step("b", _noop, inputs={"x": "a.x"}, outputs=("y",)),
            )
        )


def test_fingerprint_changes_with_own_params_and_inputs_only():
    dag = default_dag()
    train = dag.step("train")
    base = load_config("smoke")
    fp = fingerprint(train, base, {"validate": "v1"})
    assert fp == fingerprint(train, load_config("smoke"), {"validate": "v1"})
    assert fp != fingerprint(train, load_config("smoke", ["optim.lr_g=1e-3"]), {"validate": "v1"})
    assert fp != fingerprint(train, base, {"validate": "v2"})
    # Everything the training loop reads is in its fingerprint: the loss and EMA sections too.
    for override in ("loss.kind=least_squares", "ema.enabled=true", "train.eval_every=10"):
        assert fp != fingerprint(train, load_config("smoke", [override]), {"validate": "v1"})
    # An evaluation-only change does not touch the training fingerprint.
    assert fp == fingerprint(train, load_config("smoke", ["eval.samples=50"]), {"validate": "v1"})


def _noop_changed(ctx, **inputs):
    return {"changed": True}


def test_code_change_changes_the_fingerprint():
    config = load_config("smoke")
    assert fingerprint(Step("x", _noop), config, {}) != fingerprint(
        Step("x", _noop_changed), config, {}
    )
    assert fingerprint(Step("x", _noop), config, {}) != fingerprint(
        Step("x", _noop, version="2"), config, {}
    )


def test_downstream_and_fingerprints_of_the_default_dag():
    dag = default_dag()
    assert dag.downstream({"train"}) == {"train", "evaluate", "register"}
    assert dag.downstream({"fit_features"}) == {"fit_features", "train", "evaluate", "register"}
    base = dag.fingerprints(load_config("smoke"))
    new_lr = dag.fingerprints(load_config("smoke", ["optim.lr_g=1e-3"]))
    changed = {name for name in base if base[name] != new_lr[name]}
    assert changed == {"train", "evaluate", "register"}


def test_the_documented_evaluate_only_pipeline_builds_from_the_same_steps():
    from pipelines.steps.default_dag import EVALUATE, FIT_FEATURES, PREPARE, TRAIN, VALIDATE

    evaluate_only = Dag((PREPARE, VALIDATE, FIT_FEATURES, TRAIN, EVALUATE))
    config = load_config("smoke")
    shared = default_dag().fingerprints(config)
    # Same steps, same inputs: same fingerprints, so a run of either reuses the other's outputs.
    assert evaluate_only.fingerprints(config) == {n: shared[n] for n in evaluate_only.names}
