"""The environment variables that choose between equivalent implementations (where sync batch
norm's sums go, which of its CPU paths runs): read and checked in one way."""

from __future__ import annotations

import os

__all__ = ["environment_choice"]


def environment_choice(name: str, choices: tuple[str, ...]) -> str:
    """The value of the environment variable ``name``, one of ``choices`` (the first when it is
    unset); ValueError naming the variable and the choices for anything else."""
    value = os.environ.get(name, choices[0])
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not a choice; use one of {', '.join(choices)}")
    return value
