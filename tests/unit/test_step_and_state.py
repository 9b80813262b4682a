"""gan.step, gan.losses and gan.state: one training iteration, the losses, and exact resumption."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gan.losses import nonsaturating_d_loss, nonsaturating_g_loss
from gan.nn.models import Discriminator, Generator
from gan.schedules import SchedulePolicy, make_scheduler
from gan.state import STATE_FILE, load_generator_weights, load_state, save_state, unwrap
from gan.step import StepStats, train_step

LATENT = 8
RES = 8
BATCH = 8


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """load_state sets torch's global RNG; keep that from leaking into other tests."""
    with torch.random.fork_rng(devices=[]):
        yield


def _models(seed: int) -> tuple[Generator, Discriminator]:
    torch.manual_seed(seed)
    g = Generator(latent_dim=LATENT, resolution=RES, width=4, norm="batch")
    d = Discriminator(resolution=RES, width=4, norm="batch")
    return g, d


def _real(seed: int = 100) -> torch.Tensor:
    return torch.rand(BATCH, 1, RES, RES, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed(before: dict[str, torch.Tensor], module: nn.Module) -> dict[str, bool]:
    return {k: not torch.equal(before[k], v) for k, v in module.named_parameters()}


# ---------------------------------------------------------------------------------------- losses


def test_losses_at_zero_logits_are_log_2():
    zeros = torch.zeros(5)
    assert nonsaturating_d_loss(zeros, zeros).item() == pytest.approx(2 * math.log(2), rel=1e-6)
    assert nonsaturating_g_loss(zeros).item() == pytest.approx(math.log(2), rel=1e-6)


def test_losses_equal_hand_computed_softplus_values():
    real = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    fake = torch.tensor([0.5, -3.0], dtype=torch.float64)

    def sp(x: float) -> float:
        return math.log1p(math.exp(x))

    expected_d = (sp(-2.0) + sp(1.0) + sp(-0.5)) / 3 + (sp(0.5) + sp(-3.0)) / 2
    expected_g = (sp(-0.5) + sp(3.0)) / 2
    assert nonsaturating_d_loss(real, fake).item() == pytest.approx(expected_d, rel=1e-14)
    assert nonsaturating_g_loss(fake).item() == pytest.approx(expected_g, rel=1e-14)
    # The same as the textbook -log D(x) - log(1 - D(G(z))) and -log D(G(z)).
    sig = torch.sigmoid
    textbook_d = -torch.log(sig(real)).mean() - torch.log(1 - sig(fake)).mean()
    assert nonsaturating_d_loss(real, fake).item() == pytest.approx(textbook_d.item(), rel=1e-12)
    assert nonsaturating_g_loss(fake).item() == pytest.approx(
        -torch.log(sig(fake)).mean().item(), rel=1e-12
    )


def test_losses_are_stable_for_large_logits():
    big = torch.tensor([100.0, 200.0])
    assert nonsaturating_d_loss(big, -big).item() == pytest.approx(0.0, abs=1e-30)
    assert nonsaturating_d_loss(-big, big).item() == pytest.approx(150.0 + 150.0, rel=1e-6)
    assert nonsaturating_g_loss(-big).item() == pytest.approx(150.0, rel=1e-6)


def test_g_loss_gradient_is_minus_one_minus_sigmoid():
    logits = torch.tensor([-2.0, 0.0, 3.0], requires_grad=True)
    nonsaturating_g_loss(logits).backward()
    expected = -(1 - torch.sigmoid(logits.detach())) / 3
    torch.testing.assert_close(logits.grad, expected)


# ------------------------------------------------------------------------------------ train_step


def _adam(module: nn.Module, lr: float = 2e-3) -> torch.optim.Optimizer:
    return torch.optim.Adam(module.parameters(), lr=lr, betas=(0.5, 0.999))


def test_train_step_updates_both_networks_and_returns_sane_stats():
    g, d = _models(0)
    g_before, d_before = _params(g), _params(d)
    stats = train_step(
        generator=g,
        discriminator=d,
        opt_g=_adam(g),
        opt_d=_adam(d),
        real=_real(),
        latent_dim=LATENT,
        rng=torch.Generator().manual_seed(1),
    )
    assert isinstance(stats, StepStats)
    assert all(_changed(g_before, g).values()), _changed(g_before, g)
    assert all(_changed(d_before, d).values()), _changed(d_before, d)
    for name in ("loss_d", "loss_g", "d_real", "d_fake"):
        value = getattr(stats, name)
        assert value.shape == ()
        assert not value.requires_grad
        assert math.isfinite(value.item()), name
    assert 0.0 < stats.d_real.item() < 1.0
    assert 0.0 < stats.d_fake.item() < 1.0
    assert stats.loss_d.item() > 0.0
    assert stats.loss_g.item() > 0.0
    assert all(p.requires_grad for p in d.parameters())
    assert all(p.requires_grad for p in g.parameters())


def test_stats_match_the_discriminator_phase_inputs():
    """loss_d and d_real/d_fake are computed from the same logits, before D's update."""
    g, d = _models(1)
    rng = torch.Generator().manual_seed(2)
    z = torch.randn(BATCH, LATENT, generator=torch.Generator().manual_seed(2))
    real = _real()
    with torch.no_grad():
        fake = copy.deepcopy(g)(z)
        d_copy = copy.deepcopy(d)
        real_logits, fake_logits = d_copy(real), d_copy(fake)
    stats = train_step(
        generator=g,
        discriminator=d,
        opt_g=_adam(g),
        opt_d=_adam(d),
        real=real,
        latent_dim=LATENT,
        rng=rng,
    )
    torch.testing.assert_close(stats.d_real, torch.sigmoid(real_logits).mean())
    torch.testing.assert_close(stats.d_fake, torch.sigmoid(fake_logits).mean())
    torch.testing.assert_close(stats.loss_d, nonsaturating_d_loss(real_logits, fake_logits))


class _Recorder(nn.Module):
    """Wraps G for the G phase and records whether D's parameters were frozen at that moment."""

    def __init__(self, inner: nn.Module, discriminator: nn.Module, fail: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.fail = fail
        self.seen: list[list[bool]] = []
        self._d = [discriminator]  # a list, so D is not registered as a submodule

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.seen.append([p.requires_grad for p in self._d[0].parameters()])
        if self.fail:
            raise RuntimeError("boom in the generator phase")
        return self.inner(z)


def test_discriminator_is_frozen_during_the_generator_phase_only():
    g, d = _models(3)
    wrapper = _Recorder(g, d)
    train_step(
        generator=wrapper,
        discriminator=d,
        opt_g=_adam(g),
        opt_d=_adam(d),
        real=_real(),
        latent_dim=LATENT,
        generator_inner=g,
    )
    assert len(wrapper.seen) == 1  # the D phase used generator_inner, not the wrapper
    assert wrapper.seen[0] and not any(wrapper.seen[0])
    assert all(p.requires_grad for p in d.parameters())


def test_requires_grad_restored_when_the_generator_phase_raises():
    g, d = _models(4)
    d_before = _params(d)
    wrapper = _Recorder(g, d, fail=True)
    with pytest.raises(RuntimeError, match="boom in the generator phase"):
        train_step(
            generator=wrapper,
            discriminator=d,
            opt_g=_adam(g),
            opt_d=_adam(d),
            real=_real(),
            latent_dim=LATENT,
            generator_inner=g,
        )
    assert not any(wrapper.seen[0])  # it was frozen when the error happened
    assert all(p.requires_grad for p in d.parameters())
    assert all(_changed(d_before, d).values())  # the D phase had completed


def test_generator_phase_leaves_discriminator_weights_and_grads_alone():
    g, d = _models(5)
    g_snapshot = copy.deepcopy(g)
    d_before = _params(d)
    g_before = _params(g)
    opt_d = torch.optim.SGD(d.parameters(), lr=0.0)
    real = _real()
    train_step(
        generator=g,
        discriminator=d,
        opt_g=_adam(g),
        opt_d=opt_d,
        real=real,
        latent_dim=LATENT,
        rng=torch.Generator().manual_seed(6),
    )
    for name, p in d.named_parameters():
        assert torch.equal(p, d_before[name]), name
    assert all(_changed(g_before, g).values())

    # D's gradients are exactly those of the D loss: the G phase added nothing to them.
    d_ref = copy.deepcopy(d)
    d_ref.zero_grad(set_to_none=True)
    z = torch.randn(BATCH, LATENT, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        fake = g_snapshot(z)
    nonsaturating_d_loss(d_ref(real), d_ref(fake)).backward()
    for (name, p), (_, p_ref) in zip(d.named_parameters(), d_ref.named_parameters(), strict=True):
        assert p.grad is not None
        assert torch.equal(p.grad, p_ref.grad), name


def test_train_step_is_deterministic_given_the_rng():
    results = []
    for _ in range(2):
        g, d = _models(7)
        stats = train_step(
            generator=g,
            discriminator=d,
            opt_g=_adam(g),
            opt_d=_adam(d),
            real=_real(),
            latent_dim=LATENT,
            rng=torch.Generator().manual_seed(8),
        )
        results.append((stats.loss_d.item(), stats.loss_g.item(), _params(g)))
    assert results[0][:2] == results[1][:2]
    assert all(torch.equal(results[0][2][k], results[1][2][k]) for k in results[0][2])


# ----------------------------------------------------------------------------------------- state


class _Setup:
    def __init__(self, seed: int) -> None:
        self.g, self.d = _models(seed)
        self.opt_g, self.opt_d = _adam(self.g), _adam(self.d, lr=1e-3)
        policy = SchedulePolicy(total_steps=10, warmup_steps=2, decay="cosine", min_factor=0.1)
        self.sched_g = make_scheduler(self.opt_g, policy)
        self.sched_d = make_scheduler(self.opt_d, policy)
        self.rng = torch.Generator().manual_seed(seed + 1000)

    def parts(self) -> dict:
        return dict(
            generator=self.g,
            discriminator=self.d,
            opt_g=self.opt_g,
            opt_d=self.opt_d,
            sched_g=self.sched_g,
            sched_d=self.sched_d,
            rng=self.rng,
        )

    def train(self, batches: list[torch.Tensor]) -> list[tuple[float, float, float]]:
        out = []
        for real in batches:
            s = train_step(
                generator=self.g,
                discriminator=self.d,
                opt_g=self.opt_g,
                opt_d=self.opt_d,
                real=real,
                latent_dim=LATENT,
                rng=self.rng,
            )
            self.sched_g.step()
            self.sched_d.step()
            out.append((s.loss_d.item(), s.loss_g.item(), self.opt_g.param_groups[0]["lr"]))
        return out

    def weights(self) -> dict[str, torch.Tensor]:
        state = {f"g.{k}": v.clone() for k, v in self.g.state_dict().items()}
        state.update({f"d.{k}": v.clone() for k, v in self.d.state_dict().items()})
        return state


def test_save_and_load_state_resume_bit_exactly(tmp_path):
    batches = [_real(seed) for seed in range(5)]
    a = _Setup(0)
    a.train(batches[:2])
    path = save_state(tmp_path, step=2, **a.parts())
    assert path == tmp_path / STATE_FILE
    saved_g = {k: v.clone() for k, v in a.g.state_dict().items()}
    expected_losses = a.train(batches[2:])
    expected_weights = a.weights()

    b = _Setup(1)  # different initial weights and rng
    assert not torch.equal(b.g.net[0].weight, saved_g["net.0.weight"])
    torch.manual_seed(12345)  # the global RNG is part of the state too
    step = load_state(tmp_path, **b.parts())
    assert step == 2
    assert isinstance(step, int)
    assert b.sched_g.last_epoch == 2
    assert b.opt_g.param_groups[0]["lr"] == a.opt_g.param_groups[0]["initial_lr"] * 1.0
    resumed_losses = b.train(batches[2:])
    assert resumed_losses == expected_losses
    resumed_weights = b.weights()
    assert resumed_weights.keys() == expected_weights.keys()
    for k in expected_weights:
        assert torch.equal(resumed_weights[k], expected_weights[k]), k
    assert torch.equal(b.rng.get_state(), a.rng.get_state())


def test_state_file_loads_with_weights_only(tmp_path):
    s = _Setup(2)
    s.train([_real()])
    save_state(tmp_path, step=1, **s.parts())
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert set(state) == {
        "step",
        "generator",
        "discriminator",
        "opt_g",
        "opt_d",
        "sched_g",
        "sched_d",
        "rng",
        "torch_rng",
        "worker_rngs",
    }
    assert int(state["step"]) == 1
    assert torch.equal(state["rng"], s.rng.get_state())


def test_load_generator_weights_returns_the_generator_state_dict(tmp_path):
    s = _Setup(3)
    s.train([_real()])
    save_state(tmp_path, step=1, **s.parts())
    weights = load_generator_weights(tmp_path)
    expected = s.g.state_dict()
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    fresh, _ = _models(9)
    fresh.load_state_dict(weights)
    fresh.eval()
    s.g.eval()
    z = torch.randn(3, LATENT)
    with torch.no_grad():
        assert torch.equal(fresh(z), s.g(z))


class _Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the real module is ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_wrapped_modules_are_saved_and_loaded_without_the_wrapper_prefix(tmp_path):
    s = _Setup(4)
    assert unwrap(_Wrapper(s.g)) is s.g
    assert unwrap(s.g) is s.g
    parts = s.parts()
    parts["generator"], parts["discriminator"] = _Wrapper(s.g), _Wrapper(s.d)
    save_state(tmp_path, step=0, **parts)
    weights = load_generator_weights(tmp_path)
    assert weights.keys() == s.g.state_dict().keys()
    assert not any(k.startswith("module.") for k in weights)

    t = _Setup(5)
    parts = t.parts()
    parts["generator"], parts["discriminator"] = _Wrapper(t.g), _Wrapper(t.d)
    assert load_state(tmp_path, **parts) == 0
    assert torch.equal(t.d.net[0].weight, s.d.net[0].weight)


def test_worker_rng_states_round_trip_per_rank(tmp_path):
    from gan.state import load_worker_rng, save_state

    g = Generator(latent_dim=4, resolution=8, width=4)
    d = Discriminator(resolution=8, width=4)
    opt_g, opt_d = torch.optim.Adam(g.parameters()), torch.optim.Adam(d.parameters())
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda s: 1.0)
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lambda s: 1.0)
    streams = [torch.Generator().manual_seed(seed) for seed in (11, 22)]
    save_state(
        tmp_path, step=3, generator=g, discriminator=d, opt_g=opt_g, opt_d=opt_d,
        sched_g=sched_g, sched_d=sched_d, rng=streams[0],
        worker_rngs=[s.get_state() for s in streams],
    )  # fmt: skip
    restored = torch.Generator()
    restored.set_state(load_worker_rng(tmp_path, rank=1, world_size=2))
    assert torch.equal(torch.rand(5, generator=restored), torch.rand(5, generator=streams[1]))
    assert load_worker_rng(tmp_path, rank=0, world_size=3) is None  # other worker count
