"""The proxy's protocol parsing: HTTP heads, credentials, forwarded heads, responses, SOCKS5; no sockets."""

from __future__ import annotations

import base64
import http.client
import io
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heel._proxy_protocol import (
    ADDRESS_TYPE_NOT_SUPPORTED,
    ATYP_DOMAIN,
    ATYP_IPV4,
    ATYP_IPV6,
    COMMAND_NOT_SUPPORTED,
    CONNECT_ESTABLISHED,
    MAX_HEAD,
    MAX_HEADERS,
    MAX_LINE,
    NEED_DATA,
    NOT_ALLOWED,
    SUCCEEDED,
    HttpRequest,
    InvalidHost,
    ProtocolError,
    Socks5Handshake,
    SocksAuth,
    SocksConnect,
    SocksFailed,
    SocksReply,
    forward_head,
    http_response,
    is_socks5,
    parse_http_head,
    proxy_credentials,
    request_body_length,
    socks5_reply,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def request_bytes(request_line: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [request_line, *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def parse(data: bytes) -> HttpRequest:
    request = parse_http_head(data)
    assert request is not None
    return request


def basic(user_password: bytes) -> str:
    return "Proxy-Authorization: Basic " + base64.b64encode(user_password).decode()


# -- well-formed requests ----------------------------------------------------------


def test_is_socks5_looks_at_the_first_byte():
    assert is_socks5(b"\x05\x01\x00")
    assert not is_socks5(b"CONNECT")
    assert not is_socks5(b"")


def test_connect():
    data = request_bytes("CONNECT pypi.org:443 HTTP/1.1", "Host: pypi.org:443", "User-Agent: curl/8")
    assert parse(data) == HttpRequest(
        method="CONNECT",
        target="pypi.org:443",
        version="HTTP/1.1",
        headers=(("host", "pypi.org:443"), ("user-agent", "curl/8")),
        host="pypi.org",
        port=443,
        path="",
        head_length=len(data),
    )


def test_connect_leaves_early_tunnel_data_after_the_head():
    head = request_bytes("CONNECT example.com:443 HTTP/1.1")
    data = head + b"\x16\x03\x01 client hello"
    request = parse(data)
    assert request.head_length == len(head)
    assert data[request.head_length :] == b"\x16\x03\x01 client hello"


@pytest.mark.parametrize(
    "target, host, port",
    [
        ("[::1]:443", "::1", 443),
        ("[2001:DB8::1]:8443", "2001:DB8::1", 8443),
        ("[::ffff:1.2.3.4]:1", "::ffff:1.2.3.4", 1),
        ("10.0.0.1:65535", "10.0.0.1", 65535),
        ("under_score.example.:22", "under_score.example.", 22),
    ],
)
def test_connect_targets(target, host, port):
    request = parse(request_bytes(f"CONNECT {target} HTTP/1.1"))
    assert (request.host, request.port, request.path) == (host, port, "")


def test_get_with_an_absolute_uri():
    data = request_bytes("GET http://example.com/a/b?c=d&e HTTP/1.1", "Host: example.com", "Accept: */*")
    request = parse(data)
    assert (request.method, request.host, request.port, request.path) == ("GET", "example.com", 80, "/a/b?c=d&e")
    assert request.version == "HTTP/1.1"
    assert request.headers == (("host", "example.com"), ("accept", "*/*"))


@pytest.mark.parametrize(
    "target, host, port, path",
    [
        ("http://example.com", "example.com", 80, "/"),
        ("http://example.com?q=1", "example.com", 80, "/?q=1"),
        ("http://example.com:8080/x", "example.com", 8080, "/x"),
        ("HTTP://Example.COM/", "Example.COM", 80, "/"),
        ("http://[::1]/", "::1", 80, "/"),
        ("http://[fe80::1]:3128/p", "fe80::1", 3128, "/p"),
        ("http://127.0.0.1:80/", "127.0.0.1", 80, "/"),
    ],
)
def test_absolute_uri_targets(target, host, port, path):
    request = parse(request_bytes(f"GET {target} HTTP/1.1"))
    assert (request.host, request.port, request.path, request.target) == (host, port, path, target)


def test_post_leaves_its_body_after_the_head():
    head = request_bytes("POST http://example.com/upload HTTP/1.1", "Content-Length: 11")
    request = parse(head + b"hello world")
    assert request.method == "POST"
    assert request.head_length == len(head)
    assert request.header_values("Content-Length") == ["11"]


def test_repeated_equal_content_lengths_are_accepted():
    data = request_bytes("POST http://h/ HTTP/1.1", "Content-Length: 3", "content-length: 3, 003")
    assert parse(data).header_values("content-length") == ["3", "3, 003"]


def test_repeated_content_lengths_go_upstream_as_one():
    """`Content-Length: 5, 5` (or the header twice) is one length to the
    proxy, and one to the server: found by review, the proxy's int() of the
    raw value failed and the connection died with an internal error."""
    for headers in (["Content-Length: 5, 5"], ["Content-Length: 5", "content-length: 005"]):
        request = parse(request_bytes("POST http://h/ HTTP/1.1", *headers) + b"hello")
        assert request_body_length(request) == 5
        assert forward_head(request) == b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
    assert request_body_length(parse(request_bytes("GET http://h/ HTTP/1.1"))) == 0


def test_bare_lf_line_ends_are_accepted():
    data = b"GET http://example.com/ HTTP/1.0\nHost: example.com\n\nrest"
    request = parse(data)
    assert (request.version, request.headers, request.head_length) == (
        "HTTP/1.0",
        (("host", "example.com"),),
        len(data) - 4,
    )


def test_header_values_keep_inner_spaces_and_latin1_bytes():
    data = b"GET http://h/ HTTP/1.1\r\nX-Thing: \t a  b\xe9 \t\r\nEmpty:\r\n\r\n"
    assert parse(data).headers == (("x-thing", "a  b\xe9"), ("empty", ""))


def test_limits_are_inclusive():
    headers = [f"X-{i}: {i}" for i in range(MAX_HEADERS)]
    assert len(parse(request_bytes("GET http://h/ HTTP/1.1", *headers)).headers) == MAX_HEADERS
    long_value = "X: " + "v" * (MAX_LINE - 3)
    assert parse(request_bytes("GET http://h/ HTTP/1.1", long_value)).headers[0][1] == "v" * (MAX_LINE - 3)
    fill = "x" * (MAX_HEAD - len(request_bytes("GET http://h/ HTTP/1.1", "A: ", "B: ")))
    exactly_max = request_bytes("GET http://h/ HTTP/1.1", "A: " + fill[: MAX_LINE - 3], "B: " + fill[MAX_LINE - 3 :])
    assert len(exactly_max) == MAX_HEAD
    assert parse(exactly_max).head_length == MAX_HEAD


def test_repr_hides_the_proxy_password():
    request = parse(request_bytes("GET http://h/ HTTP/1.1", basic(b"me:hunter2")))
    assert "aHVudGVy" not in repr(request) and "<redacted>" in repr(request)


# -- incomplete heads --------------------------------------------------------------

SPLIT_EXAMPLES = [
    request_bytes("CONNECT [::1]:443 HTTP/1.1", "Host: [::1]:443", basic(b"u:p")),
    request_bytes("POST http://example.com:8080/x?y HTTP/1.1", "Content-Length: 4", body=b"body"),
    b"GET http://h/ HTTP/1.0\n\n",
]


@pytest.mark.parametrize("data", SPLIT_EXAMPLES)
def test_every_prefix_of_a_head_is_incomplete(data):
    whole = parse(data)
    for end in range(whole.head_length):
        assert parse_http_head(data[:end]) is None, end
    for end in range(whole.head_length, len(data) + 1):
        assert parse_http_head(bytearray(data[:end])) == whole


# -- malformed and refused requests ------------------------------------------------


def status_of(data: bytes) -> int:
    with pytest.raises(ProtocolError) as info:
        parse_http_head(data)
    assert str(info.value)  # a message fit to send back
    return info.value.status


MALFORMED = {
    # request line
    "empty request line": (b"\r\n\r\n", 400),
    "leading blank line": (b"\r\nGET http://h/ HTTP/1.1\r\n\r\n", 400),
    "two parts": (b"GET http://h/\r\n\r\n", 400),
    "double space": (b"GET  http://h/ HTTP/1.1\r\n\r\n", 400),
    "tab separator": (b"GET\thttp://h/ HTTP/1.1\r\n\r\n", 400),
    "trailing space": (b"GET http://h/ HTTP/1.1 \r\n\r\n", 400),
    "method not a token": (b"G(T http://h/ HTTP/1.1\r\n\r\n", 400),
    "method in lower case": (b"get http://h/ HTTP/1.1\r\n\r\n", 501),
    "connect in lower case": (b"connect h:443 HTTP/1.1\r\n\r\n", 501),
    "NUL in target": (b"GET http://h/\x00 HTTP/1.1\r\n\r\n", 400),
    "bare CR in request line": (b"GET http://h/\r HTTP/1.1\r\n\r\n", 400),
    "non-ASCII target": (b"GET http://h/\xc3\xa9 HTTP/1.1\r\n\r\n", 400),
    "not a version": (b"GET http://h/ HTTP/1\r\n\r\n", 400),
    "lower-case version": (b"GET http://h/ http/1.1\r\n\r\n", 400),
    "HTTP/2.0": (b"GET http://h/ HTTP/2.0\r\n\r\n", 505),
    "HTTP/0.9": (b"GET http://h/ HTTP/0.9\r\n\r\n", 505),
    "request line too long": (b"GET http://h/" + b"a" * MAX_LINE + b" HTTP/1.1\r\n\r\n", 414),
    # targets
    "origin form": (b"GET /index.html HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "asterisk form": (b"OPTIONS * HTTP/1.1\r\n\r\n", 400),
    "https URI": (b"GET https://h/ HTTP/1.1\r\n\r\n", 400),
    "ftp URI": (b"GET ftp://h/ HTTP/1.1\r\n\r\n", 400),
    "no scheme": (b"GET h:80 HTTP/1.1\r\n\r\n", 400),
    "userinfo": (b"GET http://user@h/ HTTP/1.1\r\n\r\n", 400),
    "userinfo with password": (b"GET http://u:p@h/ HTTP/1.1\r\n\r\n", 400),
    "fragment": (b"GET http://h/p#frag HTTP/1.1\r\n\r\n", 400),
    "empty host": (b"GET http:///p HTTP/1.1\r\n\r\n", 400),
    "empty port": (b"GET http://h:/p HTTP/1.1\r\n\r\n", 400),
    "port 0": (b"GET http://h:0/ HTTP/1.1\r\n\r\n", 400),
    "port too large": (b"GET http://h:65536/ HTTP/1.1\r\n\r\n", 400),
    "port with sign": (b"GET http://h:+80/ HTTP/1.1\r\n\r\n", 400),
    "percent in host": (b"GET http://h%2e/ HTTP/1.1\r\n\r\n", 400),
    "backslash in host": (b"GET http://h\\@evil/ HTTP/1.1\r\n\r\n", 400),
    "unbracketed IPv6": (b"GET http://::1/ HTTP/1.1\r\n\r\n", 400),
    "IPv6 zone": (b"GET http://[fe80::1%25eth0]/ HTTP/1.1\r\n\r\n", 400),
    "bracketed name": (b"GET http://[example.com]/ HTTP/1.1\r\n\r\n", 400),
    "unclosed bracket": (b"CONNECT [::1:443 HTTP/1.1\r\n\r\n", 400),
    "text after bracket": (b"CONNECT [::1]x:443 HTTP/1.1\r\n\r\n", 400),
    "CONNECT without port": (b"CONNECT example.com HTTP/1.1\r\n\r\n", 400),
    "CONNECT to an URI": (b"CONNECT http://example.com:443/ HTTP/1.1\r\n\r\n", 400),
    "CONNECT to a path": (b"CONNECT /x HTTP/1.1\r\n\r\n", 400),
    "CONNECT port 0": (b"CONNECT h:0 HTTP/1.1\r\n\r\n", 400),
    "CONNECT port 99999": (b"CONNECT h:99999 HTTP/1.1\r\n\r\n", 400),
    "CONNECT long port": (b"CONNECT h:000443 HTTP/1.1\r\n\r\n", 400),
    "CONNECT superscript port": ("CONNECT h:4²3 HTTP/1.1\r\n\r\n".encode("latin-1"), 400),
    # headers
    "obs-fold with space": (b"GET http://h/ HTTP/1.1\r\nA: 1\r\n  continued\r\n\r\n", 400),
    "obs-fold with tab": (b"GET http://h/ HTTP/1.1\r\nA: 1\r\n\tcontinued\r\n\r\n", 400),
    "first header folded": (b"GET http://h/ HTTP/1.1\r\n X: 1\r\n\r\n", 400),
    "no colon": (b"GET http://h/ HTTP/1.1\r\nNoColon\r\n\r\n", 400),
    "empty name": (b"GET http://h/ HTTP/1.1\r\n: v\r\n\r\n", 400),
    "space before colon": (b"GET http://h/ HTTP/1.1\r\nHost : h\r\n\r\n", 400),
    "invalid name char": (b"GET http://h/ HTTP/1.1\r\nX[1]: v\r\n\r\n", 400),
    "non-ASCII name": (b"GET http://h/ HTTP/1.1\r\nX\xe9: v\r\n\r\n", 400),
    "NUL in value": (b"GET http://h/ HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
    "bare CR in value": (b"GET http://h/ HTTP/1.1\r\nX: a\rInjected: b\r\n\r\n", 400),
    "CR CR LF": (b"GET http://h/ HTTP/1.1\r\nX: a\r\r\n\r\n", 400),
    "escape in value": (b"GET http://h/ HTTP/1.1\r\nX: \x1b[31m\r\n\r\n", 400),
    "DEL in value": (b"GET http://h/ HTTP/1.1\r\nX: \x7f\r\n\r\n", 400),
    "conflicting Content-Length": (
        b"POST http://h/ HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        400,
    ),
    "conflicting Content-Length list": (b"POST http://h/ HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\n", 400),
    "negative Content-Length": (b"POST http://h/ HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    "empty Content-Length": (b"POST http://h/ HTTP/1.1\r\nContent-Length:\r\n\r\n", 400),
    "huge Content-Length": (b"POST http://h/ HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 400),
    "superscript Content-Length": (b"POST http://h/ HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n", 400),
    "Transfer-Encoding and Content-Length": (
        b"POST http://h/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        400,
    ),
    "Transfer-Encoding in HTTP/1.0": (b"POST http://h/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    # limits
    "header line too long": (b"GET http://h/ HTTP/1.1\r\nX: " + b"v" * MAX_LINE + b"\r\n\r\n", 431),
    "too many headers": (b"GET http://h/ HTTP/1.1\r\n" + b"X: 1\r\n" * (MAX_HEADERS + 1) + b"\r\n", 431),
}


@pytest.mark.parametrize("data, status", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_heads_are_refused_with_the_right_status(data, status):
    assert status_of(data) == status


def test_a_head_over_the_limit_is_431_whether_complete_or_not():
    filler = b"X: " + b"v" * 1000 + b"\r\n"
    head = b"GET http://h/ HTTP/1.1\r\n" + filler * 17
    assert len(head) > MAX_HEAD
    assert status_of(head) == 431  # no blank line yet
    assert status_of(head + b"\r\n") == 431
    assert status_of(b"x" * MAX_HEAD) == 431
    assert parse_http_head(b"x" * (MAX_HEAD - 1)) is None


# -- credentials -------------------------------------------------------------------


@pytest.mark.parametrize(
    "user_password, expected",
    [
        (b"alice:s3cret", ("alice", "s3cret")),
        (b"bob:pass:with:colons", ("bob", "pass:with:colons")),
        (b":", ("", "")),
        ("zoë:mot de passe é".encode(), ("zoë", "mot de passe é")),
    ],
)
def test_basic_credentials_decode(user_password, expected):
    assert proxy_credentials(parse(request_bytes("CONNECT h:443 HTTP/1.1", basic(user_password)))) == expected


def test_basic_scheme_is_case_insensitive():
    header = "Proxy-Authorization: bAsIc   " + base64.b64encode(b"u:p").decode()
    assert proxy_credentials(parse(request_bytes("CONNECT h:443 HTTP/1.1", header))) == ("u", "p")


def test_no_credentials_is_none():
    assert proxy_credentials(parse(request_bytes("CONNECT h:443 HTTP/1.1", "Authorization: Basic dTpw"))) is None


@pytest.mark.parametrize(
    "headers, status",
    [
        (["Proxy-Authorization: Basic dTpw", "Proxy-Authorization: Basic dTpw"], 400),
        (["Proxy-Authorization: Basic"], 400),
        (["Proxy-Authorization: Basic !!!!"], 400),
        (["Proxy-Authorization: Basic dTpw dTpw"], 400),
        (["Proxy-Authorization: Basic dTp"], 400),  # bad padding
        (["Proxy-Authorization: Basic dTpw="], 400),  # "=" after a complete block
        (["Proxy-Authorization: Basic dTpw=="], 400),
        (["Proxy-Authorization: Basic dTpwcQ="], 400),  # one "=" short
        (["Proxy-Authorization: Basic dTpwcQ"], 400),  # unpadded
        (["Proxy-Authorization: Basic dTpwcXI=="], 400),  # one "=" too many
        (["Proxy-Authorization: Basic dTpwc"], 400),  # one character in the last block
        (["Proxy-Authorization: Basic " + base64.b64encode(b"no colon").decode()], 400),
        (["Proxy-Authorization: Basic " + base64.b64encode(b"u:\xff\xfe").decode()], 400),
        (["Proxy-Authorization: Basic " + base64.b64encode(b"u:p\x00").decode()], 400),
        (["Proxy-Authorization: Basic " + base64.b64encode(b"u\n:p").decode()], 400),
        (["Proxy-Authorization:"], 400),
        (["Proxy-Authorization: Bearer abc"], 407),
        (["Proxy-Authorization: Digest username=u"], 407),
    ],
)
def test_malformed_credentials(headers, status):
    request = parse(request_bytes("CONNECT h:443 HTTP/1.1", *headers))
    with pytest.raises(ProtocolError) as info:
        proxy_credentials(request)
    assert info.value.status == status


# -- forwarding --------------------------------------------------------------------


def test_forward_head_drops_hop_by_hop_headers_and_sets_host_and_connection():
    request = parse(
        request_bytes(
            "POST http://example.com:8080/api?x=1 HTTP/1.0",
            "Host: evil.example",
            "Connection: keep-alive, X-Secret-Hop, Content-Length",
            "Proxy-Connection: keep-alive",
            basic(b"u:p"),
            "Proxy-Authenticate: Basic",
            "Keep-Alive: timeout=5",
            "TE: trailers",
            "Trailer: X-Checksum",
            "Upgrade: websocket",
            "X-Secret-Hop: 1",
            "User-Agent: curl/8",
            "Content-Length: 2",
            "X-Latin1: caf\xe9",
            body=b"hi",
        )
    )
    assert forward_head(request) == (
        b"POST /api?x=1 HTTP/1.0\r\n"  # the client's version: an HTTP/1.0 client cannot read chunks
        b"Host: example.com:8080\r\n"
        b"user-agent: curl/8\r\n"
        b"x-latin1: caf\xe9\r\n"
        b"Content-Length: 2\r\n"  # listed in Connection, yet it frames the body relayed after this head
        b"Connection: close\r\n"
        b"\r\n"
    )


@pytest.mark.parametrize(
    "target, host_header",
    [
        ("http://example.com/", b"Host: example.com\r\n"),
        ("http://example.com:80/", b"Host: example.com\r\n"),
        ("http://[::1]/", b"Host: [::1]\r\n"),
        ("http://[::1]:8080/", b"Host: [::1]:8080\r\n"),
        # The host as the policy saw it, not as the client spelled it.
        ("http://GOOD.Test.:8080/", b"Host: good.test:8080\r\n"),
        ("http://0x7f.1/", b"Host: 127.0.0.1\r\n"),
        ("http://[::FFFF:127.0.0.1]/", b"Host: 127.0.0.1\r\n"),
        ("http://[0:0::1]/", b"Host: [::1]\r\n"),
    ],
)
def test_forward_head_host(target, host_header):
    head = forward_head(parse(request_bytes(f"GET {target} HTTP/1.1")))
    assert head == b"GET / HTTP/1.1\r\n" + host_header + b"Connection: close\r\n\r\n"


def test_forward_head_parses_back_as_the_same_request_to_the_same_place():
    request = parse(request_bytes("GET http://example.com/x HTTP/1.1", "Accept: */*"))
    forwarded = parse_http_head(forward_head(request).replace(b"GET /x", b"GET http://example.com/x"))
    assert (forwarded.host, forwarded.port, forwarded.path) == ("example.com", 80, "/x")
    assert forwarded.header_values("host") == ["example.com"]
    assert forwarded.header_values("connection") == ["close"]


def test_forward_head_refuses_connect():
    with pytest.raises(ValueError):
        forward_head(parse(request_bytes("CONNECT h:443 HTTP/1.1")))


@pytest.mark.parametrize("host", [".", ".0", "a..b"])
def test_forward_head_refuses_a_host_that_has_no_canonical_form(host):
    request = parse(request_bytes(f"GET http://{host}/ HTTP/1.1"))
    with pytest.raises(InvalidHost) as info:
        forward_head(request)
    assert info.value.status == 400 and info.value.host == host


# -- responses ---------------------------------------------------------------------


class _ReplaySocket:
    """Just enough of a socket for http.client to read a response from bytes."""

    def __init__(self, data: bytes) -> None:
        self._file = io.BytesIO(data)

    def makefile(self, mode: str) -> io.BytesIO:
        return self._file


def read_response(data: bytes) -> http.client.HTTPResponse:
    response = http.client.HTTPResponse(_ReplaySocket(data))  # type: ignore[arg-type]
    response.begin()
    return response


def test_http_response_parses_back():
    data = http_response(403, "Forbidden", "example.org is not in the allow list", [("X-Heel-Policy", "deny")])
    response = read_response(data)
    assert (response.status, response.reason, response.version) == (403, "Forbidden", 11)
    assert response.getheader("Content-Type") == "text/plain; charset=utf-8"
    assert response.getheader("Connection") == "close"
    assert response.getheader("X-Heel-Policy") == "deny"
    assert response.read() == b"example.org is not in the allow list\n"
    assert data.endswith(b"list\n")


def test_http_response_body_is_utf8_and_an_empty_body_is_the_reason():
    response = read_response(http_response(502, "Bad Gateway", "résolution échouée\n"))
    assert response.read().decode("utf-8") == "résolution échouée\n"
    assert read_response(http_response(400, "Bad Request")).read() == b"Bad Request\n"


def test_407_asks_for_basic_credentials():
    response = read_response(http_response(407, "Proxy Authentication Required"))
    assert response.getheader("Proxy-Authenticate") == 'Basic realm="heel"'
    own = read_response(http_response(407, "Proxy Authentication Required", headers=[("Proxy-Authenticate", "X")]))
    assert own.getheaders().count(("Proxy-Authenticate", "X")) == 1
    assert own.getheader("Proxy-Authenticate") == "X"


def test_http_response_answers_a_protocol_error():
    with pytest.raises(ProtocolError) as info:
        parse_http_head(b"GET /index.html HTTP/1.1\r\n\r\n")
    response = read_response(http_response(info.value.status, "Bad Request", str(info.value)))
    assert response.status == 400 and b"proxy" in response.read()


@pytest.mark.parametrize(
    "status, reason, headers",
    [
        (99, "Low", ()),
        (600, "High", ()),
        ("200", "OK", ()),
        (200, "OK\r\nX: injected", ()),
        (200, "caf\xe9", ()),
        (200, "OK", [("X", "a\r\nb")]),
        (200, "OK", [("Bad Name", "v")]),
        (200, "OK", [("Content-Length", "0")]),
        (200, "OK", [("connection", "keep-alive")]),
    ],
)
def test_http_response_refuses_what_cannot_go_in_a_head(status, reason, headers):
    with pytest.raises(ValueError):
        http_response(status, reason, headers=headers)


def test_connect_established_parses_back():
    response = read_response(CONNECT_ESTABLISHED)
    assert (response.status, response.reason) == (200, "Connection established")


# -- SOCKS5 ------------------------------------------------------------------------

GREETING_NO_AUTH = b"\x05\x01\x00"
GREETING_BOTH = b"\x05\x02\x00\x02"


def user_password(user: bytes, password: bytes) -> bytes:
    return bytes([1, len(user)]) + user + bytes([len(password)]) + password


def connect_request(atyp: int, address: bytes, port: int, command: int = 1) -> bytes:
    if atyp == ATYP_DOMAIN:
        address = bytes([len(address)]) + address
    return bytes([5, command, 0, atyp]) + address + port.to_bytes(2, "big")


def run_handshake(handshake: Socks5Handshake, data: bytes, auth_ok: bool = True) -> list[object]:
    """Feed *data* in one piece, and collect events up to NEED_DATA or the end,
    answering SocksAuth with *auth_ok* (the answer's bytes are recorded)."""
    handshake.receive_data(data)
    return drain(handshake, auth_ok)


def drain(handshake: Socks5Handshake, auth_ok: bool = True) -> list[object]:
    events: list[object] = []
    while True:
        event = handshake.next_event()
        events.append(event)
        if isinstance(event, SocksAuth):
            events.append(handshake.accept_auth(auth_ok))
            if not auth_ok:
                return events
        elif not isinstance(event, SocksReply):
            return events


def test_socks5_without_authentication():
    handshake = Socks5Handshake(require_auth=False)
    assert run_handshake(handshake, GREETING_NO_AUTH) == [SocksReply(b"\x05\x00"), NEED_DATA]
    request = connect_request(ATYP_DOMAIN, b"pypi.org", 443)
    assert run_handshake(handshake, request) == [SocksConnect("pypi.org", 443, ATYP_DOMAIN)]
    assert handshake.trailing_data == b""


def test_socks5_prefers_username_password_even_when_not_required():
    handshake = Socks5Handshake(require_auth=False)
    data = GREETING_BOTH + user_password(b"agent", b"") + connect_request(ATYP_IPV4, bytes([10, 0, 0, 1]), 80)
    assert run_handshake(handshake, data) == [
        SocksReply(b"\x05\x02"),
        SocksAuth("agent", ""),
        b"\x01\x00",
        SocksConnect("10.0.0.1", 80, ATYP_IPV4),
    ]


def test_socks5_with_accepted_credentials_and_early_data():
    handshake = Socks5Handshake(require_auth=True)
    ipv6 = bytes(15) + b"\x01"
    data = GREETING_BOTH + user_password("zoë".encode(), b"secret") + connect_request(ATYP_IPV6, ipv6, 443)
    events = run_handshake(handshake, data + b"\x16\x03\x01early")
    assert events == [
        SocksReply(b"\x05\x02"),
        SocksAuth("zoë", "secret"),
        b"\x01\x00",
        SocksConnect("::1", 443, ATYP_IPV6),
    ]
    assert handshake.trailing_data == b"\x16\x03\x01early"
    handshake.receive_data(b" and later")
    assert handshake.trailing_data == b"\x16\x03\x01early and later"
    assert "secret" not in repr(events[1])


def test_socks5_with_rejected_credentials():
    handshake = Socks5Handshake(require_auth=True)
    events = run_handshake(handshake, GREETING_BOTH + user_password(b"u", b"wrong"), auth_ok=False)
    assert events == [SocksReply(b"\x05\x02"), SocksAuth("u", "wrong"), b"\x01\x01"]
    with pytest.raises(RuntimeError):
        handshake.next_event()


def test_socks5_requiring_auth_refuses_a_client_without_it():
    handshake = Socks5Handshake(require_auth=True)
    assert run_handshake(handshake, GREETING_NO_AUTH) == [SocksFailed(b"\x05\xff")]


def test_socks5_without_a_common_method():
    handshake = Socks5Handshake(require_auth=False)
    assert run_handshake(handshake, b"\x05\x02\x01\x80") == [SocksFailed(b"\x05\xff")]


@pytest.mark.parametrize(
    "atyp, address, host",
    [
        (ATYP_IPV4, bytes([192, 0, 2, 7]), "192.0.2.7"),
        (ATYP_IPV6, bytes.fromhex("20010db8000000000000000000000001"), "2001:db8::1"),
        (ATYP_DOMAIN, b"files.pythonhosted.org", "files.pythonhosted.org"),
        (ATYP_DOMAIN, b"1.2.3.4", "1.2.3.4"),
        (ATYP_DOMAIN, b"a" * 255, "a" * 255),
    ],
)
def test_socks5_targets(atyp, address, host):
    handshake = Socks5Handshake(require_auth=False)
    events = run_handshake(handshake, GREETING_NO_AUTH + connect_request(atyp, address, 65535))
    assert events[-1] == SocksConnect(host, 65535, atyp)


@pytest.mark.parametrize("command", [2, 3, 0, 9])  # BIND, UDP ASSOCIATE, nonsense
def test_socks5_commands_other_than_connect_are_not_supported(command):
    handshake = Socks5Handshake(require_auth=False)
    events = run_handshake(handshake, GREETING_NO_AUTH + connect_request(ATYP_IPV4, bytes(4), 53, command))
    assert events[-1] == SocksFailed(socks5_reply(COMMAND_NOT_SUPPORTED))
    assert events[-1].data[1] == 7


@pytest.mark.parametrize("atyp", [0, 2, 5, 255])
def test_socks5_unknown_address_types_are_not_supported(atyp):
    handshake = Socks5Handshake(require_auth=False)
    events = run_handshake(handshake, GREETING_NO_AUTH + bytes([5, 1, 0, atyp]))
    assert events[-1] == SocksFailed(socks5_reply(ADDRESS_TYPE_NOT_SUPPORTED))


@pytest.mark.parametrize("require_auth", [False, True])
def test_socks5_byte_by_byte(require_auth):
    data = GREETING_BOTH + user_password(b"user", b"pw") + connect_request(ATYP_DOMAIN, b"example.com", 443) + b"x"
    handshake = Socks5Handshake(require_auth)
    events = []
    for i in range(len(data)):
        handshake.receive_data(data[i : i + 1])
        events += [event for event in drain(handshake) if event is not NEED_DATA]
        if events and isinstance(events[-1], SocksConnect):
            break
    assert events == [
        SocksReply(b"\x05\x02"),
        SocksAuth("user", "pw"),
        b"\x01\x00",
        SocksConnect("example.com", 443, ATYP_DOMAIN),
    ]
    handshake.receive_data(data[i + 1 :])
    assert handshake.trailing_data == b"x"


MALFORMED_SOCKS = {
    "SOCKS4": b"\x04\x01\x00\x50\x01\x02\x03\x04\x00",
    "HTTP": b"GET / HTTP/1.1\r\n\r\n",
    "no methods": b"\x05\x00",
    "auth version": b"\x05\x01\x02\x05",
    "request version": GREETING_NO_AUTH + b"\x04\x01\x00\x01",
    "empty name": GREETING_NO_AUTH + connect_request(ATYP_DOMAIN, b"", 443),
    "NUL in name": GREETING_NO_AUTH + connect_request(ATYP_DOMAIN, b"evil.com\x00.allowed.org", 443),
    "non-ASCII name": GREETING_NO_AUTH + connect_request(ATYP_DOMAIN, "bücher.de".encode(), 443),
    "space in name": GREETING_NO_AUTH + connect_request(ATYP_DOMAIN, b"a b", 443),
    "port 0": GREETING_NO_AUTH + connect_request(ATYP_IPV4, bytes(4), 0),
    "user not UTF-8": GREETING_BOTH + user_password(b"\xff", b"p"),
}


@pytest.mark.parametrize("data", MALFORMED_SOCKS.values(), ids=MALFORMED_SOCKS.keys())
def test_socks5_malformed(data):
    handshake = Socks5Handshake(require_auth=False)
    with pytest.raises(ProtocolError):
        run_handshake(handshake, data)
    with pytest.raises(ProtocolError):  # the handshake stays broken
        handshake.next_event()


def test_socks5_wrong_version_fails_on_the_first_byte():
    handshake = Socks5Handshake(require_auth=False)
    handshake.receive_data(b"G")
    with pytest.raises(ProtocolError):
        handshake.next_event()


def test_socks5_usage_errors():
    handshake = Socks5Handshake(require_auth=True)
    with pytest.raises(RuntimeError):
        handshake.accept_auth(True)
    handshake.receive_data(GREETING_BOTH + user_password(b"u", b"p"))
    assert handshake.next_event() == SocksReply(b"\x05\x02")
    assert handshake.next_event() == SocksAuth("u", "p")
    with pytest.raises(RuntimeError):  # the auth decision is due first
        handshake.next_event()


@pytest.mark.parametrize(
    "args, expected",
    [
        ((SUCCEEDED,), b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"),
        ((NOT_ALLOWED, "10.1.2.3", 8080), b"\x05\x02\x00\x01\x0a\x01\x02\x03\x1f\x90"),
        ((SUCCEEDED, "::1", 1), b"\x05\x00\x00\x04" + bytes(15) + b"\x01\x00\x01"),
        ((SUCCEEDED, "proxy.local", 2), b"\x05\x00\x00\x03\x0bproxy.local\x00\x02"),
    ],
)
def test_socks5_reply(args, expected):
    assert socks5_reply(*args) == expected


@pytest.mark.parametrize(
    "args", [(-1,), (256,), (0, "0.0.0.0", 65536), (0, "0.0.0.0", -1), (0, "bad name"), (0, "a" * 256)]
)
def test_socks5_reply_refuses_bad_arguments(args):
    with pytest.raises(ValueError):
        socks5_reply(*args)


# -- hostile input -----------------------------------------------------------------

_token = st.text(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~", min_size=1, max_size=12)
_host = st.text(string.ascii_lowercase[:8] + string.digits[:4] + ".-_", min_size=1, max_size=20)
_path = st.text("abcxyz0123/?=&%-._~!$'()*+,;:@", max_size=30).map(lambda p: "/" + p)
_header_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"), max_size=30)
_headers = st.lists(
    st.tuples(_token.filter(lambda n: n.lower() not in ("content-length", "transfer-encoding")), _header_value),
    max_size=6,
)


@st.composite
def valid_requests(draw) -> tuple[bytes, dict]:
    """A valid request with its body, and the fields it must parse to."""
    host = draw(_host)
    port = draw(st.none() | st.integers(1, 65535))
    headers = draw(_headers)
    if draw(st.booleans()):
        method, path, target = "CONNECT", "", f"{host}:{port or 443}"
    else:
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "M-SEARCH"]))
        path = draw(_path)
        target = f"http://{host}{'' if port is None else f':{port}'}{path}"
    line_end = draw(st.sampled_from(["\r\n", "\n"]))
    lines = [f"{method} {target} HTTP/1.1"] + [f"{name}: {value}" for name, value in headers]
    head = (line_end.join(lines) + line_end * 2).encode("latin-1")
    body = draw(st.binary(max_size=20))
    expected = {
        "method": method,
        "target": target,
        "host": host,
        "port": port or (443 if method == "CONNECT" else 80),
        "path": path,
        "headers": tuple((name.lower(), value.strip(" \t")) for name, value in headers),
        "head_length": len(head),
    }
    return head + body, expected


@FUZZ
@given(valid_requests(), st.data())
def test_a_valid_request_parses_the_same_however_it_is_split(request_and_fields, data):
    raw, expected = request_and_fields
    whole = parse(raw)
    assert {field: getattr(whole, field) for field in expected} == expected
    cut = data.draw(st.integers(0, len(raw)))
    prefix = parse_http_head(raw[:cut])
    assert prefix is None if cut < whole.head_length else prefix == whole


def _mutations(raw: bytes, edits: list[tuple[int, bytes]]) -> bytes:
    data = bytearray(raw)
    for position, replacement in edits:
        position %= len(data) + 1
        data[position : position + len(replacement) // 2] = replacement
    return bytes(data)


def _prefixed(prefixes: list, rest: st.SearchStrategy, suffix) -> st.SearchStrategy:
    return st.tuples(st.sampled_from(prefixes), rest).map(lambda parts: parts[0] + parts[1] + suffix)


_edits = st.lists(st.tuples(st.integers(0, 400), st.binary(max_size=4)), min_size=1, max_size=4)

http_noise = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=200).map(lambda b: b + b"\r\n\r\n"),
    _prefixed([b"GET http://", b"CONNECT ", b"POST http://h/ HTTP/1.1\r\n"], st.binary(max_size=200), b"\r\n\r\n"),
    # targets made of the characters that authorities are parsed by
    _prefixed(["CONNECT ", "GET ", "GET http://"], st.text("[]:@/?#%.0123456789abcdefhtpsx-_", max_size=30),
              " HTTP/1.1\r\n\r\n").map(str.encode),
    st.tuples(valid_requests(), _edits).map(lambda args: _mutations(args[0][0], args[1])),
)


def _parse_credentials_and_forward(data: bytes) -> None:
    request = parse_http_head(data)
    if request is None:
        return
    proxy_credentials(request)
    if request.method != "CONNECT":
        assert parse_http_head(forward_head(request).replace(b" ", b" http://h", 1)) is not None


@FUZZ
@given(http_noise)
def test_arbitrary_bytes_into_the_http_parser_raise_only_protocol_errors(data):
    try:
        _parse_credentials_and_forward(data)
    except ProtocolError as error:
        assert error.status in (400, 407, 414, 431, 501, 505)


@FUZZ
@given(st.binary(max_size=120).map(lambda b: base64.b64encode(b).decode()) | st.text(max_size=40))
def test_arbitrary_credentials_raise_only_protocol_errors(credentials):
    header = f"Proxy-Authorization: Basic {credentials}".encode("utf-8")
    try:
        _parse_credentials_and_forward(b"CONNECT h:1 HTTP/1.1\r\n" + header + b"\r\n\r\n")
    except ProtocolError:
        pass


socks_noise = st.one_of(
    st.binary(max_size=300),
    st.tuples(
        st.sampled_from([b"", GREETING_NO_AUTH, GREETING_BOTH, GREETING_BOTH + user_password(b"u", b"p")]),
        st.binary(max_size=300),
    ).map(lambda parts: parts[0] + parts[1]),
)


@FUZZ
@given(socks_noise, st.lists(st.integers(1, 50), max_size=10), st.booleans(), st.booleans())
def test_arbitrary_bytes_into_socks5_raise_only_protocol_errors(data, chunk_sizes, require_auth, auth_ok):
    handshake = Socks5Handshake(require_auth)
    chunks, start = [], 0
    for size in chunk_sizes:
        chunks.append(data[start : start + size])
        start += size
    chunks.append(data[start:])
    events: list[object] = []
    try:
        for chunk in chunks:
            handshake.receive_data(chunk)
            events += drain(handshake, auth_ok)
            if not events or events[-1] is not NEED_DATA:
                break
    except ProtocolError:
        return
    final = events[-1]
    assert final is NEED_DATA or isinstance(final, (SocksConnect, SocksFailed, bytes))
    if isinstance(final, SocksConnect):
        assert 1 <= final.port <= 65535 and final.host


@FUZZ
@given(st.binary(min_size=1, max_size=255), st.integers(1, 65535), st.data())
def test_a_valid_socks5_handshake_gives_the_same_events_however_it_is_split(name, port, data):
    name = bytes(b"abcdefghijklmnopqrstuvwxyz0123456789.-_"[byte % 39] for byte in name)
    raw = GREETING_BOTH + user_password(b"u", b"p") + connect_request(ATYP_DOMAIN, name, port) + b"tail"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=6)))
    handshake = Socks5Handshake(require_auth=True)
    events: list[object] = []
    for start, end in zip([0, *cuts], [*cuts, len(raw)]):
        handshake.receive_data(raw[start:end])
        if not events or not isinstance(events[-1], SocksConnect):
            events += [event for event in drain(handshake) if event is not NEED_DATA]
    assert events == [SocksReply(b"\x05\x02"), SocksAuth("u", "p"), b"\x01\x00", SocksConnect(name.decode(), port, 3)]
    assert handshake.trailing_data == b"tail"


def test_a_head_trickled_a_byte_at_a_time_is_searched_once():
    """parse_http_head and parse_response_head resume their search where the
    last call stopped, also when the blank line straddles two reads; each
    head comes out the same as when parsed whole."""
    from heel import _proxy_protocol as proto

    request = (b"GET http://example.test/x HTTP/1.1\r\nHost: example.test\r\n"
               + b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 40) for i in range(90)) + b"\r\nBODY")
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 4\n\nBODY"
    for data, parse in ((request, proto.parse_http_head), (response, proto.parse_response_head)):
        whole = parse(data)
        assert whole is not None
        for split in range(1, len(data) - 3):
            buf, searched = bytearray(data[:split]), 0
            found = parse(buf, searched)
            if found is None:
                searched = len(buf)
                buf += data[split:]
                found = parse(buf, searched)
            assert found == whole, split


def test_a_trickled_head_costs_its_length_in_searching():
    """A head of 15 KiB (MAX_HEAD is 16), one byte per read: the search
    looks at each byte a bounded number of times, where searching from the
    start each time looked at some 120 million."""
    import re

    from heel import _proxy_protocol as proto

    looked = [0]

    class Counting:
        def search(self, buf, start, end):
            looked[0] += min(end, len(buf)) - start
            return re.compile(rb"\n\r?\n").search(buf, start, end)

    data = b"GET http://example.test/ HTTP/1.1\r\n" + b"A: %s\r\n" % (b"b" * 150) * 99 + b"\r\n"
    original = proto._HEAD_END
    proto._HEAD_END = Counting()
    try:
        buf, searched = bytearray(), 0
        for byte in data:
            buf.append(byte)
            request = proto.parse_http_head(buf, searched)
            searched = len(buf)
        assert request is not None and request.head_length == len(data)
    finally:
        proto._HEAD_END = original
    assert looked[0] <= 4 * len(data), looked[0]
