"""heel's filtering proxy: the sandbox's only way to the network.

Every connection a sandboxed program makes to the network arrives here, at
the listener the sandbox reaches on 127.0.0.1 (inside its own network
namespace, or on the host's loopback where there are no namespaces).  The
proxy speaks HTTP CONNECT, plain HTTP forwarding (absolute-URI requests) and
SOCKS5 (CONNECT) on the same port; the first byte tells which.  For each
request it:

1. parses and validates the request (heel._proxy_protocol: malformed
   answers 400, an over-long head 431);
2. checks the credential of the proxy URL: required where processes other
   than the sandbox's can reach the listener (407 without it); the user name
   says which command of the sandbox asked;
3. canonicalises the host (heel._netaddr: IP literals in every spelling,
   names lower-cased) and asks the policy (403 with the reason when denied);
4. resolves the name itself, and refuses an address that is loopback,
   private, link-local or otherwise internal unless the policy names that
   address or the exact name (403);
5. connects (502 when it cannot), and hands both sockets to the C splice
   relay (heel._relay), which moves the bytes until both directions end; a
   plain HTTP request instead goes upstream alone, and its response comes
   back with ``Connection: close`` (one request per connection).

Each request ends in one :class:`NetworkEvent`, kept by the sandbox and
passed to the config's ``on_network_event``.
"""

from __future__ import annotations

import collections
import errno
import heapq
import resource
import hmac
import ipaddress
import socket
import struct
import time
import urllib.parse
from http import HTTPStatus
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

import trio

from . import _netaddr, _relay
from ._budget import ProcessBudget
from . import _proxy_protocol as proto
from .policy import NetworkPolicy, NetworkRequest, sandbox_reason

__all__ = ["NetworkEvent", "Resolver"]

#: An async callable (host, port) -> the addresses to try, in order.  The
#: default asks the host's resolver; tests inject their own.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

#: How long a client may take to send its whole request, and the proxy to
#: reach the upstream server.
HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 15.0
#: Connections one sandbox may have open through its proxy at once; past it,
#: new ones are answered 503 (SOCKS: general failure).  Each tunnel holds six
#: host fds (two sockets, two relay pipes), up to 2 MiB of pipe buffers and its
#: sockets' buffers (which the kernel grows to tcp_rmem's maximum when a side does not read),
#: none of it counted against the sandbox's own limits, so the budget is also
#: kept within the host's fd limit (see _connection_budget).
MAX_CONNECTIONS = 256
FDS_PER_TUNNEL = 6
#: Connections over the budget that are answered at once, each within
#: OVERLOAD_TIMEOUT; any more are closed unanswered.  They take one fd each,
#: from the slack that _connection_budget leaves.
MAX_OVERLOAD_ANSWERS = 16
OVERLOAD_TIMEOUT = 1.0
#: After an HTTP answer, how long the proxy reads (and drops) what the client
#: still sends before it closes: closing with unread bytes resets the
#: connection, and the reset can destroy the answer before the client reads it.
LINGER_TIMEOUT = 2.0
#: TCP keepalive on tunnel sockets (idle seconds, probe interval, probes): a
#: tunnel whose client has gone (it closed, and its socket is gone too) while
#: the server says nothing ends when a probe is answered with a reset, where
#: the relay alone would wait for the server for ever.
KEEPALIVE = (60, 10, 6)
#: Events kept for network_events(), of each kind: this many allowed ones
#: and this many others (denied, failed); past it the oldest of that kind is
#: dropped (and counted; the on_network_event callback still sees every one).
#: Two stores, so that a flood of denials never pushes out an allowed event.
MAX_EVENTS = 10_000
#: Name lookups one proxy runs at once (each takes a thread while it waits).
MAX_LOOKUPS = 8
_READ = 65536


class NetworkEvent(NamedTuple):
    """One request to the proxy and what became of it.

    ``time``: when it arrived (time.time()).  ``protocol``: "connect",
    "http" or "socks".  ``allowed``: whether bytes were let through;
    ``reason`` says why or why not.  ``command``: which command of the
    sandbox asked, when known.  ``bytes_sent``: the bytes sent to the
    server; ``bytes_received``: those read from it (for plain HTTP, the
    request's head as the proxy rewrote it and its body, and the server's
    response as it came; never the proxy's own answers, such as a 502).
    ``failed``: the policy allowed the request, but the server could not be
    reached (no address, refused, timed out); ``allowed`` is then False,
    since no byte went through.  An allowed event is reported when its
    connection ends, a denied or failed one at once.
    """

    time: float
    host: str
    port: int
    protocol: str
    allowed: bool
    reason: str
    command: str | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    failed: bool = False

    def describe(self) -> str:
        """One line for people: what was asked and what happened."""
        verdict = "allowed" if self.allowed else "failed" if self.failed else "denied"
        who = f" by {self.command}" if self.command else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"network {verdict}: {self.protocol} {host}:{self.port}{who} ({self.reason})"


