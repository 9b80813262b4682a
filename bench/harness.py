"""What the training benchmarks share: the machine line, load averages, the digits shards, the
feature classifier, and the reference training loops that run without Ray.

The reference loops run in ``torch.multiprocessing`` processes (one per rank, gloo, one torch
thread each) so that 1 and 2 ranks are measured the same way as the Ray Train workers: a fresh
process per rank, data read from the same Parquet shards, the batch sampled by index.

* ``bare``: a DCGAN step written here with plain torch (same models from
  ``pipelines.loop.build_models``, same Adam, same non-saturating loss, the pipeline's DDP
  arrangement: G and D wrapped separately, no buffer broadcast, the G phase through the
  unwrapped D with its parameters frozen; with ``train.reuse_fakes``, the default, one batch of
  fakes from the wrapped G serves both updates, else D's fakes come from the unwrapped G under
  no_grad), with torch's DDP as it comes: the gradients go through gloo.
* ``state``: ``pipelines.loop.TrainingState.step``, the pipeline's own step (schedules, figures,
  gradient norms) and DDP as the pipeline arranges it (on CPU, gradients over the direct
  connections of gan.nn.stats_exchange) in the same processes, without Ray: what the pipeline
  does differently inside the step.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.model_selection import train_test_split
from torch import nn
from torch.profiler import ProfilerActivity, profile

from gan.data import ImageSet, read_source
from gan.data.arrays import to_model_range
from gan.data.shards import concat, read_shard, split_shards, to_table
from gan.host_memory import keep_freed_memory
from gan.losses import get_loss
from pipelines.config import Config, config_from_dict
from pipelines.loop import TrainingState, build_models
from pipelines.train import wrap_ddp


def machine() -> str:
    """CPU model and count, and the versions that matter; benchmarks print it first."""
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import ray

    return (
        f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}, "
        f"python {platform.python_version()}"
    )


def loadavg() -> str:
    """The 1/5/15-minute load averages: other agents share these cores, so every figure is
    printed beside the load it was measured under."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f}/{five:.1f}/{fifteen:.1f}"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def quartiles(values: list[float]) -> tuple[float, float]:
    """The lower and upper quartile of ``values`` (the elements a quarter from each end)."""
    ordered = sorted(values)
    return ordered[len(ordered) // 4], ordered[(3 * len(ordered)) // 4]


@dataclass
class Dataset:
    """The default dataset as prepare writes it: train shards, one held-out shard."""

    shards: list[str]
    holdout: list[str]
    shape: tuple[int, int, int]


def write_dataset(config: Config, directory: str | Path) -> Dataset:
    """The prepare step's split and shard layout (same stratified split, same shard count)
    written without the DAG, so a benchmark needs neither MLflow nor the runner."""
    c = config.data
    data, _ = read_source(c.source, c.resolution, on_bad=c.on_bad)
    train_idx, holdout_idx = train_test_split(
        np.arange(len(data)),
        test_size=c.holdout_fraction,
        random_state=c.seed,
        stratify=data.labels,
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train = ImageSet(data.images[train_idx], data.labels[train_idx])
    shards = []
    for i, part in enumerate(split_shards(train, c.shards)):
        shards.append(str(directory / f"train-{i:05d}-of-{c.shards:05d}.parquet"))
        pq.write_table(to_table(part), shards[-1])
    holdout = str(directory / "holdout-00000-of-00001.parquet")
    pq.write_table(to_table(ImageSet(data.images[holdout_idx], data.labels[holdout_idx])), holdout)
    return Dataset(shards, [holdout], tuple(data.shape))


def write_classifier(config: Config, dataset: Dataset, directory: str | Path) -> str:
    """The fit_features step's classifier (same spec and files), for runs with the probe on."""
    from pipelines.steps.features import fit_classifier, save_classifier

    train = concat([read_shard(p, dataset.shape) for p in dataset.shards])
    classifier, spec = fit_classifier(config, train, int(train.labels.max()) + 1)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_classifier(directory, classifier, spec)
    return str(directory)


# Ray starts its worker processes (Ray Train workers included) at this niceness, drivers at 0
# (ray-project/ray#24928; RAY_worker_niceness): on a shared CPU they yield to everything else.
RAY_WORKER_NICENESS = int(os.environ.get("RAY_worker_niceness", "15"))  # noqa: SIM112 (Ray's name)

# The process title of a Ray Train worker (``ray::RayTrainWorker...``).
WORKER_MARK = "RayTrainWorker"


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def descendants(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        for child in _children(todo.pop()):
            seen.append(child)
            todo.append(child)
    return seen


def ray_train_workers() -> list[int]:
    """PIDs of the Ray Train workers started under this process (not other users' Ray)."""
    found = []
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            if WORKER_MARK in Path(f"/proc/{pid}/cmdline").read_text():
                found.append(pid)
    return found


def cpu_ticks(stat_file: str | Path) -> int:
    """User + system clock ticks from a ``/proc/<pid>/stat`` or ``/proc/<pid>/task/<tid>/stat``
    file (the fields after the command name, which may itself hold spaces and parentheses)."""
    stat = Path(stat_file).read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def thread_cpu_ticks(by_thread: bool = False) -> dict[str, int]:
    """User + system clock ticks of this process's threads, summed by thread name, or with
    ``by_thread`` one entry per thread (``name:tid``). A thread that ends meanwhile is left out."""
    ticks: dict[str, int] = {}
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            name = (task / "comm").read_text().strip()
            key = f"{name}:{task.name}" if by_thread else name
            ticks[key] = ticks.get(key, 0) + cpu_ticks(task / "stat")
    return ticks


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) used so far by this process and each process below it, by
    PID with the kind of each: Ray Train workers, Ray's other processes (raylet, GCS,
    dashboard, controller, ...), and this driver. ``cores_between`` turns two into figures."""
    tick = os.sysconf("SC_CLK_TCK")
    used: dict[int, tuple[str, float]] = {}
    for pid in [os.getpid(), *descendants(os.getpid())]:
        with contextlib.suppress(OSError, ValueError, IndexError):
            seconds = cpu_ticks(f"/proc/{pid}/stat") / tick
            cmdline = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
            if pid == os.getpid():
                name = "driver (this bench)"
            elif WORKER_MARK in cmdline:
                name = "Ray Train workers"
            else:
                name = _ray_process_name(cmdline)
            used[pid] = (name, seconds)
    return used


def cores_between(
    begin: dict[int, tuple[str, float]], end: dict[int, tuple[str, float]], seconds: float
) -> dict[str, float]:
    """CPU used per second between two ``cpu_seconds()`` snapshots, by process kind (1.0 = one
    core busy); what the Ray machinery costs beside the training is the kinds' difference.
    Each process counts under its kind at the end: a Ray worker process takes a new title when
    it becomes an actor, and its CPU must not move from one kind to another with it."""
    cores: dict[str, float] = {}
    for pid, (kind, used) in end.items():
        before = begin.get(pid, (kind, 0.0))[1]
        cores[kind] = cores.get(kind, 0.0) + (used - before) / seconds
    return cores


def _ray_process_name(cmdline: str) -> str:
    for mark in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env"):
        if mark in cmdline:
            return mark
    if cmdline.startswith("ray::"):
        return cmdline.split()[0].split(".")[0]
    return "other"


# ------------------------------------------------------------------ reference loops (no Ray)


def bare_step(
    g: nn.Module,
    d: nn.Module,
    g_run: nn.Module,
    d_run: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    real: torch.Tensor,
    latent_dim: int,
    rng: torch.Generator,
    loss: str,
    reuse_fakes: bool = False,
) -> None:
    """One GAN iteration (the configured loss, no penalties) with nothing else: no figures, no
    gradient norms, no schedules. Noise is drawn on ``rng``'s device (a CUDA generator: on the
    GPU, with no copy). ``reuse_fakes``: the G update trains on the D update's fakes."""
    d_loss, g_loss = get_loss(loss)
    batch = real.shape[0]
    if reuse_fakes:
        fake_for_g = g_run(torch.randn(batch, latent_dim, generator=rng, device=rng.device))
        fake = fake_for_g.detach()
    else:
        with torch.no_grad():
            fake = g(torch.randn(batch, latent_dim, generator=rng, device=rng.device))
    loss_d = d_loss(d_run(real), d_run(fake))
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    d.requires_grad_(False)
    if not reuse_fakes:
        fake_for_g = g_run(torch.randn(batch, latent_dim, generator=rng, device=rng.device))
    loss_g = g_loss(d(fake_for_g))
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    d.requires_grad_(True)


