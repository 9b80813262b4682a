"""gan.nn.batchnorm_kernels: the compiled passes against sync batch norm's torch path, and how
they are built, cached, chosen and refused.

The arithmetic is compared at one rank (the exchange left out: one rank's sums are the global
ones); tests/unit/test_sync_batchnorm.py runs both paths across two ranks against batch norm
over the global batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gan.nn import batchnorm_kernels, sync_batchnorm
from gan.nn.batchnorm_kernels import CACHE_ENV, KERNELS_ENV, Kernels, kernels
from pipelines.runner import ray_train_environment


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """This module builds into a folder of its own, never the user's cache."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("kernels-cache")))
        yield


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """An empty cache directory and no choice made yet in this process; the process's own
    choice again afterwards."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    monkeypatch.delenv("CC", raising=False)
    kernels.cache_clear()
    yield tmp_path / "cache"
    kernels.cache_clear()


def _built(cache: Path) -> list[Path]:
    return sorted((cache / "_kernels").glob("*")) if (cache / "_kernels").exists() else []


def _compiled_passes() -> Kernels:
    """The compiled passes, whatever this process chose (built here if they cannot be, the
    test fails)."""
    kernels.cache_clear()
    previous = os.environ.get(KERNELS_ENV)
    os.environ[KERNELS_ENV] = "c"
    try:
        passes = kernels()
    finally:
        if previous is None:
            del os.environ[KERNELS_ENV]
        else:
            os.environ[KERNELS_ENV] = previous
        kernels.cache_clear()
    assert passes is not None
    return passes


def _one_rank(tensor: torch.Tensor, group: object = None) -> None:
    """The exchange at one rank: the local sums are the global ones."""


def _on_path(
    compiled: bool,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    momentum: float = 0.1,
) -> torch.Tensor:
    """The layer's forward on the compiled passes or on the torch path (eps 1e-5, the default
    process group)."""
    args = (x, weight, bias, running_mean, running_var, 1e-5, momentum, None)
    if compiled:
        return sync_batchnorm._CompiledSyncBatchNormFn.apply(*args, _compiled_passes())
    return sync_batchnorm._CpuSyncBatchNormFn.apply(*args)


def _layer(
    compiled: bool, x: torch.Tensor, g: torch.Tensor, affine: bool, running: bool
) -> dict[str, torch.Tensor | None]:
    channels, dtype = x.shape[1], x.dtype
    gen = torch.Generator().manual_seed(3)
    weight = (0.5 + torch.rand(channels, generator=gen, dtype=dtype)).requires_grad_(affine)
    bias = torch.randn(channels, generator=gen, dtype=dtype).requires_grad_(affine)
    running_mean = torch.randn(channels, generator=gen, dtype=dtype) if running else None
    running_var = 0.5 + torch.rand(channels, generator=gen, dtype=dtype) if running else None
    x = x.clone().requires_grad_(True)
    w, b = (weight, bias) if affine else (None, None)
    y = _on_path(compiled, x, w, b, running_mean, running_var, momentum=0.3)
    (y * g).sum().backward()
    return {
        "y": y.detach(),
        "x_grad": x.grad,
        "w_grad": weight.grad,
        "b_grad": bias.grad,
        "running_mean": running_mean,
        "running_var": running_var,
    }


@pytest.mark.parametrize(
    "shape, dtype, offset",
    [
        ((8, 3, 5, 5), torch.float64, 0.0),
        ((32, 64, 4, 4), torch.float32, 0.0),  # the default generator's first layer, one rank
        ((8, 3, 5, 5), torch.float32, 20.0),  # |mean| >> std
        ((10, 4), torch.float64, 1.0),
        ((6, 2, 7), torch.float32, 0.0),
        ((4, 2, 3, 3, 3), torch.float64, -2.0),
    ],
)
@pytest.mark.parametrize(
    "affine, running", [(True, True), (False, False), (True, False), (False, True)]
)
def test_compiled_passes_match_the_torch_path(
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    offset: float,
    affine: bool,
    running: bool,
) -> None:
    monkeypatch.setattr(sync_batchnorm, "all_reduce_sum", _one_rank)
    passes = _compiled_passes()
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + offset).to(dtype)
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    assert passes.supports(x)
    torch_path = _layer(False, x, g, affine, running)
    compiled = _layer(True, x, g, affine, running)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    for key, expected in torch_path.items():
        if expected is None:
            assert compiled[key] is None, key
            continue
        actual = compiled[key]
        assert actual is not None and actual.dtype == dtype, key
        torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance, msg=key)


def test_without_an_input_gradient_the_backward_exchanges_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exchanged: list[int] = []
    monkeypatch.setattr(sync_batchnorm, "all_reduce_sum", lambda t, g=None: exchanged.append(1))
    gen = torch.Generator().manual_seed(2)
    x, g = torch.randn(6, 3, 4, 4, generator=gen), torch.randn(6, 3, 4, 4, generator=gen)
    grads = []
    for compiled in (False, True):
        weight, bias = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
        exchanged.clear()
        y = _on_path(compiled, x, weight, bias)
        (y * g).sum().backward()
        assert len(exchanged) == 1  # the forward's only: no rank needs the input gradient
        grads.append((weight.grad, bias.grad))
    for torch_path, compiled in zip(*grads, strict=True):
        torch.testing.assert_close(compiled, torch_path, atol=2e-5, rtol=2e-5)


def test_a_gradient_that_is_not_contiguous(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sync_batchnorm, "all_reduce_sum", _one_rank)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(4, 5, 5, 3, generator=gen, dtype=torch.float64).permute(0, 3, 1, 2)
    assert not g.is_contiguous()
    x_grads = []
    for compiled in (False, True):
        x_in = x.clone().requires_grad_(True)
        _on_path(compiled, x_in, None).backward(g)
        x_grads.append(x_in.grad)
    torch.testing.assert_close(x_grads[1], x_grads[0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("compiled", [True, False])
def test_a_second_derivative_through_either_path_is_refused(
    monkeypatch: pytest.MonkeyPatch, compiled: bool
) -> None:
    # Neither path differentiates its exchange: a second derivative would miss the other
    # ranks' part without a word.
    monkeypatch.setattr(sync_batchnorm, "all_reduce_sum", _one_rank)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    y = _on_path(compiled, x, torch.ones(3))
    (grad,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        grad.sum().backward()


def test_a_global_batch_of_one_value_per_channel_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sync_batchnorm, "all_reduce_sum", _one_rank)
    passes = _compiled_passes()
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        sync_batchnorm._CompiledSyncBatchNormFn.apply(
            torch.randn(1, 3), None, None, running_mean, running_var, 1e-5, 0.1, None, passes
        )
    # Refused before anything moved.
    assert running_mean.eq(0).all() and running_var.eq(1).all()


def test_what_the_passes_take() -> None:
    passes = _compiled_passes()
    x = torch.randn(4, 3, 2, 2)
    assert passes.supports(x, torch.ones(3), None, torch.zeros(3), torch.ones(3))
    assert not passes.supports(x.to(torch.bfloat16))
    assert not passes.supports(x.transpose(2, 3))  # not contiguous
    assert not passes.supports(x.to(memory_format=torch.channels_last))
    assert not passes.supports(x, torch.ones(3, dtype=torch.float64))  # dtypes differ
    # A layer of 4 channels given 3: the C would read past the ends; torch's path says so.
    assert not passes.supports(x, torch.ones(4), None, torch.zeros(4), torch.ones(4))
    assert not passes.supports(torch.randn(3))
    assert not passes.supports(x, torch.ones(3, device="meta"))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert not passes.supports(x)  # torch's own kernels use the threads
    finally:
        torch.set_num_threads(threads)


def test_built_once_then_taken_from_the_cache(fresh: Path) -> None:
    os.environ[KERNELS_ENV] = "c"
    try:
        assert kernels() is not None
        [library] = _built(fresh)  # no temporary file left beside it
        assert library.suffix == ".so"
        built_at = library.stat().st_mtime_ns
        kernels.cache_clear()
        assert kernels() is not None
    finally:
        del os.environ[KERNELS_ENV]
    assert _built(fresh) == [library] and library.stat().st_mtime_ns == built_at


def test_a_cached_library_that_does_not_load_is_built_again(fresh: Path) -> None:
    # As a crash before the data reached the disk leaves it. (A path this process has not
    # loaded yet: the dynamic loader hands back a loaded library by its path alone.)
    library = batchnorm_kernels._library_path(["cc"])
    library.parent.mkdir(parents=True)
    library.write_bytes(b"")
    os.environ[KERNELS_ENV] = "c"
    try:
        assert kernels() is not None
    finally:
        del os.environ[KERNELS_ENV]
    assert _built(fresh) == [library] and library.stat().st_size > 0


def test_a_cached_library_needs_no_compiler(
    fresh: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(KERNELS_ENV, "c")
    assert kernels() is not None
    kernels.cache_clear()
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no cc any more
    assert kernels() is not None  # loaded from the cache
    assert len(_built(fresh)) == 1


def test_cc_may_hold_arguments_and_they_are_part_of_the_key(
    fresh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KERNELS_ENV, "c")
    assert kernels() is not None
    kernels.cache_clear()
    monkeypatch.setenv("CC", "env cc")  # a command with arguments, as "ccache gcc"
    assert kernels() is not None
    assert len(_built(fresh)) == 2  # arguments such as -march=native change the code


def test_a_cc_that_is_not_a_command_line_is_named(
    fresh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KERNELS_ENV, "c")
    monkeypatch.setenv("CC", 'gcc "')
    with pytest.raises(RuntimeError, match="CC='gcc \"' is not a command line"):
        kernels()


def test_what_the_passes_cannot_take_builds_and_warns_nothing(
    fresh: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sync_batchnorm, "all_reduce_sum", _one_rank)
    monkeypatch.setenv("CC", "ganpipe-no-such-compiler")  # a build would warn
    x = torch.randn(4, 3, 2, 2)
    threads = torch.get_num_threads()
    with caplog.at_level(logging.WARNING, logger=batchnorm_kernels.__name__):
        out = sync_batchnorm._apply_synchronized_batch_norm(
            x.to(torch.bfloat16), None, None, None, None, 1e-5, 0.1, None
        )
        torch.set_num_threads(2)
        try:
            sync_batchnorm._apply_synchronized_batch_norm(
                x, None, None, None, None, 1e-5, 0.1, None
            )
        finally:
            torch.set_num_threads(threads)
    assert out.dtype == torch.bfloat16
    assert caplog.records == [] and _built(fresh) == []


def test_auto_without_a_compiler_warns_once_and_takes_the_torch_path(
    fresh: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", "ganpipe-no-such-compiler")
    with caplog.at_level(logging.WARNING, logger=batchnorm_kernels.__name__):
        assert kernels() is None
        assert kernels() is None  # decided once per process
    [record] = caplog.records
    assert "ganpipe-no-such-compiler" in record.getMessage()
    assert f"{KERNELS_ENV}=torch" in record.getMessage()
    assert _built(fresh) == []


def test_c_without_a_compiler_fails_naming_it(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "ganpipe-no-such-compiler")
    monkeypatch.setenv(KERNELS_ENV, "c")
    with pytest.raises(RuntimeError, match=f"{KERNELS_ENV}=c.*ganpipe-no-such-compiler"):
        kernels()


def test_a_failed_build_says_what_the_compiler_said_and_leaves_nothing(
    fresh: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'fatal: this toolchain is broken' >&2\nexit 3\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv(KERNELS_ENV, "c")
    with pytest.raises(RuntimeError, match="exit 3.*this toolchain is broken"):
        kernels()
    assert _built(fresh) == []


def test_a_cache_that_cannot_be_written_is_named(
    fresh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh.parent.joinpath("a-file").write_text("")
    monkeypatch.setenv(CACHE_ENV, str(fresh.parent / "a-file"))  # no folder can be made in it
    monkeypatch.setenv(KERNELS_ENV, "c")
    with pytest.raises(RuntimeError, match=f"cannot write to .*a-file.*set {CACHE_ENV}"):
        kernels()


def test_torch_builds_nothing_and_other_choices_are_refused(
    fresh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KERNELS_ENV, "torch")
    assert kernels() is None
    assert _built(fresh) == []
    monkeypatch.setenv(KERNELS_ENV, "fast")
    kernels.cache_clear()
    with pytest.raises(ValueError, match=f"{KERNELS_ENV}='fast'.*auto, c, torch"):
        kernels()


def test_the_workers_see_the_choice_and_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KERNELS_ENV, "torch")
    monkeypatch.setenv(CACHE_ENV, "/shared/cache")
    settings = ray_train_environment()
    assert settings[KERNELS_ENV] == "torch" and settings[CACHE_ENV] == "/shared/cache"
    monkeypatch.delenv(KERNELS_ENV)
    assert KERNELS_ENV not in ray_train_environment()
