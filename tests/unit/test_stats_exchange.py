"""gan.nn.stats_exchange across three gloo processes: sums small and large, a late rank,
strangers at set-up, DDP's gradients, the gloo fallback, a silent peer and a lost one."""

from __future__ import annotations

import os
import socket
import struct
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from spawned_ranks import run_ranks
from torch import nn

from gan.nn import stats_exchange
from gan.nn.stats_exchange import (
    EXCHANGE_ENV,
    MAX_BLOCKING_BYTES,
    RECEIVE_TIMEOUT_S,
    SPIN_S,
    _meshes,
    all_reduce_sum,
)
from pipelines.train import wrap_ddp

WORLD_SIZE = 3
# float32 elements: just past the send-then-receive path, and far past a socket's buffers
# (Linux's loopback autotunes them up to 4 MiB), where every rank sending first would deadlock.
SIZES = {"over_blocking": MAX_BLOCKING_BYTES // 4 + 1, "over_buffers": 3 * 2**20}
SILENT_TIMEOUT_S = 2.0


def _contribution(rank: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    # Values of very different magnitudes: a sum whose result depends on the order of addition.
    g = torch.Generator().manual_seed(rank)
    return torch.randn(numel, generator=g, dtype=torch.float64).mul(10.0 ** (4 * rank)).to(dtype)


def _knock_before_connecting() -> None:
    """While the mesh is set up, strangers reach rank 0's listener first: one with a wrong token
    claiming to be rank 2, one that hangs up half-way through its hello."""
    real_gather = dist.all_gather_object

    def gather_then_knock(addresses: list[Any], mine: Any, group: Any = None) -> None:
        real_gather(addresses, mine, group=group)
        host, port, token = addresses[0]
        with socket.create_connection((host, port)) as stranger:
            stranger.sendall(bytes(len(token)) + struct.pack("!i", 2))
        with socket.create_connection((host, port)) as stranger:
            stranger.sendall(token[:3])
        dist.all_gather_object = real_gather

    dist.all_gather_object = gather_then_knock


def _ddp_model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        # About 70,000 parameters: DDP's default 25 MiB bucket takes them in one.
        return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 64), nn.Linear(64, 1))


