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


def _stats(seed: int, **extra) -> StepStats:
    g = torch.Generator().manual_seed(seed)
    norms = tuple(torch.rand(3, generator=g).unbind())
    return StepStats(
        loss_d=torch.rand((), generator=g),
        loss_g=torch.rand((), generator=g),
        real_logits=torch.randn(BATCH, 1, generator=g),
        fake_logits=torch.randn(BATCH, 1, generator=g),
        grad_norms_d=norms,
        grad_norms_g=norms[:2],
        **extra,
    )


def _eager(stats: StepStats, name: str) -> float:
    """The step's own figure, computed by hand; an unused penalty is zero."""
    if name in ("d_real", "d_fake"):
        logits = stats.real_logits if name == "d_real" else stats.fake_logits
        return float(torch.sigmoid(logits).mean())
    if name in ("grad_norm_d", "grad_norm_g"):
        norms = stats.grad_norms_d if name == "grad_norm_d" else stats.grad_norms_g
        per_update = len(norms) // (stats.d_updates if name == "grad_norm_d" else 1)
        totals = [
            math.sqrt(sum(float(n) ** 2 for n in norms[i : i + per_update]))
            for i in range(0, len(norms), per_update)
        ]
        return sum(totals) / len(totals) if totals else 0.0
    value = getattr(stats, name)
    return 0.0 if value is None else float(value)


def test_window_means_are_the_means_of_every_steps_own_figures():
    steps = [_stats(seed) for seed in range(5)]
    window = StatsWindow()
    for s in steps:
        window.add(s)
    means = window.means()
    assert means.dtype == torch.float32 and means.shape == (len(FIGURES),)
    for name, value in zip(FIGURES, means.tolist(), strict=True):
        expected = sum(_eager(s, name) for s in steps) / len(steps)
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-7), name


def test_a_penalty_applied_on_some_steps_is_averaged_over_all_of_them():
    window = StatsWindow()
    for seed, r1 in enumerate([torch.tensor(0.8), None, torch.tensor(0.4), None]):
        window.add(_stats(seed, r1=r1))
    figures = dict(zip(FIGURES, window.means().tolist(), strict=True))
    assert figures["r1"] == pytest.approx((0.8 + 0.4) / 4)
    assert figures["gp"] == figures["lecam"] == figures["consistency"] == 0.0


def test_steps_of_different_batch_sizes_weigh_alike():
    big = StepStats(
        loss_d=torch.tensor(1.0),
        loss_g=torch.tensor(1.0),
        real_logits=torch.full((6, 1), 50.0),  # sigmoid 1
        fake_logits=torch.zeros(6, 1),
    )
    small = StepStats(
        loss_d=torch.tensor(1.0),
        loss_g=torch.tensor(1.0),
        real_logits=torch.full((2, 1), -50.0),  # sigmoid 0
        fake_logits=torch.zeros(2, 1),
    )
    window = StatsWindow()
    window.add(big)
    window.add(small)
    figures = dict(zip(FIGURES, window.means().tolist(), strict=True))
    assert figures["d_real"] == pytest.approx(0.5)  # not 6/8: the mean of the two steps' means
    assert figures["grad_norm_d"] == figures["grad_norm_g"] == 0.0


def test_d_updates_take_the_mean_of_each_updates_total_norm():
    three, four = torch.tensor(3.0), torch.tensor(4.0)
    stats = StepStats(
        loss_d=torch.tensor(0.0),
        loss_g=torch.tensor(0.0),
        real_logits=torch.zeros(4, 1),
        fake_logits=torch.zeros(4, 1),
        grad_norms_d=(three, four, torch.tensor(0.0), torch.tensor(1.0)),  # norms 5 and 1
        d_updates=2,
    )
    assert stats.grad_norm_d.item() == pytest.approx(3.0)
    window = StatsWindow()
    window.add(stats)
    assert dict(zip(FIGURES, window.means().tolist(), strict=True))["grad_norm_d"] == 3.0
    with pytest.raises(ValueError, match="not a whole number per each of d_updates=2"):
        StepStats(
            loss_d=three, loss_g=three, real_logits=three, fake_logits=three,
            grad_norms_d=(three, four, three), d_updates=2,
        )  # fmt: skip


def test_steps_whose_parameters_with_gradients_differ_each_count_their_own_total():
    window = StatsWindow()
    window.add(_stats(0))
    three_parameters = (torch.tensor(3.0), torch.tensor(4.0), torch.tensor(0.0))
    window.add(dataclasses.replace(_stats(1), grad_norms_g=three_parameters))
    expected = (_eager(_stats(0), "grad_norm_g") + 5.0) / 2
    figures = dict(zip(FIGURES, window.means().tolist(), strict=True))
    assert figures["grad_norm_g"] == pytest.approx(expected, rel=1e-6)

    # As many norms in both steps, but of one update of 4 parameters and two of 2 (norms 5, 1).
    mixed = StatsWindow()
    mixed.add(dataclasses.replace(_stats(2), grad_norms_d=three_parameters + (torch.tensor(12.0),)))
    mixed.add(
        dataclasses.replace(
            _stats(3),
            grad_norms_d=(
                torch.tensor(3.0),
                torch.tensor(4.0),
                torch.tensor(0.0),
                torch.tensor(1.0),
            ),
            d_updates=2,
        )
    )
    figures = dict(zip(FIGURES, mixed.means().tolist(), strict=True))
    assert figures["grad_norm_d"] == pytest.approx((13.0 + 3.0) / 2)


def test_an_empty_window_refuses_to_average_and_clear_empties_it():
    window = StatsWindow()
    with pytest.raises(ValueError, match="holds no steps"):
        window.means()
    window.add(_stats(0))
    assert len(window) == 1
    window.clear()
    assert len(window) == 0


def test_train_steps_through_a_window_give_the_means_of_their_own_figures():
    torch.manual_seed(0)
    g = Generator(latent_dim=LATENT, resolution=RES, width=4, norm="batch")
    d = Discriminator(resolution=RES, width=4, norm="batch")
    opt_g = torch.optim.Adam(g.parameters(), 2e-4)
    opt_d = torch.optim.Adam(d.parameters(), 2e-4)
    rng = torch.Generator().manual_seed(1)
    window, per_step = StatsWindow(), []
    for step in range(4):
        real = torch.rand(BATCH, 1, RES, RES, generator=rng) * 2 - 1
        stats = train_step(
            generator=g, discriminator=d, opt_g=opt_g, opt_d=opt_d, real=real,
            latent_dim=LATENT, rng=rng, step=step, d_steps=2, r1_gamma=1.0, r1_interval=3,
        )  # fmt: skip
        window.add(stats)
        per_step.append({name: getattr(stats, name) for name in FIGURES})
    for name, value in zip(FIGURES, window.means().tolist(), strict=True):
        own = [0.0 if s[name] is None else float(s[name]) for s in per_step]
        assert value == pytest.approx(sum(own) / len(own), rel=1e-5, abs=1e-7), name
    # R1 ran on D updates 0, 3 and 6 of the 8: on steps 0, 1 and 3.
    assert [s["r1"] is not None for s in per_step] == [True, True, False, True]
