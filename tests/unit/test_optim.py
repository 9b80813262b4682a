"""gan.optim: optimizers by name, and overriding a learning rate restored from a checkpoint."""

from __future__ import annotations

import io

import pytest
import torch

from gan.optim import OPTIMIZERS, make_optimizer, set_learning_rate
from gan.schedules import SchedulePolicy, make_scheduler


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(3, 2, generator=g)), torch.nn.Parameter(torch.zeros(2))]


def _train(optimizer: torch.optim.Optimizer, steps: int = 2) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        loss = sum(
            (p**2).sum() + p.sum() for group in optimizer.param_groups for p in group["params"]
        )
        loss.backward()
        optimizer.step()


def test_optimizer_names():
    assert OPTIMIZERS == ("adam", "adamw", "rmsprop", "sgd")


@pytest.mark.parametrize(
    ("name", "cls", "expected"),
    [
        ("adam", torch.optim.Adam, dict(betas=(0.4, 0.95), eps=1e-7, weight_decay=0.01)),
        ("adamw", torch.optim.AdamW, dict(betas=(0.4, 0.95), eps=1e-7, weight_decay=0.01)),
        (
            "rmsprop",
            torch.optim.RMSprop,
            dict(alpha=0.99, momentum=0.8, eps=1e-7, weight_decay=0.01, centered=False),
        ),
        ("sgd", torch.optim.SGD, dict(momentum=0.8, weight_decay=0.01, nesterov=False)),
    ],
)
def test_make_optimizer_hyper_parameters(name, cls, expected):
    params = _params()
    opt = make_optimizer(
        name, params, lr=3e-4, betas=(0.4, 0.95), weight_decay=0.01, momentum=0.8, eps=1e-7
    )
    assert type(opt) is cls
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["lr"] == 3e-4
    for key, value in expected.items():
        assert group[key] == value, key
    assert group["params"] == params
    before = [p.detach().clone() for p in params]
    _train(opt)
    assert all(not torch.equal(b, p) for b, p in zip(before, params, strict=True))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("adam", dict(betas=(0.5, 0.999), eps=1e-8, weight_decay=0.0)),
        ("adamw", dict(betas=(0.5, 0.999), eps=1e-8, weight_decay=0.0)),
        ("rmsprop", dict(alpha=0.99, momentum=0.9, eps=1e-8, weight_decay=0.0)),
        ("sgd", dict(momentum=0.9, weight_decay=0.0)),
    ],
)
def test_make_optimizer_defaults(name, expected):
    group = make_optimizer(name, _params(), lr=2e-4).param_groups[0]
    assert group["lr"] == 2e-4
    for key, value in expected.items():
        assert group[key] == value, key


def test_make_optimizer_accepts_param_groups():
    a, b = _params()
    opt = make_optimizer("adam", [{"params": [a]}, {"params": [b], "lr": 1e-5}], lr=1e-3)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-5]


def test_unknown_optimizer_name():
    with pytest.raises(
        ValueError, match="unknown optimizer 'adagrad'; allowed: adam, adamw, rmsprop, sgd"
    ):
        make_optimizer("adagrad", _params(), lr=1e-3)


@pytest.mark.parametrize("lr", [0.0, -1e-3, float("nan")])
def test_non_positive_learning_rate(lr):
    with pytest.raises(ValueError, match="lr must be > 0"):
        make_optimizer("adam", _params(), lr=lr)
    with pytest.raises(ValueError, match="lr must be > 0"):
        set_learning_rate(make_optimizer("sgd", _params(), lr=1e-3), lr)


def _checkpoint(optimizer: torch.optim.Optimizer, scheduler=None) -> dict:
    buffer = io.BytesIO()
    state = {"opt": optimizer.state_dict()}
    if scheduler is not None:
        state["sched"] = scheduler.state_dict()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_set_learning_rate_overrides_the_rate_restored_by_load_state_dict():
    def two_groups(lr: float, seed: int) -> torch.optim.Optimizer:
        a, b = _params(seed)
        return make_optimizer("adam", [{"params": [a]}, {"params": [b]}], lr=lr)

    old = two_groups(1e-3, 0)
    _train(old)
    saved = _checkpoint(old)

    new = two_groups(4e-4, 1)
    new.load_state_dict(saved["opt"])
    assert [g["lr"] for g in new.param_groups] == [1e-3, 1e-3]  # the checkpoint's rate won
    set_learning_rate(new, 4e-4)
    assert [g["lr"] for g in new.param_groups] == [4e-4, 4e-4]
    assert all("initial_lr" not in g for g in new.param_groups)  # no scheduler: nothing else
    assert new.state_dict()["state"][0]["step"] == 2  # moments and step count are kept
    _train(new)
    assert [g["lr"] for g in new.param_groups] == [4e-4, 4e-4]


def _scheduled(lr: float, seed: int):
    opt = make_optimizer("adam", _params(seed), lr=lr)
    policy = SchedulePolicy(total_steps=20, warmup_steps=4, decay="cosine", min_factor=0.1)
    return opt, make_scheduler(opt, policy), policy


def _steps(opt, sched, n: int) -> None:
    for _ in range(n):
        _train(opt, 1)
        sched.step()


@pytest.mark.parametrize("keep_position", [True, False])
def test_set_learning_rate_moves_a_scheduled_optimizer_onto_the_new_curve(keep_position):
    """The PBT exploit: load another trial's checkpoint, then impose this trial's rate."""
    old_opt, old_sched, policy = _scheduled(1e-3, 0)
    _steps(old_opt, old_sched, 9)
    saved = _checkpoint(old_opt, old_sched)

    opt, sched, _ = _scheduled(4e-4, 1)
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * policy.factor(9), rel=1e-15)
    assert opt.param_groups[0]["initial_lr"] == 1e-3

    set_learning_rate(opt, 4e-4, keep_schedule_position=keep_position)
    assert opt.param_groups[0]["initial_lr"] == 4e-4
    now = 4e-4 * policy.factor(9) if keep_position else 4e-4
    assert opt.param_groups[0]["lr"] == pytest.approx(now, rel=1e-15)
    for step in range(10, 25):
        _steps(opt, sched, 1)
        assert opt.param_groups[0]["lr"] == pytest.approx(4e-4 * policy.factor(step), rel=1e-15)
        assert sched.get_last_lr() == [opt.param_groups[0]["lr"]]


def test_writing_only_lr_is_undone_by_the_scheduler():
    """Why set_learning_rate also writes initial_lr: the scheduler rebuilds lr from it."""
    old_opt, old_sched, policy = _scheduled(1e-3, 0)
    _steps(old_opt, old_sched, 9)
    saved = _checkpoint(old_opt, old_sched)
    opt, sched, _ = _scheduled(4e-4, 1)
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    opt.param_groups[0]["lr"] = 4e-4 * policy.factor(9)
    _steps(opt, sched, 1)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * policy.factor(10), rel=1e-15)
