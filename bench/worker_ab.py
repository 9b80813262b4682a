"""Two training loops side by side in alternating blocks, e.g. Ray Train workers against processes.

    python bench/worker_ab.py                                   # 1 worker, the default sides
    python bench/worker_ab.py --workers 2 --pairs 50
    python bench/worker_ab.py --sides ray:state,process:state   # what being a Ray worker costs
    python bench/worker_ab.py --workers 2 --sides process:bare,process:bare+model.g_norm=batch
    python bench/worker_ab.py -- model.g_width=64               # overrides for both sides

Runs of one loop after another (``train_overhead.py``) differ by 10-25 % on a shared 2-core VM
even when they run the same code, so a cost of a few per cent cannot be told from the noise.
Here both sides start and warm up, then the driver lets them train in turns: a block of
``--block`` steps on one side, then a block on the other, the order swapping every pair. The
side that waits blocks on a socket (no CPU). The ratio is taken for each pair of neighbouring
blocks, and the median printed: the machine's drift falls on both sides alike.

A side is ``HOST:MODE``, with config overrides of its own after ``+`` if any
(``process:bare+model.g_norm=batch+model.d_norm=batch``; a value cannot hold ``+`` or ``,``,
and ``data.*`` is the same for both sides). An override whose name is in capitals sets that
environment variable in a process side's ranks instead
(``process:state,process:state+GANPIPE_SYNC_BN_KERNELS=torch``). A side's own
``train.workers`` sets its ranks instead of ``--workers``: with ``train.batch_size`` scaled
alike, the ratio is weak scaling
(``process:bare+train.workers=2+train.batch_size=128,process:bare``: 2 ranks of 64 images
against 1 of 64; the efficiency is the ratio over 2).

* HOST ``ray``: the side's ranks as Ray Train workers (``TorchTrainer``, gloo, one CPU and one torch
  thread each, Ray's niceness); ``process``: as many ``torch.multiprocessing`` processes (gloo
  through a file store) at the same niceness.
* MODE ``state``: ``TrainingState.step``, the pipeline's step; ``bare``: the bare loop of
  bench/harness.py. DDP and sync batch norm at 2 workers; the default digits config.

The default, ``ray:state,process:bare``, is the pipeline's step in Ray Train workers against
the bare loop in processes of their own. What it leaves out is the pipeline's worker loop
around the step (sampling, figures, reports, checkpoints), which ``train_overhead.py`` runs.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import (
    RAY_WORKER_NICENESS,
    Dataset,
    loadavg,
    machine,
    median,
    quartiles,
    reference_step,
    write_dataset,
)

from pipelines.config import Config, ConfigError, load_config

HOSTS = ("ray", "process")
MODES = ("state", "bare")


def _serve_blocks(rank: int, world: int, job: dict[str, Any]) -> None:
    """Warm up, then train a block of steps for each ``("go", n)`` from the driver, answering
    with the block's wall and CPU seconds; ``("stop",)`` ends it."""
    step = reference_step(rank, world, job)
    for i in range(job["warmup"]):
        step(i)
    done = job["warmup"]
    with Client(tuple(job["address"]), authkey=bytes.fromhex(job["authkey"])) as driver:
        driver.send((job["side"], rank))
        while (order := driver.recv())[0] == "go":
            started, cpu_started = time.perf_counter(), time.process_time()
            for _ in range(order[1]):
                step(done)
                done += 1
            if world > 1:  # the block ends when the slowest rank is done
                dist.barrier()
            driver.send((time.perf_counter() - started, time.process_time() - cpu_started))


def _process_rank(rank: int, world: int, store: str, job: dict[str, Any]) -> None:
    os.environ.update(job["environment"])
    torch.set_num_threads(1)
    os.nice(job["nice"])
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    _serve_blocks(rank, world, job)
    if world > 1:
        dist.destroy_process_group()


def _ray_rank(job: dict[str, Any]) -> None:  # pragma: no cover - in a Ray Train worker
    import ray.train

    torch.set_num_threads(1)
    context = ray.train.get_context()
    _serve_blocks(context.get_world_rank(), context.get_world_size(), job)


