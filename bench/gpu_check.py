"""GPU checks of the gan library (no Ray, no MLflow: runs with torch alone).

    python bench/gpu_check.py            # on a CUDA machine
    python bench/gpu_check.py --device cpu --quick   # the same code paths on CPU

1. Synchronized batch norm on CUDA in 2 processes (gloo, both on one GPU: NCCL refuses two ranks
   on one device): ours (which delegates to torch's SyncBatchNorm on CUDA) against plain batch
   norm over the global batch — outputs, input/weight gradients, running statistics — and the
   time per forward+backward of ours against torch's own layer.
2. Training throughput of one process: images/s of the DCGAN train step in float32 and in bf16
   autocast, at the default (16x16, width 32, batch 64) and at 64x64 (width 64, batch 256).
3. (CUDA) ``gan.transfer.to_device`` queues a host-to-GPU copy behind the GPU's work, where a
   plain ``.to()`` waits for that work to finish.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gan.nn.models import Discriminator, Generator
from gan.nn.sync_batchnorm import SyncBatchNorm
from gan.step import train_step
from gan.transfer import to_device


def _variants(device: str) -> list[tuple[str, type[nn.Module]]]:
    # torch's own SyncBatchNorm refuses CPU tensors: on CPU only ours runs.
    variants: list[tuple[str, type[nn.Module]]] = [("ours", SyncBatchNorm)]
    if device.startswith("cuda"):
        variants.append(("torch", nn.SyncBatchNorm))
    return variants


def _syncbn_worker(rank: int, world: int, store: str, device: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    x = (torch.randn(16, 8, 12, 12, dtype=torch.float64) * 3 + 2).to(device)
    grad = torch.randn(16, 8, 12, 12, dtype=torch.float64).to(device)
    weight = torch.linspace(0.5, 1.5, 8, dtype=torch.float64)
    bias = torch.linspace(-1, 1, 8, dtype=torch.float64)
    half = x.shape[0] // world
    mine = slice(rank * half, (rank + 1) * half)

    results = {}
    for name, cls in _variants(device):
        layer = cls(8).to(device=device, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        xi = x[mine].clone().requires_grad_(True)
        y = layer(xi)
        y.backward(grad[mine])
        results[name] = {
            "y": y.detach().cpu(),
            "dx": xi.grad.cpu(),
            "dw": layer.weight.grad.cpu(),
            "db": layer.bias.grad.cpu(),
            "mean": layer.running_mean.cpu(),
            "var": layer.running_var.cpu(),
        }
        # timing of forward+backward in float32
        layer = cls(64).to(device)
        xt = torch.randn(64, 64, 32, 32, device=device, requires_grad=True)
        for _ in range(5):
            layer(xt).sum().backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(30):
            layer(xt).sum().backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        results[name]["ms"] = (time.perf_counter() - start) / 30 * 1000
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def check_syncbn(device: str) -> None:
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_syncbn_worker, args=(world, f"{tmp}/store", device, tmp), nprocs=world, join=True)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]

    torch.manual_seed(0)
    x = torch.randn(16, 8, 12, 12, dtype=torch.float64) * 3 + 2
    grad = torch.randn(16, 8, 12, 12, dtype=torch.float64)
    ref = nn.BatchNorm2d(8).double()
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 1.5, 8, dtype=torch.float64))
        ref.bias.copy_(torch.linspace(-1, 1, 8, dtype=torch.float64))
    xr = x.clone().requires_grad_(True)
    y = ref(xr)
    y.backward(grad)
    for name, _ in _variants(device):
        diffs = {
            "output": (torch.cat([r[name]["y"] for r in ranks]) - y.detach()).abs().max(),
            "input grad": (torch.cat([r[name]["dx"] for r in ranks]) - xr.grad).abs().max(),
            "weight grad": (sum(r[name]["dw"] for r in ranks) - ref.weight.grad).abs().max(),
            "bias grad": (sum(r[name]["db"] for r in ranks) - ref.bias.grad).abs().max(),
            "running mean": (ranks[0][name]["mean"] - ref.running_mean).abs().max(),
            "running var": (ranks[0][name]["var"] - ref.running_var).abs().max(),
        }
        worst = max(float(v) for v in diffs.values())
        verdict = "OK" if worst < 1e-6 else "MISMATCH"
        print(
            f"syncbn {name:5s} vs global BN ({device}, 2 ranks, float64): max |diff| "
            f"{worst:.2e} {verdict}; " + ", ".join(f"{k} {float(v):.1e}" for k, v in diffs.items())
        )
    for name, _ in _variants(device):
        print(
            f"syncbn {name:5s} fwd+bwd (64x64x32x32 per rank, fp32): "
            f"{sum(r[name]['ms'] for r in ranks) / world:.2f} ms"
        )


def throughput(
    device: str, resolution: int, width: int, batch: int, amp: bool, steps: int
) -> float:
    torch.manual_seed(0)
    g = Generator(latent_dim=64, resolution=resolution, channels=3, width=width).to(device)
    d = Discriminator(resolution=resolution, channels=3, width=width).to(device)
    og = torch.optim.Adam(g.parameters(), 2e-4, betas=(0.5, 0.999))
    od = torch.optim.Adam(d.parameters(), 2e-4, betas=(0.5, 0.999))
    real = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    dtype = torch.bfloat16

    def step():
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=amp):
            return train_step(
                generator=g, discriminator=d, opt_g=og, opt_d=od, real=real, latent_dim=64
            )

    for _ in range(10):
        stats = step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        stats = step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert torch.isfinite(stats.loss_d) and torch.isfinite(stats.loss_g), "non-finite loss"
    return batch * steps / seconds


def check_host_copies() -> None:
    """How long the host waits in a copy of a noise batch queued behind 50 ms of GPU work."""
    device = torch.device("cuda", 0)
    noise = torch.randn(256, 100)

    def host_ms(copy: Callable[[torch.Tensor], torch.Tensor]) -> float:
        copy(noise)  # once untimed: the first pinned block is allocated, as in a training's start
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)  # about 50 ms of GPU clock cycles
        started = time.perf_counter()
        copied = copy(noise)
        waited = (time.perf_counter() - started) * 1e3
        if not torch.equal(copied.cpu(), noise):
            raise AssertionError("the copy changed the values")
        return waited

    plain = host_ms(lambda t: t.to(device))
    queued = host_ms(lambda t: to_device(t, device))
    verdict = "queued" if queued < plain / 10 else "WAITED"
    print(
        f"host copy behind 50 ms of GPU work: .to() returned after {plain:.1f} ms, "
        f"gan.transfer.to_device after {queued:.2f} ms ({verdict})"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    print(f"torch {torch.__version__}, device {args.device} ({name}), {os.cpu_count()} CPUs")
    if args.device.startswith("cuda"):
        check_host_copies()
    check_syncbn(args.device)
    steps = 5 if args.quick else 200
    cases = [(16, 32, 64)] if args.quick else [(16, 32, 64), (64, 64, 256)]
    for resolution, width, batch in cases:
        for amp in (False, True):
            ips = throughput(args.device, resolution, width, batch, amp, steps)
            print(
                f"train_step {resolution}x{resolution} width {width} batch {batch} "
                f"{'bf16 autocast' if amp else 'fp32':13s}: {ips:10.0f} images/s"
            )


if __name__ == "__main__":
    main()