_TRANSIENT_ACCEPT_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                                      errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


def _process_budget() -> int | None:
    """The connections all of the process's proxies may hold at once, so
    that their fds fit in its RLIMIT_NOFILE next to about 128 of everything
    else (None: no limit).  The limit is left as it is (raising it would
    reach every child the host starts): raise RLIMIT_NOFILE yourself for
    more connections."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(16, (soft - 128) // (FDS_PER_TUNNEL + 2))


def _connection_budget() -> int:
    """One proxy's budget: MAX_CONNECTIONS, or the process's, if lower."""
    process = _process_budget()
    return MAX_CONNECTIONS if process is None else min(MAX_CONNECTIONS, process)


#: The connections served by every proxy of this process: one sandbox's
#: tunnels must not take the fds that another's (or the host's own pipes for
#: its commands) need.
_process_connections = ProcessBudget(lambda: _process_budget())  # looked up each time (tests replace it)


def _is_local(address, port: int = 0) -> bool:
    """Whether the kernel would deliver to ``address`` on this host (one of
    its own addresses, public ones included: a daemon bound to 0.0.0.0 or
    :: is not the network).  The kernel's own route lookup says so: a
    ``local`` (or broadcast, or anycast) route, whether for an address of
    an interface, a whole prefix on lo or an AnyIP route (``ip route add
    local P dev lo``), of either family; asked for TCP to ``port``, so that
    a policy-routing rule that picks its table by protocol or port (``ip
    rule add ipproto tcp dport 80 lookup T``) is followed as a connection's
    would be.  Nothing is sent."""
    route = _route_type(address, port)
    if route is not None:
        return route in _DELIVERED_HERE
    return _is_local_by_socket(address)


# rtnetlink (linux/netlink.h, linux/rtnetlink.h): one RTM_GETROUTE request,
# as `ip route get ADDRESS` sends it, whose answer's rtm_type says what the
# kernel does with a packet for that address.
_NETLINK_ROUTE = 0
_RTM_GETROUTE = 26
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 1
_RTA_DST = 1
_RTA_IP_PROTO, _RTA_DPORT = 27, 29  # Linux 4.17: the lookup's protocol and port, for ip rules
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTN_LOCAL, _RTN_BROADCAST, _RTN_ANYCAST = 2, 3, 4
#: Route types whose packets this host takes for itself.
_DELIVERED_HERE = frozenset({_RTN_LOCAL, _RTN_BROADCAST, _RTN_ANYCAST})


def _route_type(address, port: int = 0) -> int | None:
    """The type (RTN_*) of the route the kernel picks for ``address``, as
    for a connection this process makes; None when rtnetlink cannot be
    asked or has no route to give."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    packed = address.packed
    body = (_RTMSG.pack(family, len(packed) * 8, 0, 0, 0, 0, 0, 0, 0)
            + struct.pack("=HH", 4 + len(packed), _RTA_DST) + packed  # 4 or 16 bytes: aligned
            + struct.pack("=HHB3x", 5, _RTA_IP_PROTO, socket.IPPROTO_TCP))  # padded to 8
    if port:
        body += struct.pack("=HH", 6, _RTA_DPORT) + struct.pack("!H", port) + b"\0\0"
    sequence = 1
    request = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), _RTM_GETROUTE, _NLM_F_REQUEST, sequence, 0) + body
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_ROUTE) as nl:
            nl.settimeout(1.0)  # the kernel answers at once; never hang the event loop
            nl.send(request)
            while True:
                answer = nl.recv(65536)
                offset = 0
                while offset + _NLMSGHDR.size <= len(answer):
                    length, kind, _, seq, _ = _NLMSGHDR.unpack_from(answer, offset)
                    if length < _NLMSGHDR.size:
                        return None
                    if seq != sequence:
                        offset += (length + 3) & ~3  # not the answer to this request
                        continue
                    if kind == _NLMSG_ERROR or offset + _NLMSGHDR.size + _RTMSG.size > len(answer):
                        # No route (ENETUNREACH), or a blackhole or prohibit
                        # route (EINVAL, EACCES): the connect fails too, which
                        # the lookup through a socket finds out again.
                        return None
                    return _RTMSG.unpack_from(answer, offset + _NLMSGHDR.size)[7]
    except OSError:
        return None


