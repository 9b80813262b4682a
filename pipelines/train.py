"""Data-parallel GAN training on Ray Train: the worker loop and the driver side.

The driver runs ``TorchTrainer.fit()`` in a background thread. A Train V2 ``UserCallback`` (run in
the Train controller) forwards every report, with its checkpoint path, through a Ray queue to the
driver's main thread, which hands it to ``on_report`` (MLflow logging, progress lines). The same
route lets a Tune trial see real checkpoints later.
"""

from __future__ import annotations

import inspect
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
from gan.ema import GeneratorEMA
from gan.nn.models import Discriminator, Generator
from gan.optim import make_optimizer
from gan.schedules import make_scheduler
from gan.state import load_state, load_worker_rng, save_state
from gan.step import train_step
from pipelines.config import Config, config_from_dict, schedule_policy

ReportHandler = Callable[[dict[str, Any], str | None], None]


def build_models(config: Config, channels: int) -> tuple[Generator, Discriminator]:
    m = config.model
    generator = Generator(
        latent_dim=m.latent_dim,
        resolution=config.data.resolution,
        channels=channels,
        width=m.g_width,
        norm=m.g_norm,
        g_output_norm=m.g_output_norm,
    )
    discriminator = Discriminator(
        resolution=config.data.resolution,
        channels=channels,
        width=m.d_width,
        norm=m.d_norm,
        d_input_norm=m.d_input_norm,
    )
    return generator, discriminator


def _mean_across_workers(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def _gather(tensor: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every worker's copy of ``tensor`` (index = rank)."""
    if world == 1:
        return [tensor]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, tensor)
    return gathered


def _ddp(module: torch.nn.Module) -> DistributedDataParallel:
    """DDP without a buffer broadcast per forward: sync batch norm keeps buffers equal already,
    and the broadcast would overwrite buffers between D's two forwards (breaks on CUDA)."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return DistributedDataParallel(module, forward_sync_buffers=False)
    return DistributedDataParallel(module, broadcast_buffers=False)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: reads its own shards, trains G and D under DDP, reports."""
    import ray.train
    import ray.train.torch

    config = config_from_dict(loop_config["config"])
    t = config.train
    # The driver prints one progress line per report; Ray Train's own per-report INFO is noise.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    torch.set_num_threads(t.threads_per_worker)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")

    shape = tuple(loop_config["shape"])
    own_shards = loop_config["shards"][rank::world]
    data = to_model_range(concat([read_shard(p, shape) for p in own_shards]).images)
    local_batch = t.batch_size // world

    torch.manual_seed(t.seed)  # identical initial weights on every worker
    generator, discriminator = build_models(config, channels=shape[0])
    generator.to(device)
    discriminator.to(device)
    o = config.optim
    hyper = dict(betas=(o.beta1, o.beta2), momentum=o.momentum, weight_decay=o.weight_decay)
    opt_g = make_optimizer(o.g_optimizer, generator.parameters(), lr=o.lr_g, **hyper)
    opt_d = make_optimizer(o.d_optimizer, discriminator.parameters(), lr=o.lr_d, **hyper)
    policy = schedule_policy(config)
    sched_g, sched_d = make_scheduler(opt_g, policy), make_scheduler(opt_d, policy)
    rng = torch.Generator().manual_seed(t.seed * 1000 + rank)  # each worker its own noise
    ema = (
        GeneratorEMA(generator, decay=config.ema.decay, start_step=config.ema.start_step)
        if config.ema.enabled
        else None
    )
    state = dict(
        ema=ema,
        generator=generator,
        discriminator=discriminator,
        opt_g=opt_g,
        opt_d=opt_d,
        sched_g=sched_g,
        sched_d=sched_d,
        rng=rng,
    )

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start = load_state(directory, **state)
            own_rng = load_worker_rng(directory, rank, world)
        if own_rng is not None:
            rng.set_state(own_rng)
        else:  # written by another number of workers: a fresh stream per rank and step
            rng.manual_seed(t.seed * 1000 + rank + 7919 * start)
        if rank == 0:
            print(f"[train] resuming from the checkpoint of step {start}", flush=True)

    g_inner, d_inner = generator, discriminator
    if world > 1:
        generator, discriminator = _ddp(generator), _ddp(discriminator)
        state.update(generator=generator, discriminator=discriminator)

    loss = config.loss
    sums = torch.zeros(6)
    window_start, window_steps = time.perf_counter(), 0
    for step in range(start, t.steps):
        index = torch.randint(0, data.shape[0], (local_batch,), generator=rng)
        stats = train_step(
            generator=generator,
            discriminator=discriminator,
            opt_g=opt_g,
            opt_d=opt_d,
            real=data[index].to(device),
            latent_dim=config.model.latent_dim,
            rng=rng,
            generator_inner=g_inner,
            discriminator_inner=d_inner,
            loss=loss.kind,
            gp_weight=loss.gp_weight,
            r1_gamma=loss.r1_gamma,
            r1_interval=loss.r1_interval,
            d_steps=loss.d_steps,
            step=step,
            freeze_g_stats_in_d_phase=t.freeze_g_stats_in_d_phase,
            ema=ema,
        )
        sched_g.step()
        sched_d.step()
        figures = [stats.loss_d, stats.loss_g, stats.d_real, stats.d_fake, stats.r1, stats.gp]
        sums += torch.stack([torch.as_tensor(f, dtype=torch.float32) for f in figures]).cpu()
        window_steps += 1
        done = step + 1
        if done % t.report_every and done != t.steps:
            continue
        means = _mean_across_workers(sums / window_steps)
        elapsed = time.perf_counter() - window_start
        metrics = {
            "step": done,
            "loss_d": float(means[0]),
            "loss_g": float(means[1]),
            "d_real": float(means[2]),
            "d_fake": float(means[3]),
            **({"r1": float(means[4])} if loss.r1_gamma > 0 else {}),
            **({"gradient_penalty": float(means[5])} if loss.gp_weight > 0 else {}),
            "lr_g": opt_g.param_groups[0]["lr"],
            "lr_d": opt_d.param_groups[0]["lr"],
            "images_per_s": t.batch_size * window_steps / max(elapsed, 1e-9),
        }
        if done % t.checkpoint_every == 0 or done == t.steps:
            worker_rngs = _gather(rng.get_state(), world)
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    save_state(tmp, step=done, worker_rngs=worker_rngs, **state)
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None,
                    checkpoint_dir_name=f"checkpoint_{done:08d}",
                )
        else:
            ray.train.report(metrics)
        sums.zero_()
        window_start, window_steps = time.perf_counter(), 0


