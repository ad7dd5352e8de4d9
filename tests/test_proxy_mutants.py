"""Tests written by a mutation audit of the network-policy code: each pins a
property that a weakened proxy or policy still passed the other tests with.
As the rest of the network tests: a real sandbox, a client inside it that
speaks to the proxy itself, servers on the host's loopback, and each
forbidden attempt next to an allowed neighbour that does get through.

- a wildcard matches subdomains only, never a name that merely holds
  ``.suffix`` (``api.good.test.evil.test``);
- the policy of a SOCKS request sees the host in canonical form, as for
  CONNECT and plain HTTP (``BLOCKED.TEST.`` is ``blocked.test``);
- a SOCKS request the policy denies is an event;
- what a plain-HTTP client sends after its request (a pipelined second
  request) never reaches the server;
- without namespaces, a plain-HTTP request without the sandbox's secret gets
  407, as CONNECT and SOCKS do.
"""

from __future__ import annotations

import socket
import threading

import pytest
import trio

import heel
from heel.policy import AllowList, CustomPolicy, NetworkRequest
from helpers import PROXY_CLIENT, explain, py

PERMISSIVE = heel.IsolationLevel.PERMISSIVE
#: Generous: these tests must pass on a loaded machine too.
TIMEOUT = 60

PRELUDE = PROXY_CLIENT + r"""


def read_head(s):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head.decode(errors="replace"), rest


def tunnel(target, payload):
    # CONNECT, then the payload and a half-close; prints the status line and
    # what came back.
    s = connect_proxy()
    s.sendall(f"CONNECT {target} HTTP/1.1\r\n".encode() + auth + b"\r\n")
    head, rest = read_head(s)
    print("STATUS", head.splitlines()[0] if head else "none")
    if head.startswith("HTTP/1.1 200"):
        s.sendall(payload.encode())
        s.shutdown(socket.SHUT_WR)
        print("DATA", read_all(s, rest).decode(errors="replace"))


def socks(host, port, payload):
    s = socks_connect(host.encode(), int(port))
    reply = s.recv(262)
    print("SOCKS", reply[1])
    if reply[1] == 0:
        s.sendall(payload.encode())
        s.shutdown(socket.SHUT_WR)
        print("DATA", read_all(s).decode(errors="replace"))
"""


def dns_like(names: dict[str, list[str]]):
    """A proxy resolver that knows only ``names`` and, as DNS does, ignores
    the case of a name and a trailing dot."""

    async def resolve(host: str, port: int) -> list[str]:
        key = host.lower().rstrip(".")
        if key not in names:
            raise OSError(f"{host}: no such test host")
        return names[key]

    return resolve


def sandbox(policy, names=None, **config) -> heel.Sandbox:
    config.setdefault("level", PERMISSIVE)
    return heel.Sandbox(heel.SandboxConfig(network=policy, **config), resolver=dns_like(names or {}))


async def inside(sb, code: str, *args) -> heel.Output:
    return await py(sb, PRELUDE + code, *map(str, args), timeout=TIMEOUT)


async def settled(sb, timeout: float = 30) -> list:
    """The events once the proxy serves no connection any more."""
    with trio.fail_after(timeout):
        while sb._proxy.open_connections:
            await trio.sleep(0.02)
    return sb.network_events()


class SlowRecorder:
    """HTTP on 127.0.0.1: each connection's bytes are kept in ``received``
    for a moment (``linger`` s, or until the peer closes) before it answers
    200 with Content-Length and keeps the connection open, as a server that
    ignores ``Connection: close`` does.  So whatever a proxy passes on after
    the first request arrives here and is seen."""

    def __init__(self, linger: float = 1.5) -> None:
        self.linger = linger
        self.received: list[bytes] = []
        self._open: list[socket.socket] = []
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        try:
            conn.settimeout(self.linger)
            try:
                while chunk := conn.recv(65536):
                    data += chunk
            except (socket.timeout, OSError):
                pass
            self.received.append(data)
            conn.settimeout(5)
            body = b"served " + data.split(b" ", 2)[1] + b"\n" if data.count(b" ") >= 2 else b"?\n"
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s"
                         % (len(body), body))
            while conn.recv(65536):  # keep it open, as a keep-alive server does
                pass
        except OSError:
            pass

    def close(self) -> None:
        for sock in [self._listener, *self._open]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


