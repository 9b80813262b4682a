"""gan.schedules: warm-up and main policies, agreement with torch's schedulers, resumability."""

from __future__ import annotations

import io
import math

import pytest
import torch

from gan.schedules import DECAYS, WARMUPS, PolicyScheduler, SchedulePolicy, make_scheduler

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
        (dict(total_steps=10, warmup_steps=-1), "warmup_steps must be >= 0"),
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


# ------------------------------------------------------------------- extended policies vs torch

MAIN_STEPS = 64  # length of the exponential / cosine decay after warm-up

# decay -> (policy fields, number of main steps to compare, torch reference factory)
TORCH_CASES = {
    "none": (dict(), 80, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)),
    "step": (
        dict(gamma=0.7, step_size=9, min_factor=1e-3),
        90,
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=9, gamma=0.7),
    ),
    "exponential": (
        dict(min_factor=0.05),
        MAIN_STEPS + 1,
        lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.05 ** (1 / MAIN_STEPS)),
    ),
    "cosine": (
        dict(min_factor=0.1),
        MAIN_STEPS + 1,
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=MAIN_STEPS, eta_min=BASE_LR * 0.1
        ),
    ),
    "cyclic_triangular": (
        dict(cycle_low=0.2, cycle_half_steps=7),
        90,
        lambda opt: torch.optim.lr_scheduler.CyclicLR(
            opt,
            base_lr=BASE_LR * 0.2,
            max_lr=BASE_LR,
            step_size_up=7,
            mode="triangular",
            cycle_momentum=False,
        ),
    ),
    "cyclic_triangular2": (
        dict(cycle_low=0.2, cycle_half_steps=7),
        90,
        lambda opt: torch.optim.lr_scheduler.CyclicLR(
            opt,
            base_lr=BASE_LR * 0.2,
            max_lr=BASE_LR,
            step_size_up=7,
            mode="triangular2",
            cycle_momentum=False,
        ),
    ),
}


def test_exported_names():
    assert WARMUPS == ("none", "linear", "exponential")
    assert set(DECAYS) == set(TORCH_CASES) | {"plateau"}
    assert DECAYS[:1] == ("none",)


def _torch_lrs(decay: str, steps: int) -> list[float]:
    opt = _optimizer()
    return _lrs(opt, TORCH_CASES[decay][2](opt), steps)


@pytest.mark.parametrize("warmup", WARMUPS)
@pytest.mark.parametrize("decay", sorted(TORCH_CASES))
def test_policy_without_warmup_equals_torch_scheduler(decay, warmup):
    fields, steps, _ = TORCH_CASES[decay]
    policy = SchedulePolicy(
        total_steps=MAIN_STEPS, warmup_steps=0, decay=decay, warmup=warmup, **fields
    )
    opt = _optimizer()
    sched = make_scheduler(opt, policy)
    assert isinstance(sched, PolicyScheduler)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    ours = _lrs(opt, sched, steps)
    expected = _torch_lrs(decay, steps)
    assert steps >= 60
    _assert_rel_close(ours, expected)
    assert sched.get_last_lr() == [opt.param_groups[0]["lr"]]
    if decay != "none":  # the comparison is not vacuous
        assert len({round(lr / BASE_LR, 9) for lr in ours}) > 5


@pytest.mark.parametrize("warmup", ["linear", "exponential"])
@pytest.mark.parametrize("decay", sorted(TORCH_CASES))
def test_policy_after_warmup_is_the_torch_sequence_shifted(decay, warmup):
    fields, steps, _ = TORCH_CASES[decay]
    n, start = 11, 0.02
    policy = SchedulePolicy(
        total_steps=n + MAIN_STEPS,
        warmup_steps=n,
        decay=decay,
        warmup=warmup,
        warmup_start_factor=start,
        **fields,
    )
    opt = _optimizer()
    ours = _lrs(opt, make_scheduler(opt, policy), n + steps)
    if warmup == "linear":
        ramp = [BASE_LR * (s + 1) / n for s in range(n)]
    else:
        ramp = [BASE_LR * start ** (1 - (s + 1) / n) for s in range(n)]
        ratios = [b / a for a, b in zip(ours[:n], ours[1:n], strict=False)]
        assert ratios == pytest.approx([start ** (-1 / n)] * (n - 1), rel=1e-12)  # geometric
    _assert_rel_close(ours[:n], ramp)
    assert ours[n - 1] == BASE_LR  # the ramp ends at the full rate
    _assert_rel_close(ours[n:], _torch_lrs(decay, steps))  # main policy's step 0 is step n


