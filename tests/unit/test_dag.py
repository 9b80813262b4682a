import pytest

from pipelines.config import load_config
from pipelines.dag import Dag, Step, fingerprint
from pipelines.steps.default_dag import default_dag


def _noop(ctx, **inputs):
    return {}


def test_default_dag_order_and_edges():
    dag = default_dag()
    assert [s.name for s in dag.order()] == ["prepare", "validate", "train", "evaluate", "register"]
    mermaid = dag.mermaid()
    assert "prepare --> validate" in mermaid and "train --> evaluate" in mermaid
    assert dag.step("train").num_cpus == 0  # the Train workers hold the CPUs


def test_inputs_must_name_existing_outputs():
    with pytest.raises(ValueError, match="no output 'a.missing'"):
        Dag((Step("a", _noop, outputs=("x",)), Step("b", _noop, inputs={"y": "a.missing"})))


def test_cycles_are_refused():
    with pytest.raises(ValueError, match="cycle"):
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
    # An evaluation-only change does not touch the training fingerprint.
    assert fp == fingerprint(train, load_config("smoke", ["eval.samples=50"]), {"validate": "v1"})
