"""ganpipe's training through Ray Train against the bare loop, taking turns on the CPU.

    python bench/pipeline_ab.py                      # 1 worker, 3,000 steps
    python bench/pipeline_ab.py --workers 2
    python bench/pipeline_ab.py -- model.g_width=64  # config overrides after --

``train_overhead.py``'s figure on this project's 2-core VMs: runs one after another, which
differ by 10-25 % even when they run the same code. Here the two run at the same time and take
turns: the pipeline (``pipelines.train.run_training``: Ray Train V2, its worker loop, reports
and checkpoints, ``train.eval_every=0``) trains for a slice of time, then its Ray Train workers
are stopped (SIGSTOP) while the bare loop (bench/harness.py, in ``torch.multiprocessing``
processes at the same niceness, DDP at 2 workers) trains a block of ``--block`` steps, then
the workers continue (SIGCONT); and so on until the pipeline's last step. The machine's drift
falls on both alike.

The pipeline's rate is taken on the driver between the first Ray Train report that arrives
after the turns began and the last one (reports and the final checkpoint count), over the time
its workers ran; the bare loop's over its blocks. Both sides share what Ray's other processes
(controller, raylet, GCS, dashboard) use while training: ``train_overhead.py``'s "cores used"
line gives that.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import tempfile
import threading
import time
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any

from harness import (
    RAY_WORKER_NICENESS,
    loadavg,
    machine,
    median,
    ray_train_workers,
    write_dataset,
)
from worker_ab import or_exit, run_block, start_side

from pipelines.config import load_config


class Turns:
    """The wall-clock intervals in which the pipeline's workers ran; maps a wall time to the
    workers' running time up to it."""

    def __init__(self) -> None:
        self.intervals: list[list[float]] = []

    def resume(self, pids: list[int]) -> None:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        self.intervals.append([time.perf_counter(), float("inf")])

    def pause(self, pids: list[int]) -> None:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        self.intervals[-1][1] = time.perf_counter()

    def running_time(self, wall: float) -> float:
        return sum(max(0.0, min(end, wall) - start) for start, end in self.intervals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers / bare ranks")
    parser.add_argument("--steps", type=int, default=3000, help="the pipeline's train.steps")
    parser.add_argument("--warmup", type=int, default=200, help="steps before the turns begin")
    parser.add_argument("--block", type=int, default=40, help="the bare loop's steps per turn")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = parser.parse_args()
    if args.workers < 1 or args.block < 1 or args.warmup < 1:
        parser.error("--workers, --block and --warmup must be at least 1")
    if args.steps < args.warmup + 1000:
        parser.error("--steps must exceed --warmup by 1000 or more: too few turns to time")

    print(f"machine: {machine()}")
    print(f"load average at start: {loadavg()}")
    from pipelines.runner import init_ray
    from pipelines.train import run_training

    init_ray()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            None,
            [
                f"workdir={tmp}",
                f"train.workers={args.workers}",
                f"train.steps={args.steps}",
                "train.eval_every=0",
                *args.overrides,
            ],
        )
        dataset = write_dataset(config, Path(tmp) / "dataset")
        authkey = secrets.token_bytes(16)
        with Listener(("127.0.0.1", 0), authkey=authkey) as listener:
            bare_job = {
                "config": config.to_dict(),
                "shards": dataset.shards,
                "shape": list(dataset.shape),
                "side": "process:bare",
                "mode": "bare",
                "warmup": args.warmup,
                "nice": RAY_WORKER_NICENESS,
                "address": list(listener.address),
                "authkey": authkey.hex(),
            }
            bare_thread = start_side(bare_job, args.workers, Path(tmp) / "bare")
            bare: list[Any] = [None] * args.workers
            for _ in range(args.workers):
                connection = listener.accept()
                bare[connection.recv()[1]] = connection
            print(f"bare loop warmed up; load {loadavg()}", flush=True)

            warmed_up, finished = threading.Event(), threading.Event()

            def on_report(metrics: dict[str, Any], checkpoint: str | None) -> None:
                if metrics["step"] >= args.warmup:
                    warmed_up.set()
                if metrics["step"] >= args.steps:
                    finished.set()

            result: dict[str, Any] = {}

            def train() -> None:
                result["run"] = run_training(
                    config,
                    shards=dataset.shards,
                    shape=dataset.shape,
                    storage_path=tmp,
                    name="pipeline-ab",
                    on_report=on_report,
                )

            pipeline = threading.Thread(target=or_exit, args=(train,))
            pipeline.start()
            warmed_up.wait()
            workers = ray_train_workers()
            if len(workers) != args.workers:
                raise SystemExit(f"found {len(workers)} Ray Train workers, not {args.workers}")
            print(f"pipeline warmed up; turns begin; load {loadavg()}", flush=True)

            turns = Turns()
            turns.intervals.append([time.perf_counter(), float("inf")])  # running already
            blocks: list[tuple[float, float]] = []  # (wall time at the block's end, its seconds)
            slice_s = 1.5
            while not finished.wait(slice_s):
                turns.pause(workers)
                seconds, _ = run_block(bare, args.block)
                blocks.append((time.perf_counter(), seconds))
                slice_s = seconds  # turns of about equal length
                turns.resume(workers)
            turns.intervals[-1][1] = time.perf_counter()
            for connection in bare:
                connection.send(("stop",))
            pipeline.join()
            bare_thread.join()

    began = turns.intervals[0][0]
    arrivals = [(wall, step) for wall, step in result["run"].report_arrivals if wall > began]
    if len(arrivals) < 3:
        raise SystemExit(f"only {len(arrivals)} reports arrived during the turns: raise --steps")
    image_steps = config.train.batch_size * args.block

    def rates(first: tuple[float, int], last: tuple[float, int]) -> tuple[float, float, int]:
        """Images/s of the pipeline and of the bare loop between two report arrivals, and the
        number of bare blocks that ended between them."""
        (w0, s0), (w1, s1) = first, last
        ours = (
            (s1 - s0) * config.train.batch_size / (turns.running_time(w1) - turns.running_time(w0))
        )
        inside = [seconds for end, seconds in blocks if w0 < end <= w1]
        return ours, len(inside) * image_steps / sum(inside), len(inside)

    print()
    print(f"{args.workers} worker(s), {len(blocks)} turns each, bare blocks of {args.block} steps")
    # The turns in parts between report arrivals, so that the spread shows.
    parts = 4 if len(arrivals) >= 9 else 2
    edges = [arrivals[round(i * (len(arrivals) - 1) / parts)] for i in range(parts + 1)]
    ratios = []
    for first, last in zip(edges, edges[1:], strict=False):
        ours, reference, count = rates(first, last)
        ratios.append(ours / reference)
        print(
            f"  steps {first[1]:5d}-{last[1]:5d}: pipeline {ours:6.0f} images/s, bare "
            f"{reference:6.0f} ({count} blocks): {ours / reference:.3f}"
        )
    ours, reference, _ = rates(arrivals[0], arrivals[-1])
    print(
        f"  all: pipeline through Ray Train {ours:.0f} images/s, bare loop {reference:.0f}: "
        f"{ours / reference:.3f} (median of the parts {median(ratios):.3f})"
    )
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
