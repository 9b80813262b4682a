"""Quality of training configurations on the digits, side by side on the same budget.

Each configuration trains with the pipeline's own training state and step
(``pipelines.loop.TrainingState``: the same models, optimizers, schedules, EMA, augmentation and
regularizers the Ray Train workers build from the same config keys) in one process with the whole
global batch (synchronized batch norm over N workers is batch norm over the global batch), and is
scored as the evaluate step scores it: Fréchet distance in the features of a classifier of the
digits against the held-out split, with the Gaussian and Gaussian-mixture baselines, class
coverage and the memorization ratio. The distance is also measured every ``train.eval_every``
steps, to show whether a configuration degrades late in training. No Ray, no MLflow: it runs on a
laptop's CPU or, much faster, on a GPU machine.

    python bench/quality_sweep.py --steps 2000 --jobs 2 --out sweep.json
    python bench/quality_sweep.py --only default,ada --device cuda --jobs 8
    python bench/quality_sweep.py --only sn_hinge,sn_hinge_reuse --seeds 3 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gan.data import read_source  # noqa: E402
from gan.data.arrays import to_model_range  # noqa: E402
from gan.metrics import (  # noqa: E402
    class_coverage,
    fit_gaussian,
    fit_gaussian_mixture,
    frechet_distance,
    memorization_ratio,
    train_classifier,
)
from gan.monitor import DistanceProbe  # noqa: E402
from gan.sampling import generate, latents_from_seeds  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.loop import TrainingState  # noqa: E402
from pipelines.seeds import EVAL_SEED, PROBE_SEED  # noqa: E402

AUG = ["augment.kinds=translation,cutout"]
ADA = [*AUG, "augment.adaptive=true", "augment.p=0"]
# Fresh fakes for the G update: the step these configurations were first measured with.
FRESH = ["train.reuse_fakes=false"]
SN_HINGE = ["model.d_norm=spectral", "loss.kind=hinge", *FRESH]
# The configurations are spelled out against the DCGAN base (batch-norm D, non-saturating loss:
# ganpipe's default until this sweep), so that results stay reproducible when defaults move.
DCGAN = ["model.d_norm=sync_batch", "loss.kind=nonsaturating", *FRESH]
CONFIGS: dict[str, list[str]] = {
    # learning-rate policies (batch-norm D)
    "default": DCGAN,  # the previous default: cosine after a linear warm-up
    "constant": [*DCGAN, "optim.warmup=none", "optim.warmup_steps=0", "optim.decay=none"],
    "step": [*DCGAN, "optim.decay=step", "optim.step_size=500", "optim.gamma=0.5"],
    "exponential": [*DCGAN, "optim.decay=exponential"],
    "cyclic": [*DCGAN, "optim.decay=cyclic_triangular2", "optim.cycle_half_steps=250"],
    "plateau": [*DCGAN, "optim.decay=plateau", "train.eval_every=100", "optim.plateau_patience=2"],
    "ttur": [*DCGAN, "optim.lr_g=1e-4", "optim.lr_d=4e-4"],
    # normalization
    "d_spectral": [*DCGAN, "model.d_norm=spectral"],
    "d_none": [*DCGAN, "model.d_norm=none"],
    "g_none": [*DCGAN, "model.g_norm=none"],
    # small-data techniques
    "ema": [*DCGAN, "ema.enabled=true"],
    "diffaug": [*DCGAN, *AUG],
    "ada": [*DCGAN, *ADA],
    "sn_hinge": SN_HINGE,  # ganpipe's default from this sweep to the next line's
    "sn_hinge_reuse": [*SN_HINGE, "train.reuse_fakes=true"],  # the default since 2026-11-28
    "sn_hinge_ema_ada": [*SN_HINGE, "ema.enabled=true", *ADA],
    "sn_hinge_ema_ada_lecam": [*SN_HINGE, "ema.enabled=true", *ADA, "loss.lecam_weight=0.01"],
    "ema_ada": [*DCGAN, "ema.enabled=true", *ADA],
    "ema_diffaug": [*DCGAN, "ema.enabled=true", *AUG],
    "ema_ada_r1": [*DCGAN, "ema.enabled=true", *ADA, "model.d_norm=spectral", "loss.r1_gamma=0.1"],
}


def split_digits(config) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]:
    """The prepare step's train/held-out split of the configured source."""
    c = config.data
    data, _ = read_source(c.source, c.resolution, on_bad=c.on_bad)
    train_idx, holdout_idx = train_test_split(
        np.arange(len(data)), test_size=c.holdout_fraction, random_state=c.seed,
        stratify=data.labels,
    )  # fmt: skip
    return (
        to_model_range(data.images[train_idx]), data.labels[train_idx],
        to_model_range(data.images[holdout_idx]), data.labels[holdout_idx],
    )  # fmt: skip


