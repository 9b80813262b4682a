"""evaluate: score generated images in the feature space of a classifier of the dataset itself.

Four Fréchet distances on the same features, against the held-out images: the GAN's samples,
the training images (the floor: what a perfect generator would get), samples of one Gaussian
fitted to the training pixels (the trivial baseline a GAN must beat) and samples of a
10-component Gaussian mixture fitted to them (a stronger baseline, per-mode pixel statistics,
that a GAN on small data should beat too). Beside them: KID, the classifier Inception Score,
precision/recall and density/coverage (k nearest neighbours), class coverage, and the
memorization ratio in pixel space.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from gan.data.arrays import to_model_range
from gan.metrics import (
    class_coverage,
    classifier_inception_score,
    density_coverage,
    fit_gaussian,
    fit_gaussian_mixture,
    frechet_distance,
    kernel_inception_distance,
    load_inception_extractor,
    mean_confidence,
    memorization_ratio,
    precision_recall,
)
from gan.nn.normalization import batch_norm_layers, recompute_bn_statistics
from gan.sampling import balanced_labels, generate, latents_from_seeds
from gan.state import load_generator_weights
from pipelines.dag import StepContext
from pipelines.images import save_grid
from pipelines.loop import build_models
from pipelines.seeds import EVAL_SEED, STANDING_STATS_SEED
from pipelines.steps.features import load_classifier
from pipelines.steps.validate import load_split
from pipelines.storage import localize

GMM_COMPONENTS = 10  # one per digit class; fitting takes about 5 s on the digits (one core)
GMM_MAX_IMAGES = 5000  # EM costs K * N * D^2 per iteration: bound N on MNIST or CIFAR-10


def load_generator(
    config: Any, checkpoint: str, channels: int, num_classes: int = 0
) -> torch.nn.Module:
    """The trained generator, ready to sample as ``eval.sampling_mode`` says: with standing
    batch-norm statistics when ``eval.standing_stats_batches`` asks for them."""
    generator, _ = build_models(config, channels, num_classes)
    generator.load_state_dict(load_generator_weights(checkpoint))
    batches = config.eval.standing_stats_batches
    if batches and batch_norm_layers(generator):
        size, dim = config.train.batch_size, config.model.latent_dim
        labels = balanced_labels(size, generator.num_classes)
        recompute_bn_statistics(
            generator,
            (
                (latents_from_seeds([STANDING_STATS_SEED + i], dim, [size]), labels)
                for i in range(batches)
            ),
        )
    return generator.train(config.eval.sampling_mode == "train")


def evaluate(
    ctx: StepContext, dataset: str, checkpoint: str, classifier: str, accuracy: float
) -> dict[str, Any]:
    cfg = ctx.config
    train_set, manifest = load_split(dataset, "train", cfg)
    holdout_set, _ = load_split(dataset, "holdout", cfg)
    train_x, holdout_x = to_model_range(train_set.images), to_model_range(holdout_set.images)
    extractor = load_classifier(localize(classifier, cfg))

    checkpoint = str(localize(checkpoint, cfg))  # a Ray Train checkpoint: a folder or s3://
    generator = load_generator(cfg, checkpoint, train_set.shape[0], manifest["num_classes"])
    seeds = list(range(EVAL_SEED, EVAL_SEED + cfg.eval.samples))
    requested = balanced_labels(len(seeds), generator.num_classes)
    latents = latents_from_seeds(seeds, cfg.model.latent_dim)
    samples = generate(generator, latents, labels=requested)
    if not torch.isfinite(samples).all():
        raise ValueError("the generator produced NaN or infinite pixels; training diverged")
    baseline = torch.from_numpy(fit_gaussian(train_x.numpy()).sample(cfg.eval.samples, seed=0))
    mixture = fit_gaussian_mixture(
        train_x.numpy(), components=GMM_COMPONENTS, seed=0, max_images=GMM_MAX_IMAGES
    )
    mixture_samples = torch.from_numpy(mixture.sample(cfg.eval.samples, seed=0))

    def feats(x: torch.Tensor) -> np.ndarray:
        return extractor.features(x).numpy().astype(np.float64)

    holdout_f, samples_f = feats(holdout_x), feats(samples)
    probabilities = extractor.predict_proba(samples).numpy()
    kid, kid_std = kernel_inception_distance(samples_f, holdout_f)
    inception, inception_std = classifier_inception_score(probabilities)
    precision, recall = precision_recall(holdout_f, samples_f)
    density, coverage = density_coverage(holdout_f, samples_f)
    flat = [x.reshape(len(x), -1).numpy().astype(np.float64) for x in (train_x, holdout_x, samples)]
    memorization = memorization_ratio(*flat)
    metrics = {
        "frechet_distance": frechet_distance(samples_f, holdout_f),
        "frechet_distance_floor": frechet_distance(feats(train_x), holdout_f),
        "frechet_distance_gaussian": frechet_distance(feats(baseline), holdout_f),
        "frechet_distance_gmm": frechet_distance(feats(mixture_samples), holdout_f),
        "class_coverage": class_coverage(probabilities),
        "mean_confidence": mean_confidence(probabilities),
        "classifier_accuracy": accuracy,
        "kid": kid,
        "kid_std": kid_std,
        "inception_score": inception,
        "inception_score_std": inception_std,
        "precision": precision,
        "recall": recall,
        "density": density,
        "coverage": coverage,
        # Pixel space: below 1, samples sit closer to training images than unseen real ones do.
        "memorization_ratio": memorization["ratio"],
        "sample_to_train_distance": memorization["sample_to_train"],
        "holdout_to_train_distance": memorization["holdout_to_train"],
    }
    if requested is not None:  # a conditional G: does it draw the class it is asked for?
        asked = requested.numpy()
        metrics["label_accuracy"] = float((probabilities.argmax(axis=1) == asked).mean())
    if cfg.eval.inception_weights:  # the classic FID, for users who have the weights on disk
        inception = load_inception_extractor(cfg.eval.inception_weights)
        ctx.log(f"Inception features of {len(samples) + len(holdout_x)} images (slow on CPU)")
        metrics["fid_inception"] = frechet_distance(
            inception.features(samples).numpy().astype(np.float64),
            inception.features(holdout_x).numpy().astype(np.float64),
        )
    ctx.logger.log_metrics(metrics)
    grid = save_grid(samples[: cfg.eval.grid_size], ctx.output_dir / "samples.png")
    ctx.logger.log_artifact(grid, "samples")
    (ctx.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    ctx.log(
        "Fréchet distance {frechet_distance:.2f} (floor {frechet_distance_floor:.2f}, "
        "Gaussian baseline {frechet_distance_gaussian:.2f}, Gaussian mixture "
        "{frechet_distance_gmm:.2f}), classes covered "
        "{class_coverage}/{num_classes}, mean confidence {mean_confidence:.3f}".format(
            num_classes=manifest["num_classes"], **metrics
        )
    )
    return {"metrics": metrics, "grid": str(grid)}
