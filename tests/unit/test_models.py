"""gan.nn.models: shapes at every resolution, the DCGAN layer rules, and the normalizations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gan.nn.models import Discriminator, Generator, check_resolution
from gan.nn.normalization import (
    GENERATOR_NORMALIZATIONS,
    NORMALIZATIONS,
    frozen_bn_stats,
    make_norm,
    recompute_bn_statistics,
)
from gan.nn.sync_batchnorm import SyncBatchNorm

RESOLUTIONS = (8, 16, 32, 64, 128, 256)
ALLOWED_TEXT = "8, 16, 32, 64, 128, 256"
LATENT = 8
WIDTH = 4
BATCH = 2


def _norm_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_check_resolution_accepts_powers_of_two_8_to_256(resolution):
    assert check_resolution(resolution) is None


@pytest.mark.parametrize("bad", [0, 4, 12, 24, 512, 16.0, -8, 1, True])
def test_check_resolution_refuses_with_allowed_values(bad):
    with pytest.raises(ValueError) as info:
        check_resolution(bad)
    message = str(info.value)
    assert repr(bad) in message
    assert ALLOWED_TEXT in message


@pytest.mark.parametrize("bad", [4, 12, 512])
def test_models_refuse_unbuildable_resolutions(bad):
    with pytest.raises(ValueError, match=ALLOWED_TEXT):
        Generator(resolution=bad, width=WIDTH)
    with pytest.raises(ValueError, match=ALLOWED_TEXT):
        Discriminator(resolution=bad, width=WIDTH)


def test_unknown_norm_is_refused_with_the_allowed_names():
    with pytest.raises(ValueError, match="batch, sync_batch, none"):
        make_norm("layer", 4)
    with pytest.raises(ValueError, match="unknown normalization 'layer'"):
        Generator(resolution=8, width=WIDTH, norm="layer")
    for resolution in (8, 16):  # at 8, D has no normalized layer, yet the name is checked
        with pytest.raises(ValueError, match="unknown normalization 'group'"):
            Discriminator(resolution=resolution, width=WIDTH, norm="group")


@pytest.mark.parametrize("norm", GENERATOR_NORMALIZATIONS)  # "spectral": D only, tested below
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_shapes_and_depth(resolution, channels, norm):
    torch.manual_seed(0)
    g = Generator(
        latent_dim=LATENT, resolution=resolution, channels=channels, width=WIDTH, norm=norm
    )
    d = Discriminator(resolution=resolution, channels=channels, width=WIDTH, norm=norm)
    images = g(torch.randn(BATCH, LATENT))
    assert images.shape == (BATCH, channels, resolution, resolution)
    logits = d(images)
    assert logits.shape == (BATCH,)
    assert torch.isfinite(logits).all()

    blocks = int(math.log2(resolution)) - 2
    g_convs = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    d_convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert len(g_convs) == blocks + 1
    assert len(d_convs) == blocks + 1
    # Width halves at each doubling in G, doubles at each halving in D, as in DCGAN.
    assert [c.out_channels for c in g_convs] == [
        WIDTH * 2 ** (blocks - 1 - i) for i in range(blocks)
    ] + [channels]
    assert [c.in_channels for c in d_convs] == [channels] + [WIDTH * 2**i for i in range(blocks)]
    assert g_convs[0].in_channels == LATENT
    assert d_convs[-1].out_channels == 1
    expected_norms = 0 if norm == "none" else blocks
    assert len(_norm_layers(g)) == expected_norms
    assert len(_norm_layers(d)) == (0 if norm == "none" else blocks - 1)


@pytest.mark.parametrize("norm", ["batch", "sync_batch"])
@pytest.mark.parametrize("resolution", [8, 16, 32, 64])
def test_dcgan_rule_no_norm_on_g_output_or_d_input(resolution, norm):
    g = Generator(latent_dim=LATENT, resolution=resolution, width=WIDTH, norm=norm)
    d = Discriminator(resolution=resolution, width=WIDTH, norm=norm)
    norm_type = nn.BatchNorm2d if norm == "batch" else SyncBatchNorm

    g_layers = list(g.net)
    assert isinstance(g_layers[-1], nn.Tanh)
    assert isinstance(g_layers[-2], nn.ConvTranspose2d)
    assert g_layers[-2].bias is not None  # no norm after it, so it keeps its bias
    # Every norm in G follows a bias-free conv and is followed by a ReLU.
    for i, layer in enumerate(g_layers):
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            assert type(layer) is norm_type
            assert isinstance(g_layers[i - 1], nn.ConvTranspose2d)
            assert g_layers[i - 1].bias is None
            assert isinstance(g_layers[i + 1], nn.ReLU)
            assert i < len(g_layers) - 3

    d_layers = list(d.net)
    assert isinstance(d_layers[0], nn.Conv2d)
    assert d_layers[0].bias is not None
    assert isinstance(d_layers[1], nn.LeakyReLU)
    assert isinstance(d_layers[-1], nn.Conv2d)  # raw logits: no norm, no sigmoid
    for i, layer in enumerate(d_layers):
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            assert type(layer) is norm_type
            assert i > 2
            assert isinstance(d_layers[i - 1], nn.Conv2d)
            assert d_layers[i - 1].bias is None
            assert isinstance(d_layers[i + 1], nn.LeakyReLU)


@pytest.mark.parametrize("norm", GENERATOR_NORMALIZATIONS)
def test_generator_output_is_within_tanh_range(norm):
    torch.manual_seed(1)
    g = Generator(latent_dim=LATENT, resolution=16, channels=3, width=WIDTH, norm=norm)
    with torch.no_grad():
        for p in g.parameters():
            p.mul_(50.0)  # push the tanh into saturation
        out = g(torch.randn(16, LATENT) * 10)
    assert out.min() >= -1.0
    assert out.max() <= 1.0
    # Saturated but still a real image, not a constant.
    assert out.abs().max() > 0.99
    assert out.std() > 0.1


@pytest.mark.parametrize("resolution", [8, 32])
def test_norm_none_has_no_batchnorm_and_keeps_all_biases(resolution):
    g = Generator(latent_dim=LATENT, resolution=resolution, width=WIDTH, norm="none")
    d = Discriminator(resolution=resolution, width=WIDTH, norm="none")
    for model in (g, d):
        assert _norm_layers(model) == []
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
        assert convs and all(c.bias is not None for c in convs)


def test_dcgan_init_statistics():
    torch.manual_seed(2)
    g = Generator(latent_dim=64, resolution=32, width=32, norm="batch")
    convs = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert abs(weights.mean().item()) < 2e-3
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(convs[-1].bias) == 0
    scales = torch.cat([n.weight for n in _norm_layers(g)])
    assert scales.mean().item() == pytest.approx(1.0, abs=5e-3)
    assert scales.std().item() == pytest.approx(0.02, rel=0.2)
    assert all(torch.count_nonzero(n.bias) == 0 for n in _norm_layers(g))


@pytest.mark.parametrize("resolution", [8, 16])
def test_sync_batch_equals_batch_in_a_single_process(resolution):
    assert not (dist.is_available() and dist.is_initialized())
    models = {}
    for norm in ("batch", "sync_batch"):
        torch.manual_seed(3)
        models[norm] = (
            Generator(latent_dim=LATENT, resolution=resolution, channels=3, width=WIDTH, norm=norm),
            Discriminator(resolution=resolution, channels=3, width=WIDTH, norm=norm),
        )
    (g_b, d_b), (g_s, d_s) = models["batch"], models["sync_batch"]
    assert any(isinstance(m, SyncBatchNorm) for m in g_s.modules())
    assert not any(isinstance(m, SyncBatchNorm) for m in g_b.modules())
    for a, b in ((g_b, g_s), (d_b, d_s)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)

    z = torch.randn(6, LATENT)
    out_b, out_s = d_b(g_b(z)), d_s(g_s(z))
    assert torch.equal(out_b, out_s)
    out_b.sum().backward()
    out_s.sum().backward()
    for a, b in ((g_b, g_s), (d_b, d_s)):
        for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
            assert torch.equal(pa.grad, pb.grad), name
        # Running statistics were updated identically, so eval mode agrees too.
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for m in (g_b, g_s, d_b, d_s):
        m.eval()
    with torch.no_grad():
        assert torch.equal(d_b(g_b(z)), d_s(g_s(z)))


# ------------------------------------------------------------------ spectral norm, DCGAN options


def _is_spectral(module: nn.Module) -> bool:
    return torch.nn.utils.parametrize.is_parametrized(module, "weight") and any(
        type(p).__name__ == "_SpectralNorm" for p in module.parametrizations["weight"]
    )


def test_normalizations_keep_the_old_names_and_add_spectral():
    assert NORMALIZATIONS[:3] == ("batch", "sync_batch", "none")
    assert "spectral" in NORMALIZATIONS
    assert "spectral" not in GENERATOR_NORMALIZATIONS
    assert isinstance(make_norm("spectral", 4), nn.Identity)


@pytest.mark.parametrize("g_output_norm", [False, True])
def test_generator_refuses_spectral_norm(g_output_norm):
    with pytest.raises(ValueError, match="spectral norm is for the discriminator"):
        Generator(resolution=8, width=WIDTH, norm="spectral", g_output_norm=g_output_norm)


@pytest.mark.parametrize("d_input_norm", [False, True])
@pytest.mark.parametrize("resolution", [8, 16, 32])
def test_spectral_discriminator_wraps_every_conv_and_has_no_norm_layer(resolution, d_input_norm):
    torch.manual_seed(4)
    d = Discriminator(
        resolution=resolution, channels=3, width=WIDTH, norm="spectral", d_input_norm=d_input_norm
    )
    blocks = int(math.log2(resolution)) - 2
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == blocks + 1
    assert all(_is_spectral(c) for c in convs)  # input and output layers included
    assert _is_spectral(d.net[0]) and _is_spectral(d.net[-1])
    assert _norm_layers(d) == []
    assert all(c.bias is not None for c in convs)  # no norm layer takes the bias's place
    images = torch.rand(BATCH, 3, resolution, resolution) * 2 - 1
    for _ in range(30):  # power iterations, one per training forward
        logits = d(images)
    assert logits.shape == (BATCH,)
    for c in convs:
        sigma = torch.linalg.matrix_norm(c.weight.detach().flatten(1), ord=2)
        assert sigma.item() == pytest.approx(1.0, rel=0.05)


def test_spectral_discriminator_state_round_trips_and_trains():
    torch.manual_seed(5)
    d = Discriminator(resolution=16, width=WIDTH, norm="spectral")
    images = torch.rand(4, 1, 16, 16)
    d(images).sum().backward()
    originals = [p for n, p in d.named_parameters() if n.endswith("weight.original")]
    assert len(originals) == 3 and all(p.grad is not None for p in originals)
    torch.manual_seed(6)
    other = Discriminator(resolution=16, width=WIDTH, norm="spectral")
    other.load_state_dict(d.state_dict())
    d.eval()
    other.eval()
    with torch.no_grad():
        assert torch.equal(d(images), other(images))


@pytest.mark.parametrize("norm", ["batch", "sync_batch"])
@pytest.mark.parametrize("resolution", [8, 16])
def test_g_output_norm_puts_a_norm_before_the_tanh(resolution, norm):
    torch.manual_seed(7)
    g = Generator(
        latent_dim=LATENT, resolution=resolution, channels=3, width=WIDTH, norm=norm,
        g_output_norm=True,
    )  # fmt: skip
    layers = list(g.net)
    norm_type = nn.BatchNorm2d if norm == "batch" else SyncBatchNorm
    assert isinstance(layers[-1], nn.Tanh)
    assert type(layers[-2]) is norm_type and layers[-2].num_features == 3
    assert isinstance(layers[-3], nn.ConvTranspose2d) and layers[-3].out_channels == 3
    assert layers[-3].bias is None
    blocks = int(math.log2(resolution)) - 2
    assert len(_norm_layers(g)) == blocks + 1
    out = g(torch.randn(BATCH, LATENT))
    assert out.shape == (BATCH, 3, resolution, resolution)
    # Default: the DCGAN rule, no norm on G's output.
    default = list(Generator(latent_dim=LATENT, resolution=resolution, width=WIDTH, norm=norm).net)
    assert isinstance(default[-2], nn.ConvTranspose2d) and default[-2].bias is not None


def test_g_output_norm_with_norm_none_keeps_the_bias():
    g = Generator(latent_dim=LATENT, resolution=8, width=WIDTH, norm="none", g_output_norm=True)
    assert _norm_layers(g) == []
    convs = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert all(c.bias is not None for c in convs)


@pytest.mark.parametrize("norm", ["batch", "sync_batch"])
@pytest.mark.parametrize("resolution", [8, 16])
def test_d_input_norm_puts_a_norm_after_the_first_conv(resolution, norm):
    torch.manual_seed(8)
    d = Discriminator(resolution=resolution, width=WIDTH, norm=norm, d_input_norm=True)
    layers = list(d.net)
    norm_type = nn.BatchNorm2d if norm == "batch" else SyncBatchNorm
    assert isinstance(layers[0], nn.Conv2d) and layers[0].bias is None
    assert type(layers[1]) is norm_type and layers[1].num_features == WIDTH
    assert isinstance(layers[2], nn.LeakyReLU)
    blocks = int(math.log2(resolution)) - 2
    assert len(_norm_layers(d)) == blocks  # one more than the default's blocks - 1
    assert d(torch.rand(BATCH, 1, resolution, resolution)).shape == (BATCH,)
    default = Discriminator(resolution=resolution, width=WIDTH, norm=norm)
    assert len(_norm_layers(default)) == blocks - 1
    assert default.net[0].bias is not None and isinstance(default.net[1], nn.LeakyReLU)


def test_d_input_norm_with_norm_none_keeps_the_bias():
    d = Discriminator(resolution=16, width=WIDTH, norm="none", d_input_norm=True)
    assert _norm_layers(d) == []
    assert all(c.bias is not None for c in d.modules() if isinstance(c, nn.Conv2d))


# -------------------------------------------------------------------- batch-norm statistics tools


def _bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.named_buffers()}


@pytest.mark.parametrize("norm", ["batch", "sync_batch"])
def test_frozen_bn_stats_normalizes_with_batch_stats_but_updates_nothing(norm):
    torch.manual_seed(9)
    g = Generator(latent_dim=LATENT, resolution=16, width=WIDTH, norm=norm)
    g(torch.randn(4, LATENT))  # running stats away from their initial values
    reference = copy.deepcopy(g)
    before = _bn_buffers(g)
    z = torch.randn(5, LATENT)
    with torch.no_grad(), frozen_bn_stats(g):
        out = g(z)
    with torch.no_grad():
        expected = reference(z)  # train mode: batch statistics, and it updates its buffers
    assert torch.equal(out, expected)
    after = _bn_buffers(g)
    assert all(torch.equal(after[k], before[k]) for k in before)  # num_batches_tracked too
    assert not torch.equal(reference.net[1].running_mean, before["net.1.running_mean"])
    assert all(m.track_running_stats for m in _norm_layers(g))
    g(z)  # and they are updated again afterwards
    assert int(g.net[1].num_batches_tracked) == int(before["net.1.num_batches_tracked"]) + 1


def test_frozen_bn_stats_restores_the_flags_when_the_block_raises():
    g = Generator(latent_dim=LATENT, resolution=8, width=WIDTH)
    with pytest.raises(RuntimeError, match="inside"), frozen_bn_stats(g):
        assert not any(m.track_running_stats for m in _norm_layers(g))
        raise RuntimeError("inside")
    assert all(m.track_running_stats for m in _norm_layers(g))


def test_frozen_bn_stats_leaves_eval_mode_layers_alone():
    torch.manual_seed(10)
    g = Generator(latent_dim=LATENT, resolution=8, width=WIDTH).eval()
    z = torch.randn(3, LATENT)
    with torch.no_grad():
        expected = g(z)
        with frozen_bn_stats(g):
            assert torch.equal(g(z), expected)  # still the running statistics


def test_recompute_bn_statistics_on_one_layer_is_the_average_over_the_batches():
    torch.manual_seed(11)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        net(torch.randn(6, 4) * 5 + 3)  # stale statistics from "training"
    net.eval()
    batches = [torch.randn(5, 4) for _ in range(3)]
    assert recompute_bn_statistics(net, iter(batches)) == 3
    bn = net[1]
    with torch.no_grad():
        features = [net[0](z) for z in batches]
    # Equal batch sizes: the mean of the batch means is the mean of the concatenated batch; the
    # variance is the mean of the per-batch unbiased variances (momentum=None averaging).
    torch.testing.assert_close(bn.running_mean, torch.cat(features).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([f.var(0) for f in features]).mean(0))
    assert int(bn.num_batches_tracked) == 3
    # The same as a fresh batch norm with momentum=None over the same batches.
    fresh = nn.BatchNorm1d(3, momentum=None)
    with torch.no_grad():
        for f in features:
            fresh(f)
    torch.testing.assert_close(bn.running_mean, fresh.running_mean)
    torch.testing.assert_close(bn.running_var, fresh.running_var)
    assert bn.momentum == 0.1  # restored
    assert not net.training and not bn.training  # mode restored


@pytest.mark.parametrize("norm", ["batch", "sync_batch"])
def test_recompute_bn_statistics_layer_by_layer_on_the_generator(norm):
    torch.manual_seed(12)
    g = Generator(latent_dim=LATENT, resolution=16, width=WIDTH, norm=norm)
    g(torch.randn(4, LATENT))
    batches = [torch.randn(4, LATENT) for _ in range(3)]
    # Reference: the inputs of every norm layer in training mode, per batch.
    probe = copy.deepcopy(g)
    seen: dict[int, list[torch.Tensor]] = {}
    layers = _norm_layers(probe)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(
            lambda _m, args, i=i: seen.setdefault(i, []).append(args[0].detach().clone())
        )
    with torch.no_grad():
        for z in batches:
            probe(z)
    assert recompute_bn_statistics(g, batches) == 3
    for i, layer in enumerate(_norm_layers(g)):
        means = torch.stack([x.mean((0, 2, 3)) for x in seen[i]])
        variances = torch.stack([x.var((0, 2, 3)) for x in seen[i]])
        torch.testing.assert_close(layer.running_mean, means.mean(0))
        torch.testing.assert_close(layer.running_var, variances.mean(0))
        assert int(layer.num_batches_tracked) == 3
        assert layer.momentum == 0.1
    assert g.training


def test_recompute_bn_statistics_without_batches_is_refused_and_changes_nothing():
    g = Generator(latent_dim=LATENT, resolution=8, width=WIDTH)
    g(torch.randn(3, LATENT))
    before = _bn_buffers(g)
    with pytest.raises(ValueError, match="at least one batch"):
        recompute_bn_statistics(g, [])
    assert all(torch.equal(v, before[k]) for k, v in g.named_buffers())


# ----------------------------------------------------------------------- class-conditional


def test_conditional_generator_and_projection_discriminator():
    torch.manual_seed(0)
    g = Generator(latent_dim=8, resolution=16, width=8, num_classes=10)
    d = Discriminator(resolution=16, width=8, num_classes=10, norm="spectral")
    z, y = torch.randn(6, 8), torch.arange(6)
    images = g(z, y)
    assert images.shape == (6, 1, 16, 16)
    assert d(images, y).shape == (6,)
    # The label changes the image for the same z, and the logit for the same image.
    assert not torch.allclose(g(z, y), g(z, (y + 1) % 10))
    assert not torch.allclose(d(images, y), d(images, (y + 1) % 10))


def test_conditioning_is_refused_where_it_does_not_apply():
    g, d = Generator(latent_dim=8, resolution=8, width=4), Discriminator(resolution=8, width=4)
    with pytest.raises(ValueError, match="unconditional"):
        g(torch.randn(2, 8), torch.zeros(2, dtype=torch.long))
    conditional = Generator(latent_dim=8, resolution=8, width=4, num_classes=3)
    with pytest.raises(ValueError, match="one label per image"):
        conditional(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"one label per image \(2\), got shape \(3,\)"):
        conditional(torch.randn(2, 8), torch.zeros(3, dtype=torch.long))
    # Unconditional networks keep their parameter names (old checkpoints load).
    assert not any("embed" in k for k in {**g.state_dict(), **d.state_dict()})
