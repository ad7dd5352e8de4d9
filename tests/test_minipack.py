"""heel._minipack, the pure-Python msgpack of `heel ipc`, checked against
msgpack itself: the same bytes out, the same values in, and whatever
msgpack (as heel's codec calls it) refuses, refused too."""

from __future__ import annotations

import math
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from heel import _minipack
from heel._ipc_codec import NEED_DATA, Connection, ProtocolError, Request, Response, _decode

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def same(a: object, b: object) -> bool:
    """Equal, with NaN equal to NaN and the type of every item the same."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


def decode_both(data: bytes) -> tuple[object, object]:
    """What heel's codec reads from ``data`` with msgpack and with _minipack:
    the value, or ProtocolError."""
    results = []
    for pure in (False, True):
        try:
            results.append(_decode(data, pure))
        except ProtocolError:
            results.append(ProtocolError)
    return results[0], results[1]


# Each length and integer at either side of a change of encoding.
BOUNDARIES = [
    None, True, False, 0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63, 2**64 - 1,
    -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63),
    0.0, -0.0, 1.5, 1e300, math.inf, -math.inf, math.nan,
    "", "x" * 31, "x" * 32, "x" * 255, "x" * 256, "x" * 65535, "x" * 65536, "é ß 中文 🦶",
    b"", b"x" * 255, b"x" * 256, b"x" * 65535, b"x" * 65536, bytearray(b"ba"), memoryview(b"mv"),
    [], [0] * 15, [0] * 16, [0] * 65535, [0] * 65536, (), (1, "t"),
    {}, {str(i): i for i in range(15)}, {str(i): i for i in range(16)}, {str(i): i for i in range(65536)},
    {b"k": [{"x": None}]}, [[[[{"deep": [[[]]]}]]]],
]


@pytest.mark.parametrize("value", BOUNDARIES, ids=lambda v: repr(v)[:30])
def test_packs_the_bytes_msgpack_packs_and_reads_them_back(value):
    packed = reference_pack(value)
    assert _minipack.packb(value) == packed
    original, pure = decode_both(packed)
    assert original is not ProtocolError and same(pure, original)


class Level(int):
    pass


def test_subclasses_pack_as_their_base_types():
    for value in (Level(3), type("S", (str,), {})("s"), type("D", (dict,), {})(a=1), type("L", (list,), {})([1])):
        assert _minipack.packb(value) == reference_pack(value)


@pytest.mark.parametrize("value,error", [
    (2**64, OverflowError), (-(2**63) - 1, OverflowError), (object(), TypeError), ({1j: 1}, TypeError),
    ({1, 2}, TypeError), ("\ud800", UnicodeEncodeError),
])
def test_refuses_what_msgpack_refuses_to_pack(value, error):
    with pytest.raises(error):
        reference_pack(value)
    with pytest.raises(error):
        _minipack.packb(value)


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_limits():
    _minipack.packb(nested(_minipack.PACK_NEST_LIMIT))
    with pytest.raises(ValueError):
        _minipack.packb(nested(_minipack.PACK_NEST_LIMIT + 1))  # and no RecursionError
    # Reading: as msgpack's unpacker, 1,024 containers open at once.
    for depth in (1000, 1024, 1025, 5000):
        data = b"\x91" * depth + b"\x01"
        original, pure = decode_both(data)
        assert (pure is ProtocolError) == (original is ProtocolError) == (depth > 1024), depth


@pytest.mark.parametrize("data", [
    b"", b"\xc1", b"\x92\x01", b"\x01\x02", b"\xa3ab", b"\xc4\x05abc", b"\xcd\x01", b"\xdc\xff\xff",
    b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\x81\x01\x02", b"\x81\xc0\x02", b"\x81\x90\x01",
    b"\xa2\xff\xfe", b"\xa3\xed\xa0\x80", b"\xd4\x05\x00", b"\xc7\x00\x05", b"\xd6\xff\x00\x00\x00\x00",
    b"\xc8\x00\x01\x05x", b"\x81\xa1k\x01\x01",
    # extension types whose bytes, skipped or not, would make a valid array
    b"\x93\xd4\x05\x00", b"\x93\xc7\x00\x05",
], ids=lambda d: d.hex() or "empty")
def test_refuses_what_the_codec_refuses(data):
    """Cut short, unused code, trailing bytes, counts past the end, non-string
    map keys, bad UTF-8 (a surrogate too), extension types (the timestamp's
    -1 too)."""
    original, pure = decode_both(data)
    assert original is ProtocolError and pure is ProtocolError


def test_the_last_of_duplicate_keys_wins_as_in_msgpack():
    data = b"\x82\xa1k\x01\xa1k\x02"
    original, pure = decode_both(data)
    assert original == pure == {"k": 2}


values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats()
    | st.text() | st.binary(),
    lambda children: st.lists(children, max_size=6) | st.tuples(children, children)
    | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), children, max_size=6),
    max_leaves=30,
)


@FUZZ
@given(values)
def test_any_value_packs_as_msgpack_packs_it(value):
    packed = reference_pack(value)
    assert _minipack.packb(value) == packed
    original, pure = decode_both(packed)
    assert same(pure, original)


@FUZZ
@given(st.binary(max_size=64))
@example(b"\x93\x01\x81\xa1a\x90\xc3")
def test_any_bytes_are_read_as_msgpack_reads_them(data):
    original, pure = decode_both(data)
    assert same(pure, original) or (pure is original is ProtocolError), (data, original, pure)


@FUZZ
@given(values, st.data())
def test_damaged_encodings_are_read_as_msgpack_reads_them(value, data):
    """Valid bytes with one byte changed, or cut, or with bytes added: the
    places where a reader's bounds and counts are tested."""
    packed = bytearray(reference_pack(value))
    action = data.draw(st.sampled_from(["change", "cut", "append"]))
    if action == "change":
        index = data.draw(st.integers(0, len(packed) - 1))
        packed[index] = data.draw(st.integers(0, 255))
    elif action == "cut":
        del packed[data.draw(st.integers(0, len(packed) - 1)):]
    else:
        packed += data.draw(st.binary(min_size=1, max_size=4))
    original, pure = decode_both(bytes(packed))
    assert same(pure, original) or (pure is original is ProtocolError), (bytes(packed), original, pure)


def test_a_pure_python_client_talks_to_a_msgpack_host():
    client = Connection("client", pure_python=True)
    server = Connection("server")
    params = {"query": "trio", "n": 3, "deep": [{"b": b"\x00"}, None, 1.5, -(2**63)]}
    sent = client.send(Request(7, "search", params))
    assert sent == Connection("client").send(Request(7, "search", params))  # the same bytes
    server.receive_data(sent)
    request = server.next_event()
    assert request == Request(7, "search", params)
    client.receive_data(server.send(Response(7, None, {"hits": ["a", "b"], "raw": b"\xff"})))
    assert client.next_event() == Response(7, None, {"hits": ["a", "b"], "raw": b"\xff"})
    assert client.next_event() is NEED_DATA


def test_a_pure_python_client_refuses_to_send_what_the_host_would_refuse():
    client = Connection("client", pure_python=True)
    with pytest.raises(TypeError, match="would be refused by the peer"):
        client.send(Request(1, "m", {"p": {1: "int key"}}))
    with pytest.raises(TypeError, match="cannot be packed"):
        client.send(Request(1, "m", {"p": object()}))
    # a broken answer ends the connection, as with msgpack
    body = b"\x94\x01\x01\xc0\xc1"
    client.receive_data(struct.pack(">I", len(body)) + body)
    with pytest.raises(ProtocolError):
        client.next_event()