def or_exit(function: Any, *args: Any, **kwargs: Any) -> None:
    """Runs a side; if it fails, the bench stops (the driver would wait for it for ever)."""
    try:
        function(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - any failure of a side ends the bench
        print(f"a side failed: {exc!r}", file=sys.stderr, flush=True)
        os._exit(1)


def split_side(side: str) -> tuple[str, str, list[str]]:
    """``"process:bare+model.g_norm=batch"`` -> ``("process", "bare", ["model.g_norm=batch"])``:
    the config overrides, without the environment's (:func:`side_environment`)."""
    head, *overrides = side.split("+")
    host, _, mode = head.partition(":")
    return host, mode, [o for o in overrides if not _is_environment(o)]


def side_environment(side: str) -> dict[str, str]:
    """``"process:state+GANPIPE_SYNC_BN_KERNELS=torch"`` -> ``{"GANPIPE_SYNC_BN_KERNELS":
    "torch"}``: the side's overrides whose name is in capitals."""
    pairs = [o.partition("=") for o in side.split("+")[1:] if _is_environment(o)]
    return {name: value for name, _, value in pairs}


def _is_environment(override: str) -> bool:
    name = override.partition("=")[0]
    return name.isupper()


def start_side(
    side: str,
    config: Config,
    dataset: Dataset,
    listener: Listener,
    authkey: bytes,
    *,
    warmup: int,
    storage: Path,
) -> threading.Thread:
    """One side's ``config.train.workers`` ranks, each of which warms up, then connects to
    ``listener``; started from a driver thread that returns when they have stopped."""
    job = {
        "config": config.to_dict(),
        "shards": dataset.shards,
        "shape": list(dataset.shape),
        "side": side,
        "mode": split_side(side)[1],
        "environment": side_environment(side),
        "warmup": warmup,
        "nice": RAY_WORKER_NICENESS,
        "address": list(listener.address),
        "authkey": authkey.hex(),
    }
    world = config.train.workers
    storage.mkdir(parents=True)
    if split_side(side)[0] == "ray":
        from ray.train import LoggingConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        trainer = TorchTrainer(
            _ray_rank,
            train_loop_config=job,
            scaling_config=ScalingConfig(num_workers=world, resources_per_worker={"CPU": 1}),
            torch_config=TorchConfig(backend="gloo"),
            run_config=RunConfig(
                name="worker-ab",
                storage_path=str(storage),
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        thread = threading.Thread(target=or_exit, args=(trainer.fit,))
    else:
        thread = threading.Thread(
            target=or_exit,
            args=(mp.start_processes, _process_rank),
            kwargs={
                "args": (world, str(storage / "store"), job),
                "nprocs": world,
                "join": True,
                "start_method": "spawn",
            },
        )
    thread.start()
    return thread


def accept_ranks(listener: Listener, count: int) -> dict[str, list[Connection]]:
    """The connections of ``count`` ranks, by side and rank."""
    ranks: dict[str, dict[int, Connection]] = {}
    for _ in range(count):
        connection = listener.accept()
        side, rank = connection.recv()
        ranks.setdefault(side, {})[rank] = connection
    return {side: [by_rank[r] for r in sorted(by_rank)] for side, by_rank in ranks.items()}


def run_block(ranks: list[Connection], steps: int) -> tuple[float, float]:
    """One block on one side: rank 0's wall seconds and all ranks' CPU seconds."""
    for rank in ranks:
        rank.send(("go", steps))
    answers = [rank.recv() for rank in ranks]
    return answers[0][0], sum(cpu for _, cpu in answers)


def parse_sides(text: str) -> tuple[str, str]:
    """``"ray:state,process:bare+model.g_norm=batch"`` -> the two sides, checked."""
    sides = text.split(",")
    if len(sides) != 2 or sides[0] == sides[1]:
        raise ValueError(
            f"--sides takes two different sides (e.g. ray:state,process:bare): {text!r}"
        )
    for side in sides:
        host, mode, overrides = split_side(side)
        if host not in HOSTS or mode not in MODES:
            raise ValueError(
                f"side {side!r} is not HOST:MODE[+key=value...] with HOST in {HOSTS} and MODE "
                f"in {MODES}"
            )
        for override in overrides:
            key = override.partition("=")[0]
            if key.startswith("data."):  # both sides read one dataset, written once
                raise ValueError(
                    f"side {side!r}: {key} cannot differ between the sides; give it after -- "
                    "for both"
                )
        if host == "ray" and side_environment(side):
            raise ValueError(
                f"side {side!r}: Ray Train workers take the environment Ray was started with; "
                "set it for both sides instead"
            )
    if all(split_side(side)[0] == "ray" for side in sides):
        # Two trainers would each hold their side's workers' CPUs: on 2 cores the second would never
        # start.
        raise ValueError("at most one side can be ray: compare it with a process side")
    return sides[0], sides[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--workers", type=int, default=1, help="ranks on each side without its own train.workers"
    )
    parser.add_argument("--sides", default="ray:state,process:bare", help="A,B: prints A / B")
    parser.add_argument("--block", type=int, default=40, help="steps per block")
    parser.add_argument("--pairs", type=int, default=40, help="pairs of blocks (one per side)")
    parser.add_argument("--warmup", type=int, default=100, help="steps before the first block")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = parser.parse_args()
    if args.workers < 1 or args.block < 1 or args.pairs < 1:
        parser.error("--workers, --block and --pairs must be at least 1")
    try:
        sides = parse_sides(args.sides)
    except ValueError as exc:
        parser.error(str(exc))

    print(f"machine: {machine()}")
    print(f"load average at start: {loadavg()}")
    print(f"niceness: {RAY_WORKER_NICENESS} on both sides")
    # Here, not at the top: every spawned rank imports this module, and needs neither.
    from pipelines.runner import check_local_resources, init_ray

    with tempfile.TemporaryDirectory() as tmp:
        common = [f"workdir={tmp}", f"train.workers={args.workers}", "train.eval_every=0"]
        try:
            configs = {
                side: load_config(None, [*common, *args.overrides, *split_side(side)[2]])
                for side in sides
            }
            ray_sides = [side for side in sides if split_side(side)[0] == "ray"]
            # The trainer would wait for CPUs this machine's Ray lacks, and the driver for ever.
            for side in ray_sides:
                check_local_resources(configs[side])
        except ConfigError as exc:
            parser.error(str(exc))
        if ray_sides:
            init_ray()
        config = configs[sides[0]]
        dataset = write_dataset(config, Path(tmp) / "dataset")
        authkey = secrets.token_bytes(16)
        with Listener(("127.0.0.1", 0), authkey=authkey) as listener:
            threads = [
                start_side(
                    side,
                    configs[side],
                    dataset,
                    listener,
                    authkey,
                    warmup=args.warmup,
                    storage=Path(tmp) / f"side{i}",
                )
                for i, side in enumerate(sides)
            ]
            ranks = accept_ranks(listener, sum(configs[s].train.workers for s in sides))
            print(f"both sides warmed up; load {loadavg()}", flush=True)

            a, b = sides
            images = {side: configs[side].train.batch_size * args.block for side in sides}
            wall_ratios, cpu_ratios = [], []
            rates: dict[str, list[float]] = {side: [] for side in sides}
            for pair in range(args.pairs):
                order = sides if pair % 2 == 0 else sides[::-1]
                timed = {side: run_block(ranks[side], args.block) for side in order}
                for side in sides:
                    rates[side].append(images[side] / timed[side][0])
                # Images/s (and images per CPU-second) of A over B's.
                scale = images[a] / images[b]
                wall_ratios.append(scale * timed[b][0] / timed[a][0])
                cpu_ratios.append(scale * timed[b][1] / timed[a][1])
                if (pair + 1) % 10 == 0:
                    print(
                        f"pairs {pair + 1:3d}: {a} / {b} so far {median(wall_ratios):.3f} "
                        f"(per CPU-second {median(cpu_ratios):.3f}); load {loadavg()}",
                        flush=True,
                    )
            for side in sides:
                for connection in ranks[side]:
                    connection.send(("stop",))
            for thread in threads:
                thread.join()

    low, high = quartiles(wall_ratios)
    print()
    print(f"{args.pairs} pairs of {args.block}-step blocks")
    width = max(len(side) for side in sides)
    for side in sides:
        c = configs[side].train
        print(
            f"  {side:{width}s} {median(rates[side]):7.0f} images/s (median block; "
            f"{c.workers} worker(s), global batch {c.batch_size})"
        )
    print(
        f"  {a} / {b}, images/s: {median(wall_ratios):.3f} (median of pairs; quartiles "
        f"{low:.3f}-{high:.3f}); images per CPU-second: {median(cpu_ratios):.3f}"
    )
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
