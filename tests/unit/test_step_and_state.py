"""gan.step, gan.losses and gan.state: one training iteration, the losses, and exact resumption."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gan.augment import Augment
from gan.losses import (
    LeCamAnchors,
    consistency_penalty,
    get_loss,
    gradient_penalty,
    lecam_penalty,
    nonsaturating_d_loss,
    nonsaturating_g_loss,
    r1_penalty,
    wasserstein_d_loss,
)
from gan.nn.models import Discriminator, Generator
from gan.schedules import SchedulePolicy, make_scheduler
from gan.state import STATE_FILE, load_generator_weights, load_state, save_state, unwrap
from gan.step import StepStats, set_requires_grad, train_step

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
        "extras",
    }
    assert state["extras"] == {}
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


# ------------------------------------------------------------- train_step options (losses, R1, ...)


def _old_train_step(
    *, generator, discriminator, opt_g, opt_d, real, latent_dim, rng=None,
    generator_inner=None, discriminator_inner=None,
):  # fmt: skip
    """A verbatim copy of train_step before the loss/R1/GP/EMA options were added."""
    g_inner = generator_inner if generator_inner is not None else generator
    d_inner = discriminator_inner if discriminator_inner is not None else discriminator
    batch = real.shape[0]

    z = torch.randn(batch, latent_dim, generator=rng, device=real.device)
    with torch.no_grad():
        fake = g_inner(z)
    real_logits = discriminator(real)
    fake_logits = discriminator(fake)
    loss_d = nonsaturating_d_loss(real_logits, fake_logits)
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()

    set_requires_grad(d_inner, False)
    try:
        z = torch.randn(batch, latent_dim, generator=rng, device=real.device)
        loss_g = nonsaturating_g_loss(d_inner(generator(z)))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
    finally:
        set_requires_grad(d_inner, True)

    return StepStats(
        loss_d=loss_d.detach(),
        loss_g=loss_g.detach(),
        real_logits=real_logits.detach(),
        fake_logits=fake_logits.detach(),
    )


def _models_with(seed: int, g_norm: str = "batch", d_norm: str = "batch"):
    torch.manual_seed(seed)
    g = Generator(latent_dim=LATENT, resolution=RES, width=4, norm=g_norm)
    d = Discriminator(resolution=RES, width=4, norm=d_norm)
    return g, d


def _full_state(g, d, opt_g, opt_d, rng) -> dict:
    state = {f"g.{k}": v for k, v in g.state_dict().items()}
    state.update({f"d.{k}": v for k, v in d.state_dict().items()})
    for name, opt in (("opt_g", opt_g), ("opt_d", opt_d)):
        for idx, per_param in opt.state_dict()["state"].items():
            state.update({f"{name}.{idx}.{k}": v for k, v in per_param.items()})
    state["rng"] = rng.get_state()
    return state


@pytest.mark.parametrize("explicit_defaults", [False, True])
@pytest.mark.parametrize(("g_norm", "d_norm"), [("batch", "batch"), ("none", "none")])
def test_default_call_is_bit_identical_to_the_previous_implementation(
    g_norm, d_norm, explicit_defaults
):
    defaults = dict(
        loss="nonsaturating", r1_gamma=0.0, r1_interval=1, step=0, gp_weight=0.0, d_steps=1,
        freeze_g_stats_in_d_phase=False, ema=None,
    )  # fmt: skip
    runs = []
    for step_fn in (_old_train_step, train_step):
        g, d = _models_with(20, g_norm, d_norm)
        opt_g, opt_d = _adam(g), _adam(d, lr=1e-3)
        rng = torch.Generator().manual_seed(21)
        stats = []
        for i in range(3):
            extra = dict(defaults, step=i) if explicit_defaults and step_fn is train_step else {}
            s = step_fn(
                generator=g, discriminator=d, opt_g=opt_g, opt_d=opt_d, real=_real(i),
                latent_dim=LATENT, rng=rng, **extra,
            )  # fmt: skip
            stats.append((s.loss_d, s.loss_g, s.d_real, s.d_fake))
        runs.append((stats, _full_state(g, d, opt_g, opt_d, rng)))
    (old_stats, old_state), (new_stats, new_state) = runs
    for old, new in zip(old_stats, new_stats, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(old, new, strict=True))
    assert old_state.keys() == new_state.keys()
    for k in old_state:
        assert torch.equal(old_state[k], new_state[k]), k


def test_unused_penalties_are_recorded_as_none():
    g, d = _models(22)
    stats = train_step(
        generator=g, discriminator=d, opt_g=_adam(g), opt_d=_adam(d), real=_real(),
        latent_dim=LATENT, rng=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert stats.r1 is None and stats.gp is None
    assert stats.lecam is None and stats.consistency is None


@pytest.mark.parametrize(
    ("loss", "gp_weight", "d_norm"),
    [
        ("hinge", 0.0, "batch"),
        ("hinge", 0.0, "spectral"),
        ("wasserstein", 10.0, "none"),
        ("least_squares", 0.0, "batch"),
        ("nonsaturating", 0.0, "spectral"),
    ],
)
def test_other_losses_train_both_networks_with_the_chosen_loss(loss, gp_weight, d_norm):
    g, d = _models_with(23, d_norm=d_norm)
    g_before, d_before = _params(g), _params(d)
    real = _real()
    z = torch.randn(BATCH, LATENT, generator=torch.Generator().manual_seed(24))
    with torch.no_grad():
        fake = copy.deepcopy(g)(z)
        d_copy = copy.deepcopy(d)
        real_logits, fake_logits = d_copy(real), d_copy(fake)
    stats = train_step(
        generator=g, discriminator=d, opt_g=_adam(g), opt_d=_adam(d), real=real,
        latent_dim=LATENT, rng=torch.Generator().manual_seed(24), loss=loss, gp_weight=gp_weight,
    )  # fmt: skip
    assert all(_changed(g_before, g).values())
    changed = _changed(d_before, d)
    # Hinge (with logits inside the margin) and Wasserstein give the output bias a zero gradient:
    # it adds the same constant to real and fake logits.
    output_bias = f"net.{len(d.net) - 1}.bias"
    assert all(v for k, v in changed.items() if k != output_bias), changed
    d_loss_fn, _ = get_loss(loss)
    torch.testing.assert_close(stats.loss_d, d_loss_fn(real_logits, fake_logits))
    figures = ("loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d", "grad_norm_g")
    for name in figures + (("gp",) if gp_weight > 0 else ()):
        value = getattr(stats, name)
        assert value.shape == () and not value.requires_grad and math.isfinite(value.item())
    assert (stats.gp is not None) == (gp_weight > 0)
    assert stats.gp is None or stats.gp.item() > 0
    assert stats.r1 is None


def test_gradient_penalty_enters_the_discriminator_gradient_with_its_weight():
    g, d = _models_with(25, d_norm="none")
    g_snapshot, d_ref = copy.deepcopy(g), copy.deepcopy(d)
    real = _real()
    stats = train_step(
        generator=g, discriminator=d, opt_g=_adam(g), opt_d=torch.optim.SGD(d.parameters(), 0.0),
        real=real, latent_dim=LATENT, rng=torch.Generator().manual_seed(26), loss="wasserstein",
        gp_weight=10.0,
    )  # fmt: skip
    rng = torch.Generator().manual_seed(26)
    z = torch.randn(BATCH, LATENT, generator=rng)
    with torch.no_grad():
        fake = g_snapshot(z)
    gp = gradient_penalty(d_ref, real, fake, rng)  # draws alpha right after the D-phase noise
    (wasserstein_d_loss(d_ref(real), d_ref(fake)) + 10.0 * gp).backward()
    torch.testing.assert_close(stats.gp, gp.detach())
    for (name, p), (_, p_ref) in zip(d.named_parameters(), d_ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=name)


def _r1_setup(seed: int):
    g, d = _models_with(seed, d_norm="none")
    opt_d = torch.optim.SGD(d.parameters(), lr=1e-2)
    return g, d, _adam(g), opt_d, torch.Generator().manual_seed(1)


def test_r1_is_applied_only_on_interval_steps():
    interval, gamma = 3, 2.0
    with_r1, without = _r1_setup(27), _r1_setup(27)
    for step in range(5):
        real = _real(step)
        results = []
        for (g, d, opt_g, opt_d, rng), r1_gamma in ((with_r1, gamma), (without, 0.0)):
            s = train_step(
                generator=g, discriminator=d, opt_g=opt_g, opt_d=opt_d, real=real,
                latent_dim=LATENT, rng=rng, step=step, r1_gamma=r1_gamma, r1_interval=interval,
            )  # fmt: skip
            results.append((s, {k: p.grad.clone() for k, p in d.named_parameters()}))
        (s_r1, grads_r1), (s_plain, grads_plain) = results
        applied = step % interval == 0
        assert (s_r1.r1 is not None) == applied, step
        assert s_r1.r1 is None or s_r1.r1.item() > 0
        assert s_plain.r1 is None
        if step == 0:  # same weights so far: R1 is the only difference in D's gradient
            assert any(not torch.equal(grads_r1[k], grads_plain[k]) for k in grads_r1)
    # Off-interval steps leave the loss alone: with equal weights the step is bit-identical.
    a, b = _r1_setup(28), _r1_setup(28)
    for (g, d, opt_g, opt_d, rng), r1_gamma in ((a, gamma), (b, 0.0)):
        train_step(
            generator=g, discriminator=d, opt_g=opt_g, opt_d=opt_d, real=_real(), step=4,
            latent_dim=LATENT, rng=rng, r1_gamma=r1_gamma, r1_interval=interval,
        )  # fmt: skip
    for (name, p), (_, q) in zip(a[1].named_parameters(), b[1].named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_r1_enters_the_discriminator_gradient_scaled_by_the_interval():
    interval, gamma = 4, 0.5
    g, d = _models_with(29, d_norm="none")
    g_snapshot, d_ref = copy.deepcopy(g), copy.deepcopy(d)
    real = _real()
    stats = train_step(
        generator=g, discriminator=d, opt_g=_adam(g), opt_d=torch.optim.SGD(d.parameters(), 0.0),
        real=real, latent_dim=LATENT, rng=torch.Generator().manual_seed(30), step=8,
        r1_gamma=gamma, r1_interval=interval,
    )  # fmt: skip
    z = torch.randn(BATCH, LATENT, generator=torch.Generator().manual_seed(30))
    with torch.no_grad():
        fake = g_snapshot(z)
    r1 = r1_penalty(d_ref, real)
    (nonsaturating_d_loss(d_ref(real), d_ref(fake)) + gamma * interval * r1).backward()
    torch.testing.assert_close(stats.r1, r1.detach())
    for (name, p), (_, p_ref) in zip(d.named_parameters(), d_ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=name)
    assert not real.requires_grad


class _CountingSGD(torch.optim.SGD):
    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def test_d_steps_updates_the_discriminator_that_many_times_with_fresh_noise():
    g, d = _models(31)
    g_snapshot, d_snapshot = copy.deepcopy(g), copy.deepcopy(d)
    opt_d, opt_g = _CountingSGD(d.parameters(), lr=0.0), _CountingSGD(g.parameters(), lr=0.0)
    rng = torch.Generator().manual_seed(32)
    real = _real()
    stats = train_step(
        generator=g, discriminator=d, opt_g=opt_g, opt_d=opt_d, real=real, latent_dim=LATENT,
        rng=rng, d_steps=2,
    )  # fmt: skip
    assert (opt_d.steps, opt_g.steps) == (2, 1)
    reference = torch.Generator().manual_seed(32)
    zs = [torch.randn(BATCH, LATENT, generator=reference) for _ in range(3)]
    assert torch.equal(rng.get_state(), reference.get_state())  # 2 D batches + 1 G batch
    with torch.no_grad():  # lr=0: D and G are the same for both D updates
        losses = [nonsaturating_d_loss(d_snapshot(real), d_snapshot(g_snapshot(z))) for z in zs[:2]]
    assert not torch.equal(losses[0], losses[1])
    torch.testing.assert_close(stats.loss_d, (losses[0] + losses[1]) / 2)

    # With a learning rate, D moves twice: unlike one update, and unlike d_steps=1.
    runs = {}
    for d_steps in (1, 2):
        g, d = _models(33)
        opt_d = _CountingSGD(d.parameters(), lr=0.1)
        train_step(
            generator=g, discriminator=d, opt_g=_adam(g), opt_d=opt_d, real=real,
            latent_dim=LATENT, rng=torch.Generator().manual_seed(34), d_steps=d_steps,
        )  # fmt: skip
        runs[d_steps] = (opt_d.steps, _params(d))
    assert runs[1][0] == 1 and runs[2][0] == 2
    assert all(not torch.equal(runs[1][1][k], runs[2][1][k]) for k in runs[1][1])


def _dcgan_example_step(*, g, d, opt_g, opt_d, real, rng):
    """The PyTorch DCGAN example's iteration: one batch of fakes serves both updates."""
    fake = g(torch.randn(real.shape[0], LATENT, generator=rng))
    loss_d = nonsaturating_d_loss(d(real), d(fake.detach()))
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    set_requires_grad(d, False)
    loss_g = nonsaturating_g_loss(d(fake))
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    set_requires_grad(d, True)
    return loss_d.detach(), loss_g.detach()


