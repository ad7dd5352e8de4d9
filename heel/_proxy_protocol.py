"""The network proxy's side of the wire, without I/O: bytes in, requests out (in the manner of h11).

The proxy on the host accepts a connection from the sandbox and reads its first
bytes.  :func:`is_socks5` decides what follows: a first byte of ``0x05`` starts
a SOCKS5 handshake, anything else an HTTP request head.  Nothing here touches a
socket, a resolver or the policy, so every parser can be fuzzed and tested on
its own; the proxy does the reading, writing, asking and connecting.

HTTP (CONNECT tunnels and plain ``http://`` forwarding)::

    buffer += await stream.receive_some()
    request = parse_http_head(buffer)       # None: read more and call again
    body_start = buffer[request.head_length:]
    user = proxy_credentials(request)       # when the proxy asks who is calling
    ... ask the policy about request.host, request.port ...
    CONNECT:  send CONNECT_ESTABLISHED, then relay both ways, starting with body_start
    other:    connect to host:port, send forward_head(request) + body_start
              (and the rest of a Content-Length body), then read the answer:
              response = parse_response_head(answer)   # None: read more
              send forward_response_head(response); a 1xx is interim, read the next
              length = response_body_length(response, request.method)
              pass on `length` bytes (None: until the server closes), close

SOCKS5 (RFC 1928 CONNECT only, with RFC 1929 username/password)::

    handshake = Socks5Handshake(require_auth)
    loop: event = handshake.next_event()
        NEED_DATA        read more, handshake.receive_data(data)
        SocksReply       send event.data, go on
        SocksAuth        send handshake.accept_auth(ok), go on (on False: close)
        SocksFailed      send event.data, close
        SocksConnect     ask the policy, connect, send socks5_reply(code),
                         then relay, starting with handshake.trailing_data

What goes wrong, and who answers what:

- :class:`ProtocolError` from :func:`parse_http_head` or
  :func:`proxy_credentials`: the client sent something this proxy will not
  act on.  Answer ``http_response(error.status, ...)`` with ``str(error)`` as
  the body and close.  ``status`` is 400 for a malformed request (and for a
  well-formed one this proxy refuses to read, such as an ``https://`` URI or
  an origin-form target), 407 for a proxy authentication scheme other than
  Basic, 414 for a request line over :data:`MAX_LINE`, 431 for a head over
  :data:`MAX_HEAD`, a header line over :data:`MAX_LINE` or more than
  :data:`MAX_HEADERS` headers, 501 for a method in lower case, 505 for an
  HTTP version other than 1.0 and 1.1.
- :class:`ProtocolError` from :meth:`Socks5Handshake.next_event`: the peer
  does not speak SOCKS5 (or sent a request that cannot be read, such as a
  name with non-ASCII bytes); close without an answer.  ``status`` is 400 and
  means nothing here.  The error repeats on every later call.
- :class:`SocksFailed`: the client spoke SOCKS5 but asked for something this
  proxy does not do (no acceptable authentication method, a command other
  than CONNECT, an unknown address type); send its bytes, which say so in
  SOCKS5 terms, and close.
- The policy's answer, a failed connection, a refused password: the proxy
  decides, and answers with :func:`http_response` or :func:`socks5_reply`.
- ``ValueError`` and ``RuntimeError`` only ever mean that the caller misused
  this module (a bad status code, :meth:`Socks5Handshake.next_event` while an
  authentication decision is pending); no byte from a client causes them.

Hosts come out as written, checked for syntax only: a name of letters,
digits, ``.``, ``-`` and ``_``, or an IP address.  The proxy canonicalises and
validates them before it asks the policy.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from typing import Iterable, NamedTuple, Union

from ._netaddr import normalize_host, parse_port

__all__ = [
    "MAX_HEAD",
    "MAX_HEADERS",
    "MAX_LINE",
    "ProtocolError",
    "is_socks5",
    "HttpRequest",
    "parse_http_head",
    "proxy_credentials",
    "forward_head",
    "MAX_RESPONSE_HEAD",
    "HttpResponse",
    "parse_response_head",
    "response_body_length",
    "forward_response_head",
    "http_response",
    "CONNECT_ESTABLISHED",
    "SUCCEEDED",
    "GENERAL_FAILURE",
    "NOT_ALLOWED",
    "NETWORK_UNREACHABLE",
    "HOST_UNREACHABLE",
    "CONNECTION_REFUSED",
    "TTL_EXPIRED",
    "COMMAND_NOT_SUPPORTED",
    "ADDRESS_TYPE_NOT_SUPPORTED",
    "ATYP_IPV4",
    "ATYP_DOMAIN",
    "ATYP_IPV6",
    "NEED_DATA",
    "SocksReply",
    "SocksAuth",
    "SocksConnect",
    "SocksFailed",
    "Socks5Handshake",
    "socks5_reply",
]

MAX_HEAD = 16384  #: bytes in a request head, up to and including the blank line
MAX_HEADERS = 100  #: header lines in a request head
MAX_LINE = 8192  #: bytes in the request line or in one header line, without its line end


class ProtocolError(Exception):
    """The client sent what the proxy will not act on.

    ``status`` is the HTTP status to answer with (see the module docstring);
    ``str(error)`` says what was wrong, fit to send back as the body.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class InvalidHost(ProtocolError):
    """The request names something that is no host name or address (a NUL,
    a zone id, a character outside letters, digits, '.', '-', '_'): refused
    as malformed, and reported by the proxy as a denied request too.

    ``host``: what the request named (as text, not to be trusted); ``port``:
    its port when that could be read, else 0; ``request``: for HTTP, the
    rest of the head (its proxy credential says whose request it was)."""

    def __init__(self, message: str, host: str, port: int = 0) -> None:
        super().__init__(message)
        self.host = host
        self.port = port
        self.request: HttpRequest | None = None


