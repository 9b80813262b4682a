"""gan.ema.GeneratorEMA: the moving average, the copied buffers, start_step, and the state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gan.ema import GeneratorEMA
from gan.nn.models import Discriminator, Generator
from gan.step import train_step

LATENT = 4


def _generator(seed: int = 0, norm: str = "batch") -> Generator:
    torch.manual_seed(seed)
    return Generator(latent_dim=LATENT, resolution=8, width=4, norm=norm)


def _train_a_little(g: Generator, seed: int) -> None:
    """Move G's parameters and batch-norm buffers, as a training step would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        g(torch.randn(6, LATENT, generator=gen))


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _assert_buffers_equal(a: nn.Module, b: nn.Module) -> None:
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert ba.keys() == bb.keys() and ba
    for k in ba:
        assert torch.equal(ba[k], bb[k]), k


def test_the_copy_is_independent_in_eval_mode_and_frozen():
    g = _generator()
    ema = GeneratorEMA(g, decay=0.9)
    assert ema.module is not g and not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in g.parameters())
    assert g.training
    for (_, a), (_, b) in zip(ema.module.named_parameters(), g.named_parameters(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_parameters_follow_the_hand_computed_average_and_buffers_are_copied():
    g = _generator()
    decay = 0.9
    ema = GeneratorEMA(g, decay=decay)
    expected = _params(g)
    for step in range(3):
        _train_a_little(g, seed=step)
        ema.update(g, step)
        current = _params(g)
        expected = {k: decay * expected[k] + (1 - decay) * current[k] for k in expected}
        for k, v in ema.module.named_parameters():
            torch.testing.assert_close(v, expected[k])
            assert not torch.allclose(v, current[k])
        _assert_buffers_equal(ema.module, g)  # running stats and num_batches_tracked
    assert int(ema.module.net[1].num_batches_tracked) == 3


def test_before_start_step_the_weights_are_copied():
    g = _generator(1)
    ema = GeneratorEMA(g, decay=0.5, start_step=2)
    for step in (0, 1):
        _train_a_little(g, seed=10 + step)
        ema.update(g, step)
        for k, v in ema.module.named_parameters():
            assert torch.equal(v, dict(g.named_parameters())[k])
        _assert_buffers_equal(ema.module, g)
    copied = _params(g)
    _train_a_little(g, seed=12)
    ema.update(g, 2)  # the first averaged step starts from the weights copied at step 1
    for k, v in ema.module.named_parameters():
        torch.testing.assert_close(v, 0.5 * copied[k] + 0.5 * dict(g.named_parameters())[k])


def test_decay_zero_tracks_and_decay_one_freezes():
    g = _generator(2)
    initial = _params(g)
    frozen, tracking = GeneratorEMA(g, decay=1.0), GeneratorEMA(g, decay=0.0)
    _train_a_little(g, seed=3)
    frozen.update(g, 0)
    tracking.update(g, 0)
    for k, v in frozen.module.named_parameters():
        assert torch.equal(v, initial[k])
    for (_, a), (_, b) in zip(
        tracking.module.named_parameters(), g.named_parameters(), strict=True
    ):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [{"decay": 1.5}, {"decay": -0.1}, {"start_step": -1}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="EMA"):
        GeneratorEMA(_generator(), **kwargs)


class _Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the real module is ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_ddp_wrappers_are_unwrapped():
    g = _generator(3)
    ema = GeneratorEMA(_Wrapper(g), decay=0.8)
    assert isinstance(ema.module, Generator)
    _train_a_little(g, seed=4)
    ema.update(_Wrapper(g), 0)
    assert ema.state_dict().keys() == g.state_dict().keys()
    _assert_buffers_equal(ema.module, g)


def test_a_different_generator_is_refused():
    ema = GeneratorEMA(_generator(), decay=0.9)
    with pytest.raises(ValueError, match="do not match"):
        ema.update(Generator(latent_dim=LATENT, resolution=16, width=4), 0)


def test_state_dict_round_trip_and_loads_into_a_plain_generator(tmp_path):
    g = _generator(4)
    ema = GeneratorEMA(g, decay=0.7)
    for step in range(2):
        _train_a_little(g, seed=20 + step)
        ema.update(g, step)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    state = torch.load(tmp_path / "ema.pt", weights_only=True)

    restored = GeneratorEMA(_generator(5), decay=0.7)
    restored.load_state_dict(state)
    for k, v in ema.state_dict().items():
        assert torch.equal(restored.state_dict()[k], v), k

    plain = _generator(6)
    plain.load_state_dict(state)
    plain.eval()
    z = torch.randn(3, LATENT)
    with torch.no_grad():
        assert torch.equal(plain(z), ema(z))
    # The next update continues identically from the restored average.
    _train_a_little(g, seed=30)
    ema.update(g, 2)
    restored.update(g, 2)
    for k, v in ema.state_dict().items():
        assert torch.equal(restored.state_dict()[k], v), k


def test_train_step_updates_the_ema_after_the_generator_step():
    g = _generator(7)
    torch.manual_seed(8)
    d = Discriminator(resolution=8, width=4)
    initial = _params(g)
    ema = GeneratorEMA(g, decay=0.5, start_step=0)
    real = torch.rand(4, 1, 8, 8) * 2 - 1
    train_step(
        generator=g,
        discriminator=d,
        opt_g=torch.optim.Adam(g.parameters(), lr=1e-2),
        opt_d=torch.optim.Adam(d.parameters(), lr=1e-2),
        real=real,
        latent_dim=LATENT,
        rng=torch.Generator().manual_seed(9),
        ema=ema,
        step=0,
    )
    after = _params(g)
    for k, v in ema.module.named_parameters():
        torch.testing.assert_close(v, 0.5 * initial[k] + 0.5 * after[k])
    _assert_buffers_equal(ema.module, g)
