"""tune: population-based training in place of train; hands the best generator on.

Its outputs are train's (``checkpoint``, ``shape``), so evaluate and register work unchanged. Every
trial gets an MLflow run nested under this step's run, with its evaluation distance and learning
rates as metrics per step (rates change, params cannot); the lineage (every trial's rates over
time, every exploit) is logged as a table and a plot.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipelines import storage
from pipelines.config import mutated, validate_population
from pipelines.dag import StepContext
from pipelines.steps.prepare import MANIFEST
from pipelines.steps.training import split_files
from pipelines.tracking import PARENT_TAG, RunLogger, prepared_datasets
from pipelines.tune import PopulationResult, run_population

TRIAL_METRICS = ("eval_distance", "lr_g", "lr_d", "loss_d", "loss_g", "d_real", "d_fake",
                 "images_per_s")  # fmt: skip


def tune(ctx: StepContext, dataset: str, classifier: str) -> dict[str, Any]:
    config = ctx.config
    validate_population(config)
    manifest = storage.read_json(storage.join(dataset, MANIFEST), config)
    names = mutated(config)
    trial_runs: dict[str, RunLogger] = {}
    short: dict[str, str] = {}

    def trial_run(trial_id: str, values: dict[str, Any]) -> RunLogger:
        if trial_id not in trial_runs:
            short[trial_id] = f"trial_{len(short)}"
            run = ctx.logger.client.create_run(
                ctx.logger.experiment_id,
                run_name=short[trial_id],
                tags={PARENT_TAG: ctx.logger.run_id, "ganpipe.trial": trial_id},
            )
            logger = RunLogger(ctx.logger.tracking_uri, run.info.run_id, ctx.logger.experiment_id)
            logger.log_params({f"initial.{k}": v for k, v in values.items()})
            trial_runs[trial_id] = logger
        return trial_runs[trial_id]

    def on_result(trial_id: str, values: dict[str, Any], result: dict[str, Any]) -> None:
        step = int(result["step"])
        logger = trial_run(trial_id, values)
        figures = {k: result[k] for k in TRIAL_METRICS if k in result}
        figures.update({k: float(v) for k, v in values.items() if k not in figures})
        logger.log_metrics(figures, step=step)
        note = ""
        if "exploited_from" in result:
            donor = short.get(result["exploited_from"], result["exploited_from"])
            note = f"  <- cloned {donor} at step {result['exploit_step']}"
            origin = f"{result['exploited_from']}@{result['exploit_step']}"
            logger.set_tags({f"ganpipe.exploit.{step}": origin})
        # The rates the workers had in effect (the config may already hold PBT's next values).
        rates = " ".join(f"{k} {result.get(k, v):.3g}" for k, v in values.items())
        ctx.log(
            f"{short[trial_id]} step {step}/{config.train.steps} "
            f"distance {result['eval_distance']:.2f} {rates}{note}"
        )

    p = config.tune
    ctx.log(
        f"population {p.population} x {config.train.workers} workers, mutating {', '.join(names)} "
        f"every {p.perturbation_interval} steps"
    )
    # As the train step: the data the population learns from and is measured against, and
    # the machine's CPU, memory (and GPU) while it trains.
    ctx.logger.log_datasets(prepared_datasets(dataset, manifest))
    with ctx.logger.system_metrics(resume=ctx.attempt > 1):
        outcome = run_population(
            config,
            shards=split_files(dataset, manifest, "train"),
            shape=tuple(manifest["shape"]),
            probe={"classifier": classifier, "holdout": split_files(dataset, manifest, "holdout")},
            storage_path=storage.join(ctx.output_uri, "ray"),
            on_result=on_result,
            num_classes=manifest["num_classes"],
        )
    for logger in trial_runs.values():
        logger.finish()
    table = lineage_table(outcome, short)
    ctx.logger.log_dict(table, "lineage.json")
    plot = ctx.output_dir / "lineage.png"
    plot_lineage(outcome, short, names, plot)
    ctx.logger.log_artifact(plot)
    best = storage.localize(outcome.best_checkpoint, config)
    ctx.logger.log_artifact(best / "state.pt", "checkpoint")
    ctx.logger.log_metrics(
        {"best_eval_distance": outcome.best_distance, "exploits": len(outcome.exploits)}
    )
    ctx.logger.set_tags({"ganpipe.best_trial": outcome.best_trial})
    ctx.log(
        f"best: {short.get(outcome.best_trial, outcome.best_trial)} with distance "
        f"{outcome.best_distance:.2f}; {len(outcome.exploits)} exploits"
    )
    return {
        "checkpoint": outcome.best_checkpoint,
        "shape": manifest["shape"],
        "num_classes": manifest["num_classes"],
    }


def lineage_table(outcome: PopulationResult, short: dict[str, str]) -> dict[str, Any]:
    return {
        "best_trial": short.get(outcome.best_trial, outcome.best_trial),
        "initial": {short.get(t, t): v for t, v in outcome.initial.items()},
        "exploits": [
            {**asdict(e), "trial": short[e.trial], "donor": short.get(e.donor, e.donor)}
            for e in outcome.exploits
        ],
        "trial_ids": {name: trial for trial, name in short.items()},
        "restarts": [{**r, "trial": short.get(r["trial"], r["trial"])} for r in outcome.restarts],
    }


def plot_lineage(
    outcome: PopulationResult, short: dict[str, str], names: list[str], path: Path
) -> Path:
    """One panel per mutated value (and the distance): value vs step per trial, exploits marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [*names, "eval_distance"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True)
    for ax, key in zip(axes, panels, strict=True):
        for trial, history in sorted(outcome.histories.items(), key=lambda kv: short[kv[0]]):
            steps = [r["step"] for r in history]
            values = [r.get(key) for r in history]
            ax.plot(steps, values, marker=".", label=short[trial])
            for e in outcome.exploits:
                if e.trial == trial:
                    after = next((r for r in history if r["step"] > e.step), None)
                    if after is not None and key in after:
                        ax.plot(after["step"], after[key], "k*", markersize=10)
        ax.set_ylabel(key)
        if key.startswith("lr"):
            ax.set_yscale("log")
    axes[0].legend(fontsize=8, ncol=4)
    axes[0].set_title("PBT lineage (★: first evaluation after cloning a better trial)")
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
