"""Probes that kill the survivors of a mutation audit of the tunnel relay
(csrc/relay.c, heel/_relay.py; r37).  As in test_relay.py, a tunnel is
peer_a <-> a ==relay== b <-> peer_b on real loopback sockets, and each test
looks only from outside: what the peers receive, how their connections end,
and the RelayResult."""

from __future__ import annotations

import errno
import random
import socket

import pytest
import trio

from heel._relay import RelayResult, relay
from test_relay import TIMEOUT, recv_end, recv_until_eof, send_all, socket_pair
from test_relay import relay_threads  # noqa: F401  (autouse: 1 and 3 relay threads, slots accounted for)

#: What the slow side's kernel may hold of a tunnel's bytes with the small
#: buffers below (b's send buffer, peer_b's receive buffer, what is in
#: flight): far below the relay's own 1 MiB pipe.
SMALL_BUFFERS_HOLD = 256 << 10

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)   # Linux's; Python does not name it


async def narrow_pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """(peer_b, b) as socket_pair() gives them, with a 4 KiB receive buffer
    on peer_b (set before connecting: it bounds the window) and a 4 KiB
    send buffer on b, so that the bytes b has taken are few and known."""
    listener = trio.socket.socket()
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        near = trio.socket.socket()
        near.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await near.connect(listener.getsockname())
        far, _ = await listener.accept()
    far.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return near, far


async def fill(sock: trio.socket.SocketType, limit: int) -> int:
    """Send zeros until the socket would block for 0.5 s (every buffer on
    the way is full) or ``limit`` bytes went; returns how many went."""
    sent = 0
    chunk = bytes(64 << 10)
    while sent < limit:
        with trio.move_on_after(0.5) as scope:
            sent += await sock.send(chunk)
        if scope.cancelled_caught:
            break
    return sent


def reset(sock: trio.socket.SocketType) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


async def stalled_tunnel_reset(nursery: trio.Nursery, results: dict):
    """A tunnel whose peer_b reads nothing, filled from peer_a until the
    relay's a -> b pipe and every buffer are full, then peer_a resets.
    Returns (peer_b, bytes peer_a sent)."""
    peer_a, a = await socket_pair()
    peer_b, b = await narrow_pair()

    async def run() -> None:
        results["t"] = await relay(a, b)

    nursery.start_soon(run)
    sent = await fill(peer_a, 64 << 20)
    # The pipe (1 MiB) held more than the small buffers behind it can.
    assert sent > 2 * SMALL_BUFFERS_HOLD, sent
    reset(peer_a)
    return peer_b, sent


async def test_a_reset_ends_a_tunnel_whose_pipe_is_full_and_resets_the_other_side():
    """peer_a resets while its flow's pipe is full and b takes nothing: the
    relay watches a for neither input nor output then, and only EPOLLERR
    (with SO_ERROR) tells it of the reset.  Without that check the tunnel
    lived on, a's reset never reached peer_b, and relay() never returned.
    The control: the same stalled tunnel without the reset stays open."""
    results: dict = {}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            peer_a, a = await socket_pair()
            peer_b, b = await narrow_pair()

            async def run() -> None:
                results["control"] = await relay(a, b)

            nursery.start_soon(run)
            await fill(peer_a, 64 << 20)
            await trio.sleep(0.5)
            assert "control" not in results, "a stalled tunnel ended by itself"
            peer_a.close()
            peer_b.close()
        async with trio.open_nursery() as nursery:
            peer_b, _ = await stalled_tunnel_reset(nursery, results)
            with trio.fail_after(3):
                while "t" not in results:
                    await trio.sleep(0.01)
            assert results["t"].error == errno.ECONNRESET
            # peer_b gets a reset, not an end of file: its stream was cut.
            with trio.fail_after(3):
                assert await recv_end(peer_b) == "reset"


