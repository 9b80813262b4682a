"""The exchange's all-reduce today against an earlier revision's, in turns, in two processes.

    python bench/exchange_ab.py --before f3277dd               # the default model's buckets
    python bench/exchange_ab.py --before HEAD --sizes 257,5000 --rounds 60

Two processes (gloo process group for set-up, one torch thread each) load
``gan/nn/stats_exchange.py`` as it is and as it was at ``--before``, each with its own
connections (a process group of its own), and sum a float32 tensor of each of ``--sizes``
numbers: ``--calls`` sums of one version, then of the other, the order swapping every round.
Prints, for rank 0 and each size, the median time per all-reduce of both and the median of the
rounds' ratios. The default sizes are the default model's gradients, one DDP bucket each:
D's 34,401 and G's 99,009 parameters.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import loadavg, machine
from syncbn_ab import module_from_source, sources_at

import gan.nn.stats_exchange as today

WORLD = 2


def _rank(rank: int, store: str, source: str, args: argparse.Namespace) -> None:  # pragma: no cover
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
        timeout=timedelta(minutes=5),
    )  # fmt: skip
    before = module_from_source("stats_exchange", source)
    versions = {"today": (today, dist.new_group()), "before": (before, dist.new_group())}
    for size in args.sizes:
        tensor = torch.randn(size)
        for module, group in versions.values():
            for _ in range(args.calls):
                module.all_reduce_sum(tensor.clone(), group)
        seconds: dict[str, list[float]] = {name: [] for name in versions}
        for round_ in range(args.rounds):
            order = list(versions) if round_ % 2 else list(versions)[::-1]
            for name in order:
                module, group = versions[name]
                dist.barrier()
                started = time.perf_counter()
                for _ in range(args.calls):
                    module.all_reduce_sum(tensor.clone(), group)
                seconds[name].append((time.perf_counter() - started) / args.calls)
        if rank == 0:
            ratios = [t / b for t, b in zip(seconds["today"], seconds["before"], strict=True)]
            print(
                f"{size:>9,} float32: today {statistics.median(seconds['today']) * 1e6:7.1f} µs, "
                f"before {statistics.median(seconds['before']) * 1e6:7.1f} µs per all-reduce; "
                f"today / before {statistics.median(ratios):.3f}",
                flush=True,
            )
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="a git revision of this repository")
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[34_401, 99_009],
        help="comma-separated numbers of float32 elements",
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=20, help="all-reduces per turn")
    args = parser.parse_args()
    try:
        source = sources_at(args.before)["stats_exchange"]
    except ValueError as error:
        parser.error(str(error))
    print(f"machine: {machine()}")
    print(f"load average at start: {loadavg()}")
    print(f"2 ranks, {args.rounds} rounds of {args.calls} all-reduces; before: {args.before}")
    with tempfile.TemporaryDirectory() as scratch:
        mp.spawn(_rank, args=(f"{scratch}/store", source, args), nprocs=WORLD)
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
