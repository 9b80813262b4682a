"""Synchronized batch norm that also works on CPU (gloo).

``torch.nn.SyncBatchNorm`` refuses CPU tensors, yet data-parallel GAN training on CPU workers
(gloo backend) needs discriminator/generator batch statistics over the *global* batch, or the
result depends on how the batch happens to be split across workers. :class:`SyncBatchNorm` keeps
torch's parameters, buffers, ``state_dict`` keys and ``process_group`` argument, delegates to
torch on CUDA (NCCL, fused kernels), and on CPU runs its own exact global batch norm with one
all-reduce in the forward pass and one in the backward pass (gan.nn.stats_exchange: direct TCP
connections between the ranks, far faster than gloo for these few hundred numbers). Its CPU
arithmetic runs in gan.nn.batchnorm_kernels' compiled passes where the system's C compiler
builds them, and in torch operators otherwise. It is accepted by ``DistributedDataParallel`` on
CPU, which rejects torch's class there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from gan.nn.batchnorm_kernels import Kernels, kernels
from gan.nn.stats_exchange import all_reduce_sum

__all__ = ["SyncBatchNorm", "convert_to_sync_batchnorm"]


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for statistics: at least float32, so half/bfloat16 sums do not lose precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_global_count(count: float) -> None:
    """Batch norm's own refusal of a batch of one value per channel, for the global batch."""
    if count <= 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got a global batch of "
            f"{int(count)} value(s) per channel across all ranks"
        )


