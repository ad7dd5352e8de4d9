"""A mutation audit of heel/policy.py, and the tests it asked for.

The audit: 155 mutants of heel/policy.py, each a small deliberate change
of one line, most of them weakenings (a flipped condition, a dropped check,
``any`` for ``all``, ``and`` for ``or``, an early return, a changed bound), run against
tests/test_policy.py, test_netaddr_audit.py, test_proxy_review.py and
test_network.py, and the survivors also against test_proxy_protocol.py,
test_proxy_http.py, test_security_net_ipc.py, test_redteam_r30.py,
test_config_validation.py and test_api.py.  126 were caught; of the 29
survivors, 10 are equivalent (unreachable defensive code: a ``_Failed``
is never built allowed, and no decision is withheld without having
failed; an IP host never matches a name or wildcard pattern; trio's
``cancel_called`` implies the deadline has passed; ``|``'s record holds
the policy it is keyed by, so the id cannot be reused; and two
rewrites of ``&``'s permits_restricted that a fuzzer of random policy
trees could not tell apart, nor a reading of the invariants); each of
the other 19 fails a test here.  No bug in policy.py was found.

What no test caught before:

- an exact name in an AllowList counted as naming a restricted address for
  any host that merely ends in it (``evil-db.test`` for ``db.test``): under
  ``AllowAll() | AllowList(["db.test"])`` a name that resolves to loopback
  reached the loopback service.  Tried for real below;
- an unasked ``&`` part of an ``|`` vouching for the address its list
  names although another of its parts would ask a function (``~`` or
  ``|`` read as surely allowing): tried for real below;
- a synchronous function given to CustomPolicy answered with a plain denial
  rather than a failure, which ``~`` turns into an allow: the blocklist of
  ``AllowAll() & ~CustomPolicy(sync_blocklist)`` let everything through;
- the timeout of a CustomPolicy was not held to its value (four times as
  long went unnoticed), and allow_restricted was no part of its equality;
- what ``|`` remembers: the request it allowed, and no longer once the
  same request was denied;
- an AllowList read a host it cannot parse as naming every restricted
  address, and a non-canonical spelling of a named host as naming none;
- the other way (mutants that only closed things): AllowAll, ``~DenyAll()``,
  an ``|`` with a part that surely allows, and an exclusion that surely
  misses the request surely allow; ``~(AllowAll() & x)`` does not deny
  everything.
"""

from __future__ import annotations

import ipaddress

import trio

import heel
from heel.policy import AllowAll, AllowList, CustomPolicy, DenyAll, NetworkRequest
from helpers import explain
from test_network import client, sandbox, settled_events


def request(host: str, port: int = 443) -> NetworkRequest:
    return NetworkRequest(host, port, "connect")


def ip(text: str):
    return ipaddress.ip_address(text)


async def decide(policy, host: str = "x.test", port: int = 443):
    return await policy.decide(request(host, port))


# ---- an exact name names that host only, never one that ends in it ---------------------


async def test_an_exact_name_vouches_for_that_host_only_not_for_one_that_ends_in_it(echo):
    """`AllowAll() | AllowList(["db.test"])`: the internet, and db.test even
    where it resolves to an internal address.  A name that merely ends in
    "db.test" (evil-db.test, evildb.test) and resolves to loopback is
    AllowAll's, which names no internal address: refused, and nothing
    arrives.  db.test itself, to the same address and port, is the control.
    (Mutant: ``host.endswith(pattern.target)`` for an exact name in
    ``_names_restricted``.)"""
    events = await _refused_then_allowed(echo, AllowAll() | AllowList(["db.test"]),
                                         ["evil-db.test", "evildb.test"], "db.test")
    assert all("internal address" in e.reason for e in events[:2]), events


