"""The divergence guard on a real TrainingState in one process: a NaN weight or loss is caught,
the state goes back to the last snapshot with lower learning rates, and after the configured
number of rollbacks training stops with an error naming the keys to change."""

from __future__ import annotations

import pytest
import torch

from gan.state import save_state
from pipelines.config import load_config
from pipelines.divergence import DivergenceGuard, TrainingDiverged
from pipelines.faults import (
    FAULT_CRASH_MARKER_ENV,
    FAULT_CRASH_STEP_ENV,
    FAULT_NAN_STEP_ENV,
    FAULT_NAN_TIMES_ENV,
    CrashInjector,
    InjectedCrash,
    NanInjector,
)
from pipelines.loop import TrainingState


def _state(*overrides: str) -> TrainingState:
    config = load_config(
        "smoke",
        ["train.workers=1", "data.shards=1", "optim.decay=none", "model.g_norm=batch", *overrides],
    )
    return TrainingState(config, channels=1, device=torch.device("cpu"))


def _train(state: TrainingState, steps: range) -> torch.Tensor:
    figures = []
    for step in steps:
        real = torch.rand(16, 1, 16, 16, generator=state.rng) * 2 - 1
        stats = state.step(real, step)
        figures.append(torch.stack([torch.as_tensor(stats.loss_d), torch.as_tensor(stats.loss_g)]))
    return torch.stack(figures).mean(0)


def _weights(state: TrainingState) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.generator.state_dict().items()}


def test_nan_weight_is_caught_and_rolled_back_with_lower_rates(monkeypatch):
    state = _state("train.nan_rollbacks=2", "train.rollback_lr_factor=0.5")
    guard = DivergenceGuard(state, max_rollbacks=2, lr_factor=0.5, rank=0, world=1)
    figures = _train(state, range(0, 10))
    assert guard.healthy(figures)
    guard.snapshot(10, [state.rng.get_state()])
    good, rates = _weights(state), state.rates()

    monkeypatch.setenv(FAULT_NAN_STEP_ENV, "12")
    inject = NanInjector()
    for step in range(10, 15):
        _train(state, range(step, step + 1))
        inject.after_step(step, state)
    assert not guard.healthy(torch.zeros(2)), "a NaN weight with finite figures is caught"
    assert not guard.healthy(torch.tensor([float("nan"), 0.0]))

    assert guard.roll_back(15) == 10
    assert state.rates() == pytest.approx({k: v * 0.5 for k, v in rates.items()})
    for key, value in _weights(state).items():
        assert torch.equal(value, good[key]), key
    assert guard.healthy(_train(state, range(10, 20)))
    # The lowered rate is the new base: the schedule does not put the old one back.
    assert state.rates() == pytest.approx({k: v * 0.5 for k, v in rates.items()})
    assert guard.rollbacks == 1
    guard.close()


def test_rates_keep_falling_when_rolled_back_to_the_same_snapshot():
    state = _state()
    guard = DivergenceGuard(state, max_rollbacks=3, lr_factor=0.1, rank=0, world=1)
    guard.snapshot(0, [state.rng.get_state()])
    lr = state.rates()["lr_g"]
    guard.roll_back(5)
    guard.roll_back(5)
    assert state.rates()["lr_g"] == pytest.approx(lr * 0.01)
    guard.close()


def test_past_the_limit_training_stops_naming_the_keys():
    state = _state()
    guard = DivergenceGuard(state, max_rollbacks=1, lr_factor=0.5, rank=0, world=1)
    guard.snapshot(0, [state.rng.get_state()])
    guard.roll_back(10)
    with pytest.raises(TrainingDiverged) as info:
        guard.roll_back(20)
    message = str(info.value)
    for words in ("at step 20", "after 1 rollback", "train.nan_rollbacks=1", "optim.lr_g"):
        assert words in message
    guard.close()


def test_the_rollback_count_travels_in_the_checkpoint(tmp_path):
    state = _state()
    guard = DivergenceGuard(state, max_rollbacks=3, lr_factor=0.5, rank=0, world=1)
    guard.snapshot(0, [state.rng.get_state()])
    guard.roll_back(10)
    guard.snapshot(20, [state.rng.get_state()])
    guard.copy_snapshot(tmp_path)

    restarted = _state()
    assert restarted.restore(str(tmp_path), 0, 1) == 20
    other = DivergenceGuard(restarted, max_rollbacks=3, lr_factor=0.5, rank=0, world=1)
    other.load_from_checkpoint(tmp_path)
    assert other.rollbacks == 1
    assert restarted.rates() == pytest.approx(state.rates())  # the lowered rates, too

    # A checkpoint written before this feature has no count: the restarted run starts at 0.
    plain = tmp_path / "plain"
    plain.mkdir()
    save_state(plain, step=5, **restarted.checkpoint_parts())
    fresh = DivergenceGuard(restarted, max_rollbacks=3, lr_factor=0.5, rank=0, world=1)
    fresh.load_from_checkpoint(plain)
    assert fresh.rollbacks == 0
    for g in (guard, other, fresh):
        g.close()


def test_injection_is_off_unless_asked_and_fires_the_given_number_of_times(monkeypatch):
    state = _state()
    monkeypatch.delenv(FAULT_NAN_STEP_ENV, raising=False)
    NanInjector().after_step(0, state)
    assert all(torch.isfinite(p).all() for p in state.generator.parameters())

    monkeypatch.setenv(FAULT_NAN_STEP_ENV, "3")
    monkeypatch.setenv(FAULT_NAN_TIMES_ENV, "2")
    inject = NanInjector()
    fired = 0
    for _ in range(3):  # the step is trained three times (two rollbacks)
        with torch.no_grad():
            next(state.generator.parameters()).view(-1)[0] = 0.0
        inject.after_step(2, state)
        fired += int(not torch.isfinite(next(state.generator.parameters())).all())
    assert fired == 2


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("train.nan_rollbacks=-1", ["train.nan_rollbacks", ">= 0"]),
        ("train.rollback_lr_factor=0", ["train.rollback_lr_factor", "(0, 1]"]),
        ("train.rollback_lr_factor=1.5", ["train.rollback_lr_factor", "(0, 1]"]),
        ("train.max_failures=-2", ["train.max_failures", ">= -1"]),
    ],
)
def test_fault_keys_are_validated(override, words):
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    for word in words:
        assert word in str(info.value)


def test_the_injected_crash_happens_once_across_processes(monkeypatch, tmp_path):
    marker = tmp_path / "crashed"
    monkeypatch.setenv(FAULT_CRASH_STEP_ENV, "5")
    monkeypatch.setenv(FAULT_CRASH_MARKER_ENV, str(marker))
    first, restarted = CrashInjector(), CrashInjector()  # as two worker processes would
    first.after_step(3)  # step index 3 is the 4th step: not yet
    with pytest.raises(InjectedCrash, match="after step 5"):
        first.after_step(4)
    assert marker.exists()
    restarted.after_step(4)  # the marker is there: the restarted worker trains on


def test_a_crash_step_without_a_marker_is_refused(monkeypatch):
    monkeypatch.setenv(FAULT_CRASH_STEP_ENV, "5")
    monkeypatch.delenv(FAULT_CRASH_MARKER_ENV, raising=False)
    with pytest.raises(ValueError, match=FAULT_CRASH_MARKER_ENV):
        CrashInjector()
