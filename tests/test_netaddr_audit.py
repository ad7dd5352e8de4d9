"""What a mutation audit of heel/_netaddr.py and heel/_proxy_protocol.py
found no test for: each test here fails under a mutant of those files that
the rest of the suite let through.

- the edges of every restricted network, first and last address in,
  the neighbours out, so that no range can be widened or narrowed unseen;
  Teredo judged by either of its addresses, the NAT64 local-use prefix
  kept closed;
- a port is ASCII digits only;
- the length limit on a host holds for IPv4 spellings too, and a name of
  254 characters is too long without its trailing dot as with it;
- ``0X`` (upper case) in the last part of an IPv4 spelling is hex there too,
  and a fifth part is never part of an address, even when it is zero;
- a plain-HTTP URI has nothing between ``[ipv6]`` and ``:port``; Basic
  credentials are strict base64; a Connection header never strips
  Transfer-Encoding from what goes upstream; the request line and a header
  line may be MAX_LINE bytes and not one more; a 101 answer's bytes run
  until the server closes;

and, through a real sandbox's proxy, that what those spellings name is what
the policy sees and what is reached (or that they are refused as invalid).
"""

from __future__ import annotations

import base64
import ipaddress
import json

import pytest
import trio

import heel
from heel import _proxy_protocol as proto
from heel._netaddr import is_restricted, normalize_host, parse_port
from heel.errors import PolicyError
from heel.policy import AllowAll, AllowList, NetworkRequest
from helpers import PROXY_CLIENT, explain, py
from netservers import resolver_for


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# ---- the edges of the restricted networks ---------------------------------------

#: Each restricted IPv4 network as its first and last address, and the
#: addresses just outside it that are public (written out, not computed:
#: what is_restricted's table says is what is under test).
IPV4_EDGES = [
    # (first, last, just outside and public)
    ("0.0.0.0", "0.255.255.255", ["1.0.0.0"]),
    ("10.0.0.0", "10.255.255.255", ["9.255.255.255", "11.0.0.0"]),
    ("100.64.0.0", "100.127.255.255", ["100.63.255.255", "100.128.0.0"]),
    ("127.0.0.0", "127.255.255.255", ["126.255.255.255", "128.0.0.0"]),
    ("168.63.129.16", "168.63.129.16", ["168.63.129.15", "168.63.129.17"]),
    ("169.254.0.0", "169.254.255.255", ["169.253.255.255", "169.255.0.0"]),
    ("172.16.0.0", "172.31.255.255", ["172.15.255.255", "172.32.0.0"]),
    ("192.0.0.0", "192.0.0.255", ["191.255.255.255", "192.0.1.0"]),
    ("192.0.2.0", "192.0.2.255", ["192.0.1.255", "192.0.3.0"]),
    ("192.88.99.0", "192.88.99.255", ["192.88.98.255", "192.88.100.0"]),
    ("192.168.0.0", "192.168.255.255", ["192.167.255.255", "192.169.0.0"]),
    ("198.18.0.0", "198.19.255.255", ["198.17.255.255", "198.20.0.0"]),
    ("198.51.100.0", "198.51.100.255", ["198.51.99.255", "198.51.101.0"]),
    ("203.0.113.0", "203.0.113.255", ["203.0.112.255", "203.0.114.0"]),
    ("224.0.0.0", "239.255.255.255", ["223.255.255.255"]),
    ("240.0.0.0", "255.255.255.255", []),
]

