"""Host names and IP addresses as the proxy sees them: validation, one
canonical spelling per host, and the addresses that are off limits.

Pure functions, no I/O.  A host arrives from code in the sandbox, which may
spell ``127.0.0.1`` as ``2130706433`` or ``0x7f.1`` to slip past a policy
that compares strings; :func:`normalize_host` turns every spelling the C
library's ``inet_aton`` (and so ``getaddrinfo``) would accept into the one
the policy sees.
"""

from __future__ import annotations

import ipaddress

__all__ = ["normalize_host", "parse_ip", "parse_port", "is_restricted"]

#: The longest DNS name, without its trailing dot (RFC 1035 section 2.3.4).
_MAX_NAME = 253
_MAX_LABEL = 63
_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_port(text: str) -> int | None:
    """The TCP port ``text`` names: ASCII digits (no more than five: int()
    would read thousands), 1 to 65535; None for anything else.  The one
    reading of a port for policies and the proxy's requests alike."""
    if not (text.isascii() and text.isdigit() and len(text) <= 5):
        return None
    port = int(text)
    return port if 1 <= port <= 65535 else None


def normalize_host(host: str) -> str:
    """The canonical form of the host of a proxy request.

    Names come back in lower case without a trailing dot; IPv6 literals
    (bracketed or not) in compressed form, or as IPv4 when IPv4-mapped;
    IPv4 addresses in any ``inet_aton`` spelling as a dotted quad.  Raises
    ValueError for anything that is neither a plain DNS name nor an IP
    literal: control characters, whitespace, zone ids, ``/`` and ``@``,
    non-ASCII (IDNA encoding is the client's job), over-long names or labels,
    empty labels, and numeric-looking names that are not valid IPv4.
    """
    if not isinstance(host, str):
        raise TypeError(f"host must be a str, got {type(host).__name__}")
    _check_characters(host)
    if host.startswith("[") or ":" in host:
        return _normalize_ipv6(host)
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    # Like a URL parser, treat a host whose last label is a number as an
    # IPv4 address: no top-level domain is numeric, and a resolver would
    # read it as an address, never as a name.
    if _is_number(labels[-1]):
        return str(_parse_inet_aton(labels, host))
    _check_name(name, labels, host)
    return name.lower()


