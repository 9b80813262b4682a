"""Ray Train on one GPU against a bare PyTorch loop on the same card.

    python bench/gpu_ray_train.py                       # a CUDA machine with Ray installed
    python bench/gpu_ray_train.py --device cpu --model default --steps 120 --warmup 40  # smoke

For each model of bench/gpu_speed.py (the 64x64 DCGAN at batch 256, the default 16x16 at 64),
rounds alternate (ABC, CBA, ...) three variants on the same card:

* ``ray``: ``pipelines.train.run_training`` with ``train.use_gpu=true`` and one worker: Ray Train
  V2, an NCCL process group, DDP, the worker loop with its reports every ``train.report_every``
  steps, handed to Ray Train at most every ``train.report_seconds``, and checkpoints. Measured on
  the driver between the first report past ``--warmup`` steps and the last one
  (bench/train_overhead.py's ``run_ray``), so reports and checkpoints count.
* ``ray-each`` (only with ``--variants``): ``ray`` with ``train.report_seconds=0``, one Ray Train
  report per window.
* ``step``: the pipeline's step (``TrainingState.step`` and the per-step bookkeeping of the
  worker loop) in this process, without Ray.
* ``bare``: the bare loop of bench/gpu_speed.py (same networks, Adam and loss; nothing else).

The images are the default digits at the model's resolution for ``ray`` and random images of the
same shape for the others: the content does not change the work.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from gpu_speed import MODELS, bare_loop, ganpipe_loop, host_data, images_per_s
from harness import machine, median, write_dataset
from train_overhead import RAY_VARIANTS, run_ray

from pipelines.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--model", default="dcgan64,default", help="comma-separated")
    # Long enough for several Ray Train reports after the warm-up (one per train.report_seconds).
    parser.add_argument("--steps", type=int, default=1500, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=200, help="steps left out of the rate")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="ray,step,bare", help="ray, ray-each, step, bare")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"machine: {machine()}; device: {card}", flush=True)
    torch.backends.cudnn.benchmark = True

    from pipelines.runner import init_ray

    started = time.perf_counter()
    init_ray()
    print(f"ray.init: {time.perf_counter() - started:.1f} s", flush=True)
    variants = args.variants.split(",")
    for needed in ("step", "bare"):
        if needed not in variants:
            parser.error(f"--variants must include {needed}: the ratios are taken to it")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.model.split(","):
            overrides = [
                f"workdir={tmp}",
                "train.workers=1",
                f"train.use_gpu={'true' if device.type == 'cuda' else 'false'}",
                f"train.steps={args.steps}",
                "train.eval_every=0",
                *MODELS[model],
            ]
            config = load_config(None, overrides)
            dataset = write_dataset(config, Path(tmp) / f"dataset-{model}")
            data = host_data(config, channels=dataset.shape[0])
            batch = config.train.batch_size
            print(f"\n{model}: batch {batch}, images {dataset.shape}", flush=True)
            rates: dict[str, list[float]] = {v: [] for v in variants}
            for round_index in range(args.rounds):
                order = variants if round_index % 2 == 0 else variants[::-1]
                for variant in order:
                    if variant in RAY_VARIANTS:
                        name = f"{model}-r{round_index}-{variant}"
                        result = run_ray(
                            config, dataset, tmp, name, args.warmup, RAY_VARIANTS[variant]
                        )
                        rate = result["images_per_s"]
                        detail = (
                            f"(workers' own figure {result['worker_images_per_s']:,.0f}; "
                            f"{result['reports']} Ray Train reports, the first after "
                            f"{result['first_report_s']:.1f} s)"
                        )
                    else:
                        loop = bare_loop if variant == "bare" else ganpipe_loop
                        rate, warm = images_per_s(
                            loop(config, data, device),
                            batch,
                            device,
                            args.warmup,
                            args.steps - args.warmup,
                        )
                        detail = f"(first {args.warmup} steps {warm:.1f} s)"
                    rates[variant].append(rate)
                    print(
                        f"  round {round_index + 1} {variant:8s} {rate:10,.0f} images/s {detail}",
                        flush=True,
                    )
            bare = median(rates["bare"])
            print(f"{model} on {card}: medians over {args.rounds} rounds")
            for variant in variants:
                value = median(rates[variant])
                print(f"  {variant:8s} {value:10,.0f} images/s  {value / bare:5.2f}x bare")
            step = median(rates["step"])
            for variant in [v for v in variants if v.startswith("ray")]:
                ratio = median(rates[variant]) / step
                print(f"  {variant} / step {ratio:5.2f} (what Ray Train adds)")
    print(f"CPUs: {os.cpu_count()}", flush=True)


if __name__ == "__main__":
    main()