def is_socks5(first_bytes: bytes | bytearray) -> bool:
    """Whether a connection that started with *first_bytes* speaks SOCKS5 (else HTTP)."""
    return first_bytes[:1] == b"\x05"


# -- HTTP ------------------------------------------------------------------------

_HEAD_END = re.compile(rb"\n\r?\n")  # the blank line, after CRLF or a bare LF
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # every control character but HTAB
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token: methods, header names
_TARGET = re.compile(r"[\x21-\x7e]+")  # visible ASCII: a request target is never raw UTF-8
_VERSION = re.compile(r"HTTP/[0-9]\.[0-9]")
_DIGITS = re.compile(r"[0-9]+")  # str.isdigit() would take "²" as a digit
_HOST_NAME = re.compile(r"[A-Za-z0-9._-]+")
_IPV6_TEXT = re.compile(r"[0-9A-Fa-f:.]+")  # no "%zone": a scope names an interface of the host
# Padded base64 (RFC 4648 section 4), as RFC 7617 has Basic credentials: whole
# blocks of four, the last padded with "=" only where it is short.  Python's
# b64decode(validate=True) also takes "=" after a complete block ("dTpw=").
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_SUPPORTED_VERSIONS = ("HTTP/1.0", "HTTP/1.1")
_MAX_CONTENT_LENGTH_DIGITS = 19  # int() refuses thousands of digits; no body is that long anyway

# Headers that concern one connection, never forwarded (RFC 9110 section 7.6.1),
# and Host, which forward_head writes itself.
_NOT_FORWARDED = frozenset(
    {
        "connection",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "host",
    }
)
# The body is relayed as the client framed it, so what frames it goes upstream
# even when a Connection header lists it: dropping it would make the upstream
# server read the body as a second request.
_BODY_FRAMING = frozenset({"content-length", "transfer-encoding"})


class HttpRequest(NamedTuple):
    """A request head, parsed and checked.

    ``host`` is the target's host as written (an IPv6 address without its
    brackets), ``port`` its port (80 when an ``http://`` URI names none),
    ``path`` the origin-form path and query to send upstream (``""`` for
    CONNECT).  ``headers`` keeps the order and the values as sent, names in
    lower case; header values are decoded as Latin-1, so encoding them as
    Latin-1 gives back the bytes sent.  ``head_length`` is the number of bytes
    the head took: what follows it is body or tunnel data.
    """

    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]
    host: str
    port: int
    path: str
    head_length: int

    def header_values(self, name: str) -> list[str]:
        """The values of every header called *name* (any case), in order."""
        name = name.lower()
        return [value for header, value in self.headers if header == name]

    def __repr__(self) -> str:
        # A request is the kind of thing one logs; its proxy password is not.
        headers = tuple(
            (name, "<redacted>" if name == "proxy-authorization" else value) for name, value in self.headers
        )
        fields = self._replace(headers=headers)._asdict()
        return "HttpRequest(" + ", ".join(f"{name}={value!r}" for name, value in fields.items()) + ")"


def parse_http_head(buf: bytes | bytearray, searched: int = 0) -> HttpRequest | None:
    """The request whose head starts *buf*, or None while the head is incomplete.

    *searched*: how much of *buf* an earlier call found incomplete; the
    search for the head's end resumes there, so that a head trickled in a
    byte at a time costs its length in searching, not its square.

    The head ends at the first blank line; lines end with CRLF or a bare LF.
    Bytes after the head are left alone (see ``head_length``).  Raises
    :class:`ProtocolError` for a malformed head, or one longer than
    :data:`MAX_HEAD` (status 431), complete or not.

    Request targets: CONNECT takes ``host:port`` or ``[ipv6]:port``; every
    other method an absolute ``http://host[:port][/path][?query]`` URI without
    user information.  A fragment (``#...``) is refused rather than dropped, so
    that the path sent upstream is exactly the one the client wrote.
    """
    head_length = _find_head_end(buf, searched)
    if head_length is None:
        return None
    lines = _split_lines(bytes(buf[:head_length]))
    method, target, version = _parse_request_line(lines[0])
    headers = _parse_headers(lines[1:])
    _check_body_framing(headers, version)
    try:
        if method == "CONNECT":
            host, port = _parse_authority(target, default_port=None)
            path = ""
        else:
            host, port, path = _parse_absolute_uri(target)
    except InvalidHost as exc:
        exc.request = HttpRequest(method, target, version, headers, exc.host, exc.port, "", head_length)
        raise
    return HttpRequest(method, target, version, headers, host, port, path, head_length)


