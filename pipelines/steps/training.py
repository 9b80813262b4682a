"""train: data-parallel GAN training on Ray Train, metrics streamed into the step's MLflow run."""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image

from pipelines import storage
from pipelines.dag import StepContext
from pipelines.steps.prepare import MANIFEST
from pipelines.tracking import prepared_datasets
from pipelines.train import WINDOW_TIME, ReportHandler, run_training


def split_files(dataset: str, manifest: dict[str, Any], split: str) -> list[str]:
    """The shard files of ``split``: paths, or s3:// URIs that each worker reads itself."""
    return [storage.join(dataset, f["file"]) for f in manifest["splits"][split]["files"]]


def report_to_mlflow(ctx: StepContext) -> ReportHandler:
    """The train step's handler of training reports: metrics at their step, the sample grid as
    an image of the step (the UI's image slider shows the generator improving), a progress
    line. bench/tracking_overhead.py measures what it costs."""
    t = ctx.config.train

    def on_report(metrics: dict[str, Any], checkpoint: str | None) -> None:
        step = int(metrics.pop("step"))
        grid = metrics.pop("sample_grid_png", None)
        # Logged at the time the window ended: windows reach the driver several at once.
        ended = metrics.pop(WINDOW_TIME, None)
        ctx.logger.log_metrics(metrics, step=step, at=ended)
        if grid is not None:
            image = Image.open(io.BytesIO(base64.b64decode(grid)))
            # Through the logger: kept while a tracking server is away, so training goes on.
            ctx.logger.log_image(image, key="samples", step=step, at=ended)
        eta = (t.steps - step) * t.batch_size / max(metrics["images_per_s"], 1e-9)
        distance = f" distance {metrics['eval_distance']:.2f}" if "eval_distance" in metrics else ""
        ctx.log(
            f"step {step}/{t.steps} loss_d {metrics['loss_d']:.3f} loss_g {metrics['loss_g']:.3f} "
            f"D(x) {metrics['d_real']:.2f} D(G(z)) {metrics['d_fake']:.2f}{distance} "
            f"{metrics['images_per_s']:.0f} img/s eta {eta:.0f}s"
            + (" [checkpoint]" if checkpoint else "")
        )

    return on_report


def train(ctx: StepContext, dataset: str, classifier: str) -> dict[str, Any]:
    manifest = storage.read_json(storage.join(dataset, MANIFEST), ctx.config)
    t = ctx.config.train
    # The data this run learns from (training) and is measured against (evaluation).
    ctx.logger.log_datasets(prepared_datasets(dataset, manifest))

    ctx.log(f"{t.workers} workers x {t.batch_size // t.workers} images, {t.steps} steps")
    logged = 0
    if ctx.attempt > 1:  # the earlier attempt logged into this run: log each step only once
        history = ctx.logger.client.get_metric_history(ctx.logger.run_id, "loss_d")
        logged = max((int(m.step) for m in history), default=0)
    # CPU, memory (and GPU) of this machine while training runs; stopped however it ends.
    with ctx.logger.system_metrics(resume=ctx.attempt > 1):
        result = run_training(
            ctx.config,
            shards=split_files(dataset, manifest, "train"),
            shape=tuple(manifest["shape"]),
            # Inside the step's content-addressed folder: a rerun of the same training after a
            # crash finds Ray Train's checkpoints there and continues from the latest one.
            # On S3 when the workdir is: every node sees the checkpoints.
            storage_path=storage.join(ctx.output_uri, "ray"),
            name="train",
            on_report=report_to_mlflow(ctx),
            probe={"classifier": classifier, "holdout": split_files(dataset, manifest, "holdout")},
            num_classes=manifest["num_classes"],
            already_reported=logged,
        )
    final = storage.localize(result.checkpoint_path, ctx.config)
    ctx.logger.log_artifact(final / "state.pt", "checkpoint")
    return {
        "checkpoint": result.checkpoint_path,
        "shape": manifest["shape"],
        "num_classes": manifest["num_classes"],
    }
