"""Sums of CPU tensors across the ranks of a process group, over direct TCP connections.

Synchronized batch norm on CPU makes two tiny all-reduces per layer and step (a few hundred
numbers each). Through gloo each one took 0.6 to 2.7 ms between two processes on 2 cores, over a
direct connection 0.07 to 0.14 ms (bench/allreduce_latency.py, docs/benchmarks.md): gloo hands
every collective to a worker thread, and its receive thread spins on a message that arrives
before the receive is posted, taking a core from the rank that is still computing. Here the
calling thread writes to and reads from one connection per peer itself, and the kernel keeps an
early message in the socket buffer until it is read.

DDP's gradient all-reduce on CPU went through gloo too, whose loop thread used about 9 % of a
core per rank at 2 workers. :func:`ddp_comm_hook` sends the gradients over the same connections,
in the thread that runs backward: at 2 workers on 2 cores the pipeline through Ray Train went
from 0.97 to 1.08 of a bare DDP loop that keeps gloo (docs/benchmarks.md). It gives up gloo's
overlap of the all-reduce with the rest of backward, and each rank sends its gradients to every
other rank ((N - 1) times their size, where a ring sends about twice): right for a few CPU
workers, and ``GANPIPE_SYNC_BN_EXCHANGE=process_group`` turns it off.

Each rank sums the same tensors in rank order, so every rank gets bit-identical results, as the
statistics of synchronized batch norm and the replicas of DDP require. The connections are made
on first use in a group (a collective call: every rank of the group must make it) with the
group's own process group handing out the addresses. ``GANPIPE_SYNC_BN_EXCHANGE=process_group``
sends everything through ``torch.distributed.all_reduce`` instead, for networks where ranks
cannot open connections to each other's ephemeral ports.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import selectors
import socket
import struct
import time
import weakref
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from gan.nn.switches import environment_choice

__all__ = [
    "EXCHANGES",
    "EXCHANGE_ENV",
    "MAX_BLOCKING_BYTES",
    "all_reduce_sum",
    "ddp_comm_hook",
    "exchange",
]

EXCHANGE_ENV = "GANPIPE_SYNC_BN_EXCHANGE"
EXCHANGES = ("tcp", "process_group")
# Up to this size every rank sends before it receives, which cannot deadlock while the message
# fits in what the kernel buffers before the peer reads (on a new connection between hosts that
# can be as little as about 64 KiB); larger ones (gradient buckets) are sent while receiving.
# Sync batch norm's statistics stay below it up to about 1,000 channels.
MAX_BLOCKING_BYTES = 16 * 1024
CONNECT_TIMEOUT_S = 60.0
# A rank that is early at a small exchange reads without blocking for this long before it
# blocks. Most waits are shorter (median 6 µs, 90th percentile 180 µs, in sync batch norm's step
# at 2 workers), and a rank that blocks lets its core go idle (on these KVM machines an idle core
# halts at once), so the peer's message must wake it first. In turns on 2 cores: sync batch
# norm's step 1.8 % shorter, the wait for the peer 0.32 -> 0.13 ms a step, the same CPU time;
# gradient buckets, whose time goes to copying, gained nothing from a spin (docs/benchmarks.md).
SPIN_S = 200e-6
# As long as torch's default process-group timeout: a rank that stops answering fails its peers.
# The kernel keeps it (SO_RCVTIMEO, SO_SNDTIMEO) and the sockets are blocking for Python: a
# Python-level timeout would poll before every send and receive, one more system call each, and
# each system call between two convolutions costs several times what it costs back to back.
RECEIVE_TIMEOUT_S = timedelta(minutes=30).total_seconds()

_RANK_HEADER = struct.Struct("!i")
# Every message starts with its number in the connection and its payload's size: ranks that got
# out of step (different layers or gradients on different ranks) fail with both named, instead
# of summing unrelated numbers or waiting for bytes that never come. 16 bytes keep the payload
# after it aligned for float64.
_MESSAGE_HEADER = struct.Struct("!QQ")
_TOKEN_BYTES = 16
_meshes: weakref.WeakKeyDictionary[Any, _Mesh] = weakref.WeakKeyDictionary()


def exchange() -> str:
    """Where CPU tensors are summed: ``tcp`` (the default) or ``process_group``, from
    :data:`EXCHANGE_ENV`; ValueError for anything else."""
    return environment_choice(EXCHANGE_ENV, EXCHANGES)


def all_reduce_sum(tensor: Tensor, group: Any = None) -> None:
    """Replace the CPU ``tensor`` by its sum over the ranks of ``group`` (default: world)."""
    if group is None:
        group = dist.group.WORLD
    if exchange() == "process_group" or tensor.device.type != "cpu":
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return
    if tensor.numel() == 0:
        return
    mesh = _meshes.get(group)
    if mesh is None:
        mesh = _meshes[group] = _Mesh(group)
    try:
        mesh.all_reduce_sum(tensor)
    except RuntimeError:
        # Its streams may stop part-way through a message: never read from them again.
        del _meshes[group]
        mesh.close()
        raise


def ddp_comm_hook(group, bucket):  # type: ignore[no-untyped-def]
    """A ``DistributedDataParallel`` communication hook that averages each bucket of gradients
    (a ``dist.GradBucket``) over ``group`` (None: world) with :func:`all_reduce_sum`, in the
    thread that runs backward, and returns a completed ``torch.futures.Future`` of them:
    ``ddp.register_comm_hook(None, ddp_comm_hook)``. The connections carry messages in the
    order they are made: every rank must run the same autograd graph (no
    ``find_unused_parameters`` with parameters unused on some ranks only), so that DDP hands
    over the same buckets, between the same sync batch norm exchanges, on every rank; where the
    sizes differ, every rank gets a RuntimeError that says they are out of step.

    Unannotated on purpose: DDP compares a hook's annotations with ``dist.GradBucket`` and
    ``Future[Tensor]`` themselves, and this module's annotations are strings."""
    gradients = bucket.buffer()
    all_reduce_sum(gradients, group)
    gradients.div_(dist.get_world_size(group))
    done: torch.futures.Future[Tensor] = torch.futures.Future()
    done.set_result(gradients)
    return done


