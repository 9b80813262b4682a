"""Bad input that earlier tests did not cover, each refused with one message naming the problem
and the fix, before anything is written: config combinations, resources the machine lacks,
checkpoint files that are not ours (loaded with weights_only=True, never executed) and diverged
weights (never evaluated or registered). docs/reliability.md lists where the other cases are."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gan.state import CheckpointError, load_generator_weights, load_state, save_state
from pipelines.config import ConfigError, load_config
from pipelines.loop import TrainingState
from pipelines.runner import check_local_resources


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("loss.gp_weight=10 model.d_norm=batch", ["gradient penalties", "model.d_norm=spectral"]),
        ("loss.r1_gamma=1 model.d_norm=sync_batch", ["batch norm in D", "spectral or none"]),
        ("loss.kind=wasserstein", ["Lipschitz", "loss.gp_weight"]),
        ("loss.kind=sigmoid", ["loss.kind", "nonsaturating, hinge"]),
        ("train=3", ["train: expected a mapping"]),
        ("train.steps=1.5", ["train.steps: expected int, got float"]),
        ("data.holdout_fraction=1", ["data.holdout_fraction", "(0, 1)"]),
        ("augment.adaptive=true", ["augment.adaptive", "augment.kinds"]),
    ],
)
def test_config_combinations_and_types_are_refused_naming_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, override.split())
    for word in words:
        assert word in str(info.value)


def test_a_preset_file_with_an_unknown_nested_key_is_refused(tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("train:\n  steps: 10\n  wokers: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.wokers'.*workers"):
        load_config(str(preset))


def test_more_workers_than_the_machine_has_cpus_or_gpus():
    config = load_config(None, ["train.workers=8", "data.shards=8"])
    with pytest.raises(ConfigError) as info:
        check_local_resources(config, cpus=3)
    assert "needs 8 CPUs; this machine's Ray has 3 (2 cores + 1)" in str(info.value)
    assert "lower train.workers" in str(info.value)
    check_local_resources(config, cpus=9)

    gpu = load_config(None, ["train.use_gpu=true", "train.workers=2"])
    with pytest.raises(ConfigError, match="no CUDA GPU: set train.use_gpu=false"):
        check_local_resources(gpu, gpus=0)
    with pytest.raises(ConfigError, match="needs 2 GPUs; this machine has 1"):
        check_local_resources(gpu, gpus=1)


def test_cli_refuses_more_workers_than_cpus_before_ray_starts(tmp_path):
    workers = (os.cpu_count() or 1) + 2
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", "-c", "smoke", f"workdir={tmp_path}/w",
         f"train.workers={workers}", f"data.shards={workers}", f"train.batch_size={4 * workers}"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ganpipe: error: config: train.workers"), lines
    assert "ganpipe submit" in lines[0]
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------ checkpoints


class _Payload:
    """A pickle that would create a file if it were ever unpickled with weights_only=False."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _state() -> TrainingState:
    config = load_config("smoke", ["train.workers=1", "data.shards=1"])
    return TrainingState(config, channels=1, device=torch.device("cpu"))


@pytest.mark.parametrize("kind", ["code", "garbage", "foreign_dict", "missing"])
def test_a_checkpoint_that_is_not_ours_is_refused_cleanly(tmp_path, kind):
    marker = tmp_path / "executed"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    if kind == "code":
        torch.save({"step": torch.tensor(1), "generator": _Payload(str(marker))}, folder / "x")
        (folder / "x").rename(folder / "state.pt")
    elif kind == "garbage":
        (folder / "state.pt").write_bytes(os.urandom(256))
    elif kind == "foreign_dict":
        torch.save({"model": torch.zeros(3)}, folder / "state.pt")
    with pytest.raises(CheckpointError) as info:
        load_state(folder, **_state().checkpoint_parts())
    message = str(info.value)
    assert str(folder / "state.pt") in message
    assert "not a ganpipe checkpoint" in message or "no such checkpoint" in message
    assert "weights_only=False" not in message  # never advise running a foreign pickle
    assert not marker.exists(), "the pickle's code ran"
    with pytest.raises(CheckpointError):
        load_generator_weights(folder)


def test_pickled_payloads_are_refused_by_weights_only_with_the_reason(tmp_path):
    (tmp_path / "state.pt").write_bytes(pickle.dumps({"step": _Payload(str(tmp_path / "x"))}))
    with pytest.raises(CheckpointError, match="refused it .*(GLOBAL|Unsupported)"):
        load_generator_weights(tmp_path)
    assert not (tmp_path / "x").exists()


def test_a_diverged_generator_is_never_evaluated_or_registered(tmp_path):
    from pipelines.registry import evaluated_generator

    state = _state()
    with torch.no_grad():
        next(state.generator.parameters()).view(-1)[0] = float("nan")
    save_state(tmp_path, step=7, **state.checkpoint_parts())
    with pytest.raises(CheckpointError, match="NaN or infinite weights.*training diverged"):
        load_generator_weights(tmp_path)
    # register builds the served generator through the same loader (and evaluate, too).
    with pytest.raises(CheckpointError, match="NaN or infinite weights"):
        evaluated_generator(state.config, str(tmp_path), 1)


# ----------------------------------------------------------------------------------- data


def test_nan_pixels_in_a_parquet_source_are_refused_naming_the_file(tmp_path):
    from gan.data import read_source

    path = tmp_path / "nan.parquet"
    pixels = np.full((4, 64), 0.5, np.float32)
    pixels[2, 10] = np.nan
    column = pa.array(list(pixels), pa.list_(pa.float32(), 64))
    table = {"image": column, "label": [0, 1, 0, 1], "height": [8] * 4, "width": [8] * 4}
    pq.write_table(pa.table(table), path)
    with pytest.raises(ValueError, match=r"nan.parquet.*float pixels; expected uint8 0..255"):
        read_source(str(path), 8)
