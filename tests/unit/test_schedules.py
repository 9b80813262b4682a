"""gan.schedules: warm-up and decay factors, agreement with torch's schedulers, resumability."""

from __future__ import annotations

import io
import math

import pytest
import torch

from gan.schedules import SchedulePolicy, make_scheduler

BASE_LR = 2e-3


def _optimizer(lr: float = BASE_LR) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _lrs(optimizer: torch.optim.Optimizer, scheduler, steps: int) -> list[float]:
    """The lr used at each of ``steps`` optimizer steps, stepping the scheduler after each."""
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def _assert_rel_close(actual: list[float], expected: list[float], rel: float = 1e-12) -> None:
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert abs(a - e) <= rel * abs(e), (i, a, e)


def test_linear_warmup_values():
    policy = SchedulePolicy(total_steps=100, warmup_steps=4)
    assert [policy.factor(s) for s in range(7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("decay", ["none", "exponential", "cosine"])
def test_warmup_starts_at_one_over_warmup_and_reaches_one(decay):
    warmup = 8
    policy = SchedulePolicy(total_steps=40, warmup_steps=warmup, decay=decay, min_factor=0.2)
    assert policy.factor(0) == pytest.approx(1 / warmup, rel=1e-15)
    ramp = [policy.factor(s) for s in range(warmup)]
    assert ramp == pytest.approx([(s + 1) / warmup for s in range(warmup)], rel=1e-15)
    assert all(b > a for a, b in zip(ramp, ramp[1:], strict=False))
    assert ramp[-1] == 1.0
    assert policy.factor(warmup) == 1.0  # decay starts from the full rate

    opt = _optimizer()
    lrs = _lrs(opt, make_scheduler(opt, policy), warmup + 1)
    assert lrs == pytest.approx([BASE_LR * f for f in ramp] + [BASE_LR], rel=1e-15)


def test_cosine_matches_torch_cosine_annealing():
    total, min_factor = 50, 0.1
    opt = _optimizer()
    ours = _lrs(
        opt,
        make_scheduler(
            opt, SchedulePolicy(total_steps=total, decay="cosine", min_factor=min_factor)
        ),
        total + 1,
    )
    ref_opt = _optimizer()
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(
        ref_opt, T_max=total, eta_min=BASE_LR * min_factor
    )
    expected = _lrs(ref_opt, ref, total + 1)
    _assert_rel_close(ours, expected)
    assert ours[0] == BASE_LR
    assert ours[-1] == pytest.approx(BASE_LR * min_factor, rel=1e-15)
    assert all(b < a for a, b in zip(ours, ours[1:], strict=False))


def test_cosine_after_warmup_is_the_no_warmup_curve_shifted():
    total, warmup = 60, 10
    with_warmup = SchedulePolicy(total, warmup, "cosine", 0.05)
    without = SchedulePolicy(total - warmup, 0, "cosine", 0.05)
    for k in range(total - warmup + 5):
        assert with_warmup.factor(warmup + k) == pytest.approx(without.factor(k), rel=1e-14)
    assert with_warmup.factor(warmup + (total - warmup) // 2) == pytest.approx(0.525, rel=1e-14)


@pytest.mark.parametrize("decay", ["exponential", "cosine"])
@pytest.mark.parametrize("warmup", [0, 7])
def test_decay_reaches_min_factor_at_total_steps_and_stays(decay, warmup):
    policy = SchedulePolicy(total_steps=30, warmup_steps=warmup, decay=decay, min_factor=0.3)
    assert policy.factor(30) == pytest.approx(0.3, rel=1e-15)
    assert policy.factor(29) > 0.3
    assert [policy.factor(s) for s in (31, 50, 10_000)] == pytest.approx([0.3] * 3, rel=1e-15)


def test_exponential_matches_torch_exponential_lr():
    total, min_factor = 40, 0.05
    opt = _optimizer()
    policy = SchedulePolicy(total_steps=total, decay="exponential", min_factor=min_factor)
    ours = _lrs(opt, make_scheduler(opt, policy), total + 1)
    ref_opt = _optimizer()
    ref = torch.optim.lr_scheduler.ExponentialLR(ref_opt, gamma=min_factor ** (1 / total))
    expected = _lrs(ref_opt, ref, total + 1)
    _assert_rel_close(ours, expected)
    assert ours[-1] == pytest.approx(BASE_LR * min_factor, rel=1e-15)
    # Constant ratio between consecutive steps.
    ratios = [b / a for a, b in zip(ours, ours[1:], strict=False)]
    assert ratios == pytest.approx([min_factor ** (1 / total)] * total, rel=1e-12)


def test_decay_none_is_constant():
    policy = SchedulePolicy(total_steps=10, decay="none", min_factor=0.1)
    assert [policy.factor(s) for s in range(25)] == [1.0] * 25
    opt = _optimizer()
    assert _lrs(opt, make_scheduler(opt, policy), 25) == [BASE_LR] * 25


def test_single_step_policy():
    policy = SchedulePolicy(total_steps=1, decay="cosine", min_factor=0.5)
    assert [policy.factor(s) for s in range(3)] == [1.0, 0.5, 0.5]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(total_steps=10, decay="linear"), "unknown decay 'linear'"),
        (dict(total_steps=0), "total_steps must be >= 1"),
        (dict(total_steps=-5), "total_steps must be >= 1"),
        (dict(total_steps=10, warmup_steps=-1), "warmup_steps >= 0"),
        (dict(total_steps=10, min_factor=0.0), "min_factor must be in"),
        (dict(total_steps=10, min_factor=-0.1), "min_factor must be in"),
        (dict(total_steps=10, min_factor=1.5), "min_factor must be in"),
        (dict(total_steps=10, min_factor=math.nan), "min_factor must be in"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SchedulePolicy(**kwargs)


def test_min_factor_one_is_allowed_and_constant():
    policy = SchedulePolicy(total_steps=10, decay="cosine", min_factor=1.0)
    assert [policy.factor(s) for s in range(15)] == [1.0] * 15


@pytest.mark.parametrize("decay", ["exponential", "cosine"])
def test_scheduler_state_dict_round_trip_continues_the_same_curve(decay):
    policy = SchedulePolicy(total_steps=30, warmup_steps=5, decay=decay, min_factor=0.1)
    opt = _optimizer()
    sched = make_scheduler(opt, policy)
    _lrs(opt, sched, 9)
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    expected = _lrs(opt, sched, 30)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh_policy = SchedulePolicy(total_steps=30, warmup_steps=5, decay=decay, min_factor=0.1)
    fresh_opt = _optimizer()
    fresh = make_scheduler(fresh_opt, fresh_policy)
    assert fresh_opt.param_groups[0]["lr"] == BASE_LR / 5  # starts at step 0 before loading
    fresh_opt.load_state_dict(saved["opt"])
    fresh.load_state_dict(saved["sched"])
    assert fresh.last_epoch == 9
    resumed = _lrs(fresh_opt, fresh, 30)
    assert resumed == expected
    assert expected[0] == pytest.approx(BASE_LR * policy.factor(9), rel=1e-15)
    assert expected[-1] == pytest.approx(BASE_LR * 0.1, rel=1e-15)


def test_scheduler_state_alone_sets_the_position():
    """Even without the optimizer's state, the scheduler's step count puts lr back on the curve."""
    policy = SchedulePolicy(total_steps=20, decay="cosine", min_factor=0.2)
    opt = _optimizer()
    sched = make_scheduler(opt, policy)
    _lrs(opt, sched, 6)
    state = sched.state_dict()
    expected = _lrs(opt, sched, 10)

    fresh_opt = _optimizer()
    fresh = make_scheduler(fresh_opt, policy)
    fresh.load_state_dict(state)
    fresh_opt.step()
    fresh.step()  # the next step lands on step 7 of the same curve
    assert fresh_opt.param_groups[0]["lr"] == expected[1]
