"""The tunnel relay (csrc/relay.c through heel/_relay.py), on real loopback sockets.

A tunnel here is: peer_a <-> a ==relay== b <-> peer_b, where a and b are the
two sockets handed to relay() and peer_a, peer_b are what the test holds.
"""

from __future__ import annotations

import errno
import os
import random
import resource
import socket

import pytest
import trio

from heel import _native
from heel import _relay
from heel._relay import RelayResult, _get_pool, relay

#: A bound on every test's trio part.
TIMEOUT = 20


async def socket_pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """Two connected TCP sockets on 127.0.0.1."""
    listener = trio.socket.socket()
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        near = trio.socket.socket()
        await near.connect(listener.getsockname())
        far, _ = await listener.accept()
    return near, far


async def tunnel(nursery: trio.Nursery, results: dict | None = None, key=None):
    """Start relaying; returns (peer_a, peer_b).  The result lands in results[key]."""
    peer_a, a = await socket_pair()
    peer_b, b = await socket_pair()

    async def run() -> None:
        result = await relay(a, b)
        if results is not None:
            results[key] = result

    nursery.start_soon(run)
    return peer_a, peer_b


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view):]


async def recv_until_eof(sock: trio.socket.SocketType) -> bytes:
    chunks = []
    while chunk := await sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


