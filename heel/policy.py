"""Network policies.

The sandbox has no network of its own; everything it sends must leave
through heel's proxy, which asks the policy about each request
(:meth:`NetworkPolicy.decide`).  :class:`DenyAll`, the default, means no
network at all, not even loopback.  :class:`AllowAll`, :class:`AllowList`
and :class:`CustomPolicy` let requests through, and policies combine:
``a | b`` allows what either allows, ``a & b`` what both allow, ``~a`` what
``a`` denies::

    AllowList(["pypi.org", "*.pythonhosted.org"]) | CustomPolicy(ask_the_user)
    AllowAll() & ~AllowList(["*.internal.example.com"])

Whatever a policy allows, the proxy refuses to connect to a restricted
address (loopback, private, link-local, cloud metadata, ...; see
:func:`heel._netaddr.is_restricted`) unless the policy names it
(:meth:`NetworkPolicy.permits_restricted`), so a public name that resolves
to 169.254.169.254 does not reach the metadata service.
"""

from __future__ import annotations

import abc
from collections import namedtuple
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar

from .errors import PolicyError

# Not typing.TYPE_CHECKING: see NetworkRequest below.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import ipaddress

    _IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

__all__ = ["NetworkPolicy", "DenyAll", "AllowAll", "AllowList", "CustomPolicy", "NetworkRequest", "Decision"]


def normalize_host(host: str) -> str:
    # heel._netaddr (and ipaddress) on first use: `heel run` imports this
    # module for DenyAll alone, and never needs them.
    from ._netaddr import normalize_host

    return normalize_host(host)


def parse_ip(host: str):
    from ._netaddr import parse_ip

    return parse_ip(host)


# collections.namedtuple rather than typing.NamedTuple (the same thing at run
# time): `import heel` imports this module, and typing costs `heel run` ~5 ms.
class NetworkRequest(
    namedtuple("NetworkRequest", ["host", "port", "protocol", "method", "url", "command"], defaults=(None, None, None))
):
    """One request the sandbox made through the proxy.

    ``host`` is canonical (``heel._netaddr.normalize_host``: lower case,
    IPv4 as a dotted quad, IPv6 compressed); ``port`` the port it asked for;
    ``protocol`` ``"connect"`` (HTTP CONNECT), ``"http"`` (plain HTTP
    forwarding) or ``"socks"`` (SOCKS5).  ``method`` and ``url`` are set for
    plain HTTP only; ``command`` names the sandboxed command that asked, when
    known.

    ``url`` is ``http://`` + the canonical host (and the port, unless 80) +
    the path and query exactly as the request sent them, which is what goes
    to the server: it is not normalised (percent-encoding, ``//``, case
    stay as written, and the server may read them otherwise).  One thing is
    refused before a policy is asked: a path with a dot segment (``.`` or
    ``..``, as written or %-encoded, ``%2e``, and also where ``%2f``,
    ``%5c`` or ``\\`` ends it) gets 400, so a policy that matches
    ``url.startswith("http://files.example/public/")`` does not pass
    ``/public/../secret``.
    """

    __slots__ = ()
    host: str
    port: int
    protocol: str
    method: str | None
    url: str | None
    command: str | None


class Decision(namedtuple("Decision", ["allowed", "reason"])):
    """A policy's answer: ``allowed``, and the ``reason`` in words
    (``"not in the allow-list"``, ``"matches *.example.com"``), which heel
    reports with each denied request: in the host's event, and to the
    sandbox in the body of the 403.  A reason heel writes from what only the
    host should know (the text of a :class:`CustomPolicy`'s exception) goes
    to the event alone; the sandbox reads "the policy failed"."""

    __slots__ = ()
    allowed: bool
    reason: str


class _Withheld(Decision):
    """A decision whose ``reason`` is for the host alone; ``public`` is what
    the sandbox may read instead (see :func:`sandbox_reason`)."""

    # No __slots__: ``public`` lives in the instance's __dict__, and the
    # tuple stays (allowed, reason), equal to a Decision of the same two.
    public = "the policy failed"

    def __new__(cls, allowed: bool, reason: str, public: str = "the policy failed") -> _Withheld:
        decision = super().__new__(cls, allowed, reason)
        decision.public = public
        return decision

    def __repr__(self) -> str:
        return f"Decision(allowed={self.allowed!r}, reason={self.reason!r})"


