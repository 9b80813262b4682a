"""Studies on the digits through the real pipeline: each configuration is one `ganpipe run`
(Ray Train; MLflow runs in the experiment ``study``, where a configuration shared by two studies
is trained once), on the same budget, with the evaluation figures, the distance measured during
training and a sample grid.

    python bench/study.py lr_norm          # learning-rate policies and normalizations
    python bench/study.py small_data       # no, fixed and adaptive augmentation
    python bench/study.py baseline         # the previous default beside the current one

Figures and grids go to docs/studies/<study>/ (results.json, <config>.png); the table printed at
the end is the one docs/studies.md records.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlflow.tracking import MlflowClient  # noqa: E402

from pipelines.config import load_config  # noqa: E402
from pipelines.runner import run_pipeline  # noqa: E402
from pipelines.steps.default_dag import default_dag  # noqa: E402

PREVIOUS_DEFAULT = ["model.d_norm=sync_batch", "loss.kind=nonsaturating"]
ADA = ["augment.kinds=translation,cutout", "augment.adaptive=true", "augment.p=0"]
STUDIES: dict[str, dict[str, list[str]]] = {
    "lr_norm": {
        "default (cosine, spectral D)": [],
        "constant": ["optim.warmup=none", "optim.warmup_steps=0", "optim.decay=none"],
        "plateau": ["optim.decay=plateau", "train.eval_every=100"],
        "sync batch norm D, non-saturating": PREVIOUS_DEFAULT,
    },
    "small_data": {
        "no augmentation": [],
        "fixed augmentation (DiffAugment)": ["augment.kinds=translation,cutout"],
        "adaptive augmentation (ADA)": ADA,
    },
    "baseline": {
        "previous default": PREVIOUS_DEFAULT,
        "default": [],
    },
}
ROOT = Path(__file__).resolve().parent.parent


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--workdir", default="study-runs")
    parser.add_argument("--preset", default="digits")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every configuration")
    args = parser.parse_args()
    out = ROOT / "docs" / "studies" / args.study
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, overrides in STUDIES[args.study].items():
        config = load_config(
            args.preset,
            [*overrides, *args.overrides, f"workdir={args.workdir}",
             "experiment=study", f"register.model_name=study-{slug(name)}"],
        )  # fmt: skip
        started = time.perf_counter()
        result = run_pipeline(default_dag(), config)
        wall = time.perf_counter() - started
        metrics = result.outputs["evaluate"]["metrics"]
        grid = out / f"{slug(name)}.png"
        shutil.copyfile(result.outputs["evaluate"]["grid"], grid)
        client = MlflowClient(config.resolved_tracking_uri)
        curve = [
            (m.step, round(m.value, 3))
            for m in client.get_metric_history(result.steps["train"].run_id, "eval_distance")
        ]
        rows.append({
            "name": name, "overrides": overrides, "run_id": result.run_id,
            "wall_s": round(wall, 1), "grid": str(grid.relative_to(ROOT)), "curve": curve,
            **{k: metrics[k] for k in (
                "frechet_distance", "frechet_distance_floor", "frechet_distance_gaussian",
                "frechet_distance_gmm", "class_coverage", "memorization_ratio", "precision",
                "recall")},
        })  # fmt: skip
        (out / "results.json").write_text(json.dumps(rows, indent=1))
        print(f"[study] {name}: FD {metrics['frechet_distance']:.3f} ({wall:.0f}s)", flush=True)
    gmm = rows[0]["frechet_distance_gmm"]
    print(f"\n| configuration | FD | best during training | vs GMM {gmm:.2f} | classes | "
          "memorization ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        best = min(d for _, d in r["curve"]) if r["curve"] else float("nan")
        verdict = "beats" if r["frechet_distance"] < r["frechet_distance_gmm"] else "loses"
        print(f"| {r['name']} | {r['frechet_distance']:.3f} | {best:.3f} | {verdict} | "
              f"{r['class_coverage']}/10 | {r['memorization_ratio']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