def dispatched_ops(step: Callable[[int], None], warmup: int, steps: int) -> Counter[str]:
    """``aten::`` operators per step that no other ``aten::`` operator called, by name."""
    for i in range(warmup):
        step(i)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(warmup + i)
    counts: Counter[str] = Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            counts[event.name] += 1
    return Counter({name: n / steps for name, n in counts.items()})


def _count_all_reduces() -> dict[str, int]:
    """Wraps sync batch norm's all-reduce to count calls (it is looked up at call time)."""
    from gan.nn import sync_batchnorm

    counts = {"calls": 0}
    original = sync_batchnorm.all_reduce_sum

    def counted(*args: Any, **kwargs: Any) -> Any:
        counts["calls"] += 1
        return original(*args, **kwargs)

    sync_batchnorm.all_reduce_sum = counted  # type: ignore[assignment]
    return counts


def _reference_worker(
    rank: int, world: int, store: str, job: dict[str, Any], out: str
) -> None:  # pragma: no cover - runs in a child process
    torch.set_num_threads(1)
    if job["nice"]:
        os.nice(job["nice"])  # e.g. the niceness Ray gives its workers (15)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    result, cpu_s = _timed_reference_loop(rank, world, job)
    Path(f"{out}.cpu{rank}").write_text(str(cpu_s))
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def ray_reference_loop(job: dict[str, Any]) -> None:  # pragma: no cover - in a Ray Train worker
    """The reference loop as a Ray Train worker's function (Ray Train made the process group):
    the same work as in ``run_reference``, in a Ray Train worker process instead of a bare one.
    Rank 0 writes its figures to ``job["out"]`` (the bench runs on one machine)."""
    import ray.train

    torch.set_num_threads(1)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    result, cpu_s = _timed_reference_loop(rank, world, job)
    all_ranks = torch.tensor([cpu_s], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(all_ranks)
    if rank == 0:
        Path(job["out"]).write_text(json.dumps({**result, "cpu_s_all_ranks": float(all_ranks)}))


class _GcTime:
    """A ``gc.callbacks`` entry that adds up the time of the collections, by generation."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        self.seconds += time.perf_counter() - self._started
        self.collections[info["generation"]] += 1


def reference_step(rank: int, world: int, job: dict[str, Any]) -> Callable[[int], None]:
    """This rank's step of the reference loop (``job["mode"]``: ``bare`` or ``state``), its
    models built and its shards read: ``step(i)`` trains step ``i``. With
    ``perf.keep_freed_memory`` (the default) both modes keep freed memory as the pipeline's
    workers do, so that a comparison of the two is not one of malloc's settings."""
    config = config_from_dict(job["config"])
    if config.perf.keep_freed_memory:
        keep_freed_memory()  # before the shards and the networks, as in pipelines/train.py
    t = config.train
    shape = tuple(job["shape"])
    own = concat([read_shard(p, shape) for p in job["shards"][rank::world]])
    data, labels = to_model_range(own.images), torch.from_numpy(own.labels)
    local_batch = t.batch_size // world

    if job["mode"] == "state":
        state = TrainingState(config, channels=shape[0], device=torch.device("cpu"), rank=rank)
        g, d, rng = state.generator, state.discriminator, state.rng
        g_run, d_run = (wrap_ddp(g), wrap_ddp(d)) if world > 1 else (g, d)

        def step(i: int) -> None:
            index = torch.randint(0, data.shape[0], (local_batch,), generator=rng)
            real, real_labels = state.batch(data, labels, index)  # as pipelines/train.py
            state.step(real, i, g_run, d_run, real_labels)

    else:
        if config.model.conditional:
            raise ValueError("the bare loop is unconditional: use mode='state'")
        torch.manual_seed(t.seed)
        g, d = build_models(config, shape[0])
        train = bare_loop(config, g, d, data, rank, world)

        def step(i: int) -> None:
            train()

    return step


def bare_loop(
    config: Config,
    g: nn.Module,
    d: nn.Module,
    data: torch.Tensor,
    rank: int,
    world: int,
    *,
    direct_gradients: bool = False,
) -> Callable[[], None]:
    """The bare loop's next step for this rank, training ``g`` and ``d`` with Adam on batches
    sampled by index from ``data``, under DDP when ``world`` > 1: its gradients through gloo, or
    with ``direct_gradients`` as the pipeline sends them (pipelines.train.wrap_ddp)."""
    o = config.optim
    opt_g = torch.optim.Adam(g.parameters(), lr=o.lr_g, betas=(o.beta1, o.beta2))
    opt_d = torch.optim.Adam(d.parameters(), lr=o.lr_d, betas=(o.beta1, o.beta2))
    rng = torch.Generator().manual_seed(config.train.seed * 1000 + rank)
    if world > 1:
        g_run = wrap_ddp(g, direct_gradients=direct_gradients)
        d_run = wrap_ddp(d, direct_gradients=direct_gradients)
    else:
        g_run, d_run = g, d
    local_batch = config.train.batch_size // world
    latent, loss = config.model.latent_dim, config.loss.kind
    reuse = config.train.reuse_fakes

    def step() -> None:
        real = data[torch.randint(0, data.shape[0], (local_batch,), generator=rng)]
        bare_step(g, d, g_run, d_run, opt_g, opt_d, real, latent, rng, loss, reuse)

    return step


def _timed_reference_loop(rank: int, world: int, job: dict[str, Any]) -> tuple[dict, float]:
    """Warm-up, then ``job["steps"]`` timed steps; rank 0's figures and this rank's CPU time."""
    counts = _count_all_reduces() if job.get("count_all_reduces") else None
    step = reference_step(rank, world, job)
    batch_size = job["config"]["train"]["batch_size"]  # reference_step parsed the config

    def barrier() -> None:
        if world > 1:
            dist.barrier()

    for i in range(job["warmup"]):
        step(i)
    barrier()
    if counts is not None:
        counts["calls"] = 0
    load_start = loadavg()
    marker = job.get("window_marker") if rank == 0 else None
    if marker:  # for the driver's CPU snapshots of the timed window
        Path(f"{marker}.start").touch()
    gc_time = _GcTime()
    gc.callbacks.append(gc_time)
    faults_started = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    started, cpu_started = time.perf_counter(), time.process_time()
    profile = job.get("profile")
    if profile and rank == 0:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(job["steps"]):
                step(job["warmup"] + i)
        Path(profile).write_text(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        )
    else:
        for i in range(job["steps"]):
            step(job["warmup"] + i)
    barrier()
    elapsed = time.perf_counter() - started
    cpu_s = time.process_time() - cpu_started
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_started
    gc.callbacks.remove(gc_time)
    if marker:
        Path(f"{marker}.end").touch()
    result = {
        # Below 1.0: rank 0 waited (for the other rank, or for a core others were using).
        "cpu_busy": cpu_s / elapsed,
        "elapsed_s": elapsed,
        "images_per_s": batch_size * job["steps"] / elapsed,
        # malloc handing memory back and faulting it in again (perf.keep_freed_memory).
        "minor_faults_per_step": faults / job["steps"],
        "load_start": load_start,
        "load_end": loadavg(),
        # Python's cyclic garbage collector: its pauses grow with every object the process
        # holds (a Ray worker holds more than a bare process).
        "gc_ms_per_step": 1e3 * gc_time.seconds / job["steps"],
        "gc_collections": gc_time.collections,
        "gc_tracked_objects": len(gc.get_objects()),
    }
    if counts is not None:
        result["all_reduces_per_step"] = counts["calls"] / job["steps"]
    return result, cpu_s


def _reference_job(
    config: Config, dataset: Dataset, mode: str, steps: int, warmup: int, **extra: Any
) -> dict[str, Any]:
    return {
        "config": config.to_dict(),
        "shards": dataset.shards,
        "shape": list(dataset.shape),
        "mode": mode,
        "steps": steps,
        "warmup": warmup,
        **extra,
    }


def run_reference(
    config: Config,
    dataset: Dataset,
    *,
    mode: str = "bare",
    steps: int = 500,
    warmup: int = 50,
    count_all_reduces: bool = False,
    profile: str | None = None,
    nice: int = 0,
) -> dict[str, Any]:
    """Train ``steps`` timed steps (after ``warmup``) with ``config.train.workers`` processes,
    each at niceness ``nice``; returns rank 0's figures (images/s over the global batch, the
    share of a core rank 0 used, load averages)."""
    world = config.train.workers
    job = _reference_job(
        config,
        dataset,
        mode,
        steps,
        warmup,
        count_all_reduces=count_all_reduces,
        profile=profile,
        nice=nice,
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.start_processes(
            _reference_worker,
            args=(world, str(Path(tmp) / "store"), job, out),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        result = json.loads(Path(out).read_text())
        # Images per CPU-second of all ranks: what the training costs in CPU, which other
        # programs on the machine change much less than the wall-clock rate.
        cpu_s = sum(float(Path(f"{out}.cpu{rank}").read_text()) for rank in range(world))
        result["images_per_cpu_s"] = config.train.batch_size * steps / cpu_s
        return result


def run_ray_reference(
    config: Config, dataset: Dataset, storage: str, *, mode: str = "bare", steps: int, warmup: int
) -> dict[str, Any]:
    """``run_reference``'s loop in Ray Train workers (``TorchTrainer``, gloo, the same CPUs per
    worker as the pipeline asks for): what being a Ray Train worker costs the same work, without
    the pipeline's worker loop, reports or checkpoints. Rank 0's figures."""
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = config.train
    out = Path(storage) / f"reference-{time.time_ns()}.json"
    marker = str(out.with_suffix(""))
    window = _WindowCpu(marker)
    trainer = TorchTrainer(
        ray_reference_loop,
        train_loop_config=_reference_job(
            config, dataset, mode, steps, warmup, out=str(out), window_marker=marker
        ),
        scaling_config=ScalingConfig(
            num_workers=t.workers, resources_per_worker={"CPU": t.threads_per_worker}
        ),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(
            name=out.stem, storage_path=storage, logging_config=LoggingConfig(log_level="WARNING")
        ),
    )
    window.start()
    trainer.fit()
    window.join(timeout=10)
    result = json.loads(out.read_text())
    result["images_per_cpu_s"] = t.batch_size * steps / result.pop("cpu_s_all_ranks")
    result["cores"] = window.cores()
    return result


class _WindowCpu(threading.Thread):
    """Snapshots ``cpu_seconds()`` when rank 0 marks the start and the end of its timed window
    (files ``MARKER.start`` and ``MARKER.end``), polling every 20 ms."""

    def __init__(self, marker: str) -> None:
        super().__init__(daemon=True)
        self.marker = marker
        self.snapshots: list[tuple[float, dict[int, tuple[str, float]]]] = []

    def run(self) -> None:
        for suffix in (".start", ".end"):
            while not Path(self.marker + suffix).exists():
                time.sleep(0.02)
            self.snapshots.append((time.perf_counter(), cpu_seconds()))

    def cores(self) -> dict[str, float]:
        """CPU used per second of the window, by process kind (1.0 = one core busy)."""
        (t0, begin), (t1, end) = self.snapshots
        return cores_between(begin, end, t1 - t0)