#: The same for IPv6: what lies outside global unicast 2000::/3, and the
#: special blocks inside it.
IPV6_EDGES = [
    ("::", "1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", ["2000::"]),
    ("4000::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", ["3ffe:ffff:ffff:ffff:ffff:ffff:ffff:ffff"]),
    ("2001:1::", "2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff", ["2000:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "2001:200::"]),
    ("2001:db8::", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
     ["2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", "2001:db9::"]),
    ("3fff::", "3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff", ["3ffe:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "3fff:1000::"]),
]


@pytest.mark.parametrize(("first", "last", "outside"), IPV4_EDGES + IPV6_EDGES, ids=lambda x: str(x))
def test_each_restricted_network_ends_where_it_should(first, last, outside):
    assert is_restricted(ip(first)), first
    assert is_restricted(ip(last)), last
    for address in outside:
        assert not is_restricted(ip(address)), address


@pytest.mark.parametrize(
    ("address", "restricted"),
    [
        # Teredo 2001:0::/32: server, then the client XORed with ones.  Either
        # one restricted makes the whole address so.
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", True),  # server 65.54.227.120, client 10.0.0.1
        ("2001:0:a00:1:8000:63bf:a247:27dd", True),  # server 10.0.0.1, client 93.184.216.34
        ("2001:0:4136:e378:8000:63bf:a247:27dd", False),  # both public
        # Only the well-known NAT64 prefix 64:ff9b::/96 is judged by its IPv4
        # address; the local-use 64:ff9b:1::/48 (RFC 8215) maps wherever its
        # operator likes.
        ("64:ff9b::808:808", False),
        ("64:ff9b::a00:1", True),
        ("64:ff9b:1::808:808", True),
        ("64:ff9b:0:1::808:808", True),
        # IPv4-mapped is ::ffff:0:0/96 only.
        ("::fffe:808:808", True),
        ("::1:ffff:808:808", True),
        # 6to4 2002::/16: judged by the IPv4 address in bits 16 to 48.
        ("2002:808:808::", False),
        ("2002:a00:1::", True),
        ("2002:c0a8:101:ffff::1", True),
        ("2002:a9fe:a9fe:1234:5678::1", True),
    ],
)
def test_addresses_that_carry_an_ipv4_address(address, restricted):
    assert is_restricted(ip(address)) is restricted


# ---- ports ----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["\u0668\u0660", "\uff18\uff10", "8\u0660", "\u00b2", "\u0664\u0664\u0663"])
def test_a_port_is_ascii_digits_only(text):
    # str.isdigit() and int() read Arabic-Indic and full-width digits as 80.
    assert parse_port(text) is None
    with pytest.raises(PolicyError, match="port"):
        AllowList([f"example.com:{text}"])


# ---- the length of a host -------------------------------------------------------


def test_the_length_limit_holds_for_ipv4_spellings_too():
    # inet_aton reads any number of leading zeros; the limit on a host's
    # length is the same for a spelling of an address as for a name.
    longest = "0" * (254 - len("177.0.0.1")) + "177.0.0.1"
    assert normalize_host(longest) == "127.0.0.1"
    for extra in (1, 2, 50, 100, 1000):
        with pytest.raises(ValueError, match="longer than 253"):
            normalize_host("0" * extra + longest)


#: A name of 254 characters, every label within 63: one too long.
NAME_254 = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 62])


def test_a_name_of_254_characters_is_too_long_with_or_without_its_dot():
    # The 254th character may be the trailing dot (the host-wide limit lets
    # it through), but not a letter.
    assert len(NAME_254) == 254
    for host in (NAME_254, NAME_254 + ".", NAME_254.upper()):
        with pytest.raises(ValueError, match="longer than 253"):
            normalize_host(host)
    assert normalize_host(NAME_254[1:] + ".") == NAME_254[1:]


# ---- IPv4 spellings -------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["127.0.0.0X1", "0X7F000001", "127.0X1", "127.0.0X1", "0X7f.0X0.0X0.0X1",
                                      "127.0.0.0x01", "127.0.0.01"])
def test_an_upper_case_hex_prefix_counts_in_the_last_part_too(spelling):
    # inet_aton (and so getaddrinfo) takes 0X as well as 0x in any part: were
    # "127.0.0.0X1" a name, the policy would see a name where the resolver
    # reads an address.
    assert normalize_host(spelling) == "127.0.0.1"


async def test_an_address_spelled_with_0X_is_excluded_like_its_dotted_quad():
    policy = AllowAll() & ~AllowList(["93.184.216.34"])
    for spelling in ("93.184.216.34", "93.184.216.0X22", "0X5DB8D822", "93.0XB8D822"):
        decision = await policy.decide(NetworkRequest(normalize_host(spelling), 443, "connect"))
        assert not decision.allowed, spelling