def _advertised_host() -> str:
    """The address peers reach this rank at: the interface that routes to rank 0's address when
    the process group was set up from MASTER_ADDR (Ray Train, torchrun), else the host name."""
    master = os.environ.get("MASTER_ADDR")
    if master:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((master, int(os.environ.get("MASTER_PORT", "1"))))
                return probe.getsockname()[0]
            except OSError:
                pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class _Mesh:
    """One TCP connection to every other rank of a process group.

    Each rank listens on its advertised address only; a connecting rank sends the listener's
    random token (handed out through the process group, like the address) and its own rank.
    Anything else that connects meanwhile (a port scanner, a stale peer) is dropped, so it can
    neither take a rank's place nor feed numbers into the statistics."""

    def __init__(self, group: Any) -> None:
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        host = _advertised_host()
        try:
            listener = socket.create_server((host, 0), backlog=self.size)
        except OSError:  # an address this machine cannot bind (NAT): listen everywhere
            listener = socket.create_server(("", 0), backlog=self.size)
        with listener:
            token = secrets.token_bytes(_TOKEN_BYTES)
            addresses: list[Any] = [None] * self.size
            dist.all_gather_object(addresses, (host, listener.getsockname()[1], token), group=group)
            # Lower ranks listen, higher ranks connect: every pair gets exactly one connection.
            self.peers = {peer: self._connect(peer, *addresses[peer]) for peer in range(self.rank)}
            self.peers.update(self._accept(listener, token))
        self.receive_timeout_s = RECEIVE_TIMEOUT_S
        timeout = _timeval(self.receive_timeout_s)
        for conn in self.peers.values():
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setblocking(True)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
        self._finalizer = weakref.finalize(self, _close_all, list(self.peers.values()))
        self._messages = 0

    def close(self) -> None:
        self._finalizer()

    def _connect(self, peer: int, host: str, port: int, token: bytes) -> socket.socket:
        try:
            conn = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
            conn.sendall(token + _RANK_HEADER.pack(self.rank))
        except OSError as error:
            raise RuntimeError(
                f"exchange between ranks: rank {self.rank} cannot connect to rank {peer} at "
                f"{host}:{port} ({error}); open the ranks' ephemeral ports to each other "
                f"or set {EXCHANGE_ENV}=process_group"
            ) from error
        return conn

    def _accept(self, listener: socket.socket, token: bytes) -> dict[int, socket.socket]:
        expected = set(range(self.rank + 1, self.size))
        accepted: dict[int, socket.socket] = {}
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while expected - accepted.keys():
            listener.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                conn, _ = listener.accept()
            except TimeoutError as error:
                missing = ", ".join(str(r) for r in sorted(expected - accepted.keys()))
                raise RuntimeError(
                    f"exchange between ranks: rank {self.rank} waited {CONNECT_TIMEOUT_S:.0f} s "
                    f"for rank(s) {missing} to connect to {listener.getsockname()}; set "
                    f"{EXCHANGE_ENV}=process_group if they cannot reach it"
                ) from error
            conn.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                hello = self._receive(conn, _TOKEN_BYTES + _RANK_HEADER.size, "?")
            except RuntimeError:
                conn.close()
                continue
            (peer,) = _RANK_HEADER.unpack(hello[_TOKEN_BYTES:])
            if not secrets.compare_digest(bytes(hello[:_TOKEN_BYTES]), token) or (
                peer not in expected or peer in accepted
            ):
                conn.close()
                continue
            accepted[peer] = conn
        return accepted

    def all_reduce_sum(self, tensor: Tensor) -> None:
        flat = tensor.detach().contiguous().view(-1)
        nbytes = flat.numel() * flat.element_size()
        self._messages += 1
        header = _MESSAGE_HEADER.pack(self._messages, nbytes)
        if nbytes <= MAX_BLOCKING_BYTES:
            parts = self._send_then_receive(header, flat)
        else:
            parts = self._send_while_receiving(header, flat)
        total = parts[0].clone()
        for rank in range(1, self.size):
            total += parts[rank]
        tensor.copy_(total.view_as(tensor))

    def _send_then_receive(self, header: bytes, flat: Tensor) -> dict[int, Tensor]:
        """Every rank sends, then receives: the fewest system calls, for a message that fits in
        the peer's receive buffer whether or not the peer is reading yet."""
        message = header + flat.view(torch.uint8).numpy().tobytes()
        for peer, conn in self.peers.items():
            try:
                conn.sendall(message)
            except OSError as error:
                raise self._lost(peer, error) from error
        parts = {self.rank: flat}
        for peer, conn in self.peers.items():
            received = self._receive(conn, len(message), peer, header, spin_s=SPIN_S)
            parts[peer] = torch.frombuffer(received, dtype=flat.dtype, offset=len(header))
        return parts

    def _send_while_receiving(self, header: bytes, flat: Tensor) -> dict[int, Tensor]:
        """Sends to and receives from every peer at once, as each connection is ready: two ranks
        that both sent a message larger than the socket buffers before reading would wait on
        each other for ever."""
        payload = memoryview(flat.view(torch.uint8).numpy())
        head = len(header)
        size = head + len(payload)
        parts = {peer: torch.empty_like(flat) for peer in self.peers}
        inboxes = {peer: memoryview(parts[peer].view(torch.uint8).numpy()) for peer in self.peers}
        their_headers = {peer: bytearray(head) for peer in self.peers}
        sent = dict.fromkeys(self.peers, 0)
        received = dict.fromkeys(self.peers, 0)
        both = selectors.EVENT_READ | selectors.EVENT_WRITE
        peer: int | str = "?"
        with selectors.DefaultSelector() as selector:
            try:
                for peer, conn in self.peers.items():
                    conn.setblocking(False)
                    selector.register(conn, both, peer)
                while selector.get_map():
                    peer = "?"
                    ready = selector.select(timeout=self.receive_timeout_s)
                    if not ready:
                        raise self._silent(
                            ", ".join(str(key.data) for key in selector.get_map().values())
                        )
                    for key, events in ready:
                        peer, conn = key.data, key.fileobj
                        done = sent[peer]
                        if events & selectors.EVENT_WRITE and done < size:
                            with contextlib.suppress(BlockingIOError):
                                if done < head:
                                    sent[peer] += conn.sendmsg([header[done:], payload])
                                else:
                                    sent[peer] += conn.send(payload[done - head :])
                        done = received[peer]
                        if events & selectors.EVENT_READ and done < size:
                            with contextlib.suppress(BlockingIOError):
                                if done < head:  # header and payload in one system call
                                    buffers = [
                                        memoryview(their_headers[peer])[done:],
                                        inboxes[peer],
                                    ]
                                    count = conn.recvmsg_into(buffers)[0]
                                else:
                                    count = conn.recv_into(inboxes[peer][done - head :])
                                if count == 0:
                                    raise ConnectionError("connection closed")
                                received[peer] += count
                                theirs = their_headers[peer]
                                if done < head <= received[peer] and theirs != header:
                                    self._tell_the_rest(header, sent)
                                    raise self._out_of_step(peer, theirs, header)
                        wanted = (selectors.EVENT_WRITE if sent[peer] < size else 0) | (
                            selectors.EVENT_READ if received[peer] < size else 0
                        )
                        if not wanted:
                            selector.unregister(conn)
                        elif wanted != key.events:
                            selector.modify(conn, wanted, peer)
            except OSError as error:
                if isinstance(peer, int) and received[peer] < head:
                    # A peer that failed on another rank's header may have hung up under a
                    # send, after sending its own header: say that, not "did it stop?".
                    self._check_header_left(peer, their_headers[peer], received[peer], header)
                raise self._lost(peer, error) from error
            finally:
                for conn in self.peers.values():
                    conn.setblocking(True)  # for the small path; the kernel keeps the timeout
        parts[self.rank] = flat
        return parts

    def _receive(
        self,
        conn: socket.socket,
        size: int,
        peer: int | str,
        header: bytes = b"",
        spin_s: float = 0.0,
    ) -> bytearray:
        """``size`` bytes from ``conn``; with ``header``, the message must start with the same
        header (checked as soon as it is in, before waiting for more). With ``spin_s``, reads
        without waiting (``MSG_DONTWAIT``) for that long first, then as the connection reads."""
        buffer = bytearray(size)
        view = memoryview(buffer)
        received = 0
        flags = socket.MSG_DONTWAIT if spin_s > 0 else 0
        if flags:
            spin_until = time.perf_counter() + spin_s
        try:
            while received < size:
                try:
                    count = conn.recv_into(view[received:], 0, flags)
                except BlockingIOError:
                    if not flags:  # a blocking read ran out of SO_RCVTIMEO
                        raise self._silent(peer) from None
                    if time.perf_counter() >= spin_until:  # nothing yet: wait from here on
                        flags = 0
                    continue
                if count == 0:
                    raise ConnectionError("connection closed")
                if received < len(header) <= received + count and buffer[: len(header)] != header:
                    raise self._out_of_step(peer, buffer[: len(header)], header)
                received += count
        except OSError as error:
            raise self._lost(peer, error) from error
        return buffer

    def _tell_the_rest(self, header: bytes, sent: dict[int, int]) -> None:
        """Before failing: send the header to every peer that has not had it yet (their buffers
        are empty, so it fits), so that they fail on this rank's size too, not on a connection
        that closed under them."""
        for peer, conn in self.peers.items():
            if sent[peer] < len(header):
                with contextlib.suppress(OSError):
                    conn.send(header[sent[peer] :])

    def _check_header_left(self, peer: int, theirs: bytearray, received: int, ours: bytes) -> None:
        """Raise the out-of-step error if what is left to read of ``peer``'s header differs from
        ``ours``; return if it cannot be read without waiting."""
        conn = self.peers[peer]
        try:
            conn.setblocking(False)  # the caller makes it blocking again
            while received < len(ours):
                count = conn.recv_into(memoryview(theirs)[received:])
                if count == 0:
                    return
                received += count
        except OSError:
            return
        if theirs != ours:
            raise self._out_of_step(peer, theirs, ours)

    def _out_of_step(self, peer: int | str, theirs: bytes | bytearray, ours: bytes) -> RuntimeError:
        their_number, their_size = _MESSAGE_HEADER.unpack(theirs)
        number, size = _MESSAGE_HEADER.unpack(ours)
        return RuntimeError(
            f"exchange between ranks: the ranks are out of step: rank {peer}'s message "
            f"#{their_number} holds {their_size} bytes where rank {self.rank}'s #{number} holds "
            f"{size}. Every rank must run the same synchronized batch norm layers and the same "
            "backward passes in the same order (with DistributedDataParallel: the same "
            "parameters used on every rank)"
        )

    def _silent(self, peers: int | str) -> RuntimeError:
        return RuntimeError(
            f"exchange between ranks: rank {self.rank} waited {self.receive_timeout_s:.0f} s for "
            f"rank(s) {peers}; did they stop?"
        )

    def _lost(self, peer: int | str, error: OSError) -> RuntimeError:
        return RuntimeError(
            f"exchange between ranks: rank {self.rank} lost its connection to rank {peer} "
            f"({error}); did that worker stop?"
        )


def _timeval(seconds: float) -> bytes:
    """``seconds`` as the ``struct timeval`` that SO_RCVTIMEO and SO_SNDTIMEO take."""
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


def _close_all(connections: list[socket.socket]) -> None:
    for conn in connections:
        conn.close()
