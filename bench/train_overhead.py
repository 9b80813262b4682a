"""Training-loop overhead: ganpipe's training through Ray Train against a bare PyTorch loop.

    python bench/train_overhead.py                          # 1 and 2 workers, 3 rounds
    python bench/train_overhead.py --workers 2 --repeats 5 --variants ray,bare,state
    python bench/train_overhead.py -- model.g_width=64      # config overrides after --

Variants, each with the default digits config, ``train.eval_every=0`` (the in-training probe is
off; bench/memory.py runs the default with it), global batch 64, one torch thread per worker:

* ``ray``: ``pipelines.train.run_training`` (Ray Train V2, gloo, DDP, sync batch norm, figures
  every 50 steps handed to Ray Train in one report at most every ``train.report_seconds``,
  checkpoints every 500 and at the end). Steady state is measured on the driver between the
  first report that arrives past ``--warmup`` steps and the last one, so report and checkpoint
  costs count; start-up is the time from the ``run_training`` call to the first report less
  that report's steps at the steady rate. The workers' own figure (``images_per_s`` of each
  window, which leaves reports and checkpoints out) is printed beside it.
* ``ray-each``: ``ray`` with ``train.report_seconds=0``: one Ray Train report per window, as
  before that setting existed.
* ``bare``: the DCGAN step written in bench/harness.py with plain torch in
  ``torch.multiprocessing`` processes (DDP and sync batch norm with 2).
* ``state``: ``TrainingState.step`` in the same processes: what the pipeline's step adds
  (figures, gradient norms, schedules), without Ray.
* ``ray-bare``, ``ray-state``: the ``bare`` or ``state`` loop in Ray Train workers
  (``TorchTrainer``, gloo) instead of processes of their own, timed inside the workers: what
  being a Ray Train worker costs the same work, without the pipeline's worker loop, reports or
  checkpoints.

The bare/state processes run at the niceness Ray gives its workers (15; ``--reference-nice``):
when other programs want the CPU, a Ray Train worker yields to them, and so should the reference.

Rounds alternate the order of the variants (ABAB, BABA, ...) because other processes share the
CPU; the ratio of each round is taken between runs next to each other, and the median printed.
On the project's shared 2-core VMs neighbouring runs of the same code differ by 10-25 %:
bench/pipeline_ab.py measures ``ray`` against ``bare`` with the two taking turns on the CPU,
which cancels that drift, and bench/worker_ab.py does the same for the reference loops.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import (
    RAY_WORKER_NICENESS,
    Dataset,
    cores_between,
    cpu_seconds,
    loadavg,
    machine,
    median,
    run_ray_reference,
    run_reference,
    write_dataset,
)

from pipelines.config import Config, load_config

# The variants that run the pipeline, each with its train.report_seconds (None: the config's).
RAY_VARIANTS: dict[str, float | None] = {"ray": None, "ray-each": 0.0}
REFERENCE_VARIANTS = ("bare", "state", "ray-bare", "ray-state")
KNOWN_VARIANTS = (*RAY_VARIANTS, *REFERENCE_VARIANTS)


def run_ray(
    config: Config,
    dataset: Dataset,
    storage: str,
    name: str,
    warmup: int,
    report_seconds: float | None = None,
) -> dict:
    """One ``run_training``, with ``report_seconds`` in place of the config's when given; rates
    from the arrival times of Ray Train's reports at the driver (each carries the windows since
    the last one, train.report_seconds)."""
    from pipelines.train import run_training

    if report_seconds is not None:
        config = copy.deepcopy(config)
        config.train.report_seconds = report_seconds

    windows: list[tuple[int, float]] = []
    cpu: list[dict[int, tuple[str, float]]] = []  # cpu_seconds() at the steady window's ends
    last_call = [-float("inf")]

    def on_report(metrics: dict[str, Any], checkpoint: str | None) -> None:
        step = int(metrics["step"])
        windows.append((step, metrics["images_per_s"]))
        # The windows of one report come back to back; one snapshot per report (a snapshot
        # reads every process's /proc entry: hundreds of windows would delay the driver).
        new_report = time.perf_counter() - last_call[0] > 0.1
        if step >= warmup and (new_report or not cpu):
            # The steady window starts at the report that holds the first step past the
            # warm-up, as below.
            snapshot = cpu_seconds()
            if not cpu:
                cpu.append(snapshot)  # the window's start
            else:
                cpu[1:] = [snapshot]  # its end so far
        last_call[0] = time.perf_counter()

    load_start = loadavg()
    called = time.perf_counter()
    result = run_training(
        config,
        shards=dataset.shards,
        shape=dataset.shape,
        storage_path=storage,
        name=name,
        on_report=on_report,
    )
    returned = time.perf_counter()
    batch = config.train.batch_size
    steady = [(t, step) for t, step in result.report_arrivals if step >= warmup]
    if len(steady) < 2:
        raise SystemExit(
            f"only {len(steady)} Ray Train report(s) arrived after step {warmup}, too few to time: "
            "raise --steps, or pass a lower train.report_seconds or train.checkpoint_every"
        )
    (t0, s0), (t1, s1) = steady[0], steady[-1]
    rate = (s1 - s0) * batch / (t1 - t0)
    first_t, first_step = result.report_arrivals[0]
    # CPU used per second of the steady window, by process kind (1.0 = one core busy).
    cores = cores_between(cpu[0], cpu[1], t1 - t0)
    return {
        "cores": cores,
        "images_per_cpu_s": rate / cores["Ray Train workers"],
        "images_per_s": rate,
        "worker_images_per_s": median([ips for step, ips in windows if step > s0]),
        "reports": len(result.report_arrivals),
        "first_report_s": first_t - called,
        "startup_s": first_t - called - first_step * batch / rate,
        "shutdown_s": returned - t1,
        "load_start": load_start,
        "load_end": loadavg(),
    }


def describe(workers: int, repeat: int, variant: str, r: dict[str, Any]) -> str:
    """One line per run (two for Ray: where the CPU went)."""
    line = (
        f"{workers} worker(s) round {repeat} {variant:8s}: {r['images_per_s']:7.0f} images/s, "
        f"{r['images_per_cpu_s']:6.0f} images per CPU-second"
    )
    if variant in RAY_VARIANTS:
        line += (
            f" (workers' own figure {r['worker_images_per_s']:.0f}; {r['reports']} Ray Train "
            f"reports; first after "
            f"{r['first_report_s']:.1f} s, start-up {r['startup_s']:.1f} s, shutdown "
            f"{r['shutdown_s']:.1f} s)"
        )
    else:
        line += (
            f" (rank 0 busy {r['cpu_busy']:.2f} of a core; gc {r['gc_ms_per_step']:.2f} ms a "
            f"step, collections {r['gc_collections']}, {r['gc_tracked_objects']:,} objects)"
        )
    line += f"  load {r['load_start']} -> {r['load_end']}"
    if "cores" in r:
        used = sorted(r["cores"].items(), key=lambda kv: -kv[1])
        line += "\n    cores used in the steady window: " + ", ".join(
            f"{k} {v:.2f}" for k, v in used if v >= 0.005
        )
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument(
        "--variants",
        default="ray,bare",
        help=", ".join(KNOWN_VARIANTS),
    )
    parser.add_argument("--steps", type=int, default=600, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=100, help="steps left out of the rate")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per worker count")
    parser.add_argument(
        "--reference-nice",
        type=int,
        default=RAY_WORKER_NICENESS,
        help="niceness of the bare/state processes (default: that of Ray's workers)",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in KNOWN_VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(KNOWN_VARIANTS)}")
    if "bare" not in variants:  # checked before the runs, not after them
        parser.error("--variants must include bare: every ratio is to the bare loop's round")

    print(f"machine: {machine()}")
    print(f"load average at start: {loadavg()}")
    print(
        f"niceness: Ray Train workers {RAY_WORKER_NICENESS} (Ray's default), bare/state "
        f"processes {args.reference_nice}"
    )
    started = time.perf_counter()
    from pipelines.runner import init_ray

    init_ray()
    print(f"ray.init: {time.perf_counter() - started:.1f} s")

    with tempfile.TemporaryDirectory() as tmp:
        base = load_config(None, [f"workdir={tmp}", *args.overrides])
        dataset = write_dataset(base, Path(tmp) / "dataset")
        summary = []
        for workers in [int(w) for w in args.workers.split(",")]:
            config = load_config(
                None,
                [
                    f"workdir={tmp}",
                    f"train.workers={workers}",
                    f"train.steps={args.steps}",
                    "train.eval_every=0",
                    *args.overrides,
                ],
            )
            rounds: list[dict[str, dict]] = []
            for repeat in range(args.repeats):
                order = variants if repeat % 2 == 0 else variants[::-1]
                results: dict[str, dict] = {}
                for variant in order:
                    if variant in RAY_VARIANTS:
                        name = f"w{workers}-r{repeat}-{variant}"
                        results[variant] = run_ray(
                            config, dataset, tmp, name, args.warmup, RAY_VARIANTS[variant]
                        )
                    elif variant in ("ray-bare", "ray-state"):
                        results[variant] = run_ray_reference(
                            config,
                            dataset,
                            tmp,
                            mode=variant.removeprefix("ray-"),
                            steps=args.steps - args.warmup,
                            warmup=args.warmup,
                        )
                    else:
                        results[variant] = run_reference(
                            config,
                            dataset,
                            mode=variant,
                            steps=args.steps - args.warmup,
                            warmup=args.warmup,
                            nice=args.reference_nice,
                        )
                    print(describe(workers, repeat, variant, results[variant]), flush=True)
                rounds.append(results)
            summary.append((workers, rounds))

    print()
    print("median over rounds; ratio: to bare in the same round (median, then each round)")
    print(
        f"{'workers':>7s} {'variant':>8s} {'images/s':>9s} {'ratio':>30s}   {'images/CPU-s':>12s} "
        f"{'ratio':>30s}"
    )
    for workers, rounds in summary:
        for variant in variants:
            cells = []
            for key in ("images_per_s", "images_per_cpu_s"):
                value = median([r[variant][key] for r in rounds])
                ratios = [r[variant][key] / r["bare"][key] for r in rounds]
                each = ", ".join(f"{x:.2f}" for x in ratios)
                cells.append(f"{value:9.0f} {median(ratios):6.3f} ({each:>20s})")
            print(f"{workers:7d} {variant:>8s} {cells[0]}   {cells[1]}")
        if "ray" in variants:
            startup = median([r["ray"]["startup_s"] for r in rounds])
            first = median([r["ray"]["first_report_s"] for r in rounds])
            print(f"{workers:7d} ray: start-up {startup:.1f} s (first report after {first:.1f} s)")
        for variant in [v for v in variants if v.startswith("ray")]:
            others = median(
                [
                    sum(v for k, v in r[variant]["cores"].items() if k != "Ray Train workers")
                    for r in rounds
                ]
            )
            print(
                f"{workers:7d} {variant}: Ray's other processes and the driver used {others:.2f} "
                "cores while training"
            )
    by_workers = dict(summary)
    if 1 in by_workers and 2 in by_workers:
        for variant in variants:
            one = median([r[variant]["images_per_s"] for r in by_workers[1]])
            two = median([r[variant]["images_per_s"] for r in by_workers[2]])
            print(
                f"scaling 1 -> 2 workers ({variant}): x{two / one:.2f}, efficiency "
                f"{two / one / 2:.2f} (global batch fixed at the configured size)"
            )
    print(f"load average at end: {loadavg()}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
