"""Synchronized batch norm's CPU passes as compiled C (batchnorm_kernels.c), built on first use.

The torch path of gan.nn.sync_batchnorm issues about fifty small operators per layer's forward
and backward; right after a convolution each costs several times its back-to-back time, and
together they were most of what synchronized batch norm cost a CPU step beyond plain batch norm
(docs/benchmarks.md, "Fourteenth session"). The C file does the same arithmetic in three calls
forward and two backward. It has no Python or torch API, so any C compiler builds it in a
fraction of a second, the way ``torch.compile`` builds its CPU kernels with the system's
compiler.

The library is built once per machine into ``_kernels`` under ``$GANPIPE_CACHE_DIR`` (default
``$XDG_CACHE_HOME/ganpipe``, else ``~/.cache/ganpipe``), under a name that holds a hash of the
source and the flags, written to a temporary file and renamed: processes that build at once
each get a whole library. :data:`KERNELS_ENV` chooses:

* ``auto`` (default): the compiled passes where they build, else the torch path, with one
  warning that says why and what to install;
* ``c``: the compiled passes, or a RuntimeError if they cannot be built;
* ``torch``: always the torch path.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from gan.nn.switches import environment_choice

__all__ = ["CACHE_ENV", "CHOICES", "KERNELS_ENV", "Kernels", "kernels"]

KERNELS_ENV = "GANPIPE_SYNC_BN_KERNELS"
CHOICES = ("auto", "c", "torch")
CACHE_ENV = "GANPIPE_CACHE_DIR"
SOURCE = Path(__file__).with_name("batchnorm_kernels.c")
# A build takes a fraction of a second; a compiler that hangs must not stall the first step for
# ever while the other ranks wait on it.
BUILD_TIMEOUT_S = 120.0
# Vectorized float64 sums need reassociation; -ffast-math would also link crtfastmath, which
# flushes denormals to zero for the whole process, so only the flags that matter are named.
# No -march=native: a cache directory on a shared home may serve machines of several kinds.
CFLAGS = (
    "-O3",
    "-fPIC",
    "-shared",
    "-std=c99",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fno-signed-zeros",
    "-fassociative-math",
)
_DTYPES = {torch.float32: "f32", torch.float64: "f64"}
_log = logging.getLogger(__name__)


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ganpipe"


def _compiler() -> list[str]:
    """``$CC`` (default ``cc``) as a command and its own arguments (``ccache gcc``)."""
    try:
        return shlex.split(os.environ.get("CC") or "cc")
    except ValueError as error:
        raise RuntimeError(f"CC={os.environ['CC']!r} is not a command line: {error}") from error


def _library_path(compiler: list[str]) -> Path:
    """Where the library for this source, this compiler command (its arguments may change the
    code: ``gcc -march=native``), these flags and this kind of machine lives."""
    key = SOURCE.read_bytes() + " ".join((*compiler, *CFLAGS, sys.platform)).encode()
    tag = hashlib.sha256(key).hexdigest()[:16]
    # ~/.cache/ganpipe also holds the S3 workdirs' local copies (pipelines/config.py, one folder
    # per bucket): no bucket can be named _kernels.
    return _cache_dir() / "_kernels" / f"batchnorm-{platform.machine()}-{tag}.so"


def _build(compiler: list[str], library: Path) -> None:
    """Build ``library`` with ``compiler`` (a command and its own arguments)."""
    if not compiler or shutil.which(compiler[0]) is None:
        raise RuntimeError(
            f"no C compiler {shlex.join(compiler)!r} on PATH (set CC, or install gcc)"
        )
    directory = library.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=directory, prefix=library.stem, suffix=".tmp")
    except OSError as error:
        raise RuntimeError(
            f"cannot write to {directory} ({error.strerror}): set {CACHE_ENV} to a writable folder"
        ) from error
    os.close(handle)
    command = [*compiler, *CFLAGS, str(SOURCE), "-o", partial, "-lm"]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=BUILD_TIMEOUT_S
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{shlex.join(compiler)} could not build {SOURCE.name} (exit "
                f"{result.returncode}): {result.stderr.strip()[-500:]}"
            )
        os.replace(partial, library)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(
            f"{shlex.join(compiler)} did not build {SOURCE.name} in {BUILD_TIMEOUT_S:.0f} s"
        ) from error
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _load(compiler: list[str]) -> ctypes.CDLL:
    """The library, built unless the cache has it. One in the cache that does not load (cut
    short by a crash) is built again and renamed over it, as every build is: a process that
    loaded a whole one meanwhile keeps it."""
    library = _library_path(compiler)
    if library.exists():
        with contextlib.suppress(OSError):
            return ctypes.CDLL(str(library))
    _build(compiler, library)
    return ctypes.CDLL(str(library))


class Kernels:
    """The compiled passes, called with tensors. Each takes contiguous (N, C, S) data of one
    dtype (float32 or float64, see :meth:`supports`) and float64 sums and statistics."""

    def __init__(self, library: ctypes.CDLL) -> None:
        p, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
        signatures = {
            "local_sums": ([p, i64, i64, i64, p], None),
            "finish_stats": ([p, i64, f64, f64, p, p, p], f64),
            "normalize": ([p, p, i64, i64, i64, p, p, p], None),
            "backward_sums": ([p, p, i64, i64, i64, p, p, p, p], None),
            "backward_input": ([p, p, p, i64, i64, i64, p, p, p, f64], None),
        }
        self._functions: dict[tuple[str, str], ctypes._CFuncPtr] = {}
        for name, (argtypes, restype) in signatures.items():
            for suffix in _DTYPES.values():
                function = getattr(library, f"{name}_{suffix}")
                function.argtypes, function.restype = argtypes, restype
                self._functions[name, suffix] = function

    @staticmethod
    def supports(x: Tensor, *others: Tensor | None) -> bool:
        """Whether the passes take ``x`` and ``others`` (weight, bias, running statistics; None
        for absent ones): CPU, contiguous, float32 or float64, all of one dtype and device, one
        value of each per channel of ``x`` (the C trusts the sizes; torch's path checks them), and
        torch
        running one intra-op thread (these passes use one; torch's own kernels use them all)."""
        return (
            x.device.type == "cpu"
            and x.dim() >= 2
            and x.dtype in _DTYPES
            and x.is_contiguous()
            and all(
                t is None
                or (
                    t.device == x.device
                    and t.dtype == x.dtype
                    and t.is_contiguous()
                    and t.numel() == x.shape[1]
                )
                for t in others
            )
            and torch.get_num_threads() == 1
        )

    def _function(self, name: str, x: Tensor) -> ctypes._CFuncPtr:
        return self._functions[name, _DTYPES[x.dtype]]

    def local_sums(self, x: Tensor) -> Tensor:
        """float64 ``[sum(x), sum(x*x), count]`` per channel of ``x``: 2C + 1 numbers."""
        sums = torch.empty(2 * x.shape[1] + 1, dtype=torch.float64)
        self._function("local_sums", x)(x.data_ptr(), *_layout(x), sums.data_ptr())
        return sums

    def finish_stats(
        self,
        sums: Tensor,
        eps: float,
        momentum: float,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        x: Tensor,
    ) -> tuple[float, Tensor]:
        """The global count and float64 ``[mean, 1 / sqrt(var + eps)]`` (2, C) from the global
        ``sums``; moves the running statistics (may be None), of ``x``'s dtype. With a count of
        1 or less nothing is computed or moved."""
        c = (sums.numel() - 1) // 2
        stats = torch.empty(2, c, dtype=torch.float64)
        count = self._function("finish_stats", x)(
            sums.data_ptr(),
            c,
            eps,
            momentum,
            _pointer(running_mean),
            _pointer(running_var),
            stats.data_ptr(),
        )
        return count, stats

    def normalize(
        self, x: Tensor, stats: Tensor, weight: Tensor | None, bias: Tensor | None
    ) -> Tensor:
        out = torch.empty_like(x)
        self._function("normalize", x)(
            x.data_ptr(),
            out.data_ptr(),
            *_layout(x),
            stats.data_ptr(),
            _pointer(weight),
            _pointer(bias),
        )
        return out

    def backward_sums(
        self, dy: Tensor, x: Tensor, stats: Tensor, want_weight: bool, want_bias: bool
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """float64 ``[sum(dy), sum(dy * x_hat)]`` (2C numbers), and the local weight and bias
        gradients in ``x``'s dtype where wanted."""
        c = x.shape[1]
        sums = torch.empty(2 * c, dtype=torch.float64)
        grad_weight = torch.empty(c, dtype=x.dtype) if want_weight else None
        grad_bias = torch.empty(c, dtype=x.dtype) if want_bias else None
        self._function("backward_sums", x)(
            dy.data_ptr(),
            x.data_ptr(),
            *_layout(x),
            stats.data_ptr(),
            sums.data_ptr(),
            _pointer(grad_weight),
            _pointer(grad_bias),
        )
        return sums, grad_weight, grad_bias

    def backward_input(
        self,
        dy: Tensor,
        x: Tensor,
        stats: Tensor,
        weight: Tensor | None,
        sums: Tensor,
        count: float,
    ) -> Tensor:
        """The input gradient from the global backward ``sums`` over ``count`` values."""
        dx = torch.empty_like(x)
        self._function("backward_input", x)(
            dy.data_ptr(),
            x.data_ptr(),
            dx.data_ptr(),
            *_layout(x),
            stats.data_ptr(),
            _pointer(weight),
            sums.data_ptr(),
            count,
        )
        return dx


def _layout(x: Tensor) -> tuple[int, int, int]:
    """``x`` as the C sees it, (N, C, S): S values per sample and channel, the product of the
    sizes after dim 1 (1 for (N, C))."""
    spatial = 1
    for size in x.shape[2:]:
        spatial *= size
    return x.shape[0], x.shape[1], spatial


def _pointer(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


@cache
def kernels() -> Kernels | None:
    """The compiled passes, or None where :data:`KERNELS_ENV` says ``torch`` or, under
    ``auto``, where they cannot be built (one warning says why). Built once per process."""
    choice = environment_choice(KERNELS_ENV, CHOICES)
    if choice == "torch":
        return None
    try:
        return Kernels(_load(_compiler()))
    except (OSError, RuntimeError) as error:
        if choice == "c":
            raise RuntimeError(
                f"{KERNELS_ENV}=c but synchronized batch norm's C passes are not available: {error}"
            ) from error
        _log.warning(
            "synchronized batch norm on CPU runs its torch path, a few per cent slower a step: "
            "%s. Set %s=torch to choose that path and silence this warning.",
            error,
            KERNELS_ENV,
        )
        return None
