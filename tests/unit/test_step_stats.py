"""gan.step_stats: a step's raw tensors, and the window means derived from them at once."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gan.nn.models import Discriminator, Generator
from gan.step import train_step
from gan.step_stats import FIGURES, StatsWindow, StepStats

LATENT, RES, BATCH = 8, 8, 8


def _t(*values: float) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(v) for v in values)


def _stats(seed: int, **extra) -> StepStats:
    g = torch.Generator().manual_seed(seed)
    norms = tuple(torch.rand(3, generator=g).unbind())
    return StepStats(
        loss_d=torch.rand((), generator=g),
        loss_g=torch.rand((), generator=g),
        real_logits=torch.randn(BATCH, 1, generator=g),
        fake_logits=torch.randn(BATCH, 1, generator=g),
        grad_norms_d=(norms,),
        grad_norms_g=norms[:2],
        **extra,
    )


def _by_hand(stats: StepStats, name: str) -> float:
    """The step's own figure, computed in Python floats; an unused penalty is zero."""
    if name in ("d_real", "d_fake"):
        logits = (stats.real_logits if name == "d_real" else stats.fake_logits).flatten()
        return sum(1 / (1 + math.exp(-float(x))) for x in logits) / len(logits)
    if name in ("grad_norm_d", "grad_norm_g"):
        updates = stats.grad_norms_d if name == "grad_norm_d" else (stats.grad_norms_g,)
        totals = [math.sqrt(sum(float(n) ** 2 for n in norms)) for norms in updates]
        return sum(totals) / len(totals) if totals else 0.0
    value = getattr(stats, name)
    return 0.0 if value is None else float(value)


def _window_of(steps: list[StepStats]) -> dict[str, float]:
    window = StatsWindow()
    for s in steps:
        window.add(s)
    means = window.means()
    assert means.dtype == torch.float32 and means.shape == (len(FIGURES),)
    return dict(zip(FIGURES, means.tolist(), strict=True))


def _assert_means_by_hand(steps: list[StepStats], figures: dict[str, float]) -> None:
    for name in FIGURES:
        expected = sum(_by_hand(s, name) for s in steps) / len(steps)
        assert figures[name] == pytest.approx(expected, rel=1e-5, abs=1e-6), name


def test_window_means_are_the_means_of_every_steps_own_figures():
    steps = [_stats(seed) for seed in range(5)]
    _assert_means_by_hand(steps, _window_of(steps))
    for s in steps:  # a step's own figures, one at a time
        for name in ("d_real", "d_fake", "grad_norm_d", "grad_norm_g"):
            assert float(getattr(s, name)) == pytest.approx(_by_hand(s, name), rel=1e-5), name


def test_a_penalty_applied_on_some_steps_is_averaged_over_all_of_them():
    steps = [
        _stats(seed, r1=r1)
        for seed, r1 in enumerate([torch.tensor(0.8), None, torch.tensor(0.4), None])
    ]
    figures = _window_of(steps)
    assert figures["r1"] == pytest.approx((0.8 + 0.4) / 4)
    assert figures["gp"] == figures["lecam"] == figures["consistency"] == 0.0


def test_steps_of_different_batch_sizes_weigh_alike():
    def step(logit: float, batch: int) -> StepStats:
        return StepStats(
            loss_d=torch.tensor(1.0),
            loss_g=torch.tensor(1.0),
            real_logits=torch.full((batch, 1), logit),
            fake_logits=torch.zeros(batch, 1),
        )

    figures = _window_of([step(50.0, 6), step(-50.0, 2)])  # sigmoids 1 and 0
    assert figures["d_real"] == pytest.approx(0.5)  # not 6/8: the mean of the two steps' means
    assert figures["grad_norm_d"] == figures["grad_norm_g"] == 0.0


