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
from pipelines.storage import atomic_dir, is_remote, localize, write_json_atomic

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


def _check_classes(source: str, labels: np.ndarray) -> None:
    """Labels must name classes 0..K-1, each with two images at least (one to train on, one
    held out): a gap would be a class the generator is asked for and never saw."""
    fix = "relabel the classes 0..K-1 (or leave the rare ones out)"
    top = int(labels.max())
    if top >= len(labels):  # checked before bincount, which would allocate top + 1 counters
        raise ValueError(
            f"data.source {source!r}: label {top} with only {len(labels)} images: labels must "
            f"be class numbers 0..K-1 with every class present; {fix}"
        )
    counts = np.bincount(labels, minlength=top + 1)
    for problem, found in (
        ("have no images", np.flatnonzero(counts == 0)),
        ("have one image only (2 needed: one to train on, one held out)",
         np.flatnonzero(counts == 1)),
    ):  # fmt: skip
        if found.size:
            listed = ", ".join(map(str, found[:10])) + (", ..." if found.size > 10 else "")
            raise ValueError(
                f"data.source {source!r}: classes {listed} of 0..{top} {problem}; {fix}"
            )


def prepare(ctx: StepContext) -> dict[str, Any]:
    c = ctx.config.data
    # A source on S3 is copied once into the local cache: every reader wants local files.
    source = str(localize(c.source, ctx.config)) if is_remote(c.source) else c.source
    data, skipped = read_source(source, c.resolution, on_bad=c.on_bad)
    if skipped:
        ctx.log(f"skipped {len(skipped)} bad file(s) (data.on_bad=skip): see skipped_files.json")
        ctx.logger.log_dict(skipped, "skipped_files.json")
    ctx.logger.log_metrics({"skipped_files": len(skipped)})
    if len(data) < 4:
        raise ValueError(f"data.source {c.source!r} holds {len(data)} images; need at least 4")
    if data.labels.min() < 0:
        raise ValueError(f"data.source {c.source!r}: labels must be >= 0")
    _check_classes(c.source, data.labels)
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
            "source_format": detect_format(source),
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
