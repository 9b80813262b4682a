"""The prepare and validate steps on an image folder with a corrupt file, without Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from gan.data import BadImagesError
from pipelines.config import ConfigError, load_config
from pipelines.dag import StepContext
from pipelines.steps.prepare import prepare
from pipelines.steps.validate import load_split, validate
from pipelines.tracking import RunLogger, ensure_experiment


def _image_folder(root, per_class=6, classes=3):
    rng = np.random.default_rng(0)
    for k in range(classes):
        folder = root / f"class{k}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    (root / "class1" / "broken.png").write_bytes(b"not a png at all")
    return root


def _context(tmp_path, source, *overrides):
    config = load_config(
        "smoke",
        [f"workdir={tmp_path / 'w'}", f"data.source={source}", "data.resolution=8",
         "data.holdout_fraction=0.34", "data.shards=2", *overrides],
    )  # fmt: skip
    client = MlflowClient(config.resolved_tracking_uri)
    run = client.create_run(ensure_experiment(config))
    logger = RunLogger(config.resolved_tracking_uri, run.info.run_id)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return StepContext("prepare", config, logger, out, "pipeline-run"), client


def test_bad_image_fails_by_default_naming_the_file(tmp_path):
    source = _image_folder(tmp_path / "images")
    ctx, _ = _context(tmp_path, source)
    with pytest.raises(BadImagesError, match="broken.png") as info:
        prepare(ctx)
    assert "data.on_bad=skip" in str(info.value)
    assert not (ctx.output_dir / "dataset").exists()


def test_skip_leaves_bad_images_out_and_records_them(tmp_path):
    source = _image_folder(tmp_path / "images")
    ctx, client = _context(tmp_path, source, "data.on_bad=skip")
    outputs = prepare(ctx)
    train, manifest = load_split(outputs["dataset"], "train")
    holdout, _ = load_split(outputs["dataset"], "holdout")
    assert len(train) + len(holdout) == 18  # the broken file is not among them
    assert manifest["source_format"] == "image_folder"
    assert manifest["skipped_files"] == 1
    artifact = client.download_artifacts(ctx.logger.run_id, "skipped_files.json")
    skipped = json.loads(Path(artifact).read_text())
    assert [entry["file"].endswith("broken.png") for entry in skipped] == [True]
    assert validate(ctx, outputs["dataset"])["digest"] == manifest["digest"]


def test_config_checks_the_source_format_before_anything_runs(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="data.source"):
        load_config(None, [f"data.source={tmp_path / 'notes.txt'}"])
    with pytest.raises(ConfigError, match="data.on_bad: unknown 'ignore'; allowed: fail, skip"):
        load_config(None, ["data.on_bad=ignore"])


@pytest.mark.parametrize(
    ("labels", "words"),
    [
        ([0, 1, 3] * 4, ["classes 2 of 0..3 have no images", "relabel the classes 0..K-1"]),
        ([0, 1] * 6 + [2], ["classes 2 of 0..2 have one image only", "one held out"]),
        ([0, 1] * 5 + [10**12], ["label 1000000000000 with only 11 images", "0..K-1"]),
    ],
)
def test_labels_that_are_not_classes_0_to_k_are_refused_before_anything_is_written(
    tmp_path, labels, words
):
    source = tmp_path / "labels.npz"
    images = np.random.default_rng(0).integers(0, 256, (len(labels), 8, 8), dtype=np.uint8)
    np.savez(source, images=images, labels=np.asarray(labels, np.int64))
    ctx, _ = _context(tmp_path, source)
    with pytest.raises(ValueError) as info:
        prepare(ctx)
    for word in words:
        assert word in str(info.value)
    assert not list(ctx.output_dir.iterdir()), "nothing may be written"


def test_an_empty_source_is_refused_naming_it(tmp_path):
    source = tmp_path / "empty.npz"
    np.savez(source, images=np.zeros((0, 8, 8), np.uint8), labels=np.zeros(0, np.int64))
    ctx, _ = _context(tmp_path, source)
    with pytest.raises(ValueError, match=r"empty.npz' holds 0 images; need at least 4"):
        prepare(ctx)
    assert not list(ctx.output_dir.iterdir())