async def recv_exactly(sock: trio.socket.SocketType, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await sock.recv(size - len(data))
        assert chunk, "EOF too early"
        data += chunk
    return bytes(data)


async def recv_end(sock: trio.socket.SocketType) -> bytes | str:
    """Whatever is left, then how the connection ended: b'' on EOF, 'reset' on a reset."""
    try:
        return await recv_until_eof(sock)
    except ConnectionResetError:
        return "reset"


def blocking_pair() -> tuple[socket.socket, socket.socket]:
    """socket_pair() without trio: two connected TCP sockets on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    return near, far


async def ping_tunnel() -> RelayResult:
    """One tunnel that carries b"ping" one way, then ends."""
    results = {}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            peer_a, peer_b = await tunnel(nursery, results, "t")
            await send_all(peer_a, b"ping")
            peer_a.shutdown(socket.SHUT_WR)
            assert await recv_until_eof(peer_b) == b"ping"
            peer_b.shutdown(socket.SHUT_WR)
            assert await recv_until_eof(peer_a) == b""
    return results["t"]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True, params=[1, 3], ids=["1-thread", "3-threads"])
def relay_threads(request):
    """Every test here runs with one relay thread (the default below eight
    CPUs) and with a pool of three, among which tunnels are spread.  Each
    ends with every tunnel of the pool accounted for."""
    _relay._restart_pool(request.param)
    yield request.param
    assert all(slot.tunnels == 0 for slot in _get_pool())
    _relay._restart_pool(_relay._default_threads())


async def test_bytes_arrive_intact_both_ways():
    up = random.randbytes(5 << 20)
    down = random.randbytes(3 << 20)
    results = {}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            peer_a, peer_b = await tunnel(nursery, results, "t")
            received = {}

            async def one_way(src, dst, data, key):
                async def send():
                    await send_all(src, data)
                    src.shutdown(socket.SHUT_WR)
                async with trio.open_nursery() as inner:
                    inner.start_soon(send)
                    received[key] = await recv_until_eof(dst)

            nursery.start_soon(one_way, peer_a, peer_b, up, "up")
            nursery.start_soon(one_way, peer_b, peer_a, down, "down")
    assert received["up"] == up
    assert received["down"] == down
    assert results["t"] == RelayResult(len(up), len(down), 0)


async def test_half_close_keeps_the_other_direction_open():
    results = {}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            peer_a, peer_b = await tunnel(nursery, results, "t")
            await send_all(peer_a, b"request")
            peer_a.shutdown(socket.SHUT_WR)
            assert await recv_until_eof(peer_b) == b"request"   # b saw a's EOF
            # ... while b -> a still flows, in several pieces.
            for piece in (b"one ", b"two ", b"three"):
                await send_all(peer_b, piece)
                assert await recv_exactly(peer_a, len(piece)) == piece
            assert "t" not in results
            peer_b.shutdown(socket.SHUT_WR)
            assert await recv_until_eof(peer_a) == b""
    assert results["t"] == RelayResult(len(b"request"), len(b"one two three"), 0)


async def test_reset_on_one_side_ends_the_tunnel_and_resets_the_other():
    results = {}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            peer_a, peer_b = await tunnel(nursery, results, "t")
            await send_all(peer_a, b"x" * 1000)
            assert await recv_exactly(peer_b, 1000) == b"x" * 1000
            peer_a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            peer_a.close()
            assert await recv_end(peer_b) == "reset"
    result = results["t"]
    assert result.error == errno.ECONNRESET
    assert result.a_to_b == 1000


async def test_cancelling_relay_closes_both_connections_promptly():
    peer_a, a = await socket_pair()
    peer_b, b = await socket_pair()
    with trio.fail_after(TIMEOUT):
        with trio.move_on_after(0.2) as scope:
            await relay(a, b)
        assert scope.cancelled_caught
        # relay() returned only after the relay thread closed both sockets.
        with trio.fail_after(2):
            assert await recv_end(peer_a) in (b"", "reset")
            assert await recv_end(peer_b) in (b"", "reset")
    assert a.fileno() == -1 and b.fileno() == -1


async def test_two_hundred_tunnels_echo_at_once(monkeypatch):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        if hard != resource.RLIM_INFINITY and hard < 4096:
            pytest.skip("needs 4096 open files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    try:
        results = {}
        with trio.fail_after(TIMEOUT * 2):
            async with trio.open_nursery() as nursery:
                async def echo(sock):
                    while data := await sock.recv(65536):
                        await send_all(sock, data)
                    sock.shutdown(socket.SHUT_WR)

                async def client(i, sock):
                    message = random.randbytes(20000 + i)
                    async with trio.open_nursery() as inner:
                        async def send():
                            await send_all(sock, message)
                            sock.shutdown(socket.SHUT_WR)
                        inner.start_soon(send)
                        assert await recv_until_eof(sock) == message

                for i in range(200):
                    peer_a, peer_b = await tunnel(nursery, results, i)
                    nursery.start_soon(echo, peer_b)
                    nursery.start_soon(client, i, peer_a)
        assert all(results[i] == RelayResult(20000 + i, 20000 + i) for i in range(200))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_stalled_tunnel_does_not_hold_up_others():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            stalled_a, stalled_b = await tunnel(nursery)   # stalled_b never reads

            async def flood():
                await send_all(stalled_a, bytes(64 << 20))   # blocks once every buffer is full

            nursery.start_soon(flood)
            await trio.sleep(0.3)
            peer_a, peer_b = await tunnel(nursery)
            data = random.randbytes(4 << 20)
            async with trio.open_nursery() as inner:
                inner.start_soon(send_all, peer_a, data)
                assert await recv_exactly(peer_b, len(data)) == data
            nursery.cancel_scope.cancel()


async def test_no_fd_is_left_open():
    _get_pool()   # the process-wide relays' own fds stay; started first
    before = open_fds()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            peers = []
            for _ in range(10):
                peers += await tunnel(nursery)
            for sock in peers:
                await send_all(sock, b"data")
                sock.shutdown(socket.SHUT_WR)
            for sock in peers:
                assert await recv_until_eof(sock) == b"data"
        for sock in peers:
            sock.close()
        # And cancelled ones.
        async with trio.open_nursery() as nursery:
            peers = []
            for _ in range(10):
                peers += await tunnel(nursery)
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        for sock in peers:
            sock.close()
    assert open_fds() == before


async def test_a_socket_the_relay_cannot_take_is_closed_and_raises():
    peer_a, a = await socket_pair()
    udp = trio.socket.socket(type=socket.SOCK_DGRAM)
    with pytest.raises(OSError) as info:
        await relay(a, udp)
    assert info.value.errno == errno.EPROTOTYPE
    assert a.fileno() == -1 and udp.fileno() == -1
    with trio.fail_after(2):
        assert await recv_end(peer_a) == b""


def test_trio_run_twice_in_one_process():
    assert trio.run(ping_tunnel) == RelayResult(4, 0)
    assert trio.run(ping_tunnel) == RelayResult(4, 0)


def test_stopping_a_relay_closes_its_tunnels():
    peer_a, a = blocking_pair()
    peer_b, b = blocking_pair()
    before = open_fds()
    own = _native.Relay()
    own.add(a.detach(), b.detach(), 1)
    peer_a.sendall(b"hi")
    peer_b.settimeout(5)
    assert peer_b.recv(10) == b"hi"
    own.stop()
    peer_a.settimeout(5)
    for peer in (peer_a, peer_b):
        try:
            assert peer.recv(10) == b""
        except ConnectionResetError:
            pass
        peer.close()
    assert open_fds() == before - 4


def test_a_refused_add_closes_its_two_fds_once():
    """An add the relay refuses (datagram sockets) closes the two fds it was
    given, once: closed twice, the second close took whatever fd another
    thread had opened under the same number meanwhile (a sanitizer review
    counted some 160 a second).  Two threads open and check fds while adds
    fail; none of theirs is closed under them."""
    import threading
    import time

    relay_ = _native.Relay()
    stop = threading.Event()
    stolen = [0]

    def opener() -> None:
        while not stop.is_set():
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            time.sleep(0)
            try:
                os.fstat(fd)
                os.close(fd)
            except OSError:
                stolen[0] += 1

    threads = [threading.Thread(target=opener) for _ in range(2)]
    for thread in threads:
        thread.start()
    refused = 0
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            except OSError:  # its fds closed by an add before it returned
                stolen[0] += 1
                continue
            try:
                relay_.add(a.detach(), b.detach(), 1)
            except OSError:
                refused += 1
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        relay_.stop()
    assert refused > 100
    assert stolen[0] == 0, stolen[0]


def relay_threads_cpu() -> dict[int, int]:
    """The CPU time so far, in ns, of each of this process's relay threads."""
    times = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() != "heel-relay":
                    continue
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                times[int(tid)] = int(f.read().split()[0])
        except FileNotFoundError:   # a thread that just ended
            continue
    return times


def settled_relay_threads(count: int) -> dict[int, int]:
    """relay_threads_cpu() once it lists ``count`` threads (or after 2 s):
    a stopped relay's thread has been joined, but the kernel lists it under
    /proc/self/task for a moment longer."""
    import time
    deadline = time.monotonic() + 2
    while len(times := relay_threads_cpu()) != count and time.monotonic() < deadline:
        time.sleep(0.01)
    return times


async def test_tunnels_are_spread_over_the_pool(relay_threads):
    """As many tunnels as threads, running at once: each thread moves bytes
    (its CPU time grows, seen in /proc).  With one tunnel fewer, one thread
    stays idle: the control that an idle relay thread's time does not grow."""
    _get_pool()
    await trio.sleep(0.05)   # the threads have started and wait in epoll
    assert len(settled_relay_threads(relay_threads)) == relay_threads
    for count, busy in ((relay_threads - 1, relay_threads - 1), (relay_threads, relay_threads)):
        if count == 0:
            continue
        before = relay_threads_cpu()
        data = bytes(16 << 20)
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                peers = [await tunnel(nursery) for _ in range(count)]
                await trio.sleep(0.05)   # every relay() has taken its thread

                async def carry(peer_a, peer_b):
                    async with trio.open_nursery() as inner:
                        inner.start_soon(send_all, peer_a, data)
                        assert await recv_exactly(peer_b, len(data)) == data
                    peer_a.close()
                    peer_b.close()

                for peer_a, peer_b in peers:
                    nursery.start_soon(carry, peer_a, peer_b)
        after = relay_threads_cpu()
        grew = [tid for tid in after if after[tid] > before.get(tid, 0)]
        assert len(grew) == busy, (count, before, after)


def test_restarting_the_pool_leaves_no_thread_or_fd_behind():
    """The pool's threads are named, counted and stopped: a restart with
    another size leaves exactly that many threads and the fds of the old
    pool closed."""
    _relay._restart_pool(1)
    _get_pool()
    fds_with_one = open_fds()
    _relay._restart_pool(4)
    _get_pool()
    assert len(settled_relay_threads(4)) == 4
    assert open_fds() == fds_with_one + 3 * 4   # each: epoll, eventfd, the completion pipe's two ends
    _relay._restart_pool(1)
    _get_pool()
    assert len(settled_relay_threads(1)) == 1
    assert open_fds() == fds_with_one


def test_a_pool_that_cannot_start_every_thread_runs_with_those_that_did():
    """Out of fds after the first relay thread: the pool is that one thread,
    and tunnels still run; with no fd for even the first, relay() raises
    EMFILE and takes over neither socket."""
    _relay._restart_pool(3)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        # Room for the first relay's four fds and not for the second's.
        resource.setrlimit(resource.RLIMIT_NOFILE, (_lowest_free_fds(4, soft), hard))
        assert len(_get_pool()) == 1
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(settled_relay_threads(1)) == 1

    assert trio.run(ping_tunnel) == RelayResult(4, 0)

    _relay._restart_pool(3)

    async def without_fds() -> None:
        a, b = socket.socketpair()
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (_lowest_free_fds(0, soft), hard))
            with pytest.raises(OSError) as info:
                await relay(a, b)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert info.value.errno == errno.EMFILE
        assert a.fileno() != -1 and b.fileno() != -1   # not taken over
        a.close()
        b.close()

    trio.run(without_fds)
    assert len(settled_relay_threads(0)) == 0


