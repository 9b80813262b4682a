"""validate: prove the prepared shards are complete, consistent and usable for training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from gan.data import ImageSet
from gan.data.shards import concat, content_digest, read_shard
from pipelines import storage
from pipelines.config import Config
from pipelines.dag import StepContext
from pipelines.steps.prepare import FORMAT, MANIFEST
from pipelines.tracking import prepared_datasets


class DatasetInvalid(ValueError):
    pass


def load_split(
    dataset: str | Path, split: str, config: Config | None = None
) -> tuple[ImageSet, dict[str, Any]]:
    """The images of one split and the manifest, checked against each other. ``dataset`` is a
    folder or (with the ``config`` that says how to reach it) an s3:// prefix, read in place
    through pyarrow's file system."""
    directory = str(dataset)
    fs, root = storage.filesystem(directory, config or Config())
    manifest_path = storage.join(directory, MANIFEST)
    if fs.get_file_info(f"{root}/{MANIFEST}").type != pafs.FileType.File:
        raise DatasetInvalid(f"{directory}: no {MANIFEST}; the dataset was not fully written")
    with fs.open_input_stream(f"{root}/{MANIFEST}") as stream:
        manifest = json.loads(stream.read())
    if manifest.get("format") != FORMAT:
        raise DatasetInvalid(f"{manifest_path}: format {manifest.get('format')!r} != {FORMAT!r}")
    shape = tuple(manifest["shape"])
    entry = manifest["splits"][split]
    parts = []
    for f in entry["files"]:
        path = storage.join(directory, f["file"])
        if fs.get_file_info(f"{root}/{f['file']}").type != pafs.FileType.File:
            raise DatasetInvalid(f"{path}: shard listed in the manifest is missing")
        part = read_shard(f"{root}/{f['file']}", shape, filesystem=fs)
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
        data, manifest = load_split(dataset, split, ctx.config)
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
