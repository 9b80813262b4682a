"""Runner overhead: a chain of 20 no-op steps on a warm local Ray, and a fully cached rerun of the
default pipeline.

    python bench/runner_overhead.py                      # trains the default once, then reruns
    python bench/runner_overhead.py --workdir ganpipe-runs   # reuse a finished default run

Prints seconds per no-op step (run and cached) and the wall time of the cached rerun beyond
Ray's start.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import ray.cloudpickle

from pipelines.config import load_config
from pipelines.dag import Dag, Step
from pipelines.runner import init_ray, run_pipeline
from pipelines.steps.default_dag import default_dag

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
NOOP_STEPS = 20


def noop(ctx, **inputs):
    return {"out": 0}


def noop_chain() -> Dag:
    steps = [Step("s0", noop, outputs=("out",), num_cpus=0.1)]
    for i in range(1, NOOP_STEPS):
        steps.append(Step(f"s{i}", noop, {"x": f"s{i - 1}.out"}, ("out",), num_cpus=0.1))
    return Dag(tuple(steps))


def timed(fn, *args, **kwargs) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", help="workdir of a finished default run (else: run it)")
    args = parser.parse_args()

    started = time.perf_counter()
    init_ray()
    print(f"ray.init: {time.perf_counter() - started:.1f} s")

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config("smoke", [f"workdir={tmp}"])
        timed(run_pipeline, noop_chain(), config, use_cache=False)  # warm the worker pool
        ran = timed(run_pipeline, noop_chain(), config, use_cache=False)
        cached = timed(run_pipeline, noop_chain(), config)
    for label, seconds in (("run", ran), ("cached", cached)):
        per_step = seconds / NOOP_STEPS * 1000
        print(f"{NOOP_STEPS} no-op steps, {label:6s}: {seconds:6.2f} s ({per_step:.0f} ms/step)")

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, [f"workdir={args.workdir or tmp}"])
        if not args.workdir:
            first = timed(run_pipeline, default_dag(), config)
            print(f"default pipeline, first run: {first:6.1f} s")
        rerun = timed(run_pipeline, default_dag(), config)
    print(f"default pipeline, fully cached rerun (Ray warm): {rerun:6.2f} s")


if __name__ == "__main__":
    main()