def test_several_d_updates_take_the_mean_of_each_updates_total_norm():
    two_updates = dataclasses.replace(_stats(0), grad_norms_d=(_t(3.0, 4.0), _t(0.0, 1.0)))
    assert two_updates.grad_norm_d.item() == pytest.approx(3.0)  # norms 5 and 1
    steps = [two_updates, dataclasses.replace(_stats(1), grad_norms_d=(_t(6.0, 8.0), _t(0.0, 2.0)))]
    assert _window_of(steps)["grad_norm_d"] == pytest.approx((3.0 + 6.0) / 2)


def test_steps_whose_parameters_or_updates_differ_each_count_their_own_total():
    three_parameters = dataclasses.replace(_stats(1), grad_norms_g=_t(3.0, 4.0, 0.0))
    steps = [_stats(0), three_parameters]
    _assert_means_by_hand(steps, _window_of(steps))

    # As many norms in both steps, but one update of 4 parameters against two of 2.
    one_update = dataclasses.replace(_stats(2), grad_norms_d=(_t(3.0, 4.0, 0.0, 12.0),))
    two_updates = dataclasses.replace(_stats(3), grad_norms_d=(_t(3.0, 4.0), _t(0.0, 1.0)))
    no_gradients = dataclasses.replace(_stats(4), grad_norms_d=((),))
    figures = _window_of([one_update, two_updates, no_gradients])
    assert figures["grad_norm_d"] == pytest.approx((13.0 + 3.0 + 0.0) / 3)

    # The same parameters, one update in one step and two in the other: each step weighs alike.
    one_of_two = dataclasses.replace(_stats(5), grad_norms_d=(_t(3.0, 4.0),))
    assert _window_of([one_of_two, two_updates])["grad_norm_d"] == pytest.approx((5.0 + 3.0) / 2)


def test_a_long_window_folds_its_steps_and_keeps_the_same_means():
    steps = [
        _stats(seed, r1=torch.tensor(0.5) if seed % 3 == 0 else None)
        for seed in range(2 * StatsWindow.FOLD_STEPS + 5)
    ]
    window = StatsWindow()
    for s in steps:
        window.add(s)
    assert len(window) == len(steps) and len(window._steps) == 5  # the rest folded into sums
    figures = dict(zip(FIGURES, window.means().tolist(), strict=True))
    _assert_means_by_hand(steps, figures)


def test_an_empty_window_refuses_to_average_and_clear_empties_it():
    window = StatsWindow()
    with pytest.raises(ValueError, match="holds no steps"):
        window.means()
    for seed in range(StatsWindow.FOLD_STEPS + 1):
        window.add(_stats(seed))
    window.clear()
    assert len(window) == 0
    with pytest.raises(ValueError, match="holds no steps"):
        window.means()
    window.add(_stats(0))
    _assert_means_by_hand([_stats(0)], dict(zip(FIGURES, window.means().tolist(), strict=True)))


def test_train_steps_through_a_window_give_the_means_of_their_own_figures():
    torch.manual_seed(0)
    g = Generator(latent_dim=LATENT, resolution=RES, width=4, norm="batch")
    d = Discriminator(resolution=RES, width=4, norm="batch")
    opt_g = torch.optim.Adam(g.parameters(), 2e-4)
    opt_d = torch.optim.Adam(d.parameters(), 2e-4)
    rng = torch.Generator().manual_seed(1)
    steps = []
    for step in range(4):
        real = torch.rand(BATCH, 1, RES, RES, generator=rng) * 2 - 1
        steps.append(
            train_step(
                generator=g,
                discriminator=d,
                opt_g=opt_g,
                opt_d=opt_d,
                real=real,
                latent_dim=LATENT,
                rng=rng,
                step=step,
                d_steps=2,
                r1_gamma=1.0,
                r1_interval=3,
            )  # fmt: skip
        )
    _assert_means_by_hand(steps, _window_of(steps))
    assert all(len(s.grad_norms_d) == 2 for s in steps)  # one set of norms per D update
    assert all(len(norms) == len(list(d.parameters())) for s in steps for norms in s.grad_norms_d)
    # R1 ran on D updates 0, 3 and 6 of the 8: on steps 0, 1 and 3.
    assert [s.r1 is not None for s in steps] == [True, True, False, True]
