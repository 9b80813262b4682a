"""The speed options (perf.*): each gives the same training as the plain path, up to rounding,
and does what it says (bf16 convolutions, NHWC layout, fused optimizer, compiled networks)."""

from __future__ import annotations

import pytest
import torch

from gan.ema import GeneratorEMA
from gan.optim import make_optimizer
from gan.state import unwrap
from gan.transfer import HostToDevice
from pipelines.config import ConfigError, load_config
from pipelines.loop import TrainingState

SIDE = 16
BATCH = 8


@pytest.fixture(autouse=True)
def _keep_global_rng():
    with torch.random.fork_rng(devices=[]):
        yield


def _state(*overrides: str) -> TrainingState:
    config = load_config("smoke", ["train.workers=1", f"train.batch_size={BATCH}", *overrides])
    assert config.data.resolution == SIDE
    return TrainingState(config, channels=1, device=torch.device("cpu"))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    rng = torch.Generator().manual_seed(7)
    images = torch.rand(BATCH, 1, SIDE, SIDE, generator=rng) * 2 - 1
    return images, torch.zeros(BATCH, dtype=torch.long)


def _train(state: TrainingState, steps: int) -> list[float]:
    losses = []
    for step in range(steps):
        real, labels = state.batch(*_batch(), torch.arange(BATCH))
        stats = state.step(real, step, labels=labels)
        losses.append(float(stats.loss_d))
    return losses


def _max_weight_difference(a: TrainingState, b: TrainingState) -> float:
    ours, theirs = a.generator.state_dict(), b.generator.state_dict()
    return max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("perf.precision=fp16", "perf.precision: unknown 'fp16'; allowed: fp32, bf16"),
        ("perf.pin_memory=true", "set train.use_gpu=true"),
        ("perf.compile=true perf.channels_last=true", "turn one of them off"),
    ],
)
def test_config_refuses_options_it_cannot_honour(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", override.split())


def test_fused_optimizer_needs_adam() -> None:
    with pytest.raises(ConfigError, match=r"adam and adamw only \(optim.d_optimizer=sgd\)"):
        load_config("smoke", ["perf.fused_optimizer=true", "optim.d_optimizer=sgd"])


def test_fused_adam_follows_the_unfused_one() -> None:
    plain, fused = _state(), _state("perf.fused_optimizer=true")
    assert fused.opt_g.defaults["fused"] and fused.opt_d.defaults["fused"]
    assert not plain.opt_g.defaults["fused"]
    assert _train(plain, 3) == pytest.approx(_train(fused, 3), abs=1e-5)
    assert _max_weight_difference(plain, fused) < 1e-5


def test_bf16_runs_the_convolutions_in_bfloat16_and_keeps_float32_weights() -> None:
    state = _state("perf.precision=bf16")
    conv_outputs: list[torch.dtype] = []
    first_conv = next(m for m in state.discriminator.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda _m, _i, out: conv_outputs.append(out.dtype))
    bf16 = _train(state, 3)
    assert set(conv_outputs) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in state.generator.parameters())
    assert all(torch.isfinite(torch.tensor(bf16)))
    # bfloat16 keeps 8 bits of mantissa: the same training, a little off.
    assert bf16 == pytest.approx(_train(_state(), 3), abs=0.05)


def test_channels_last_changes_the_layout_not_the_result() -> None:
    nhwc = _state("perf.channels_last=true")
    conv = next(m for m in nhwc.discriminator.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    real, _ = nhwc.batch(*_batch(), torch.arange(BATCH))
    assert real.is_contiguous(memory_format=torch.channels_last)
    plain = _state()
    assert _train(nhwc, 3) == pytest.approx(_train(plain, 3), abs=1e-5)
    assert _max_weight_difference(nhwc, plain) < 1e-5


def test_compiled_networks_train_like_eager_ones_and_checkpoint_plain_keys() -> None:
    compiled = _state("perf.compile=true", "ema.enabled=true")
    eager = _state("ema.enabled=true")
    assert _train(compiled, 2) == pytest.approx(_train(eager, 2), abs=1e-4)
    assert _max_weight_difference(compiled, eager) < 1e-4
    keys = list(compiled.checkpoint_parts()["generator"].state_dict())
    assert keys == list(eager.generator.state_dict())
    assert compiled._compiled, "perf.compile=true compiled nothing"


def test_unwrap_sees_through_compile_and_ddp_wrappers() -> None:
    module = torch.nn.Linear(2, 2)
    assert unwrap(torch.compile(module)) is module
    ema = GeneratorEMA(torch.compile(module))
    ema.update(torch.compile(module), step=0)  # parameter names match: no _orig_mod. prefix
    assert set(dict(ema.module.named_parameters())) == {"weight", "bias"}


def test_make_optimizer_refuses_fused_sgd() -> None:
    with pytest.raises(ValueError, match="adam and adamw only"):
        make_optimizer("sgd", torch.nn.Linear(2, 2).parameters(), lr=0.1, fused=True)


def test_pinned_copies_need_a_gpu() -> None:
    with pytest.raises(ValueError, match="not to cpu"):
        HostToDevice(torch.device("cpu"), pin_memory=True)


def test_a_batch_carries_labels_only_for_a_class_conditional_model() -> None:
    images = torch.rand(20, 1, SIDE, SIDE)
    labels = torch.arange(20) % 10
    index = torch.tensor([3, 14, 7])
    config = load_config("smoke", ["train.workers=1", "model.conditional=true"])
    conditional = TrainingState(config, channels=1, device=torch.device("cpu"), num_classes=10)
    real, picked = conditional.batch(images, labels, index)
    assert torch.equal(real, images[index]) and torch.equal(picked, labels[index])
    real, picked = _state().batch(images, labels, index)
    assert torch.equal(real, images[index]) and picked is None
