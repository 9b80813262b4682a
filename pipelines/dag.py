"""The pipeline as a DAG of steps with declared inputs, outputs, resources and fingerprints.

A step is a plain function ``fn(ctx, **inputs) -> outputs``. Its inputs name outputs of upstream
steps (``"prepare.dataset"``), which is where the edges come from. The fingerprint (code version,
the config sections the step reads, the fingerprints of its inputs) is recorded on every step run
so that caching can key on it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import Config
from pipelines.tracking import RunLogger


@dataclass
class StepContext:
    """What a running step gets besides its inputs."""

    step: str
    config: Config
    logger: RunLogger
    output_dir: Path
    pipeline_run_id: str

    def log(self, message: str) -> None:
        print(f"[{self.step}] {message}", flush=True)


@dataclass(frozen=True)
class Step:
    name: str
    fn: Callable[..., dict[str, Any]]
    inputs: dict[str, str] = field(default_factory=dict)  # argument -> "step.output"
    outputs: tuple[str, ...] = ()
    config_sections: tuple[str, ...] = ()  # the parts of the config this step reads
    version: str = "1"  # bump when the step's code changes what it produces
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def upstream(self) -> set[str]:
        return {ref.split(".", 1)[0] for ref in self.inputs.values()}

    def params(self, config: Config) -> dict[str, Any]:
        flat = config.flat()
        return {
            k: v
            for k, v in flat.items()
            if any(k.startswith(f"{s}.") for s in self.config_sections)
        }


@dataclass(frozen=True)
class Dag:
    steps: tuple[Step, ...]

    def __post_init__(self) -> None:
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate step names in {names}")
        by_name = {s.name: s for s in self.steps}
        for step in self.steps:
            for arg, ref in step.inputs.items():
                source, _, output = ref.partition(".")
                if source not in by_name or output not in by_name[source].outputs:
                    raise ValueError(f"step {step.name!r} input {arg!r}: no output {ref!r}")
        self.order()  # raises on cycles

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def order(self) -> list[Step]:
        """Steps in an order where every step follows its upstream steps."""
        done: list[Step] = []
        remaining = list(self.steps)
        while remaining:
            ready = [s for s in remaining if s.upstream() <= {d.name for d in done}]
            if not ready:
                raise ValueError(f"cycle among steps {[s.name for s in remaining]}")
            done += ready
            remaining = [s for s in remaining if s not in ready]
        return done

    def mermaid(self) -> str:
        lines = ["graph LR"]
        for step in self.steps:
            for source in sorted(step.upstream()):
                lines.append(f"    {source} --> {step.name}")
        return "\n".join(lines)


def fingerprint(step: Step, config: Config, input_fingerprints: dict[str, str]) -> str:
    payload = {
        "step": step.name,
        "version": step.version,
        "params": step.params(config),
        "inputs": dict(sorted(input_fingerprints.items())),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
