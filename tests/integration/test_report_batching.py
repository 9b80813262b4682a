"""Ray Train reports carry several windows of figures (train.report_seconds): a real 2-worker
Ray Train run, where a report that only some workers made would hang or fail the run."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from gan.data.shards import split_shards, to_table
from gan.data.sources import load_digits
from pipelines.config import load_config
from pipelines.train import run_training

pytestmark = pytest.mark.integration
STEPS, REPORT, CHECKPOINT = 60, 10, 30


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report-batching")
    paths = []
    for i, part in enumerate(split_shards(load_digits(16), 2)):
        paths.append(str(folder / f"train-{i}.parquet"))
        pq.write_table(to_table(part), paths[-1])
    return paths


def _train(shards, tmp_path, report_seconds: float):  # noqa: ANN001, ANN202
    config = load_config(
        "smoke",
        [f"train.steps={STEPS}", f"train.report_every={REPORT}",
         f"train.checkpoint_every={CHECKPOINT}", "train.eval_every=0",
         f"train.report_seconds={report_seconds}"],
    )  # fmt: skip
    seen: list[tuple[int, str | None]] = []
    result = run_training(
        config,
        shards=shards,
        shape=(1, 16, 16),
        storage_path=str(tmp_path / "store"),
        name="train",
        on_report=lambda metrics, checkpoint: seen.append((metrics["step"], checkpoint)),
    )
    return result, seen


@pytest.mark.parametrize(
    ("report_seconds", "arrivals"),
    [
        # Never due by the clock: the first window alone, then each checkpoint with the windows
        # before it (the last checkpoint is the end).
        (3600, [REPORT, CHECKPOINT, STEPS]),
        # Always due: one report per window, as before windows were batched.
        (0, list(range(REPORT, STEPS + 1, REPORT))),
    ],
)
def test_every_window_reaches_the_driver_once_in_order_whatever_carries_it(
    ray_session, shards, tmp_path, report_seconds, arrivals
):
    result, seen = _train(shards, tmp_path, report_seconds)
    assert [step for _, step in result.report_arrivals] == arrivals
    windows = list(range(REPORT, STEPS + 1, REPORT))
    assert [step for step, _ in seen] == windows
    assert [m["step"] for m in result.history] == windows
    # The checkpoint goes with the window whose step it holds, and with no other.
    assert [step for step, checkpoint in seen if checkpoint] == [CHECKPOINT, STEPS]
    assert seen[-1][1] == result.checkpoint_path
    # Each window keeps its own figures: batching does not repeat or average them.
    assert len({m["loss_d"] for m in result.history}) == len(windows)


def test_reports_due_by_rank_zeros_clock_keep_every_window(ray_session, shards, tmp_path):
    # Due by wall time, so after some windows and not others: all workers must hand over at the
    # same windows (rank 0 decides for them), or the run hangs or fails.
    result, seen = _train(shards, tmp_path, report_seconds=0.2)
    windows = list(range(REPORT, STEPS + 1, REPORT))
    assert [step for step, _ in seen] == windows
    arrived = [step for _, step in result.report_arrivals]
    assert arrived[0] == REPORT and arrived[-1] == STEPS and CHECKPOINT in arrived
    assert arrived == sorted(set(arrived)) and set(arrived) <= set(windows)