class _Failed(_Withheld):
    """A denial because a policy failed (a CustomPolicy that raised, was
    late or answered wrongly): it is no answer, so it stays a denial
    whatever combines it.  ``~`` does not turn it into an allow (that would
    let everything through while a blocklist service is down), and a
    ``|`` whose parts all denied, one of them by failing, fails too."""

    def __new__(cls, allowed: bool, reason: str, public: str = "the policy failed") -> _Failed:
        decision = super().__new__(cls, False, reason, public)
        assert isinstance(decision, _Failed)
        return decision


def sandbox_reason(decision: Decision) -> str:
    """The reason of ``decision`` as the sandbox may read it (the proxy's
    403 body): its reason, less what only the host should know."""
    return decision.public if isinstance(decision, _Withheld) else decision.reason


def _decision(allowed: bool, reason: str, public: str) -> Decision:
    """A Decision, or a _Withheld one when the sandbox must read less."""
    return Decision(allowed, reason) if public == reason else _Withheld(allowed, reason, public)


def _joined(allowed: bool, decisions: list[Decision]) -> Decision:
    """The parts' reasons, one after another, for the host and for the
    sandbox; a denial among whose parts one failed is a failure (_Failed)."""
    reason = "; ".join(decision.reason for decision in decisions)
    public = "; ".join(sandbox_reason(decision) for decision in decisions)
    if not allowed and any(isinstance(decision, _Failed) for decision in decisions):
        return _Failed(False, reason, public)
    return _decision(allowed, reason, public)


