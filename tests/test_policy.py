"""Network policies and host handling, without sockets: canonical hosts,
restricted addresses, allow-lists, custom policies and their combinations."""

from __future__ import annotations

import ipaddress
import time

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from heel._netaddr import is_restricted, normalize_host, parse_ip
from heel.errors import PolicyError
from heel.policy import (
    AllowAll,
    AllowList,
    CustomPolicy,
    Decision,
    DenyAll,
    NetworkPolicy,
    NetworkRequest,
)


def request(host: str, port: int = 443, protocol: str = "connect") -> NetworkRequest:
    return NetworkRequest(normalize_host(host), port, protocol)


async def allowed(policy: NetworkPolicy, host: str, port: int = 443) -> bool:
    return (await policy.decide(request(host, port))).allowed


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# --- normalize_host ---------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    ["127.0.0.1", "127.1", "127.0.1", "2130706433", "0x7f.0.0.1", "0X7F.0.0.1", "0177.0.0.1",
     "0x7f000001", "017700000001", "0x7f.1", "127.0.0.1.", "::ffff:127.0.0.1", "[::ffff:127.0.0.1]",
     "::ffff:7f00:1", "[::FFFF:7F00:1]"],
)
def test_every_loopback_spelling_is_the_dotted_quad(spelling):
    assert normalize_host(spelling) == "127.0.0.1"


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("169.254.169.254", "169.254.169.254"),
        ("2852039166", "169.254.169.254"),
        ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
        ("0251.0376.0251.0376", "169.254.169.254"),
        ("169.16689662", "169.254.169.254"),
        ("0", "0.0.0.0"),
        ("0x0", "0.0.0.0"),
        ("255.255.255.255", "255.255.255.255"),
        ("4294967295", "255.255.255.255"),
    ],
)
def test_ipv4_spellings_canonicalise(spelling, canonical):
    assert normalize_host(spelling) == canonical


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("0:0:0:0:0:0:0:1", "::1"),
        ("[2001:DB8:0:0:0:0:0:1]", "2001:db8::1"),
        ("fd00:ec2:0::254", "fd00:ec2::254"),
        ("64:ff9b::169.254.169.254", "64:ff9b::a9fe:a9fe"),
    ],
)
def test_ipv6_literals_compress(spelling, canonical):
    assert normalize_host(spelling) == canonical


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [("Example.COM", "example.com"), ("example.com.", "example.com"), ("_dmarc.x-y.org", "_dmarc.x-y.org"),
     ("0x1g.com", "0x1g.com"), ("localhost", "localhost"), ("1a2b", "1a2b")],
)
def test_names_are_lower_case_without_trailing_dot(spelling, canonical):
    assert normalize_host(spelling) == canonical


@pytest.mark.parametrize(
    "host",
    [
        "", ".", "a..b", ".example.com", "example.com..",
        "a\x00b", "example.com\r\nHost: evil", "a b", "a\tb", "a\x7fb",
        "fe80::1%eth0", "[fe80::1%25eth0]", "example.com%2f",
        "a/b", "user@example.com",
        "a" * 64 + ".com", ("a" * 63 + ".") * 4 + "a",
        "bücher.de", "ex\u0430mple.com", "١٢٧.0.0.1",
        "1.2.3.4.5", "0x", "256.1.1.1", "08.1.1.1", "1.2.3.09", "4294967296", "1.16777216", "1.2.65536",
        "0x100.0.0.1", "1..2", "example.123",
        "[1.2.3.4]", "[::1", "::1]", "example.com:80", ":::", "1:2:3:4:5:6:7:8:9",
        "exa*mple.com", "exa!mple.com",
    ],
)
def test_bad_hosts_are_rejected(host):
    with pytest.raises(ValueError):
        normalize_host(host)


def test_rejection_says_what_is_wrong():
    with pytest.raises(ValueError, match="zone id"):
        normalize_host("fe80::1%eth0")
    with pytest.raises(ValueError, match="not ASCII"):
        normalize_host("bücher.de")
    with pytest.raises(ValueError, match="not a valid one"):
        normalize_host("256.1.1.1")


