"""ganpipe's training through Ray Train against the bare loop, taking turns on the CPU.

    python bench/pipeline_ab.py                      # 1 worker, 4,000 steps
    python bench/pipeline_ab.py --workers 2
    python bench/pipeline_ab.py -- model.g_width=64  # config overrides after --

``train_overhead.py``'s figure on this project's 2-core VMs comes from runs one after another,
which differ by 10-25 % even when they run the same code. Here the two run at the same time and
take turns: the pipeline (``pipelines.train.run_training``: Ray Train V2, its worker loop,
reports and checkpoints, ``train.eval_every=0``) trains for a slice of time, then its Ray Train
workers are stopped (SIGSTOP) while the bare loop (bench/harness.py, in
``torch.multiprocessing`` processes at the same niceness, DDP at 2 workers) trains a block of
``--block`` steps, then the workers continue (SIGCONT); and so on until the pipeline's last
step. The machine's drift falls on both alike.

The pipeline's rate is taken from its own windows: rank 0 stamps the end of every
``train.report_every``-step window (``window_time``), and the rate between two stamps is their
steps over the time the workers ran between them, so that the checkpoints written every
``train.checkpoint_every`` steps count. The bare loop's rate is taken over its blocks. What
this leaves out: the final checkpoint, and Ray's other processes (controller, raylet, GCS,
dashboard), which run during both sides' turns (``train_overhead.py``'s "cores used" line gives
them). Rank 0 decides when to hand its windows to Ray Train by the wall clock, which runs on
during the bare loop's turns, so the pipeline reports about twice as often per second of its
own as in a run of its own: a small cost counted against it.

``train.max_failures`` and ``train.nan_rollbacks`` are 0 here: a restarted worker would have
another PID, and a rolled-back step would be trained twice.
"""

from __future__ import annotations

import argparse
import contextlib
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
    WORKER_MARK,
    loadavg,
    machine,
    median,
    ray_train_workers,
    write_dataset,
)
from worker_ab import accept_ranks, or_exit, run_block, start_side

from pipelines.config import ConfigError, load_config
from pipelines.train import WINDOW_TIME


