"""A mutation audit of heel/proxy.py (the trio proxy), and the tests it
asked for.

The audit weakened one line of heel/proxy.py at a time (a condition
flipped, a check dropped, a bound or timeout changed, an event field or a
close skipped, secrets compared wrongly): 155 mutants.  The existing proxy
tests (test_proxy_review, test_proxy_robustness, test_proxy_http,
test_network) caught 77.  Of the 78 that survived them, the tests here kill
56, among them: a secret compared by its start or its length, a SOCKS
password refused yet the handshake going on, a proxy user name taken as the
command it claims, another process's malformed requests recorded as the
sandbox's events, only the first resolved address checked against the
internal ones, bytes past a request's or a response's length passed on,
early tunnel bytes dropped, byte counts swapped, sockets left to the
garbage collector, the default timeouts and bounds loosened, a local route
looked up without the connection's port.

Nine survivors are equivalent: the 407's Proxy-Authenticate header (the
protocol module adds it to every 407 itself); a SOCKS failure that breaks
instead of returning, and a SOCKS refusal recorded when "undecided" (the
code after it returns as well; no refusal there is undecided); a response
read "forever" once its length is known (recv(0) returns at once); a
cancelled upstream connect's close (trio closes it); a NUL check in the
dot-segment test (a NUL only comes from decoding %00, which is refused the
round before); the rtnetlink sequence check (a fresh socket per question);
duplicate resolved addresses, and a resolved address not canonicalised
(getaddrinfo answers canonically; the checks unmap ::ffff: themselves).
Thirteen are real and left: not closing gracefully after an answer (three:
on loopback the answer is read before the reset arrives, so nothing is lost
here), the accept loop's EMFILE handling (the test process would have to run
out of fds), the host resolver's thread limit and abandon-on-cancel (the
tests inject their resolver; a stalling DNS server would be needed), the
broadcast/anycast route types, and the fallback local check used where
rtnetlink cannot be asked (five).

The proxy here runs on a listener on the host's loopback, as it does where
there are no namespaces, and the clients are the test's own sockets: another
local process as far as the proxy can tell.  The servers (tests/netservers)
count what reached them; each refusal is next to a control that gets
through the same proxy.  (The local-route test runs a real sandbox in a
throwaway network namespace instead.)
"""

from __future__ import annotations

import base64
import socket
import struct
import time
from contextlib import asynccontextmanager

import pytest
import trio

import heel
import heel.proxy
from heel import _proxy_protocol as proto
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


async def recv_exactly(sock, count: int) -> bytes:
    """``count`` bytes, or fewer where the proxy closes first."""
    data = b""
    with trio.fail_after(TIMEOUT):
        while len(data) < count:
            chunk = await sock.recv(count - len(data))
            if not chunk:
                break
            data += chunk
    return data


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