@pytest.fixture
def recorder():
    server = SlowRecorder()
    yield server
    server.close()


# ---- wildcards: subdomains of the suffix, nothing that merely contains it ----------


@pytest.mark.parametrize("host", ["api.good.test.evil.test", "good.test.evil.test", "x.good.test.", "evilgood.test",
                                  "a.good.testx", "a.good.test.x"])
async def test_a_wildcard_matches_only_names_that_end_in_its_suffix(host):
    policy = AllowList(["*.good.test"])
    expected = host == "x.good.test."  # the trailing dot is the same name
    decision = await policy.decide(NetworkRequest(host, 443, "connect"))
    assert decision.allowed is expected, (host, decision)
    # Control: a subdomain at any depth is allowed.
    assert (await policy.decide(NetworkRequest("a.b.good.test", 443, "connect"))).allowed


async def test_a_wildcard_does_not_reach_a_name_that_holds_its_suffix_in_the_middle(echo):
    # The internal test server, by address, and *.good.test: a name that
    # the wildcard does not match is refused by the policy itself, though
    # it resolves to the address the policy names.
    names = {"api.good.test": ["127.0.0.1"], "api.good.test.evil.test": ["127.0.0.1"]}
    policy = AllowList(["*.good.test"]) | AllowList(["127.0.0.1"])
    async with sandbox(policy, names) as sb:
        with trio.fail_after(TIMEOUT):
            allowed = await inside(sb, "tunnel(sys.argv[1], 'wildcard ok')", f"api.good.test:{echo.port}")
            refused = await inside(sb, "tunnel(sys.argv[1], 'wildcard leak')",
                                   f"api.good.test.evil.test:{echo.port}")
            events = await settled(sb)
    assert "DATA wildcard ok" in allowed.stdout.decode(), explain(allowed)
    assert "STATUS HTTP/1.1 403" in refused.stdout.decode(), explain(refused)
    assert "leak" not in refused.stdout.decode()
    assert echo.connections == 1
    denied = [e for e in events if not e.allowed]
    assert [e.host for e in denied] == ["api.good.test.evil.test"], events
    assert denied[0].reason == "not in the allow-list; not in the allow-list", denied


# ---- SOCKS: the policy sees the canonical host, and a denial is an event -----------


@pytest.mark.parametrize("spelling", ["BLOCKED.TEST", "blocked.test.", "Blocked.Test."])
async def test_a_socks_request_reaches_the_policy_with_its_host_in_canonical_form(echo, spelling):
    # A CustomPolicy that compares the host (it may: NetworkRequest.host is
    # canonical) and vouches for the internal address of what it allows.
    seen = []

    async def not_blocked(request):
        seen.append((request.protocol, request.host))
        return request.host != "blocked.test"

    names = {"blocked.test": ["127.0.0.1"], "fine.test": ["127.0.0.1"]}
    policy = CustomPolicy(not_blocked, allow_restricted=True)
    async with sandbox(policy, names) as sb:
        with trio.fail_after(TIMEOUT):
            allowed = await inside(sb, "socks(sys.argv[1], sys.argv[2], 'socks ok')", "FINE.TEST.", echo.port)
            over_socks = await inside(sb, "socks(sys.argv[1], sys.argv[2], 'socks leak')", spelling, echo.port)
            over_connect = await inside(sb, "tunnel(sys.argv[1], 'connect leak')", f"{spelling}:{echo.port}")
            await settled(sb)
    assert "DATA SOCKS OK" in allowed.stdout.decode().upper(), explain(allowed)
    assert "SOCKS 2" in over_socks.stdout.decode() and "leak" not in over_socks.stdout.decode(), explain(over_socks)
    assert "STATUS HTTP/1.1 403" in over_connect.stdout.decode(), explain(over_connect)
    assert echo.connections == 1
    assert seen == [("socks", "fine.test"), ("socks", "blocked.test"), ("connect", "blocked.test")], seen


