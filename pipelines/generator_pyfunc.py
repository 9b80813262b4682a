"""The registered generator as an MLflow pyfunc model ("models from code").

MLflow copies this file into the model, with the ``gan`` package as code, so a model loads
wherever torch, numpy, pandas, pillow and mlflow are installed.

Input: a table with a ``seed`` column (integers >= 0), optionally ``count`` (that many images
drawn in order from the seed; default 1) and ``label`` (the class, for a class-conditional
generator: every image of the row is of that class; without the column the images cycle through
the classes in order, as the evaluate step draws them. An unconditional generator refuses the
column, so that a caller never takes unconditioned images for images of a class).

Output, by the ``format`` param: ``"array"`` (default) uint8 images (N, H, W, C); ``"png"`` a
table with ``seed``, ``index`` (the image's position in the seed's draw), ``label`` (conditional
generators only) and ``png`` (the PNG file as bytes; ``mlflow models serve`` sends them
base64-encoded).

Sampling mode (``spec.json``, set from the config at training time): ``"eval"`` normalizes with
the running batch-norm statistics, so a seed always gives the same image; ``"train"``
normalizes with the statistics of the requested batch (as the generator saw during training),
so an image depends on the whole request, and the same request always gives the same images.
"""

from __future__ import annotations

import io
import json
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image

from gan.data.arrays import from_model_range
from gan.nn.models import Generator
from gan.nn.normalization import frozen_bn_stats
from gan.sampling import balanced_labels, generate, latents_from_seeds

MAX_IMAGES_PER_CALL = 100_000
FORMATS = ("array", "png")
SAMPLING_MODES = ("eval", "train")


class InvalidRequest(MlflowException, ValueError):
    """A request the model refuses. As an MlflowException with INVALID_PARAMETER_VALUE,
    ``mlflow models serve`` answers 400 with this message rather than a generic one."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def _integers(frame: pd.DataFrame, column: str) -> list[int]:
    """The column as Python ints, refusing what is not a whole number (floats, text, NaN)."""
    values = frame[column]
    if not pd.api.types.is_integer_dtype(values.dtype):
        raise InvalidRequest(
            f"'{column}' must hold integers, got {values.dtype} values like {values.iloc[0]!r}"
        )
    return [int(v) for v in values]


def _png(image: np.ndarray) -> bytes:
    """One (H, W, C) uint8 image as PNG bytes: grey for one channel, RGB for three."""
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


class GeneratorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:  # noqa: ANN001
        with open(context.artifacts["spec"]) as f:
            spec = json.load(f)
        self.sampling_mode = spec.get("sampling_mode", "eval")
        if self.sampling_mode not in SAMPLING_MODES:
            raise ValueError(
                f"spec.json: sampling_mode {self.sampling_mode!r} is not one of {SAMPLING_MODES}"
            )
        self.generator = Generator(**spec["generator"])
        self.num_classes = self.generator.num_classes
        weights = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.generator.load_state_dict(weights)
        self.generator.eval()
        self.latent_dim = spec["generator"]["latent_dim"]

    def _labels(self, frame: pd.DataFrame, counts: list[int]) -> torch.Tensor | None:
        """One label per image: the row's, or the classes in turn when no label is given."""
        given = "label" in frame and frame["label"].notna().any()
        if not self.num_classes:
            if given:
                raise InvalidRequest(
                    "this generator is unconditional: drop the 'label' column "
                    "(labels are only accepted by class-conditional models)"
                )
            return None
        if not given:
            return balanced_labels(sum(counts), self.num_classes)
        labels = _integers(frame, "label")
        wrong = [x for x in labels if not 0 <= x < self.num_classes]
        if wrong:
            raise InvalidRequest(
                f"'label' must be a class in 0..{self.num_classes - 1}, got {wrong[0]}"
            )
        return torch.repeat_interleave(torch.tensor(labels), torch.tensor(counts))

    def _images(self, latents: torch.Tensor, labels: torch.Tensor | None) -> np.ndarray:
        if self.sampling_mode == "train" and latents.shape[0] > 0:
            # Batch statistics of the whole request: one chunk, and the running buffers stay
            # untouched so that the next request sees the same model.
            self.generator.train()
            try:
                with frozen_bn_stats(self.generator):
                    images = generate(
                        self.generator, latents, batch_size=latents.shape[0], labels=labels
                    )
            finally:
                self.generator.eval()
        else:
            images = generate(self.generator, latents, labels=labels)
        return np.ascontiguousarray(np.transpose(from_model_range(images), (0, 2, 3, 1)))

    def predict(
        self,
        context,  # noqa: ANN001
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> np.ndarray | pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or "seed" not in model_input:
            raise InvalidRequest("input must be a table with an integer 'seed' column")
        output_format = (params or {}).get("format") or "array"
        if output_format not in FORMATS:
            raise InvalidRequest(f"params: format {output_format!r} is not one of {FORMATS}")
        seeds = _integers(model_input, "seed") if len(model_input) else []
        if any(s < 0 for s in seeds):
            raise InvalidRequest(f"'seed' must be >= 0, got {min(seeds)}")
        if "count" in model_input and len(model_input):
            counts = _integers(model_input, "count")
        else:
            counts = [1] * len(seeds)
        if any(c < 0 for c in counts):
            raise InvalidRequest(f"'count' must be >= 0, got {min(counts)}")
        if sum(counts) > MAX_IMAGES_PER_CALL:
            raise InvalidRequest(
                f"at most {MAX_IMAGES_PER_CALL} images per call, asked {sum(counts)}"
            )
        labels = self._labels(model_input, counts)
        images = self._images(latents_from_seeds(seeds, self.latent_dim, counts), labels)
        if output_format == "array":
            return images
        table = {
            "seed": np.repeat(np.asarray(seeds, dtype=np.int64), counts),
            "index": np.concatenate([np.arange(c) for c in counts] or [np.zeros(0, int)]),
        }
        if labels is not None:
            table["label"] = labels.numpy()
        return pd.DataFrame({**table, "png": [_png(image) for image in images]})


mlflow.models.set_model(GeneratorModel())