async def socks_exchange(port: int, user: str, password: str | None, name: str, target: int,
                         payload: bytes = b"ping") -> bytes:
    """A SOCKS5 client that waits for the answer to its greeting before it
    sends its CONNECT (and then ``payload`` and a half-close) whatever that
    answer was: all the proxy answers, as one string of bytes.  (A payload
    the proxy does not read, after a refusal, may reset the connection and
    take the reply with it: send none where the request is refused.)"""
    sock = await connect(port)
    with sock:
        await sock.send(socks_greeting(user, password))
        answer = await recv_exactly(sock, 2 if password is None else 4)
        try:
            await sock.send(socks_request(name, target) + payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # closed on us: that is an answer too
        return await read_all(sock, answer)


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
        socks_answer = await socks_exchange(proxy.port, "cmd1", password, "echo.test", echo.port)
        refused_events = await settled(proxy)
        # The control: the secret.
        good_connect = await exchange(proxy.port, tunnel + auth() + b"\r\nping")
        good_http = await exchange(proxy.port, plain + auth() + b"\r\n", half_close=False)
        good_socks = await socks_exchange(proxy.port, "cmd1", SECRET, "echo.test", echo.port)
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


# ---- names, addresses and the way upstream ---------------------------------------


async def test_every_address_a_name_resolves_to_is_checked_not_only_the_first(echo):
    """The policy names 127.0.0.1 (so it may be reached) and allows
    *.test: a name that resolves to 127.0.0.1 and then 127.0.0.2 (as a DNS
    answer that also points inside could) is refused as a whole, though the
    first address alone would be served; the name resolving to 127.0.0.1
    alone is the control.  The same for an internal address in the
    IPv4-mapped spelling a resolver may give (::ffff:127.0.0.2)."""
    names = {"first.test": ["127.0.0.1", "127.0.0.2"], "mapped.test": ["127.0.0.1", "::ffff:127.0.0.2"],
             "alone.test": ["127.0.0.1"], "mapped-alone.test": ["::ffff:127.0.0.2"]}
    policy = AllowList(["*.test", f"127.0.0.1:{echo.port}"])
    async with serving(policy, names=names) as proxy:
        answers = {name: await exchange(proxy.port, f"CONNECT {name}:{echo.port} HTTP/1.1\r\n".encode() + auth()
                                        + b"\r\nping") for name in names}
        events = await settled(proxy)
    for name in ("first.test", "mapped.test", "mapped-alone.test"):
        assert status(answers[name]) == "HTTP/1.1 403 Forbidden", (name, answers[name])
        assert b"resolves to an internal address" in answers[name] and b"127.0.0" not in answers[name], answers
    assert answers["alone.test"].endswith(b"\r\n\r\nping"), answers
    assert echo.connections == 1
    assert [(e.host, e.allowed, e.failed) for e in events] == [
        ("first.test", False, False), ("mapped.test", False, False), ("alone.test", True, False),
        ("mapped-alone.test", False, False)], events
    assert "resolves to 127.0.0.2" in events[0].reason, events[0]


async def test_each_address_is_tried_in_turn_and_failures_are_failed_events(echo):
    """Upstream failures are the proxy's 502 and a *failed* event (the
    policy allowed it), not a denial: a name the resolver does not know,
    one with no address, one it answers with something that is no address,
    and an address where nothing listens.  A name whose first address
    refuses and whose second listens reaches the second; the proxy
    goes on serving."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]  # bound, never listening: refused
    names = {"none.test": [], "odd.test": ["not-an-address"], "closed.test": ["127.0.0.1"],
             "second.test": ["127.0.0.3", "127.0.0.1"]}
    with closed:
        async with serving(AllowAll() | AllowList(["127.0.0.0/8"]), names=names) as proxy:
            answers = {}
            for name, port in [("unknown.test", echo.port), ("none.test", echo.port), ("odd.test", echo.port),
                               ("closed.test", closed_port), ("second.test", echo.port)]:
                answers[name] = await exchange(proxy.port, f"CONNECT {name}:{port} HTTP/1.1\r\n".encode() + auth()
                                               + b"\r\nping")
            socks = await socks_exchange(proxy.port, "cmd1", SECRET, "closed.test", closed_port, b"")
            events = await settled(proxy)
    for name in ("unknown.test", "none.test", "odd.test", "closed.test"):
        assert status(answers[name]) == "HTTP/1.1 502 Bad Gateway", (name, answers[name])
    assert socks[:4] == b"\x05\x02\x01\x00" and socks[5] == 5, socks  # connection refused
    assert answers["second.test"].endswith(b"\r\n\r\nping"), answers["second.test"]
    assert [(e.host, e.allowed, e.failed) for e in events] == [
        ("unknown.test", False, True), ("none.test", False, True), ("odd.test", False, True),
        ("closed.test", False, True), ("second.test", True, False), ("closed.test", False, True)], events
    assert "has no address" in events[1].reason and "127.0.0.3" not in events[4].reason, events
    assert not [e for e in events if "internal error" in e.reason]
    assert all(e.describe().startswith("network failed: ") for e in events if e.failed), events


async def test_events_name_the_host_as_the_policy_saw_it():
    """A denied request's event names its host in canonical form (lower
    case, an IP literal in its one spelling), as the policy saw it, by
    each protocol: not as the sandbox spelled it."""
    async with serving(AllowList(["allowed.test"])) as proxy:
        await exchange(proxy.port, b"CONNECT Other.TEST:443 HTTP/1.1\r\n" + auth() + b"\r\n")
        await exchange(proxy.port, b"GET http://Other.TEST:8080/ HTTP/1.1\r\n" + auth() + b"\r\n", half_close=False)
        await socks_exchange(proxy.port, "cmd1", SECRET, "OTHER.Test", 444, b"")
        await exchange(proxy.port, b"CONNECT 0x7f.1:445 HTTP/1.1\r\n" + auth() + b"\r\n")
        events = await settled(proxy)
    assert [(e.host, e.port, e.protocol, e.allowed) for e in events] == [
        ("other.test", 443, "connect", False), ("other.test", 8080, "http", False),
        ("other.test", 444, "socks", False), ("127.0.0.1", 445, "connect", False)], events


def reply_after_eof(conn: socket.socket, server: RawServer) -> None:
    """Reads until the client's end of file, records it, then answers with
    three bytes: what the client sent and what it got differ."""
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    server.lines.append(data.decode(errors="replace"))
    conn.sendall(b"abc")
    conn.close()


async def test_a_tunnel_passes_what_was_sent_with_its_request_and_counts_both_ways():
    """Bytes a client sends in the same packet as its CONNECT request (or
    its SOCKS request) are the tunnel's first bytes: they reach the server,
    and the event counts them; bytes each way are counted apart."""
    server = RawServer(reply_after_eof)
    try:
        async with serving(AllowList(["raw.test"]), names={"raw.test": ["127.0.0.1"]}) as proxy:
            sock = await connect(proxy.port)
            with sock:
                await sock.send(f"CONNECT raw.test:{server.port} HTTP/1.1\r\n".encode() + auth() + b"\r\nearly")
                head = b""
                with trio.fail_after(TIMEOUT):
                    while b"\r\n\r\n" not in head:
                        head += await sock.recv(1)
                await sock.send(b"-later")
                sock.shutdown(socket.SHUT_WR)
                tunnel = await read_all(sock)
            socks = await socks_exchange(proxy.port, "cmd1", SECRET, "raw.test", server.port, b"socks-early")
            events = await settled(proxy)
    finally:
        server.close()
    assert status(head).startswith("HTTP/1.1 200") and tunnel == b"abc", (head, tunnel)
    assert socks.endswith(b"abc"), socks
    assert sorted(server.lines) == ["early-later", "socks-early"], server.lines
    assert [(e.protocol, e.allowed, e.bytes_sent, e.bytes_received) for e in events] == [
        ("connect", True, len("early-later"), 3), ("socks", True, len("socks-early"), 3)], events


# ---- plain HTTP: exactly one request up, exactly one response down ---------------


class OneExchange(RawServer):
    """Reads one request (its head, and its body by Content-Length), records
    it with whatever else the proxy sends before it closes, and answers
    with ``parts``: byte strings sent one by one, each after ``go`` (a
    threading.Event the test sets) when ``wait`` says so."""

    def __init__(self, parts: list[bytes], wait: bool = False, pause: float = 0.0) -> None:
        import threading

        self.parts, self.wait, self.pause, self.go = parts, wait, pause, threading.Event()
        self.seen: list[tuple[bytes, bytes, bytes]] = []
        super().__init__(self._answer)

    def _answer(self, conn: socket.socket, server: RawServer) -> None:
        conn.settimeout(TIMEOUT)
        head, rest = self.read_head(conn)
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(rest) < length:
            rest += conn.recv(65536)
        for n, part in enumerate(self.parts):
            if n and self.wait:
                self.go.wait(TIMEOUT)
            elif n:
                time.sleep(self.pause)
            conn.sendall(part)
        extra = rest[length:]
        try:
            while chunk := conn.recv(65536):
                extra += chunk
        except OSError:
            pass
        self.seen.append((head + b"\r\n\r\n", rest[:length], extra))
        conn.close()


async def served(server: OneExchange) -> tuple[bytes, bytes, bytes]:
    with trio.fail_after(TIMEOUT):
        while not server.seen:
            await trio.sleep(0.01)
    return server.seen[0]


RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_a_body_that_comes_later_goes_up_to_its_length_and_no_further():
    """A request whose body arrives after its head is passed on up to its
    Content-Length; a second request in the same packet as the body's end
    never reaches the server.  The event counts the head as sent and the
    body; and the response as it came."""
    server = OneExchange([RESPONSE])
    try:
        async with serving(AllowList(["raw.test"]), names={"raw.test": ["127.0.0.1"]}) as proxy:
            sock = await connect(proxy.port)
            with sock:
                await sock.send(f"POST http://raw.test:{server.port}/up HTTP/1.1\r\nHost: raw.test\r\n"
                                f"Content-Length: 10\r\n".encode() + auth() + b"\r\n")
                with trio.fail_after(TIMEOUT):
                    while not server.connections:  # the head went up alone
                        await trio.sleep(0.01)
                await sock.send(b"0123456789GET /smuggled HTTP/1.1\r\nHost: raw.test\r\n\r\n")
                answer = await read_all(sock)
            head, body, extra = await served(server)
            events = await settled(proxy)
    finally:
        server.close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok"), answer
    assert head.startswith(b"POST /up HTTP/1.1\r\n") and body == b"0123456789" and extra == b"", (head, body, extra)
    assert [(e.protocol, e.allowed, e.bytes_sent, e.bytes_received) for e in events] == [
        ("http", True, len(head) + 10, len(RESPONSE))], events


async def test_a_body_sent_with_its_head_goes_up_to_its_length_and_no_further():
    """The same with the body, and a second request, in the head's packet."""
    server = OneExchange([RESPONSE])
    try:
        async with serving(AllowList(["raw.test"]), names={"raw.test": ["127.0.0.1"]}) as proxy:
            answer = await exchange(proxy.port, f"POST http://raw.test:{server.port}/up HTTP/1.1\r\nHost: raw.test\r\n"
                                    f"Content-Length: 5\r\n".encode() + auth()
                                    + b"\r\nhelloGET /smuggled HTTP/1.1\r\nHost: raw.test\r\n\r\n", half_close=False)
            head, body, extra = await served(server)
            events = await settled(proxy)
    finally:
        server.close()
    assert answer.endswith(b"\r\n\r\nok") and body == b"hello" and extra == b"", (answer, body, extra)
    assert [(e.bytes_sent, e.bytes_received) for e in events] == [(len(head) + 5, len(RESPONSE))], events