def test_longest_name_is_accepted():
    name = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert len(name) == 253
    assert normalize_host(name + ".") == name


@given(st.text(max_size=60) | st.from_regex(r"\A[0-9a-fA-FxX.:\[\]]{0,40}\Z"))
@settings(max_examples=300, deadline=None)
def test_normalize_host_is_idempotent_or_raises_value_error(text):
    try:
        canonical = normalize_host(text)
    except ValueError:
        return
    assert normalize_host(canonical) == canonical


def test_parse_ip():
    assert parse_ip("127.0.0.1") == ip("127.0.0.1")
    assert parse_ip("::1") == ip("::1")
    assert parse_ip("example.com") is None


# --- is_restricted ----------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.255.255.254", "0.0.0.0", "0.1.2.3", "10.1.2.3", "172.16.0.1", "172.31.255.255",
        "192.168.1.1", "169.254.169.254", "168.63.129.16", "100.64.0.1", "100.100.100.200", "224.0.0.251", "239.1.1.1",
        "255.255.255.255", "240.0.0.1", "192.0.0.192", "192.0.2.1", "198.18.0.1", "203.0.113.9",
        "::1", "::", "fe80::1", "fc00::1", "fd00:ec2::254", "ff02::1", "fec0::1",
        "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::127.0.0.1", "::8.8.8.8",
        "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::1",
        "2002:7f00:1::", "2002:a9fe:a9fe::1",
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo: client 192.0.2.45, documentation
        "2001:0:a00:1::1",  # Teredo: server 10.0.0.1
        "2001:db8::1", "3fff::1", "2001:2::1", "100::1",
    ],
)
def test_restricted_addresses(address):
    assert is_restricted(ip(address))


@pytest.mark.parametrize(
    "address",
    [
        "93.184.216.34", "8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "11.0.0.1", "223.255.255.254",
        "2606:4700::1", "2a00:1450:4001::200e",
        "::ffff:93.184.216.34", "64:ff9b::5db8:d822", "2002:5db8:d822::1",
        "2001:0:4136:e378:8000:63bf:a247:2bdd",  # Teredo: server 65.54.227.120, client 93.184.216.34
    ],
)
def test_public_addresses_are_not_restricted(address):
    assert not is_restricted(ip(address))


# --- DenyAll and AllowAll ---------------------------------------------------


async def test_deny_all_denies_and_allow_all_allows():
    assert not await allowed(DenyAll(), "example.com")
    assert await allowed(AllowAll(), "example.com")
    assert DenyAll().denies_everything
    assert not AllowAll().denies_everything


def test_simple_policies_are_values():
    assert DenyAll() == DenyAll() and hash(DenyAll()) == hash(DenyAll())
    assert AllowAll() == AllowAll() and AllowAll() != DenyAll()
    assert repr(DenyAll()) == "DenyAll()" and repr(AllowAll()) == "AllowAll()"


def test_network_policy_is_abstract():
    with pytest.raises(TypeError):
        NetworkPolicy()


# --- AllowList --------------------------------------------------------------


async def test_exact_names():
    policy = AllowList(["pypi.org"])
    assert await allowed(policy, "pypi.org")
    assert await allowed(policy, "PyPI.org.")
    assert not await allowed(policy, "files.pypi.org")
    assert not await allowed(policy, "pypi.org.evil.com")
    assert not await allowed(policy, "notpypi.org")


async def test_wildcards_match_subdomains_at_any_depth_but_not_the_apex():
    policy = AllowList(["*.example.com"])
    assert await allowed(policy, "www.example.com")
    assert await allowed(policy, "a.b.c.example.com")
    assert await allowed(policy, "WWW.EXAMPLE.COM.")
    assert not await allowed(policy, "example.com")
    assert not await allowed(policy, "notexample.com")
    assert not await allowed(policy, "example.com.evil.org")


async def test_patterns_are_case_insensitive_and_ignore_a_trailing_dot():
    policy = AllowList(["PyPI.ORG.", "*.Example.COM."])
    assert await allowed(policy, "pypi.org")
    assert await allowed(policy, "www.example.com")
    assert policy == AllowList(["pypi.org", "*.example.com"])


