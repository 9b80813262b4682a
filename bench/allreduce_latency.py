"""Latency of the tiny all-reduce that sync batch norm makes, through gloo and through TCP.

    python bench/allreduce_latency.py                 # 257 float64, 2 processes, 0 and 3 ms work
    python bench/allreduce_latency.py --numel 65 --calls 2000

Two processes (gloo process group, one torch thread each) all-reduce a float64 tensor of
``--numel`` numbers (257 = [sum, sum of squares] of 128 channels and a count) ``--calls`` times,
with nothing between the calls and with ``--work-ms`` of matrix products between them (as a
training step has). Each line gives, for rank 0, the wall time per call, the time spent inside
the call, and the CPU time per call of each of the process's threads: gloo's receive thread
(``gloo_tcp_loop``) and its collective thread (``pt_gloo_runloop``) beside the caller
(``python``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import loadavg, machine, thread_cpu_ticks

from gan.nn.stats_exchange import EXCHANGE_ENV, all_reduce_sum


def _rank(rank: int, store: str, args: argparse.Namespace) -> None:  # pragma: no cover
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    stats = torch.zeros(args.numel, dtype=torch.float64)
    work = torch.randn(128, 128)
    exchanges = {"gloo all_reduce": "process_group", "TCP exchange": "tcp"}
    for work_ms in (0.0, args.work_ms):
        for label, exchange in exchanges.items():
            os.environ[EXCHANGE_ENV] = exchange
            for _ in range(50):
                all_reduce_sum(stats)
            dist.barrier()
            before, inside = thread_cpu_ticks(), 0.0
            started = time.perf_counter()
            for _ in range(args.calls):
                until = time.perf_counter() + work_ms / 1000
                while time.perf_counter() < until:
                    torch.mm(work, work)
                entered = time.perf_counter()
                all_reduce_sum(stats)
                inside += time.perf_counter() - entered
            wall = time.perf_counter() - started
            after = thread_cpu_ticks()
            if rank == 0:
                per_call = 1000 / os.sysconf("SC_CLK_TCK") / args.calls  # ms per tick per call
                threads = ", ".join(
                    f"{name} {(after[name] - before.get(name, 0)) * per_call:.3f}"
                    for name in sorted(after)
                    if after[name] - before.get(name, 0) > 0
                )
                print(
                    f"work {work_ms:.0f} ms, {label:15s}: {1000 * wall / args.calls:6.3f} ms per "
                    f"call, {1000 * inside / args.calls:6.3f} ms inside; CPU ms per call: "
                    f"{threads}",
                    flush=True,
                )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--numel", type=int, default=257)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--work-ms", type=float, default=3.0)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"load average at start: {loadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(f"{tmp}/store", args), nprocs=2, start_method="spawn")
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
