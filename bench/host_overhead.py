"""The host's own time per step: the pipeline's step against the bare loop on a model too small
to compute anything.

    python bench/host_overhead.py
    python bench/host_overhead.py --profile      # also where the pipeline's extra time goes
    PYTHONPATH=<a worktree of REV> python bench/host_overhead.py   # an earlier revision's step

At 2 channels, 2 images and 8×8 pixels a step's arithmetic is nearly nothing, so its time is
what the host spends issuing it: Python, the dispatcher, the autograd engine, the optimizer. The
difference between the pipeline's step (``TrainingState.step``, bench/harness.py's ``state``
mode) and the bare loop (``bare``) is the host time the pipeline adds per step, which a real
model pays too, on top of its arithmetic; on a launch-bound GPU it is what the step costs. Both
run in this process with one torch thread, in alternating blocks of ``--block`` steps, so the
machine's drift falls on both. Printed: microseconds per step of each (median block) and the
median over pairs of the difference.

With ``--profile``, cProfile runs each for ``--block`` × 10 steps and the functions whose own
time differs most between the two are printed (cProfile's overhead inflates every figure alike).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from harness import loadavg, machine, reference_step, write_dataset

from pipelines.config import load_config

TINY = [
    "model.g_width=2",
    "model.d_width=2",
    "train.batch_size=2",
    "train.workers=1",
    "data.resolution=8",
]


def microseconds_per_step(step: Callable[[int], None], first: int, steps: int) -> float:
    """Of steps ``first`` to ``first + steps - 1``: schedules and lazy penalties see a run's
    indices."""
    started = time.perf_counter()
    for i in range(first, first + steps):
        step(i)
    return (time.perf_counter() - started) / steps * 1e6


def own_times(step: Callable[[int], None], first: int, steps: int) -> dict[str, float]:
    """Seconds of own time by function over ``steps`` profiled steps from ``first`` on."""
    profile = cProfile.Profile()
    profile.enable()
    for i in range(first, first + steps):
        step(i)
    profile.disable()
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    return {f"{path}:{line}({name})": row[2] for (path, line, name), row in stats.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=30, help="pairs of blocks")
    parser.add_argument("--block", type=int, default=200, help="steps per block")
    parser.add_argument("--warmup", type=int, default=300, help="steps of each before the pairs")
    parser.add_argument("--profile", action="store_true", help="also profile both with cProfile")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value) for both")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {machine()}; load average {loadavg()}")
    config = load_config(None, TINY + args.overrides)
    dataset = write_dataset(config, tempfile.mkdtemp())
    job = {"config": config.to_dict(), "shards": dataset.shards, "shape": list(dataset.shape)}
    steps = {mode: reference_step(0, 1, {**job, "mode": mode}) for mode in ("state", "bare")}
    for step in steps.values():
        microseconds_per_step(step, 0, args.warmup)
    done = args.warmup

    times: dict[str, list[float]] = {mode: [] for mode in steps}
    for index in range(args.pairs):
        order = ("state", "bare") if index % 2 else ("bare", "state")
        for mode in order:
            times[mode].append(microseconds_per_step(steps[mode], done, args.block))
        done += args.block
    for mode, values in times.items():
        median = statistics.median(values)
        print(f"{mode:6s} {median:7.1f} µs per step (median of {args.pairs} blocks)")
    extra = [s - b for s, b in zip(times["state"], times["bare"], strict=True)]
    quartiles = statistics.quantiles(extra, n=4)
    print(
        f"the pipeline's step takes {statistics.median(extra):.1f} µs per step more than the "
        f"bare loop (quartiles {quartiles[0]:.1f} to {quartiles[2]:.1f})"
    )

    if args.profile:
        profiled = args.block * 10
        state, bare = (own_times(steps[mode], done, profiled) for mode in ("state", "bare"))
        differences = {name: state.get(name, 0.0) - bare.get(name, 0.0) for name in state | bare}
        print(f"\nown time, µs per step under cProfile, state - bare ({profiled} steps each):")
        for name, seconds in sorted(differences.items(), key=lambda kv: -abs(kv[1]))[:15]:
            print(f"  {seconds / profiled * 1e6:+7.1f}  {name}")
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
