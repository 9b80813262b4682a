"""One sync batch norm layer's forward and backward right after a convolution, against others.

    python bench/syncbn_layer_cold.py
    python bench/syncbn_layer_cold.py --before HEAD~3 --calls 500

In a GAN step every batch-norm layer runs right after a convolution, whose data fills the
caches: each small operator the layer calls then costs several times what it costs back to back
(bench/cold_calls.py). This times one layer at the default generator's shapes (32 images a rank;
64 channels at 4×4, 32 at 8×8), in one process with one torch thread, with a transposed
convolution's forward and backward before every forward and every backward. Variants:

* ``batch``: torch's ``F.batch_norm`` in training mode (what ``model.g_norm=batch`` runs);
* ``sync``: gan.nn.sync_batchnorm's CPU autograd function as it is (the torch path), its
  exchange left out (the layer sees one rank), so only its own work is timed;
* ``compiled``: the same layer in gan.nn.batchnorm_kernels' compiled passes (unless
  ``GANPIPE_SYNC_BN_KERNELS=torch`` or they cannot be built), its exchange left out too;
* ``before`` (with ``--before REV``): the same at an earlier revision;
* ``kernels``: torch's own training-mode kernels inside an autograd function of the same shape:
  what the function's wrapping costs;
* ``fewest``: the fewest calls a synchronized layer could make (statistics, one message, the
  running statistics, normalize; backward: the sums, one message, the correction). Not exact
  (it skips the counts, the combination across ranks and the float64 sums): a floor, not a
  candidate.

Prints the median forward and backward of each variant and its operators (``aten::`` operators
of one forward and backward, as bench/step_ops.py counts them), and the step's share: the sum
over the generator's two layers of forward and backward, against ``batch``. The variants take
turns in an order that rotates every call.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from harness import dispatched_ops, loadavg, machine
from syncbn_ab import _no_exchange, module_from_source, sources_at

from gan.nn import batchnorm_kernels, sync_batchnorm

SHAPES = ((32, 64, 4, 4), (32, 32, 8, 8))  # the default generator's two layers, one rank


def _one_rank_gather(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """In place of a gather, for a layer that gathers: the layer sees one rank."""
    return tensor.view(1, -1)


def _without_exchange(module: Any) -> None:
    """Replace the exchange calls of a sync batch norm module by the one-rank stubs above."""
    module.all_reduce_sum = _no_exchange
    if hasattr(module, "all_gather"):
        module.all_gather = _one_rank_gather


class _TorchKernels(torch.autograd.Function):
    """torch's training-mode batch norm inside an autograd function."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):  # type: ignore[no-untyped-def, override]
        out, mean, invstd = torch.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        x, weight, mean, invstd = ctx.saved_tensors
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, ctx.eps, [True, True, True]
        )
        return dx, dw, db, None, None, None, None, None


