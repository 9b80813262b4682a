"""What a Unix socket would save gan.nn.stats_exchange over loopback TCP, for ranks on one host.

    python bench/socket_latency.py                  # a 1,048-byte message (128 channels)
    python bench/socket_latency.py --bytes 16400 --calls 1000

Two processes exchange one message ``--calls`` times, the way the exchange's small path does:
each sends, then reads the other's. Plain sockets, no torch: the figures are the floor of one
exchange's cost on this machine. Each kind runs twice, in turns, with and without a timeout on
the socket (the exchange sets one; Python then polls before every send and receive). Prints the
median and 90th percentile wall time per exchange and rank 0's CPU time per exchange.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

from harness import loadavg, machine


def _connected_pair(kind: str) -> tuple[socket.socket, int]:
    """This process's end of a new connection and the pid of the forked process that holds the
    other end; in the forked process, its end and 0."""
    if kind == "tcp":
        listener, family = socket.create_server(("127.0.0.1", 0)), socket.AF_INET
        address = listener.getsockname()
    else:  # Linux's abstract namespace: no file to clean up
        listener, family = socket.socket(socket.AF_UNIX), socket.AF_UNIX
        address = f"\0ganpipe-socket-latency-{os.getpid()}"
        listener.bind(address)
        listener.listen(1)
    pid = os.fork()
    if pid == 0:
        listener.close()
        conn = socket.socket(family, socket.SOCK_STREAM)
        conn.connect(address)
        return conn, 0
    conn, _ = listener.accept()
    listener.close()
    return conn, pid


def _exchange(conn: socket.socket, message: bytes, inbox: memoryview) -> None:
    conn.sendall(message)
    received = 0
    while received < len(inbox):
        received += conn.recv_into(inbox[received:])


def measure(kind: str, timeout: bool, size: int, calls: int) -> str:
    conn, pid = _connected_pair(kind)
    if kind == "tcp":
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if timeout:
        conn.settimeout(1800)
    message, inbox = bytes(size), memoryview(bytearray(size))
    times = []
    cpu = time.process_time()
    for _ in range(calls):
        started = time.perf_counter()
        _exchange(conn, message, inbox)
        times.append(time.perf_counter() - started)
    cpu = time.process_time() - cpu
    conn.close()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    times.sort()
    label = kind + (" + timeout" if timeout else "")
    return (
        f"{label:15s} median {statistics.median(times) * 1e6:6.1f} µs"
        f"  p90 {times[int(0.9 * calls)] * 1e6:6.1f} µs  CPU {cpu / calls * 1e6:5.1f} µs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=16 + 8 * 129, help="message size")
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"load average at start: {loadavg()}")
    print(f"{args.calls} exchanges of {args.bytes} bytes, rank 0's figures per exchange")
    for _ in range(2):
        for kind in ("tcp", "unix"):
            for timeout in (False, True):
                print(measure(kind, timeout, args.bytes, args.calls), flush=True)
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