class _CpuSyncBatchNormFn(torch.autograd.Function):
    """Exact batch norm over the batch concatenated across all ranks of ``process_group``.

    Forward all-reduces one float64 tensor ``[sum(x), sum(x*x), count]`` (per channel, count
    scalar), so ranks may hold different numbers of samples (even zero). Backward all-reduces
    one float64 tensor ``[sum(dy), sum(dy * x_hat)]`` and returns the exact input gradient of
    global batch norm. :class:`_CompiledSyncBatchNormFn` sends the same messages, so ranks may
    take either path.

    The elementwise passes are torch's fused batch-norm kernels run in inference mode with the
    global statistics: ``F.batch_norm`` normalizes, and ``native_batch_norm_backward`` forms
    ``dy * scale``, ``sum(dy)`` and ``sum(dy * x_hat)`` in one pass. At the small activations of
    a GAN generator these layers are bound by the number of ops, not by arithmetic.

    Every rank must run backward through this op whenever any rank does (as with
    ``torch.nn.SyncBatchNorm``), otherwise the backward ``all_reduce`` blocks, or takes another
    exchange's message (DDP's gradients share the connections).

    The backward is not differentiable again (on either path): a gradient taken through it
    with ``create_graph=True`` raises, where it would otherwise miss the other ranks' part.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        eps: float,
        momentum: float,
        process_group: Any,
    ) -> Tensor:
        sdt = _stats_dtype(input.dtype)
        x = input.to(sdt)
        channels = x.shape[1]
        local_count = x.numel() // channels

        # sum(x) and sum(x*x) are formed in float64 from the local mean and centered sum of
        # squares: a plain float32 sum(x*x) loses digits to cancellation in
        # sum(x*x)/n - mean**2 whenever |mean| >> std. batch_norm_update_stats is torch's
        # batch-norm statistics kernel (mean, biased variance); torch.var_mean over the same
        # dims is 3 to 5 times slower on CPU.
        acc = torch.float64
        if local_count > 0:
            local_mean, local_var = torch.batch_norm_update_stats(x, None, None, 0.0)
            local_mean = local_mean.to(acc)
            local_sums = torch.cat([local_mean, local_var.to(acc).addcmul_(local_mean, local_mean)])
            local_sums.mul_(local_count)
        else:  # still takes part in the collective
            local_sums = torch.zeros(2 * channels, dtype=acc, device=x.device)
        count_local = torch.full((1,), float(local_count), dtype=acc, device=x.device)
        combined = torch.cat([local_sums, count_local])
        all_reduce_sum(combined, process_group)

        count = float(combined[-1].item())
        _check_global_count(count)
        combined = combined[:-1].div_(count)
        mean64 = combined[:channels]
        # Biased variance for normalization, as BatchNorm does in training mode.
        var64 = combined[channels:].addcmul_(mean64, mean64, value=-1.0).clamp_min_(0.0)

        if running_mean is not None and running_var is not None:
            unbiased_var = var64 * (count / (count - 1.0))
            running_mean.mul_(1.0 - momentum).add_(mean64.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1.0 - momentum).add_(
                unbiased_var.to(running_var.dtype), alpha=momentum
            )

        mean, var = mean64.to(sdt), var64.to(sdt)
        w = weight.to(sdt) if weight is not None else None
        b = bias.to(sdt) if bias is not None else None
        # torch's CPU kernels divide by the batch size: an empty rank skips them.
        out = F.batch_norm(x, mean, var, w, b, False, 0.0, eps) if local_count else x.clone()

        ctx.save_for_backward(input, weight, mean, var)
        ctx.eps = eps
        ctx.count = count
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.process_group = process_group
        return out.to(input.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        input, weight, mean, var = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        sdt = mean.dtype
        x, g = input.to(sdt), grad_output.to(sdt)
        w = weight.to(sdt) if weight is not None else None

        # Inference-mode backward with the global statistics: dy * invstd * weight, and the
        # local sums sum(dy * x_hat) and sum(dy), which are also the local weight/bias gradients.
        if input.numel():
            dy_scaled, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                g, x, w, mean, var, None, None, False, ctx.eps, [need_input, True, True]
            )
        else:  # torch's CPU kernels divide by the batch size; an empty rank has nothing to sum
            dy_scaled, sum_dy_xhat, sum_dy = (
                g.clone(),
                torch.zeros_like(mean),
                torch.zeros_like(mean),
            )

        grad_input = grad_weight = grad_bias = None
        if need_weight and weight is not None:
            grad_weight = sum_dy_xhat.to(weight.dtype)
        if need_bias and ctx.has_bias:
            grad_bias = sum_dy.to(ctx.bias_dtype)

        if need_input:
            channels = input.shape[1]
            # float64, as the compiled passes send it: ranks on either path exchange alike.
            combined = torch.cat([sum_dy, sum_dy_xhat]).to(torch.float64)
            all_reduce_sum(combined, ctx.process_group)
            combined = combined.div_(ctx.count).to(sdt)
            mean_dy, mean_dy_xhat = combined[:channels], combined[channels:]
            # dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat)), scale = invstd * weight;
            # the last two terms are one more inference-mode batch norm of x.
            invstd = torch.rsqrt(var + ctx.eps)
            scale = invstd if w is None else invstd * w
            correction = F.batch_norm(
                x, mean, var, -scale * mean_dy_xhat, -scale * mean_dy, False, 0.0, ctx.eps
            )
            grad_in = dy_scaled.add_(correction)
            grad_input = grad_in.to(input.dtype)

        return grad_input, grad_weight, grad_bias, None, None, None, None, None


class _CompiledSyncBatchNormFn(torch.autograd.Function):
    """:class:`_CpuSyncBatchNormFn`'s arithmetic in gan.nn.batchnorm_kernels' compiled passes:
    three calls forward and two backward around the same exchanges, where the torch path makes
    about fifty small operators. Takes what :meth:`Kernels.supports` accepts (float32 or
    float64, one dtype, contiguous)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        eps: float,
        momentum: float,
        process_group: Any,
        passes: Kernels,
    ) -> Tensor:
        sums = passes.local_sums(input)
        all_reduce_sum(sums, process_group)
        count, stats = passes.finish_stats(sums, eps, momentum, running_mean, running_var, input)
        _check_global_count(count)
        ctx.save_for_backward(input, weight, stats)
        ctx.count = count
        ctx.has_bias = bias is not None
        ctx.process_group = process_group
        ctx.passes = passes
        return passes.normalize(input, stats, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        input, weight, stats = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        passes: Kernels = ctx.passes
        grad_output = grad_output.contiguous()
        sums, grad_weight, grad_bias = passes.backward_sums(
            grad_output,
            input,
            stats,
            need_weight and weight is not None,
            need_bias and ctx.has_bias,
        )
        grad_input = None
        if need_input:
            all_reduce_sum(sums, ctx.process_group)
            grad_input = passes.backward_input(grad_output, input, stats, weight, sums, ctx.count)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def _synchronized_batch_norm(*args: Any) -> Tensor:
    """Global batch norm of CPU ``input``: the compiled passes where they take it (see
    gan.nn.batchnorm_kernels), else the torch path; outside any ``torch.compile`` graph either
    way, so that a compiled model runs the layers around it compiled and this one as it is
    (sockets, a build and in-place buffer updates cannot be traced). ``args`` as the autograd
    functions take them: input, weight, bias, running mean and variance, eps, momentum, group."""
    if torch.compiler.is_compiling():
        # Not a decorator: torch.compiler.disable imports torch._dynamo, which would add a
        # second of start-up to every process that imports the models.
        return torch.compiler.disable(_apply_synchronized_batch_norm)(*args)
    return _apply_synchronized_batch_norm(*args)


def _apply_synchronized_batch_norm(*args: Any) -> Tensor:
    # What the compiled passes cannot take is settled before they are built or warned about.
    if Kernels.supports(*args[:5]) and (passes := kernels()) is not None:
        return _CompiledSyncBatchNormFn.apply(*args, passes)
    return _CpuSyncBatchNormFn.apply(*args)


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for ``torch.nn.SyncBatchNorm`` that also synchronizes CPU tensors (gloo backend).

    Same constructor (incl. ``process_group``), parameters, buffers and ``state_dict`` keys as
    ``torch.nn.SyncBatchNorm``; normalizes over every dim except the channel dim 1, so it serves
    (N, C), (N, C, L), (N, C, H, W) and (N, C, D, H, W) inputs alike.

    It deliberately does *not* subclass ``torch.nn.SyncBatchNorm``: ``DistributedDataParallel``
    refuses any CPU module containing an instance of that class ("SyncBatchNorm layers only work
    with GPU modules"), which would rule out the CPU data-parallel training this layer exists for.

    * eval mode (with running stats), or no initialized process group / world size 1: exactly
      ``BatchNorm`` (``F.batch_norm``), including ``momentum=None`` cumulative averaging.
    * non-CPU (e.g. CUDA) input: torch's own ``torch.nn.SyncBatchNorm.forward`` (NCCL).
    * CPU, training, world size > 1: statistics over the global batch (ranks may hold different
      batch sizes), computed in float32 at least; the running variance uses the unbiased global
      variance, exactly as ``BatchNorm`` over the concatenated batch would.

    Gradient convention (same as ``torch.nn.SyncBatchNorm``): on each rank the input gradient is
    the gradient of the *sum over ranks* of the per-rank losses, while the weight/bias gradients
    are *local* sums over the rank's own samples, so summing them over ranks gives the weight/bias
    gradient of batch norm over the global batch. DDP then averages every gradient over ranks, so
    the final gradient is that of the mean over ranks of the per-rank losses; with a per-rank loss
    that is a mean over its local batch and equal local batch sizes, that equals the gradient of
    the mean loss over the global batch.

    Every rank must call forward (and backward) on this layer the same number of times, as with
    ``torch.nn.SyncBatchNorm``; the collectives otherwise block until the group's timeout.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"SyncBatchNorm expects input of shape (N, C, *) with at least 2 dims, "
                f"got a {input.dim()}D tensor of shape {tuple(input.shape)}"
            )

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input``; see the class docstring for which implementation runs."""
        self._check_input_dim(input)
        if input.device.type != "cpu":
            # torch's implementation handles CUDA/XPU/HPU, both synced and not; it only needs the
            # attributes this class shares with torch.nn.SyncBatchNorm.
            return nn.SyncBatchNorm.forward(self, input)  # type: ignore[arg-type]
        self._check_non_zero_input_channels(input)

        # Mirrors torch.nn.modules.batchnorm._BatchNorm.forward.
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
            else:
                exponential_average_factor = self.momentum

        if self.training:
            bn_training = True
        else:
            bn_training = self.running_mean is None and self.running_var is None

        use_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_buffers else None
        running_var = self.running_var if use_buffers else None

        process_group = None
        need_sync = bn_training and self.training and dist.is_available() and dist.is_initialized()
        if need_sync:
            process_group = self.process_group or dist.group.WORLD
            need_sync = dist.get_world_size(process_group) > 1

        if not need_sync:
            return F.batch_norm(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                bn_training,
                exponential_average_factor,
                self.eps,
            )
        return _synchronized_batch_norm(
            input,
            self.weight,
            self.bias,
            running_mean,
            running_var,
            self.eps,
            exponential_average_factor,
            process_group,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Same as torch's classmethod of that name, but produces this class."""
        return convert_to_sync_batchnorm(module, process_group)


def convert_to_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every ``BatchNorm1d/2d/3d`` (``_BatchNorm``) in ``module`` by :class:`SyncBatchNorm`.

    Mirrors ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (which always produces torch's class,
    unusable on CPU and rejected by CPU DDP): the new layers reuse the original parameter and
    buffer tensors and copy ``eps``, ``momentum``, ``affine``, ``track_running_stats`` and the
    training flag, so the ``state_dict`` keys and values are unchanged. Returns ``module``
    converted in place, or a new layer if ``module`` itself is a batch norm layer.
    """
    module_output = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        module_output = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
        )
        if module.affine:
            with torch.no_grad():
                module_output.weight = module.weight
                module_output.bias = module.bias
        module_output.running_mean = module.running_mean
        module_output.running_var = module.running_var
        module_output.num_batches_tracked = module.num_batches_tracked
        module_output.training = module.training
        if hasattr(module, "qconfig"):
            module_output.qconfig = module.qconfig
    for name, child in module.named_children():
        module_output.add_module(name, convert_to_sync_batchnorm(child, process_group))
    return module_output
