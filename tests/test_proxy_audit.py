"""A mutation audit of heel/proxy.py (the trio proxy), and the tests it
asked for.

The audit weakened one line of heel/proxy.py at a time (a condition
flipped, a check dropped, a bound or timeout changed, an event field or a
close skipped, secrets compared wrongly: MUTANTS mutants in all) and ran the
existing proxy tests (test_proxy_review, test_proxy_robustness,
test_proxy_http, test_network) against each.  SURVIVORS

The proxy here runs on a listener on the host's loopback, as it does where
there are no namespaces, and the clients are the test's own sockets: another
local process as far as the proxy can tell.  The servers (tests/netservers)
count what reached them; each refusal is next to a control that gets
through the same proxy.
"""

from __future__ import annotations

import base64
import socket
from contextlib import asynccontextmanager

import pytest
import trio

import heel
import heel.proxy
from heel.policy import AllowAll, AllowList, CustomPolicy
from heel.proxy import Proxy
from netservers import RawServer, resolver_for

#: The sandbox's secret in these tests: the password of its proxy URLs.
SECRET = "4be0c1d2e3f40516a7b8c9d0"
#: Generous bounds: the machine may be loaded.
TIMEOUT = 30


@asynccontextmanager
async def serving(policy, *, names=None, resolver=None, require_secret=True, commands=None,
                  handshake_timeout=heel.proxy.HANDSHAKE_TIMEOUT):
    """A Proxy on a loopback listener of its own, serving until the block
    ends; ``proxy.port`` is where, ``proxy.calls`` what on_event was given."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    calls = []
    with listener:
        proxy = Proxy(policy, listener, secret=SECRET, require_secret=require_secret,
                      resolver=resolver or resolver_for(names or {}), on_event=calls.append,
                      handshake_timeout=handshake_timeout)
        proxy.commands.update(commands or {})
        proxy.port = listener.getsockname()[1]
        proxy.calls = calls
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            try:
                yield proxy
            finally:
                nursery.cancel_scope.cancel()


async def settled(proxy) -> list:
    """The proxy's events once it serves no connection any more."""
    with trio.fail_after(TIMEOUT):
        while proxy.open_connections or proxy.overload_answers:
            await trio.sleep(0.01)
    return proxy.events


def auth(user: str = "cmd1", password: str | None = SECRET) -> bytes:
    """A Proxy-Authorization line (none when ``password`` is None)."""
    if password is None:
        return b""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return f"Proxy-Authorization: Basic {token}\r\n".encode()


async def connect(port: int) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    return sock


async def read_all(sock, data: bytes = b"") -> bytes:
    """Everything until the end (or a reset)."""
    with trio.fail_after(TIMEOUT):
        while True:
            try:
                chunk = await sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


