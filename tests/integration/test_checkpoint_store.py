"""The checkpoint store refuses writes mid-training: a real read-only file system (a tmpfs
remounted read-only, which refuses root as well) under Ray Train's storage path. Training stops
with one clear error naming the store and the way on; the checkpoints written before stay
complete, and a rerun on the writable store continues from the last of them."""

from __future__ import annotations

import subprocess

import pyarrow.parquet as pq
import pytest
import torch

from gan.data.shards import split_shards, to_table
from gan.data.sources import load_digits
from gan.state import load_state
from pipelines.config import load_config
from pipelines.loop import TrainingState
from pipelines.train import CheckpointWriteError, run_training

pytestmark = pytest.mark.integration
CHECKPOINT = 50  # seconds apart on 2 cores: the store freezes between two


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def store(tmp_path):
    folder = tmp_path / "store"
    folder.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)):
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        yield folder
    finally:
        _mount("-o", "remount,rw", str(folder))
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_read_only_store_stops_training_clearly_and_keeps_the_last_checkpoint(
    ray_session, tmp_path, store
):
    shards = []
    for i, part in enumerate(split_shards(load_digits(16), 2)):
        shards.append(str(tmp_path / f"train-{i}.parquet"))
        pq.write_table(to_table(part), shards[-1])
    config = load_config(
        "smoke",
        ["train.steps=2000", "train.report_every=10", f"train.checkpoint_every={CHECKPOINT}",
         "train.eval_every=0", "train.max_failures=0"],
    )  # fmt: skip
    written: list[tuple[int, str]] = []

    def on_report(metrics, checkpoint):  # noqa: ANN001
        if checkpoint and not written:
            assert _mount("-o", "remount,ro", str(store)), "could not make the store read-only"
        if checkpoint:
            written.append((metrics["step"], checkpoint))

    kwargs = dict(shards=shards, shape=(1, 16, 16), storage_path=str(store), name="train")
    with pytest.raises(CheckpointWriteError) as info:
        run_training(config, on_report=on_report, **kwargs)
    message = str(info.value)
    assert f"cannot write checkpoints to {store} (Read-only file system)" in message
    assert "run the same command again" in message
    # The error names the last complete checkpoint, written before the store froze; it loads.
    last_step, last_path = written[-1]
    assert last_path in message
    for step, path in written:
        state = TrainingState(config, channels=1, device=torch.device("cpu"))
        assert load_state(path, **state.checkpoint_parts()) == step

    # Writable again: a rerun continues from that checkpoint, not from a half-written later one.
    assert _mount("-o", "remount,rw", str(store))
    short = load_config(
        "smoke",
        [f"train.steps={last_step + CHECKPOINT}", "train.report_every=10",
         f"train.checkpoint_every={CHECKPOINT}", "train.eval_every=0", "train.max_failures=0"],
    )  # fmt: skip
    resumed = run_training(short, **kwargs)
    assert resumed.history[0]["step"] == last_step + 10
    assert resumed.history[-1]["step"] == short.train.steps