class NetworkPolicy(abc.ABC):
    """Base of all network policies.

    Subclasses implement :meth:`decide`, and :meth:`permits_restricted` when
    they can name restricted addresses.  Policies combine with ``|``, ``&``
    and ``~``.
    """

    if TYPE_CHECKING:
        # Read-only to the type checker, so that the combinations may work
        # them out as properties; plain class attributes at run time.
        @property
        def denies_everything(self) -> bool: ...
        @property
        def _allows_everything(self) -> bool: ...
    else:
        #: True when the policy can never allow anything: no proxy is started and
        #: the sandbox gets no TCP at all.
        denies_everything = False
        # True when the policy allows every request; lets ``~`` and the
        # combinations work out denies_everything.
        _allows_everything = False

    @abc.abstractmethod
    async def decide(self, request: NetworkRequest) -> Decision:
        """Whether the proxy may carry ``request``, and why."""

    def permits_restricted(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        """Whether this policy lets ``request`` (already allowed by
        :meth:`decide`) reach the restricted address ``addr`` it resolved
        to: it names the address, or vouches for what it allows.  None by
        default.

        The proxy asks after :meth:`decide`, in the same trio task: ``a | b``
        counts a vouching part only if it allowed the request, which only
        its ``decide`` in this task knows.
        """
        return False

    def _names_restricted(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        """Whether a pattern of this policy names ``addr`` (an address or a
        network holding it) or the request's exact host, port included, and
        the policy's text alone shows that it allows ``request`` (going to
        ``addr``): what lets a part of ``a | b`` that was never asked vouch
        for the address."""
        return False

    def _surely_allows(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        """Whether the policy's text alone shows that it allows ``request``
        going to ``addr`` (an AllowList that names the address counts: the
        user said it may be reached).  False when only asking could tell (a
        CustomPolicy)."""
        return False

    def _might_allow(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        """False only when the policy's text shows that it denies ``request``
        going to ``addr``: an AllowList that matches neither the host nor the
        address (what ``~`` turns into a sure allowance)."""
        return True

    def _mentions(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        """Whether an AllowList anywhere in the policy names ``addr`` or the
        request's exact host (port included), whatever it decides: a part
        whose answer for the address is unknown and that mentions it may
        mean it (``~(AllowList([address]) & CustomPolicy(f))``)."""
        return False

    def __or__(self, other: NetworkPolicy) -> NetworkPolicy:
        if not isinstance(other, NetworkPolicy):
            return NotImplemented
        return _AnyOf(_parts(self, _AnyOf) + _parts(other, _AnyOf))

    def __and__(self, other: NetworkPolicy) -> NetworkPolicy:
        if not isinstance(other, NetworkPolicy):
            return NotImplemented
        return _AllOf(_parts(self, _AllOf) + _parts(other, _AllOf))

    def __invert__(self) -> NetworkPolicy:
        return _Not(self)


class DenyAll(NetworkPolicy):
    """No network: no TCP, no UDP, no DNS, not even loopback."""

    denies_everything = True

    async def decide(self, request: NetworkRequest) -> Decision:
        """Denies every request."""
        return Decision(False, "no network (DenyAll)")

    def _might_allow(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        return False

    def __repr__(self) -> str:
        return "DenyAll()"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DenyAll)

    def __hash__(self) -> int:
        return hash(DenyAll)


class AllowAll(NetworkPolicy):
    """Every request, to any host and port.  Restricted addresses (loopback,
    private networks, cloud metadata) are still refused: this policy names
    none of them."""

    _allows_everything = True

    async def decide(self, request: NetworkRequest) -> Decision:
        """Allows every request."""
        return Decision(True, "AllowAll allows every host")

    def _surely_allows(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        return True

    def __repr__(self) -> str:
        return "AllowAll()"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AllowAll)

    def __hash__(self) -> int:
        return hash(AllowAll)


# One allow-list entry.  kind: "name" (target is a canonical name),
# "wildcard" (target is the suffix after "*."), or "network" (target is an
# IPv4Network/IPv6Network; a single address is a /32 or /128).  port: None
# for any port.
_Pattern = namedtuple("_Pattern", ["kind", "target", "port"])


class AllowList(NetworkPolicy):
    """Requests to the hosts the patterns name, and nothing else.

    Patterns: exact names (``"pypi.org"``); wildcards (``"*.example.com"``:
    subdomains at any depth, not ``example.com`` itself); IP addresses in any
    spelling (``"10.0.0.5"``, ``"::1"``); networks in CIDR notation
    (``"10.0.0.0/8"``, ``"fd00::/8"``).  Each may end in ``:port``
    (``"example.com:443"``, ``"[::1]:8080"``, ``"10.0.0.0/8:5432"``); an
    IPv6 address or network needs brackets to take a port.  Names match
    without regard to case or a trailing dot; address patterns match requests
    whose host is an address, never names that resolve to one.

    A malformed pattern raises :class:`~heel.PolicyError` here.  An empty list
    denies every request (each still reported).  Exact names and addresses
    count as naming a restricted address (:meth:`permits_restricted`);
    wildcards do not.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        if isinstance(patterns, str) or not isinstance(patterns, Iterable):
            raise PolicyError(f"AllowList takes a list of patterns, got {patterns!r}")
        # dict.fromkeys: drops duplicates, keeps the order for repr.
        self._patterns = tuple(dict.fromkeys(_parse_pattern(pattern) for pattern in patterns))

    async def decide(self, request: NetworkRequest) -> Decision:
        """Allowed when a pattern matches the request's host and port."""
        return self._decide_now(request)

    def _decide_now(self, request: NetworkRequest) -> Decision:
        try:
            host = normalize_host(request.host)
        except ValueError as error:
            return Decision(False, f"invalid host: {error}")
        ip = parse_ip(host)
        for_host = [pattern for pattern in self._patterns if _matches_host(pattern, host, ip)]
        for pattern in for_host:
            if pattern.port in (None, request.port):
                return Decision(True, f"matches {_pattern_text(pattern)}")
        if for_host:
            return Decision(False, f"port {request.port} is not in the allow-list for {host}")
        return Decision(False, "not in the allow-list")

    def permits_restricted(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        return self._names_restricted(request, addr)

    def _names_restricted(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        """True when an exact name equals the request's host, or an address
        or network contains ``addr``, and the port fits."""
        try:
            host = normalize_host(request.host)
        except ValueError:
            return False
        addr = _unmapped(addr)
        for pattern in self._patterns:
            if pattern.port not in (None, request.port):
                continue
            if pattern.kind == "name" and pattern.target == host:
                return True
            if pattern.kind == "network" and addr in pattern.target:
                return True
        return False

    def _surely_allows(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        return self._decide_now(request).allowed or self._names_restricted(request, addr)

    def _might_allow(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        return self._surely_allows(request, addr)

    def _mentions(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        return self._names_restricted(request, addr)

    def __repr__(self) -> str:
        return f"AllowList({[_pattern_text(pattern) for pattern in self._patterns]!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AllowList):
            return NotImplemented
        return set(self._patterns) == set(other._patterns)

    def __hash__(self) -> int:
        return hash(frozenset(self._patterns))


def _parse_pattern(pattern: object) -> _Pattern:
    """One AllowList pattern, or PolicyError naming it."""
    if not isinstance(pattern, str):
        raise PolicyError(f"allow-list pattern {pattern!r} is not a string")
    try:
        host, port = _split_port(pattern)
        if host.startswith("*."):
            return _Pattern("wildcard", _wildcard_suffix(host), port)
        if "/" in host:
            import ipaddress

            return _Pattern("network", ipaddress.ip_network(host.strip("[]"), strict=True), port)
        name = normalize_host(host)
    except ValueError as error:
        raise PolicyError(f"allow-list pattern {pattern!r}: {error}") from None
    ip = parse_ip(name)
    if ip is None:
        return _Pattern("name", name, port)
    import ipaddress

    return _Pattern("network", ipaddress.ip_network(ip), port)


def _split_port(pattern: str) -> tuple[str, int | None]:
    """``(host, port)``: brackets enclose an IPv6 address or network that takes
    a port; a bare one with its many colons has none."""
    if pattern.startswith("["):
        close = pattern.find("]")
        if close < 0:
            raise ValueError("'[' without ']'")
        host, rest = pattern[: close + 1], pattern[close + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError(f"unexpected {rest!r} after ']'")
        return host, _parse_port(rest[1:])
    if pattern.count(":") == 1:
        host, port = pattern.split(":")
        return host, _parse_port(port)
    return pattern, None


def _parse_port(text: str) -> int:
    from ._netaddr import parse_port

    port = parse_port(text)
    if port is None:
        raise ValueError(f"port {text!r} is not a number from 1 to 65535")
    return port


def _wildcard_suffix(host: str) -> str:
    """The name after ``*.``, which must be a name, not an address."""
    suffix = normalize_host(host[2:])
    if parse_ip(suffix) is not None:
        raise ValueError("a wildcard needs a name after '*.', not an address")
    return suffix


def _matches_host(pattern: _Pattern, host: str, ip: _IPAddress | None) -> bool:
    if pattern.kind == "network":
        return ip is not None and ip in pattern.target
    if ip is not None:
        return False
    if pattern.kind == "name":
        return host == pattern.target
    return host.endswith("." + pattern.target)


def _pattern_text(pattern: _Pattern) -> str:
    """The canonical spelling of a pattern, as repr and reasons show it."""
    if pattern.kind == "wildcard":
        host = "*." + pattern.target
    elif pattern.kind == "name":
        host = pattern.target
    elif pattern.target.num_addresses == 1:
        host = str(pattern.target.network_address)
    else:
        host = str(pattern.target)
    if pattern.port is None:
        return host
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{pattern.port}"


def _unmapped(addr: _IPAddress) -> _IPAddress:
    """``addr``, or the IPv4 address it maps when it is ``::ffff:a.b.c.d``
    (what a resolver may hand back for an IPv4 host)."""
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr if mapped is None else mapped


class CustomPolicy(NetworkPolicy):
    """Asks an async function: ``func(request)`` returns a bool or a
    :class:`Decision`.

    The answer must come within ``timeout`` seconds.  A function that raises,
    hangs past the timeout or returns anything else denies the request, with
    a reason that says so: the host's event names the exception (its text
    included) or the wrong answer, while the sandbox reads only "the policy
    failed".  ``allow_restricted=True`` lets the requests it
    allows reach restricted addresses (loopback, private networks, cloud
    metadata): only for a function that checks the host itself.
    """

    def __init__(
        self,
        func: Callable[[NetworkRequest], Awaitable[bool | Decision]],
        *,
        timeout: float = 5.0,
        allow_restricted: bool = False,
    ) -> None:
        if not callable(func):
            raise PolicyError(f"CustomPolicy needs an async function, got {func!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise PolicyError(f"CustomPolicy: timeout must be a number of seconds above 0, got {timeout!r}")
        if not isinstance(allow_restricted, bool):
            raise PolicyError(f"CustomPolicy: allow_restricted must be a bool, got {allow_restricted!r}")
        self.func = func
        self.timeout = timeout
        self.allow_restricted = allow_restricted

    async def decide(self, request: NetworkRequest) -> Decision:
        """The function's answer, or a denial when it fails or is late."""
        import trio  # here, not above: `heel run` imports this module and never needs trio

        with trio.move_on_after(self.timeout) as deadline:
            decision = await self._ask(request)
        # cancel_called, not cancelled_caught: a late answer from a function
        # that swallowed the cancellation is still late; and so is one from a
        # function that blocked the event loop (time.sleep in an async def),
        # which no cancellation could reach.
        if deadline.cancel_called or trio.current_time() >= deadline.deadline:
            return _Failed(False, f"policy did not answer within {self.timeout:g} s",
                           f"the policy did not answer within {self.timeout:g} s")
        return decision

    async def _ask(self, request: NetworkRequest) -> Decision:
        try:
            pending = self.func(request)
            if not hasattr(pending, "__await__"):
                return _Failed(
                    False, f"policy {self._name} returned {type(pending).__name__}, not an awaitable: it must be async"
                )
            answer = await pending
        except Exception as error:
            return _Failed(False, f"policy raised {type(error).__name__}: {error}")
        if isinstance(answer, bool):
            return Decision(answer, f"{'allowed' if answer else 'denied'} by {self._name}")
        if isinstance(answer, _Withheld):
            # Another policy's decision passed on (``return await
            # other.decide(request)``): a failure stays one, and what the
            # sandbox may not read stays withheld.
            return answer
        if isinstance(answer, Decision) and isinstance(answer.allowed, bool):
            return Decision(answer.allowed, str(answer.reason))
        return _Failed(False, f"policy {self._name} returned {answer!r}, not a bool or a Decision")

    @property
    def _name(self) -> str:
        return getattr(self.func, "__qualname__", None) or repr(self.func)

    def permits_restricted(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        """``allow_restricted``, as given."""
        return self.allow_restricted

    def __repr__(self) -> str:
        return f"CustomPolicy({self._name}, timeout={self.timeout!r}, allow_restricted={self.allow_restricted!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CustomPolicy):
            return NotImplemented
        return (self.func, self.timeout, self.allow_restricted) == (other.func, other.timeout, other.allow_restricted)

    def __hash__(self) -> int:
        return hash((self.func, self.timeout, self.allow_restricted))


def _parts(policy: NetworkPolicy, combination: type[_Combination]) -> tuple[NetworkPolicy, ...]:
    """The operands ``policy`` brings to a ``combination``: its own parts when
    it is one of the same kind, so that ``a | b | c`` is one flat policy."""
    return policy.parts if isinstance(policy, combination) else (policy,)


class _Combination(NetworkPolicy):
    """``a | b | ...`` or ``a & b & ...``: the parts, asked in order."""

    _operator: str

    def __init__(self, parts: tuple[NetworkPolicy, ...]) -> None:
        self.parts = parts

    def __repr__(self) -> str:
        return "(" + f" {self._operator} ".join(map(repr, self.parts)) + ")"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NetworkPolicy):
            return NotImplemented
        return type(other) is type(self) and other.parts == self.parts

    def __hash__(self) -> int:
        return hash((type(self), self.parts))

    def _mentions(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        return any(part._mentions(request, addr) for part in self.parts)


# For each ``a | b`` that allowed a request in this task, which part did:
# id(combination) -> (combination, request, part).  permits_restricted is
# synchronous and comes after decide, so the answer must outlive decide; a
# context variable keeps it to the task that asked, where a shared record
# would let a concurrent request's answer stand in for this one's.
_ALLOWED_BY: ContextVar[dict[int, tuple[NetworkPolicy, NetworkRequest, NetworkPolicy]]] = ContextVar(
    "heel_policy_allowed_by", default={}
)


class _AnyOf(_Combination):
    """Allows what any part allows; asks the parts in order and stops at the
    first that allows."""

    _operator = "|"

    @property
    def denies_everything(self) -> bool:
        return all(part.denies_everything for part in self.parts)

    @property
    def _allows_everything(self) -> bool:
        return any(part._allows_everything for part in self.parts)

    async def decide(self, request: NetworkRequest) -> Decision:
        """The first part's approval, or every part's reason for denying."""
        denials = []
        for part in self.parts:
            decision = await part.decide(request)
            if decision.allowed:
                self._remember(request, part)
                return decision
            denials.append(decision)
        self._remember(request, None)
        return _joined(False, denials)

    def _remember(self, request: NetworkRequest, part: NetworkPolicy | None) -> None:
        record = {key: entry for key, entry in _ALLOWED_BY.get().items() if key != id(self)}
        if part is not None:
            record[id(self)] = (self, request, part)
        _ALLOWED_BY.set(record)

    def permits_restricted(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        """Whether the part that allowed ``request`` in this task permits
        it, or any part names the address (``AllowAll() |
        AllowList(["10.0.0.5"])``: the internet and that one internal host,
        in either order).  A part that vouches without naming (a
        CustomPolicy with allow_restricted) counts only if it allowed, and
        a part that names the address only if its text shows it allows the
        request (``AllowList(["10.0.0.0/8"]) & CustomPolicy(f)`` was not
        asked, and f might say no)."""
        if self._names_restricted(request, addr):
            return True
        entry = _ALLOWED_BY.get().get(id(self))
        if entry is None or entry[0] is not self or entry[1] != request:
            return False
        return entry[2].permits_restricted(request, addr)

    def _names_restricted(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        return any(part._names_restricted(request, addr) for part in self.parts)

    def _surely_allows(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        return any(part._surely_allows(request, addr) for part in self.parts)

    def _might_allow(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        return any(part._might_allow(request, addr) for part in self.parts)


class _AllOf(_Combination):
    """Allows what every part allows; asks the parts in order and stops at the
    first that denies."""

    _operator = "&"

    @property
    def denies_everything(self) -> bool:
        return any(part.denies_everything for part in self.parts)

    @property
    def _allows_everything(self) -> bool:
        return all(part._allows_everything for part in self.parts)

    async def decide(self, request: NetworkRequest) -> Decision:
        """The first part's denial, or every part's reason for allowing."""
        approvals = []
        for part in self.parts:
            decision = await part.decide(request)
            if not decision.allowed:
                return decision
            approvals.append(decision)
        return _joined(True, approvals)

    def permits_restricted(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        """Whether some part permits it: every part allowed the request, so
        one that names the address (or vouches) is enough, and a ``~`` or an
        AllowAll, which name nothing, do not stand in the way
        (``AllowList(["api.internal"]) & ~AllowList(["bad.internal"])``).
        A ``~`` whose inner policy names the address itself does: the
        request was allowed by its host's name, and the exclusion means the
        address (``(AllowAll() | AllowList(["10.0.0.0/8"])) &
        ~AllowList(["10.0.0.5"])`` for a name that resolves to 10.0.0.5);
        and so does a part whose answer for the address cannot be told
        from its text but which mentions it (``~(AllowList(["10.0.0.5"]) &
        CustomPolicy(f))``: f was not asked)."""
        return (any(part.permits_restricted(request, addr) for part in self.parts)
                and all(part._might_allow(request, addr)
                        and (part._surely_allows(request, addr) or not part._mentions(request, addr))
                        for part in self.parts))

    def _names_restricted(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        # A part names it, and every part surely allows the request: not
        # AllowList(["127.0.0.1"]) & ~AllowList(["127.0.0.1:22"]) for port 22.
        return (any(part._names_restricted(request, addr) for part in self.parts)
                and self._surely_allows(request, addr))

    def _surely_allows(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        return all(part._surely_allows(request, addr) for part in self.parts)

    def _might_allow(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        return all(part._might_allow(request, addr) for part in self.parts)


class _Not(NetworkPolicy):
    """Allows what ``inner`` denies and denies what it allows.  Names no
    restricted address: it cannot tell which ones it means."""

    def __init__(self, inner: NetworkPolicy) -> None:
        self.inner = inner

    @property
    def denies_everything(self) -> bool:
        return self.inner._allows_everything

    @property
    def _allows_everything(self) -> bool:
        return self.inner.denies_everything

    async def decide(self, request: NetworkRequest) -> Decision:
        """The inner policy's answer, turned around."""
        decision = await self.inner.decide(request)
        if isinstance(decision, _Failed):  # no answer to turn around: still a denial
            return _Failed(False, f"cannot exclude: {decision.reason}", sandbox_reason(decision))
        verdict = "excluded" if decision.allowed else "not excluded"
        return _decision(not decision.allowed, f"{verdict}: {decision.reason}",
                         f"{verdict}: {sandbox_reason(decision)}")

    def _surely_allows(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        return not self.inner._might_allow(request, addr)

    def _might_allow(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        return not self.inner._surely_allows(request, addr)

    def _mentions(self, request: NetworkRequest, addr: _IPAddress) -> bool:
        return self.inner._mentions(request, addr)

    def __invert__(self) -> NetworkPolicy:
        return self.inner

    def __repr__(self) -> str:
        return f"~{self.inner!r}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NetworkPolicy):
            return NotImplemented
        return isinstance(other, _Not) and other.inner == self.inner

    def __hash__(self) -> int:
        return hash((_Not, self.inner))
