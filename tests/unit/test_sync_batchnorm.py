"""gan.nn.sync_batchnorm against plain BatchNorm over the global batch.

The distributed cases run two gloo processes once per module (spawning costs a torch import per
process); each scenario splits a fixed global batch between the two ranks, the workers save their
results with ``torch.save`` and the parent compares them with single-process ``nn.BatchNorm*d``.
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from spawned_ranks import run_ranks
from torch import nn

from gan.nn import sync_batchnorm
from gan.nn.batchnorm_kernels import KERNELS_ENV, Kernels
from gan.nn.stats_exchange import EXCHANGE_ENV, EXCHANGES
from gan.nn.sync_batchnorm import SyncBatchNorm, convert_to_sync_batchnorm

WORLD_SIZE = 2
# float64 makes the comparison independent of float32 summation order (a weight gradient sums
# hundreds of products with cancellation); the "float32" scenario checks that path separately.
ATOL = 1e-9
RTOL = 1e-9
ATOL_FLOAT32 = 1e-5

# name -> global input shape (N first), split of N over the two ranks, training steps, momentum,
# input dtype (float64 unless given). Channels are dim 1 throughout.
SCENARIOS: dict[str, dict[str, Any]] = {
    "equal": dict(shape=(8, 3, 5, 5), splits=(4, 4), steps=1, momentum=0.1),
    "unequal": dict(shape=(8, 3, 5, 5), splits=(3, 5), steps=1, momentum=0.1),
    "two_steps": dict(shape=(8, 3, 5, 5), splits=(4, 4), steps=2, momentum=0.1),
    "two_steps_cumulative": dict(shape=(8, 3, 5, 5), splits=(5, 3), steps=2, momentum=None),
    "input_2d": dict(shape=(10, 4), splits=(4, 6), steps=1, momentum=0.1),
    "input_3d": dict(shape=(6, 2, 7), splits=(2, 4), steps=1, momentum=0.1),
    "input_5d": dict(shape=(4, 2, 3, 3, 3), splits=(1, 3), steps=1, momentum=0.1),
    "empty_rank": dict(shape=(6, 3, 4, 4), splits=(0, 6), steps=1, momentum=0.1),
    "float32": dict(shape=(8, 3, 5, 5), splits=(3, 5), steps=2, momentum=0.1, dtype="float32"),
    # |mean| >> std: catches variance computed as a float32 sum(x*x)/n - mean**2.
    "float32_offset": dict(
        shape=(8, 3, 5, 5), splits=(3, 5), steps=1, momentum=0.1, dtype="float32", offset=20.0
    ),
    "bfloat16": dict(shape=(8, 3, 5, 5), splits=(4, 4), steps=1, momentum=0.1, dtype="bfloat16"),
    "eval": dict(shape=(8, 3, 5, 5), splits=(3, 5), steps=1, momentum=0.1, eval=True),
    # Under torch.compile (perf.compile): the exchange must run outside the compiled graph. (A
    # name that sorts last: the data's seed is the name's place in sorted order.)
    "with_compile": dict(shape=(8, 3, 5, 5), splits=(3, 5), steps=2, momentum=0.1, compiled=True),
    # Conv -> SyncBatchNorm -> ReLU -> Conv wrapped in DDP on CPU; per-rank loss = local mean.
    "ddp": dict(shape=(8, 3, 7, 7), splits=(4, 4), steps=1, momentum=0.1, ddp=True),
}


def _input_dtype(name: str) -> torch.dtype:
    return getattr(torch, SCENARIOS[name].get("dtype", "float64"))


def _param_dtype(name: str) -> torch.dtype:
    """float64 for float64 inputs; float32 otherwise (bfloat16 inputs keep float32 parameters)."""
    return torch.float64 if _input_dtype(name) == torch.float64 else torch.float32


def _scenario_data(name: str) -> dict[str, Any]:
    """Deterministic global inputs, upstream grads and BN parameters for scenario ``name``."""
    spec = SCENARIOS[name]
    shape = spec["shape"]
    channels = shape[1]
    gen = torch.Generator().manual_seed(1234 + sorted(SCENARIOS).index(name))
    bshape = (1, channels) + (1,) * (len(shape) - 2)
    # Non-trivial per-channel mean and scale, so normalization actually does something.
    f64 = torch.float64
    mean = torch.linspace(-3.0, 3.0, channels, dtype=f64).view(bshape) + spec.get("offset", 0.0)
    scale = torch.linspace(0.5, 2.0, channels, dtype=f64).view(bshape)
    xs, grads = [], []
    for _ in range(spec["steps"]):
        x = torch.randn(shape, generator=gen, dtype=f64) * scale + mean
        xs.append(x.to(_input_dtype(name)))
        grads.append((torch.randn(shape, generator=gen, dtype=f64) + 0.3).to(_param_dtype(name)))
    return {
        "xs": xs,
        "grads": grads,
        "weight": 0.5 + torch.rand(channels, generator=gen),
        "bias": torch.randn(channels, generator=gen),
        "running_mean": torch.randn(channels, generator=gen),
        "running_var": 0.5 + torch.rand(channels, generator=gen),
    }


def _bn_class(ndim: int) -> type[nn.Module]:
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[ndim]


def _run_steps(module: nn.Module, xs: list[torch.Tensor], grads: list[torch.Tensor]) -> dict:
    """Forward + backward of ``sum(y * grad)`` per step; record outputs and gradients."""
    out: dict[str, list] = {"y": [], "x_grad": [], "w_grad": [], "b_grad": []}
    for x, g in zip(xs, grads, strict=True):
        x = x.clone().requires_grad_(True)
        y = module(x)
        (y.to(g.dtype) * g).sum().backward()
        out["y"].append(y.detach().clone())
        out["x_grad"].append(x.grad.clone())
        out["w_grad"].append(module.weight.grad.clone())
        out["b_grad"].append(module.bias.grad.clone())
        module.zero_grad(set_to_none=True)
    return out


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        "running_mean": module.running_mean.clone(),
        "running_var": module.running_var.clone(),
        "num_batches_tracked": module.num_batches_tracked.clone(),
    }


def _make_module(cls: type[nn.Module], name: str, data: dict[str, Any]) -> nn.Module:
    spec = SCENARIOS[name]
    module = cls(spec["shape"][1], momentum=spec["momentum"]).to(_param_dtype(name))
    with torch.no_grad():
        module.weight.copy_(data["weight"])
        module.bias.copy_(data["bias"])
        if spec.get("eval"):
            module.running_mean.copy_(data["running_mean"])
            module.running_var.copy_(data["running_var"])
    return module


def _ddp_model() -> nn.Sequential:
    """Small float64 conv net with a plain BatchNorm2d, initialized identically everywhere."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))
    return model.double()


