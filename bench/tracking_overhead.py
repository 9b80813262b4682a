"""Tracking overhead: training images/s with the train step's full MLflow tracking against none.

    python bench/tracking_overhead.py                        # 3 rounds of 500 steps
    python bench/tracking_overhead.py --repeats 5 --steps 800
    python bench/tracking_overhead.py -- model.g_width=64    # config overrides after --

Both variants train the default digits config on Ray Train from the same prepared shards, with
the in-training probe on (the evaluation distance and a sample grid every ``train.eval_every``
steps are part of training, tracked or not):

* ``on``: the train step itself (``pipelines.steps.training.train``) with a RunLogger on a
  throwaway SQLite store: every report's metrics, the sample grid as an MLflow image, the
  dataset inputs, system metrics every 5 s, the final checkpoint as an artifact.
* ``off``: ``pipelines.train.run_training`` with the same arguments and an ``on_report`` that
  only keeps the figures.

The figure is the workers' ``images_per_s`` of each report window after ``--warmup`` steps
(median per run): it leaves the probe out, and counts what the step process's logging takes
from the workers' cores. Rounds alternate the order (off/on, on/off, ...) because other
processes share the CPU; each round's ratio is taken between two runs next to each other, and
the median of the rounds printed. Target: ``on`` under 3 % slower.

On a shared machine the load of other processes moves images/s by tens of percent between
runs, far more than the effect sought, so the script also measures what tracking costs in CPU
time, which that load hardly moves: after each untracked run it replays that run's reports
(metrics, sample grids) through the train step's handler on a fresh run of the store, and takes
system-metrics samples (collect + log) the same way, each timed with ``time.thread_time``. The
tracking's CPU seconds for the run (the reports' handling + one sample per 5 s of training)
over the workers' core-seconds of that training is the most it can slow training on a machine
whose cores the workers fill. The step process's whole CPU time per run is printed too (it also
counts the driver's polling of the report queue, which grows with the run's wall time).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from pipelines.config import Config, load_config
from pipelines.dag import Dag, StepContext
from pipelines.runner import init_ray, run_pipeline
from pipelines.steps.default_dag import FIT_FEATURES, PREPARE, VALIDATE
from pipelines.steps.prepare import MANIFEST
from pipelines.steps.training import report_to_mlflow, split_files, train
from pipelines.tracking import (
    SYSTEM_METRICS_INTERVAL_S,
    RunLogger,
    _SystemMetrics,
    ensure_experiment,
)
from pipelines.train import run_training


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def steady_rate(reports: list[tuple[int, float]], warmup: int) -> float:
    """Median images/s of the report windows that end after ``warmup`` steps."""
    rates = [rate for step, rate in reports if step > warmup]
    if not rates:
        raise SystemExit(f"no report after --warmup {warmup} steps: raise --steps")
    return statistics.median(rates)


# The whole reports of the latest untracked run, for the replay.
last_reports: list[dict[str, Any]] = []


def run_off(config: Config, dataset: str, classifier: str, folder: Path) -> list[tuple[int, float]]:
    manifest = json.loads((Path(dataset) / MANIFEST).read_text())
    reports: list[tuple[int, float]] = []
    last_reports.clear()

    def keep(metrics: dict[str, Any], checkpoint: str | None) -> None:
        reports.append((int(metrics["step"]), float(metrics["images_per_s"])))
        last_reports.append(dict(metrics))

    run_training(
        config,
        shards=split_files(dataset, manifest, "train"),
        shape=tuple(manifest["shape"]),
        storage_path=str(folder / "ray"),
        name="train",
        on_report=keep,
        probe={"classifier": classifier, "holdout": split_files(dataset, manifest, "holdout")},
    )
    return reports


def run_on(config: Config, dataset: str, classifier: str, folder: Path) -> list[tuple[int, float]]:
    client = MlflowClient(config.resolved_tracking_uri)
    run = client.create_run(ensure_experiment(config), run_name="train-tracked")
    logger = RunLogger(config.resolved_tracking_uri, run.info.run_id)
    ctx = StepContext("train", config, logger, folder, "bench")
    train(ctx, dataset=dataset, classifier=classifier)
    logger.finish()
    history = client.get_metric_history(run.info.run_id, "images_per_s")
    if not client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage"):
        raise SystemExit("the tracked run has no system metrics: the comparison would be unfair")
    return sorted((m.step, m.value) for m in history)


def tracking_cpu(
    config: Config, reports: list[dict[str, Any]], folder: Path
) -> tuple[float, float]:
    """CPU seconds of the train step's handling of ``reports`` (metrics, grids, progress line)
    and of one system-metrics sample (collect + log), on a fresh run of the store."""
    client = MlflowClient(config.resolved_tracking_uri)
    run = client.create_run(ensure_experiment(config), run_name="replay")
    logger = RunLogger(config.resolved_tracking_uri, run.info.run_id)
    handler = report_to_mlflow(StepContext("train", config, logger, folder, "bench"))
    with contextlib.redirect_stdout(io.StringIO()):  # the progress lines were printed already
        started = time.thread_time()
        for metrics in reports:
            handler(dict(metrics), None)
        handling = time.thread_time() - started
    monitor = _SystemMetrics(logger, SYSTEM_METRICS_INTERVAL_S, resume=False)
    samples = 10
    started = time.thread_time()
    for _ in range(samples):
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
    per_sample = (time.thread_time() - started) / samples
    logger.finish()
    return handling, per_sample


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (off, on)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=100, help="steps left out of the rate")
    parser.add_argument("overrides", nargs="*", help="config key=value")
    args = parser.parse_args()

    print(f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, [f"workdir={tmp}", f"train.steps={args.steps}", *args.overrides])
        t = config.train
        print(
            f"{t.workers} workers, batch {t.batch_size}, {t.steps} steps, reports every "
            f"{t.report_every}, probe and grid every {t.eval_every}, load {loadavg()}"
        )
        started = time.perf_counter()
        init_ray()
        # Ray Train's placement-group cleaner finds its cluster through RAY_ADDRESS when the
        # machine runs several Ray instances (as the runner sets it for step tasks); without it
        # a leaked placement group starves the next run's workers.
        import ray

        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
        data = run_pipeline(Dag((PREPARE, VALIDATE, FIT_FEATURES)), config)
        dataset = data.outputs["validate"]["dataset"]
        classifier = data.outputs["fit_features"]["classifier"]
        print(f"ray, prepare, validate, fit_features: {time.perf_counter() - started:.0f} s")

        variants = {"off": run_off, "on": run_on}
        slowdowns, off_rates, cpu, shares = [], [], {"off": [], "on": []}, []
        for round_ in range(args.repeats):
            order = ("off", "on") if round_ % 2 == 0 else ("on", "off")
            rates = {}
            for variant in order:
                folder = Path(tmp) / f"train-{round_}-{variant}"
                folder.mkdir()
                load = loadavg()
                began, cpu_began = time.perf_counter(), cpu_seconds()
                reports = variants[variant](config, dataset, classifier, folder)
                cpu[variant].append(cpu_seconds() - cpu_began)
                rates[variant] = steady_rate(reports, args.warmup)
                print(
                    f"round {round_ + 1} {variant:3s}: {rates[variant]:7.1f} images/s, "
                    f"{time.perf_counter() - began:4.0f} s, step process CPU "
                    f"{cpu[variant][-1]:5.1f} s (load before {load})",
                    flush=True,
                )
            off_rates.append(rates["off"])
            training_s = args.steps * t.batch_size / rates["off"]
            handling, per_sample = tracking_cpu(
                config, last_reports, Path(tmp) / f"replay-{round_}"
            )
            spent = handling + training_s / SYSTEM_METRICS_INTERVAL_S * per_sample
            shares.append(spent / (t.workers * training_s))
            print(
                f"round {round_ + 1} replay: {len(last_reports)} reports handled in "
                f"{handling * 1000:.0f} ms CPU, {per_sample * 1000:.1f} ms CPU per system sample: "
                f"{spent:.2f} s of the workers' {t.workers * training_s:.0f} core-seconds "
                f"({shares[-1]:.2%})",
                flush=True,
            )
            slowdowns.append(rates["off"] / rates["on"] - 1)
            print(f"round {round_ + 1}: tracking on is {slowdowns[-1]:+.1%} slower", flush=True)
    median = statistics.median(slowdowns)
    print(
        f"tracking CPU over the workers' core-seconds, median of {args.repeats} replays: "
        f"{statistics.median(shares):.2%} (the most it can slow training)"
    )
    extra = statistics.median(cpu["on"]) - statistics.median(cpu["off"])
    # The workers' core-seconds of the measured training at the untracked rate: every CPU second
    # the step process spends is at most one taken from them.
    worker_cpu = t.workers * args.steps * t.batch_size / statistics.median(off_rates)
    print(
        f"step process CPU, median: off {statistics.median(cpu['off']):.1f} s, "
        f"on {statistics.median(cpu['on']):.1f} s: tracking adds {extra:.2f} s per "
        f"{args.steps} steps, at most {extra / worker_cpu:+.1%} of the workers' "
        f"{worker_cpu:.0f} core-seconds"
    )
    verdict = "within" if median < 0.03 else "OVER"
    print(
        f"median over {args.repeats} rounds: tracking on is {median:+.1%} slower "
        f"({verdict} the 3% target); rounds: {', '.join(f'{s:+.1%}' for s in slowdowns)}; "
        f"load after {loadavg()}"
    )


if __name__ == "__main__":
    main()
