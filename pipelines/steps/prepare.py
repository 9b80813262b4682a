"""prepare: read the source, split train/held-out, write Parquet shards and a manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from sklearn.model_selection import train_test_split

from gan.data import ImageSet, detect_format, read_source
from gan.data.shards import content_digest, split_shards, to_table
from pipelines.dag import StepContext
from pipelines.storage import atomic_dir, write_json_atomic

MANIFEST = "manifest.json"
FORMAT = "ganpipe-shards/1"


def _describe(data: ImageSet, num_classes: int) -> dict[str, Any]:
    return {
        "count": len(data),
        "class_histogram": np.bincount(data.labels, minlength=num_classes).tolist(),
        "digest": content_digest(data),
    }


def _write_split(directory: Path, split: str, parts: list[ImageSet]) -> list[dict[str, Any]]:
    files = []
    for i, part in enumerate(parts):
        name = f"{split}-{i:05d}-of-{len(parts):05d}.parquet"
        pq.write_table(to_table(part), directory / name)
        files.append({"file": name, "rows": len(part)})
    return files


def prepare(ctx: StepContext) -> dict[str, Any]:
    c = ctx.config.data
    data, skipped = read_source(c.source, c.resolution, on_bad=c.on_bad)
    if skipped:
        ctx.log(f"skipped {len(skipped)} bad file(s) (data.on_bad=skip): see skipped_files.json")
        ctx.logger.log_dict(skipped, "skipped_files.json")
    ctx.logger.log_metrics({"skipped_files": len(skipped)})
    if len(data) < 4:
        raise ValueError(f"data.source {c.source!r} holds {len(data)} images; need at least 4")
    if data.labels.min() < 0:
        raise ValueError(f"data.source {c.source!r}: labels must be >= 0")
    num_classes = int(data.labels.max()) + 1
    train_idx, holdout_idx = train_test_split(
        np.arange(len(data)),
        test_size=c.holdout_fraction,
        random_state=c.seed,
        stratify=data.labels,
    )
    train = ImageSet(data.images[train_idx], data.labels[train_idx])
    if c.shards > len(train):
        raise ValueError(
            f"data.shards ({c.shards}) is more than the {len(train)} training images; "
            "lower data.shards"
        )
    holdout = ImageSet(data.images[holdout_idx], data.labels[holdout_idx])
    ctx.log(f"{len(data)} images {data.shape}: {len(train)} train, {len(holdout)} held out")

    final = ctx.output_dir / "dataset"
    with atomic_dir(final) as tmp:
        manifest = {
            "format": FORMAT,
            "source": c.source,
            "source_format": detect_format(c.source),
            "skipped_files": len(skipped),
            "shape": list(data.shape),
            "num_classes": num_classes,
            "splits": {
                "train": {
                    **_describe(train, num_classes),
                    "files": _write_split(tmp, "train", split_shards(train, c.shards)),
                },
                "holdout": {
                    **_describe(holdout, num_classes),
                    "files": _write_split(tmp, "holdout", [holdout]),
                },
            },
        }
        manifest["digest"] = content_digest(data)
        write_json_atomic(tmp / MANIFEST, manifest)  # written last: its presence means complete
    ctx.logger.log_metrics({"train_images": len(train), "holdout_images": len(holdout)})
    ctx.logger.set_tags({"ganpipe.data_digest": manifest["digest"]})
    return {"dataset": str(final)}
