"""An earlier ``gan/step.py`` against today's, in one process: short blocks of steps, alternated.

    git show ff8ecfc~1:gan/step.py > /tmp/step_before.py
    python bench/step_ab.py --before /tmp/step_before.py --model default -- train.reuse_fakes=false
    python bench/step_ab.py --before /tmp/step_before.py --device cuda --model dcgan64 \
        -- train.reuse_fakes=false

A change to the step worth a few per cent is lost between runs on a shared machine, which drift
by ±10 % and more. Here both versions train in the same process, each with a
``TrainingState`` of its own (same config, same seed), in blocks of ``--block`` steps that
alternate (ABAB, then BABA): the machine's drift falls on both alike. Each block runs the worker
loop's per-step bookkeeping (bench/gpu_speed.py's ``ganpipe`` loop). Printed: milliseconds per
step (median over blocks) and the median over pairs of blocks of before / after; above 1 means
today's step is faster.

Config overrides after ``--`` apply to both versions. An earlier step has no parameters for
options added since (``reuse_fakes`` from cac00c8 on): it gets only the ones it knows, and
where the pipeline asks for an option the earlier step lacks (not at the value that reproduces
the old step), the script stops and names the override that makes both versions comparable.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from gpu_speed import MODELS, _config, _sync, ganpipe_loop, host_data

import gan.step
import pipelines.loop
from pipelines.config import ConfigError


def load_step_module(path: Path) -> ModuleType:
    """The ``gan/step.py`` at ``path`` as a module of its own (``gan.step`` stays as it is)."""
    spec = importlib.util.spec_from_file_location("gan_step_before", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compatible_train_step(module: ModuleType) -> Callable[..., object]:
    """``module.train_step``, given only the keyword arguments it accepts. Today's step reproduces
    an earlier one with its newer options at their defaults, so those are dropped; any other
    value of an option the earlier step lacks raises ValueError naming it."""
    accepted = inspect.signature(module.train_step).parameters
    today = inspect.signature(gan.step.train_step).parameters
    newer = [name for name in today if name not in accepted]  # a short loop inside the timing

    def train_step(**kwargs: object) -> object:
        for name in [n for n in newer if n in kwargs]:
            if kwargs[name] != today[name].default:
                raise ValueError(
                    f"--before's train_step has no {name}, and this config sets it to "
                    f"{kwargs[name]!r}: add the override that sets it to "
                    f"{today[name].default!r} for both (e.g. -- train.{name}=false)"
                )
            del kwargs[name]
        return module.train_step(**kwargs)

    return train_step


def seconds_per_step(
    loop: Callable[[int], None],
    train_step: Callable[..., object],
    first: int,
    steps: int,
    device: torch.device,
) -> float:
    """Seconds per step of ``steps`` steps of ``loop`` with ``train_step``."""
    pipelines.loop.train_step = train_step
    _sync(device)
    started = time.perf_counter()
    for i in range(first, first + steps):
        loop(i)
    _sync(device)
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="an earlier gan/step.py")
    parser.add_argument("--device", default="cpu", choices=("cuda", "cpu"))
    parser.add_argument("--model", default="default,dcgan64-thin", help=", ".join(MODELS))
    parser.add_argument("--blocks", type=int, default=20, help="blocks of each version")
    parser.add_argument("--block", type=int, default=30, help="steps per block")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value) for both")
    args = parser.parse_args()
    if not args.before.is_file():
        parser.error(f"--before {args.before}: no such file (git show REV:gan/step.py > FILE)")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}; before: {args.before}")
    versions = {
        "before": compatible_train_step(load_step_module(args.before)),
        "after": gan.step.train_step,
    }

    try:
        for model in args.model.split(","):
            compare(model, args, versions, device, parser)
    except ValueError as exc:  # an option the earlier step lacks
        raise SystemExit(f"step_ab.py: {exc}") from None


def compare(
    model: str,
    args: argparse.Namespace,
    versions: dict[str, Callable[..., object]],
    device: torch.device,
    parser: argparse.ArgumentParser,
) -> None:
    """Both versions of the step on ``model`` in alternating blocks; prints the figures."""
    if model not in MODELS:
        parser.error(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    try:
        config = _config(model, args.overrides, args.device)
    except ConfigError as exc:
        parser.error(str(exc))
    data = host_data(config)
    # Same config and seed: two identical states. Which train_step each runs is set per
    # block (seconds_per_step): TrainingState.step looks it up in pipelines.loop.
    loops = {version: ganpipe_loop(config, data, device) for version in versions}

    seconds: dict[str, list[float]] = {version: [] for version in versions}
    for version, train_step in versions.items():  # warm-up
        seconds_per_step(loops[version], train_step, 0, args.block, device)
    for index in range(args.blocks):
        order = list(versions) if index % 2 == 0 else list(versions)[::-1]
        for version in order:
            first = (index + 1) * args.block
            seconds[version].append(
                seconds_per_step(loops[version], versions[version], first, args.block, device)
            )
    pipelines.loop.train_step = gan.step.train_step
    ratios = [b / a for b, a in zip(seconds["before"], seconds["after"], strict=True)]
    print(
        f"{model}: ms per step before {1e3 * statistics.median(seconds['before']):.2f}, "
        f"after {1e3 * statistics.median(seconds['after']):.2f}; before / after "
        f"{statistics.median(ratios):.3f} (median of {len(ratios)} pairs of "
        f"{args.block}-step blocks, {min(ratios):.2f}–{max(ratios):.2f})",
        flush=True,
    )


if __name__ == "__main__":
    main()