def _lowest_free_fds(room: int, soft: int) -> int:
    """An RLIMIT_NOFILE that leaves exactly ``room`` free fds below it,
    counting the holes below the highest open one."""
    open_now = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    limit = 0
    free = 0
    while free < room or limit in open_now:
        if limit not in open_now:
            free += 1
        limit += 1
    return limit


@pytest.mark.parametrize("relay_threads", [3], indirect=True, ids=["3-threads"])
async def test_a_tunnel_ends_while_another_relays_tunnel_lives_on():
    """The long tunnel's task reads relay 0's pipe; the short tunnel is on
    relay 1.  Its relay() returns when it ends, not when the long one does
    (it did not when one trio run had one reader for all relays)."""
    results = {}
    long_a, la = blocking_pair()
    long_b, lb = blocking_pair()
    short_a, sa = blocking_pair()
    short_b, sb = blocking_pair()
    async with trio.open_nursery() as nursery:
        async def run(key, a, b):
            results[key] = await relay(a, b)

        nursery.start_soon(run, "long", la, lb)
        await trio.sleep(0.05)
        nursery.start_soon(run, "short", sa, sb)
        await trio.sleep(0.05)
        assert sorted(slot.tunnels for slot in _get_pool()) == [0, 1, 1]
        short_a.close()
        short_b.close()
        with trio.move_on_after(2):
            while "short" not in results:
                await trio.sleep(0.01)
        short_done = "short" in results
        long_a.close()
        long_b.close()
    assert short_done, "the short tunnel's completion waited for the long one"
    assert results["short"] == RelayResult(0, 0, 0)