async def test_a_socks_request_the_policy_denies_is_an_event(echo):
    reported = []
    names = {"good.test": ["127.0.0.1"], "evil.test": ["127.0.0.1"]}
    async with sandbox(AllowList(["good.test"]), names, on_network_event=reported.append) as sb:
        with trio.fail_after(TIMEOUT):
            allowed = await inside(sb, "socks(sys.argv[1], sys.argv[2], 'ok')", "good.test", echo.port)
            refused = await inside(sb, "socks(sys.argv[1], sys.argv[2], 'no')", "evil.test", echo.port)
            events = await settled(sb)
    assert "SOCKS 0" in allowed.stdout.decode(), explain(allowed)
    assert "SOCKS 2" in refused.stdout.decode(), explain(refused)
    summary = sorted((e.host, e.port, e.protocol, e.allowed, e.reason) for e in events)
    assert summary == [("evil.test", echo.port, "socks", False, "not in the allow-list"),
                       ("good.test", echo.port, "socks", True, "matches good.test")], events
    assert sorted(e.host for e in reported) == ["evil.test", "good.test"], reported


# ---- plain HTTP: one request per connection, nothing after it -----------------------


async def test_a_request_sent_after_the_first_on_its_connection_never_reaches_the_server(recorder):
    # A URL policy: /public/ on this server only.  The server ignores
    # Connection: close, so a second request that reached it would be served.
    port = recorder.port

    async def public_only(request):
        return request.url is not None and request.url.startswith(f"http://web.test:{port}/public/")

    names = {"web.test": ["127.0.0.1"]}
    async with sandbox(CustomPolicy(public_only, allow_restricted=True), names) as sb:
        with trio.fail_after(TIMEOUT):
            out = await inside(sb, r"""
port = sys.argv[1]
# Control, and the policy at work: /secret alone is refused.
s = connect_proxy()
s.sendall(b"GET http://web.test:%s/secret HTTP/1.1\r\nHost: web.test\r\n" % port.encode() + auth + b"\r\n")
print("ALONE", read_all(s).split(b"\r\n")[0].decode())
# /public/a, then, a moment later on the same connection, /secret.
s = connect_proxy()
s.sendall(b"GET http://web.test:%s/public/a HTTP/1.1\r\nHost: web.test\r\n" % port.encode() + auth + b"\r\n")
time.sleep(0.4)
try:
    s.sendall(b"GET /secret HTTP/1.1\r\nHost: web.test\r\n\r\n"
              b"GET http://web.test:%s/secret HTTP/1.1\r\nHost: web.test\r\n\r\n" % port.encode())
except OSError:
    pass
print("PIPELINED", read_all(s).decode(errors="replace").split("\r\n\r\n", 1)[-1].strip())
""", port)
            await settled(sb)
    lines = out.stdout.decode().splitlines()
    assert lines == ["ALONE HTTP/1.1 403 Forbidden", "PIPELINED served /public/a"], explain(out)
    assert len(recorder.received) == 1, recorder.received
    (received,) = recorder.received
    assert received.startswith(b"GET /public/a HTTP/1.1\r\n"), received
    assert b"secret" not in received, received


# ---- the secret without namespaces, for plain HTTP too -------------------------------


def _ask_proxy(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        s.settimeout(5)
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except OSError:
            pass
        return data


async def test_without_namespaces_plain_http_needs_the_secret_too(no_namespaces, web):
    names = {"web.test": ["127.0.0.1"]}
    async with sandbox(AllowList(["web.test"]), names, best_effort=True) as sb:
        assert sb._session.proxy_requires_secret
        port = sb.plan.proxy_port
        request = f"GET http://web.test:{web.port}/from-another-process HTTP/1.1\r\nHost: web.test\r\n".encode()
        anonymous = await trio.to_thread.run_sync(_ask_proxy, port, request + b"\r\n")
        wrong = await trio.to_thread.run_sync(
            _ask_proxy, port, request + b"Proxy-Authorization: Basic aGVlbDpub3Bl\r\n\r\n")
        assert anonymous.startswith(b"HTTP/1.1 407") and wrong.startswith(b"HTTP/1.1 407"), (anonymous, wrong)
        assert web.requests == []
        # Control: the sandbox, with the credential of its environment.
        with trio.fail_after(TIMEOUT):
            out = await inside(sb, r"""
s = connect_proxy()
s.sendall(b"GET http://web.test:%s/from-the-sandbox HTTP/1.1\r\nHost: web.test\r\n" % sys.argv[1].encode()
          + auth + b"\r\n")
print(read_all(s).decode(errors="replace").split("\r\n")[0])
""", web.port)
            await settled(sb)
    assert out.stdout.decode().strip() == "HTTP/1.1 200 OK", explain(out)
    assert [path for _, path, _ in web.requests] == ["/from-the-sandbox"], web.requests
