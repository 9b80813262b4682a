"""Cost of synchronized batch norm: step time with model.g_norm/d_norm=sync_batch against batch.

    python bench/syncbn_cost.py                   # 2 processes, 5 rounds of 300 steps each
    python bench/syncbn_cost.py --profile         # also torch.profiler tables of rank 0
    python bench/syncbn_cost.py -- model.g_width=64

Runs the bare DDP loop of bench/harness.py (gloo, one thread per process, global batch 64) with
each variant in rotating order: sync batch norm with its statistics over direct TCP connections
(the default, ``sync_batch``), the same through gloo's all_reduce (``sync_batch/gloo``,
GANPIPE_SYNC_BN_EXCHANGE=process_group) and plain batch norm (``batch``). Prints images/s, ms
per step, the median ratios to ``batch``, and how many statistics all-reduces a step makes (DDP's
gradient all-reduces go through its C++ reducer and are not counted).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from harness import loadavg, machine, median, run_reference, write_dataset

from gan.nn.stats_exchange import EXCHANGE_ENV
from pipelines.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mode", default="bare", help="bare (plain loop) or state (pipeline's)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables")
    parser.add_argument(
        "--only-g",
        action="store_true",
        help="switch G's norm only; D keeps the configured one (the default D: spectral)",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    print(f"load average at start: {loadavg()}")
    # variant -> (model norm, statistics exchange)
    variants = {
        "sync_batch": ("sync_batch", "tcp"),
        "sync_batch/gloo": ("sync_batch", "process_group"),
        "batch": ("batch", "tcp"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        configs = {
            norm: load_config(
                None,
                [
                    f"workdir={tmp}",
                    f"train.workers={args.workers}",
                    f"model.g_norm={norm}",
                    *([] if args.only_g else [f"model.d_norm={norm}"]),
                    *args.overrides,
                ],
            )
            for norm in ("sync_batch", "batch")
        }
        dataset = write_dataset(configs["batch"], Path(tmp) / "dataset")
        batch = configs["batch"].train.batch_size
        m = configs["sync_batch"].model
        print(f"compared: g_norm {m.g_norm} and d_norm {m.d_norm} against batch norm there")

        def run(variant: str, **kwargs: object) -> dict:
            norm, exchange = variants[variant]
            os.environ[EXCHANGE_ENV] = exchange  # the spawned ranks inherit it
            return run_reference(configs[norm], dataset, mode=args.mode, **kwargs)

        for variant in variants:
            counted = run(variant, steps=20, warmup=5, count_all_reduces=True)
            print(f"{variant:16s}: {counted['all_reduces_per_step']:.0f} all-reduces per step")

        names = list(variants)
        rounds: list[dict[str, dict]] = []
        for repeat in range(args.repeats):
            shift = repeat % len(names)
            results = {}
            for variant in names[shift:] + names[:shift]:
                r = run(variant, steps=args.steps, warmup=args.warmup)
                results[variant] = r
                print(
                    f"round {repeat} {variant:16s}: {r['images_per_s']:6.0f} images/s, "
                    f"{1000 * batch / r['images_per_s']:6.1f} ms/step, "
                    f"{r['images_per_cpu_s']:6.0f} images per CPU-second  "
                    f"load {r['load_start']} -> {r['load_end']}",
                    flush=True,
                )
            rounds.append(results)

        print()
        for variant in names:
            rate = median([r[variant]["images_per_s"] for r in rounds])
            per_cpu = median([r[variant]["images_per_cpu_s"] for r in rounds])
            print(
                f"{variant:16s}: median {rate:6.0f} images/s, {1000 * batch / rate:6.1f} ms/step, "
                f"{per_cpu:6.0f} images per CPU-second"
            )
        for variant in names[:-1]:
            for key, label in (("images_per_s", "step time"), ("images_per_cpu_s", "CPU per step")):
                ratios = [r["batch"][key] / r[variant][key] for r in rounds]
                each = ", ".join(f"{x:.3f}" for x in ratios)
                print(
                    f"{label} {variant} / batch: median {median(ratios):.3f} ({each}); "
                    f"{args.workers} processes x {batch // args.workers} images"
                )

        if args.profile:
            for variant in names:
                table = Path(tmp) / "profile.txt"
                run(variant, steps=50, warmup=20, profile=str(table))
                print(f"\ntorch.profiler, rank 0, 50 steps, {variant}:\n{table.read_text()}")
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