@pytest.mark.parametrize("g_norm", ["batch", "sync_batch"])
def test_reused_fakes_are_the_dcgan_example_step(g_norm):
    runs = []
    for reuse in (True, False):
        g, d = _models_with(38, g_norm=g_norm)
        opt_g, opt_d, rng = _adam(g), _adam(d, lr=1e-3), torch.Generator().manual_seed(39)
        losses = []
        for i in range(3):
            s = train_step(
                generator=g, discriminator=d, opt_g=opt_g, opt_d=opt_d, real=_real(i),
                latent_dim=LATENT, rng=rng, reuse_fakes=reuse,
            )  # fmt: skip
            losses.append((s.loss_d, s.loss_g))
        runs.append((losses, _full_state(g, d, opt_g, opt_d, rng), g))
    g, d = _models_with(38, g_norm=g_norm)
    opt_g, opt_d, rng = _adam(g), _adam(d, lr=1e-3), torch.Generator().manual_seed(39)
    expected = [
        _dcgan_example_step(g=g, d=d, opt_g=opt_g, opt_d=opt_d, real=_real(i), rng=rng)
        for i in range(3)
    ]
    (reused, reused_state, reused_g), (fresh, fresh_state, fresh_g) = runs
    for (loss_d, loss_g), want in zip(reused, expected, strict=True):
        assert torch.equal(loss_d, want[0]) and torch.equal(loss_g, want[1])
    want_state = _full_state(g, d, opt_g, opt_d, rng)
    assert all(torch.equal(reused_state[k], want_state[k]) for k in want_state)
    # One G forward a step instead of two: one noise batch, one update of G's statistics.
    assert int(reused_g.net[1].num_batches_tracked) == 3
    assert int(fresh_g.net[1].num_batches_tracked) == 6
    assert not torch.equal(reused_state["rng"], fresh_state["rng"])