async def test_the_response_ends_where_its_length_says():
    """What a server sends past the end of its response (a second response
    a client would take for the answer to its next request) never reaches
    the client, whether it comes with the body or after the proxy read the
    body's start; an interim 100 Continue is passed on before the final
    response.  The bytes read from the server are counted."""
    first = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234"
    rest = b"56789HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nINJECTED"
    together = OneExchange([first + rest])
    split = OneExchange([first, rest], wait=True)
    try:
        async with serving(AllowList(["raw.test"]), names={"raw.test": ["127.0.0.1"]}) as proxy:
            answers = []
            for server in (together, split):
                sock = await connect(proxy.port)
                with sock:
                    await sock.send(f"GET http://raw.test:{server.port}/ HTTP/1.1\r\nHost: raw.test\r\n".encode()
                                    + auth() + b"\r\n")
                    data = b""
                    with trio.fail_after(TIMEOUT):
                        while not data.endswith(b"01234") and not data.endswith(b"0123456789"):
                            chunk = await sock.recv(65536)
                            assert chunk, data
                            data += chunk
                    server.go.set()  # the proxy has passed the body's start on
                    answers.append(await read_all(sock, data))
                await served(server)
            events = await settled(proxy)
    finally:
        together.close()
        split.close()
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"), answer
        assert answer.endswith(b"\r\n\r\n0123456789") and b"INJECTED" not in answer, answer
    assert events[1].bytes_received == len(first) + 5, events