def _ddp_grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of the mean loss over ``x`` (one step), plus the BN running stats."""
    model(x).pow(2).mean().backward()
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    result = {k: p.grad.clone() for k, p in inner.named_parameters()}
    result.update(_buffers(inner[1]))
    return result


def _run_rank_scenario(name: str, rank: int) -> dict[str, Any]:
    """What one rank computes for scenario ``name`` with its slice of the global batch."""
    spec = SCENARIOS[name]
    data = _scenario_data(name)
    start = sum(spec["splits"][:rank])
    stop = start + spec["splits"][rank]
    xs = [x[start:stop] for x in data["xs"]]
    if spec.get("ddp"):
        model = nn.parallel.DistributedDataParallel(convert_to_sync_batchnorm(_ddp_model()))
        return _ddp_grads(model, xs[0])
    grads = [g[start:stop] for g in data["grads"]]
    module = _make_module(SyncBatchNorm, name, data)
    if spec.get("compiled"):
        module = torch.compile(module)

    calls: list[str] = []
    dtypes: set[str] = set()
    process_group_calls: list[str] = []
    real_exchange = sync_batchnorm.all_reduce_sum
    real_all_reduce = dist.all_reduce

    def counting_exchange(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if spec.get("eval"):
            raise AssertionError("eval mode must not communicate")
        calls.append(f"{tuple(tensor.shape)}")
        dtypes.add(str(tensor.dtype))
        return real_exchange(tensor, *args, **kwargs)

    def counting_all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        process_group_calls.append(f"{tuple(tensor.shape)}")
        return real_all_reduce(tensor, *args, **kwargs)

    compiled_forwards: list[str] = []
    real_local_sums = Kernels.local_sums

    def counting_local_sums(self: Kernels, x: torch.Tensor) -> torch.Tensor:
        compiled_forwards.append(f"{tuple(x.shape)}")
        return real_local_sums(self, x)

    sync_batchnorm.all_reduce_sum = counting_exchange
    dist.all_reduce = counting_all_reduce
    Kernels.local_sums = counting_local_sums  # type: ignore[method-assign]
    try:
        if spec.get("eval"):
            module.eval()
            with torch.no_grad():
                result: dict[str, Any] = {"y": [module(x) for x in xs]}
        else:
            result = _run_steps(module, xs, grads)
    finally:
        sync_batchnorm.all_reduce_sum = real_exchange
        dist.all_reduce = real_all_reduce
        Kernels.local_sums = real_local_sums  # type: ignore[method-assign]
    result.update(_buffers(module))
    result["all_reduce_calls"] = calls
    result["exchanged_dtypes"] = dtypes
    result["compiled_forwards"] = compiled_forwards
    result["process_group_all_reduces"] = process_group_calls
    return result


def _worker(rank: int, init_file: str, out_dir: str, exchange: str, passes: str) -> None:
    """Spawned process: join the gloo group, run every scenario, save results to ``out_dir``."""
    torch.set_num_threads(1)
    os.environ[EXCHANGE_ENV] = exchange
    os.environ[KERNELS_ENV] = _rank_passes(passes, rank)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=WORLD_SIZE,
            timeout=timedelta(seconds=60),
        )
        try:
            results = {name: _run_rank_scenario(name, rank) for name in SCENARIOS}
        finally:
            dist.destroy_process_group()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise


# (exchange, CPU path): each exchange with the compiled passes and with the torch path, one of
# them with rank 0 on the compiled passes and rank 1 on torch's (a node without a compiler).
RUNS = [("tcp", "c"), ("process_group", "c"), ("tcp", "mixed"), ("process_group", "torch")]
assert {exchange for exchange, _ in RUNS} == set(EXCHANGES)


def _rank_passes(passes: str, rank: int) -> str:
    """The rank's GANPIPE_SYNC_BN_KERNELS in a run of ``passes``."""
    if passes == "mixed":
        return "c" if rank == 0 else "torch"
    return passes


