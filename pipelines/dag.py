"""The pipeline as a DAG of steps with declared inputs, outputs, resources, retries, fingerprints.

A step is a plain function ``fn(ctx, **inputs) -> outputs``. Its inputs name outputs of upstream
steps (``"prepare.dataset"``), which is where the edges come from. Its fingerprint covers its code
(the source of its function and an explicit version), the config sections it reads and the
fingerprints of its inputs: equal fingerprints mean the step would produce the same outputs.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
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
    output_dir: Path  # content-addressed: <workdir>/outputs/<step>/<fingerprint>
    pipeline_run_id: str
    attempt: int = 1
    # Where output_dir ends up: itself, or for a workdir on S3 the s3:// prefix it is uploaded
    # to when the step returns (what writes straight to storage, Ray Train, goes there).
    output_uri: str = ""

    def __post_init__(self) -> None:
        self.output_uri = self.output_uri or str(self.output_dir)

    def log(self, message: str) -> None:
        print(f"[{self.step}] {message}", flush=True)


@dataclass(frozen=True)
class Step:
    """One node of the DAG.

    ``retries`` more attempts are made when the step raises one of ``retry_on`` or its process
    dies; any other exception fails the pipeline at once.
    """

    name: str
    fn: Callable[..., dict[str, Any]]
    inputs: dict[str, str] = field(default_factory=dict)  # argument -> "step.output"
    outputs: tuple[str, ...] = ()
    config_sections: tuple[str, ...] = ()  # the parts of the config this step reads
    version: str = "1"  # bump when code the step calls (not its own source) changes its outputs
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    retries: int = 0
    retry_on: tuple[type[BaseException], ...] = ()

    def upstream(self) -> set[str]:
        return {ref.split(".", 1)[0] for ref in self.inputs.values()}

    def params(self, config: Config) -> dict[str, Any]:
        flat = config.flat()
        sections = tuple(f"{s}." for s in self.config_sections)
        return {k: v for k, v in flat.items() if k.startswith(sections)}

    def code_digest(self) -> str:
        return _source_digest(self.fn)


@cache
def _source_digest(fn: Callable[..., Any]) -> str:
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):  # no source available (e.g. built in a REPL)
        source = f"{fn.__module__}.{fn.__qualname__}"
    return hashlib.sha256(source.encode()).hexdigest()


@dataclass(frozen=True)
class Dag:
    """Steps and their edges; refuses missing inputs and cycles when it is declared."""

    steps: tuple[Step, ...]

    def __post_init__(self) -> None:
        names = [s.name for s in self.steps]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate step names: {duplicates}")
        by_name = {s.name: s for s in self.steps}
        for step in self.steps:
            for arg, ref in step.inputs.items():
                source, _, output = ref.partition(".")
                if source not in by_name:
                    raise ValueError(
                        f"step {step.name!r} input {arg!r} reads {ref!r}, but there is no step "
                        f"{source!r}; steps: {', '.join(names)}"
                    )
                available = by_name[source].outputs
                if output not in available:
                    raise ValueError(
                        f"step {step.name!r} input {arg!r} reads {ref!r}, but step {source!r} "
                        f"has no output {output!r}; its outputs: {', '.join(available)}"
                    )
        self.order()  # raises on cycles

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(f"no step {name!r}; steps: {', '.join(self.names)}")

    def order(self) -> list[Step]:
        """Steps in an order where every step follows its upstream steps."""
        done: list[Step] = []
        remaining = list(self.steps)
        while remaining:
            ready = [s for s in remaining if s.upstream() <= {d.name for d in done}]
            if not ready:
                cycle = " -> ".join(s.name for s in remaining)
                raise ValueError(f"the steps {cycle} depend on each other in a cycle")
            done += ready
            remaining = [s for s in remaining if s not in ready]
        return done

    def downstream(self, names: set[str]) -> set[str]:
        """``names`` and every step that depends on them, directly or not."""
        found = set(names)
        for step in self.order():
            if step.upstream() & found:
                found.add(step.name)
        return found

    def fingerprints(self, config: Config) -> dict[str, str]:
        result: dict[str, str] = {}
        for step in self.order():
            result[step.name] = fingerprint(step, config, {s: result[s] for s in step.upstream()})
        return result

    def mermaid(self) -> str:
        lines = ["graph LR"]
        for step in self.order():
            for source in sorted(step.upstream()):
                lines.append(f"    {source} --> {step.name}")
        return "\n".join(lines)


def fingerprint(step: Step, config: Config, input_fingerprints: dict[str, str]) -> str:
    payload = {
        "step": step.name,
        "version": step.version,
        "code": step.code_digest(),
        "params": step.params(config),
        "inputs": dict(sorted(input_fingerprints.items())),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
