"""What a few small calls cost right after other work: why an exchange costs more in a step.

    python bench/cold_calls.py
    python bench/cold_calls.py --calls 1000

Sync batch norm's exchange costs 13-17 µs of CPU back to back and 110-140 µs inside a
training step (docs/benchmarks.md). This times three small probes, each right after one kind
of work, in one process with one torch thread:

* probes: a 200-step Python loop; 20 system calls (``os.getppid``); 10 clones of a 257-number
  float64 tensor (sync batch norm's statistics at 128 channels);
* work before each probe: none (back to back); a forward and backward of a 64-channel 3×3
  convolution on 32×64×8×8 (about the default generator's layers); a pass over 16 MB of memory
  (``mul_`` on 4 million floats); 1 ms of a Python busy loop; a 1 ms sleep.

Prints the median of ``--calls`` timings of each probe after each work, and each one's ratio to
back to back.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from harness import loadavg, machine


def _python_loop() -> None:
    total = 0
    for i in range(200):
        total += i


def _system_calls() -> None:
    for _ in range(20):
        os.getppid()


def works() -> dict[str, Callable[[], None]]:
    """The work run before each probe, by name."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    features = torch.randn(32, 64, 8, 8, requires_grad=True)
    memory = torch.randn(4_000_000)

    def convolution() -> None:
        conv(features).sum().backward()

    def busy() -> None:
        until = time.perf_counter() + 1e-3
        while time.perf_counter() < until:
            pass

    return {
        "none": lambda: None,
        "convolution": convolution,
        "16 MB pass": lambda: memory.mul_(1.0),
        "1 ms Python": busy,
        "1 ms sleep": lambda: time.sleep(1e-3),
    }


def probes() -> dict[str, Callable[[], None]]:
    """The small calls timed, by name."""
    bn_statistics = torch.randn(257, dtype=torch.float64)

    def clones() -> None:
        for _ in range(10):
            bn_statistics.clone()

    return {"Python loop": _python_loop, "20 syscalls": _system_calls, "10 torch clones": clones}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=400, help="timings per probe and work")
    args = parser.parse_args()
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    torch.set_num_threads(1)
    print(f"machine: {machine()}")
    print(f"load average at start: {loadavg()}; medians of {args.calls} calls, µs")
    timed = probes()
    baseline: dict[str, float] = {}
    print(f"{'after':14s}" + "".join(f"{name:>24s}" for name in timed))
    for work_name, work in works().items():
        cells = []
        for probe_name, probe in timed.items():
            samples = []
            for _ in range(args.calls):
                work()
                started = time.perf_counter()
                probe()
                samples.append(time.perf_counter() - started)
            took = statistics.median(samples) * 1e6
            baseline.setdefault(probe_name, took)
            cells.append(f"{took:8.1f} ({took / baseline[probe_name]:4.1f}x)")
        print(f"{work_name:14s}" + "".join(f"{cell:>24s}" for cell in cells), flush=True)
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
