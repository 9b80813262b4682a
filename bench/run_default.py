"""Time the default `ganpipe run` step by step (or any preset/overrides given as arguments).

    python bench/run_default.py                 # the embedded default
    python bench/run_default.py -c smoke        # a preset
    python bench/run_default.py train.steps=500 # overrides

Prints the wall time of Ray start-up, each step, and the total, plus the evaluation figures.
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

    started = time.perf_counter()
    from pipelines.config import load_config
    from pipelines.runner import init_ray, run_pipeline
    from pipelines.steps.default_dag import default_dag

    with tempfile.TemporaryDirectory() as workdir:
        config = load_config(args.config, [f"workdir={workdir}", *args.overrides])
        init_ray()
        ray_ready = time.perf_counter()
        result = run_pipeline(default_dag(), config)
        total = time.perf_counter() - started

    print()
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"torch threads, {__import__('os').cpu_count()} CPUs, torch {torch.__version__}"
    )
    print(f"{'import + ray.init':20s} {ray_ready - started:7.1f} s")
    for step, seconds in result.durations.items():
        print(f"{step:20s} {seconds:7.1f} s")
    print(f"{'total':20s} {total:7.1f} s")
    metrics = result.outputs["evaluate"]["metrics"]
    for key, value in metrics.items():
        print(f"{key:28s} {value:.3f}")


if __name__ == "__main__":
    main()