def run_one(name: str, overrides: list[str], steps: int, device_name: str) -> dict:
    torch.set_num_threads(1)
    device = torch.device(device_name)
    config = load_config("digits", [*overrides, f"train.steps={steps}", "train.workers=1"])
    if config.train.eval_every == 0 or "train.eval_every" not in " ".join(overrides):
        config.train.eval_every = max(steps // 20, 1)
    train_x, train_y, holdout_x, _ = split_digits(config)
    classifier = train_classifier(
        train_x, train_y, num_classes=10, feature_dim=64,
        epochs=config.eval.classifier_epochs, seed=config.data.seed,
    )  # fmt: skip
    probe_seeds = list(range(PROBE_SEED, PROBE_SEED + config.train.eval_samples))
    probe = DistanceProbe(classifier, holdout_x, probe_seeds, config.model.latent_dim)
    state = TrainingState(config, channels=1, device=device)
    data = train_x.to(device)
    curve, started = [], time.perf_counter()
    for step in range(steps):
        index = torch.randint(0, len(data), (config.train.batch_size,), generator=state.rng)
        stats = state.step(data[index.to(device)], step)
        state.adapt_augmentation(stats, step)
        done = step + 1
        if done % config.train.eval_every == 0 or done == steps:
            distance = probe.distance(probe.samples(state.evaluated).cpu())
            state.report_plateau(distance)
            curve.append((done, round(distance, 3)))
    seconds = time.perf_counter() - started

    generator = state.evaluated.eval()
    seeds = list(range(EVAL_SEED, EVAL_SEED + config.eval.samples))
    samples = generate(generator, latents_from_seeds(seeds, config.model.latent_dim)).cpu()
    feats = {k: classifier.features(v).numpy().astype(np.float64)
             for k, v in (("samples", samples), ("holdout", holdout_x))}  # fmt: skip
    flat = [x.reshape(len(x), -1).numpy().astype(np.float64) for x in (train_x, holdout_x, samples)]
    return {
        "name": name,
        "overrides": overrides,
        "steps": steps,
        "frechet_distance": frechet_distance(feats["samples"], feats["holdout"]),
        "best_during_training": min(d for _, d in curve),
        "class_coverage": class_coverage(classifier.predict_proba(samples).numpy()),
        "memorization_ratio": memorization_ratio(*flat)["ratio"],
        "augment_p": state.augment.p if state.augment is not None else None,
        "curve": curve,
        "train_seconds": round(seconds, 1),
        "device": device_name,
    }


def baselines(steps_config_overrides: list[str]) -> dict:
    config = load_config("digits", steps_config_overrides)
    train_x, train_y, holdout_x, _ = split_digits(config)
    classifier = train_classifier(
        train_x, train_y, num_classes=10, feature_dim=64,
        epochs=config.eval.classifier_epochs, seed=config.data.seed,
    )  # fmt: skip
    n = config.eval.samples
    holdout_f = classifier.features(holdout_x).numpy().astype(np.float64)

    def distance(images: torch.Tensor) -> float:
        return frechet_distance(classifier.features(images).numpy().astype(np.float64), holdout_f)

    gaussian = torch.from_numpy(fit_gaussian(train_x.numpy()).sample(n, seed=0))
    mixture = fit_gaussian_mixture(train_x.numpy(), seed=0)  # 10 components, as evaluate
    return {
        "floor": distance(train_x),
        "gaussian": distance(gaussian),
        "gmm": distance(torch.from_numpy(mixture.sample(n, seed=0))),
    }


def plot_curves(results: list[dict], names: list[str], steps: int, path: Path, gmm: float) -> None:
    """The distance during training of ``names`` at ``steps``, with the GMM baseline's level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        if r["name"] in names and r["steps"] == steps:
            ax.plot(*zip(*r["curve"], strict=True), label=r["name"])
    ax.axhline(gmm, color="k", linestyle="--", label=f"Gaussian mixture ({gmm:.2f})")
    ax.set(xlabel="step", ylabel="Fréchet distance (classifier features)", yscale="log")
    ax.set_title("Evaluation distance during training (digits, 16×16, batch 64)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _worker(args: tuple[str, list[str], int, str]) -> dict:
    return run_one(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[2000])
    parser.add_argument("--only", default="", help="comma-separated config names")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument(
        "--seeds", type=int, default=1, help="train each config with train.seed 0, 1, ..."
    )
    parser.add_argument("--out", default="")
    parser.add_argument(
        "--plot",
        nargs=2,
        metavar=("RESULTS_JSON", "PNG"),
        help="plot the curves of --only at the last --steps from a saved run",
    )
    parser.add_argument("--gmm", type=float, default=0.0, help="baseline level for --plot")
    args = parser.parse_args()
    if args.plot:
        results = json.loads(Path(args.plot[0]).read_text())
        plot_curves(results, args.only.split(","), args.steps[-1], Path(args.plot[1]), args.gmm)
        return
    names = [n for n in args.only.split(",") if n] or list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown config {unknown[0]!r}; known: {', '.join(CONFIGS)}")
    print(f"baselines: {json.dumps(baselines([]))}", flush=True)
    tasks = [
        (f"{n}/seed{seed}" if args.seeds > 1 else n, [*CONFIGS[n], f"train.seed={seed}"], s,
         args.device)
        for s in args.steps for n in names for seed in range(args.seeds)
    ]  # fmt: skip
    results = []
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for result in pool.imap_unordered(_worker, tasks):
            results.append(result)
            r = result
            print(
                f"{r['name']:<24} steps {r['steps']:>5}  FD {r['frechet_distance']:7.3f}"
                f"  best {r['best_during_training']:7.3f}  classes {r['class_coverage']:>2}"
                f"  memorization {r['memorization_ratio']:.2f}  {r['train_seconds']:.0f}s",
                flush=True,
            )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