def _find_head_end(buf: bytes | bytearray, searched: int = 0) -> int | None:
    # Search only where a head may end: a client that never sends the blank
    # line costs MAX_HEAD bytes of searching, not the whole of its stream.
    # The blank line is up to 3 bytes long: one that straddles what was
    # searched before starts at most 2 bytes before its end.
    blank_line = _HEAD_END.search(buf, max(0, searched - 2), MAX_HEAD)
    if blank_line is not None:
        return blank_line.end()
    if len(buf) >= MAX_HEAD:
        raise ProtocolError(f"the request head is longer than {MAX_HEAD} bytes", 431)
    return None


def _split_lines(head: bytes) -> list[bytes]:
    """The request line and the header lines of *head*, without their line ends."""
    # The head ends with "\n" + ("\r")? + "\n": splitting on "\n" leaves the
    # blank line and an empty remainder as the last two items.
    lines = head.split(b"\n")[:-2]
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def _parse_request_line(line: bytes) -> tuple[str, str, str]:
    if len(line) > MAX_LINE:
        raise ProtocolError(f"the request line is longer than {MAX_LINE} bytes", 414)
    if _CONTROL.search(line):
        raise ProtocolError("the request line holds a control character")
    parts = line.decode("latin-1").split(" ")
    if len(parts) != 3 or not all(parts):
        raise ProtocolError("the request line is not METHOD SP TARGET SP VERSION")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise ProtocolError(f"the method {method[:40]!r} is not a token")
    if method != method.upper():
        # Methods are case-sensitive: "connect" is not CONNECT, and guessing
        # which one the client meant is how proxies and servers come to disagree.
        raise ProtocolError(f"the method {method[:40]!r} is not implemented here (methods are upper case)", 501)
    if not _TARGET.fullmatch(target):
        raise ProtocolError("the request target holds a character other than visible ASCII")
    if not _VERSION.fullmatch(version):
        raise ProtocolError(f"{version[:20]!r} is not an HTTP version")
    if version not in _SUPPORTED_VERSIONS:
        raise ProtocolError(f"{version} is not supported: this proxy speaks HTTP/1.0 and HTTP/1.1", 505)
    return method, target, version


def _parse_headers(lines: list[bytes]) -> tuple[tuple[str, str], ...]:
    if len(lines) > MAX_HEADERS:
        raise ProtocolError(f"the request has more than {MAX_HEADERS} headers", 431)
    return tuple(_parse_header_line(line) for line in lines)


def _parse_header_line(line: bytes) -> tuple[str, str]:
    if len(line) > MAX_LINE:
        raise ProtocolError(f"a header line is longer than {MAX_LINE} bytes", 431)
    if line[:1] in (b" ", b"\t"):
        # obs-fold: continuation lines are read differently by different
        # servers, which is what request smuggling is made of.
        raise ProtocolError("a header line starts with white space (folded headers are not accepted)")
    if _CONTROL.search(line):
        raise ProtocolError("a header line holds a control character")
    name, colon, value = line.decode("latin-1").partition(":")
    if not colon:
        raise ProtocolError(f"the header line {name[:40]!r} has no colon")
    if not _TOKEN.fullmatch(name):
        raise ProtocolError(f"the header name {name[:40]!r} is not a token")
    return name.lower(), value.strip(" \t")


def _check_body_framing(headers: tuple[tuple[str, str], ...], version: str) -> None:
    # A body whose length two parties read differently smuggles a request past
    # the proxy: refuse every head whose framing is ambiguous (RFC 9112 6.1, 6.3).
    lengths = [value for name, value in headers if name == "content-length"]
    chunked = any(name == "transfer-encoding" for name, _ in headers)
    if chunked and lengths:
        raise ProtocolError("the request has both Transfer-Encoding and Content-Length")
    if chunked and version == "HTTP/1.0":
        raise ProtocolError("an HTTP/1.0 request cannot use Transfer-Encoding")
    if lengths:
        items = [item.strip(" \t") for value in lengths for item in value.split(",")]
        if not all(_DIGITS.fullmatch(item) and len(item) <= _MAX_CONTENT_LENGTH_DIGITS for item in items):
            raise ProtocolError("a Content-Length is not a number of bytes")
        if len({int(item) for item in items}) > 1:
            raise ProtocolError("the request has Content-Lengths that disagree")