def test_two_trio_runs_in_two_threads_share_the_relays():
    """Two trio runs in two threads at once, each with two tunnels at a
    time, so that they share a relay thread: each run's relay() returns
    when its tunnel ends, whichever run read the record (each run's reader
    dropped the other's records, and its relay() waited forever)."""
    import threading

    rounds = 30
    hung: list[str] = []
    barrier = threading.Barrier(2)

    def worker(name: str) -> None:
        async def main() -> None:
            for _ in range(rounds):
                barrier.wait(timeout=10)   # both runs have their tunnels at once
                pairs = [(blocking_pair(), blocking_pair()) for _ in range(2)]
                with trio.move_on_after(5) as scope:
                    async with trio.open_nursery() as nursery:
                        for (_, a), (_, b) in pairs:
                            nursery.start_soon(relay, a, b)
                        await trio.sleep(0.01)
                        for (peer_a, _), (peer_b, _) in pairs:
                            peer_a.close()
                            peer_b.close()
                if scope.cancelled_caught:
                    hung.append(name)
                    barrier.abort()
                    return

        try:
            trio.run(main)
        except threading.BrokenBarrierError:
            pass

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("x", "y")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert not hung


def test_a_forked_child_gets_a_pool_of_its_own():
    """After os.fork() the child has the parent's pool in memory but not its
    threads; a tunnel there still runs (without the at-fork reset it waits
    forever on a relay thread that does not exist)."""
    assert trio.run(ping_tunnel) == RelayResult(4, 0)   # the parent's pool is up
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            status = 0 if trio.run(ping_tunnel) == RelayResult(4, 0) else 2
        except BaseException:
            status = 3
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


async def test_a_cancelled_relay_has_closed_both_connections_when_it_returns():
    """The docstring's promise, checked with no await in between
    (test_cancelling_relay_closes_both_connections_promptly allows 2 s)."""
    for _ in range(5):
        peer_a, a = blocking_pair()
        peer_b, b = blocking_pair()
        with trio.move_on_after(0.05):
            await relay(a, b)
        for peer in (peer_a, peer_b):
            try:
                assert peer.recv(1, socket.MSG_DONTWAIT) == b""
            except ConnectionResetError:
                pass
            peer.close()


def test_a_pool_start_interrupted_leaves_no_thread_running(monkeypatch):
    """Interrupted between two relay threads (a KeyboardInterrupt, here made
    to happen at the third), the pool stops the ones it started: no thread
    is left running outside a pool, and the next use starts a whole one."""
    _relay._restart_pool(4)
    started = []
    real_relay = _native.Relay

    def interrupted_third() -> _native.Relay:
        if len(started) == 2:
            raise KeyboardInterrupt
        started.append(real_relay())
        return started[-1]

    monkeypatch.setattr(_native, "Relay", interrupted_third)
    with pytest.raises(KeyboardInterrupt):
        _get_pool()
    assert len(settled_relay_threads(0)) == 0
    monkeypatch.setattr(_native, "Relay", real_relay)
    assert len(_get_pool()) == 4
    assert len(settled_relay_threads(4)) == 4