def test_reused_fakes_with_several_d_updates_come_from_the_last():
    g, d = _models(40)
    opt_d, opt_g = _CountingSGD(d.parameters(), lr=0.0), _CountingSGD(g.parameters(), lr=0.0)
    g_snapshot, d_snapshot = copy.deepcopy(g), copy.deepcopy(d)
    rng = torch.Generator().manual_seed(41)
    stats = train_step(
        generator=g, discriminator=d, opt_g=opt_g, opt_d=opt_d, real=_real(), latent_dim=LATENT,
        rng=rng, d_steps=2, reuse_fakes=True,
    )  # fmt: skip
    assert (opt_d.steps, opt_g.steps) == (2, 1)
    reference = torch.Generator().manual_seed(41)
    zs = [torch.randn(BATCH, LATENT, generator=reference) for _ in range(2)]
    assert torch.equal(rng.get_state(), reference.get_state())  # 2 D batches, no G batch
    with torch.no_grad():  # lr=0: G and D are the same throughout; G's statistics differ
        expected_g_loss = nonsaturating_g_loss(d_snapshot(g_snapshot(zs[1])))
    torch.testing.assert_close(stats.loss_g, expected_g_loss)


class _RecordingD(nn.Module):
    """Wraps D for the D phase; records each input and G's batch-norm buffers at that moment."""

    def __init__(self, inner: nn.Module, generator: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self._g = [generator]
        self.calls: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buffers = {k: v.clone() for k, v in self._g[0].named_buffers()}
        self.calls.append((x.detach().clone(), buffers))
        return self.inner(x)


@pytest.mark.parametrize("g_norm", ["batch", "sync_batch"])
@pytest.mark.parametrize("freeze", [False, True])
def test_freezing_g_statistics_in_the_discriminator_phase(freeze, g_norm):
    g, d = _models_with(35, g_norm=g_norm)
    g(torch.randn(BATCH, LATENT))  # running statistics away from their initial values
    before = {k: v.clone() for k, v in g.named_buffers()}
    train_mode_g = copy.deepcopy(g)
    recorder = _RecordingD(d, g)
    train_step(
        generator=g, discriminator=recorder, opt_g=_adam(g), opt_d=_adam(d), real=_real(),
        latent_dim=LATENT, rng=torch.Generator().manual_seed(36), discriminator_inner=d,
        freeze_g_stats_in_d_phase=freeze,
    )  # fmt: skip
    assert len(recorder.calls) == 2  # real, then fake; the G phase used the inner D
    fake, g_buffers_after_d_phase = recorder.calls[1]
    z = torch.randn(BATCH, LATENT, generator=torch.Generator().manual_seed(36))
    with torch.no_grad():
        expected_fake = train_mode_g(z)  # training mode: batch statistics
    assert torch.equal(fake, expected_fake)
    unchanged = [torch.equal(g_buffers_after_d_phase[k], before[k]) for k in before]
    if freeze:
        assert all(unchanged)
        assert all(m.track_running_stats for m in g.modules() if hasattr(m, "track_running_stats"))
    else:
        assert not all(unchanged)
    # The G phase still updates them, once.
    assert int(g.net[1].num_batches_tracked) == int(before["net.1.num_batches_tracked"]) + (
        1 if freeze else 2
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss": "wgan"}, "unknown loss 'wgan'"),
        ({"r1_gamma": -1.0}, "r1_gamma"),
        ({"gp_weight": -1.0}, "gp_weight"),
        ({"r1_interval": 0}, "r1_interval"),
        ({"d_steps": 0}, "d_steps"),
        ({"lecam_weight": -1.0}, "lecam_weight must be >= 0"),
        ({"consistency_weight": -1.0}, "consistency_weight must be >= 0"),
        ({"lecam_weight": 0.1}, "needs lecam_anchors"),
        ({"consistency_weight": 0.1}, "needs augment"),
        ({"reuse_fakes": True, "freeze_g_stats_in_d_phase": True}, "exclude each other"),
    ],
)
def test_bad_options_are_refused_before_anything_changes(kwargs, match):
    g, d = _models(37)
    g_before, d_before = _params(g), _params(d)
    with pytest.raises(ValueError, match=match):
        train_step(
            generator=g, discriminator=d, opt_g=_adam(g), opt_d=_adam(d), real=_real(),
            latent_dim=LATENT, **kwargs,
        )  # fmt: skip
    assert not any(_changed(g_before, g).values()) and not any(_changed(d_before, d).values())