async def test_a_long_interim_head_in_pieces_does_not_hide_the_final_one():
    """An interim head that comes in two pieces, the first longer than the
    final head after it, then the final response: the client gets both.
    (Where the proxy reads the pieces at once, this is the simple case,
    and passes as well.)"""
    interim = b"HTTP/1.1 100 Continue\r\nX-Pad: " + b"p" * 2000
    server = OneExchange([interim, b"\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], pause=0.3)
    try:
        async with serving(AllowList(["raw.test"]), names={"raw.test": ["127.0.0.1"]}) as proxy:
            answer = await exchange(proxy.port, f"GET http://raw.test:{server.port}/ HTTP/1.1\r\n".encode() + auth()
                                    + b"\r\n", half_close=False)
            await settled(proxy)
    finally:
        server.close()
    assert answer.startswith(interim + b"\r\n\r\nHTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok"), answer


async def test_the_policy_sees_the_method_and_url_of_plain_http_only(web):
    """A CustomPolicy's NetworkRequest: a tunnel (CONNECT, SOCKS) has no
    method and no URL; a plain HTTP request has its method and the URL the
    server will serve, with the host in canonical form and the port when
    it is not 80 (an IPv6 host in brackets): a policy that matches URLs
    must not be steered by how the sandbox spells them."""
    seen = []

    async def decide(request):
        seen.append((request.protocol, request.method, request.url))
        return False

    async with serving(CustomPolicy(decide)) as proxy:
        await exchange(proxy.port, b"CONNECT Web.TEST:443 HTTP/1.1\r\n" + auth() + b"\r\n")
        await socks_exchange(proxy.port, "cmd1", SECRET, "web.test", 443, b"")
        for target in ("http://Web.TEST:8080/a?b=c", "http://web.test/x", "http://[::1]:81/v6", "http://0x7f.1/"):
            await exchange(proxy.port, f"PUT {target} HTTP/1.1\r\nContent-Length: 0\r\n".encode() + auth() + b"\r\n",
                           half_close=False)
        await settled(proxy)
    assert seen == [("connect", None, None), ("socks", None, None),
                    ("http", "PUT", "http://web.test:8080/a?b=c"), ("http", "PUT", "http://web.test/x"),
                    ("http", "PUT", "http://[::1]:81/v6"), ("http", "PUT", "http://127.0.0.1/")], seen


# ---- cleanup ---------------------------------------------------------------------


async def test_the_proxy_closes_every_socket_it_opens(echo, web):
    """Each socket the proxy opens or accepts is closed by the proxy itself
    once it is done with it (a tunnel, a plain HTTP request, a failed
    connect, a refusal, the proxy's own copy of the listener), never left
    to the garbage collector: Python warns (ResourceWarning) about every
    socket it has to close itself."""
    import gc
    import warnings

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    names = {"echo.test": ["127.0.0.1"], "web.test": ["127.0.0.1"], "closed.test": ["127.0.0.1"]}
    asked, reset_all = [], trio.Event()

    async def resolve(host, port):
        # gone.test: answered once the test has reset the client that asked.
        if host == "gone.test":
            asked.append(host)
            await reset_all.wait()
            return ["127.0.0.1"]
        return await resolver_for(names)(host, port)

    async def gone(request: bytes, socks: bool) -> None:
        sock = await connect(proxy.port)
        if socks:
            await sock.send(socks_greeting("cmd1", SECRET))
            assert await recv_exactly(sock, 4) == b"\x05\x02\x01\x00"
        await sock.send(request)
        with trio.fail_after(TIMEOUT):
            while len(asked) < (2 if socks else 1):
                await trio.sleep(0.01)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset: the proxy's answer will find the client gone

    with closed, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        async with serving(AllowList([*names, "gone.test"]), resolver=resolve) as proxy:
            await gone(f"CONNECT gone.test:{echo.port} HTTP/1.1\r\n".encode() + auth() + b"\r\n", False)
            await gone(socks_request("gone.test", echo.port), True)
            reset_all.set()
            await exchange(proxy.port, f"CONNECT echo.test:{echo.port} HTTP/1.1\r\n".encode() + auth() + b"\r\nx")
            await socks_exchange(proxy.port, "cmd1", SECRET, "echo.test", echo.port)
            await exchange(proxy.port, f"GET http://web.test:{web.port}/ HTTP/1.1\r\n".encode() + auth() + b"\r\n",
                           half_close=False)
            await exchange(proxy.port, f"CONNECT closed.test:{closed.getsockname()[1]} HTTP/1.1\r\n".encode()
                           + auth() + b"\r\n")
            await exchange(proxy.port, b"CONNECT other.test:1 HTTP/1.1\r\n" + auth() + b"\r\n")
            events = await settled(proxy)
        gc.collect()
    assert sorted((e.host, e.allowed) for e in events) == [
        ("closed.test", False), ("echo.test", True), ("echo.test", True), ("gone.test", True), ("gone.test", True),
        ("other.test", False), ("web.test", True)], events
    assert len([e for e in events if "gone before the tunnel opened" in e.reason]) == 2, events
    assert echo.connections == 4
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaked == [], leaked


# ---- limits and timeouts ----------------------------------------------------------


async def hold_the_slot(proxy, echo) -> trio.socket.SocketType:
    """A tunnel that takes the proxy's one connection (max_connections = 1)."""
    proxy.max_connections = 1
    tunnel = await connect(proxy.port)
    await tunnel.send(f"CONNECT echo.test:{echo.port} HTTP/1.1\r\n".encode() + auth() + b"\r\n")
    assert await recv_exactly(tunnel, len(proto.CONNECT_ESTABLISHED)) == proto.CONNECT_ESTABLISHED
    return tunnel


async def test_a_connection_over_the_budget_that_says_nothing_is_closed_soon(echo):
    """Over the budget, a client that sends no request is closed within
    OVERLOAD_TIMEOUT (a second), not after the handshake timeout of a
    connection being served (here a minute), and its answer slot is free
    again: at most MAX_OVERLOAD_ANSWERS such clients wait at once."""
    assert heel.proxy.OVERLOAD_TIMEOUT <= 5 < TIMEOUT
    async with serving(AllowList(["echo.test"]), names={"echo.test": ["127.0.0.1"]}, handshake_timeout=60) as proxy:
        tunnel = await hold_the_slot(proxy, echo)
        with tunnel:
            silent = await connect(proxy.port)
            with silent:
                assert await read_all(silent) == b""  # closed, unanswered, within TIMEOUT
            with trio.fail_after(TIMEOUT):
                while proxy.overload_answers:
                    await trio.sleep(0.01)
            assert proxy.open_connections == 1
        await settled(proxy)


async def test_at_most_so_many_connections_over_the_budget_wait_for_their_answer(echo, monkeypatch):
    """MAX_OVERLOAD_ANSWERS connections over the budget wait for their
    request, and each gets its 503; one more is closed at once, unanswered,
    and costs the proxy nothing.  Once all are answered the count is back
    to zero, and a request within the budget is served again."""
    monkeypatch.setattr(heel.proxy, "OVERLOAD_TIMEOUT", TIMEOUT)  # none gives up while the test counts
    limit = heel.proxy.MAX_OVERLOAD_ANSWERS
    assert limit <= 64
    async with serving(AllowList(["echo.test"]), names={"echo.test": ["127.0.0.1"]}) as proxy:
        tunnel = await hold_the_slot(proxy, echo)
        waiting = [await connect(proxy.port) for _ in range(limit)]
        with trio.fail_after(TIMEOUT):
            while proxy.overload_answers < limit:
                await trio.sleep(0.01)
        extra = await connect(proxy.port)
        with extra:
            assert await read_all(extra) == b""
        answers = []
        for sock in waiting:
            with sock:
                await sock.send(b"CONNECT echo.test:1 HTTP/1.1\r\n" + auth() + b"\r\n")
                answers.append(status(await read_all(sock)))
        with trio.fail_after(TIMEOUT):
            while proxy.overload_answers:
                await trio.sleep(0.01)
        tunnel.close()
        await settled(proxy)
        after = await exchange(proxy.port, f"CONNECT echo.test:{echo.port} HTTP/1.1\r\n".encode() + auth()
                               + b"\r\nafter")
        events = await settled(proxy)
    assert answers == ["HTTP/1.1 503 Service Unavailable"] * limit, answers
    assert after.endswith(b"\r\n\r\nafter"), after
    assert len([e for e in events if "too many connections (1)" in e.reason]) == limit, events


def full_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A listener that never accepts, its queue filled: a further connect
    to it gets no answer (Linux drops the SYN), as a silent server's would."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(listener.getsockname())
        except BlockingIOError:
            pass
        fillers.append(filler)
    return listener, fillers


async def test_the_default_timeouts_end_what_never_finishes(echo):
    """With the proxy's own timeouts (HANDSHAKE_TIMEOUT, CONNECT_TIMEOUT):
    a client that trickles its request forever is dropped, a name whose
    lookup never ends and a server that never answers the connect are each
    a 502 and a failed event, and the socket of that connect is closed; all
    at once, each well within the test's bound, next to a tunnel that works."""
    import gc
    import warnings

    assert heel.proxy.HANDSHAKE_TIMEOUT <= 15 and heel.proxy.CONNECT_TIMEOUT <= 20
    silent, fillers = full_listener()

    async def resolve(host, port):
        if host == "slow.test":
            await trio.sleep_forever()
        return ["127.0.0.1"]

    outcome = {}

    async def trickle(proxy) -> None:
        sock = await connect(proxy.port)
        with sock, trio.move_on_after(60):
            for byte in b"CONNECT echo.test:1 HTTP/1.1\r\nX-Slow: ":
                await sock.send(bytes([byte]))
            while True:
                try:
                    await sock.send(b"x")
                except OSError:
                    break
                with trio.move_on_after(1):
                    if await sock.recv(100) == b"":
                        break
            outcome["trickle"] = "closed"

    async def ask(proxy, name: str, port: int) -> None:
        outcome[name] = status(await exchange(proxy.port, f"CONNECT {name}:{port} HTTP/1.1\r\n".encode() + auth()
                                              + b"\r\n"))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with silent:
            async with serving(AllowAll() | AllowList(["127.0.0.0/8"]), resolver=resolve) as proxy:
                with trio.fail_after(60):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(trickle, proxy)
                        nursery.start_soon(ask, proxy, "slow.test", echo.port)
                        nursery.start_soon(ask, proxy, "silent.test", silent.getsockname()[1])
                        nursery.start_soon(ask, proxy, "echo.test", echo.port)
                events = await settled(proxy)
            for filler in fillers:
                filler.close()
        gc.collect()
    assert outcome == {"trickle": "closed", "slow.test": "HTTP/1.1 502 Bad Gateway",
                       "silent.test": "HTTP/1.1 502 Bad Gateway",
                       "echo.test": "HTTP/1.1 200 Connection established"}, outcome
    assert sorted((e.host, e.allowed, e.failed) for e in events) == [
        ("echo.test", True, False), ("silent.test", False, True), ("slow.test", False, True)], events
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


# ---- events ---------------------------------------------------------------------


async def test_a_callback_that_raises_changes_nothing_and_sees_every_event(echo):
    """on_network_event is the host's code: one that raises neither takes
    the proxy down nor loses the event; it is called with each event, in
    the order the events are kept."""
    got = []

    def callback(event):
        got.append(event)
        raise RuntimeError("the host's callback fails")

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    with listener:
        proxy = Proxy(AllowList(["echo.test"]), listener, secret=SECRET, require_secret=True,
                      resolver=resolver_for({"echo.test": ["127.0.0.1"]}), on_event=callback)
        port = listener.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            first = await exchange(port, b"CONNECT other.test:1 HTTP/1.1\r\n" + auth() + b"\r\n")
            second = await exchange(port, f"CONNECT echo.test:{echo.port} HTTP/1.1\r\n".encode() + auth() + b"\r\nok")
            events = await settled(proxy)
            nursery.cancel_scope.cancel()
    assert status(first) == "HTTP/1.1 403 Forbidden" and second.endswith(b"\r\n\r\nok"), (first, second)
    assert got == events and [e.allowed for e in events] == [False, True], (got, events)


def test_the_events_kept_are_bounded_apart_and_in_order():
    """MAX_EVENTS of each kind are kept, in the order they came; one more
    denial drops the oldest denial (counted), never an allowed event, and
    the callback still sees it."""
    seen = []
    listener = socket.socket()
    with listener:
        proxy = Proxy(AllowAll(), listener, secret=SECRET, require_secret=True, on_event=seen.append)
        limit = heel.proxy.MAX_EVENTS
        assert 100 <= limit <= 100_000
        allowed = heel.proxy.NetworkEvent(0.0, "kept.test", 443, "connect", True, "allowed")
        proxy.record(allowed)
        for n in range(limit + 1):
            proxy.record(heel.proxy.NetworkEvent(float(n), "denied.test", n, "connect", False, "denied"))
        events = proxy.events
    assert len(events) == limit + 1 and proxy.events_dropped == 1 and len(seen) == limit + 2
    assert events[0] == allowed and [e.port for e in events[1:]] == list(range(1, limit + 1))


# ---- after an answer --------------------------------------------------------------


async def test_after_its_answer_a_client_that_never_closes_is_let_go(echo):
    """After an HTTP answer the proxy reads and drops what the client still
    sends for at most LINGER_TIMEOUT, then closes: a client that keeps its
    socket open, after a 403, a 400 and a plain HTTP response, holds no
    connection of the proxy's for longer than that."""
    assert heel.proxy.LINGER_TIMEOUT <= 5 < TIMEOUT
    server = OneExchange([RESPONSE])
    try:
        async with serving(AllowList(["raw.test"]), names={"raw.test": ["127.0.0.1"]}) as proxy:
            kept = []
            for request in (b"CONNECT other.test:1 HTTP/1.1\r\n", b"NOT HTTP AT ALL\r\n",
                            f"GET http://raw.test:{server.port}/ HTTP/1.1\r\n".encode()):
                sock = await connect(proxy.port)
                await sock.send(request + auth() + b"\r\n")
                kept.append((sock, await read_all(sock)))  # the answer, and the proxy's end of file
            await settled(proxy)  # while every client still holds its socket
            for sock, _ in kept:
                sock.close()
    finally:
        server.close()
    assert [status(answer) for _, answer in kept] == ["HTTP/1.1 403 Forbidden", "HTTP/1.1 400 Bad Request",
                                                      "HTTP/1.1 200 OK"], kept


async def test_an_answer_ends_at_once_and_an_overloaded_one_lingers_less(echo, monkeypatch):
    """The end of an HTTP answer reaches the client as soon as the answer
    is sent (the proxy shuts down its side and only then waits for the
    client's), however long the proxy would linger; and a refusal over
    the budget lingers only OVERLOAD_TIMEOUT, not LINGER_TIMEOUT."""
    monkeypatch.setattr(heel.proxy, "LINGER_TIMEOUT", 120)  # longer than the test's bound
    async with serving(AllowList(["echo.test"]), names={"echo.test": ["127.0.0.1"]}) as proxy:
        refused = await connect(proxy.port)
        with refused:
            await refused.send(b"CONNECT other.test:1 HTTP/1.1\r\n" + auth() + b"\r\n")
            answer = await read_all(refused)  # the end comes while the proxy still lingers
            assert proxy.open_connections == 1
        await settled(proxy)
        tunnel = await hold_the_slot(proxy, echo)
        with tunnel:
            over = await connect(proxy.port)
            with over:
                await over.send(b"CONNECT echo.test:1 HTTP/1.1\r\n" + auth() + b"\r\n")
                over_answer = await read_all(over)
                with trio.fail_after(TIMEOUT):
                    while proxy.overload_answers:  # let go while the client still holds its socket
                        await trio.sleep(0.01)
        await settled(proxy)
    assert status(answer) == "HTTP/1.1 403 Forbidden", answer
    assert status(over_answer) == "HTTP/1.1 503 Service Unavailable", over_answer


def test_an_ipv6_host_is_bracketed_where_an_event_is_described():
    event = heel.proxy.NetworkEvent(0.0, "::1", 443, "connect", False, "denied", "curl")
    assert event.describe() == "network denied: connect [::1]:443 by curl (denied)"


#: Run in a process of its own: prints each proxy's connection budget
#: (max_connections) under the soft RLIMIT_NOFILE given, and the budget
#: of all the process's proxies together.
BUDGET = r"""
import resource, socket, sys
import heel.proxy
soft = int(sys.argv[1])
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
proxy = heel.proxy.Proxy(heel.AllowAll(), socket.socket(), secret="s", require_secret=True)
print(proxy.max_connections, heel.proxy._process_budget())
"""


def test_the_connection_budget_keeps_the_tunnels_fds_within_the_fd_limit():
    """The fds that the proxies' tunnels may hold at once (each tunnel's
    FDS_PER_TUNNEL, and one each for the answers over the budget) fit in
    the soft RLIMIT_NOFILE next to the rest of the host process; where
    the limit is high, one proxy still takes at most 256 (MAX_CONNECTIONS,
    as the README says)."""
    import resource
    import subprocess
    import sys

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    per_tunnel = heel.proxy.FDS_PER_TUNNEL + 2
    for soft in (1024, 4096, hard if hard != resource.RLIM_INFINITY else 1 << 20):
        if soft > hard:
            continue
        done = subprocess.run([sys.executable, "-c", BUDGET, str(soft)], capture_output=True, text=True,
                              timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr
        one, process = map(int, done.stdout.split())
        assert process * per_tunnel + 128 <= soft, (soft, process)
        assert process >= min(16, soft // per_tunnel) and one == min(process, 256), (soft, one, process)


# ---- the host's own addresses, by the route a connection to that port takes -------


def test_a_local_route_for_tcp_to_some_ports_only_is_refused(tmp_path):
    """The local-route check asks the kernel about the port the connection
    goes to: in a throwaway network namespace (as test_proxy_review's
    local-route test, whose script this reuses), a rule that sends TCP to
    ports 1024-65000 (the daemon's are ephemeral ones) of a prefix to a
    table where that prefix is local makes the daemon there this host's
    own; a lookup without the port would match no rule, find no route, and
    let the proxy connect.  Reached on the port the policy names with the
    address: the control."""
    import shutil

    from test_proxy_review import run_local_routes

    if not shutil.which("unshare") or not shutil.which("ip") or not shutil.which("curl"):
        pytest.skip("needs unshare, ip and curl")
    target = "2600:7::7"
    setup = ["-6 route add local 2600:7::/64 dev lo table 107",
             "-6 rule add ipproto tcp dport 1024-65000 to 2600:7::/64 lookup 107"]
    report = run_local_routes(tmp_path, [target], "0", setup)
    refused, allowed = report["refused_port"], report["allowed_port"]
    assert report["codes"] == {f"{target} {refused}": "403", f"{target} {allowed}": "200"}, report
    assert [tuple(a) for a in report["arrived"]] == [(target, allowed)], report


async def test_an_invalid_host_is_kept_short_in_its_event():
    """The sandbox writes the host: an invalid one of many kilobytes is cut
    to what a host name can be in its event, by CONNECT and plain HTTP."""
    long_host = "evil!" + "a" * 5000
    async with serving(AllowAll()) as proxy:
        for line in (f"CONNECT {long_host}:443 HTTP/1.1\r\n", f"GET http://{long_host}/ HTTP/1.1\r\n"):
            answer = await exchange(proxy.port, line.encode() + auth() + b"\r\n", half_close=False)
            assert status(answer) == "HTTP/1.1 400 Bad Request", answer[:200]
        events = await settled(proxy)
    assert [e.protocol for e in events] == ["connect", "http"], events
    assert all(len(e.host) < 300 and "invalid host" in e.reason for e in events), [e.host[:50] for e in events]


async def test_a_resolver_that_fails_oddly_is_an_internal_error_event_and_the_proxy_goes_on(echo):
    """A resolver (or a policy) that raises what it should not ends that
    connection, and the host learns why from an event; the next request
    is served."""
    async def resolve(host, port):
        if host == "boom.test":
            raise RuntimeError("resolver bug")
        return ["127.0.0.1"]

    async with serving(AllowList(["boom.test", "echo.test"]), resolver=resolve) as proxy:
        boom = await exchange(proxy.port, f"CONNECT boom.test:{echo.port} HTTP/1.1\r\n".encode() + auth() + b"\r\n")
        fine = await exchange(proxy.port, f"CONNECT echo.test:{echo.port} HTTP/1.1\r\n".encode() + auth()
                              + b"\r\nfine")
        events = await settled(proxy)
    assert boom == b"" and fine.endswith(b"\r\n\r\nfine"), (boom, fine)
    assert [(e.allowed, e.reason) for e in events] == [
        (False, "internal error in heel's proxy: RuntimeError: resolver bug"), (True, "matches echo.test")], events
