"""Images/s of the pipeline's training step on one GPU against a bare PyTorch loop, and what
each speed option (perf.*) adds. Torch alone: no Ray, no MLflow (the lent GPU machine has
neither), so this measures ``pipelines.loop.TrainingState`` — the step every Ray Train worker runs
— with the worker loop's per-step bookkeeping copied here.

    python bench/gpu_speed.py                  # on a CUDA machine
    python bench/gpu_speed.py --device cpu --steps 5 --warmup 2 --model default   # smoke test

Models: ``dcgan64`` is the classic 64x64 DCGAN (3 channels, width 64, batch norm in G and D,
non-saturating loss, batch 256, latent 100); ``default`` is the pipeline's default model
(16x16, spectral-norm D, hinge loss, batch 64). The bare loop builds the same networks with the
same Adam and loss and does nothing else: noise drawn on the GPU, no figures, no schedules.
Variants run in turn, ``--rounds`` times, interleaved; the median is printed. Compiled variants
run once (compiling takes longer than measuring); ``+ compile, no NHWC`` turns inductor's own
conversion of convolutions to channels-last off.

The first check, ``nccl``, runs the step under DistributedDataParallel on a one-rank NCCL group
with the pipeline's synchronized batch norm (torch's SyncBatchNorm on CUDA): the GPU path of a
Ray Train worker, minus Ray.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch._inductor.config as inductor_config
import torch.distributed as dist
from harness import bare_step

from gan.step_stats import FIGURES, StatsWindow
from pipelines.config import Config, load_config
from pipelines.loop import TrainingState, build_models

DCGAN64 = [
    "data.resolution=64",
    "model.latent_dim=100",
    "model.g_width=64",
    "model.d_width=64",
    "model.g_norm=batch",
    "model.d_norm=batch",
    "loss.kind=nonsaturating",
    "train.batch_size=256",
]
MODELS = {
    "dcgan64": DCGAN64,
    "default": [],
    # dcgan64's layers with 4 channels a layer and 4 images a batch (a later override wins): the
    # arithmetic is negligible, so on a CPU the step's time is its per-operator host cost, the
    # cost that bounds a small model on a fast GPU (a stand-in for a launch-bound GPU step).
    "dcgan64-thin": [*DCGAN64, "model.g_width=4", "model.d_width=4", "train.batch_size=4"],
}
VARIANTS = {
    "ganpipe fp32": [],
    "+ bf16": ["perf.precision=bf16"],
    "+ channels_last": ["perf.channels_last=true"],
    "+ fused adam": ["perf.fused_optimizer=true"],
    "+ pin_memory": ["perf.pin_memory=true"],
    "+ compile": ["perf.compile=true"],
    "+ compile, no NHWC": ["perf.compile=true"],
    "compile + NHWC": ["perf.compile=true", "perf.channels_last=true"],
    "all but NHWC": [
        "perf.precision=bf16",
        "perf.fused_optimizer=true",
        "perf.pin_memory=true",
        "perf.compile=true",
    ],
    "all options": [
        "perf.precision=bf16",
        "perf.channels_last=true",
        "perf.fused_optimizer=true",
        "perf.pin_memory=true",
        "perf.compile=true",
    ],
}
CHANNELS = 3
IMAGES = 8192


def _config(model: str, extra: list[str], device: str) -> Config:
    gpu = ["train.use_gpu=true"] if device == "cuda" else []
    return load_config(None, ["train.workers=1", *gpu, *MODELS[model], *extra])


def host_data(config: Config, channels: int = CHANNELS) -> torch.Tensor:
    """Images in [-1, 1] in host memory, as a worker holds its shards."""
    side = config.data.resolution
    rng = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (IMAGES, channels, side, side), generator=rng)
    return pixels.float().div_(127.5).sub_(1.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_loop(config: Config, data: torch.Tensor, device: torch.device) -> Callable[[int], None]:
    torch.manual_seed(config.train.seed)
    g, d = build_models(config, data.shape[1])
    g.to(device)
    d.to(device)
    o = config.optim
    opt_g = torch.optim.Adam(g.parameters(), lr=o.lr_g, betas=(o.beta1, o.beta2))
    opt_d = torch.optim.Adam(d.parameters(), lr=o.lr_d, betas=(o.beta1, o.beta2))
    batch, latent = config.train.batch_size, config.model.latent_dim
    loss, reuse = config.loss.kind, config.train.reuse_fakes
    rng = torch.Generator().manual_seed(1)
    noise = torch.Generator(device=device).manual_seed(2)

    def step(_: int) -> None:
        index = torch.randint(0, data.shape[0], (batch,), generator=rng)
        real = data[index].to(device)
        bare_step(g, d, g, d, opt_g, opt_d, real, latent, noise, loss, reuse)

    return step


def ganpipe_loop(
    config: Config, data: torch.Tensor, device: torch.device, ddp: bool = False
) -> Callable[[int], None]:
    state = TrainingState(config, channels=data.shape[1], device=device)
    generator, discriminator = state.generator, state.discriminator
    if ddp:
        from pipelines.train import wrap_ddp

        generator, discriminator = wrap_ddp(generator), wrap_ddp(discriminator)
    batch = config.train.batch_size
    labels = torch.zeros(data.shape[0], dtype=torch.long)  # one class: the data has none here
    window = StatsWindow()
    sums = torch.zeros(len(FIGURES), device=device)

    def step(i: int) -> None:
        index = torch.randint(0, data.shape[0], (batch,), generator=state.rng)
        real, real_labels = state.batch(data, labels, index)
        stats = state.step(real, i, generator, discriminator, real_labels)
        # The bookkeeping of pipelines/train.py, or of its time for a gan/step.py from before
        # ec066db (bench/step_ab.py --before), whose StepStats were summed step by step.
        if hasattr(stats, "stacked"):
            sums.add_(stats.stacked())
        else:
            window.add(stats)
        if (i + 1) % config.train.report_every == 0:
            (window.means() if len(window) else sums).cpu()
            window.clear()
            sums.zero_()

    return step


def images_per_s(
    step: Callable[[int], None], batch: int, device: torch.device, warmup: int, steps: int
) -> tuple[float, float]:
    """(images/s, seconds of the warm-up, which holds torch.compile's compilation)."""
    started = time.perf_counter()
    for i in range(warmup):
        step(i)
    _sync(device)
    warm = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    _sync(device)
    return batch * steps / (time.perf_counter() - started), warm


def _nccl_check(model: str, device: torch.device, warmup: int, steps: int) -> str:
    path = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group(
        "nccl", init_method=f"file://{path}", rank=0, world_size=1, device_id=device
    )
    try:
        config = _config(model, ["model.g_norm=sync_batch"], "cuda")
        data = host_data(config)
        rate, _ = images_per_s(
            ganpipe_loop(config, data, device, ddp=True),
            config.train.batch_size,
            device,
            warmup,
            steps,
        )
        tensor = torch.ones(4, device=device)
        dist.all_reduce(tensor)
        ok = bool((tensor == 1).all())
        return (
            f"nccl: backend {dist.get_backend()}, all_reduce {'OK' if ok else 'WRONG'}; DDP step "
            f"with synchronized batch norm in G: {rate:,.0f} images/s"
        )
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--model", default="dcgan64,default")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default=";".join(VARIANTS), help="';'-separated")
    args = parser.parse_args()
    # An index: NCCL's init_process_group(device_id=...) refuses a bare "cuda".
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}, {os.cpu_count()} CPUs", flush=True)
    torch.backends.cudnn.benchmark = True
    if device.type == "cuda":
        print(_nccl_check("dcgan64", device, args.warmup, args.steps), flush=True)
    chosen = [v.strip() for v in args.variants.split(";")]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {'; '.join(VARIANTS)}")
    if device.type == "cpu":  # pinned memory needs a GPU
        chosen = [v for v in chosen if "perf.pin_memory=true" not in VARIANTS[v]]
    for model in args.model.split(","):
        config = _config(model, [], args.device)
        data = host_data(config)
        print(f"\n{model}: batch {config.train.batch_size}, {args.steps} timed steps", flush=True)
        rates: dict[str, list[float]] = {}
        for round_index in range(args.rounds):
            for variant in ["bare", *chosen]:
                compiles = "perf.compile=true" in VARIANTS.get(variant, [])
                if compiles and round_index > 0:  # compiling takes longer than measuring
                    continue
                # Inductor converts convolutions to NHWC by itself ("layout optimization").
                if compiles:
                    inductor_config.layout_optimization = variant != "+ compile, no NHWC"
                try:  # the config may refuse a combination (compile + NHWC): say so, go on
                    config = _config(model, VARIANTS.get(variant, []), args.device)
                    step = (
                        bare_loop(config, data, device)
                        if variant == "bare"
                        else ganpipe_loop(config, data, device)
                    )
                    rate, warm = images_per_s(
                        step, config.train.batch_size, device, args.warmup, args.steps
                    )
                except Exception as exc:  # one broken option must not hide the others' figures
                    last = str(exc).strip().splitlines()[-1:] or [""]
                    print(f"  {variant:16s} FAILED: {type(exc).__name__}: {last[0][:300]}")
                    continue
                rates.setdefault(variant, []).append(rate)
                print(
                    f"  round {round_index + 1} {variant:16s} {rate:10,.0f} images/s "
                    f"(first {args.warmup} steps {warm:.1f} s)",
                    flush=True,
                )
        reference = statistics.median(rates["bare"])
        print(f"{model}: medians", flush=True)
        for variant, values in rates.items():
            median = statistics.median(values)
            print(f"  {variant:16s} {median:10,.0f} images/s  {median / reference:5.2f}x bare")


if __name__ == "__main__":
    main()