@pytest.mark.parametrize("spelling", ["127.0.0.1.0", "1.2.3.4.0", "0.0.0.0.0", "127.0.0.1.0x0", "127.0.0.1.00"])
def test_five_parts_are_no_address_even_when_the_fifth_is_zero(spelling):
    # inet_aton reads at most four parts; a fifth part of 0 added nothing to
    # the address in a parser that only checked what the last part may hold.
    with pytest.raises(ValueError, match="not a valid one"):
        normalize_host(spelling)



# ---- the proxy's parser -----------------------------------------------------------


@pytest.mark.parametrize("target", ["http://[::1]x/", "http://[::1].evil.test/", "http://[::1]evil.test:80/",
                                    "http://[127.0.0.1]/", "http://[::1]]/"])
def test_an_absolute_uri_has_nothing_between_its_bracketed_host_and_port(target):
    # For CONNECT the missing port alone refuses "[::1]x"; a plain-HTTP URI
    # has a default port, so the text after "]" must be refused on its own,
    # not read as [::1] port 80 where another parser reads another host.
    with pytest.raises(proto.ProtocolError) as caught:
        proto.parse_http_head(f"GET {target} HTTP/1.1\r\n\r\n".encode())
    assert caught.value.status == 400


def test_connection_never_drops_what_frames_the_body():
    # The proxy answers 411 to a chunked plain-HTTP request today; were that
    # lifted, a Connection header listing Transfer-Encoding must not strip the
    # framing on the way upstream (the server would read the body as the
    # next request).
    head = proto.parse_http_head(b"POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                                 b"Connection: transfer-encoding, x-hop\r\nX-Hop: 1\r\n\r\n")
    sent = proto.forward_head(head).decode("latin-1").lower()
    assert "transfer-encoding: chunked\r\n" in sent and "x-hop" not in sent, sent


def test_line_limits_are_exact():
    # The request line and each header line may be MAX_LINE bytes, not one more.
    prefix, suffix = "GET http://h/", " HTTP/1.1"
    line = prefix + "a" * (proto.MAX_LINE - len(prefix) - len(suffix)) + suffix
    assert len(line) == proto.MAX_LINE
    assert proto.parse_http_head(f"{line}\r\n\r\n".encode()).path.startswith("/aaa")
    with pytest.raises(proto.ProtocolError) as caught:
        proto.parse_http_head(f"{line[:-len(suffix)]}a{suffix}\r\n\r\n".encode())
    assert caught.value.status == 414
    header = "X: " + "v" * (proto.MAX_LINE - 3)
    assert proto.parse_http_head(f"GET http://h/ HTTP/1.1\r\n{header}\r\n\r\n".encode()).headers
    with pytest.raises(proto.ProtocolError) as caught:
        proto.parse_http_head(f"GET http://h/ HTTP/1.1\r\n{header}v\r\n\r\n".encode())
    assert caught.value.status == 431


def test_a_101_answer_runs_until_the_server_closes_whatever_its_content_length():
    # After 101 Switching Protocols the bytes are another protocol's: a
    # Content-Length on the 101 does not end them.
    head = b"HTTP/1.1 101 Switching Protocols\r\nContent-Length: 0\r\nUpgrade: x\r\n\r\n"
    response = proto.parse_response_head(head)
    assert response.status == 101 and not response.interim
    assert proto.response_body_length(response, "GET") is None


@pytest.mark.parametrize("padding", ["=", "=="])
def test_basic_credentials_with_padding_after_the_padding_are_refused(padding):
    # "cmd1:secret" ends in one "=" of padding; more after it is no base64
    # (Python's b64decode reads it without validate=True).  Harmless to
    # the secret, which must still match, but a credential reads one way.
    credential = base64.b64encode(b"cmd1:secret").decode()
    assert credential.endswith("=") and not credential.endswith("==")
    head = f"CONNECT a.test:443 HTTP/1.1\r\nProxy-Authorization: Basic {credential}\r\n\r\n".encode()
    assert proto.proxy_credentials(proto.parse_http_head(head)) == ("cmd1", "secret")
    padded = head.replace(credential.encode(), (credential + padding).encode())
    with pytest.raises(proto.ProtocolError, match="not base64"):
        proto.proxy_credentials(proto.parse_http_head(padded))


# ---- through a real sandbox -------------------------------------------------------

def _client_code() -> str:
    """In the sandbox: CONNECT to each target of argv[1] (a JSON list)
    through the proxy, send a marker when the tunnel is open, and print one
    JSON line per target: the target, the status line and what came back."""
    return PROXY_CLIENT + r"""
import json
for target in json.loads(sys.argv[1]):
    s = connect_proxy()
    s.sendall(f"CONNECT {target} HTTP/1.1\r\n".encode() + auth + b"\r\n")
    head, rest = read_head(s)
    status = head.splitlines()[0] if head else "none"
    if status.startswith("HTTP/1.1 200"):
        s.sendall(b"through")
        s.shutdown(socket.SHUT_WR)
    print(json.dumps([target, status, read_all(s, rest).decode(errors="replace")]), flush=True)
    s.close()
"""


#: Spellings of 127.0.0.1 that the proxy reads as that address.
LOOPBACK_SPELLINGS = ["127.0.0.0X1", "0X7F000001", "127.0X1", "0" * (254 - len("177.0.0.1")) + "177.0.0.1"]
#: What no resolver reads as an address, and the proxy refuses as invalid
#: (the last: a name of 254 characters).
INVALID_SPELLINGS = ["0" * (255 - len("177.0.0.1")) + "177.0.0.1", "127.0.0.1.0", NAME_254]


async def _connect_each(policy, targets: list[str]):
    config = heel.SandboxConfig(network=policy, level=heel.IsolationLevel.PERMISSIVE)
    async with heel.Sandbox(config, resolver=resolver_for({})) as sb:
        out = await py(sb, _client_code(), json.dumps(targets), timeout=60)
        with trio.fail_after(10):
            while sb._proxy.open_connections:
                await trio.sleep(0.01)
        events = sb.network_events()
    assert out.returncode == 0, explain(out)
    results = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert [target for target, _, _ in results] == targets, explain(out)
    return {target: (status, body) for target, status, body in results}, events


async def test_spellings_reach_what_they_name_and_invalid_ones_nothing(echo):
    """Observed from outside: under AllowAll every spelling of loopback is
    refused as the internal address 127.0.0.1 (not looked up as a name,
    which would fail otherwise), each invalid spelling is refused as
    invalid, and nothing arrives; with 127.0.0.1 named, each spelling
    reaches the echo server and the invalid ones still do not."""
    targets = [f"{spelling}:{echo.port}" for spelling in LOOPBACK_SPELLINGS + INVALID_SPELLINGS]
    answers, events = await _connect_each(heel.AllowAll(), targets)
    assert echo.connections == 0
    by_target = dict(zip(targets, events))
    assert len(events) == len(targets), events
    for spelling, target in zip(LOOPBACK_SPELLINGS + INVALID_SPELLINGS, targets):
        status, body = answers[target]
        event = by_target[target]
        assert not event.allowed, event
        if spelling in LOOPBACK_SPELLINGS:
            assert status.startswith("HTTP/1.1 403"), (spelling, status, body)
            assert event.host == "127.0.0.1" and "internal address" in event.reason, event
        else:
            assert status.startswith("HTTP/1.1 400"), (spelling, status, body)
            assert event.reason.startswith("invalid host"), event

    answers, events = await _connect_each(heel.AllowList([f"127.0.0.1:{echo.port}"]), targets)
    for spelling, target in zip(LOOPBACK_SPELLINGS + INVALID_SPELLINGS, targets):
        status, body = answers[target]
        if spelling in LOOPBACK_SPELLINGS:
            assert status.startswith("HTTP/1.1 200") and body == "through", (spelling, status, body)
        else:
            assert status.startswith("HTTP/1.1 400") and "through" not in body, (spelling, status, body)
    assert echo.connections == len(LOOPBACK_SPELLINGS)
    assert [e.host for e in events if e.allowed] == ["127.0.0.1"] * len(LOOPBACK_SPELLINGS), events