# ------------------------------------------------- augmentation and the small-data regularizers


class _Flip:
    """A deterministic, differentiable augmentation that records what it was given."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return x.flip(-1)


def test_augment_feeds_d_everything_it_sees_and_passes_g_its_gradient():
    g, d = _models_with(40, d_norm="none")
    g_ref, d_ref = copy.deepcopy(g), copy.deepcopy(d)
    recorder = _RecordingD(d, g)
    flip = _Flip()
    real = _real()
    stats = train_step(
        generator=g, discriminator=recorder, discriminator_inner=d,
        opt_g=torch.optim.SGD(g.parameters(), lr=0.0), opt_d=torch.optim.SGD(d.parameters(), 0.0),
        real=real, latent_dim=LATENT, rng=torch.Generator().manual_seed(41), augment=flip,
    )  # fmt: skip
    rng = torch.Generator().manual_seed(41)
    z_d, z_g = torch.randn(BATCH, LATENT, generator=rng), torch.randn(BATCH, LATENT, generator=rng)
    with torch.no_grad():
        fake = copy.deepcopy(g_ref)(z_d)
        real_logits = d_ref(real.flip(-1))
    # D phase: D saw the flipped reals and fakes; G phase: the flipped fakes, three calls in all.
    assert len(flip.seen) == 3
    assert torch.equal(flip.seen[0], real) and torch.equal(flip.seen[1], fake)
    assert [x for x, _ in recorder.calls][0].equal(real.flip(-1))
    assert [x for x, _ in recorder.calls][1].equal(fake.flip(-1))
    assert stats.real_sign.item() == torch.sign(real_logits).mean().item()
    assert stats.real_sign.shape == () and not stats.real_sign.requires_grad
    # G's gradient is that of the G loss through the augmentation.
    nonsaturating_g_loss(d_ref(g_ref(z_g).flip(-1))).backward()
    for (name, p), (_, p_ref) in zip(g.named_parameters(), g_ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=name)
    g_plain = copy.deepcopy(g_ref)
    g_plain.zero_grad(set_to_none=True)
    nonsaturating_g_loss(d_ref(g_plain(z_g))).backward()
    assert any(
        not torch.allclose(p.grad, q.grad)
        for p, q in zip(g.parameters(), g_plain.parameters(), strict=True)
    )


def test_zero_probability_augment_is_bit_identical_to_no_augment():
    results = []
    for pipeline in (None, "p0", "p1"):
        g, d = _models(42)
        opt_g, opt_d = _adam(g), _adam(d)
        rng = torch.Generator().manual_seed(43)
        aug = (
            None
            if pipeline is None
            else Augment("translation,cutout", p=0.0 if pipeline == "p0" else 1.0, rng=rng)
        )
        for i in range(2):
            s = train_step(
                generator=g, discriminator=d, opt_g=opt_g, opt_d=opt_d, real=_real(i),
                latent_dim=LATENT, rng=rng, step=i, augment=aug,
            )  # fmt: skip
        results.append((s.loss_d, _params(g), _params(d), rng.get_state()))
    plain, p0, p1 = results
    assert torch.equal(plain[0], p0[0]) and torch.equal(plain[3], p0[3])
    assert all(torch.equal(plain[1][k], p0[1][k]) for k in plain[1])
    assert all(torch.equal(plain[2][k], p0[2][k]) for k in plain[2])
    assert not torch.equal(plain[0], p1[0])  # p = 1 does change what D sees


def test_diffaugment_step_is_deterministic_under_the_seed():
    runs = []
    for _ in range(2):
        g, d = _models(44)
        rng = torch.Generator().manual_seed(45)
        s = train_step(
            generator=g, discriminator=d, opt_g=_adam(g), opt_d=_adam(d), real=_real(),
            latent_dim=LATENT, rng=rng, augment=Augment("translation,cutout", p=1.0, rng=rng),
        )  # fmt: skip
        runs.append((s.loss_d.item(), s.loss_g.item(), _params(g)))
    assert runs[0][:2] == runs[1][:2]
    assert all(torch.equal(runs[0][2][k], runs[1][2][k]) for k in runs[0][2])


def test_lecam_enters_the_discriminator_gradient_against_the_updated_anchors():
    weight = 0.3
    g, d = _models_with(46, d_norm="none")
    g_snapshot, d_ref = copy.deepcopy(g), copy.deepcopy(d)
    anchors = LeCamAnchors(decay=0.9)
    anchors.update(torch.tensor([0.4]), torch.tensor([-0.2]))  # earlier steps' anchors
    real = _real()
    stats = train_step(
        generator=g, discriminator=d, opt_g=_adam(g), opt_d=torch.optim.SGD(d.parameters(), 0.0),
        real=real, latent_dim=LATENT, rng=torch.Generator().manual_seed(47),
        lecam_weight=weight, lecam_anchors=anchors,
    )  # fmt: skip
    z = torch.randn(BATCH, LATENT, generator=torch.Generator().manual_seed(47))
    with torch.no_grad():
        fake = g_snapshot(z)
    real_logits, fake_logits = d_ref(real), d_ref(fake)
    anchor_real = 0.9 * 0.4 + 0.1 * real_logits.detach().mean()
    anchor_fake = 0.9 * -0.2 + 0.1 * fake_logits.detach().mean()
    torch.testing.assert_close(anchors.real, anchor_real)
    torch.testing.assert_close(anchors.fake, anchor_fake)
    lecam = lecam_penalty(real_logits, fake_logits, anchor_real, anchor_fake)
    assert lecam.item() > 0  # the penalty is active here, so the gradient check means something
    (nonsaturating_d_loss(real_logits, fake_logits) + weight * lecam).backward()
    torch.testing.assert_close(stats.lecam, lecam.detach())
    for (name, p), (_, p_ref) in zip(d.named_parameters(), d_ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=name)


def test_consistency_enters_the_discriminator_gradient():
    weight = 2.0
    g, d = _models_with(48, d_norm="none")
    g_snapshot, d_ref = copy.deepcopy(g), copy.deepcopy(d)
    real = _real()
    stats = train_step(
        generator=g, discriminator=d, opt_g=_adam(g), opt_d=torch.optim.SGD(d.parameters(), 0.0),
        real=real, latent_dim=LATENT, rng=torch.Generator().manual_seed(49), augment=_Flip(),
        consistency_weight=weight,
    )  # fmt: skip
    z = torch.randn(BATCH, LATENT, generator=torch.Generator().manual_seed(49))
    with torch.no_grad():
        fake = g_snapshot(z)
    augmented_logits = d_ref(real.flip(-1))
    consistency = (d_ref(real) - augmented_logits).pow(2).mean()
    assert consistency.item() > 0
    torch.testing.assert_close(consistency_penalty(d_ref(real), augmented_logits), consistency)
    loss = nonsaturating_d_loss(augmented_logits, d_ref(fake.flip(-1)))
    (loss + weight * consistency).backward()
    torch.testing.assert_close(stats.consistency, consistency.detach())
    for (name, p), (_, p_ref) in zip(d.named_parameters(), d_ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=name)
    assert stats.lecam is None


# ------------------------------------------------------------------ gradient norms and extras


def _norm_of_grads(module: nn.Module) -> float:
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in module.parameters()))


def test_gradient_norms_are_those_of_the_gradients_each_optimizer_stepped_with():
    g, d = _models(31)
    stats = train_step(
        generator=g, discriminator=d, opt_g=_adam(g), opt_d=_adam(d), real=_real(),
        latent_dim=LATENT, rng=torch.Generator().manual_seed(2),
    )  # fmt: skip
    # The G phase freezes D, so D keeps the gradients of its own update (and G those of its).
    assert stats.grad_norm_d.item() == pytest.approx(_norm_of_grads(d), rel=1e-5)
    assert stats.grad_norm_g.item() == pytest.approx(_norm_of_grads(g), rel=1e-5)
    assert stats.grad_norm_g.item() > 0 and stats.grad_norm_d.item() > 0


def test_a_discriminator_parameter_frozen_by_the_user_stays_frozen():
    g, d = _models(33)
    frozen = d.net[0].weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    opt_d = _adam(d)
    train_step(
        generator=g, discriminator=d, opt_g=_adam(g), opt_d=opt_d, real=_real(),
        latent_dim=LATENT, rng=torch.Generator().manual_seed(4),
    )  # fmt: skip
    assert not frozen.requires_grad and torch.equal(frozen, before)
    assert all(p.requires_grad for p in d.parameters() if p is not frozen)


def test_extra_state_round_trips_and_missing_extras_keep_their_own(tmp_path):
    from gan.augment import AdaptiveAugment
    from gan.losses import LeCamAnchors

    a = _Setup(0)
    ada = AdaptiveAugment(interval=1, adjust_speed=100, p=0.0)
    ada.update(1.0, images=30)  # D sure of the reals: p rises to 0.3
    anchors = LeCamAnchors()
    anchors.update(torch.ones(4), -torch.ones(4))
    save_state(tmp_path, step=3, extras={"ada": ada, "lecam": anchors}, **a.parts())
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert set(state["extras"]) == {"ada", "lecam"}

    b = _Setup(1)
    ada_b, anchors_b, untouched = AdaptiveAugment(p=0.9), LeCamAnchors(), AdaptiveAugment(p=0.5)
    load_state(tmp_path, extras={"ada": ada_b, "lecam": anchors_b, "new": untouched}, **b.parts())
    assert ada_b.p == pytest.approx(0.3) and ada_b.state_dict() == ada.state_dict()
    assert torch.equal(anchors_b.real, anchors.real) and torch.equal(anchors_b.fake, anchors.fake)
    assert untouched.p == 0.5


def test_conditional_step_trains_both_label_embeddings_and_draws_fake_labels():
    torch.manual_seed(5)
    g = Generator(latent_dim=LATENT, resolution=RES, width=4, norm="batch", num_classes=10)
    d = Discriminator(resolution=RES, width=4, norm="spectral", num_classes=10)
    g_embed, d_embed = g.embed.weight.detach().clone(), d.embed.weight.detach().clone()
    labels = torch.arange(BATCH) % 10
    stats = train_step(
        generator=g, discriminator=d, opt_g=_adam(g), opt_d=_adam(d), real=_real(),
        latent_dim=LATENT, rng=torch.Generator().manual_seed(3), labels=labels, num_classes=10,
        loss="hinge",
    )  # fmt: skip
    assert math.isfinite(stats.loss_d.item()) and math.isfinite(stats.loss_g.item())
    assert not torch.equal(g.embed.weight, g_embed)
    assert not torch.equal(d.embed.weight, d_embed)
    with pytest.raises(ValueError, match="both labels and num_classes"):
        train_step(
            generator=g, discriminator=d, opt_g=_adam(g), opt_d=_adam(d), real=_real(),
            latent_dim=LATENT, labels=labels,
        )  # fmt: skip