@dataclass
class TrainingResult:
    checkpoint_path: str
    history: list[dict[str, Any]]


def run_training(
    config: Config,
    *,
    shards: list[str],
    shape: tuple[int, int, int],
    storage_path: str,
    name: str,
    on_report: ReportHandler | None = None,
) -> TrainingResult:
    """Train with ``config.train.workers`` Ray Train workers; return the final checkpoint.

    A run with the same ``storage_path`` and ``name`` as an interrupted one continues from its
    latest checkpoint: Ray Train restores its checkpoint list from storage and the workers load
    ``ray.train.get_checkpoint()``.
    """
    from ray.train import CheckpointConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.callback import UserCallback
    from ray.util.queue import Queue

    reports: Queue = Queue()

    class ForwardReports(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):  # noqa: ANN001
            reports.put((metrics[0], checkpoint.path if checkpoint is not None else None))

    t = config.train
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.to_dict(),
            "shards": shards,
            "shape": list(shape),
        },
        scaling_config=ScalingConfig(
            num_workers=t.workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.threads_per_worker, **({"GPU": 1} if t.use_gpu else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(storage_path).resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
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
    while thread.is_alive() or not reports.empty():
        try:
            metrics, checkpoint_path = reports.get(timeout=0.5)
        except Exception:  # queue.Empty from the Ray queue actor
            continue
        history.append(metrics)
        if on_report is not None:
            on_report(metrics, checkpoint_path)
    thread.join()
    reports.shutdown()
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    return TrainingResult(checkpoint_path=result.checkpoint.path, history=history)
