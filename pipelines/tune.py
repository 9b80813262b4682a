"""Population-based training (PBT) of the learning rates on Ray Tune.

Each trial is a function that runs the same Ray Train training as ``ganpipe run``
(:func:`pipelines.train.run_training`, N data-parallel workers with synchronized batch norm). Ray
Train V2 inside Tune hands Tune no checkpoint by itself, so the trial forwards them: every report
that carries the evaluation distance is passed to ``tune.report`` with Ray Train's checkpoint
folder, and Tune persists it. When PBT exploits, Tune restarts the losing trial with the winner's
checkpoint and a perturbed config; the trial hands that folder to a fresh Ray Train run as
``restore_from``, whose workers load the whole state (G, D, G_ema, optimizers, schedules, step,
noise streams) and then write the trial's own, mutated learning rates into the optimizers.

Only the driver (the tune step's process) writes to MLflow: a Tune callback there receives every
trial's results.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from pipelines import storage
from pipelines.config import Config, config_from_dict, mutated
from pipelines.train import CHECKPOINT_OWNER, WINDOW_TIME, run_training

# Where each mutable hyper-parameter lives in the config.
CONFIG_KEYS = {"lr_g": ("optim", "lr_g"), "lr_d": ("optim", "lr_d"),
               "beta1": ("optim", "beta1"), "d_steps": ("loss", "d_steps")}  # fmt: skip
# What the first report after a restore says about it (see run_training).
RESTORE_KEYS = ("resumed_from_step", "restored_weights_sha256")
TRIAL_CPUS = 0.1  # the trial function only waits on its Ray Train workers, which hold the CPUs

ResultHandler = Callable[[str, dict[str, Any], dict[str, Any]], None]


def initial_values(config: Config) -> list[dict[str, Any]]:
    """The population's starting hyper-parameters: seeded draws from each mutated range
    (log-uniform for learning rates), so a population is reproducible and comparable."""
    p = config.tune
    rng = np.random.default_rng(p.seed)
    names = mutated(config)
    values = []
    for _ in range(p.population):
        trial: dict[str, Any] = {}
        for name in names:
            if name in ("lr_g", "lr_d"):
                trial[name] = float(math.exp(rng.uniform(math.log(p.lr_min), math.log(p.lr_max))))
            elif name == "beta1":
                trial[name] = float(rng.uniform(p.beta1_min, p.beta1_max))
            else:
                trial[name] = int(rng.integers(1, p.d_steps_max + 1))
        values.append(trial)
    return values


def trial_config(base: dict[str, Any], values: dict[str, Any]) -> Config:
    """The base config with a trial's values; every report with a distance is a checkpoint,
    since PBT may clone any trial at any evaluation."""
    config = config_from_dict(base)
    for name, value in values.items():
        section, key = CONFIG_KEYS[name]
        setattr(getattr(config, section), key, type(getattr(getattr(config, section), key))(value))
    config.train.checkpoint_every = config.train.eval_every
    return config


def _mutations(config: Config) -> dict[str, Any]:
    from ray import tune

    p = config.tune
    space = {
        "lr_g": tune.loguniform(p.lr_min, p.lr_max),
        "lr_d": tune.loguniform(p.lr_min, p.lr_max),
        "beta1": tune.uniform(p.beta1_min, p.beta1_max),
        "d_steps": list(range(1, p.d_steps_max + 1)),
    }
    return {name: space[name] for name in mutated(config)}


def _trial(params: dict[str, Any]) -> None:
    """One PBT trial (runs in a Tune actor): trains, forwarding evaluations and checkpoints."""
    from ray import tune

    values = {name: params[name] for name in CONFIG_KEYS if name in params}
    config = trial_config(params["base"], values)
    context = tune.get_context()
    trial_id, trial_dir = context.get_trial_id(), Path(context.get_trial_dir())
    # Ray Train's runs of this trial: beside Tune's on S3 (its workers may sit on other nodes
    # than this function), else in the trial's folder.
    train_uri = str(trial_dir)
    if params.get("train_storage"):
        train_uri = storage.join(params["train_storage"], trial_id)
    fs, train_path = storage.filesystem(train_uri, config)
    runs = fs.get_file_info(pafs.FileSelector(train_path, allow_not_found=True))
    # A fresh Ray Train run per (re)start: Ray Train would otherwise restore this trial's own
    # latest checkpoint instead of the one Tune hands over.
    attempt = sum(Path(info.path).name.startswith("train-") for info in runs)
    extra: dict[str, Any] = {}

    def on_report(metrics: dict[str, Any], checkpoint: str | None) -> None:
        extra.update({k: metrics.pop(k) for k in RESTORE_KEYS if k in metrics})
        if "eval_distance" not in metrics:
            return  # PBT ranks at evaluations only; the rest is for progress
        metrics.pop("sample_grid_png", None)
        metrics.pop(WINDOW_TIME, None)  # Tune stamps its results itself
        metrics.update(extra)
        extra.clear()
        saved = None
        if checkpoint:  # Tune copies it into the trial's storage (S3 to S3 on a cluster)
            where, path = storage.filesystem(checkpoint, config)
            saved = tune.Checkpoint(path, filesystem=where)
        tune.report({**metrics, "trial_id": trial_id}, checkpoint=saved)

    checkpoint = tune.get_checkpoint()  # an exploit's donor state, or this trial's own
    with checkpoint.as_directory() if checkpoint else nullcontext() as directory:
        if directory is not None:
            owner = json.loads((Path(directory) / CHECKPOINT_OWNER).read_text())
            if owner["owner"] != trial_id:
                extra.update(exploited_from=owner["owner"], exploit_step=owner["step"])
        run_training(
            config,
            shards=params["shards"],
            shape=tuple(params["shape"]),
            storage_path=train_uri,
            name=f"train-{attempt}",
            on_report=on_report,
            probe=params["probe"],
            restore_from=directory,
            owner=trial_id,
            num_classes=params["num_classes"],
        )


@dataclass
class Exploit:
    """``trial`` took ``donor``'s checkpoint of ``step`` (whose G and D weights hash to
    ``weights_sha256``) and continued with ``new`` values where the donor had ``old`` ones."""

    trial: str
    donor: str
    step: int
    old: dict[str, Any]
    new: dict[str, Any]
    weights_sha256: str


@dataclass
class PopulationResult:
    best_trial: str
    best_distance: float
    best_checkpoint: str
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    exploits: list[Exploit] = field(default_factory=list)
    initial: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Trials that crashed and went on from their own checkpoint (tune.max_failures).
    restarts: list[dict[str, Any]] = field(default_factory=list)


class _Lineage:
    """Collects, in the driver, every trial's results and every exploit (from which trial, at
    which step, the donor's values and the clone's new ones)."""

    def __init__(self, names: list[str], on_result: ResultHandler | None) -> None:
        self.names = names
        self.on_result = on_result
        self.histories: dict[str, list[dict[str, Any]]] = {}
        self.exploits: list[Exploit] = []
        self.current: dict[str, dict[str, Any]] = {}  # trial -> values in effect
        self.initial: dict[str, dict[str, Any]] = {}
        self.restarts: list[dict[str, Any]] = []

    def recovered(self, trial_id: str, last_result: dict[str, Any]) -> None:
        """Tune restarts a crashed trial from its latest checkpoint, that of its last report."""
        self.restarts.append({"trial": trial_id, "step": int(last_result.get("step", 0))})

    def add(self, trial_id: str, config: dict[str, Any], result: dict[str, Any]) -> None:
        values = {name: config[name] for name in self.names}
        self.initial.setdefault(trial_id, values)
        if "exploited_from" in result:
            donor = result["exploited_from"]
            self.exploits.append(
                Exploit(
                    trial=trial_id,
                    donor=donor,
                    step=int(result["exploit_step"]),
                    old=dict(self.current.get(donor, {})),
                    new=values,
                    weights_sha256=result["restored_weights_sha256"],
                )
            )
        self.current[trial_id] = values
        # The values PBT set, then the result (whose lr_* are the rates in effect).
        self.histories.setdefault(trial_id, []).append({**values, **result})
        if self.on_result is not None:
            self.on_result(trial_id, values, result)


def run_population(
    config: Config,
    *,
    shards: list[str],
    shape: tuple[int, int, int],
    probe: dict[str, Any],
    storage_path: str,
    on_result: ResultHandler | None = None,
    num_classes: int = 0,
) -> PopulationResult:
    """PBT over ``config.tune.mutate`` with ``config.tune.population`` trials; each trial trains
    with ``config.train.workers`` Ray Train workers. ``on_result(trial_id, values, result)`` is
    called in this process for every evaluation of every trial."""
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

    p = config.tune
    names = mutated(config)
    starts = initial_values(config)
    lineage = _Lineage(names, on_result)

    class Forward(tune.Callback):
        def __init__(self, lineage: _Lineage) -> None:
            self.lineage = lineage

        def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: ANN001
            self.lineage.add(trial.trial_id, trial.config, result)

        def on_trial_recover(self, iteration, trials, trial, **info):  # noqa: ANN001
            # A crash (tune.max_failures), not the pause and resume of synchronous PBT, which
            # also restores a trial from its own checkpoint.
            self.lineage.recovered(trial.trial_id, trial.last_result or {})

        def __getstate__(self) -> dict[str, Any]:
            # Tune pickles its run config for Tuner.restore; the live lineage (and the MLflow
            # logging behind it) stays in this process.
            return {}

    class NoExploitAtTheEnd(PopulationBasedTraining):
        """A clone made at the last step would restart only to report its donor's result."""

        def on_trial_result(self, tune_controller, trial, result):  # noqa: ANN001
            if result.get("step", 0) >= config.train.steps:
                return TrialScheduler.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

    scheduler = NoExploitAtTheEnd(
        synch=p.synchronous,
        time_attr="step",
        perturbation_interval=p.perturbation_interval,
        quantile_fraction=p.quantile_fraction,
        resample_probability=p.resample_probability,
        perturbation_factors=(p.perturb_up, p.perturb_down),
        hyperparam_mutations=_mutations(config),
        log_config=False,  # the lineage is recorded by the callback above, in steps
    )
    param_space: dict[str, Any] = {
        "base": config.to_dict(),
        "shards": shards,
        "shape": list(shape),
        "probe": probe,
        "num_classes": num_classes,
        "train_storage": (
            storage.join(storage_path, "pbt-train") if storage.is_remote(storage_path) else None
        ),
        "index": tune.grid_search(list(range(p.population))),
    }
    for name in names:
        param_space[name] = tune.sample_from(
            lambda spec, name=name: starts[spec.config["index"]][name]
        )
    # On S3 the trials' checkpoints (and PBT's clones of them) are where every node reads.
    tune_fs, tune_path = None, str(Path(storage_path).resolve())
    if storage.is_remote(storage_path):
        tune_fs, tune_path = storage.filesystem(storage_path, config)
    tuner = tune.Tuner(
        tune.with_resources(_trial, {"cpu": TRIAL_CPUS}),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            scheduler=scheduler, metric="eval_distance", mode="min", num_samples=1
        ),
        run_config=tune.RunConfig(
            name="pbt",
            storage_path=tune_path,
            storage_filesystem=tune_fs,
            callbacks=[Forward(lineage)],
            failure_config=tune.FailureConfig(max_failures=p.max_failures),
            verbose=0,  # the step prints one line per evaluation instead
        ),
    )
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    if len(errors) == len(grid):
        raise RuntimeError(f"every trial of the population failed; first: {errors[0]!r}")
    best = grid.get_best_result(metric="eval_distance", mode="min", scope="last")
    if best.checkpoint is None:
        raise RuntimeError("the best trial left no checkpoint")
    return PopulationResult(
        best_trial=best.metrics["trial_id"],
        best_distance=float(best.metrics["eval_distance"]),
        best_checkpoint=storage.to_uri(best.checkpoint.filesystem, best.checkpoint.path),
        histories=lineage.histories,
        exploits=lineage.exploits,
        initial=lineage.initial,
        restarts=lineage.restarts,
    )
