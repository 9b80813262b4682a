"""Operators dispatched per training step: the pipeline's step against the bare loop.

    python bench/step_ops.py                       # dcgan64 and the default model, on the CPU
    python bench/step_ops.py --model dcgan64 --device cuda

A small model on a fast GPU is bound by the host: each operator the step dispatches costs
Python, the dispatcher and a kernel launch, whatever its arithmetic. The count is exact and does
not move with the machine's load, so it shows what a change to the step saves before a GPU
measures the time. Counted under the torch profiler, over ``--steps`` steps after warm-up: every
``aten::`` operator that no other ``aten::`` operator called (the ones Python or the autograd
engine dispatched; what they call inside is the kernel's business). Printed: operators per step
of each loop, and the operators the pipeline's step dispatches more often than the bare one.

The loops are bench/gpu_speed.py's: ``bare`` (gpu_speed.bare_loop) and ``ganpipe``
(``TrainingState.step`` with the worker loop's per-step bookkeeping).
"""

from __future__ import annotations

import argparse

import torch
from gpu_speed import MODELS, _config, bare_loop, ganpipe_loop, host_data
from harness import dispatched_ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cuda", "cpu"))
    parser.add_argument("--model", default="dcgan64,default", help=f"of {', '.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    for model in args.model.split(","):
        if model not in MODELS:
            parser.error(f"unknown model {model!r}; known: {', '.join(MODELS)}")
        config = _config(model, [], args.device)
        if device.type == "cpu":  # the count does not depend on the batch; the time does
            config.train.batch_size = 4
        data = host_data(config)
        bare = dispatched_ops(bare_loop(config, data, device), args.warmup, args.steps)
        ours = dispatched_ops(ganpipe_loop(config, data, device), args.warmup, args.steps)
        total_bare, total_ours = sum(bare.values()), sum(ours.values())
        print(
            f"{model} ({device.type}): {total_ours:.1f} operators per step in the pipeline's "
            f"step, {total_bare:.1f} in the bare loop ({total_ours - total_bare:+.1f})"
        )
        extra = {name: ours[name] - bare.get(name, 0.0) for name in ours}
        for name, more in sorted(extra.items(), key=lambda item: -item[1]):
            if more > 0:
                print(f"  {more:6.1f}  {name}")


if __name__ == "__main__":
    main()
