"""fit_features: the feature-extractor classifier, trained on the dataset's own labels.

It depends only on the data, so its fingerprint does not change when only training settings do:
a rerun with new learning rates reuses it. The train step uses it too, to measure the evaluation
distance while the GAN trains.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gan.data import ImageSet
from gan.data.arrays import to_model_range
from gan.metrics import DigitClassifier, classifier_accuracy, train_classifier
from pipelines.config import Config
from pipelines.dag import StepContext
from pipelines.steps.validate import load_split

WEIGHTS, SPEC = "classifier.pt", "classifier.json"


def fit_features(ctx: StepContext, dataset: str) -> dict[str, Any]:
    train_set, manifest = load_split(dataset, "train", ctx.config)
    holdout_set, _ = load_split(dataset, "holdout", ctx.config)
    classifier, spec = fit_classifier(ctx.config, train_set, manifest["num_classes"])
    accuracy = classifier_accuracy(
        classifier, to_model_range(holdout_set.images), holdout_set.labels
    )
    ctx.log(f"feature classifier: held-out accuracy {accuracy:.3f}")
    ctx.logger.log_metrics({"classifier_accuracy": accuracy})
    save_classifier(ctx.output_dir, classifier, spec)
    return {"classifier": str(ctx.output_dir), "accuracy": accuracy}


def fit_classifier(
    config: Config, train_set: ImageSet, num_classes: int
) -> tuple[DigitClassifier, dict[str, int]]:
    """The feature classifier trained on ``train_set``, and the spec that rebuilds it."""
    spec = {
        "in_channels": train_set.shape[0],
        "resolution": train_set.shape[1],
        "num_classes": num_classes,
        "feature_dim": 64,
    }
    classifier = train_classifier(
        to_model_range(train_set.images),
        train_set.labels,
        num_classes=num_classes,
        feature_dim=spec["feature_dim"],
        epochs=config.eval.classifier_epochs,
        seed=config.data.seed,
    )
    return classifier, spec


def save_classifier(
    directory: str | Path, classifier: DigitClassifier, spec: dict[str, int]
) -> None:
    """The two files :func:`load_classifier` reads."""
    torch.save(classifier.state_dict(), Path(directory) / WEIGHTS)
    (Path(directory) / SPEC).write_text(json.dumps(spec))


def load_classifier(directory: str | Path) -> DigitClassifier:
    """The fit_features classifier from a local folder (``storage.localize`` an s3:// one)."""
    spec = json.loads((Path(directory) / SPEC).read_text())
    classifier = DigitClassifier(**spec)
    weights = torch.load(Path(directory) / WEIGHTS, map_location="cpu", weights_only=True)
    classifier.load_state_dict(weights)
    return classifier.eval()