async def exchange(port: int, data: bytes, *, half_close: bool = True) -> bytes:
    """Send ``data`` to the proxy, (half-)close, and read its whole answer."""
    sock = await connect(port)
    with sock:
        await sock.send(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return await read_all(sock)


def socks_greeting(user: str | None, password: str | None) -> bytes:
    """A SOCKS5 greeting: user name and password, or (None) no authentication."""
    if password is None:
        return b"\x05\x01\x00"
    u, p = user.encode(), password.encode()
    return b"\x05\x01\x02" + b"\x01" + bytes([len(u)]) + u + bytes([len(p)]) + p


def socks_request(name: str, port: int) -> bytes:
    return b"\x05\x01\x00\x03" + bytes([len(name)]) + name.encode() + port.to_bytes(2, "big")


def status(answer: bytes) -> str:
    return answer.split(b"\r\n", 1)[0].decode(errors="replace")


# ---- the credential -------------------------------------------------------------

#: Passwords that are not the secret: none at all, empty, the secret's
#: start, one that shares its first bytes and length, one of its length.
WRONG = {"none": None, "empty": "", "prefix": SECRET[:8], "same_start": SECRET[:4] + "x" * (len(SECRET) - 4),
         "same_length": "y" * len(SECRET), "longer": SECRET + "z"}


@pytest.mark.parametrize("password", WRONG.values(), ids=WRONG.keys())
async def test_only_the_secret_opens_the_proxy_by_any_protocol(echo, web, password):
    """Where others can reach the listener, each protocol asks for the
    sandbox's secret: HTTP CONNECT and plain HTTP answer 407 with the
    Proxy-Authenticate header that makes clients send it, SOCKS5 refuses
    the method or the password and closes (a CONNECT sent after the
    refusal is not served); nothing reaches the servers and nothing is an
    event (another process's probing is not the sandbox's traffic).  The
    secret itself, sent the same ways, is the control."""
    names = {"echo.test": ["127.0.0.1"], "web.test": ["127.0.0.1"]}
    async with serving(AllowList(["echo.test", "web.test"]), names=names) as proxy:
        tunnel = f"CONNECT echo.test:{echo.port} HTTP/1.1\r\n".encode()
        plain = f"GET http://web.test:{web.port}/audit HTTP/1.1\r\nHost: web.test\r\n".encode()
        connect_answer = await exchange(proxy.port, tunnel + auth(password=password) + b"\r\nping")
        http_answer = await exchange(proxy.port, plain + auth(password=password) + b"\r\n", half_close=False)
        socks_answer = await exchange(proxy.port, socks_greeting("cmd1", password)
                                      + socks_request("echo.test", echo.port) + b"ping")
        refused_events = await settled(proxy)
        # The control: the secret.
        good_connect = await exchange(proxy.port, tunnel + auth() + b"\r\nping")
        good_http = await exchange(proxy.port, plain + auth() + b"\r\n", half_close=False)
        good_socks = await exchange(proxy.port, socks_greeting("cmd1", SECRET) + socks_request("echo.test", echo.port)
                                    + b"ping")
        events = await settled(proxy)
    for answer in (connect_answer, http_answer):
        assert status(answer) == "HTTP/1.1 407 Proxy Authentication Required", answer
        assert b'\r\nProxy-Authenticate: Basic realm="heel"\r\n' in answer, answer
    assert socks_answer == (b"\x05\xff" if password is None else b"\x05\x02\x01\x01"), socks_answer
    assert refused_events == [] and proxy.calls[:1] == [e for e in events if e.allowed][:1], refused_events
    assert good_connect.endswith(b"\r\n\r\nping") and status(good_connect).startswith("HTTP/1.1 200"), good_connect
    assert status(good_http) == "HTTP/1.1 200 OK" and b"heel-test-web GET /audit" in good_http, good_http
    assert good_socks.startswith(b"\x05\x02\x01\x00\x05\x00") and good_socks.endswith(b"ping"), good_socks
    assert echo.connections == 2 and [r[1] for r in web.requests] == ["/audit"], (echo.connections, web.requests)
    assert [(e.protocol, e.allowed) for e in events] == [("connect", True), ("http", True), ("socks", True)], events


async def test_the_user_name_says_which_command_asked_only_when_heel_gave_it(echo, web):
    """The user name of the proxy URL maps to the command heel gave it; a
    name heel never gave (the secret is right: the sandbox wrote the URL
    itself) names no command, rather than whatever the sandbox claims.  The
    policy sees that command, and so does each event, by every protocol,
    allowed or denied."""
    seen = []

    async def decide(request):
        seen.append((request.protocol, request.command))
        return request.host != "denied.test"

    names = {"echo.test": ["127.0.0.1"], "web.test": ["127.0.0.1"], "denied.test": ["127.0.0.1"]}
    policy = CustomPolicy(decide, allow_restricted=True)
    async with serving(policy, names=names, commands={"cmd1": "curl"}) as proxy:
        for user in ("cmd1", "sshd"):
            for host in ("echo.test", "denied.test"):
                await exchange(proxy.port, f"CONNECT {host}:{echo.port} HTTP/1.1\r\n".encode() + auth(user)
                               + b"\r\nping")
                await exchange(proxy.port, f"GET http://{host.replace('echo', 'web')}:{web.port}/ HTTP/1.1\r\n"
                               f"Host: x\r\n".encode() + auth(user) + b"\r\n", half_close=False)
                await exchange(proxy.port, socks_greeting(user, SECRET) + socks_request(host, echo.port) + b"ping")
        events = await settled(proxy)
    expected = [(protocol, command) for command in ("curl", None) for _ in range(2)
                for protocol in ("connect", "http", "socks")]
    assert seen == expected, seen
    assert sorted((e.protocol, e.allowed, e.command or "") for e in events) == sorted(
        (protocol, host_allowed, command or "") for command in ("curl", None) for host_allowed in (True, False)
        for protocol in ("connect", "http", "socks")), events
    assert echo.connections == 4 and len(web.requests) == 2


async def test_only_the_sandboxs_requests_are_events(echo):
    """A request naming no valid host is a denied event when it is the
    sandbox's (its credential is right), with its protocol; the same from
    a client without the secret, with a wrong one or with a malformed
    Proxy-Authorization is refused as well and no event, or another local
    process could fill the sandbox's record (and the user's terminal) with
    lies.  A request the policy denies is the control."""
    async with serving(AllowList(["echo.test"]), names={"echo.test": ["127.0.0.1"]}) as proxy:
        answers: list[bytes] = []
        for line in (b"CONNECT evil!test:443 HTTP/1.1\r\n", b"GET http://evil!test:8080/ HTTP/1.1\r\n"):
            for credential in (b"", auth(password="wrong"), b"Proxy-Authorization: Basic !!!\r\n"):
                answers.append(await exchange(proxy.port, line + credential + b"\r\n", half_close=False))
        assert await settled(proxy) == [], proxy.events
        # Malformed credentials on an otherwise good request: no event either.
        for credential in (b"Proxy-Authorization: Basic !!!\r\n", b"Proxy-Authorization: Basic a\r\n"
                                                                    b"Proxy-Authorization: Basic b\r\n"):
            answers.append(await exchange(proxy.port, f"CONNECT echo.test:{echo.port} HTTP/1.1\r\n".encode()
                                          + credential + b"\r\n"))
        assert await settled(proxy) == [], proxy.events
        # The sandbox's own: events.
        for line in (b"CONNECT evil!test:443 HTTP/1.1\r\n", b"GET http://evil!test:8080/ HTTP/1.1\r\n"):
            answers.append(await exchange(proxy.port, line + auth() + b"\r\n", half_close=False))
        answers.append(await exchange(proxy.port, socks_greeting("cmd1", SECRET) + socks_request("evil!test", 444)))
        answers.append(await exchange(proxy.port, b"CONNECT other.test:443 HTTP/1.1\r\n" + auth() + b"\r\n"))
        events = await settled(proxy)
    assert [status(a) for a in answers] == ["HTTP/1.1 400 Bad Request"] * 10 + [
        "\x05\x02\x01\x00\x05\x08\x00\x01\x00\x00\x00\x00\x00\x00", "HTTP/1.1 403 Forbidden"], answers
    assert [(e.protocol, e.port, e.allowed) for e in events] == [
        ("connect", 443, False), ("http", 8080, False), ("socks", 444, False), ("connect", 443, False)], events
    assert all("invalid host" in e.reason for e in events[:3]) and events[3].host == "other.test", events
    assert echo.connections == 0