async def test_ports_restrict_a_pattern():
    policy = AllowList(["example.com:443", "*.x.org:8080", "[::1]:8080", "10.0.0.0/8:5432"])
    assert await allowed(policy, "example.com", 443)
    assert not await allowed(policy, "example.com", 80)
    assert await allowed(policy, "a.x.org", 8080)
    assert not await allowed(policy, "a.x.org", 443)
    assert await allowed(policy, "::1", 8080)
    assert not await allowed(policy, "::1", 80)
    assert await allowed(policy, "10.9.8.7", 5432)
    assert not await allowed(policy, "10.9.8.7", 22)


async def test_ip_patterns_match_any_spelling_of_the_address():
    policy = AllowList(["0x7f.1", "[::1]"])
    assert await allowed(policy, "127.0.0.1")
    assert await allowed(policy, "2130706433")
    assert await allowed(policy, "::1")
    assert not await allowed(policy, "127.0.0.2")
    assert not await allowed(policy, "localhost")


async def test_cidr_patterns():
    policy = AllowList(["10.0.0.0/8", "fd00::/8"])
    assert await allowed(policy, "10.200.0.1")
    assert await allowed(policy, "0xa.1")
    assert await allowed(policy, "fd12::1")
    assert not await allowed(policy, "11.0.0.1")
    assert not await allowed(policy, "fe80::1")
    assert not await allowed(policy, "ten.example.com")


async def test_name_patterns_do_not_match_addresses():
    assert not await allowed(AllowList(["*.1.1.com"]), "1.1.1.1")


async def test_reasons_say_what_matched_or_why_not():
    policy = AllowList(["*.example.com", "pypi.org:443"])
    assert (await policy.decide(request("www.example.com"))).reason == "matches *.example.com"
    assert (await policy.decide(request("evil.com"))).reason == "not in the allow-list"
    assert "port 80" in (await policy.decide(request("pypi.org", 80))).reason


async def test_an_invalid_request_host_is_denied():
    decision = await AllowList(["*.example.com"]).decide(NetworkRequest("a\x00.example.com", 443, "connect"))
    assert decision == Decision(False, decision.reason) and "invalid host" in decision.reason


async def test_empty_list_denies_everything_but_reports_each_request():
    policy = AllowList([])
    assert not await allowed(policy, "example.com")
    assert not policy.denies_everything


@pytest.mark.parametrize(
    "pattern",
    ["", "*", "*.", "a.*.com", "**.x", "*.*.com", "*x.com", "*.1.2.3.4", "example.com:0", "example.com:65536",
     "example.com:x", "example.com:", "example.com:+80", "[::1]:0", "[::1]x", "[::1", "10.0.0.0/33",
     "10.0.0.1/8", "fd00::/129", "exa mple.com", "bücher.de", "a\x00b", "256.1.1.1", "example.com/path",
     "user@example.com", None, 443, b"example.com"],
)
def test_malformed_patterns_raise_policy_error(pattern):
    with pytest.raises(PolicyError) as raised:
        AllowList([pattern])
    assert repr(pattern) in str(raised.value)


@pytest.mark.parametrize("patterns", ["pypi.org", None, 443])
def test_allow_list_needs_a_list(patterns):
    with pytest.raises(PolicyError):
        AllowList(patterns)


def test_allow_list_repr_shows_canonical_patterns():
    policy = AllowList(["PyPI.org", "*.x.org:8080", "[::1]:8080", "10.0.0.0/8:5432", "fd00::/8", "0x7f.1", "pypi.org"])
    assert repr(policy) == "AllowList(['pypi.org', '*.x.org:8080', '[::1]:8080', '10.0.0.0/8:5432', 'fd00::/8', '127.0.0.1'])"
    assert eval(repr(policy)) == policy


# --- CustomPolicy -----------------------------------------------------------


async def test_custom_policy_sees_the_request():
    seen = []

    async def only_port_443(req: NetworkRequest) -> bool:
        seen.append(req)
        return req.port == 443

    policy = CustomPolicy(only_port_443)
    assert await allowed(policy, "example.com", 443)
    assert not await allowed(policy, "example.com", 80)
    assert seen == [request("example.com", 443), request("example.com", 80)]