class Turns:
    """The intervals (``time.time()``, the clock of rank 0's window stamps) in which the
    pipeline's workers ran; maps a time to the workers' running time up to it."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.intervals: list[list[float]] = [[time.time(), float("inf")]]  # running already

    def _signal(self, number: int) -> None:
        for pid in self.pids:
            # A PID that is gone, or that is no longer a Ray Train worker, must not be signalled.
            cmdline = Path(f"/proc/{pid}/cmdline")
            if not cmdline.exists() or WORKER_MARK not in cmdline.read_text():
                raise SystemExit(f"Ray Train worker {pid} is gone: the pipeline failed")
            os.kill(pid, number)

    @property
    def paused(self) -> bool:
        return self.intervals[-1][1] != float("inf")

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)
        self.intervals[-1][1] = time.time()

    def resume(self) -> None:
        self.intervals.append([time.time(), float("inf")])
        self._signal(signal.SIGCONT)

    def end(self) -> None:
        """Let the workers run on (also after an error) and close the last interval."""
        if self.paused:
            for pid in self.pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        else:
            self.intervals[-1][1] = time.time()

    def running_time(self, moment: float) -> float:
        return sum(max(0.0, min(end, moment) - start) for start, end in self.intervals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers / bare ranks")
    parser.add_argument("--steps", type=int, default=4000, help="the pipeline's train.steps")
    parser.add_argument("--warmup", type=int, default=200, help="steps before the turns begin")
    parser.add_argument("--block", type=int, default=40, help="the bare loop's steps per turn")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = parser.parse_args()
    if args.workers < 1 or args.block < 1 or args.warmup < 1:
        parser.error("--workers, --block and --warmup must be at least 1")
    if args.steps < args.warmup + 1000:
        parser.error("--steps must exceed --warmup by 1000 or more: too few turns to time")
    if os.environ.get("RAY_ADDRESS"):
        parser.error("unset RAY_ADDRESS: the Ray Train workers must be this machine's children")

    print(f"machine: {machine()}")
    print(f"load average at start: {loadavg()}")
    from pipelines.runner import check_local_resources, init_ray
    from pipelines.train import run_training

    with tempfile.TemporaryDirectory() as tmp:
        try:
            config = load_config(
                None,
                [
                    f"workdir={tmp}",
                    f"train.workers={args.workers}",
                    f"train.steps={args.steps}",
                    "train.eval_every=0",
                    *args.overrides,
                    "train.max_failures=0",
                    "train.nan_rollbacks=0",
                ],
            )
            check_local_resources(config)
        except ConfigError as exc:
            parser.error(str(exc))
        init_ray()
        steps, world = config.train.steps, config.train.workers
        dataset = write_dataset(config, Path(tmp) / "dataset")
        authkey = secrets.token_bytes(16)
        with Listener(("127.0.0.1", 0), authkey=authkey) as listener:
            bare_thread = start_side(
                "process:bare",
                config,
                dataset,
                listener,
                authkey,
                warmup=args.warmup,
                storage=Path(tmp) / "bare",
            )
            bare = accept_ranks(listener, world)["process:bare"]
            print(f"bare loop warmed up; load {loadavg()}", flush=True)

            warmed_up, finished = threading.Event(), threading.Event()

            def on_report(metrics: dict[str, Any], checkpoint: str | None) -> None:
                if metrics["step"] >= args.warmup:
                    warmed_up.set()
                if metrics["step"] >= steps:
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

            # A daemon: if the turns fail, the bench exits without training on to the end.
            pipeline = threading.Thread(target=or_exit, args=(train,), daemon=True)
            pipeline.start()
            warmed_up.wait()
            workers = ray_train_workers()
            if len(workers) != world:
                raise SystemExit(f"found {len(workers)} Ray Train workers, not {world}")
            print(f"pipeline warmed up; turns begin; load {loadavg()}", flush=True)

            turns = Turns(workers)
            blocks: list[tuple[float, float]] = []  # (time.time() at the block's end, seconds)
            slice_s = 1.5
            try:
                while pipeline.is_alive() and not finished.wait(slice_s):
                    turns.pause()
                    seconds, _ = run_block(bare, args.block)
                    blocks.append((time.time(), seconds))
                    slice_s = seconds  # turns of about equal length
                    turns.resume()
            finally:
                turns.end()
                for connection in bare:
                    connection.send(("stop",))
            pipeline.join()
            bare_thread.join()

    began, ended = turns.intervals[0][0], turns.intervals[-1][1]
    # Each window's end as rank 0 stamped it, within the turns.
    points = [
        (window[WINDOW_TIME], window["step"])
        for window in result["run"].history
        if began < window[WINDOW_TIME] <= ended
    ]
    if len(points) < 9:
        raise SystemExit(f"only {len(points)} windows ended during the turns: raise --steps")
    image_steps = config.train.batch_size * args.block

    def rates(first: tuple[float, int], last: tuple[float, int]) -> tuple[float, float, int]:
        """Images/s of the pipeline and of the bare loop between two window stamps, and the
        number of bare blocks that ended between them."""
        (t0, s0), (t1, s1) = first, last
        ran = turns.running_time(t1) - turns.running_time(t0)
        inside = [seconds for end, seconds in blocks if t0 < end <= t1]
        if not inside:
            raise SystemExit("a part of the turns holds no bare block: raise --steps")
        ours = (s1 - s0) * config.train.batch_size / ran
        return ours, len(inside) * image_steps / sum(inside), len(inside)

    print()
    print(f"{world} worker(s), {len(blocks)} turns each, bare blocks of {args.block} steps")
    parts = 4
    edges = [points[round(i * (len(points) - 1) / parts)] for i in range(parts + 1)]
    ratios = []
    for first, last in zip(edges, edges[1:], strict=False):
        ours, reference, count = rates(first, last)
        ratios.append(ours / reference)
        print(
            f"  steps {first[1]:5d}-{last[1]:5d}: pipeline {ours:6.0f} images/s, bare "
            f"{reference:6.0f} ({count} blocks): {ours / reference:.3f}"
        )
    ours, reference, _ = rates(points[0], points[-1])
    print(
        f"  all: pipeline through Ray Train {ours:.0f} images/s, bare loop {reference:.0f}: "
        f"{ours / reference:.3f} (median of the parts {median(ratios):.3f})"
    )
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