def _ddp_gradients(rank: int) -> dict[str, Any]:
    """One backward through the pipeline's DDP (pipelines.train.wrap_ddp) on rank-specific data,
    and each rank's local gradients for the parent to average."""
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(rank))
    local = _ddp_model()
    local(x).square().mean().backward()
    ddp = wrap_ddp(_ddp_model())
    ddp(x).square().mean().backward()
    return {
        "local": [p.grad for p in local.parameters()],
        "averaged": [p.grad for p in ddp.module.parameters()],
        "comm_hook": ddp._get_ddp_logging_data().get("comm_hook", ""),
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=WORLD_SIZE,
            timeout=timedelta(seconds=60),
        )
        real_all_reduce = dist.all_reduce
        gloo_calls: list[int] = []

        def counting_all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            gloo_calls.append(tensor.numel())
            return real_all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce
        if rank == 2:
            _knock_before_connecting()
        results: dict[str, Any] = {}
        for dtype in (torch.float32, torch.float64):
            t = _contribution(rank, 257, dtype)
            all_reduce_sum(t)
            results[f"small_{dtype}"] = t
        for name, numel in SIZES.items():
            t = _contribution(rank, numel, torch.float32)
            all_reduce_sum(t)
            results[name] = t
        # Rank 1 comes to a small sum long after the others have stopped spinning and blocked.
        if rank == 1:
            time.sleep(100 * SPIN_S)
        late = _contribution(rank, 257, torch.float64)
        all_reduce_sum(late)
        results["late"] = late
        results["timeouts"] = [
            (
                conn.gettimeout(),
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16),
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16),
            )
            for conn in _meshes[dist.group.WORLD].peers.values()
        ]
        results["gloo_calls"] = list(gloo_calls)
        results["ddp"] = _ddp_gradients(rank)

        os.environ[EXCHANGE_ENV] = "process_group"
        logging_data = wrap_ddp(_ddp_model())._get_ddp_logging_data()
        results["ddp_hook_with_process_group"] = logging_data.get("comm_hook", "")
        t = _contribution(rank, 5, torch.float64)
        all_reduce_sum(t)
        results["process_group"] = t
        results["gloo_calls_after"] = list(gloo_calls)
        os.environ[EXCHANGE_ENV] = "carrier-pigeon"
        try:
            all_reduce_sum(torch.zeros(3))
        except ValueError as error:
            results["bad_env"] = str(error)
        del os.environ[EXCHANGE_ENV]
        dist.all_reduce = real_all_reduce
        dist.barrier()

        # Rank 2 stays but stops summing: ranks 0 and 1 fail when the kernel's receive timeout
        # runs out (2 s for a group of its own), naming it.
        stats_exchange.RECEIVE_TIMEOUT_S = SILENT_TIMEOUT_S
        group = dist.new_group(list(range(WORLD_SIZE)))
        all_reduce_sum(torch.ones(2), group)
        stats_exchange.RECEIVE_TIMEOUT_S = RECEIVE_TIMEOUT_S
        if rank != 2:
            started = time.monotonic()
            try:
                all_reduce_sum(torch.ones(2), group)
            except RuntimeError as error:
                results["silent"] = (str(error), time.monotonic() - started)
        dist.barrier()

        # Rank 0 sums one element fewer than the others, as if it skipped a layer or a bucket:
        # an error on every rank that names the sizes, not a sum of unrelated bytes or a hang.
        # Both sizes of "large" are past the send-then-receive path on every rank.
        for name, numel in (("small", 5), ("large", SIZES["over_blocking"] + 1)):
            try:
                all_reduce_sum(torch.ones(numel - (rank == 0)))
            except RuntimeError as error:
                results[f"out_of_step_{name}"] = str(error)
            dist.barrier()
        # The failed connections are dropped; the next sum connects the ranks again.
        recovered = torch.full((3,), float(rank))
        all_reduce_sum(recovered)
        results["after_out_of_step"] = recovered

        # Rank 2 goes away; the others must get an error that names it, not hang.
        if rank == 2:
            torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
            os._exit(0)
        try:
            all_reduce_sum(torch.ones(4))
        except RuntimeError as error:
            results["lost"] = str(error)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks(_worker, WORLD_SIZE, tmp_path_factory.mktemp("exchange"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_rank_gets_the_same_bits_of_the_rank_order_sum(
    results: list[dict[str, Any]], dtype: torch.dtype
) -> None:
    expected = _contribution(0, 257, dtype).clone()
    for rank in range(1, WORLD_SIZE):
        expected += _contribution(rank, 257, dtype)
    for r in results:
        assert torch.equal(r[f"small_{dtype}"], expected)


def test_ranks_early_to_a_sum_block_after_their_spin_and_get_it_when_the_last_comes(
    results: list[dict[str, Any]],
) -> None:
    expected = _contribution(0, 257, torch.float64).clone()
    for rank in range(1, WORLD_SIZE):
        expected += _contribution(rank, 257, torch.float64)
    for r in results:
        assert torch.equal(r["late"], expected)
        # Blocking again, under the kernel's timeout that fails a peer that stopped answering.
        thirty_minutes = struct.pack("ll", int(RECEIVE_TIMEOUT_S), 0)
        assert r["timeouts"] == [(None, thirty_minutes, thirty_minutes)] * (WORLD_SIZE - 1)


@pytest.mark.parametrize("size", sorted(SIZES))
def test_large_tensors_go_over_the_connections_too_without_deadlock(
    results: list[dict[str, Any]], size: str
) -> None:
    expected = _contribution(0, SIZES[size], torch.float32).clone()
    for rank in range(1, WORLD_SIZE):
        expected += _contribution(rank, SIZES[size], torch.float32)
    for r in results:
        assert r["gloo_calls"] == []
        assert torch.equal(r[size], expected)


def test_ddp_gradients_are_the_rank_order_average_on_every_rank(
    results: list[dict[str, Any]],
) -> None:
    # gloo's DDP divides before it sums, in its own order: other bits than these.
    for i in range(len(results[0]["ddp"]["local"])):
        total = results[0]["ddp"]["local"][i].clone()
        for r in results[1:]:
            total += r["ddp"]["local"][i]
        for r in results:
            assert torch.equal(r["ddp"]["averaged"][i], total / WORLD_SIZE)
    for r in results:
        assert "ddp_comm_hook" in r["ddp"]["comm_hook"]
        assert r["ddp_hook_with_process_group"] == ""  # torch's own all-reduce through gloo


def test_process_group_exchange_goes_through_gloo(results: list[dict[str, Any]]) -> None:
    expected = sum(_contribution(rank, 5, torch.float64) for rank in range(WORLD_SIZE))
    for r in results:
        assert r["gloo_calls_after"][-1] == 5
        torch.testing.assert_close(r["process_group"], expected)


def test_unknown_exchange_is_refused_with_the_choices(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert EXCHANGE_ENV in r["bad_env"] and "tcp, process_group" in r["bad_env"]


def test_ranks_out_of_step_fail_on_every_rank_with_the_sizes(
    results: list[dict[str, Any]],
) -> None:
    # Every rank sends before it reads, so each one reads a mismatched header first.
    assert "rank 1's message #" in results[0]["out_of_step_small"] or (
        "rank 2's message #" in results[0]["out_of_step_small"]
    )
    assert "holds 20 bytes where rank 0's" in results[0]["out_of_step_small"]
    for rank in (1, 2):
        error = results[rank]["out_of_step_small"]
        assert "out of step" in error and "rank 0's message #" in error, error
        assert f"holds 16 bytes where rank {rank}'s" in error and "holds 20" in error, error


def test_ranks_out_of_step_fail_on_large_messages_too(results: list[dict[str, Any]]) -> None:
    # A rank that finds a mismatch sends its header to every peer before it hangs up, and a
    # rank whose send fails reads what is left of that peer's header: 30 of 30 ranks in 10
    # runs named the sizes. Any rank may still see only the hang-up; none waits for ever.
    errors = [r.get("out_of_step_large", "") for r in results]
    assert all(e.startswith("exchange between ranks:") for e in errors), errors
    assert any("out of step" in e for e in errors), errors
    for r in results:
        assert torch.equal(r["after_out_of_step"], torch.full((3,), 3.0))


def test_a_silent_peer_fails_the_others_when_the_receive_timeout_runs_out(
    results: list[dict[str, Any]],
) -> None:
    for r in results[:2]:
        error, waited = r["silent"]
        assert "waited 2 s for rank(s) 2; did they stop?" in error, error
        # The kernel counts the timeout in ticks: allow it to end a tick early.
        assert 0.9 * SILENT_TIMEOUT_S <= waited < 10 * SILENT_TIMEOUT_S
    assert "silent" not in results[2]


def test_a_lost_peer_is_an_error_that_names_it(results: list[dict[str, Any]]) -> None:
    for r in results[:2]:
        assert "lost its connection to rank 2" in r["lost"], r.get("lost")
