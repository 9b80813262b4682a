"""How long Ray Train takes to start a worker group, with a training function that does nothing.

    python bench/ray_train_startup.py               # 2 workers, 3 fits
    python bench/ray_train_startup.py --workers 1 --fits 5

The part of the pipeline's "command to the first training step" that is Ray Train's own: a
local Ray (cores + 1 CPUs, as the embedded default), then ``--fits`` times a ``TorchTrainer``
with a gloo process group whose function only notes the time. Prints, per fit, the seconds
from creating the trainer to the function's start on rank 0, and to ``fit()`` returning.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import ray
from harness import loadavg, machine
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer


def _note_start(loop_config: dict) -> None:
    if ray.train.get_context().get_world_rank() == 0:
        Path(loop_config["started"]).write_text(str(time.time()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fits", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"load average at start: {loadavg()}")
    ray.init(num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as scratch:
        for fit in range(args.fits):
            started = Path(scratch, f"started-{fit}")
            created = time.time()
            TorchTrainer(
                _note_start,
                train_loop_config={"started": str(started)},
                scaling_config=ScalingConfig(num_workers=args.workers),
                torch_config=TorchConfig(backend="gloo"),
                run_config=RunConfig(name=f"fit-{fit}", storage_path=scratch),
            ).fit()
            returned = time.time()
            entered = float(started.read_text()) - created
            print(
                f"fit {fit}: {args.workers} worker(s), function started after {entered:.2f} s, "
                f"fit() returned after {returned - created:.2f} s",
                flush=True,
            )
    ray.shutdown()
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