async def _refused_then_allowed(echo, policy, refused_names: list[str], allowed_name: str) -> list:
    """Through a sandbox with ``policy``, each of ``refused_names`` and then
    ``allowed_name``, all resolving to loopback, CONNECTs to the echo
    server: the first are answered 403 and none of them arrives; the last
    (the control) gets through.  The network events, in order."""
    names = {name: ["127.0.0.1"] for name in (*refused_names, allowed_name)}
    async with sandbox(policy, names) as sb:
        refused = [await client(sb, "connect", f"{name}:{echo.port}", "never") for name in refused_names]
        assert echo.connections == 0, [explain(out) for out in refused]
        out = await client(sb, "connect", f"{allowed_name}:{echo.port}", "through")
        events = await settled_events(sb)
    for denied in refused:
        assert "STATUS HTTP/1.1 403" in denied.stdout.decode() and "DATA" not in denied.stdout.decode(), explain(denied)
    assert "DATA through" in out.stdout.decode(), explain(out)
    assert echo.connections == 1  # the control only
    assert [(e.host, e.allowed) for e in events] == [(name, False) for name in refused_names] + [(allowed_name, True)]
    return events


# ---- CustomPolicy: every failure stays a failure, and the timeout is the timeout -------


async def test_a_synchronous_function_is_a_failure_that_no_exclusion_turns_into_an_allow():
    """A plain ``def`` given to CustomPolicy returns no awaitable: no
    answer.  Under ``~`` (a blocklist) that must stay a denial, as an
    exception does; a plain denial would be turned into an allow, and
    ``AllowAll() & ~CustomPolicy(blocklist)`` would let everything through.
    The sandbox reads only that the policy failed.  The control: the same
    blocklist written async, answering "not listed", is turned around.
    (Mutant: a ``Decision`` rather than a ``_Failed`` for a non-awaitable.)"""
    def sync_blocklist(req):
        return req.host == "blocked.test"

    async def async_blocklist(req):
        return req.host == "blocked.test"

    for policy in (~CustomPolicy(sync_blocklist), AllowAll() & ~CustomPolicy(sync_blocklist),
                   ~(AllowList(["y.test"]) | CustomPolicy(sync_blocklist))):
        decision = await decide(policy)
        assert not decision.allowed, (policy, decision)
        assert "must be async" in decision.reason, decision
        assert heel.policy.sandbox_reason(decision).endswith("the policy failed"), decision
    assert (await decide(AllowAll() & ~CustomPolicy(async_blocklist))).allowed
    assert not (await decide(AllowAll() & ~CustomPolicy(async_blocklist), "blocked.test")).allowed


async def test_an_answer_after_the_timeout_is_a_denial_even_when_it_comes_soon_after(autojump_clock):
    """The answer must come within ``timeout``: one that comes at twice the
    timeout is a denial (an allow, turned around by ``~``, stays a denial).
    The control: an answer well within the timeout counts.  On trio's
    virtual clock, so that a loaded machine cannot move the answers.
    (Mutant: the deadline four times the timeout.)"""
    timeout = 0.25

    async def slow_yes(req):
        await trio.sleep(2 * timeout)
        return True

    async def slow_no(req):
        await trio.sleep(2 * timeout)
        return False

    async def quick_yes(req):
        return True

    late = await decide(CustomPolicy(slow_yes, timeout=timeout))
    assert not late.allowed and f"within {timeout:g} s" in late.reason, late
    assert not (await decide(~CustomPolicy(slow_no, timeout=timeout))).allowed
    assert (await decide(CustomPolicy(quick_yes, timeout=timeout))).allowed


# ---- what an AllowList names ---------------------------------------------------------


def test_a_host_that_is_no_host_names_nothing():
    """permits_restricted for a request whose host cannot be read (the
    proxy refuses those before any policy is asked, but the policy objects
    are public): an AllowList names no address for it, so ``AllowAll() |
    AllowList([...])`` does not open the internal network to it.  The
    control: a readable host the list names.  (Mutant: True for a host
    normalize_host refuses.)"""
    policy = AllowAll() | AllowList(["db.internal", "10.9.0.0/16"])
    for host in ("bad host", "a..b", "x\x00.test", ""):
        assert not policy.permits_restricted(request(host, 5432), ip("10.0.0.1")), host
        assert not AllowList(["db.internal"]).permits_restricted(request(host, 5432), ip("10.0.0.1")), host
    assert policy.permits_restricted(request("db.internal", 5432), ip("10.0.0.1"))