def parse_ip(canonical_host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address when ``canonical_host`` (from :func:`normalize_host`) is an
    IP literal, else None."""
    try:
        return ipaddress.ip_address(canonical_host)
    except ValueError:
        return None


# IPv4 networks a proxy must not reach unless a policy names them.
_RESTRICTED_IPV4 = tuple(
    ipaddress.IPv4Network(network)
    for network in (
        "0.0.0.0/8",  # "this network", 0.0.0.0 included; Linux connects it to loopback
        "10.0.0.0/8",  # private
        "100.64.0.0/10",  # shared address space (carrier NAT; Alibaba's metadata 100.100.100.200)
        "127.0.0.0/8",  # loopback
        "168.63.129.16/32",  # Azure's platform endpoint (WireServer: a VM's certificates, extensions)
        "169.254.0.0/16",  # link-local (the cloud metadata service 169.254.169.254)
        "172.16.0.0/12",  # private
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation (TEST-NET-1)
        "192.88.99.0/24",  # deprecated 6to4 relay anycast
        "192.168.0.0/16",  # private
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation (TEST-NET-2)
        "203.0.113.0/24",  # documentation (TEST-NET-3)
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, 255.255.255.255 (broadcast) included
    )
)
# Only 2000::/3 is global unicast; everything outside it is loopback,
# unspecified, unique local (fc00::/7, AWS's metadata fd00:ec2::254),
# link-local, site-local, multicast or reserved.
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
# Special-purpose blocks inside 2000::/3.
_RESTRICTED_IPV6 = tuple(
    ipaddress.IPv6Network(network)
    for network in (
        "2001::/23",  # IETF protocol assignments (benchmarking, ORCHID, ...); Teredo is judged apart
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def is_restricted(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for an address the proxy must not reach unless a policy names it.

    IPv4: 0.0.0.0/8 (unspecified and "this network"), 10.0.0.0/8,
    172.16.0.0/12 and 192.168.0.0/16 (private), 100.64.0.0/10 (shared address
    space, where Alibaba Cloud's metadata service 100.100.100.200 lives),
    127.0.0.0/8 (loopback), 168.63.129.16 (Azure's platform endpoint, a public
    address every Azure VM reaches: its WireServer serves the VM's
    certificates and extension settings), 169.254.0.0/16 (link-local, the
    cloud metadata service 169.254.169.254), 192.0.0.0/24 (IETF protocol assignments),
    192.0.2.0/24, 198.51.100.0/24 and 203.0.113.0/24 (documentation),
    192.88.99.0/24 (6to4 relay anycast), 198.18.0.0/15 (benchmarking),
    224.0.0.0/4 (multicast), 240.0.0.0/4 (reserved, broadcast included).

    IPv6: everything outside global unicast 2000::/3 (loopback ::1,
    unspecified ::, unique local fc00::/7 with AWS's metadata fd00:ec2::254,
    link-local fe80::/10, site-local fec0::/10, multicast ff00::/8, the
    deprecated IPv4-compatible ::/96 and the rest of the reserved space), and
    within it 2001::/23 (IETF protocol assignments), 2001:db8::/32 and
    3fff::/20 (documentation).  Forms that carry an IPv4 address are judged
    by that address: IPv4-mapped ::ffff:0:0/96, NAT64 64:ff9b::/96, 6to4
    2002::/16 and Teredo 2001::/32 (restricted when its server or client
    address is).
    """
    if addr.version == 4:
        return any(addr in network for network in _RESTRICTED_IPV4)
    embedded = _embedded_ipv4(addr)
    if embedded:
        return any(is_restricted(ipv4) for ipv4 in embedded)
    if addr not in _GLOBAL_UNICAST:
        return True
    return any(addr in network for network in _RESTRICTED_IPV6)


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses that traffic to ``addr`` really goes to, if any."""
    if addr in _MAPPED or addr in _NAT64:
        return (ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF),)
    if addr.sixtofour is not None:
        return (addr.sixtofour,)
    return addr.teredo or ()


def _show(host: str) -> str:
    """``host`` for an error message, cut short when it is long."""
    return repr(host) if len(host) <= 80 else repr(host[:77] + "...")


def _check_characters(host: str) -> None:
    """Rejects what is never part of a host, whatever its kind."""
    if not host:
        raise ValueError("empty host")
    if len(host) > _MAX_NAME + 1:
        raise ValueError(f"host {_show(host)} is longer than {_MAX_NAME} characters")
    if not host.isascii():
        raise ValueError(f"host {_show(host)} is not ASCII (encode names with IDNA first)")
    for character in host:
        if character <= " " or character == "\x7f":
            raise ValueError(f"host {_show(host)} contains a control or space character {character!r}")
    if "%" in host:
        raise ValueError(f"host {_show(host)} has a zone id or escape ('%'); neither is allowed")
    if "/" in host or "@" in host:
        raise ValueError(f"host {_show(host)} contains '/' or '@'; a host is only a name or an address")


def _normalize_ipv6(host: str) -> str:
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        addr = ipaddress.IPv6Address(literal)
    except ValueError:
        raise ValueError(
            f"host {_show(host)} is not a valid IPv6 address (a host with ':' or '[' must be one)"
        ) from None
    mapped = addr.ipv4_mapped
    return str(addr if mapped is None else mapped)


def _is_number(label: str) -> bool:
    """Whether ``label`` is written as a number (decimal, octal or ``0x`` hex,
    even an invalid one): then the host is meant as an IPv4 address."""
    if label[:2] in ("0x", "0X"):
        return all(digit in _HEX_DIGITS for digit in label[2:])
    return label.isdigit()


def _parse_inet_aton(parts: list[str], host: str) -> ipaddress.IPv4Address:
    """The address of ``a``, ``a.b``, ``a.b.c`` or ``a.b.c.d``, where each
    part is decimal, octal (leading 0) or hex (0x); the last part fills all the
    bytes that remain, as inet_aton(3) reads it."""
    invalid = ValueError(f"host {_show(host)} looks like an IPv4 address but is not a valid one")
    if len(parts) > 4:
        raise invalid
    values = []
    for part in parts:
        value = _parse_aton_number(part)
        if value is None:
            raise invalid
        values.append(value)
    *leading, last = values
    if any(value > 0xFF for value in leading) or last >= 1 << (8 * (4 - len(leading))):
        raise invalid
    address = last
    for index, value in enumerate(leading):
        address |= value << (8 * (3 - index))
    return ipaddress.IPv4Address(address)


def _parse_aton_number(part: str) -> int | None:
    """One part of an inet_aton spelling, or None when it is not a number."""
    if part[:2] in ("0x", "0X"):
        digits, base = part[2:], 16
        valid = bool(digits) and all(digit in _HEX_DIGITS for digit in digits)
    elif part.startswith("0"):
        digits, base = part, 8
        valid = all(digit in "01234567" for digit in digits)
    else:
        digits, base = part, 10
        valid = part.isdigit()
    return int(digits, base) if valid else None


def _check_name(name: str, labels: list[str], host: str) -> None:
    if len(name) > _MAX_NAME:
        raise ValueError(f"host {_show(host)} is longer than {_MAX_NAME} characters")
    if not set(name) <= _NAME_CHARACTERS:
        bad = sorted(set(name) - _NAME_CHARACTERS)
        raise ValueError(f"host {_show(host)} contains characters not allowed in a name: {''.join(bad)!r}")
    for label in labels:
        if not label:
            raise ValueError(f"host {_show(host)} has an empty label")
        if len(label) > _MAX_LABEL:
            raise ValueError(f"host {_show(host)} has a label longer than {_MAX_LABEL} characters")
