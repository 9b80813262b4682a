"""Small steps for runner tests. Pickled by value: Ray workers cannot import the tests folder."""

from __future__ import annotations

import sys
import time

import ray.cloudpickle

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def source(ctx):
    return {"value": ctx.config.data.seed}


def double(ctx, value):
    return {"value": value * 2 + ctx.config.train.seed}


def plus_one(ctx, value):
    return {"value": value + 1}


def plus_one_changed(ctx, value):
    # Same name and result type as plus_one; only the code differs.
    return {"value": value + 1 + 0}


def sleeper(ctx, value):
    started = time.time()
    # Long enough to cover starting a second worker process for the steps' runtime env: ~3 s
    # on 2 idle cores, over 10 s when the machine is saturated.
    time.sleep(15)
    return {"started": started, "ended": time.time()}


def flaky(ctx, value):
    if ctx.attempt == 1:
        raise OSError("transient: disk went away")
    return {"value": value, "attempt": ctx.attempt}


def broken(ctx, value):
    raise ValueError("a bug, not worth retrying")


def sum_up(ctx, a, b):
    return {"value": a + b}
