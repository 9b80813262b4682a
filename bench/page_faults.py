"""Minor page faults and time per training step, with and without ``perf.keep_freed_memory``.

    python bench/page_faults.py                     # 1 worker's step, 4 rounds
    python bench/page_faults.py --rounds 6 -- model.g_width=64

Each round runs four fresh processes one after another, one per variant: the bare loop of
bench/harness.py and the pipeline's step (``TrainingState.step``), each with malloc's thresholds
fixed (``perf.keep_freed_memory``, the default) or left to glibc. A process of its own each,
because malloc's settings are process-wide and its thresholds move with the process's history.
Each process trains ``--warmup`` steps, then times ``--steps`` steps on the main thread (one
torch thread) and counts the minor page faults they took (``getrusage``). Rounds alternate the
order of the variants. Printed: each run, then per variant the median over rounds.

Without the fixed thresholds glibc may hand freed activations back to the kernel every step, and
fault them in again on the next; how many depends on the run. That is what this measures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import (
    _reference_job,
    _timed_reference_loop,
    loadavg,
    machine,
    median,
    write_dataset,
)

from pipelines.config import ConfigError, load_config

VARIANTS = {
    "bare, kept": ("bare", True),
    "bare, glibc's": ("bare", False),
    "state, kept": ("state", True),
    "state, glibc's": ("state", False),
}


def _child(job_file: str) -> None:  # pragma: no cover - a child process
    """Trains one variant and prints its figures as JSON."""
    import torch

    torch.set_num_threads(1)
    job = json.loads(Path(job_file).read_text())
    # reference_step, inside, reads perf.keep_freed_memory from job["config"].
    result, _ = _timed_reference_loop(0, 1, job)
    ms = 1e3 * result["elapsed_s"] / job["steps"]
    print(json.dumps({"ms": ms, "faults": result["minor_faults_per_step"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="processes per variant")
    parser.add_argument("--steps", type=int, default=600, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=100, help="steps before the timed ones")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--rounds and --steps must be at least 1, --warmup at least 0")

    print(f"machine: {machine()}")
    print(f"load average at start: {loadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            # One worker whatever the overrides say: each variant runs as rank 0 of 1.
            base = [f"workdir={tmp}", *args.overrides, "train.workers=1"]
            configs = {
                name: load_config(None, [*base, f"perf.keep_freed_memory={str(kept).lower()}"])
                for name, (_, kept) in VARIANTS.items()
            }
        except ConfigError as exc:
            parser.error(str(exc))
        if configs["bare, kept"].model.conditional:
            parser.error("model.conditional=true: the bare loop is unconditional")
        dataset = write_dataset(configs["bare, kept"], Path(tmp) / "dataset")
        results: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
        for round_ in range(args.rounds):
            order = list(VARIANTS) if round_ % 2 == 0 else list(VARIANTS)[::-1]
            for name in order:
                job = _reference_job(
                    configs[name], dataset, VARIANTS[name][0], args.steps, args.warmup
                )
                job_file = Path(tmp) / "job.json"
                job_file.write_text(json.dumps(job))
                done = subprocess.run(
                    [sys.executable, __file__, "--child", str(job_file)],
                    capture_output=True,
                    text=True,
                )
                lines = done.stdout.strip().splitlines()
                if done.returncode != 0 or not lines:
                    raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
                figures = json.loads(lines[-1])
                results[name].append(figures)
                print(
                    f"round {round_}  {name:15s} {figures['ms']:6.2f} ms/step  "
                    f"{figures['faults']:6.0f} minor faults/step",
                    flush=True,
                )

    print()
    print(f"median over {args.rounds} rounds of {args.steps} steps (1 worker, one torch thread)")
    for name in VARIANTS:
        ms = [r["ms"] for r in results[name]]
        faults = [r["faults"] for r in results[name]]
        print(
            f"  {name:15s} {median(ms):6.2f} ms/step ({min(ms):.2f}-{max(ms):.2f})  "
            f"{median(faults):6.0f} minor faults/step ({min(faults):.0f}-{max(faults):.0f})"
        )
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