async def test_custom_policy_may_answer_with_a_decision():
    async def verdict(req: NetworkRequest) -> Decision:
        return Decision(False, "the user said no")

    assert await CustomPolicy(verdict).decide(request("example.com")) == Decision(False, "the user said no")


async def test_exception_denies():
    async def broken(req: NetworkRequest) -> bool:
        raise KeyError("boom")

    decision = await CustomPolicy(broken).decide(request("example.com"))
    assert decision == Decision(False, "policy raised KeyError: 'boom'")


async def test_hang_denies_within_the_timeout():
    async def hangs(req: NetworkRequest) -> bool:
        await trio.sleep_forever()

    started = time.monotonic()
    decision = await CustomPolicy(hangs, timeout=0.05).decide(request("example.com"))
    assert not decision.allowed and "within 0.05 s" in decision.reason
    assert time.monotonic() - started < 0.5


async def test_a_late_answer_is_still_late():
    async def ignores_cancellation(req: NetworkRequest) -> bool:
        with trio.CancelScope(shield=True):
            await trio.sleep(0.1)
        return True

    assert not (await CustomPolicy(ignores_cancellation, timeout=0.02).decide(request("example.com"))).allowed


async def test_an_answer_from_a_function_that_blocked_the_loop_is_late():
    """A policy that blocks (time.sleep in an async def) cannot be cancelled
    while it blocks; its allow came after the timeout and still counted."""
    async def blocks(req: NetworkRequest) -> bool:
        time.sleep(0.1)
        return True

    async def quick(req: NetworkRequest) -> bool:
        return True

    assert not (await CustomPolicy(blocks, timeout=0.02).decide(request("example.com"))).allowed
    assert (await CustomPolicy(quick, timeout=0.02).decide(request("example.com"))).allowed  # the control


@pytest.mark.parametrize("answer", [None, 1, "yes", (True, "ok"), Decision("yes", "ok")])
async def test_bad_return_denies(answer):
    async def odd(req: NetworkRequest):
        return answer

    decision = await CustomPolicy(odd).decide(request("example.com"))
    assert not decision.allowed and "not a bool or a Decision" in decision.reason


async def test_sync_function_denies_explaining():
    decision = await CustomPolicy(lambda req: True).decide(request("example.com"))
    assert not decision.allowed and "must be async" in decision.reason


@pytest.mark.parametrize(
    "kwargs",
    [{"func": None}, {"func": "f"}, {"timeout": 0}, {"timeout": -1}, {"timeout": float("nan")}, {"timeout": "5"},
     {"timeout": True}, {"allow_restricted": 1}],
)
def test_custom_policy_arguments_are_checked(kwargs):
    async def yes(req: NetworkRequest) -> bool:
        return True

    with pytest.raises(PolicyError):
        CustomPolicy(**{"func": yes, **kwargs})


# --- combinations -----------------------------------------------------------

ALLOW, DENY = AllowAll(), DenyAll()


@pytest.mark.parametrize(("a", "b"), [(ALLOW, ALLOW), (ALLOW, DENY), (DENY, ALLOW), (DENY, DENY)])
async def test_truth_tables(a, b):
    a_allows, b_allows = await allowed(a, "example.com"), await allowed(b, "example.com")
    assert await allowed(a | b, "example.com") == (a_allows or b_allows)
    assert await allowed(a & b, "example.com") == (a_allows and b_allows)
    assert await allowed(~a, "example.com") == (not a_allows)


@pytest.mark.parametrize(
    ("policy", "denies_everything"),
    [
        (DENY, True), (ALLOW, False), (AllowList([]), False),
        (DENY & AllowList(["x.org"]), True), (AllowList(["x.org"]) & DENY, True), (ALLOW & ALLOW, False),
        (DENY | DENY, True), (DENY | AllowList(["x.org"]), False), (DENY | ALLOW, False),
        (~ALLOW, True), (~DENY, False), (~AllowList(["x.org"]), False), (~(ALLOW | AllowList(["x.org"])), True),
        (~~ALLOW, False), (~~DENY, True),
    ],
)
def test_denies_everything(policy, denies_everything):
    assert policy.denies_everything is denies_everything


