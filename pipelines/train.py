"""Data-parallel GAN training on Ray Train: the worker loop and the driver side.

The driver runs ``TorchTrainer.fit()`` in a background thread. A Train V2 ``UserCallback`` (run in
the Train controller) forwards every report, with its checkpoint path, through a Ray queue to the
driver's main thread, which hands each window of figures in it to ``on_report`` (MLflow logging,
progress lines). The same route gives a Tune trial real checkpoints.

The workers average their figures every ``train.report_every`` steps (a window) but hand them to
Ray Train at most every ``train.report_seconds``, several windows in one report: each report
stops every worker until Ray Train's controller has taken it, and the controller takes one per
poll, so windows shorter than its poll would stall training (docs/benchmarks.md).
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import io
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gan.data.arrays import to_model_range
from gan.data.shards import concat, read_shard
from gan.host_memory import keep_freed_memory
from gan.monitor import DistanceProbe
from gan.nn.stats_exchange import all_reduce_sum, ddp_comm_hook, exchange
from gan.step_stats import FIGURES, StatsWindow
from pipelines import storage
from pipelines.config import Config, config_from_dict
from pipelines.divergence import DivergenceGuard, TrainingDiverged
from pipelines.faults import CrashInjector, NanInjector
from pipelines.images import grid_image
from pipelines.loop import TrainingState
from pipelines.seeds import PROBE_SEED

# Written beside every checkpoint's state: which run wrote it, at which step (PBT lineage).
CHECKPOINT_OWNER = "owner.json"
# The last report of a run that gave up after train.nan_rollbacks rollbacks carries the reason.
DIVERGED = "diverged"
# A Ray Train report carries the figures of every report_every-step window since the previous
# one (train.report_seconds), under this key; the driver hands them on one by one.
WINDOWS = "windows"
# When a window ended (Unix seconds, rank 0's clock): the time to log its figures at, not the
# time its report reached the driver. Not a figure.
WINDOW_TIME = "window_time"

ReportHandler = Callable[[dict[str, Any], str | None], None]


def _mean_across_workers(values: torch.Tensor) -> torch.Tensor:
    """``values`` averaged over the workers in place; on CPU over the workers' direct
    connections (gan.nn.stats_exchange), as sync batch norm's statistics go, not through gloo."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        all_reduce_sum(values)
        values /= dist.get_world_size()
    return values


def _gather(tensor: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every worker's copy of ``tensor`` (index = rank)."""
    if world == 1:
        return [tensor]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, tensor)
    return gathered


def wrap_ddp(module: torch.nn.Module, *, direct_gradients: bool = True) -> DistributedDataParallel:
    """DDP without a buffer broadcast per forward: sync batch norm keeps buffers equal already,
    and the broadcast would overwrite buffers between D's two forwards (breaks on CUDA). With
    ``direct_gradients`` (the pipeline's way), on CPU the gradients go over the direct
    connections of gan.nn.stats_exchange, not through gloo, unless
    GANPIPE_SYNC_BN_EXCHANGE=process_group; without it, through gloo as torch's DDP sends them
    (the benches' bare loop)."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        ddp = DistributedDataParallel(module, forward_sync_buffers=False)
    else:
        ddp = DistributedDataParallel(module, broadcast_buffers=False)
    on_cpu = all(p.device.type == "cpu" for p in module.parameters())
    # Compiled autograd's Python reducer hands a hook single gradients, not buckets.
    python_reducer = getattr(ddp, "_use_python_reducer", False)
    if direct_gradients and on_cpu and exchange() == "tcp" and not python_reducer:
        ddp.register_comm_hook(None, ddp_comm_hook)
    return ddp


def _probe(
    loop_config: dict[str, Any], config: Config, shape: tuple[int, ...], num_classes: int
) -> DistanceProbe:
    from pipelines.steps.features import load_classifier

    probe = loop_config["probe"]
    holdout = concat([_read_shard(p, shape, config) for p in probe["holdout"]]).images
    seeds = list(range(PROBE_SEED, PROBE_SEED + config.train.eval_samples))
    return DistanceProbe(
        load_classifier(storage.localize(probe["classifier"], config)),
        to_model_range(holdout),
        seeds,
        config.model.latent_dim,
        num_classes,
    )


def _read_shard(uri: str, shape: tuple[int, ...], config: Config) -> Any:
    """One shard, read in place (a local file, or streamed from S3 through pyarrow)."""
    fs, path = storage.filesystem(uri, config)
    return read_shard(path, shape, filesystem=fs)


def _png_base64(samples: torch.Tensor) -> str:
    """A sample grid as base64 PNG text: small, and safe in Ray Train's JSON metrics."""
    buffer = io.BytesIO()
    grid_image(samples).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _broadcast_from_rank0(value: float, world: int, device: torch.device) -> float:
    if world == 1:
        return value
    # On the training device: NCCL moves CUDA tensors only.
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor)