@pytest.fixture(scope="module", params=RUNS, ids=["/".join(run) for run in RUNS])
def dist_results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    """Run all scenarios once in two gloo processes per exchange (the statistics over direct TCP
    connections, or through the process group) and CPU path (gan.nn.batchnorm_kernels' compiled
    passes, which must build, or the torch path); return each rank's results."""
    exchange, passes = request.param
    tmp = tmp_path_factory.mktemp("sync_bn")
    results = run_ranks(_worker, WORLD_SIZE, tmp, exchange, passes)
    for r in results:
        r["exchange"], r["passes"] = exchange, passes
    return results


def _reference(name: str) -> dict[str, Any]:
    """Single-process ``nn.BatchNorm*d`` over the whole global batch."""
    spec = SCENARIOS[name]
    data = _scenario_data(name)
    module = _make_module(_bn_class(len(spec["shape"])), name, data)
    xs = data["xs"]
    if spec.get("dtype") == "bfloat16":
        # Same (bf16-rounded) values, normalized in float32.
        xs = [x.float() for x in xs]
    if spec.get("eval"):
        module.eval()
        with torch.no_grad():
            result: dict[str, Any] = {"y": [module(x) for x in xs]}
    else:
        result = _run_steps(module, xs, data["grads"])
    result.update(_buffers(module))
    return result


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=min(atol, RTOL))


def _check_training(name: str, results: list[dict[str, Any]], atol: float = ATOL) -> None:
    ref = _reference(name)
    steps = SCENARIOS[name]["steps"]
    rtol = max(atol, RTOL)
    for step in range(steps):
        y = torch.cat([r["y"][step] for r in results])
        assert y.dtype == ref["y"][step].dtype == _input_dtype(name)
        _close(y, ref["y"][step], atol=atol)
        _close(torch.cat([r["x_grad"][step] for r in results]), ref["x_grad"][step], atol=atol)
        # Local weight/bias grads: their sum over ranks is the global-batch gradient. These sum
        # hundreds of terms, so in float32 they are also compared relative to their size.
        w_grad = sum(r["w_grad"][step] for r in results)
        b_grad = sum(r["b_grad"][step] for r in results)
        torch.testing.assert_close(w_grad, ref["w_grad"][step], atol=atol, rtol=rtol)
        torch.testing.assert_close(b_grad, ref["b_grad"][step], atol=atol, rtol=rtol)
    for r in results:
        _close(r["running_mean"], ref["running_mean"], atol=atol)
        _close(r["running_var"], ref["running_var"], atol=atol)
        assert r["num_batches_tracked"].item() == ref["num_batches_tracked"].item() == steps
        # Exactly one all_reduce in forward and one in backward per step.
        assert len(r["all_reduce_calls"]) == 2 * steps, r["all_reduce_calls"]


