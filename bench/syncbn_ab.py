"""Synchronized batch norm against plain batch norm (and an earlier revision of it), in turns.

    python bench/syncbn_ab.py                       # today's sync batch norm / batch norm
    python bench/syncbn_ab.py --before HEAD~1       # also that commit's sync batch norm
    python bench/syncbn_ab.py --breakdown           # then CPU per thread, exchange waits
    python bench/syncbn_ab.py --gloo-gradients      # also both with DDP's gradients via gloo
    python bench/syncbn_ab.py --decompose           # also the layer with no exchange
    python bench/syncbn_ab.py -- model.d_norm=sync_batch model.g_width=64

Two ranks (``torch.multiprocessing``, gloo through a file store, one torch thread each, Ray's
niceness) each hold one bare DCGAN loop (bench/harness.py's ``bare_loop``) per variant, with DDP
as the pipeline arranges it (pipelines/train.py: on CPU, the gradients go over the same direct
connections as the statistics; ``GANPIPE_SYNC_BN_EXCHANGE=process_group`` sends both through
gloo):

* ``batch``: every ``sync_batch`` norm of the config replaced by plain ``batch``;
* ``sync``: the config as given (the default: sync batch norm in G);
* ``before``, with ``--before REV``: the same models, their sync batch norm layers running
  ``gan/nn/sync_batchnorm.py`` and ``gan/nn/stats_exchange.py`` as they were at REV (the
  gradients go as today's pipeline sends them);
* ``sync-local``, with ``--decompose``: today's sync batch norm layers with the exchange left
  out, each rank normalizing with its own statistics: ``sync-local / batch`` is the cost of the
  layer's own work, ``sync / sync-local`` that of its exchanges;
* ``batch-gloo`` and ``sync-gloo``, with ``--gloo-gradients``: ``batch`` and ``sync`` with
  torch's DDP as it comes, the gradients averaged through gloo (bench/harness.py's
  ``bare_loop`` without ``direct_gradients``).

The variants train in turns, a block of ``--block`` steps each, their order rotating every
round; both ranks start and end every block together. The machine's drift, which moves one run
against the next by 10 % and more on a shared 2-core VM, falls on all variants alike. Printed:
milliseconds per step (median block), and the median over rounds of each ratio of step times
with its quartiles, by wall clock and by the CPU time of both ranks. ``--breakdown`` then runs
five more blocks of ``batch`` and of ``sync`` and prints where rank 0's time went: CPU per thread,
and the CPU and the wait of each call to sync batch norm's exchange.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
import types
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import (
    RAY_WORKER_NICENESS,
    bare_loop,
    loadavg,
    machine,
    median,
    quartiles,
    thread_cpu_ticks,
    write_dataset,
)

from gan.data.arrays import to_model_range
from gan.data.shards import concat, read_shard
from gan.host_memory import keep_freed_memory
from gan.nn import sync_batchnorm
from gan.nn.sync_batchnorm import SyncBatchNorm
from pipelines.config import Config, ConfigError, config_from_dict, load_config
from pipelines.loop import build_models

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
SYNC_FILES = ("stats_exchange", "sync_batchnorm")
# The step-time ratios printed, where both variants ran.
RATIOS = (
    ("sync", "batch"),
    ("before", "batch"),
    ("sync", "before"),
    ("sync-local", "batch"),
    ("sync", "sync-local"),
    ("sync-gloo", "batch-gloo"),
    ("batch", "batch-gloo"),
    ("sync", "sync-gloo"),
)


def sources_at(revision: str) -> dict[str, str]:
    """The sync batch norm modules' source at ``revision`` of this repository."""
    sources = {}
    for name in SYNC_FILES:
        shown = subprocess.run(
            ["git", "show", f"{revision}:gan/nn/{name}.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if shown.returncode != 0:
            raise ValueError(f"--before {revision}: {shown.stderr.strip()}")
        sources[name] = shown.stdout
    return sources


def module_from_source(name: str, source: str) -> types.ModuleType:
    """``source`` (one of :func:`sources_at`) run as a module of its own, ``before_<name>``."""
    module = types.ModuleType(f"before_{name}")
    exec(compile(source, f"<before {name}.py>", "exec"), module.__dict__)
    return module


def sources_today() -> dict[str, str]:
    """The sync batch norm modules' source in this working tree."""
    return {name: (ROOT / "gan" / "nn" / f"{name}.py").read_text() for name in SYNC_FILES}


def _no_exchange(tensor: torch.Tensor, group: Any = None) -> None:
    """In place of the exchange: every rank keeps its own sums."""


def sync_batch_norm_class(sources: dict[str, str], exchange: bool = True) -> type:
    """The ``SyncBatchNorm`` of ``sources``, calling the exchange of ``sources`` (not today's),
    or with ``exchange=False`` none."""
    modules = {name: module_from_source(name, sources[name]) for name in SYNC_FILES}
    modules["sync_batchnorm"].all_reduce_sum = (
        modules["stats_exchange"].all_reduce_sum if exchange else _no_exchange
    )
    return modules["sync_batchnorm"].SyncBatchNorm


def _variant_step(
    config: Config,
    channels: int,
    data: torch.Tensor,
    rank: int,
    layer: type | None,
    direct_gradients: bool,
) -> Callable[[], None]:
    """One variant's bare loop (bench/harness.py); ``layer``: a class for its sync batch norm
    layers (None: as built)."""
    torch.manual_seed(config.train.seed)
    g, d = build_models(config, channels)
    if layer is not None:
        for module in (*g.modules(), *d.modules()):
            if isinstance(module, SyncBatchNorm):
                module.__class__ = layer
    return bare_loop(config, g, d, data, rank, WORLD, direct_gradients=direct_gradients)


def breakdown(step: Callable[[], None], steps: int) -> list[str]:
    """Run ``steps`` steps and say where this rank's time went: CPU per thread, and per call of
    sync batch norm's exchange its CPU and its wait (wall clock less CPU: the peer was late)."""
    calls: list[tuple[float, float]] = []
    exchange = sync_batchnorm.all_reduce_sum

    def timed(tensor: torch.Tensor, group: Any = None) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        exchange(tensor, group)
        cpu = time.thread_time() - cpu
        calls.append((cpu, time.perf_counter() - wall - cpu))

    sync_batchnorm.all_reduce_sum = timed
    try:
        before, started = thread_cpu_ticks(by_thread=True), time.perf_counter()
        for _ in range(steps):
            step()
        after, elapsed = thread_cpu_ticks(by_thread=True), time.perf_counter() - started
    finally:
        sync_batchnorm.all_reduce_sum = exchange
    lines = [f"{elapsed / steps * 1e3:.2f} ms per step; CPU ms per step by thread:"]
    ms_per_tick = 1e3 / os.sysconf("SC_CLK_TCK")
    for thread, ticks in sorted(after.items(), key=lambda item: -item[1]):
        used = (ticks - before.get(thread, 0)) * ms_per_tick / steps
        if used >= 0.05:
            lines.append(f"    {thread:28s} {used:6.2f}")
    if calls:
        cpus = sorted(cpu for cpu, _ in calls)
        waits = sorted(wait for _, wait in calls)
        lines.append(
            f"  exchanges: {len(calls) / steps:.0f} per step; CPU per call median "
            f"{median(cpus) * 1e6:.0f} us; wait per call median {median(waits) * 1e6:.0f} us, "
            f"90th percentile {waits[int(0.9 * len(waits))] * 1e6:.0f} us, "
            f"{sum(waits) / steps * 1e3:.2f} ms per step"
        )
    return lines


def _rank(rank: int, store: str, job: dict[str, Any]) -> None:  # pragma: no cover - a child
    torch.set_num_threads(1)
    if all(config_from_dict(c).perf.keep_freed_memory for c in job["configs"].values()):
        keep_freed_memory()  # as the pipeline's workers do
    os.nice(RAY_WORKER_NICENESS)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(minutes=5),  # a rank that failed stops the other at its next block
    )
    shape = tuple(job["shape"])
    own = concat([read_shard(p, shape) for p in job["shards"][rank::WORLD]])
    data = to_model_range(own.images)
    before = sync_batch_norm_class(job["before"]) if job["before"] else None
    local = sync_batch_norm_class(job["today"], exchange=False) if job["today"] else None
    variants = {  # the layer class, and whether gradients go as the pipeline sends them
        "batch": (None, True),
        "sync": (None, True),
        "before": (before, True),
        "sync-local": (local, True),
        "batch-gloo": (None, False),
        "sync-gloo": (None, False),
    }
    steps = {
        name: _variant_step(config_from_dict(config), shape[0], data, rank, *variants[name])
        for name, config in job["configs"].items()
    }
    names = list(steps)
    for name in names:
        for _ in range(job["warmup"]):
            steps[name]()
    if rank == 0:
        print(f"warmed up; load {loadavg()}", flush=True)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for round_ in range(job["rounds"]):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            dist.barrier()
            started, cpu_started = time.perf_counter(), time.process_time()
            for _ in range(job["block"]):
                steps[name]()
            dist.barrier()  # the block ends when the slower rank is done
            times[name].append((time.perf_counter() - started, time.process_time() - cpu_started))
        if rank == 0 and (round_ + 1) % 10 == 0:
            print(f"rounds {round_ + 1:3d}: {'; '.join(_ratios(times))}", flush=True)
    everyone: list[Any] = [None] * WORLD
    dist.all_gather_object(everyone, times)
    if rank == 0:
        cpu = {n: [sum(r[n][i][1] for r in everyone) for i in range(len(times[n]))] for n in names}
        print(f"\n2 ranks, {job['rounds']} rounds of {job['block']}-step blocks")
        for name in names:
            ms = median([wall for wall, _ in times[name]]) / job["block"] * 1e3
            print(f"  {name:10s} {ms:6.2f} ms per step (median block)")
        print("", *_ratios(times, cpu), sep="\n  ")
        print(f"load average at end: {loadavg()}")
    if job["breakdown"]:
        for name in ("batch", "sync"):
            dist.barrier()
            lines = breakdown(steps[name], job["block"] * 5)
            if rank == 0:
                print(f"\nrank 0, {name}: " + "\n".join(lines), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _ratios(
    times: dict[str, list[tuple[float, float]]], cpu: dict[str, list[float]] | None = None
) -> list[str]:
    """The :data:`RATIOS` of step times that these variants allow: the median of the per-round
    ratios; with ``cpu`` (both ranks' CPU seconds per block), also their
    quartiles and the median ratio of CPU time."""
    pairs = [(a, b) for a, b in RATIOS if a in times and b in times]
    lines = []
    for a, b in pairs:
        walls = [x[0] / y[0] for x, y in zip(times[a], times[b], strict=True)]
        line = f"{a}/{b} {median(walls):.3f}"
        if cpu is not None:
            low, high = quartiles(walls)
            line += f" (quartiles {low:.3f}-{high:.3f})"
            line += f", CPU {median([x / y for x, y in zip(cpu[a], cpu[b], strict=True)]):.3f}"
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", help="a git revision whose sync batch norm to run as well")
    parser.add_argument("--block", type=int, default=40, help="steps per block")
    parser.add_argument("--rounds", type=int, default=30, help="rounds (a block per variant)")
    parser.add_argument("--warmup", type=int, default=50, help="steps per variant before")
    parser.add_argument(
        "--gloo-gradients",
        action="store_true",
        help="also batch-gloo and sync-gloo: DDP's gradients through gloo, as torch does",
    )
    parser.add_argument(
        "--decompose",
        action="store_true",
        help="also sync-local: today's layers with no exchange (the layer's cost alone)",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="then say where rank 0's time goes: CPU per thread, sync batch norm's exchanges",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = parser.parse_args()
    if args.block < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--block and --rounds must be at least 1, --warmup at least 0")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            given = [f"workdir={tmp}", "train.eval_every=0", *args.overrides, "train.workers=2"]
            sync = load_config(None, given)
            m = sync.model
            plain = [
                f"model.{k}=batch" for k in ("g_norm", "d_norm") if getattr(m, k) == "sync_batch"
            ]
            batch = load_config(None, [*given, *plain])
            before = sources_at(args.before) if args.before else {}
        except (ConfigError, ValueError) as exc:
            parser.error(str(exc))
        if not plain:
            parser.error("neither model.g_norm nor model.d_norm is sync_batch: nothing to compare")
        configs = {"batch": batch.to_dict(), "sync": sync.to_dict()}
        if before:
            configs["before"] = sync.to_dict()
        if args.decompose:
            configs["sync-local"] = sync.to_dict()
        if args.gloo_gradients:
            configs.update({"batch-gloo": batch.to_dict(), "sync-gloo": sync.to_dict()})
        print(f"machine: {machine()}")
        print(f"load average at start: {loadavg()}; niceness {RAY_WORKER_NICENESS}")
        print(f"model: g_norm={sync.model.g_norm}, d_norm={sync.model.d_norm}", end="")
        print(f"; before: {args.before}" if args.before else "", flush=True)
        dataset = write_dataset(sync, Path(tmp) / "dataset")
        job = {
            "configs": configs,
            "before": before,
            "today": sources_today() if args.decompose else {},
            "shards": dataset.shards,
            "shape": list(dataset.shape),
            "block": args.block,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "breakdown": args.breakdown,
        }
        mp.start_processes(
            _rank, args=(str(Path(tmp) / "store"), job), nprocs=WORLD, start_method="spawn"
        )


if __name__ == "__main__":
    main()
