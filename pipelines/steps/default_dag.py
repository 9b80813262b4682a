"""prepare → validate → fit_features → train → evaluate → register."""

from __future__ import annotations

from dataclasses import replace

from pipelines.dag import Dag, Step
from pipelines.steps.evaluate import evaluate
from pipelines.steps.features import fit_features
from pipelines.steps.prepare import prepare
from pipelines.steps.register import register
from pipelines.steps.training import train
from pipelines.steps.tuning import tune
from pipelines.steps.validate import validate

PREPARE = Step("prepare", prepare, outputs=("dataset",), config_sections=("data",))
VALIDATE = Step(
    "validate", validate, inputs={"dataset": "prepare.dataset"}, outputs=("dataset", "digest")
)
FIT_FEATURES = Step(
    "fit_features",
    fit_features,
    inputs={"dataset": "validate.dataset"},
    outputs=("classifier", "accuracy"),
    config_sections=("eval",),
)
TRAIN = Step(
    "train",
    train,
    # The classifier scores the generator while it trains (train.eval_every).
    inputs={"dataset": "validate.dataset", "classifier": "fit_features.classifier"},
    outputs=("checkpoint", "shape", "num_classes"),
    config_sections=("model", "optim", "loss", "augment", "ema", "train", "perf"),
    num_cpus=0,  # the step only waits on Ray Train; its workers hold the CPUs
    retries=1,  # a rerun continues from the last checkpoint in the step's folder
    retry_on=(OSError,),
)
EVALUATE = Step(
    "evaluate",
    evaluate,
    inputs={
        "dataset": "validate.dataset",
        "checkpoint": "train.checkpoint",
        "classifier": "fit_features.classifier",
        "accuracy": "fit_features.accuracy",
    },
    outputs=("metrics", "grid"),
    config_sections=("eval",),
)
REGISTER = Step(
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
)


TUNE = replace(TRAIN, name="tune", fn=tune, config_sections=(*TRAIN.config_sections, "tune"))


def default_dag() -> Dag:
    return Dag((PREPARE, VALIDATE, FIT_FEATURES, TRAIN, EVALUATE, REGISTER))


def tune_dag() -> Dag:
    """The same pipeline with population-based training in place of train."""

    def from_tune(step: Step) -> Step:
        inputs = {k: v.replace("train.", "tune.") for k, v in step.inputs.items()}
        return replace(step, inputs=inputs)

    return Dag((PREPARE, VALIDATE, FIT_FEATURES, TUNE, from_tune(EVALUATE), from_tune(REGISTER)))