async def test_exclusion_from_allow_all():
    policy = AllowAll() & ~AllowList(["*.evil.com"])
    assert await allowed(policy, "example.com")
    decision = await policy.decide(request("www.evil.com"))
    assert decision == Decision(False, "excluded: matches *.evil.com")


async def test_any_of_reasons():
    policy = AllowList(["pypi.org"]) | AllowList(["*.example.com"])
    assert (await policy.decide(request("www.example.com"))).reason == "matches *.example.com"
    assert (await policy.decide(request("evil.com"))).reason == "not in the allow-list; not in the allow-list"


async def test_any_of_stops_at_the_first_that_allows():
    asked = []

    async def records(req: NetworkRequest) -> bool:
        asked.append(req.host)
        return False

    policy = AllowList(["pypi.org"]) | CustomPolicy(records)
    assert await allowed(policy, "pypi.org")
    assert not await allowed(policy, "evil.com")
    assert asked == ["evil.com"]


def test_combinations_flatten_and_compare_by_value():
    a, b, c = AllowList(["a.org"]), AllowList(["b.org"]), AllowList(["c.org"])
    assert (a | b) | c == a | (b | c) == a | b | c
    assert (a | b | c).parts == (a, b, c)
    assert (a & b) & c == a & (b & c)
    assert a | b != a & b
    assert a | b != b | a  # asked in order: the order is part of the policy
    assert hash(a | b) == hash(AllowList(["a.org"]) | AllowList(["b.org"]))
    assert ~~a == a
    assert repr((a | b) & ~c) == "((AllowList(['a.org']) | AllowList(['b.org'])) & ~AllowList(['c.org']))"


def test_operators_take_only_policies():
    with pytest.raises(TypeError):
        AllowAll() | "pypi.org"
    with pytest.raises(TypeError):
        AllowAll() & None


# --- permits_restricted -----------------------------------------------------


def test_allow_list_permits_what_it_names_exactly():
    policy = AllowList(["db.internal:5432", "*.corp.example", "10.0.0.0/8", "[::1]:8080", "localhost"])
    assert policy.permits_restricted(request("db.internal", 5432), ip("10.1.2.3"))
    assert not policy.permits_restricted(request("db.internal", 22), ip("192.168.1.1"))
    assert not policy.permits_restricted(request("x.corp.example", 443), ip("192.168.1.1"))
    assert policy.permits_restricted(request("x.corp.example", 443), ip("10.1.2.3"))
    assert policy.permits_restricted(request("10.9.9.9", 22), ip("10.9.9.9"))
    assert policy.permits_restricted(request("x", 443), ip("::ffff:10.9.9.9"))
    assert policy.permits_restricted(request("::1", 8080), ip("::1"))
    assert not policy.permits_restricted(request("::1", 80), ip("::1"))
    assert policy.permits_restricted(request("localhost", 80), ip("127.0.0.1"))
    assert not policy.permits_restricted(request("evil.com", 443), ip("169.254.169.254"))


def test_other_policies_name_no_restricted_address():
    req, metadata = request("example.com"), ip("169.254.169.254")
    assert not AllowAll().permits_restricted(req, metadata)
    assert not DenyAll().permits_restricted(req, metadata)
    assert not (~AllowList(["example.com"])).permits_restricted(req, metadata)


async def test_custom_policy_permits_restricted_as_told():
    async def yes(req: NetworkRequest) -> bool:
        return True

    req, metadata = request("example.com"), ip("169.254.169.254")
    assert CustomPolicy(yes, allow_restricted=True).permits_restricted(req, metadata)
    assert not CustomPolicy(yes).permits_restricted(req, metadata)