class _FewestCalls(torch.autograd.Function):
    """The fewest calls a synchronized layer could make; not exact (see the module's doc)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):  # type: ignore[no-untyped-def, override]
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        _no_exchange(torch.cat([mean, var]), group)
        running_mean.lerp_(mean, momentum)
        running_var.lerp_(var, momentum)
        out = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        x, weight, mean, var = ctx.saved_tensors
        dy_scaled, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, mean, var, None, None, False, ctx.eps, [True, True, True]
        )
        _no_exchange(torch.cat([sum_dy, sum_dy_xhat]))
        correction = torch.batch_norm(x, sum_dy, sum_dy_xhat, mean, var, False, 0.0, ctx.eps, False)
        return dy_scaled.add_(correction), sum_dy_xhat, sum_dy, None, None, None, None, None


def layer_at(revision: str) -> type:
    """gan/nn/sync_batchnorm.py's CPU autograd function at ``revision``, without its exchange;
    ValueError for a revision git cannot show."""
    module = module_from_source("sync_batchnorm", sources_at(revision)["sync_batchnorm"])
    _without_exchange(module)
    return module._CpuSyncBatchNormFn


def variants(before: str | None) -> dict[str, Callable[..., torch.Tensor]]:
    """Each variant as ``f(x, weight, bias, running_mean, running_var)``."""
    _without_exchange(sync_batchnorm)
    functions: dict[str, Any] = {"sync": sync_batchnorm._CpuSyncBatchNormFn}
    if before:
        functions["before"] = layer_at(before)
    functions.update(kernels=_TorchKernels, fewest=_FewestCalls)
    chosen: dict[str, Callable[..., torch.Tensor]] = {
        "batch": lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    }
    for name, function in functions.items():
        chosen[name] = lambda x, w, b, rm, rv, f=function: f.apply(x, w, b, rm, rv, 1e-5, 0.1, None)
    passes = batchnorm_kernels.kernels()
    if passes is not None:
        compiled = sync_batchnorm._CompiledSyncBatchNormFn
        chosen["compiled"] = lambda x, w, b, rm, rv: compiled.apply(
            x, w, b, rm, rv, 1e-5, 0.1, None, passes
        )
    return chosen


def time_layer(
    shape: tuple[int, ...], chosen: dict[str, Callable[..., torch.Tensor]], calls: int
) -> dict[str, tuple[float, float]]:
    """Median forward and backward seconds of each variant, in turns, each after a convolution."""
    channels = shape[1]
    conv = torch.nn.ConvTranspose2d(64, 64, 4, stride=2, padding=1)
    conv_input = torch.randn(32, 64, 4, 4, requires_grad=True)
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    weight = torch.ones(channels, requires_grad=True)
    bias = torch.zeros(channels, requires_grad=True)
    running_mean, running_var = torch.zeros(channels), torch.ones(channels)
    timings: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in chosen}
    warmup = max(calls // 10, 5)
    names = list(chosen)
    for call in range(warmup + calls):
        # The order turns every call: a variant always timed right after the same one measured
        # up to a fifth slower than the same code in another place (thirteenth session).
        shift = call % len(names)
        for name in names[shift:] + names[:shift]:
            layer = chosen[name]
            conv(conv_input).sum().backward()
            started = time.perf_counter()
            out = layer(x, weight, bias, running_mean, running_var)
            forward = time.perf_counter() - started
            conv(conv_input).sum().backward()
            started = time.perf_counter()
            out.backward(grad)
            backward = time.perf_counter() - started
            if call >= warmup:
                timings[name][0].append(forward)
                timings[name][1].append(backward)
    return {n: (statistics.median(f), statistics.median(b)) for n, (f, b) in timings.items()}


def operators(layer: Callable[..., torch.Tensor], shape: tuple[int, ...]) -> int:
    """``aten::`` operators of one forward and backward that no other ``aten::`` operator called
    (harness.dispatched_ops, bench/step_ops.py's count), the backward's seed included."""
    channels = shape[1]
    x = torch.randn(shape, requires_grad=True)
    weight = torch.ones(channels, requires_grad=True)
    bias = torch.zeros(channels, requires_grad=True)
    running_mean, running_var = torch.zeros(channels), torch.ones(channels)
    grad = torch.randn(shape)
    counts = dispatched_ops(
        lambda _: layer(x, weight, bias, running_mean, running_var).backward(grad), 1, 1
    )
    return round(sum(counts.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="timed calls of each variant")
    parser.add_argument("--before", help="a git revision whose layer to time as well")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {machine()}\nload average at start: {loadavg()}")
    try:
        chosen = variants(args.before)
    except ValueError as error:
        parser.error(str(error))
    per_step = dict.fromkeys(chosen, 0.0)
    for shape in SHAPES:
        medians = time_layer(shape, chosen, args.calls)
        print(f"\n{'x'.join(map(str, shape))}: median µs forward / backward, operators")
        for name, (forward, backward) in medians.items():
            per_step[name] += forward + backward
            count = operators(chosen[name], shape)
            print(f"  {name:8s} {forward * 1e6:7.1f} / {backward * 1e6:7.1f}   {count:3d}")
    print("\nboth layers, forward and backward (a step's worth), against batch:")
    for name, seconds in per_step.items():
        extra = (seconds - per_step["batch"]) * 1e3
        print(f"  {name:8s} {seconds * 1e3:6.2f} ms  ({extra:+.2f} ms)")
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