def _parse_absolute_uri(target: str) -> tuple[str, int, str]:
    """The host, port and origin-form path of an ``http://`` request target."""
    if target.startswith("/") or target == "*":
        raise ProtocolError(
            "this is a proxy: ask for an absolute URI (http://host/path), or CONNECT host:port for a tunnel"
        )
    if "#" in target:
        raise ProtocolError("the request target holds a fragment (#...), which is never sent to a server")
    scheme, separator, rest = target.partition("://")
    scheme = scheme.lower()
    if not separator:
        raise ProtocolError(f"the request target {target[:80]!r} is not an absolute http:// URI")
    if scheme == "https":
        raise ProtocolError("for an https:// URI, open a tunnel with CONNECT host:443")
    if scheme != "http":
        raise ProtocolError(f"this proxy forwards only http:// URIs, not {scheme[:20]}://")
    authority_end = len(rest)
    for delimiter in "/?":
        found = rest.find(delimiter)
        if found != -1:
            authority_end = min(authority_end, found)
    authority, path = rest[:authority_end], rest[authority_end:]
    if "@" in authority:
        # user@host: the name before the @ is what a reader sees first.
        raise ProtocolError("the URI holds user information (user@host), which this proxy does not forward")
    host, port = _parse_authority(authority, default_port=80)
    if not path.startswith("/"):
        path = "/" + path
    return host, port, path


def _parse_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """The host and port of ``host[:port]`` or ``[ipv6][:port]``; the port is
    required when *default_port* is None (CONNECT)."""
    if authority.startswith("["):
        close = authority.find("]")
        if close == -1:
            raise ProtocolError(f"the address {authority[:80]!r} has no closing bracket")
        host, after_host = authority[1:close], authority[close + 1 :]
        if not _is_ipv6_address(host):
            raise InvalidHost(f"{host[:80]!r} in brackets is not an IPv6 address", host,
                              _port_if_any(after_host, default_port))
    else:
        if authority.count(":") > 1:
            raise InvalidHost(f"{authority[:80]!r}: an IPv6 address is written in brackets, [::1]:443", authority)
        host, colon, port_text = authority.partition(":")
        after_host = colon + port_text
        if not _HOST_NAME.fullmatch(host):
            raise InvalidHost(f"{host[:80]!r} is not a host name (letters, digits, '.', '-', '_')", host,
                              _port_if_any(after_host, default_port))
    if after_host.startswith(":"):
        return host, _parse_port(after_host[1:])
    if after_host:
        raise ProtocolError(f"{authority[:80]!r} has text after the host that is not a :port")
    if default_port is None:
        raise ProtocolError(f"CONNECT needs host:port, not {authority[:80]!r}")
    return host, default_port


def _port_if_any(after_host: str, default_port: int | None) -> int:
    """The port of an authority whose host is invalid, for its event (0: none)."""
    if after_host.startswith(":"):
        return parse_port(after_host[1:]) or 0
    return default_port or 0


def _is_ipv6_address(text: str) -> bool:
    if not _IPV6_TEXT.fullmatch(text):
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _parse_port(text: str) -> int:
    port = parse_port(text)
    if port is None:
        raise ProtocolError(f"the port {text[:20]!r} is not a number from 1 to 65535")
    return port


def proxy_credentials(request: HttpRequest) -> tuple[str, str] | None:
    """The ``(user, password)`` of the request's ``Proxy-Authorization: Basic ...``,
    or None when it has none.

    Raises :class:`ProtocolError` with status 400 when the header is malformed
    (repeated, not base64, not UTF-8, no colon, control characters), and with
    status 407 when it uses a scheme other than Basic, so that the answer asks
    for Basic.
    """
    values = request.header_values("proxy-authorization")
    if not values:
        return None
    if len(values) > 1:
        raise ProtocolError("the request has more than one Proxy-Authorization header")
    scheme, _, credentials = values[0].partition(" ")
    if not _TOKEN.fullmatch(scheme):
        raise ProtocolError("the Proxy-Authorization header names no scheme")
    if scheme.lower() != "basic":
        raise ProtocolError(f"this proxy takes Basic authentication, not {scheme[:20]}", 407)
    credentials = credentials.strip(" ")
    if not _BASE64.fullmatch(credentials):
        raise ProtocolError("the Basic credentials are not base64")
    try:
        user_password = base64.b64decode(credentials, validate=True).decode("utf-8")
    except binascii.Error:
        raise ProtocolError("the Basic credentials are not base64") from None
    except UnicodeDecodeError:
        raise ProtocolError("the Basic credentials are not UTF-8") from None
    user, colon, password = user_password.partition(":")
    if not colon:
        raise ProtocolError("the Basic credentials are not user:password")
    if _CONTROL.search(user_password.encode()) or "\t" in user_password:
        raise ProtocolError("the Basic credentials hold a control character")
    return user, password