async def test_byte_counts_are_what_reached_the_destination_when_a_reset_strands_the_pipe():
    """A RelayResult counts the bytes that reached each destination (what
    the relay spliced out of its pipe), not what it read from the source:
    when a reset ends a tunnel whose pipe still holds a megabyte, that
    megabyte never reached peer_b and is not counted.  The small buffers
    on peer_b's side bound what did reach it; the bytes peer_a sent (more
    than twice that bound) are what a count of splice-in would give."""
    results: dict = {}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            _, sent = await stalled_tunnel_reset(nursery, results)
    result = results["t"]
    assert result.error == errno.ECONNRESET
    assert 0 < result.a_to_b <= SMALL_BUFFERS_HOLD, (result, sent)
    assert result.b_to_a == 0


async def test_a_clean_end_reaches_a_slow_reader_whole_with_an_end_of_file():
    """When both directions end with EOF, the relay closes its sockets
    without a reset (SO_LINGER 0 is for aborted tunnels only): a reset
    would throw away what b's send buffer still holds for a slow reader and
    end its stream with ECONNRESET.  peer_b starts reading after the relay
    has read everything from peer_a, and reads slowly; it must get every
    byte and then an end of file.  The RelayResult counts them all."""
    data = bytes(range(256)) * (12 << 12)   # 12 MiB
    results: dict = {}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            peer_a, a = await socket_pair()
            peer_b, b = await socket_pair()

            async def run() -> None:
                results["t"] = await relay(a, b)

            nursery.start_soon(run)
            peer_b.shutdown(socket.SHUT_WR)   # b -> a ends at once

            async def send() -> None:
                await send_all(peer_a, data)
                peer_a.shutdown(socket.SHUT_WR)

            nursery.start_soon(send)
            assert await recv_until_eof(peer_a) == b""
            await trio.sleep(0.5)
            got = bytearray()
            while True:
                try:
                    chunk = await peer_b.recv(32 << 10)
                except ConnectionResetError:
                    raise AssertionError(f"reset after {len(got)} of {len(data)} bytes") from None
                if not chunk:
                    break
                got += chunk
                await trio.sleep(0.002)
    assert bytes(got) == data
    assert results["t"] == RelayResult(len(data), 0, 0)


async def test_a_cancelled_tunnel_resets_both_connections():
    """relay() cancelled while bytes flow resets both connections (its
    docstring's promise): a peer must not take a cut-off stream for a
    complete one, which an end of file would tell it.  test_relay.py's
    cancel tests accept either.  The control is an uncancelled tunnel,
    whose peers get an end of file."""
    with trio.fail_after(TIMEOUT):
        for cancel in (False, True):
            peer_a, a = await socket_pair()
            peer_b, b = await socket_pair()
            async with trio.open_nursery() as nursery:
                async def run() -> None:
                    with trio.CancelScope() as scope:
                        run.scope = scope
                        await relay(a, b)

                nursery.start_soon(run)
                await send_all(peer_a, b"x" * 100_000)
                await send_all(peer_b, b"y" * 100_000)
                await trio.sleep(0.1)
                if cancel:
                    run.scope.cancel()
                else:
                    peer_a.shutdown(socket.SHUT_WR)
                    peer_b.shutdown(socket.SHUT_WR)
            ends = []
            for peer in (peer_a, peer_b):
                with trio.fail_after(3):
                    end = await recv_end(peer)
                ends.append(end if end == "reset" else "eof")
                peer.close()
            assert ends == (["reset", "reset"] if cancel else ["eof", "eof"]), (cancel, ends)


async def test_a_reset_met_while_splicing_ends_the_tunnel_as_an_error():
    """peer_b resets while a busy a -> b flow splices into b: the relay's
    splice() into b fails (ECONNRESET, or EPIPE), often before the
    EPOLLERR that would tell of it is read, and that error must end the
    tunnel as an error (both connections reset, the errno reported), never
    as a clean end.  Five tunnels, so that some meet the reset in splice();
    the control is test_relay.py's clean ends (error 0)."""
    for _ in range(5):
        results: dict = {}
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                peer_a, a = await socket_pair()
                peer_b, b = await socket_pair()

                async def run() -> None:
                    results["t"] = await relay(a, b)

                async def flood() -> None:
                    try:
                        while True:
                            await peer_a.send(bytes(1 << 20))
                    except OSError:   # the reset came back to peer_a
                        pass

                nursery.start_soon(run)
                nursery.start_soon(flood)
                got = 0
                while got < (8 << 20):
                    got += len(await peer_b.recv(1 << 20))
                reset(peer_b)
                with trio.fail_after(3):
                    while "t" not in results:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            peer_a.close()
        assert results["t"].error in (errno.ECONNRESET, errno.EPIPE), results["t"]