@pytest.mark.parametrize(
    "name",
    [
        "equal", "unequal", "two_steps", "two_steps_cumulative",
        "input_2d", "input_3d", "input_5d", "with_compile",
    ],
)  # fmt: skip
def test_distributed_matches_global_batchnorm(
    name: str, dist_results: list[dict[str, Any]]
) -> None:
    _check_training(name, [r[name] for r in dist_results])


@pytest.mark.parametrize("name", ["float32", "float32_offset"])
def test_distributed_float32(name: str, dist_results: list[dict[str, Any]]) -> None:
    _check_training(name, [r[name] for r in dist_results], atol=ATOL_FLOAT32)


def test_distributed_data_parallel_matches_global_mean_loss(
    dist_results: list[dict[str, Any]],
) -> None:
    # DDP accepts the layer on CPU, and averaging the per-rank (local-mean) losses' gradients
    # gives the gradient of the mean loss over the global batch (equal local batch sizes).
    expected = _ddp_grads(_ddp_model(), _scenario_data("ddp")["xs"][0])
    for r in dist_results:
        assert r["ddp"].keys() == expected.keys()
        for key, value in expected.items():
            _close(r["ddp"][key], value)


def test_distributed_one_all_reduce_each_way(dist_results: list[dict[str, Any]]) -> None:
    # [sum, sumsq, count] forward, [sum(dy), sum(dy * x_hat)] backward, C = 3.
    for r in dist_results:
        assert r["equal"]["all_reduce_calls"] == ["(7,)", "(6,)"]
        # Only the process-group exchange goes through gloo's all_reduce.
        through_gloo = ["(7,)", "(6,)"] if r["exchange"] == "process_group" else []
        assert r["equal"]["process_group_all_reduces"] == through_gloo


def test_distributed_messages_are_float64_on_either_path(
    dist_results: list[dict[str, Any]],
) -> None:
    # What lets a rank on the torch path and one on the compiled passes sum together.
    for r in dist_results:
        for name, spec in SCENARIOS.items():
            if not spec.get("ddp") and not spec.get("eval"):
                assert r[name]["exchanged_dtypes"] == {"torch.float64"}, name


def test_distributed_path_taken(dist_results: list[dict[str, Any]]) -> None:
    # The compiled passes take float32 and float64 (also under torch.compile), never bfloat16,
    # and nothing when the torch path is chosen. (The DDP scenario records gradients only.)
    for rank, r in enumerate(dist_results):
        for name, spec in SCENARIOS.items():
            if spec.get("ddp"):
                continue
            chosen = _rank_passes(r["passes"], rank) == "c"
            compiled = chosen and spec.get("dtype") != "bfloat16"
            forwards = 0 if spec.get("eval") else spec["steps"]
            assert len(r[name]["compiled_forwards"]) == (forwards if compiled else 0), name


def test_distributed_rank_with_empty_batch(dist_results: list[dict[str, Any]]) -> None:
    results = [r["empty_rank"] for r in dist_results]
    assert results[0]["y"][0].shape[0] == 0
    _check_training("empty_rank", results)


def test_distributed_bfloat16_stats_in_float32(dist_results: list[dict[str, Any]]) -> None:
    results = [r["bfloat16"] for r in dist_results]
    ref = _reference("bfloat16")
    y = torch.cat([r["y"][0] for r in results])
    assert y.dtype == torch.bfloat16
    assert results[0]["x_grad"][0].dtype == torch.bfloat16
    _close(y.float(), ref["y"][0], atol=3e-2)
    _close(torch.cat([r["x_grad"][0] for r in results]).float(), ref["x_grad"][0], atol=3e-2)
    # The upstream gradient reaches the layer rounded to bfloat16 (the dtype of y).
    torch.testing.assert_close(
        sum(r["w_grad"][0] for r in results), ref["w_grad"][0], atol=1e-2, rtol=1e-2
    )
    for r in results:
        # Statistics are accumulated in float32 from the same values, so these stay tight.
        assert r["running_mean"].dtype == torch.float32
        _close(r["running_mean"], ref["running_mean"], atol=ATOL_FLOAT32)
        _close(r["running_var"], ref["running_var"], atol=ATOL_FLOAT32)