#: What a socket() that fails for want of resources says: then the local
#: check could not look, and the address counts as local (refused).
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _is_local_by_socket(address) -> bool:
    """Where rtnetlink cannot be asked: a route lookup through a UDP
    socket, then a bind()."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        probe = socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:
        # No fd to look with (EMFILE): treated as local, so refused.  No
        # such family here (IPv6 disabled): the connect fails as well.
        return exc.errno in _OUT_OF_RESOURCES
    try:
        with probe:
            probe.connect((str(address), 9))
            if ipaddress.ip_address(probe.getsockname()[0].split("%")[0]) == address:
                return True
    except OSError:
        return False  # no route: the connect will fail too
    # A local route whose preferred source is another address (a /24 on lo
    # makes all of it local; AnyIP, `ip route add local P dev lo src A`):
    # the lookup names that source, yet the kernel delivers here.  Only a
    # local address can be bound, unless the host lets any be
    # (ip_nonlocal_bind), where binding tells nothing and the lookup stands.
    # (IPv6 binds only the addresses of interfaces, not AnyIP prefixes.)
    if _nonlocal_bind(family):
        return False
    try:
        probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        return exc.errno in _OUT_OF_RESOURCES  # as above
    with probe:
        try:
            probe.bind((str(address), 0))
            return True
        except OSError:
            return False


def _nonlocal_bind(family: int) -> bool:
    version = "ipv6" if family == socket.AF_INET6 else "ipv4"
    try:
        with open(f"/proc/sys/net/{version}/ip_nonlocal_bind", "rb") as f:
            return f.read().strip() != b"0"
    except OSError:
        return True  # unknown: binding proves nothing


def _resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[str] = []
    for family, _, _, _, sockaddr in infos:
        address = str(sockaddr[0])  # a str for AF_INET and AF_INET6
        if family in (socket.AF_INET, socket.AF_INET6) and address not in out:
            out.append(address)
    return out


class _Refused(Exception):
    """The request ends here: ``status`` (HTTP) / ``socks_code`` to answer."""

    def __init__(self, status: int, socks_code: int, reason: str, *, decided: bool = True,
                 failed: bool = False, public: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.socks_code = socks_code
        #: for the host (the event)
        self.reason = reason
        #: for the sandbox (the body of the answer): the reason, unless it
        #: holds what only the host should know (a policy's exception, the
        #: address an internal name resolves to)
        self.public = reason if public is None else public
        #: whether a request was understood far enough to be an event
        self.decided = decided
        #: the policy allowed it; the way to the server failed
        self.failed = failed


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class Proxy:
    """The proxy of one sandbox.  ``serve`` runs it until cancelled."""

    def __init__(self, policy: NetworkPolicy, listener: socket.socket, *, secret: str,
                 require_secret: bool, resolver: Resolver | None = None,
                 on_event: Callable[[NetworkEvent], object] | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        """``listener``: a listening TCP socket (the proxy does not own it).
        ``secret``: the password of the proxy URLs; ``require_secret``: refuse
        requests without it (the listener is reachable by others)."""
        self.policy = policy
        self._listener = listener
        self._secret = secret
        self._require_secret = require_secret
        self._resolver = resolver
        self._on_event = on_event
        self._handshake_timeout = handshake_timeout
        # (sequence number, event): allowed ones, and the rest (see MAX_EVENTS)
        self._allowed_events: collections.deque[tuple[int, NetworkEvent]] = collections.deque(maxlen=MAX_EVENTS)
        self._other_events: collections.deque[tuple[int, NetworkEvent]] = collections.deque(maxlen=MAX_EVENTS)
        self._recorded = 0
        #: events recorded but no longer in :attr:`events` (see MAX_EVENTS)
        self.events_dropped = 0
        self.max_connections = _connection_budget()
        self._lookups = trio.CapacityLimiter(MAX_LOOKUPS)
        #: proxy user name -> the command it stands for
        self.commands: dict[str, str] = {}
        #: connections being served now
        self.open_connections = 0
        #: connections over the budget being answered now (not counted above)
        self.overload_answers = 0

    async def _lookup(self, host: str, port: int) -> list[str]:
        """The host's resolver, in a thread, a few at a time: a slow DNS
        server holds this proxy's lookups, not trio's shared thread pool."""
        return await trio.to_thread.run_sync(_resolve, host, port, limiter=self._lookups,
                                             abandon_on_cancel=True)

    @property
    def events(self) -> list[NetworkEvent]:
        """The events kept, in the order they were recorded: the latest
        MAX_EVENTS allowed ones and the latest MAX_EVENTS others;
        :attr:`events_dropped` counts the rest."""
        return [event for _, event in heapq.merge(self._allowed_events, self._other_events,
                                                   key=lambda entry: entry[0])]

    def record(self, event: NetworkEvent) -> None:
        """Keep ``event`` (allowed ones apart from the rest, so that denials,
        which the sandbox can make as fast as it likes, never push an allowed
        one out) and pass it to ``on_event``."""
        store = self._allowed_events if event.allowed else self._other_events
        if len(store) == store.maxlen:
            self.events_dropped += 1
        store.append((self._recorded, event))
        self._recorded += 1
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # the host's callback must not take the proxy down
                pass

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept and serve connections until cancelled.  The listener is
        only borrowed: trio is told before it would be closed."""
        sock = trio.socket.from_stdlib_socket(self._listener.dup())
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    try:
                        conn, _ = await sock.accept()
                    except OSError as exc:
                        if exc.errno in _TRANSIENT_ACCEPT_ERRORS:
                            await trio.sleep(0.05)  # out of fds or memory: let connections finish
                            continue
                        raise
                    if self.open_connections >= self.max_connections or not _process_connections.take():
                        # Answered, briefly and a few at a time, so that the
                        # client and the user learn why; never served.
                        if self.overload_answers >= MAX_OVERLOAD_ANSWERS:
                            conn.close()
                            continue
                        self.overload_answers += 1
                        nursery.start_soon(self._serve_connection, conn, True)
                        continue
                    self.open_connections += 1
                    nursery.start_soon(self._serve_connection, conn)
        finally:
            sock.close()

    async def _serve_connection(self, conn: trio.socket.SocketType, overloaded: bool = False) -> None:
        """Serve one connection; an ``overloaded`` one (over the budget) is
        read as far as its request and then refused."""
        # One deadline for the whole request: a client that trickles bytes
        # cannot hold a connection open for longer than that.
        deadline = trio.current_time() + (OVERLOAD_TIMEOUT if overloaded else self._handshake_timeout)
        try:
            with trio.move_on_at(deadline) as handshake:
                first = await conn.recv(_READ)
            if handshake.cancelled_caught or not first:
                return
            if proto.is_socks5(first):
                await self._serve_socks(conn, first, deadline, overloaded)
            else:
                await self._serve_http(conn, first, deadline, overloaded)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception as exc:  # noqa: BLE001
            # A bug, or a resolver or policy that raised something odd: this
            # connection ends, the proxy (and the sandbox) goes on.
            self.record(NetworkEvent(time.time(), "?", 0, "?", False,
                                     f"internal error in heel's proxy: {type(exc).__name__}: {exc}"))
        finally:
            if overloaded:
                self.overload_answers -= 1
            else:
                self.open_connections -= 1
                _process_connections.give_back()
            conn.close()

    # ---- HTTP ------------------------------------------------------------

    async def _serve_http(self, conn, data: bytes, deadline: float, overloaded: bool = False) -> None:
        buf = bytearray(data)
        arrived = time.time()
        try:
            with trio.move_on_at(deadline) as handshake:
                searched = 0
                while True:
                    request = proto.parse_http_head(buf, searched)
                    if request is not None:
                        break
                    searched = len(buf)
                    chunk = await conn.recv(_READ)
                    if not chunk:
                        return
                    buf += chunk
            if handshake.cancelled_caught or request is None:
                return
        except proto.ProtocolError as exc:
            if isinstance(exc, proto.InvalidHost) and exc.request is not None:
                try:
                    credentials = _credentials(exc.request)
                except _Refused:
                    pass  # a credential that is no credential: not the sandbox's request
                else:
                    self._record_invalid_host(exc, "connect" if exc.request.method == "CONNECT" else "http",
                                              arrived, credentials)
            await _send(conn, proto.http_response(exc.status, _reason(exc.status),
                                                  f"heel proxy: {exc}"))
            await _linger(conn, OVERLOAD_TIMEOUT if overloaded else LINGER_TIMEOUT)
            return
        leftover = bytes(buf[request.head_length:])
        is_connect = request.method == "CONNECT"
        protocol = "connect" if is_connect else "http"
        command = None
        try:
            command = self._command(_credentials(request))
            if not is_connect and request.header_values("transfer-encoding"):
                # Only a body of known length can be forwarded without
                # passing the bytes after it (see _forward).  An event, so
                # that a failing `git push` of a big pack says why.
                raise _Refused(411, proto.GENERAL_FAILURE,
                               "chunked request bodies are not supported: a request body needs a "
                               "Content-Length here (or use https://, through CONNECT)")
            host = _host(request.host)
            if not is_connect and _has_dot_segment(request.path):
                # A policy that matches the URL's path (CustomPolicy on
                # NetworkRequest.url) must see the path the server will
                # serve: /public/../secret.txt is /secret.txt to it.
                raise _Refused(400, proto.GENERAL_FAILURE,
                               "the request's path has a dot segment ('.' or '..', plain or %-encoded): "
                               "send it without them")
            if overloaded:
                raise _Refused(503, proto.GENERAL_FAILURE, self._overload_reason())
            net_request = NetworkRequest(
                host=host, port=request.port, protocol=protocol,
                method=None if is_connect else request.method,
                url=None if is_connect else _url(host, request.port, request.path),
                command=command)
            upstream, reason = await self._open_upstream(net_request)
        except _Refused as refused:
            extra = [("Proxy-Authenticate", 'Basic realm="heel"')] if refused.status == 407 else []
            where = f"{request.host}:{request.port}"
            # Recorded before the answer goes out: a client that has it
            # may end the sandbox at once.
            if refused.decided:
                self.record(NetworkEvent(arrived, _safe_host(request.host), request.port, protocol,
                                         False, refused.reason, command, failed=refused.failed))
            await _send(conn, proto.http_response(refused.status, _reason(refused.status),
                                                  f"heel proxy: {where}: {refused.public}", extra))
            await _linger(conn, OVERLOAD_TIMEOUT if overloaded else LINGER_TIMEOUT)
            return
        with upstream:
            if is_connect:
                await self._tunnel(conn, upstream, proto.CONNECT_ESTABLISHED, leftover, net_request, arrived,
                                   reason)
            else:
                await self._forward(conn, upstream, request, leftover, net_request, arrived, reason)

    # ---- SOCKS5 ----------------------------------------------------------

    async def _serve_socks(self, conn, data: bytes, deadline: float, overloaded: bool = False) -> None:
        arrived = time.time()
        handshake = proto.Socks5Handshake(require_auth=self._require_secret)
        handshake.receive_data(data)
        command = None
        try:
            with trio.move_on_at(deadline) as timer:
                while True:
                    event = handshake.next_event()
                    if event is proto.NEED_DATA:
                        chunk = await conn.recv(_READ)
                        if not chunk:
                            return
                        handshake.receive_data(chunk)
                    elif isinstance(event, proto.SocksReply):
                        await _send(conn, event.data)
                    elif isinstance(event, proto.SocksFailed):
                        await _send(conn, event.data)
                        return
                    elif isinstance(event, proto.SocksAuth):
                        try:
                            command = self._command((event.user, event.password))
                            ok = True
                        except _Refused:
                            ok = False
                        await _send(conn, handshake.accept_auth(ok))
                        if not ok:
                            return
                    else:
                        break
            if timer.cancelled_caught:
                return
        except proto.InvalidHost as exc:
            # Past the authentication, when there is one: the sandbox's.
            self._record_invalid_host(exc, "socks", arrived, None, command)
            await _send(conn, proto.socks5_reply(proto.ADDRESS_TYPE_NOT_SUPPORTED))
            return
        except proto.ProtocolError:
            return  # SOCKS has no way to say more; the connection closes
        if not isinstance(event, proto.SocksConnect):  # the loop ends only at one
            return
        try:
            host = _host(event.host)
            if overloaded:
                raise _Refused(503, proto.GENERAL_FAILURE, self._overload_reason())
            net_request = NetworkRequest(host=host, port=event.port, protocol="socks", method=None,
                                         url=None, command=command)
            upstream, reason = await self._open_upstream(net_request)
        except _Refused as refused:
            if refused.decided:
                self.record(NetworkEvent(arrived, _safe_host(event.host), event.port, "socks", False,
                                         refused.reason, command, failed=refused.failed))
            await _send(conn, proto.socks5_reply(refused.socks_code))
            return
        with upstream:
            await self._tunnel(conn, upstream, proto.socks5_reply(proto.SUCCEEDED), handshake.trailing_data,
                               net_request, arrived, reason)

    # ---- shared ----------------------------------------------------------

    def _overload_reason(self) -> str:
        if self.open_connections >= self.max_connections:
            return f"too many connections ({self.max_connections})"
        return (f"too many connections through the proxies of the host process ({_process_budget()}, "
                "for its RLIMIT_NOFILE)")

    def _record_invalid_host(self, exc: proto.InvalidHost, protocol: str, arrived: float,
                             credentials: tuple[str, str] | None, command: str | None = None) -> None:
        """A request that named no valid host is a denied event, as one whose
        host failed later (_host), when it is the sandbox's: with its
        credential where the proxy asks for one (HTTP: ``credentials``;
        SOCKS: checked before, ``command``)."""
        if protocol != "socks":
            try:
                command = self._command(credentials)
            except _Refused:
                return  # not the sandbox's: nothing is recorded for those
        self.record(NetworkEvent(arrived, _safe_host(exc.host), exc.port, protocol, False,
                                 f"invalid host: {exc}", command))

    def _command(self, credentials: tuple[str, str] | None) -> str | None:
        """The command that the proxy credential names (None: anonymous),
        or _Refused(407)."""
        if credentials is None:
            if self._require_secret:
                raise _Refused(407, proto.NOT_ALLOWED, "this proxy needs the sandbox's credential",
                               decided=False)
            return None
        user, password = credentials
        if not _same(password, self._secret):
            raise _Refused(407, proto.NOT_ALLOWED, "wrong proxy credential", decided=False)
        return self.commands.get(user)

    async def _open_upstream(self, request: NetworkRequest) -> tuple[trio.socket.SocketType, str]:
        """A connected socket to what the request names, and the policy's
        reason for allowing it; or _Refused."""
        decision = await self.policy.decide(request)
        if not decision.allowed:
            raise _Refused(403, proto.NOT_ALLOWED, decision.reason, public=sandbox_reason(decision))
        literal = _netaddr.parse_ip(request.host)
        if literal is not None:
            addresses = [literal]
        else:
            try:
                found: Sequence[str]
                with trio.fail_after(CONNECT_TIMEOUT):
                    if self._resolver is None:
                        found = await self._lookup(request.host, request.port)
                    else:
                        found = await self._resolver(request.host, request.port)
                addresses = [_address(a) for a in found]
            except (OSError, ValueError, trio.TooSlowError) as exc:
                raise _Refused(502, proto.HOST_UNREACHABLE, f"cannot resolve {request.host}: {exc}",
                               failed=True) from None
            if not addresses:
                raise _Refused(502, proto.HOST_UNREACHABLE, f"{request.host} has no address", failed=True)
        for address in addresses:
            internal = _netaddr.is_restricted(address) or _is_local(address, request.port)
            if internal and not self.policy.permits_restricted(request, address):
                what = ("an internal address (loopback, private, link-local, metadata or this host's own) "
                        "that the policy does not name")
                if literal is not None:
                    raise _Refused(403, proto.NOT_ALLOWED, f"{request.host} is {what}")
                # The sandbox learns that, not where the name points.
                raise _Refused(403, proto.NOT_ALLOWED, f"{request.host} resolves to {address}, which is {what}",
                               public=f"{request.host} resolves to {what}")
        errors = []
        with trio.move_on_after(CONNECT_TIMEOUT):
            for address in addresses:
                family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
                try:
                    sock = trio.socket.socket(family, socket.SOCK_STREAM)
                except OSError as exc:  # the host process is out of fds (or memory)
                    raise _Refused(503, proto.GENERAL_FAILURE, f"the proxy cannot open a socket: {exc}",
                                   failed=True) from None
                try:
                    await sock.connect((str(address), request.port))
                except OSError as exc:
                    sock.close()
                    errors.append(f"{address}: {exc.strerror or exc}")
                    continue
                except BaseException:
                    sock.close()
                    raise
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock, decision.reason
        detail = "; ".join(errors) or "timed out"
        raise _Refused(502, proto.CONNECTION_REFUSED, f"cannot connect to {request.host}:{request.port}: {detail}",
                       failed=True)

    async def _forward(self, conn, upstream, request, leftover: bytes, net_request: NetworkRequest,
                       arrived: float, reason: str) -> None:
        """Plain HTTP: exactly one request goes upstream, its head rewritten
        and its body as long as Content-Length says; whatever the client
        sends after it (a pipelined second request, perhaps to another host
        on the same server) is read and dropped, never passed on.  The
        response comes back with ``Connection: close``, and the connection
        ends when its body does (by Content-Length, else when the server
        closes), or as soon as the client closes or resets its side: a client
        that gave up must not keep its slot while the server never answers.
        (So a client that half-closes after its request gets no answer, as
        with nginx's and squid's defaults.)"""
        remaining = proto.request_body_length(request)
        body = leftover[:remaining]
        remaining -= len(body)
        head = proto.forward_head(request)
        sent = received = 0
        try:
            await _send(upstream, head + body)
            sent = len(head) + len(body)

            async def from_client(done: trio.CancelScope) -> None:
                nonlocal remaining, sent
                try:
                    while chunk := await conn.recv(min(_READ, remaining) if remaining > 0 else _READ):
                        if remaining > 0:
                            await _send(upstream, chunk)
                            remaining -= len(chunk)
                            sent += len(chunk)
                except OSError:
                    pass  # a reset, or a server that stopped reading: the request ends
                done.cancel()  # the client is gone, and so is the request

            def from_server(count: int) -> None:
                nonlocal received
                received += count

            async def to_client(data: bytes) -> None:
                await _send(conn, data)

            async def respond(done: trio.CancelScope) -> None:
                nonlocal reason
                try:
                    unanswered = await self._respond(upstream, request.method, to_client, from_server)
                    if unanswered:
                        reason += f" (the client got 502: {unanswered})"
                except OSError:
                    pass  # either end went away
                done.cancel()

            # Both ends are watched at once; errors stay inside each task, so
            # that a peer going away never reaches the nursery as a group.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(from_client, nursery.cancel_scope)
                nursery.start_soon(respond, nursery.cancel_scope)
        finally:
            self.record(NetworkEvent(arrived, net_request.host, net_request.port, "http", True,
                                     reason, net_request.command, sent, received))
        await _linger(conn, LINGER_TIMEOUT)

    async def _respond(self, upstream, method: str, to_client: Callable[[bytes], Awaitable[None]],
                       from_server: Callable[[int], None]) -> str | None:
        """Pass the upstream's response on: interim heads, then the final
        head with ``Connection: close`` and its body, up to where it ends.
        A server that sends no HTTP response head (garbage, a close or a
        reset before one) gets the client a 502: what went wrong is returned.
        ``from_server`` counts the bytes read from the server (the event's
        ``bytes_received``: not the heads as rewritten, nor heel's 502 page)."""
        buf = bytearray()
        searched = 0
        try:
            while True:
                response = proto.parse_response_head(buf, searched)
                if response is None:
                    searched = len(buf)
                    try:
                        chunk = await upstream.recv(_READ)
                    except OSError as exc:
                        raise proto.ProtocolError(
                            f"the server reset the connection without a response ({exc.strerror or exc})", 502
                        ) from None
                    if not chunk:
                        raise proto.ProtocolError("the server closed the connection without a response", 502)
                    from_server(len(chunk))
                    buf += chunk
                    continue
                length = proto.response_body_length(response, method)
                del buf[:response.head_length]
                searched = 0  # what follows the interim head is searched anew
                if not response.interim:
                    break
                await to_client(proto.forward_response_head(response))
        except proto.ProtocolError as exc:
            await to_client(proto.http_response(502, _reason(502), f"heel proxy: {exc}"))
            return str(exc)
        first = bytes(buf if length is None else buf[:length])
        await to_client(proto.forward_response_head(response) + first)
        left = None if length is None else length - len(first)
        while left is None or left > 0:
            chunk = await upstream.recv(_READ if left is None else min(_READ, left))
            if not chunk:
                return None  # a short body: the client sees it by its Content-Length
            from_server(len(chunk))
            await to_client(chunk)
            if left is not None:
                left -= len(chunk)
        return None

    async def _tunnel(self, conn, upstream, answer: bytes, first_out: bytes, request: NetworkRequest,
                      arrived: float, reason: str) -> None:
        """Tell the client its tunnel is open (``answer``), pass on what it
        sent early (``first_out``) and relay; the event is recorded however
        that ends: the upstream connection is made, even when the client is
        gone before it reads ``answer``."""
        sent = 0
        result = None
        for sock in (conn, upstream):
            _keepalive(sock)
        try:
            try:
                await _send(conn, answer)
            except OSError as exc:
                reason = f"{reason} (the client was gone before the tunnel opened: {exc.strerror or exc})"
                raise
            if first_out:
                await _send(upstream, first_out)
                sent = len(first_out)
            try:
                result = await _relay.relay(conn, upstream)
            except OSError as exc:  # out of fds for its pipes: the client had its 200 already
                reason = f"{reason} (the tunnel ended at once: the relay could not take it: {exc})"
                raise
        finally:
            sent_total = sent + (result.a_to_b if result else 0)
            received = result.b_to_a if result else 0
            self.record(NetworkEvent(arrived, request.host, request.port, request.protocol, True,
                                     reason, request.command, sent_total, received))


