"""The checkpointable training state, stored as plain tensors so it loads with weights_only=True."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

STATE_FILE = "state.pt"


class CheckpointError(ValueError):
    """A file that is not a readable ganpipe checkpoint; the message names it."""


def _read(directory: str | Path, required: tuple[str, ...]) -> dict[str, Any]:
    """The state dict in ``directory``, which must hold the ``required`` keys. Loaded with
    ``weights_only=True``: a pickle that would run code or build foreign objects is refused,
    never executed."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or corrupt files
        raise CheckpointError(
            f"{path}: not a ganpipe checkpoint; torch.load(weights_only=True) refused it "
            f"({torch_load_refusal(exc)})"
        ) from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(
            f"{path}: not a ganpipe checkpoint (no {', '.join(missing)}); it holds "
            f"{type(state).__name__}"
        )
    return state


def torch_load_refusal(exc: Exception) -> str:
    """The informative part of torch.load's error.

    torch's weights-only message opens with advice to retry with weights_only=False, which would
    run whatever code a foreign pickle holds; only the reason is passed on.
    """
    text = str(exc)
    found = re.search(
        r"Unsupported global: GLOBAL \S+|unsupported GLOBAL \S+|Unsupported operand \S+", text
    )
    if found:
        return f"{type(exc).__name__}: {found.group(0)}"
    first_line = (text.strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel and ``torch.compile`` wrappers, in any order
    (or the module itself)."""
    while True:
        # Through _modules: a compiled module forwards attribute reads to the original.
        inner = module._modules.get("_orig_mod")
        if inner is None:
            inner = module._modules.get("module")
        if inner is None:
            return module
        module = inner


def save_state(
    directory: str | Path,
    *,
    step: int,
    generator: nn.Module,
    discriminator: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    sched_g: Any,
    sched_d: Any,
    rng: torch.Generator,
    worker_rngs: list[torch.Tensor] | None = None,
    ema: Any = None,
    extras: dict[str, Any] | None = None,
) -> Path:
    """Write the whole training state into ``directory`` and return the file path.

    ``worker_rngs`` holds every data-parallel worker's generator state (index = rank), so that
    each worker resumes its own stream of batches and noise. ``ema`` (a GeneratorEMA) is stored
    as ``generator_ema``: the weights to evaluate and serve. ``extras`` maps names to any other
    objects with ``state_dict``/``load_state_dict`` (the adaptive-augmentation controller, LeCam
    anchors); their states must hold only tensors and plain Python values.
    """
    path = Path(directory) / STATE_FILE
    torch.save(
        {
            "step": torch.tensor(step),
            "generator": unwrap(generator).state_dict(),
            "discriminator": unwrap(discriminator).state_dict(),
            "opt_g": opt_g.state_dict(),
            "opt_d": opt_d.state_dict(),
            "sched_g": sched_g.state_dict(),
            "sched_d": sched_d.state_dict(),
            "rng": rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "worker_rngs": list(worker_rngs or []),
            **({"generator_ema": ema.state_dict()} if ema is not None else {}),
            "extras": {name: obj.state_dict() for name, obj in (extras or {}).items()},
        },
        path,
    )
    return path


def load_state(
    directory: str | Path,
    *,
    generator: nn.Module,
    discriminator: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    sched_g: Any,
    sched_d: Any,
    rng: torch.Generator,
    ema: Any = None,
    extras: dict[str, Any] | None = None,
) -> int:
    """Restore everything ``save_state`` wrote; return the step to continue from. An object of
    ``extras`` that the checkpoint has no state for keeps its own (e.g. a run that turned
    adaptive augmentation on when resumed)."""
    state = _read(directory, ("step", "generator", "discriminator"))
    unwrap(generator).load_state_dict(state["generator"])
    unwrap(discriminator).load_state_dict(state["discriminator"])
    opt_g.load_state_dict(state["opt_g"])
    opt_d.load_state_dict(state["opt_d"])
    sched_g.load_state_dict(state["sched_g"])
    sched_d.load_state_dict(state["sched_d"])
    rng.set_state(state["rng"])
    if ema is not None and "generator_ema" in state:
        ema.load_state_dict(state["generator_ema"])
    saved_extras = state.get("extras", {})
    for name, obj in (extras or {}).items():
        if name in saved_extras:
            obj.load_state_dict(saved_extras[name])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


def load_worker_rng(directory: str | Path, rank: int, world_size: int) -> torch.Tensor | None:
    """Worker ``rank``'s generator state, if the checkpoint was written by as many workers."""
    state = _read(directory, ())
    worker_rngs = state.get("worker_rngs", [])
    return worker_rngs[rank] if len(worker_rngs) == world_size else None


def load_generator_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The generator weights to evaluate and serve: the EMA generator's when there is one."""
    state = _read(directory, ("generator",))
    weights = state.get("generator_ema", state["generator"])
    broken = [
        k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if broken:
        # A diverged generator is never evaluated, registered or served.
        raise CheckpointError(
            f"{Path(directory) / STATE_FILE}: the generator holds NaN or infinite weights "
            f"({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}); training diverged "
            "(train.nan_rollbacks rolls back such a run)"
        )
    return weights
