"""How long Ray Train takes to start a worker group, with a training function that does nothing.

    python bench/ray_train_startup.py               # 2 workers, 5 rounds
    python bench/ray_train_startup.py --workers 1 --rounds 3

The part of the pipeline's "command to the first training step" that is Ray Train's own: a
local Ray (cores + 1 CPUs, as the embedded default, with the pipeline's Ray Train settings),
then in every round one fit of each trainer, in alternating order:

* ``ray``: Ray Train's ``TorchTrainer`` as it comes;
* ``pipeline``: the class the pipeline trains with (``pipelines.train.torch_trainer_class``:
  no Ray Data actor when no datasets are passed).

Each fit has a gloo process group and a function that only notes the time. Prints, per fit, the
seconds from creating the trainer to the function's start on rank 0 and to ``fit()`` returning,
then the medians of each trainer over the rounds after the first (the first also starts Ray's
own actors).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray
from harness import loadavg, machine
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from pipelines.runner import ray_train_environment
from pipelines.train import torch_trainer_class


def _note_start(loop_config: dict) -> None:
    if ray.train.get_context().get_world_rank() == 0:
        Path(loop_config["started"]).write_text(str(time.time()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"load average at start: {loadavg()}")
    os.environ.update(ray_train_environment())
    ray.init(num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False, log_to_driver=False)
    trainers = {"ray": TorchTrainer, "pipeline": torch_trainer_class()}
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in trainers}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            order = list(trainers) if round_ % 2 else list(trainers)[::-1]
            for name in order:
                started = Path(scratch, f"started-{round_}-{name}")
                created = time.time()
                trainers[name](
                    _note_start,
                    train_loop_config={"started": str(started)},
                    scaling_config=ScalingConfig(num_workers=args.workers),
                    torch_config=TorchConfig(backend="gloo"),
                    run_config=RunConfig(name=f"fit-{round_}-{name}", storage_path=scratch),
                ).fit()
                returned = time.time() - created
                entered = float(started.read_text()) - created
                if round_:
                    figures[name].append((entered, returned))
                print(
                    f"round {round_} {name:<8}: {args.workers} worker(s), function started after "
                    f"{entered:.2f} s, fit() returned after {returned:.2f} s",
                    flush=True,
                )
    ray.shutdown()
    for name, pairs in figures.items():
        if pairs:
            entered = statistics.median(e for e, _ in pairs)
            returned = statistics.median(r for _, r in pairs)
            print(
                f"{name:<8} median of {len(pairs)}: function started after {entered:.2f} s, "
                f"fit() returned after {returned:.2f} s"
            )
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
