"""The proxy against hostile clients: garbage, truncated and oversized
requests, and clients that never finish.  The proxy runs on a host loopback
listener here (no sandbox needed to send it bytes); after every attack it
must have closed the connection, left no task behind and still serve a
well-formed request."""

from __future__ import annotations

import socket
from contextlib import asynccontextmanager

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import heel
from heel.proxy import Proxy
from netservers import EchoServer

VALID = b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


class RunningProxy:
    def __init__(self, proxy: Proxy, port: int) -> None:
        self.proxy = proxy
        self.port = port

    async def exchange(self, data: bytes, *, close_write: bool = True) -> bytes:
        """Send data, (half-)close, and read everything the proxy answers."""
        sock = trio.socket.socket()
        with sock:
            await sock.connect(("127.0.0.1", self.port))
            try:
                await sock.send(data)
                if close_write:
                    sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the proxy may close on us mid-way: that is an answer too
            answer = b""
            with trio.fail_after(10):
                while True:
                    try:
                        chunk = await sock.recv(65536)
                    except ConnectionResetError:
                        break
                    if not chunk:
                        break
                    answer += chunk
            return answer

    async def settled(self) -> None:
        """Every connection the proxy served is finished."""
        with trio.fail_after(10):
            while self.proxy.open_connections:
                await trio.sleep(0.01)

    async def still_serves(self, echo_port: int) -> None:
        sock = trio.socket.socket()
        with sock:
            await sock.connect(("127.0.0.1", self.port))
            await sock.send(VALID % echo_port)
            with trio.fail_after(10):
                head = b""
                while b"\r\n\r\n" not in head:
                    head += await sock.recv(1)
                assert head.startswith(b"HTTP/1.1 200"), head
                await sock.send(b"still here")
                assert await sock.recv(100) == b"still here"


@asynccontextmanager
async def proxy_running():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    with listener:
        proxy = Proxy(heel.AllowList(["127.0.0.1"]), listener, secret="s3cret", require_secret=False,
                      handshake_timeout=1.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            yield RunningProxy(proxy, listener.getsockname()[1])
            nursery.cancel_scope.cancel()


@pytest.fixture
async def running():
    async with proxy_running() as running:
        yield running


# Hypothesis drives plain functions: each example runs its own trio.run with
# a fresh proxy, so one example can never disturb the next.

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600))
def test_garbage_never_crashes_the_proxy(echo, data):
    async def attack() -> None:
        async with proxy_running() as running:
            answer = await running.exchange(data)
            assert answer == b"" or answer.startswith((b"HTTP/1.1 4", b"HTTP/1.1 5", b"\x05")), answer[:80]
            await running.settled()
            assert not [e for e in running.proxy.events if "internal error" in e.reason]
            await running.still_serves(echo.port)

    trio.run(attack)


_framing = st.lists(st.sampled_from(["Content-Length: 5", "Content-Length: 5, 5", "Content-Length: 05",
                                     "Content-Length:5 ,5", "Content-Length: 5, 6", "Content-Length: x",
                                     "Content-Length: ", "Transfer-Encoding: chunked", "Connection: content-length",
                                     "Content-Length: 99999999999999999999"]), max_size=3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(headers=_framing)
def test_body_framing_never_breaks_the_proxy(echo, headers):
    """Every way of framing a request body gets an answer, never an internal
    error: `Content-Length: 5, 5` killed the connection (found by review)."""
    data = (f"POST http://127.0.0.1:{echo.port}/ HTTP/1.1\r\n" + "".join(h + "\r\n" for h in headers)
            + "\r\n").encode() + b"hello"

    async def attack() -> None:
        async with proxy_running() as running:
            await running.exchange(data)
            await running.settled()
            assert not [e for e in running.proxy.events if "internal error" in e.reason], running.proxy.events

    trio.run(attack)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=200), socks=st.booleans())
def test_truncated_requests_end_cleanly(echo, cut, socks):
    host = b"127.0.0.1"
    full = (b"\x05\x01\x00" + b"\x05\x01\x00\x03" + bytes([len(host)]) + host + echo.port.to_bytes(2, "big")
            if socks else b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: %s\r\n\r\n"
            % (echo.port, b"p" * 100))
    data = full[:min(cut, len(full) - 1)]
    before = echo.connections

    async def attack() -> None:
        async with proxy_running() as running:
            await running.exchange(data)
            await running.settled()
            assert not running.proxy.events

    trio.run(attack)
    assert echo.connections == before  # a request never finished reaches nobody


async def test_oversized_head_gets_431(running, echo):
    answer = await running.exchange(b"GET http://127.0.0.1/ HTTP/1.1\r\nX: " + b"a" * 40000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431"), answer[:80]
    await running.settled()
    await running.still_serves(echo.port)


@pytest.mark.parametrize("opening", [None, b"\x05\x01", b"\x05\x01\x00\x05\x01\x00\x03"],
                         ids=["http_trickle", "socks_greeting_unfinished", "socks_request_unfinished"])
async def test_a_client_that_never_finishes_is_dropped(running, echo, opening):
    # The handshake deadline (1 s here) ends it, whatever trickles in.  Over
    # SOCKS5 too: a greeting, or a CONNECT request, begun and never finished
    # (the proxy's method answer may come first) is closed by the deadline,
    # never held open.  Control: the proxy still serves afterwards.
    sock = trio.socket.socket()
    with sock:
        await sock.connect(("127.0.0.1", running.port))
        with trio.fail_after(10):
            try:
                if opening is None:
                    while True:
                        await sock.send(b"X")
                        await trio.sleep(0.1)
                await sock.send(opening)
                while await sock.recv(100):
                    pass  # until the proxy closes it
            except OSError:
                pass
    await running.settled()
    await running.still_serves(echo.port)


async def test_many_bad_clients_at_once_leave_nothing_behind(running, echo):
    async with trio.open_nursery() as nursery:
        for i in range(100):
            nursery.start_soon(running.exchange, b"\x05\xff" if i % 2 else b"CONNECT nonsense\r\n\r\n")
    await running.settled()
    assert not running.proxy.events
    await running.still_serves(echo.port)
    await running.settled()
    (event,) = running.proxy.events
    assert event.allowed and event.bytes_sent == event.bytes_received == len("still here")


@pytest.mark.parametrize("how", ["reset", "close"])
async def test_a_server_that_gives_no_response_gets_the_client_a_502(running, how):
    """Plain HTTP to a server that resets (or closes) before it answers: the
    client got nothing at all after a reset, and the event did not say
    (found by review).  Now a 502 either way, and the event's reason says."""
    server = trio.socket.socket()
    await server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    async def serve_once() -> None:
        conn, _ = await server.accept()
        with conn:
            await conn.recv(65536)
            if how == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    with server:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_once)
            answer = await running.exchange(b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % port, close_write=False)
    await running.settled()
    assert answer.startswith(b"HTTP/1.1 502"), answer[:80]
    (event,) = running.proxy.events
    assert event.allowed and "the client got 502" in event.reason, event
