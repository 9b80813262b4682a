"""gan.nn.models: shapes at every resolution, the DCGAN layer rules, and the normalizations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gan.nn.models import Discriminator, Generator, check_resolution
from gan.nn.normalization import NORMALIZATIONS, make_norm
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


@pytest.mark.parametrize("norm", NORMALIZATIONS)
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


@pytest.mark.parametrize("norm", NORMALIZATIONS)
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
