"""Time the default `ganpipe run` step by step (or any preset/overrides given as arguments).

    python bench/run_default.py                 # the embedded default
    python bench/run_default.py -c smoke        # a preset
    python bench/run_default.py train.steps=500 # overrides

Prints the wall time of Ray start-up, each step, and the total; the time from the command to
the first training step (the train step's first report, less the steps it covers at that
report's rate); the wall time of a fully cached rerun in the same workdir; and the evaluation
figures.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-c", "--config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    started, started_epoch = time.perf_counter(), time.time()
    from mlflow.tracking import MlflowClient

    from pipelines.config import load_config
    from pipelines.runner import init_ray, run_pipeline
    from pipelines.steps.default_dag import default_dag

    with tempfile.TemporaryDirectory() as workdir:
        config = load_config(args.config, [f"workdir={workdir}", *args.overrides])
        init_ray()
        ray_ready = time.perf_counter()
        result = run_pipeline(default_dag(), config)
        total = time.perf_counter() - started
        reports = MlflowClient(config.resolved_tracking_uri).get_metric_history(
            result.steps["train"].run_id, "images_per_s"
        )
        first = min(reports, key=lambda m: m.step)
        covered = first.step * config.train.batch_size / first.value  # seconds of those steps
        first_step = first.timestamp / 1000 - covered - started_epoch
        rerun_started = time.perf_counter()
        rerun = run_pipeline(default_dag(), config)
        cached = time.perf_counter() - rerun_started
        statuses = {step: outcome.status for step, outcome in rerun.steps.items()}

    print()
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"torch threads, {__import__('os').cpu_count()} CPUs, torch {torch.__version__}"
    )
    print(f"{'import + ray.init':20s} {ray_ready - started:7.1f} s")
    for step, seconds in result.durations.items():
        print(f"{step:20s} {seconds:7.1f} s")
    print(f"{'total':20s} {total:7.1f} s")
    print(f"{'command to 1st step':20s} {first_step:7.1f} s")
    print(f"{'cached rerun':20s} {cached:7.1f} s  ({statuses})")
    metrics = result.outputs["evaluate"]["metrics"]
    for key, value in metrics.items():
        print(f"{key:28s} {value:.3f}")


if __name__ == "__main__":
    main()