def test_exponential_warmup_factor_values():
    policy = SchedulePolicy(total_steps=50, warmup_steps=4, warmup="exponential")
    got = [policy.factor(s) for s in range(6)]
    assert got == pytest.approx([0.01**0.75, 0.01**0.5, 0.01**0.25, 1.0, 1.0, 1.0], rel=1e-15)
    assert got[0] == pytest.approx(0.031622776601683794, rel=1e-15)


def test_step_decay_is_floored_at_min_factor():
    policy = SchedulePolicy(total_steps=10, decay="step", gamma=0.5, step_size=3, min_factor=0.2)
    assert [policy.factor(s) for s in range(13)] == [1.0] * 3 + [0.5] * 3 + [0.25] * 3 + [0.2] * 4


def test_cyclic_triangular2_halves_the_amplitude_each_cycle():
    policy = SchedulePolicy(
        total_steps=10, decay="cyclic_triangular2", cycle_low=0.2, cycle_half_steps=2
    )
    got = [policy.factor(s) for s in range(12)]
    expected = [0.2, 0.6, 1.0, 0.6, 0.2, 0.4, 0.6, 0.4, 0.2, 0.3, 0.4, 0.3]
    assert got == pytest.approx(expected, rel=1e-14)


# ----------------------------------------------------------------------------------- plateau


def _plateau(**kwargs) -> SchedulePolicy:
    fields = dict(
        total_steps=1000,
        decay="plateau",
        plateau_factor=0.5,
        plateau_patience=2,
        plateau_threshold=0.01,
        plateau_cooldown=1,
        min_factor=0.2,
    )
    fields.update(kwargs)
    return SchedulePolicy(**fields)


def test_plateau_reduces_after_patience_respects_cooldown_and_floor():
    opt = _optimizer()
    sched = make_scheduler(opt, _plateau())
    metrics = [10, 9, 8, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 6.95, 7]
    # 4 improvements; 2 stalls tolerated, the 3rd reduces; 1 report of cooldown; 6.95 is within
    # the 1 % threshold of 7, so a stall; the last reduction would go below the floor 0.2.
    expected = [1, 1, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.2, 0.2, 0.2]
    expected += [0.2, 0.2]
    got, reduced = [], []
    for metric in metrics:
        for _ in range(3):  # steps between evaluations do not change the rate
            before = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            assert opt.param_groups[0]["lr"] == before
        reduced.append(sched.report(metric))
        got.append(opt.param_groups[0]["lr"] / BASE_LR)
        assert sched.get_last_lr() == [opt.param_groups[0]["lr"]]
    assert got == pytest.approx(expected, rel=1e-15)
    assert [i for i, r in enumerate(reduced) if r] == [6, 10, 14]
    assert min(got) == pytest.approx(0.2, rel=1e-15)
    assert sched.plateau_best == 7
    assert sched.plateau_reports == len(metrics)


def _metric_sequence() -> list[float]:
    """Improving, flat with noise, a sudden improvement, flat again, a NaN, recovering."""
    out = [100 * 0.9**i for i in range(10)]
    out += [35 + 0.2 * math.sin(3 * i) for i in range(25)]
    out += [20.0, 19.99] + [20 + 0.05 * math.cos(i) for i in range(30)]
    out += [math.nan, 19.0, 19.0, 18.0] + [18.0] * 12
    return out


@pytest.mark.parametrize(
    ("factor", "patience", "threshold", "cooldown", "min_factor"),
    [
        (0.5, 2, 0.01, 1, 0.2),
        (0.3, 0, 0.0, 0, 0.01),
        (0.8, 3, 0.05, 2, 0.05),
        (0.1, 1, 1e-4, 3, 1e-3),
    ],
)
def test_plateau_equals_torch_reduce_on_plateau(factor, patience, threshold, cooldown, min_factor):
    policy = _plateau(
        plateau_factor=factor,
        plateau_patience=patience,
        plateau_threshold=threshold,
        plateau_cooldown=cooldown,
        min_factor=min_factor,
    )
    opt = _optimizer()
    sched = make_scheduler(opt, policy)
    ref_opt = _optimizer()
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(
        ref_opt,
        mode="min",
        factor=factor,
        patience=patience,
        threshold=threshold,
        threshold_mode="rel",
        cooldown=cooldown,
        min_lr=BASE_LR * min_factor,
    )
    ours, expected = [], []
    for metric in _metric_sequence():
        for _ in range(2):
            opt.step()
            sched.step()
        sched.report(metric)
        ref.step(metric)
        ours.append(opt.param_groups[0]["lr"])
        expected.append(ref_opt.param_groups[0]["lr"])
    _assert_rel_close(ours, expected)
    assert len(set(expected)) >= 3  # several reductions happened
    assert min(ours) >= BASE_LR * min_factor * (1 - 1e-12)


