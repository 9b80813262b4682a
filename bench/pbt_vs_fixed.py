"""Population-based training against the best of the same fixed learning rates, same compute.

PBT (``ganpipe tune -c pbt``: population 4, one worker each, rates adapted every
``tune.perturbation_interval`` steps) starts from 4 seeded draws of (lr_g, lr_d); the comparison
trains each of those 4 settings without PBT for the same number of steps (``ganpipe run`` with
one worker) and keeps the best. Both spend population × steps × batch training images. Printed:
both evaluation distances, the images each used, PBT's exploits, and the share of the tune step's
wall time that its trials spent training (the rest: starting worker groups, checkpoints,
restores after exploits, the in-training evaluations, waiting for the cores).

    python bench/pbt_vs_fixed.py                   # digits, 2000 steps (~30 min on 2 cores)
    python bench/pbt_vs_fixed.py train.steps=1000  # an override applies to both sides
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlflow.tracking import MlflowClient  # noqa: E402

from pipelines.config import load_config, validate_population  # noqa: E402
from pipelines.runner import init_ray, run_pipeline  # noqa: E402
from pipelines.steps.default_dag import default_dag, tune_dag  # noqa: E402
from pipelines.tune import CONFIG_KEYS, initial_values  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="pbt-bench-runs")
    parser.add_argument("--out", default="", help="write the figures as JSON here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    common = [*args.overrides, f"workdir={args.workdir}", "experiment=pbt-vs-fixed"]
    config = load_config("pbt", common)
    validate_population(config)
    t, p = config.train, config.tune
    init_ray(num_cpus=max(3, p.population * t.workers * t.threads_per_worker + 1))

    fixed = []
    for i, values in enumerate(initial_values(config)):
        rates = [f"{'.'.join(CONFIG_KEYS[k])}={v}" for k, v in values.items()]
        run = load_config("pbt", [*common, *rates, f"register.model_name=pbt-bench-fixed-{i}"])
        started = time.perf_counter()
        result = run_pipeline(default_dag(), run)
        distance = result.outputs["evaluate"]["metrics"]["frechet_distance"]
        fixed.append({"values": values, "frechet_distance": distance,
                      "wall_s": round(time.perf_counter() - started, 1)})  # fmt: skip
        print(f"[fixed] {values}: FD {distance:.3f}", flush=True)

    pbt_config = load_config("pbt", [*common, "register.model_name=pbt-bench-pbt"])
    started = time.perf_counter()
    result = run_pipeline(tune_dag(), pbt_config)
    pbt_wall = time.perf_counter() - started
    tune_step = result.steps["tune"]
    client = MlflowClient(pbt_config.resolved_tracking_uri)
    lineage = json.loads(
        Path(client.download_artifacts(tune_step.run_id, "lineage.json")).read_text()
    )
    trials = client.search_runs(
        [client.get_run(result.run_id).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{tune_step.run_id}'",
    )
    # Training time of a trial: its steps at the rate its reports measured (images/s over the
    # report windows, which exclude start-up, checkpoints and evaluations).
    training_s = []
    for trial in trials:
        rates = [m.value for m in client.get_metric_history(trial.info.run_id, "images_per_s")]
        training_s.append(t.steps * t.batch_size / statistics.median(rates))
    share = sum(training_s) / (len(trials) * tune_step.duration)

    best_fixed = min(fixed, key=lambda r: r["frechet_distance"])
    pbt_distance = result.outputs["evaluate"]["metrics"]["frechet_distance"]
    images = p.population * t.steps * t.batch_size
    figures = {
        "steps": t.steps,
        "population": p.population,
        "perturbation_interval": p.perturbation_interval,
        "pbt_frechet_distance": pbt_distance,
        "best_fixed_frechet_distance": best_fixed["frechet_distance"],
        "best_fixed_values": best_fixed["values"],
        "fixed": fixed,
        "pbt_exploits": len(lineage["exploits"]),
        "training_images_each_side": images,
        "pbt_tune_step_s": round(tune_step.duration, 1),
        "pbt_pipeline_s": round(pbt_wall, 1),
        "fixed_total_s": round(sum(r["wall_s"] for r in fixed), 1),
        "pbt_training_share": round(share, 3),
    }
    print(json.dumps(figures, indent=1))
    print(
        f"\nPBT (population {p.population}): FD {pbt_distance:.3f} after "
        f"{len(lineage['exploits'])} exploits; best of the same {p.population} fixed settings: FD "
        f"{best_fixed['frechet_distance']:.3f} ({best_fixed['values']}); each side trained on "
        f"{images:,} images. Trials spent {share:.0%} of the tune step's "
        f"{tune_step.duration:.0f} s training."
    )
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
