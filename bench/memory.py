"""Peak resident memory of each Ray Train worker during the default training run.

    python bench/memory.py                    # the default: 2 workers, 2,000 steps, probe on
    python bench/memory.py train.steps=500    # config overrides

Trains through ``pipelines.train.run_training`` with the default config and the in-training
probe on (a feature classifier is trained first, as fit_features does), and meanwhile polls
/proc every 0.5 s for the Ray Train worker processes started under this process
(``ray::RayTrainWorker`` in the command line). Printed per worker: peak RSS (the kernel's
high-water mark ``VmHWM``, so no peak between two polls is missed) and peak PSS (shared library
pages split between the processes that map them; polled). Also the driver's peak RSS.
Linux only.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from harness import (
    WORKER_MARK,
    descendants,
    loadavg,
    machine,
    median,
    write_classifier,
    write_dataset,
)

from pipelines.config import load_config


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


class WorkerPoller:
    """Polls the Ray Train workers below this process; keeps each one's peaks (KiB)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peaks: dict[int, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in descendants(os.getpid()):
                try:
                    if WORKER_MARK not in Path(f"/proc/{pid}/cmdline").read_text():
                        continue
                    peak = self.peaks.setdefault(pid, {"hwm": 0, "rss": 0, "pss": 0})
                    peak["hwm"] = max(peak["hwm"], _status_kib(pid, "VmHWM"))
                    peak["rss"] = max(peak["rss"], _status_kib(pid, "VmRSS"))
                    peak["pss"] = max(peak["pss"], _pss_kib(pid))
                except (OSError, ValueError):  # the process ended between listing and reading
                    pass
            self._stop.wait(self.interval)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    from pipelines.runner import init_ray
    from pipelines.train import run_training

    init_ray()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, [f"workdir={tmp}", *args.overrides])
        dataset = write_dataset(config, Path(tmp) / "dataset")
        probe = {
            "classifier": write_classifier(config, dataset, Path(tmp) / "classifier"),
            "holdout": dataset.holdout,
        }
        rates: list[float] = []

        def on_report(metrics: dict[str, Any], checkpoint: str | None) -> None:
            rates.append(metrics["images_per_s"])

        load_start = loadavg()
        started = time.perf_counter()
        with WorkerPoller() as poller:
            run_training(
                config,
                shards=dataset.shards,
                shape=dataset.shape,
                storage_path=tmp,
                name="memory",
                on_report=on_report,
                probe=probe if config.train.eval_every else None,
            )
        wall = time.perf_counter() - started
    t = config.train
    print(
        f"run: {t.workers} workers, {t.steps} steps, eval_every {t.eval_every}, {wall:.0f} s, "
        f"median {median(rates[1:]):.0f} images/s (workers' figure); "
        f"load {load_start} -> {loadavg()}"
    )
    gib = 2**20
    for i, (pid, peak) in enumerate(sorted(poller.peaks.items())):
        print(
            f"worker {i} (pid {pid}): peak RSS {peak['hwm'] / gib:.2f} GiB (VmHWM), "
            f"peak PSS {peak['pss'] / gib:.2f} GiB (polled)"
        )
    if not poller.peaks:
        print("no Ray Train worker process was seen")
    driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / gib
    print(f"driver: peak RSS {driver:.2f} GiB")


if __name__ == "__main__":
    main()