async def test_any_of_asks_the_part_that_allowed():
    async def says_no(req: NetworkRequest) -> bool:
        return False

    vetting = CustomPolicy(says_no, allow_restricted=True)
    policy = AllowList(["*.pythonhosted.org", "db.internal"]) | vetting
    private = ip("10.0.0.1")

    # The wildcard allowed it; the custom policy that permits restricted
    # addresses was never asked, so its permission does not count.
    wildcard = request("files.pythonhosted.org")
    assert await allowed(policy, "files.pythonhosted.org")
    assert not policy.permits_restricted(wildcard, private)

    exact = request("db.internal")
    assert await allowed(policy, "db.internal")
    assert policy.permits_restricted(exact, private)
    # Only for the request that was decided.
    assert not policy.permits_restricted(wildcard, private)


async def _db_only(req: NetworkRequest) -> bool:
    return req.host == "db.internal"


async def test_any_of_counts_a_vouching_part_only_if_it_allowed():
    vouching = CustomPolicy(_db_only, allow_restricted=True)
    first_allowall = AllowAll() | vouching
    req, private = request("db.internal"), ip("10.0.0.1")
    assert not first_allowall.permits_restricted(req, private)  # no decision yet
    assert await allowed(first_allowall, "db.internal")  # AllowAll allowed; the custom one was not asked
    assert not first_allowall.permits_restricted(req, private)
    first_vouching = vouching | AllowAll()
    assert await allowed(first_vouching, "db.internal")
    assert first_vouching.permits_restricted(req, private)


async def test_any_of_counts_a_part_that_names_the_address_in_any_order():
    """`AllowAll() | AllowList([address])`: the internet and that internal
    address (found by exploratory testing: only the first allowing part was
    asked, so the order decided)."""
    for policy in (AllowAll() | AllowList(["127.0.0.1:8001"]), AllowList(["127.0.0.1:8001"]) | AllowAll()):
        assert await allowed(policy, "api.test", 8001)
        assert policy.permits_restricted(request("api.test", 8001), ip("127.0.0.1"))
        assert await allowed(policy, "api.test", 9000)
        assert not policy.permits_restricted(request("api.test", 9000), ip("127.0.0.1"))  # not that port
        assert not policy.permits_restricted(request("api.test", 8001), ip("10.0.0.1"))  # not that address


