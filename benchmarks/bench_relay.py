"""The proxy's tunnel relay: loopback throughput, direct against through the relay.

    python benchmarks/bench_relay.py [--mib 1024] [--streams 1 32] [--runs 3]

A sender process writes MiB in total over N TCP streams to a receiver
process (one thread per stream, 1 MiB sendall/recv_into buffers, so Python
is not what limits).  Direct: the sender connects to the receiver.  Relay:
it connects to this process, which accepts and hands each connection, with
a fresh one to the receiver, to heel's relay.  The clock runs from the
sender's start (every stream connected, every tunnel added) to the
receiver's last byte.  Direct and relayed transfers alternate; the
table shows medians of --runs each, and the median of the pairs' ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys

import trio

from heel._relay import _get_pool, relay

PEER = r"""
import socket, sys, threading, time
mode, streams, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
share = total // streams
chunk = 1 << 20

def receive(conn, counts, i):
    buf = bytearray(chunk)
    view = memoryview(buf)
    n = 0
    while got := conn.recv_into(view):
        n += got
    counts[i] = n
    conn.close()

def send(conn):
    data = bytes(chunk)
    left = share
    while left:
        left -= conn.send(memoryview(data)[:min(chunk, left)])
    conn.close()

if mode == "recv":
    listener = socket.create_server(("127.0.0.1", 0), backlog=streams)
    print(listener.getsockname()[1], flush=True)
    conns = [listener.accept()[0] for _ in range(streams)]
    counts = [0] * streams
    threads = [threading.Thread(target=receive, args=(c, counts, i)) for i, c in enumerate(conns)]
    for t in threads: t.start()
    for t in threads: t.join()
    print(time.perf_counter(), sum(counts), flush=True)
else:
    port = int(sys.argv[4])
    conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(streams)]
    print("connected", flush=True)
    sys.stdin.readline()
    threads = [threading.Thread(target=send, args=(c,)) for c in conns]
    start = time.perf_counter()
    for t in threads: t.start()
    for t in threads: t.join()
    print(start, flush=True)
"""


def peer(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PEER, *map(str, args)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


async def transfer(streams: int, total: int, through_relay: bool) -> float:
    """One transfer; returns GiB/s."""
    receiver = peer("recv", streams, total)
    receiver_port = int(receiver.stdout.readline())
    if not through_relay:
        sender = peer("send", streams, total, receiver_port)
        sender.stdout.readline()
        return finish(sender, receiver, total)
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(streams)
    sender = peer("send", streams, total, listener.getsockname()[1])
    async with trio.open_nursery() as nursery:
        for _ in range(streams):
            client, _ = await listener.accept()
            upstream = trio.socket.socket()
            await upstream.connect(("127.0.0.1", receiver_port))
            nursery.start_soon(relay, client, upstream)
        listener.close()
        await trio.to_thread.run_sync(sender.stdout.readline)
        # Let the relays register before the clock starts.
        await trio.sleep(0.05)
        rate = await trio.to_thread.run_sync(finish, sender, receiver, total)
    return rate


def finish(sender: subprocess.Popen, receiver: subprocess.Popen, total: int) -> float:
    sender.stdin.write("go\n")
    sender.stdin.flush()
    start = float(sender.stdout.readline())
    end, received = receiver.stdout.readline().split()
    sender.wait()
    receiver.wait()
    if int(received) != total:
        raise SystemExit(f"received {received} bytes of {total}")
    return total / (float(end) - start) / (1 << 30)


async def main(mib: int, streams_list: list[int], runs: int) -> None:
    total = mib << 20
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, Linux {platform.release()}, "
          f"Python {platform.python_version()}")
    threads = len(_get_pool())
    print(f"{mib} MiB in total per transfer, median of {runs}; sender, receiver and "
          f"{threads} relay thread{'s' * (threads > 1)} "
          f"share {os.cpu_count()} cores")
    print(f"{'streams':>8} {'direct GiB/s':>13} {'relay GiB/s':>12} {'relay/direct':>13}")
    for streams in streams_list:
        # Interleaved pairs: this machine's speed drifts between runs.
        direct, relayed = [], []
        for _ in range(runs):
            direct.append(await transfer(streams, total, False))
            relayed.append(await transfer(streams, total, True))
        ratio = statistics.median(r / d for r, d in zip(relayed, direct))
        print(f"{streams:8} {statistics.median(direct):13.2f} {statistics.median(relayed):12.2f}"
              f" {ratio:12.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    trio.run(main, args.mib, args.streams, args.runs)
