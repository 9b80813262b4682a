"""prepare → validate → train → evaluate → register."""

from __future__ import annotations

from pipelines.dag import Dag, Step
from pipelines.steps.evaluate import evaluate
from pipelines.steps.prepare import prepare
from pipelines.steps.register import register
from pipelines.steps.training import train
from pipelines.steps.validate import validate


def default_dag() -> Dag:
    return Dag(
        (
            Step("prepare", prepare, outputs=("dataset",), config_sections=("data",)),
            Step(
                "validate",
                validate,
                inputs={"dataset": "prepare.dataset"},
                outputs=("dataset", "digest"),
            ),
            Step(
                "train",
                train,
                inputs={"dataset": "validate.dataset"},
                outputs=("checkpoint", "shape"),
                config_sections=("model", "optim", "train"),
                # The step itself only waits on Ray Train; its workers hold the CPUs.
                num_cpus=0,
            ),
            Step(
                "evaluate",
                evaluate,
                inputs={"dataset": "validate.dataset", "checkpoint": "train.checkpoint"},
                outputs=("metrics", "grid"),
                config_sections=("eval",),
            ),
            Step(
                "register",
                register,
                inputs={
                    "checkpoint": "train.checkpoint",
                    "shape": "train.shape",
                    "metrics": "evaluate.metrics",
                    "digest": "validate.digest",
                },
                outputs=("model_name", "version", "alias", "model_uri"),
                config_sections=("register",),
            ),
        )
    )