def weights_digest(*state_dicts: dict[str, torch.Tensor]) -> str:
    """sha256 of the given state dicts (names and values): equal digests, equal networks."""
    digest = hashlib.sha256()
    for state_dict in state_dicts:
        for key, tensor in sorted(state_dict.items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _quiet_ray_train_reports() -> None:
    """The driver prints one progress line per report; Ray Train's workers would also log every
    report's whole metrics (a sample grid included) at INFO, through a logger named after its
    source file rather than under ``ray.train``."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context

        train_context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # another Ray version: only noise is at stake
        pass


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: reads its own shards, trains G and D under DDP, reports."""
    import ray.train
    import ray.train.torch

    config = config_from_dict(loop_config["config"])
    t = config.train
    _quiet_ray_train_reports()
    torch.set_num_threads(t.threads_per_worker)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # Before the shards and the networks are allocated, so that they too come from the heap.
    if config.perf.keep_freed_memory and not keep_freed_memory() and rank == 0:
        message = "no glibc mallopt here, or it refused the values; malloc left as it is"
        print(f"[train] perf.keep_freed_memory: {message}", flush=True)
    device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")

    shape = tuple(loop_config["shape"])
    own_shards = loop_config["shards"][rank::world]
    # Each worker reads only its own shards, straight from where they are (S3 included).
    own = concat([_read_shard(p, shape, config) for p in own_shards])
    data, labels = to_model_range(own.images), torch.from_numpy(own.labels)
    local_batch = t.batch_size // world
    state = TrainingState(
        config, channels=shape[0], device=device, rank=rank, num_classes=loop_config["num_classes"]
    )

    guard = DivergenceGuard(
        state,
        max_rollbacks=t.nan_rollbacks,
        lr_factor=t.rollback_lr_factor,
        rank=rank,
        world=world,
    )
    start, restored = 0, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # this run's own checkpoint: a restart after a failure
        with checkpoint.as_directory() as directory:
            start = state.restore(directory, rank, world)
            guard.load_from_checkpoint(directory)
        if rank == 0:
            print(f"[train] resuming from the checkpoint of step {start}", flush=True)
    elif loop_config.get("restore_from"):  # another run's checkpoint: a PBT exploit
        start = state.restore(loop_config["restore_from"], rank, world)
        state.adopt_configured_hyperparameters()
        restored = {
            "resumed_from_step": start,
            "restored_weights_sha256": weights_digest(
                state.generator.state_dict(), state.discriminator.state_dict()
            ),
        }

    # Rank 0 measures; the others receive the distance (their plateau schedules need it too).
    probe = None
    if rank == 0 and loop_config.get("probe"):
        probe = _probe(loop_config, config, shape, state.num_classes)
    generator, discriminator = state.generator, state.discriminator
    if world > 1:
        generator, discriminator = wrap_ddp(generator), wrap_ddp(discriminator)

    # Windows of report_every steps wait here for the next hand-over to Ray Train (hand_over).
    pending: list[dict[str, Any]] = []

    def hand_over(**checkpoint: Any) -> None:
        """One ``ray.train.report`` with every pending window. Every worker must call it at the
        same window: a report waits for all of them."""
        ray.train.report({"step": pending[-1]["step"], WINDOWS: list(pending)}, **checkpoint)
        pending.clear()

    def report(done: int, metrics: dict[str, Any], hand_over_now: bool) -> None:
        """Queues the window's figures, with the evaluation distance when due; hands them over
        when ``hand_over_now``, and always with a checkpoint when one is due."""
        metrics.update(restored)
        restored.clear()
        if guard.rollbacks:
            metrics["rollbacks"] = guard.rollbacks
        if probe_due(done):
            distance = 0.0
            if probe is not None:
                samples = probe.samples(state.evaluated)
                distance = probe.distance(samples)
                metrics["sample_grid_png"] = _png_base64(samples[: config.eval.grid_size])
            metrics["eval_distance"] = _broadcast_from_rank0(distance, world, device)
            state.report_plateau(metrics["eval_distance"])
        pending.append(metrics)
        if done % t.checkpoint_every and done != t.steps:
            if hand_over_now:
                hand_over()
            return
        worker_rngs = _gather(state.rng.get_state(), world)
        # Every worker keeps this healthy state locally: a divergence rolls back to it.
        guard.snapshot(done, worker_rngs)
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                guard.copy_snapshot(tmp)
                owner = {"owner": loop_config.get("owner", ""), "step": done}
                (Path(tmp) / CHECKPOINT_OWNER).write_text(json.dumps(owner))
            hand_over(
                checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None,
                checkpoint_dir_name=f"checkpoint_{done:08d}",
            )

    def probe_due(done: int) -> bool:
        on = bool(loop_config.get("probe")) and t.eval_every > 0
        return on and (done % t.eval_every == 0 or done == t.steps)

    if restored and start >= t.steps:  # another run's final state: report it as this run's
        report(start, {"step": start, **state.rates()}, hand_over_now=True)
        guard.close()
        return

    guard.snapshot(start, _gather(state.rng.get_state(), world))
    # Test-only faults (pipelines/faults.py), off unless their variables are set.
    inject_nan, inject_crash = NanInjector(), CrashInjector()
    loss = config.loss
    # The steps' figures stay on the device and are derived once per window: a .cpu() per step
    # would make the host wait for every GPU step to finish before queueing the next one.
    window = StatsWindow()
    window_start = time.perf_counter()
    handed_over_at = -float("inf")  # rank 0's clock: the first window goes at once
    next_step = start
    while next_step < t.steps:
        step, next_step = next_step, next_step + 1
        index = torch.randint(0, data.shape[0], (local_batch,), generator=state.rng)
        real, real_labels = state.batch(data, labels, index)
        stats = state.step(real, step, generator, discriminator, real_labels)
        state.adapt_augmentation(stats, step, average=_mean_across_workers)
        inject_nan.after_step(step, state)
        inject_crash.after_step(step)
        window.add(stats)
        done = step + 1
        if done % t.report_every and done != t.steps:
            continue
        # Rank 0's clock decides for all workers when to hand over (a report waits for every
        # worker), its vote riding in the all-reduce of the window's figures: world or 0.
        due = rank == 0 and time.perf_counter() - handed_over_at >= t.report_seconds
        vote = torch.tensor([float(world) if due else 0.0], device=device)
        reduced = _mean_across_workers(torch.cat([window.means(), vote])).cpu()
        means, hand_over_now = reduced[:-1], bool(reduced[-1] > 0.5)
        if not guard.healthy(means, _mean_across_workers):
            if pending:  # the windows before this one were healthy: the driver logs them
                hand_over()
            window.clear()
            window_start = time.perf_counter()
            try:
                next_step = guard.roll_back(done)
            except TrainingDiverged as exc:
                # Returned, not raised: Ray Train would retry a raised error from the last
                # checkpoint, which diverges again. The driver raises it (run_training).
                ray.train.report({"step": done, DIVERGED: str(exc)})
                guard.close()
                return
            if rank == 0:
                print(
                    f"[train] non-finite loss or weights at step {done}: rolled back to step "
                    f"{next_step}, learning rates x{t.rollback_lr_factor:g} (rollback "
                    f"{guard.rollbacks} of {t.nan_rollbacks})",
                    flush=True,
                )
            continue
        elapsed = time.perf_counter() - window_start
        augment, ada = state.augment, state.ada
        mean = dict(zip(FIGURES, means.tolist(), strict=True))
        metrics = {
            "step": done,
            **{name: mean[name] for name in ("loss_d", "loss_g", "d_real", "d_fake")},
            **({"r1": mean["r1"]} if loss.r1_gamma > 0 else {}),
            **({"gradient_penalty": mean["gp"]} if loss.gp_weight > 0 else {}),
            **({"lecam": mean["lecam"]} if loss.lecam_weight > 0 else {}),
            **({"consistency": mean["consistency"]} if loss.consistency_weight > 0 else {}),
            "grad_norm_g": mean["grad_norm_g"],
            "grad_norm_d": mean["grad_norm_d"],
            **({"augment_p": augment.p} if augment is not None else {}),
            **({"ada_signal": ada.signal} if ada is not None and ada.signal is not None else {}),
            **state.rates(),
            "images_per_s": t.batch_size * len(window) / max(elapsed, 1e-9),
            WINDOW_TIME: time.time(),
        }
        report(done, metrics, hand_over_now)
        if not pending:
            handed_over_at = time.perf_counter()
        window.clear()
        window_start = time.perf_counter()
    guard.close()


class CheckpointWriteError(RuntimeError):
    """The checkpoint store refused a write (full, read-only, no permission). Not an OSError:
    the train step's retry would meet the same store."""


# How an OSError of the checkpoint store reads once Ray has wrapped it (errno names as text).
_STORAGE_REFUSALS = (
    "No space left on device",
    "Read-only file system",
    "Disk quota exceeded",
    "Permission denied",
)


def _storage_refusal(error: BaseException) -> str | None:
    """The store's refusal behind a failed training run, if that is what stopped it: Ray Train
    hands a worker's OSError back wrapped, its text inside."""
    text = str(error)
    return next((reason for reason in _STORAGE_REFUSALS if reason in text), None)


@dataclass
class TrainingResult:
    checkpoint_path: str
    history: list[dict[str, Any]]  # one entry per report_every-step window, in step order
    # One per Ray Train report (several windows each, train.report_seconds): when the driver
    # took it (time.perf_counter()) and its last window's step.
    report_arrivals: list[tuple[float, int]]


def torch_trainer_class() -> type:
    """Ray Train's ``TorchTrainer``, less its Ray Data set-up when a run passes no datasets.

    Ray Train 2.60 starts a ``DatasetManager`` actor, a process of its own, for every worker
    group, with datasets or without; the workers here read their Parquet shards themselves. On
    2 cores that process takes CPU from the workers' own start: leaving it out made ``fit()``
    reach the training function 2.7 s sooner (15.0 s to 12.3 s, medians of 5 fits taking turns,
    bench/ray_train_startup.py). The hook, ``_create_default_callbacks``, is not public API: on a
    Ray without it or without ``DatasetsCallback`` this returns ``TorchTrainer`` as it is.
    """
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback
    except ImportError:
        return TorchTrainer
    if not hasattr(TorchTrainer, "_create_default_callbacks"):
        return TorchTrainer

    class TorchTrainerWithoutRayData(TorchTrainer):
        def _create_default_callbacks(self) -> list:
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return TorchTrainerWithoutRayData


def run_training(
    config: Config,
    *,
    shards: list[str],
    shape: tuple[int, int, int],
    storage_path: str,
    name: str,
    on_report: ReportHandler | None = None,
    probe: dict[str, Any] | None = None,
    restore_from: str | None = None,
    owner: str = "",
    num_classes: int = 0,
    already_reported: int = 0,
) -> TrainingResult:
    """Train with ``config.train.workers`` Ray Train workers; return the final checkpoint.

    ``on_report(metrics, checkpoint)`` is called once per window of ``train.report_every``
    steps, in step order, in bursts of the windows that one Ray Train report carried
    (``train.report_seconds``); ``checkpoint`` is set on the window whose step it holds.

    ``probe`` (``{"classifier": folder of fit_features, "holdout": [shard paths]}``) turns on the
    evaluation distance every ``train.eval_every`` steps: reported as ``eval_distance`` with a
    base64 PNG sample grid ``sample_grid_png``, and fed to reduce-on-plateau schedules.

    ``restore_from`` (a checkpoint folder of another run) starts from that state with this
    config's learning rates and Adam betas in effect; the first report then carries
    ``resumed_from_step`` and ``restored_weights_sha256``. ``owner`` is written beside every
    checkpoint (``owner.json``) so that a run restored from it knows whose state it took.
    ``num_classes`` (the dataset's) makes G and D class-conditional when ``model.conditional``.

    ``storage_path`` is a folder or an ``s3://`` prefix (Ray Train then writes checkpoints
    there through pyarrow's S3 file system; the returned checkpoint path is an ``s3://`` URI).
    A run with the same ``storage_path`` and ``name`` as an interrupted one continues from its
    latest checkpoint: Ray Train restores its checkpoint list from storage and the workers load
    ``ray.train.get_checkpoint()``.

    Faults: a worker that dies restarts the worker group from the latest checkpoint, up to
    ``train.max_failures`` times. A non-finite loss or weight rolls back to the last checkpoint
    with lower learning rates (``pipelines/divergence.py``); past ``train.nan_rollbacks`` this
    raises TrainingDiverged. Either way the workers report again the steps between that
    checkpoint and where they were: ``on_report`` sees every step once, the first time it was
    reported (MLflow cannot replace a logged value, and a worker restart reproduces the same
    values anyway); so do steps up to ``already_reported`` (an earlier attempt logged them).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig
    from ray.train.v2.api.callback import UserCallback
    from ray.util.queue import Queue

    # No CPU: inside a Tune trial it lands in the trial's placement group, which holds almost none.
    report_queue: Queue = Queue(actor_options={"num_cpus": 0})

    class ForwardReports(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):  # noqa: ANN001
            path = storage.to_uri(checkpoint.filesystem, checkpoint.path) if checkpoint else None
            report_queue.put((metrics[0], path))

    t = config.train
    # On S3, Ray Train gets the file system itself (endpoint from the config, credentials from
    # each node's AWS chain) and the path without its scheme.
    storage_fs, storage_fs_path = None, str(Path(storage_path).resolve())
    if storage.is_remote(storage_path):
        storage_fs, storage_fs_path = storage.filesystem(storage_path, config)
    trainer = torch_trainer_class()(
        train_loop_per_worker,
        train_loop_config={
            "config": config.to_dict(),
            "shards": shards,
            "shape": list(shape),
            "probe": probe if config.train.eval_every else None,
            "restore_from": restore_from,
            "owner": owner,
            "num_classes": num_classes,
        },
        scaling_config=ScalingConfig(
            num_workers=t.workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.threads_per_worker, **({"GPU": 1} if t.use_gpu else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=storage_fs_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=[ForwardReports()],
            # Our own progress line per report replaces Ray Train's per-report INFO dump.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    history: list[dict[str, Any]] = []
    last_step, diverged, last_checkpoint = already_reported, None, None
    report_arrivals: list[tuple[float, int]] = []
    while thread.is_alive() or not report_queue.empty():
        try:
            report, checkpoint_path = report_queue.get(timeout=0.5)
        except Exception:  # queue.Empty from the Ray queue actor
            continue
        report_arrivals.append((time.perf_counter(), report["step"]))
        diverged = report.get(DIVERGED, diverged)
        windows = report.get(WINDOWS, [])
        for index, metrics in enumerate(windows):
            if metrics["step"] <= last_step:  # re-reported after a restart or a rollback
                continue
            # The checkpoint was taken at the last window's step.
            checkpoint = checkpoint_path if index == len(windows) - 1 else None
            last_step = metrics["step"]
            last_checkpoint = checkpoint or last_checkpoint
            history.append(metrics)
            if on_report is not None:
                on_report(metrics, checkpoint)
    thread.join()
    report_queue.shutdown()
    if diverged is not None:
        raise TrainingDiverged(diverged)
    error = outcome.get("error") or outcome["result"].error
    if error is not None:
        reason = _storage_refusal(error)
        if reason:
            raise CheckpointWriteError(
                f"cannot write checkpoints to {storage_path} ({reason}); free space there or "
                "make it writable, then run the same command again: training continues from "
                f"the last complete checkpoint ({last_checkpoint or 'none yet: from step 0'})"
            ) from error
        raise error
    result = outcome["result"]
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    final = storage.to_uri(result.checkpoint.filesystem, result.checkpoint.path)
    return TrainingResult(checkpoint_path=final, history=history, report_arrivals=report_arrivals)