async def test_a_named_host_counts_in_any_spelling_as_decide_reads_it():
    """decide() matches ``DB.Internal.`` to the pattern db.internal; what
    permits_restricted reads as named must be the same host.  (Mutant: the
    request's host compared as written.)"""
    policy = AllowList(["db.internal:5432"])
    for spelling in ("DB.Internal.", "db.internal.", "Db.INTERNAL"):
        assert (await decide(policy, spelling, 5432)).allowed, spelling
        assert policy.permits_restricted(request(spelling, 5432), ip("10.0.0.1")), spelling
        assert not policy.permits_restricted(request(spelling, 22), ip("10.0.0.1")), spelling  # not that port


# ---- what surely allows: AllowAll and ~DenyAll ------------------------------------


def test_an_unasked_and_part_vouches_when_its_allow_all_or_not_deny_all_surely_allows():
    """In ``AllowAll() | (AllowList([name]) & X)`` the ``&`` part was not
    asked (AllowAll allowed first); it vouches for the address its list
    names only if X surely allows too.  AllowAll and ``~DenyAll()`` do; a
    CustomPolicy, whose answer is unknown, does not (the control).
    (Mutants: AllowAll._surely_allows False; DenyAll._might_allow True.)"""
    req, private = request("db.internal", 5432), ip("10.0.0.1")
    for sure in (AllowAll(), ~DenyAll(), ~DenyAll() & AllowAll()):
        policy = AllowAll() | (AllowList(["db.internal"]) & sure)
        assert policy.permits_restricted(req, private), policy
        assert not policy.permits_restricted(request("other.internal", 5432), private), policy

    async def yes(r):
        return True

    unknown = AllowAll() | (AllowList(["db.internal"]) & CustomPolicy(yes))
    assert not unknown.permits_restricted(req, private)


def test_custom_policies_that_differ_in_allow_restricted_are_not_equal():
    """allow_restricted is part of the policy: a config that compares or
    hashes policies must not take one that opens internal addresses for one
    that does not.  The control: the same three arguments compare equal.
    (Mutant: __eq__ without allow_restricted.)"""
    async def f(r):
        return True

    assert CustomPolicy(f) != CustomPolicy(f, allow_restricted=True)
    assert CustomPolicy(f, timeout=1) != CustomPolicy(f, timeout=2)
    assert CustomPolicy(f, allow_restricted=True) == CustomPolicy(f, allow_restricted=True)
    assert hash(CustomPolicy(f, allow_restricted=True)) == hash(CustomPolicy(f, allow_restricted=True))
    assert len({CustomPolicy(f), CustomPolicy(f, allow_restricted=True)}) == 2


# ---- an unasked part vouches only for what its text surely allows ---------------------


async def _blocklist(req):
    """A blocklist (for ``~``) that lists a.test, b.test and c.test."""
    return req.host in ("a.test", "b.test", "c.test")


async def _no(req):
    return False


async def test_an_unasked_part_whose_answer_hangs_on_a_function_never_opens_an_internal_address(echo):
    """``AllowAll() | (AllowList([name]) & X) | ...``: AllowAll allows
    every name first, so the ``&`` parts are never asked; one vouches for the
    internal address its list names only if X surely allows, which a part
    that would ask a function cannot.  Three such parts, each of which would
    have refused its name (a blocklist that lists it under ``~``; a function
    that says no, or a DenyAll; the blocklist next to a list that names
    nothing, under ``~``), and three names that resolve to loopback: none
    arrives.  The control: ok.test, named by a plain AllowList part, does.
    (Mutants: ``~`` surely allows where its inner policy does not surely
    allow; ``|`` surely allows always; ``|`` might allow only when every
    part might.)"""
    policy = (AllowAll()
              | (AllowList(["a.test"]) & ~CustomPolicy(_blocklist))
              | (AllowList(["b.test"]) & (CustomPolicy(_no) | DenyAll()))
              | (AllowList(["c.test"]) & ~(CustomPolicy(_blocklist) | AllowList(["nothing.test"])))
              | AllowList(["ok.test"]))
    await _refused_then_allowed(echo, policy, ["a.test", "b.test", "c.test"], "ok.test")


def test_an_unasked_and_part_vouches_when_an_any_of_in_it_surely_allows():
    """The other way round: ``(AllowList([name]) | CustomPolicy(f))`` surely
    allows a request its list names, whatever f says, so the unasked ``&``
    part that holds it vouches for the address.  (Mutant: ``|`` surely
    allows only when every part does.)"""
    policy = AllowAll() | (AllowList(["*.internal"]) & (AllowList(["db.internal"]) | CustomPolicy(_no)))
    assert policy.permits_restricted(request("db.internal", 5432), ip("10.0.0.1"))
    assert not policy.permits_restricted(request("other.internal", 5432), ip("10.0.0.1"))