def test_plateau_ignores_reports_during_warmup_and_step_still_ramps():
    policy = _plateau(warmup_steps=5, plateau_patience=0, plateau_cooldown=0)
    assert policy.warmup == "linear"
    opt = _optimizer()
    sched = make_scheduler(opt, policy)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        assert sched.report(1.0) is False  # ignored: the rate is still ramping
        assert opt.param_groups[0]["lr"] == seen[-1]
        opt.step()
        sched.step()
    assert seen == pytest.approx([BASE_LR * (s + 1) / 5 for s in range(5)], rel=1e-15)
    assert sched.plateau_reports == 0 and sched.plateau_best == math.inf
    assert opt.param_groups[0]["lr"] == BASE_LR
    assert sched.report(3.0) is False  # first report after warm-up sets the best
    assert sched.report(3.0) is True  # patience 0: the first stall reduces
    assert opt.param_groups[0]["lr"] == pytest.approx(BASE_LR * 0.5, rel=1e-15)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(BASE_LR * 0.5, rel=1e-15)


def test_plateau_factor_method_is_the_unreduced_curve():
    policy = _plateau(warmup_steps=2)
    assert [policy.factor(s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("decay", sorted(TORCH_CASES))
def test_report_is_a_no_op_for_other_policies(decay):
    fields, _, _ = TORCH_CASES[decay]
    opt = _optimizer()
    sched = make_scheduler(opt, SchedulePolicy(total_steps=30, decay=decay, **fields))
    _lrs(opt, sched, 4)
    state = dict(sched.state_dict())
    lr = opt.param_groups[0]["lr"]
    for metric in [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]:
        assert sched.report(metric) is False
    assert opt.param_groups[0]["lr"] == lr
    assert sched.state_dict() == state


# ------------------------------------------------------------------------------- resumability


def _round_trip_policy(decay: str) -> SchedulePolicy:
    return SchedulePolicy(
        total_steps=60,
        warmup_steps=4,
        decay=decay,
        min_factor=0.05,
        warmup="exponential",
        gamma=0.8,
        step_size=7,
        cycle_low=0.3,
        cycle_half_steps=5,
        plateau_factor=0.5,
        plateau_patience=1,
        plateau_threshold=0.01,
        plateau_cooldown=1,
    )


def _drive(optimizer, scheduler, start: int, steps: int) -> list[float]:
    """Train ``steps`` steps from step ``start``, reporting a metric every 3 steps."""
    out = []
    for s in range(start, start + steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        if (s + 1) % 3 == 0:
            metric = 50 * 0.8 ** (s // 3) if s < 30 else 5.0 + 0.001 * ((s * 7) % 5)
            scheduler.report(metric)
            out.append(optimizer.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("decay", DECAYS)
def test_every_policy_round_trips_through_weights_only_checkpoint(decay):
    policy = _round_trip_policy(decay)
    opt = _optimizer()
    sched = make_scheduler(opt, policy)
    _drive(opt, sched, 0, 46)
    if decay == "plateau":  # mid-way: reduced once, one stall counted since
        assert sched.plateau_scale == 0.5
        assert sched.plateau_bad_reports == 1
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    expected = _drive(opt, sched, 46, 60)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert "policy" not in saved["sched"]
    fresh_opt = _optimizer()
    fresh = make_scheduler(fresh_opt, _round_trip_policy(decay))
    fresh_opt.load_state_dict(saved["opt"])
    fresh.load_state_dict(saved["sched"])
    assert fresh.last_epoch == 46
    resumed = _drive(fresh_opt, fresh, 46, 60)
    assert resumed == expected
    if decay != "none":
        assert len(set(expected)) > 2  # the rate keeps moving after the checkpoint
    if decay == "plateau":
        assert min(expected) == pytest.approx(BASE_LR * 0.05, rel=1e-12)


def test_state_of_the_former_lambda_lr_scheduler_loads():
    policy = SchedulePolicy(total_steps=30, warmup_steps=5, decay="cosine", min_factor=0.1)
    old_opt = _optimizer()
    old = torch.optim.lr_scheduler.LambdaLR(old_opt, policy.factor)
    _lrs(old_opt, old, 9)
    buffer = io.BytesIO()
    torch.save({"opt": old_opt.state_dict(), "sched": old.state_dict()}, buffer)
    expected = _lrs(old_opt, old, 25)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    opt = _optimizer()
    sched = make_scheduler(opt, policy)
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    assert "lr_lambdas" not in sched.state_dict()
    assert _lrs(opt, sched, 25) == expected


def test_base_rate_follows_initial_lr():
    """Overwriting a group's ``initial_lr`` moves the whole curve from the next step on."""
    policy = SchedulePolicy(total_steps=20, decay="cosine", min_factor=0.2)
    opt = _optimizer()
    sched = make_scheduler(opt, policy)
    _lrs(opt, sched, 6)
    opt.param_groups[0]["initial_lr"] = 3 * BASE_LR
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(3 * BASE_LR * policy.factor(7), rel=1e-15)
    assert sched.base_lrs == [3 * BASE_LR]


# -------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(warmup="cosine"), "unknown warmup 'cosine'; allowed: none, linear, exponential"),
        (dict(decay="cyclic"), "unknown decay 'cyclic'; allowed: none, step, exponential"),
        (dict(warmup="none", warmup_steps=5), "warmup_steps must be 0 when warmup is 'none'"),
        (dict(warmup_start_factor=0.0), r"warmup_start_factor must be in \(0, 1\]"),
        (dict(warmup_start_factor=1.5), r"warmup_start_factor must be in \(0, 1\]"),
        (dict(warmup_start_factor=math.nan), r"warmup_start_factor must be in \(0, 1\]"),
        (dict(gamma=0.0), r"gamma must be in \(0, 1\]"),
        (dict(gamma=1.01), r"gamma must be in \(0, 1\]"),
        (dict(gamma="0.5"), "gamma must be a number"),
        (dict(step_size=0), "step_size must be >= 1"),
        (dict(step_size=2.5), r"step_size must be >= 1 \(an integer\)"),
        (dict(cycle_low=0.0), r"cycle_low must be in \(0, 1\]"),
        (dict(cycle_low=2.0), r"cycle_low must be in \(0, 1\]"),
        (dict(cycle_half_steps=0), "cycle_half_steps must be >= 1"),
        (dict(plateau_factor=1.0), r"plateau_factor must be in \(0, 1\)"),
        (dict(plateau_factor=0.0), r"plateau_factor must be in \(0, 1\)"),
        (dict(plateau_patience=-1), "plateau_patience must be >= 0"),
        (dict(plateau_threshold=-0.1), r"plateau_threshold must be in \[0, 1\)"),
        (dict(plateau_threshold=1.0), r"plateau_threshold must be in \[0, 1\)"),
        (dict(plateau_cooldown=-1), "plateau_cooldown must be >= 0"),
        (dict(total_steps=True), "total_steps must be >= 1"),
    ],
)
def test_invalid_new_fields_raise(kwargs, match):
    fields = dict(total_steps=10)
    fields.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SchedulePolicy(**fields)


def test_boundary_values_are_allowed():
    policy = SchedulePolicy(
        total_steps=10,
        warmup_steps=3,
        warmup="exponential",
        warmup_start_factor=1.0,
        gamma=1.0,
        cycle_low=1.0,
        plateau_threshold=0.0,
        plateau_patience=0,
        plateau_cooldown=0,
    )
    assert [policy.factor(s) for s in range(5)] == [1.0] * 5
    for decay in ("step", "cyclic_triangular", "cyclic_triangular2"):
        flat = SchedulePolicy(total_steps=10, decay=decay, gamma=1.0, cycle_low=1.0, step_size=1)
        assert [flat.factor(s) for s in range(20)] == [1.0] * 20
    assert SchedulePolicy(total_steps=10, warmup="none").warmup_steps == 0


def test_defaults_keep_todays_behaviour():
    policy = SchedulePolicy(total_steps=10)
    assert (policy.warmup_steps, policy.decay, policy.min_factor, policy.warmup) == (
        0,
        "none",
        0.1,
        "linear",
    )