def test_distributed_eval_uses_running_stats(dist_results: list[dict[str, Any]]) -> None:
    results = [r["eval"] for r in dist_results]
    ref = _reference("eval")
    _close(torch.cat([r["y"][0] for r in results]), ref["y"][0])
    data = _scenario_data("eval")
    for r in results:
        assert r["all_reduce_calls"] == []
        for key in ("running_mean", "running_var"):
            expected = data[key].to(r[key].dtype)
            torch.testing.assert_close(r[key], expected, atol=0, rtol=0)
        assert r["num_batches_tracked"].item() == 0


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track_running_stats", [True, False])
def test_single_process_is_batchnorm2d(
    momentum: float | None, affine: bool, track_running_stats: bool
) -> None:
    assert not (dist.is_available() and dist.is_initialized())
    gen = torch.Generator().manual_seed(7)
    kwargs = dict(momentum=momentum, affine=affine, track_running_stats=track_running_stats)
    ours, ref = SyncBatchNorm(3, **kwargs), nn.BatchNorm2d(3, **kwargs)
    if affine:
        with torch.no_grad():
            for m in (ours, ref):
                m.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
                m.bias.copy_(torch.tensor([0.1, -0.7, 2.0]))
    assert ours.state_dict().keys() == ref.state_dict().keys()

    for step in range(3):
        x = torch.randn(4, 3, 5, 5, generator=gen) * 2.0 + step
        g = torch.randn(4, 3, 5, 5, generator=gen)
        xo, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        yo, yr = ours(xo), ref(xr)
        (yo * g).sum().backward()
        (yr * g).sum().backward()
        torch.testing.assert_close(yo, yr, atol=0, rtol=0)
        torch.testing.assert_close(xo.grad, xr.grad, atol=0, rtol=0)
        if affine:
            torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=0, rtol=0)
            torch.testing.assert_close(ours.bias.grad, ref.bias.grad, atol=0, rtol=0)
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, atol=0, rtol=0)

    ours.eval()
    ref.eval()
    x = torch.randn(2, 3, 5, 5, generator=gen) + 1.0
    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, atol=0, rtol=0)


def test_rejects_1d_input() -> None:
    with pytest.raises(ValueError, match="at least 2 dims"):
        SyncBatchNorm(3)(torch.randn(3))


def _bn_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4, eps=1e-3, momentum=0.2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Sequential(nn.Linear(4 * 3 * 3, 5), nn.BatchNorm1d(5, momentum=None)),
        nn.Unflatten(1, (5, 1, 1, 1)),
        nn.BatchNorm3d(5, affine=False),
    )


def test_convert_to_sync_batchnorm_preserves_state() -> None:
    torch.manual_seed(0)
    model = _bn_model()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-1.0, 1.0)
    model.train()
    for _ in range(2):  # non-trivial running stats and num_batches_tracked
        model(torch.randn(6, 2, 5, 5))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    originals = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    x = torch.randn(3, 2, 5, 5)
    expected = model(x)

    converted = convert_to_sync_batchnorm(model)

    bns = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == len(originals) == 3
    assert all(type(m) is SyncBatchNorm for m in bns)
    for new, old in zip(bns, originals, strict=True):
        assert (new.num_features, new.eps) == (old.num_features, old.eps)
        assert new.momentum == old.momentum
        assert (new.affine, new.track_running_stats) == (old.affine, old.track_running_stats)
        assert new.training == old.training
    after = converted.state_dict()
    assert list(after.keys()) == list(before.keys())
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=0, rtol=0)
    torch.testing.assert_close(converted(x), expected, atol=0, rtol=0)


def test_convert_single_layer_and_classmethod() -> None:
    bn = nn.BatchNorm2d(4, momentum=None)
    layer = convert_to_sync_batchnorm(bn, process_group=None)
    assert type(layer) is SyncBatchNorm and layer is not bn
    assert layer.momentum is None and layer.weight is bn.weight
    # torch's classmethod would produce torch.nn.SyncBatchNorm (CPU-incapable); ours does not.
    model = SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(2)))
    assert type(model[0]) is SyncBatchNorm
    # Also converts torch's own SyncBatchNorm, e.g. from a model built for CUDA.
    assert type(convert_to_sync_batchnorm(nn.SyncBatchNorm(2))) is SyncBatchNorm
