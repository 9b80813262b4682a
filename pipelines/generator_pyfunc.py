"""The registered generator as an MLflow pyfunc model ("models from code").

MLflow copies this file into the model, with the ``gan`` package as code, so a model loads
wherever torch, numpy, pandas and mlflow are installed. Input: a table with a ``seed`` column (and
optionally ``count``: that many images drawn in order from the seed). Output: uint8 images
(N, H, W, C). The same seed gives the same image in every process.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import torch

from gan.data.arrays import from_model_range
from gan.nn.models import Generator
from gan.sampling import generate, latents_from_seeds

MAX_IMAGES_PER_CALL = 100_000


class GeneratorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:  # noqa: ANN001
        with open(context.artifacts["spec"]) as f:
            spec = json.load(f)
        self.generator = Generator(**spec["generator"])
        weights = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.generator.load_state_dict(weights)
        self.generator.eval()
        self.latent_dim = spec["generator"]["latent_dim"]

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:  # noqa: ANN001
        if not isinstance(model_input, pd.DataFrame) or "seed" not in model_input:
            raise ValueError("input must be a table with an integer 'seed' column")
        seeds = [int(s) for s in model_input["seed"]]
        counts = [int(c) for c in model_input["count"]] if "count" in model_input else None
        if counts is not None and any(c < 0 for c in counts):
            raise ValueError("'count' must be >= 0")
        total = sum(counts) if counts is not None else len(seeds)
        if total > MAX_IMAGES_PER_CALL:
            raise ValueError(f"at most {MAX_IMAGES_PER_CALL} images per call")
        latents = latents_from_seeds(seeds, self.latent_dim, counts)
        images = from_model_range(generate(self.generator, latents))  # (N, C, H, W)
        return np.ascontiguousarray(np.transpose(images, (0, 2, 3, 1)))


mlflow.models.set_model(GeneratorModel())