# ---- what `|` remembers: one decision, of this request, until the next -----------------


async def test_a_vouching_part_counts_for_the_request_it_allowed_and_only_until_it_denies():
    """``CustomPolicy(vet, allow_restricted=True) | AllowList([])``: the
    vetting function's allow counts for the request it allowed, not for
    another request asked about without a decision, and not after the next
    decision of the same request was a denial.  (Mutants: the record
    matched to any request; a denial that leaves the last allow in place,
    or records no part.)"""
    state = {"vet": True}

    async def vet(req):
        return state["vet"] and req.host == "db.internal"

    policy = CustomPolicy(vet, allow_restricted=True) | AllowList([])
    db, other, private = request("db.internal", 5432), request("other.internal", 5432), ip("10.0.0.1")
    assert (await policy.decide(db)).allowed
    assert policy.permits_restricted(db, private)
    assert not policy.permits_restricted(other, private)  # never decided: vet never said yes to it
    state["vet"] = False
    assert not (await policy.decide(db)).allowed
    assert not policy.permits_restricted(db, private)
    state["vet"] = True
    assert (await policy.decide(db)).allowed and policy.permits_restricted(db, private)


# ---- what denies everything ----------------------------------------------------------


async def test_excluding_a_narrowed_allow_all_does_not_deny_everything():
    """``~(AllowAll() & AllowList([x]))`` allows every host but x: the
    sandbox must get its proxy (denies_everything False); and ``~(~DenyAll()
    | x)`` allows nothing, so no proxy and no TCP at all.  (Mutants: ``&``
    allows everything when any part does; ``~`` never allows everything.)"""
    narrowed = ~(AllowAll() & AllowList(["x.test"]))
    assert not narrowed.denies_everything
    assert (await decide(narrowed, "y.test")).allowed and not (await decide(narrowed, "x.test")).allowed
    for nothing in (~(~DenyAll() | AllowList(["x.test"])), ~(~DenyAll() & ~DenyAll()), ~(AllowAll() | ~DenyAll())):
        assert nothing.denies_everything, nothing
        assert not (await decide(nothing, "x.test")).allowed and not (await decide(nothing, "y.test")).allowed


def test_an_exclusion_whose_text_surely_misses_the_request_stays_out_of_the_way():
    """``AllowList(["db.internal"]) & ~(AllowList(["10.0.0.0/8"]) &
    AllowList(["*.evil"]))``: internal addresses are excluded for names
    under .evil only; db.internal is not one, so the exclusion surely allows
    it and the list's name opens its internal address.  x.evil, which the
    list allows too, resolving to the same address, is excluded.  (Mutants: ``&`` might allow when any part might, or always.)"""
    policy = AllowList(["db.internal", "x.evil"]) & ~(AllowList(["10.0.0.0/8"]) & AllowList(["*.evil"]))
    assert policy.permits_restricted(request("db.internal", 5432), ip("10.0.0.5"))
    assert not policy.permits_restricted(request("x.evil", 5432), ip("10.0.0.5"))


def test_an_exclusion_of_an_exclusion_surely_allows_what_the_inner_list_names():
    """``~(~AllowList([net]) & CustomPolicy(f))`` is ``net | ~f``: a request
    going to an address in net is surely allowed, whatever f would say, so
    ``AllowList(["db.internal"]) & ~(...)`` reaches db.internal there.  The
    contrast: ``~(AllowList([net]) & CustomPolicy(f))`` means the address
    and may exclude it, f unknown: closed.  (Mutant: ``~`` might allow
    always.)"""
    policy = AllowList(["db.internal"]) & ~(~AllowList(["10.0.0.0/8"]) & CustomPolicy(_no))
    assert policy.permits_restricted(request("db.internal", 5432), ip("10.0.0.1"))
    excluding = AllowList(["db.internal"]) & ~(AllowList(["10.0.0.0/8"]) & CustomPolicy(_no))
    assert not excluding.permits_restricted(request("db.internal", 5432), ip("10.0.0.1"))
