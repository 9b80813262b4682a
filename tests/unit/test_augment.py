"""gan.augment: the DiffAugment ops against reference computations, ADA's per-image probability,
determinism under a seed, differentiability into G, and the adaptive p controller."""

from __future__ import annotations

import io

import pytest
import torch

from gan.augment import (
    AUGMENTATIONS,
    AdaptiveAugment,
    Augment,
    augment,
    cutout_size,
    parse_kinds,
)
from gan.nn.models import Generator

ALL = "translation,cutout,color"


def _images(n: int, c: int = 1, side: int = 16, seed: int = 0) -> torch.Tensor:
    """Values in [-1, 1] without zeros, so that zero pixels in an output come from the op."""
    x = torch.rand(n, c, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.where(x.abs() < 1e-3, torch.full_like(x, 0.5), x)


def _rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _shift_reference(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[r, c] = image[r - dy, c - dx], zero where that falls outside (by slicing)."""
    out = torch.zeros_like(image)
    _, h, w = image.shape
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        :, max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


# ------------------------------------------------------------------------------------ parsing


def test_parse_kinds_orders_dedupes_and_accepts_empty():
    assert AUGMENTATIONS == ("color", "translation", "cutout")
    assert parse_kinds("cutout, translation") == ("translation", "cutout")
    assert parse_kinds(["cutout", "color", "cutout"]) == ("color", "cutout")
    assert parse_kinds("") == ()
    assert parse_kinds(" , ") == ()


@pytest.mark.parametrize("bad", ["flip", "translation,rotate", "Cutout"])
def test_unknown_kinds_are_refused_listing_the_allowed_ones(bad):
    with pytest.raises(
        ValueError, match=r"unknown augmentation .*allowed: color, translation, cut"
    ):
        parse_kinds(bad)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_probability_outside_0_1_is_refused(p):
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        Augment("cutout", p=p)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        augment(_images(2), "cutout", p=p)


def test_non_image_batches_are_refused():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        augment(torch.zeros(2, 16, 16), "cutout")


# --------------------------------------------------------------------------------- the ops


@pytest.mark.parametrize("side", [8, 16, 32])
def test_translation_is_an_integer_shift_of_at_most_an_eighth_with_zero_fill(side):
    x = _images(64, c=2, side=side)
    out = augment(x, "translation", p=1.0, rng=_rng(1))
    limit = int(side / 8 + 0.5)
    seen = set()
    for image, shifted in zip(x, out, strict=True):
        matches = [
            (dy, dx)
            for dy in range(-limit, limit + 1)
            for dx in range(-limit, limit + 1)
            if torch.equal(shifted, _shift_reference(image, dy, dx))
        ]
        assert len(matches) == 1, matches
        seen.add(matches[0])
    # 64 draws over (2 * limit + 1)^2 shifts: the extremes occur, so the range is the full one.
    assert {dy for dy, _ in seen} == set(range(-limit, limit + 1))
    assert {dx for _, dx in seen} == set(range(-limit, limit + 1))


@pytest.mark.parametrize("side", [8, 16])
def test_cutout_zeroes_exactly_a_quarter_as_one_square_inside_the_image(side):
    x = _images(200, c=3, side=side)
    out = augment(x, "cutout", p=1.0, rng=_rng(2))
    size = cutout_size(side)
    assert size == side // 2
    zero = out == 0
    assert torch.equal(zero[:, 0], zero[:, 1]) and torch.equal(zero[:, 0], zero[:, 2])
    per_image = zero[:, 0].flatten(1).float().mean(1)
    assert torch.equal(per_image, torch.full((200,), 0.25))
    tops = set()
    for mask in zero[:, 0]:
        rows, cols = mask.nonzero(as_tuple=True)
        top, left = int(rows.min()), int(cols.min())
        expected = torch.zeros_like(mask)
        expected[top : top + size, left : left + size] = True
        assert torch.equal(mask, expected)
        tops.add(top)
    assert tops == set(range(side - size + 1))  # every position inside the image is reachable
    untouched = ~zero
    assert torch.equal(out[untouched], x[untouched])


def test_color_matches_the_diffaugment_formulas_on_3_channels():
    x = _images(16, c=3, side=8)
    out = augment(x, "color", p=1.0, rng=_rng(3))
    # Reference: the same draws in the documented order (decision, brightness, saturation,
    # contrast), then DiffAugment's rand_brightness, rand_saturation, rand_contrast.
    rng = _rng(3)
    decision = torch.rand(16, generator=rng)
    b = torch.rand(16, 1, 1, 1, generator=rng) - 0.5
    s = torch.rand(16, 1, 1, 1, generator=rng) * 2
    c = torch.rand(16, 1, 1, 1, generator=rng) + 0.5
    assert (decision < 1.0).all()
    y = x + b
    y = (y - y.mean(dim=1, keepdim=True)) * s + y.mean(dim=1, keepdim=True)
    y = (y - y.mean(dim=(1, 2, 3), keepdim=True)) * c + y.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(out, y)
    assert not torch.equal(out, x)


def test_color_leaves_single_channel_batches_alone_and_draws_nothing():
    x = _images(8, c=1)
    rng = _rng(4)
    before = rng.get_state()
    assert augment(x, "color", p=1.0, rng=rng) is x
    assert torch.equal(rng.get_state(), before)
    # With other kinds the 1-channel batch gets exactly what it would get without colour.
    torch.testing.assert_close(
        augment(x, "color,translation", rng=_rng(5)), augment(x, "translation", rng=_rng(5))
    )


def test_p_zero_or_no_kinds_is_the_identity_and_draws_nothing():
    x = _images(8, c=3)
    for kinds, p in ((ALL, 0.0), ("", 1.0)):
        rng = _rng(6)
        before = rng.get_state()
        assert Augment(kinds, p=p, rng=rng)(x) is x
        assert torch.equal(rng.get_state(), before)


def test_shapes_dtype_and_range_are_kept_by_translation_and_cutout():
    for dtype in (torch.float32, torch.float64):
        x = _images(32, c=3).to(dtype)
        x[0] = 1.0
        x[1] = -1.0
        out = augment(x, "translation,cutout", rng=_rng(7))
        assert out.shape == x.shape and out.dtype == dtype
        assert out.min() >= -1.0 and out.max() <= 1.0


def test_each_image_is_augmented_with_probability_p():
    x = _images(4000, c=1, side=8)
    for p in (0.2, 0.7):
        out = augment(x, "cutout", p=p, rng=_rng(8))
        changed = (out != x).flatten(1).any(1).float()
        assert abs(changed.mean().item() - p) < 0.03, (p, changed.mean().item())
        # The images left alone are exactly the input.
        kept = changed == 0
        assert torch.equal(out[kept], x[kept])


def test_a_seed_fixes_the_batch_and_another_seed_changes_it():
    x = _images(16, c=3)
    a = Augment(ALL, p=0.5, rng=_rng(9))(x)
    b = Augment(ALL, p=0.5, rng=_rng(9))(x)
    c = Augment(ALL, p=0.5, rng=_rng(10))(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Successive calls on one generator continue its stream: a fresh batch of augmentations.
    pipeline = Augment(ALL, p=1.0, rng=_rng(9))
    assert not torch.equal(pipeline(x), pipeline(x))


def test_the_draws_do_not_depend_on_p():
    """Between two p > 0 the generator advances the same way (a resumed ADA run stays aligned)."""
    x = _images(8, c=3)
    states = []
    for p in (0.1, 1.0):
        rng = _rng(11)
        augment(x, ALL, p=p, rng=rng)
        states.append(rng.get_state())
    assert torch.equal(states[0], states[1])


def test_p_is_checked_when_changed():
    pipeline = Augment("cutout", p=0.0)
    pipeline.p = 0.4
    assert pipeline.p == 0.4
    with pytest.raises(ValueError, match="p must be in"):
        pipeline.p = 2.0


# ---------------------------------------------------------------------------- differentiable


def test_gradients_reach_the_generator_through_every_op():
    torch.manual_seed(0)
    g = Generator(latent_dim=8, resolution=16, width=4, channels=3, norm="batch")
    z = torch.randn(6, 8, generator=_rng(12))
    for kinds in ("translation", "cutout", "color", ALL):
        g.zero_grad(set_to_none=True)
        out = Augment(kinds, p=1.0, rng=_rng(13))(g(z))
        out.pow(2).sum().backward()
        for name, param in g.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, (kinds, name)


def test_the_backward_pass_is_the_exact_jacobian():
    x = _images(2, c=3, side=8).double().requires_grad_(True)

    def fixed(images: torch.Tensor) -> torch.Tensor:  # one fixed draw, so the map is a function
        return augment(images, ALL, p=1.0, rng=_rng(14))

    assert torch.autograd.gradcheck(fixed, (x,))


# ------------------------------------------------------------------------------- controller


def test_controller_raises_p_while_d_is_sure_of_the_reals():
    ada = AdaptiveAugment(target=0.6, adjust_speed=2560, interval=4, p=0.0)
    history = [ada.update(1.0, images=64) for _ in range(48)]
    # p moves once per 4 steps by 4 * 64 / 2560 = 0.1, and stops at 1.
    for step, p in enumerate(history, start=1):
        assert p == pytest.approx(min(step // 4 * 0.1, 1.0)), step
    assert ada.signal == 1.0


def test_controller_lowers_p_when_d_is_unsure_of_the_reals():
    ada = AdaptiveAugment(target=0.6, adjust_speed=1000, interval=2, p=0.5)
    # Signal over an interval: (0.9 * 30 + 0.2 * 70) / 100 = 0.41 < 0.6 -> down by 100/1000.
    ada.update(0.9, images=30)
    assert ada.p == 0.5
    assert ada.update(torch.tensor(0.2), images=70) == pytest.approx(0.4)
    assert ada.signal == pytest.approx(0.41)
    for _ in range(20):
        ada.update(-1.0, images=50)
    assert ada.p == 0.0


def test_controller_does_not_move_at_the_target():
    ada = AdaptiveAugment(target=0.5, adjust_speed=100, interval=1, p=0.3)
    assert ada.update(0.5, images=10) == 0.3


def test_controller_state_round_trips_mid_interval_through_a_weights_only_checkpoint():
    feed = [(0.9, 64), (0.7, 64), (0.1, 64), (0.8, 64), (1.0, 64), (0.2, 64), (0.95, 64)] * 3
    a = AdaptiveAugment(target=0.6, adjust_speed=3000, interval=4, p=0.2)
    for value, n in feed[:6]:  # 6 steps: one adjustment and half of the next interval
        a.update(value, n)
    buffer = io.BytesIO()
    torch.save({"ada": a.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["ada"]
    b = AdaptiveAugment(target=0.6, adjust_speed=3000, interval=4)
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    rest_a = [a.update(value, n) for value, n in feed[6:]]
    rest_b = [b.update(value, n) for value, n in feed[6:]]
    assert rest_a == rest_b
    assert len(set(rest_a)) > 1  # p did move after the restore
    with pytest.raises(ValueError, match="missing .*steps"):
        b.load_state_dict({"p": 0.1, "signal": None, "sign_sum": 0.0, "images": 0})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target": 1.0}, "target"),
        ({"adjust_speed": 0}, "adjust_speed"),
        ({"interval": 0}, "interval"),
        ({"p": 1.2}, "p must be in"),
    ],
)
def test_controller_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveAugment(**kwargs)


def test_controller_refuses_a_signal_that_is_not_a_mean_of_signs():
    ada = AdaptiveAugment()
    with pytest.raises(ValueError, match="real_sign"):
        ada.update(3.0, images=4)
    with pytest.raises(ValueError, match="images"):
        ada.update(0.5, images=0)


# ---------------------------------------------------------------------------- config section


def test_the_augment_config_section_reaches_the_api():
    from pipelines.config import Config, config_from_dict, load_config

    config = load_config(
        None,
        ["augment.kinds=cutout,translation", "augment.adaptive=true", "augment.p=0",
         "augment.adjust_speed=5000", "loss.lecam_weight=0.3", "loss.consistency_weight=10"],
    )  # fmt: skip
    assert Config().augment.kinds == "" and Config().loss.lecam_weight == 0.0
    assert config.flat()["augment.adjust_speed"] == 5000
    assert config_from_dict(config.to_dict()) == config
    pipeline = Augment(config.augment.kinds, p=config.augment.p)
    assert pipeline.kinds == ("translation", "cutout") and pipeline.p == 0.0
    a = config.augment
    ada = AdaptiveAugment(target=a.target, adjust_speed=a.adjust_speed, interval=a.interval, p=a.p)
    assert (ada.target, ada.adjust_speed, ada.interval, ada.p) == (0.6, 5000, 4, 0.0)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["augment.kinds=translation,flip"],
            r"augment.kinds: unknown augmentation 'flip'; allowed",
        ),
        (["augment.p=1.5"], r"augment.p must be in \[0, 1\]"),
        (["augment.target=1"], r"augment.target .* \(-1, 1\)"),
        (["augment.adjust_speed=0"], "augment.adjust_speed must be >= 1"),
        (["augment.interval=0"], "augment.interval must be >= 1"),
        (["augment.adaptive=true"], "augment.adaptive .*set augment.kinds"),
        (["loss.lecam_weight=-1"], "loss.lecam_weight must be >= 0"),
        (["loss.consistency_weight=-1"], "loss.consistency_weight must be >= 0"),
        (["loss.consistency_weight=1"], "loss.consistency_weight .*set augment.kinds"),
    ],
)
def test_the_augment_config_refuses_bad_values_naming_the_key(overrides, match):
    from pipelines.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)