def _big_receive_buffer(sock, size: int) -> None:
    """A receive buffer of ``size`` bytes, set before connecting (it sets
    the window scale): SO_RCVBUFFORCE where allowed (root), else as much
    as SO_RCVBUF gives."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def _wide_buffers_possible(size: int) -> bool:
    probe = socket.socket()
    try:
        probe.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        return True
    except PermissionError:
        try:
            with open("/proc/sys/net/core/rmem_max") as f:
                return int(f.read()) >= size
        except (OSError, ValueError):
            return False
    finally:
        probe.close()


async def wide_pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """socket_pair() with 64 MiB receive buffers on both ends."""
    listener = trio.socket.socket()
    with listener:
        _big_receive_buffer(listener, 32 << 20)   # inherited by the accepted socket
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        near = trio.socket.socket()
        _big_receive_buffer(near, 32 << 20)
        await near.connect(listener.getsockname())
        far, _ = await listener.accept()
    return near, far


async def test_a_source_that_already_holds_more_than_a_turn_is_relayed_whole():
    """A flow moves at most RELAY_TURN_BYTES (4 MiB) in one turn, then lets
    other tunnels run and comes back without an event (the ready list):
    edge-triggered epoll reports nothing more of bytes that had all arrived
    before.  Here a's receive buffer holds 24 MiB and peer_a's end of file
    before the relay takes a, and b never fills (peer_b's buffer is wide),
    so a turn ends with neither side at EAGAIN and no further event can
    come: a flow that waited for one stalled after the first turn.  The
    control: the same tunnel is read whole when its bytes come while it
    runs (test_relay.py's).  It needs receive buffers past 24 MiB: root's
    SO_RCVBUFFORCE, or a net.core.rmem_max that large (else a's buffer
    fills and the send waits for ever)."""
    if not _wide_buffers_possible(32 << 20):
        pytest.skip("receive buffers of 32 MiB need SO_RCVBUFFORCE (root) or net.core.rmem_max that large")
    data = random.randbytes(24 << 20)
    results: dict = {}
    with trio.fail_after(TIMEOUT):
        peer_a, a = await wide_pair()
        peer_b, b = await wide_pair()
        await send_all(peer_a, data)   # all of it lands in a's receive buffer
        peer_a.shutdown(socket.SHUT_WR)
        async with trio.open_nursery() as nursery:
            async def run() -> None:
                results["t"] = await relay(a, b)

            nursery.start_soon(run)
            with trio.move_on_after(10):
                got = await recv_until_eof(peer_b)
            assert len(got) == len(data), f"the tunnel stalled after {len(got)} of {len(data)} bytes"
            assert got == data
            peer_b.shutdown(socket.SHUT_WR)
            assert await recv_until_eof(peer_a) == b""
    assert results["t"] == RelayResult(len(data), 0, 0)


async def test_a_second_argument_that_is_no_socket_still_closes_the_first():
    """relay() takes both sockets over also when it raises: when the second
    cannot be taken (here it is no socket at all), the fd already taken from
    the first is closed, so peer_a sees its end at once instead of a
    connection nobody holds.  The control: a plain refused add (a
    datagram socket) does the same in C (test_relay.py)."""
    peer_a, a = await socket_pair()
    try:
        await relay(a, object())
    except Exception:   # trio's notify_closing() says RuntimeError for what has no fileno()
        pass
    else:
        raise AssertionError("relay() took an object() for a socket")
    assert a.fileno() == -1
    with trio.fail_after(2):
        assert await recv_end(peer_a) == b""
    peer_a.close()