async def test_any_of_remembers_per_task():
    policy = CustomPolicy(_db_only, allow_restricted=True) | AllowAll()
    assert await allowed(policy, "db.internal")

    async def in_another_task() -> None:
        assert await allowed(policy, "other.example")
        assert not policy.permits_restricted(request("db.internal"), ip("10.0.0.1"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_another_task)
    # The other task's decision stays in that task.
    assert policy.permits_restricted(request("db.internal"), ip("10.0.0.1"))


async def test_all_of_permits_when_a_part_names_the_address():
    """Every part allowed the request: one that names the address is
    enough, and a ``~`` or AllowAll, which name nothing, do not veto it
    (found by exploratory testing: the README's own deny-list pattern
    refused every internal host)."""
    req, private = request("db.internal"), ip("10.0.0.1")
    for policy in (AllowList(["db.internal"]) & AllowAll(),
                   AllowList(["db.internal"]) & ~AllowList(["bad.internal"])):
        assert await allowed(policy, "db.internal")
        assert policy.permits_restricted(req, private)
    nothing_named = AllowAll() & ~AllowList(["bad.internal"])
    assert await allowed(nothing_named, "db.internal")
    assert not nothing_named.permits_restricted(req, private)


async def _never(req: NetworkRequest) -> bool:
    return False


async def test_an_unasked_part_vouches_only_if_its_text_allows_the_request():
    """`AllowAll() | (AllowList([a]) & ~AllowList([a:port]))` reached a:port,
    and `AllowAll() | (AllowList([net]) & CustomPolicy(no))` the whole net:
    AllowAll allowed, and the `&` part, never asked, counted as naming the
    address though it would have refused (found by review)."""
    loopback = ip("127.0.0.1")
    excluded = AllowAll() | (AllowList(["127.0.0.1"]) & ~AllowList(["127.0.0.1:22"]))
    assert await allowed(excluded, "127.0.0.1", 22)
    assert not excluded.permits_restricted(request("127.0.0.1", 22), loopback)
    assert excluded.permits_restricted(request("127.0.0.1", 80), loopback)  # the neighbour
    # An exclusion by address holds for a name that resolves there too.
    assert not excluded.permits_restricted(request("svc.test", 22), loopback)
    vetoed = AllowAll() | (AllowList(["127.0.0.0/8"]) & CustomPolicy(_never))
    assert await allowed(vetoed, "127.0.0.1", 80)
    assert not vetoed.permits_restricted(request("127.0.0.1", 80), loopback)
    by_name = AllowAll() | (AllowList(["db.internal"]) & ~AllowList(["db.internal:22"]))
    assert not by_name.permits_restricted(request("db.internal", 22), ip("10.0.0.1"))
    assert by_name.permits_restricted(request("db.internal", 5432), ip("10.0.0.1"))
    # The README's pattern, under an AllowAll: still the named internal host.
    readme = AllowAll() | (AllowList(["db.internal"]) & ~AllowList(["bad.internal"]))
    assert readme.permits_restricted(request("db.internal", 5432), ip("10.0.0.1"))
    assert not readme.permits_restricted(request("bad.internal", 5432), ip("10.0.0.1"))
    # Once the `&` itself allowed (asked first), what it names counts.
    first = (AllowList(["127.0.0.0/8"]) & CustomPolicy(_db_only)) | AllowAll()
    assert await allowed(first, "db.internal", 80)
    assert not first.permits_restricted(request("db.internal", 80), loopback)  # names neither
    named_first = (AllowList(["db.internal"]) & CustomPolicy(_db_only)) | AllowAll()
    assert await allowed(named_first, "db.internal", 80)
    assert named_first.permits_restricted(request("db.internal", 80), ip("10.0.0.1"))


async def test_nested_any_of_inside_all_of():
    policy = (CustomPolicy(_db_only, allow_restricted=True) | AllowAll()) & AllowList(["*.example", "*.internal"])
    assert await allowed(policy, "db.internal")
    assert policy.permits_restricted(request("db.internal"), ip("10.0.0.1"))  # the custom part allowed
    assert await allowed(policy, "other.example")
    assert not policy.permits_restricted(request("other.example"), ip("10.0.0.1"))  # AllowAll did; wildcards name nothing


async def test_an_excluded_internal_address_stays_excluded_for_a_name_that_resolves_there():
    """`(AllowAll() | AllowList([net])) & ~AllowList([address])` let a name
    that resolves to the excluded address through: the `~` was asked about
    the name only (found by review)."""
    policy = (AllowAll() | AllowList(["10.0.0.0/8"])) & ~AllowList(["10.0.0.5"])
    assert await allowed(policy, "evil.test", 80)
    assert not policy.permits_restricted(request("evil.test", 80), ip("10.0.0.5"))
    assert policy.permits_restricted(request("evil.test", 80), ip("10.0.0.6"))  # the neighbour
    by_port = AllowList(["10.0.0.0/8"]) & ~AllowList(["10.0.0.5:22"])
    assert by_port.permits_restricted(request("10.0.0.5", 5432), ip("10.0.0.5"))
    assert not by_port.permits_restricted(request("10.0.0.5", 22), ip("10.0.0.5"))


async def test_an_exclusion_that_mentions_the_address_and_asks_a_function_keeps_it_closed():
    """`~(AllowList([address]) & CustomPolicy(f))` let a name resolving to
    the address through: f was never asked, and an unknown answer counted
    as not excluded (found by re-test).  A part that mentions the address
    and cannot be judged by its text now keeps it closed; one that does not
    mention it (`~CustomPolicy(blocklist)`) stays out of the way."""

    async def yes(req: NetworkRequest) -> bool:
        return True

    for inner in (AllowList(["127.0.0.1"]) & CustomPolicy(yes), AllowList(["127.0.0.0/8"]) & CustomPolicy(yes)):
        policy = AllowList(["in.test"]) & ~inner
        assert await allowed(policy, "in.test", 80)
        assert not policy.permits_restricted(request("in.test", 80), ip("127.0.0.1"))
    blocklist = AllowList(["db.internal"]) & ~CustomPolicy(_never)
    assert await allowed(blocklist, "db.internal", 5432)
    assert blocklist.permits_restricted(request("db.internal", 5432), ip("10.0.0.1"))