def _address(text) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A resolved address in its canonical form (::ffff:a.b.c.d is a.b.c.d);
    ValueError for anything that is not an IP address."""
    address = _netaddr.parse_ip(_netaddr.normalize_host(str(text)))
    if address is None:
        raise ValueError(f"{text!r} is not an IP address")
    return address


def _credentials(request) -> tuple[str, str] | None:
    try:
        return proto.proxy_credentials(request)
    except proto.ProtocolError as exc:
        raise _Refused(exc.status, proto.GENERAL_FAILURE, str(exc), decided=False) from None


def _host(raw: str) -> str:
    try:
        return _netaddr.normalize_host(raw)
    except ValueError as exc:
        raise _Refused(400, proto.ADDRESS_TYPE_NOT_SUPPORTED, f"invalid host: {exc}") from None


def _safe_host(raw: str) -> str:
    """The host of a request for its event: normalised, or (not a valid
    host) shown, cut to what a host name can be: the sandbox writes it, and
    each event is kept (up to the cap on their number) and printed."""
    try:
        return _netaddr.normalize_host(raw)
    except ValueError:
        return repr(raw[:253]) + ("..." if len(raw) > 253 else "")


#: How many rounds of %-decoding _has_dot_segment looks through: servers
#: behind a decoding proxy or framework decode twice (``%252e``).
_DECODE_ROUNDS = 3


#: NUL, overlong UTF-8 dots and slashes, and IIS's %u escapes of them.
_ODD_SPELLINGS = ("%00", "%c0%ae", "%e0%80%ae", "%f0%80%80%ae", "%c0%af", "%e0%80%af", "%f0%80%80%af",
                  "%u002e", "%u002f")


def _has_dot_segment(path: str) -> bool:
    """Whether the path of an origin-form target (``/a/b?q``) has a ``.`` or
    ``..`` segment, as written or %-encoded (``%2e``, ``.%2E``), also where
    an encoded slash or a backslash, which some servers take for a slash,
    ends the segment (``..%2f``, ``..\\``), where the segment carries
    parameters (``..;x=1``, which Java servers strip), after up to three
    rounds of decoding (``%252e``), or spelled with an overlong UTF-8 dot
    or slash (``%c0%ae``, ``%c0%af``) or IIS's ``%u002e``.  A NUL (``%00``) counts too: a server that ends the path
    there may see ``..``.  The query is not looked at."""
    path = path.split("?", 1)[0]
    if "." not in path and "%" not in path:
        return False
    text = path
    for _ in range(_DECODE_ROUNDS):
        lowered = text.lower()
        if "\0" in text or any(spelling in lowered for spelling in _ODD_SPELLINGS):
            return True
        for segment in text.replace("\\", "/").split("/"):
            if segment.split(";", 1)[0] in (".", ".."):
                return True
        decoded = urllib.parse.unquote(text, errors="replace")
        if decoded == text:
            return False
        text = decoded
    return True  # still more to decode: no server of ours needs that many


def _url(host: str, port: int, path: str) -> str:
    netloc = f"[{host}]" if ":" in host else host
    if port != 80:
        netloc += f":{port}"
    return f"http://{netloc}{path}"


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _keepalive(sock) -> None:
    idle, interval, count = KEEPALIVE
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    except OSError:
        pass  # a tunnel without keepalive still works


async def _linger(conn, timeout: float) -> None:
    """End an HTTP answer gracefully: close the way to the client (it reads
    the answer to its end), then read and drop what it still sends, for at
    most *timeout* seconds, until it closes too.  Closing with unread bytes
    would reset the connection, and a reset can destroy the answer before
    the client has read it (a client still sending a body it was refused)."""
    try:
        conn.shutdown(socket.SHUT_WR)
        with trio.move_on_after(timeout):
            while await conn.recv(_READ):
                pass
    except OSError:
        pass


async def _send(sock, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = await sock.send(view)
        view = view[n:]