def forward_head(request: HttpRequest) -> bytes:
    """The head to send upstream for *request*, a plain-HTTP (not CONNECT) request.

    The request line carries the origin-form path and the client's own HTTP
    version: a server may answer an HTTP/1.1 request in chunks, which an
    HTTP/1.0 client cannot read (RFC 9110 section 6.2).  Hop-by-hop
    headers are dropped (Connection and every header it lists, except those
    that frame the body, Proxy-Connection, Proxy-Authorization,
    Proxy-Authenticate, Keep-Alive, TE, Trailer, Upgrade), Host is replaced by
    the host and port the policy approved (the host in its canonical form, as
    the policy saw it: ``GOOD.TEST.`` is ``good.test``, ``0x7f.1`` is
    ``127.0.0.1``; raises InvalidHost for a host that has none), and
    ``Connection: close`` is added.

    Why close: the proxy relays the rest of the client's connection as bytes.
    Were the upstream connection kept alive, a second request on it, naming
    another host in its Host header, would reach the first host's server (or a
    virtual host behind it) without the policy ever seeing it.  One request
    per upstream connection keeps "what the policy allowed" and "where the
    bytes go" the same thing.
    """
    if request.method == "CONNECT":
        raise ValueError("a CONNECT request opens a tunnel; it is not forwarded")
    dropped = _NOT_FORWARDED | (_connection_options(request) - _BODY_FRAMING) | {"content-length"}
    try:
        host = normalize_host(request.host)
    except ValueError as exc:
        raise InvalidHost(f"invalid host: {exc}", request.host, request.port) from None
    lines = [f"{request.method} {request.path} {request.version}", f"Host: {_host_header(host, request.port)}"]
    lines += [f"{name}: {value}" for name, value in request.headers if name not in dropped]
    if request.header_values("content-length"):
        # One value, however the client wrote it (`5, 5`, or twice): the
        # server reads the body's length as the proxy does.
        lines.append(f"Content-Length: {request_body_length(request)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def request_body_length(request: HttpRequest) -> int:
    """The length of a parsed request's body: its Content-Length (0 without
    one).  parse_http_head has checked that every value given agrees (RFC
    9110 8.6 lets a list of one repeated value through: ``5, 5``)."""
    lengths = request.header_values("content-length")
    return int(lengths[0].split(",")[0].strip(" \t")) if lengths else 0


def _connection_options(request: HttpRequest) -> set[str]:
    """The header names that the request's Connection headers list."""
    return {
        option.strip(" \t").lower()
        for value in request.header_values("connection")
        for option in value.split(",")
        if option.strip(" \t")
    }


def _host_header(host: str, port: int) -> str:
    if ":" in host:
        host = f"[{host}]"
    return host if port == 80 else f"{host}:{port}"


# -- responses from upstream -------------------------------------------------------

MAX_RESPONSE_HEAD = 65536  #: bytes in a response head from an upstream server

_STATUS_LINE = re.compile(r"(HTTP/[0-9]\.[0-9]) ([0-9]{3})(?: (.*))?")
# What concerns the connection between the server and the proxy: the client
# gets "Connection: close" instead (the proxy serves one request per connection).
_RESPONSE_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection"})


class HttpResponse(NamedTuple):
    """A response head from an upstream server, parsed as far as the proxy
    needs: to pass it on with its own Connection header, and to know where
    its body ends.  ``headers`` keep the names as sent (compare them in lower
    case: :meth:`header_values`); ``head_length`` is the bytes the head took."""

    version: str
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    head_length: int

    def header_values(self, name: str) -> list[str]:
        """The values of every header called *name* (any case), in order."""
        name = name.lower()
        return [value for header, value in self.headers if header.lower() == name]

    @property
    def interim(self) -> bool:
        """A 1xx answer (100 Continue, 103 Early Hints): the real one follows.
        101 Switching Protocols is final: what follows is another protocol."""
        return 100 <= self.status < 200 and self.status != 101


def parse_response_head(buf: bytes | bytearray, searched: int = 0) -> HttpResponse | None:
    """The response whose head starts *buf*, or None while it is incomplete
    (*searched*: as for :func:`parse_http_head`).

    Raises :class:`ProtocolError` with status 502 for what the proxy will not
    pass on: a head longer than :data:`MAX_RESPONSE_HEAD`, no ``HTTP/x.y NNN``
    status line (an HTTP/0.9 answer), a control character, a header line
    without a colon or with a name that is not a token.  Folded header lines
    are unfolded (RFC 9112 section 5.2).
    """
    end = _HEAD_END.search(buf, max(0, searched - 2), MAX_RESPONSE_HEAD)
    if end is None:
        if not b"HTTP/".startswith(bytes(buf[:5])):  # an answer that is no response: say so at once
            raise ProtocolError("the server's answer is not an HTTP/1.x response", 502)
        if len(buf) >= MAX_RESPONSE_HEAD:
            raise ProtocolError(f"the server's response head is longer than {MAX_RESPONSE_HEAD} bytes", 502)
        return None
    lines = _split_lines(bytes(buf[: end.end()]))
    if any(_CONTROL.search(line) for line in lines):
        raise ProtocolError("the server's response head holds a control character", 502)
    status_line = _STATUS_LINE.fullmatch(lines[0].decode("latin-1"))
    if status_line is None:
        raise ProtocolError("the server's answer is not an HTTP/1.x response", 502)
    version, status, reason = status_line.group(1), int(status_line.group(2)), status_line.group(3) or ""
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        text = line.decode("latin-1")
        if text[:1] in (" ", "\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, (value + " " + text.strip(" \t")).strip(" "))
            continue
        name, colon, value = text.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise ProtocolError(f"the server sent a malformed header line {text[:40]!r}", 502)
        headers.append((name, value.strip(" \t")))
    return HttpResponse(version, status, reason, tuple(headers), end.end())


def response_body_length(response: HttpResponse, request_method: str) -> int | None:
    """How many bytes of body follow *response*'s head: 0 for none, None when
    the body ends where the server closes the connection (chunked, or framed
    by nothing but the close).  Raises :class:`ProtocolError` (502) for a
    Content-Length that is not one number (RFC 9112 section 6.3)."""
    if response.status == 101:
        return None
    if request_method == "HEAD" or response.interim or response.status in (204, 304):
        return 0
    if response.header_values("transfer-encoding"):
        return None
    lengths = response.header_values("content-length")
    if not lengths:
        return None
    items = {item.strip(" \t") for value in lengths for item in value.split(",")}
    if len(items) != 1 or not all(_DIGITS.fullmatch(i) and len(i) <= _MAX_CONTENT_LENGTH_DIGITS for i in items):
        raise ProtocolError("the server's Content-Length is not one number of bytes", 502)
    return int(items.pop())


def forward_response_head(response: HttpResponse) -> bytes:
    """The head to pass on to the client for *response*.

    Connection, Keep-Alive, Proxy-Connection and the headers that Connection
    lists (except those that frame the body) concern the server's connection
    to the proxy, and are dropped; a final response gets
    ``Connection: close``.  The proxy serves one request per client
    connection, and a client that is not told so reuses the connection and
    waits for an answer that never comes.
    """
    options = {
        option.strip(" \t").lower()
        for value in response.header_values("connection")
        for option in value.split(",")
    }
    dropped = _RESPONSE_HOP_BY_HOP | (options - _BODY_FRAMING)
    lines = [f"{response.version} {response.status:03d} {response.reason}"]
    lines += [f"{name}: {value}" for name, value in response.headers if name.lower() not in dropped]
    if not response.interim:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
"""The answer to a CONNECT whose tunnel is open; tunnel data follows it."""

_RESPONSE_OWN_HEADERS = frozenset({"content-type", "content-length", "connection"})


def http_response(status: int, reason: str, body: str = "", headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A complete HTTP/1.1 response, after which the proxy closes the connection.

    The body is plain UTF-8 text ending with a newline; an empty *body* becomes
    the reason phrase, so that a person at a terminal reads why.  *headers* are
    added after Content-Type, Content-Length and Connection (which they may not
    repeat).  A 407 carries ``Proxy-Authenticate: Basic realm="heel"`` unless
    *headers* brings its own.  Raises ``ValueError`` for a status outside
    100..599, or a reason, header name or value that cannot go in a head.
    """
    if type(status) is not int or not 100 <= status <= 599:
        raise ValueError(f"status must be an integer from 100 to 599, not {status!r}")
    _check_head_text("reason", reason)
    extra = [(name, value) for name, value in headers]
    for name, value in extra:
        if not _TOKEN.fullmatch(name) or name.lower() in _RESPONSE_OWN_HEADERS:
            raise ValueError(f"{name!r} cannot be added as a header here")
        _check_head_text(f"the value of {name}", value)
    if status == 407 and not any(name.lower() == "proxy-authenticate" for name, _ in extra):
        extra.append(("Proxy-Authenticate", 'Basic realm="heel"'))
    body = body or reason
    if not body.endswith("\n"):
        body += "\n"
    content = body.encode("utf-8")
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(content)}",
        "Connection: close",
    ]
    lines += [f"{name}: {value}" for name, value in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + content


def _check_head_text(what: str, text: str) -> None:
    if not text.isascii() or _CONTROL.search(text.encode("ascii")):
        raise ValueError(f"{what} must be ASCII without control characters, not {text!r}")


# -- SOCKS5 ----------------------------------------------------------------------

_SOCKS_VERSION = 5
_AUTH_VERSION = 1  # of the RFC 1929 username/password subnegotiation
_METHOD_NO_AUTH = 0x00
_METHOD_USERNAME_PASSWORD = 0x02
_METHOD_NONE_ACCEPTABLE = 0xFF
_CMD_CONNECT = 1
_AUTH_SUCCESS = b"\x01\x00"
_AUTH_FAILURE = b"\x01\x01"

# Reply codes (RFC 1928 section 6), for socks5_reply().
SUCCEEDED = 0
GENERAL_FAILURE = 1
NOT_ALLOWED = 2  #: connection not allowed by ruleset: what a policy refusal answers
NETWORK_UNREACHABLE = 3
HOST_UNREACHABLE = 4
CONNECTION_REFUSED = 5
TTL_EXPIRED = 6
COMMAND_NOT_SUPPORTED = 7
ADDRESS_TYPE_NOT_SUPPORTED = 8

# Address types (SocksConnect.atyp).
ATYP_IPV4 = 1
ATYP_DOMAIN = 3
ATYP_IPV6 = 4
_ADDRESS_LENGTHS = {ATYP_IPV4: 4, ATYP_IPV6: 16}


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()  #: the handshake waits for more bytes from the client


class SocksReply(NamedTuple):
    """Send ``data`` to the client, then ask for the next event."""

    data: bytes


class SocksAuth(NamedTuple):
    """The client authenticates as ``user`` with ``password``: answer with
    :meth:`Socks5Handshake.accept_auth`."""

    user: str
    password: str

    def __repr__(self) -> str:
        return f"SocksAuth(user={self.user!r}, password=<redacted>)"


class SocksConnect(NamedTuple):
    """The client asks for a connection to ``host``:``port``.

    ``host`` is dotted IPv4 (``atyp`` :data:`ATYP_IPV4`), compressed IPv6
    (:data:`ATYP_IPV6`) or a name as sent (:data:`ATYP_DOMAIN`).  Answer with
    :func:`socks5_reply`; what the client sent after its request is in
    :attr:`Socks5Handshake.trailing_data`.
    """

    host: str
    port: int
    atyp: int


class SocksFailed(NamedTuple):
    """The handshake failed in a way SOCKS5 can say: send ``data``, then close."""

    data: bytes


SocksEvent = Union[_NeedData, SocksReply, SocksAuth, SocksConnect, SocksFailed]

# The handshake's states, in order; FAILED and CONNECT_REQUESTED end it.
_METHODS = "methods"
_AUTH = "auth"
_AUTH_DECISION = "auth decision"
_REQUEST = "request"
_CONNECT_REQUESTED = "connect requested"
_FAILED = "failed"


class Socks5Handshake:
    """The server side of a SOCKS5 handshake, up to the CONNECT request.

    Method selection prefers username/password (0x02) whenever the client
    offers it, even when *require_auth* is false, so that the proxy learns who
    asks; "no authentication" (0x00) is taken only when *require_auth* is
    false.  When neither fits, :meth:`next_event` gives :class:`SocksFailed`
    carrying the "no acceptable methods" reply.
    """

    def __init__(self, require_auth: bool) -> None:
        self.require_auth = require_auth
        self._buffer = bytearray()
        self._state = _METHODS
        self._error: ProtocolError | None = None

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes read from the client."""
        self._buffer += data

    @property
    def trailing_data(self) -> bytes:
        """Bytes received and not consumed by the handshake: after
        :class:`SocksConnect`, what the client sent early, to forward upstream."""
        return bytes(self._buffer)

    def next_event(self) -> SocksEvent:
        """The next step: :data:`NEED_DATA`, :class:`SocksReply`, :class:`SocksAuth`,
        :class:`SocksConnect` or :class:`SocksFailed`.

        Raises :class:`ProtocolError` when the client does not speak SOCKS5
        (again on every later call), and ``RuntimeError`` when called while
        :meth:`accept_auth` is due or after the handshake ended.
        """
        if self._error is not None:
            raise self._error
        readers = {_METHODS: self._read_methods, _AUTH: self._read_auth, _REQUEST: self._read_request}
        reader = readers.get(self._state)
        if reader is None:
            raise RuntimeError(f"next_event() in state {self._state!r}")
        try:
            return reader()
        except ProtocolError as error:
            self._error = error
            self._state = _FAILED
            raise

    def accept_auth(self, ok: bool) -> bytes:
        """The status reply to the :class:`SocksAuth` just received: success when
        *ok*, else failure, after which the handshake is over (close)."""
        if self._state != _AUTH_DECISION:
            raise RuntimeError(f"accept_auth() without a SocksAuth to answer (state {self._state!r})")
        self._state = _REQUEST if ok else _FAILED
        return _AUTH_SUCCESS if ok else _AUTH_FAILURE

    def _check_version(self, expected: int, what: str) -> None:
        # Checked on the first byte, not when the message is whole: a client
        # speaking something else is told so at once, not after a timeout.
        if self._buffer and self._buffer[0] != expected:
            raise ProtocolError(f"{what} starts with version {self._buffer[0]}, not {expected}")

    def _take(self, length: int) -> bytes:
        taken = bytes(self._buffer[:length])
        del self._buffer[:length]
        return taken

    def _read_methods(self) -> SocksEvent:
        # VER NMETHODS METHODS...
        self._check_version(_SOCKS_VERSION, "the SOCKS greeting")
        if len(self._buffer) < 2:
            return NEED_DATA
        count = self._buffer[1]
        if count == 0:
            raise ProtocolError("the SOCKS greeting offers no authentication method")
        if len(self._buffer) < 2 + count:
            return NEED_DATA
        methods = self._take(2 + count)[2:]
        if _METHOD_USERNAME_PASSWORD in methods:
            self._state = _AUTH
            return SocksReply(bytes([_SOCKS_VERSION, _METHOD_USERNAME_PASSWORD]))
        if _METHOD_NO_AUTH in methods and not self.require_auth:
            self._state = _REQUEST
            return SocksReply(bytes([_SOCKS_VERSION, _METHOD_NO_AUTH]))
        self._state = _FAILED
        return SocksFailed(bytes([_SOCKS_VERSION, _METHOD_NONE_ACCEPTABLE]))

    def _read_auth(self) -> SocksEvent:
        # VER ULEN UNAME PLEN PASSWD (RFC 1929).  Empty names and passwords are
        # read as such; whether they are any good is the proxy's decision.
        self._check_version(_AUTH_VERSION, "the SOCKS username/password request")
        buffer = self._buffer
        if len(buffer) < 2:
            return NEED_DATA
        user_end = 2 + buffer[1]
        if len(buffer) < user_end + 1:
            return NEED_DATA
        password_end = user_end + 1 + buffer[user_end]
        if len(buffer) < password_end:
            return NEED_DATA
        message = self._take(password_end)
        user = _decode_credential(message[2:user_end], "user name")
        password = _decode_credential(message[user_end + 1 :], "password")
        self._state = _AUTH_DECISION
        return SocksAuth(user, password)

    def _read_request(self) -> SocksEvent:
        # VER CMD RSV ATYP DST.ADDR DST.PORT; RSV is not looked at.
        self._check_version(_SOCKS_VERSION, "the SOCKS request")
        buffer = self._buffer
        if len(buffer) < 4:
            return NEED_DATA
        command, address_type = buffer[1], buffer[3]
        if command != _CMD_CONNECT:  # BIND, UDP ASSOCIATE or nothing at all
            self._state = _FAILED
            return SocksFailed(socks5_reply(COMMAND_NOT_SUPPORTED))
        if address_type == ATYP_DOMAIN:
            if len(buffer) < 5:
                return NEED_DATA
            address_start, address_end = 5, 5 + buffer[4]
        elif address_type in _ADDRESS_LENGTHS:
            address_start, address_end = 4, 4 + _ADDRESS_LENGTHS[address_type]
        else:
            self._state = _FAILED
            return SocksFailed(socks5_reply(ADDRESS_TYPE_NOT_SUPPORTED))
        if len(buffer) < address_end + 2:
            return NEED_DATA
        message = self._take(address_end + 2)
        port = int.from_bytes(message[address_end:], "big")
        host = _decode_address(address_type, message[address_start:address_end], port)
        if port == 0:
            raise ProtocolError("the SOCKS request asks for port 0")
        self._state = _CONNECT_REQUESTED
        return SocksConnect(host, port, address_type)


def _decode_credential(raw: bytes, what: str) -> str:
    # RFC 1929 names no encoding; UTF-8 matches what Basic authentication uses.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"the SOCKS {what} is not UTF-8") from None


def _decode_address(address_type: int, raw: bytes, port: int) -> str:
    if address_type == ATYP_IPV4:
        return str(ipaddress.IPv4Address(raw))
    if address_type == ATYP_IPV6:
        return ipaddress.IPv6Address(raw).compressed
    name = raw.decode("latin-1")
    # The same syntax as an HTTP host: no NUL to cut a name short in C, no
    # non-ASCII to be read as a different name after IDNA.
    if not _HOST_NAME.fullmatch(name):
        raise InvalidHost(f"the SOCKS request names {name[:80]!r}, not a host name (letters, digits, '.', '-', '_')",
                          name, port)
    return name


def socks5_reply(code: int, bind_host: str = "0.0.0.0", bind_port: int = 0) -> bytes:
    """The reply to a SOCKS5 request: *code* (:data:`SUCCEEDED`, :data:`NOT_ALLOWED`,
    ...) and the address the proxy bound for the connection, which clients
    hardly use (an IP address, or a name of at most 255 bytes)."""
    if type(code) is not int or not 0 <= code <= 255:
        raise ValueError(f"code must be an integer from 0 to 255, not {code!r}")
    if type(bind_port) is not int or not 0 <= bind_port <= 65535:
        raise ValueError(f"bind_port must be an integer from 0 to 65535, not {bind_port!r}")
    try:
        bind_address = ipaddress.ip_address(bind_host)
    except ValueError:
        if not _HOST_NAME.fullmatch(bind_host) or len(bind_host) > 255:
            raise ValueError(f"bind_host must be an IP address or a host name, not {bind_host!r}") from None
        address = bytes([ATYP_DOMAIN, len(bind_host)]) + bind_host.encode("ascii")
    else:
        address_type = ATYP_IPV4 if bind_address.version == 4 else ATYP_IPV6
        address = bytes([address_type]) + bind_address.packed
    return bytes([_SOCKS_VERSION, code, 0]) + address + bind_port.to_bytes(2, "big")
