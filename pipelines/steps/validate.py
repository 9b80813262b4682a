"""validate: prove the prepared shards are complete, consistent and usable for training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from gan.data import ImageSet
from gan.data.shards import concat, content_digest, read_shard
from pipelines.dag import StepContext
from pipelines.steps.prepare import FORMAT, MANIFEST
from pipelines.tracking import prepared_datasets


class DatasetInvalid(ValueError):
    pass


def load_split(dataset: str | Path, split: str) -> tuple[ImageSet, dict[str, Any]]:
    """The images of one split and the manifest, checked against each other."""
    directory = Path(dataset)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise DatasetInvalid(f"{directory}: no {MANIFEST}; the dataset was not fully written")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise DatasetInvalid(f"{manifest_path}: format {manifest.get('format')!r} != {FORMAT!r}")
    shape = tuple(manifest["shape"])
    entry = manifest["splits"][split]
    parts = []
    for f in entry["files"]:
        path = directory / f["file"]
        if not path.is_file():
            raise DatasetInvalid(f"{path}: shard listed in the manifest is missing")
        part = read_shard(path, shape)
        if len(part) != f["rows"]:
            raise DatasetInvalid(f"{path}: {len(part)} rows, manifest says {f['rows']}")
        parts.append(part)
    data = concat(parts)
    if content_digest(data) != entry["digest"]:
        raise DatasetInvalid(f"{directory}: {split} content digest differs from the manifest")
    return data, manifest


def validate(ctx: StepContext, dataset: str) -> dict[str, Any]:
    figures = {}
    for split in ("train", "holdout"):
        data, manifest = load_split(dataset, split)
        num_classes = manifest["num_classes"]
        if data.labels.min() < 0 or data.labels.max() >= num_classes:
            raise DatasetInvalid(f"{split}: labels outside 0..{num_classes - 1}")
        histogram = np.bincount(data.labels, minlength=num_classes)
        empty = [int(k) for k in np.flatnonzero(histogram == 0)]
        if empty:
            raise DatasetInvalid(f"{split}: no images of classes {empty}")
        if data.images.std() == 0:
            raise DatasetInvalid(f"{split}: all pixels are equal")
        figures[f"{split}_images"] = len(data)
        ctx.log(f"{split}: {len(data)} images, {num_classes} classes, digest ok")
    ctx.logger.log_metrics(figures)
    # Checked, so recorded: the MLflow dataset inputs (source, digest, profile) of both splits.
    ctx.logger.log_datasets(prepared_datasets(dataset, manifest))
    return {"dataset": dataset, "digest": manifest["digest"]}
