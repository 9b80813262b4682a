"""train: data-parallel GAN training on Ray Train, metrics streamed into the step's MLflow run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.dag import StepContext
from pipelines.steps.prepare import MANIFEST
from pipelines.train import run_training


def train(ctx: StepContext, dataset: str) -> dict[str, Any]:
    manifest = json.loads((Path(dataset) / MANIFEST).read_text())
    shards = [str(Path(dataset) / f["file"]) for f in manifest["splits"]["train"]["files"]]
    t = ctx.config.train

    def on_report(metrics: dict[str, Any], checkpoint: str | None) -> None:
        step = int(metrics["step"])
        ctx.logger.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=step)
        eta = (t.steps - step) * t.batch_size / max(metrics["images_per_s"], 1e-9)
        ctx.log(
            f"step {step}/{t.steps} loss_d {metrics['loss_d']:.3f} loss_g {metrics['loss_g']:.3f} "
            f"D(x) {metrics['d_real']:.2f} D(G(z)) {metrics['d_fake']:.2f} "
            f"{metrics['images_per_s']:.0f} img/s eta {eta:.0f}s"
            + (" [checkpoint]" if checkpoint else "")
        )

    ctx.log(f"{t.workers} workers x {t.batch_size // t.workers} images, {t.steps} steps")
    result = run_training(
        ctx.config,
        shards=shards,
        shape=tuple(manifest["shape"]),
        # Inside the step's content-addressed folder: a rerun of the same training after a crash
        # finds Ray Train's checkpoints there and continues from the latest one.
        storage_path=str(ctx.output_dir / "ray"),
        name="train",
        on_report=on_report,
    )
    ctx.logger.log_artifact(Path(result.checkpoint_path) / "state.pt", "checkpoint")
    return {"checkpoint": result.checkpoint_path, "shape": manifest["shape"]}
