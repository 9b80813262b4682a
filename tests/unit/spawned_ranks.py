"""Run a test's worker function in spawned processes, one per rank, and collect their results.

The worker is called as ``worker(rank, init_file, out_dir, *args)``: ``init_file`` is a free
path for ``init_process_group(init_method="file://...")``, and the worker saves its result with
``torch.save`` as ``out_dir/rank{rank}.pt``, or its traceback as ``out_dir/rank{rank}.err``.
Spawning costs a torch import per process, so a test module runs its ranks once, in a
module-scoped fixture.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

JOIN_TIMEOUT_S = 120.0


def run_ranks(worker: Callable[..., None], world_size: int, tmp: Path, *args: Any) -> list[Any]:
    """Each rank's saved result, in rank order; fails with the workers' tracebacks when one
    hangs past JOIN_TIMEOUT_S or exits non-zero."""
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=worker, args=(rank, str(tmp / "store"), str(tmp), *args))
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(JOIN_TIMEOUT_S)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    errors = "\n".join(f.read_text() for f in sorted(tmp.glob("rank*.err")))
    assert not hung, f"workers did not finish in {JOIN_TIMEOUT_S}s\n{errors}"
    assert [p.exitcode for p in procs] == [0] * world_size, f"worker failed:\n{errors}"
    return [torch.load(tmp / f"rank{rank}.pt") for rank in range(world_size)]
