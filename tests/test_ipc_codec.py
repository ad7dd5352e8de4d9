"""The IPC codec: framing, message shapes, validation and hostile input, without sockets."""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heel._ipc_codec import (
    CLOSED,
    DEFAULT_MAX_FRAME,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NEED_DATA,
    PARSE_ERROR,
    TOO_LARGE,
    Connection,
    InvalidRequest,
    ProtocolError,
    Request,
    Response,
    error_response,
    is_valid_method_name,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def raw_frame(message: object) -> bytes:
    return frame(msgpack.packb(message, use_bin_type=True))


def events(conn: Connection) -> list[object]:
    """Every event up to NEED_DATA or CLOSED (included)."""
    out = []
    while True:
        event = conn.next_event()
        out.append(event)
        if event is NEED_DATA or event is CLOSED:
            return out


def serve_one(data: bytes, **kwargs) -> object:
    server = Connection("server", **kwargs)
    server.receive_data(data)
    return server.next_event()


def round_trip_request(request: Request) -> Request:
    client, server = Connection("client"), Connection("server")
    server.receive_data(client.send(request))
    received = server.next_event()
    assert server.next_event() is NEED_DATA
    return received


def round_trip_response(response: Response) -> Response:
    client, server = Connection("client"), Connection("server")
    client.receive_data(server.send(response))
    received = client.next_event()
    assert client.next_event() is NEED_DATA
    return received


# -- round trips ---------------------------------------------------------------

VALUES = [
    None,
    True,
    False,
    0,
    1,
    -1,
    -33,
    127,
    128,
    -(2**63),
    2**63 - 1,
    2**64 - 1,
    0.0,
    -1.5,
    1e300,
    math.inf,
    "",
    "ascii",
    "unicode: é ß 中文 🦶",
    b"",
    b"\x00\xff binary",
    [],
    [1, "two", 3.0, None],
    {},
    {"a": 1, "b": [True, {"c": b"d"}]},
    {b"bytes key": 1},
    [[[[{"deep": [[[]]]}]]]],
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_every_msgpack_type_round_trips_as_a_param_and_a_result(value):
    request = Request(7, "echo", {"value": value})
    assert round_trip_request(request) == request
    response = Response(7, None, value)
    assert round_trip_response(response) == response


def test_tuples_arrive_as_lists():
    assert round_trip_request(Request(1, "m", {"t": (1, 2)})).params == {"t": [1, 2]}


def test_error_responses_round_trip():
    response = error_response(3, METHOD_NOT_FOUND, "no method 'nope'")
    assert response == Response(3, (METHOD_NOT_FOUND, "no method 'nope'"), None)
    assert round_trip_response(response) == response


def test_msgid_bounds_round_trip():
    for msgid in (0, 2**32 - 1):
        assert round_trip_request(Request(msgid, "m", {})).msgid == msgid


# -- framing -----------------------------------------------------------------


def test_several_frames_in_one_chunk():
    client, server = Connection("client"), Connection("server")
    requests = [Request(i, f"m{i}", {"i": i}) for i in range(5)]
    server.receive_data(b"".join(client.send(r) for r in requests))
    assert events(server) == [*requests, NEED_DATA]
    assert server.buffered == 0


def test_one_frame_byte_by_byte():
    client, server = Connection("client"), Connection("server")
    request = Request(42, "write_file", {"path": "a/b", "data": b"x" * 300})
    data = client.send(request)
    for i in range(len(data) - 1):
        server.receive_data(data[i : i + 1])
        assert server.next_event() is NEED_DATA
        assert server.buffered == i + 1
    server.receive_data(data[-1:])
    assert events(server) == [request, NEED_DATA]
    server.receive_data(b"")
    assert server.next_event() is CLOSED
    assert server.next_event() is CLOSED


def test_frames_split_across_chunk_boundaries():
    client, server = Connection("client"), Connection("server")
    requests = [Request(i, "m", {"s": "x" * i}) for i in range(20)]
    data = b"".join(client.send(r) for r in requests)
    got = []
    for i in range(0, len(data), 7):
        server.receive_data(data[i : i + 7])
        got.extend(e for e in events(server) if e is not NEED_DATA)
    assert got == requests


def test_eof_at_a_frame_boundary_gives_closed_after_pending_events():
    server = Connection("server")
    server.receive_data(raw_frame([0, 1, "m", {}]))
    server.receive_data(b"")
    assert events(server) == [Request(1, "m", {}), CLOSED]


def test_eof_on_an_empty_stream_gives_closed():
    server = Connection("server")
    server.receive_data(b"")
    assert server.next_event() is CLOSED


@pytest.mark.parametrize("cut", [1, 3, 4, 6])
def test_eof_inside_a_frame_is_a_protocol_error(cut):
    server = Connection("server")
    server.receive_data(raw_frame([0, 1, "m", {}])[:cut])
    server.receive_data(b"")
    with pytest.raises(ProtocolError) as info:
        server.next_event()
    assert info.value.code == PARSE_ERROR
    with pytest.raises(ProtocolError):  # the connection stays broken
        server.next_event()


def test_data_after_eof_is_a_usage_error():
    server = Connection("server")
    server.receive_data(b"")
    server.receive_data(b"")  # repeating EOF is harmless
    with pytest.raises(RuntimeError):
        server.receive_data(b"\x00")


def test_oversized_frame_is_refused_from_its_header_without_buffering():
    server = Connection("server", max_frame=1024)
    server.receive_data(struct.pack(">I", 1025) + b"\x94\x00")
    assert server.buffered == 0
    server.receive_data(b"\x00" * 4096)  # the body keeps coming: it is dropped
    assert server.buffered == 0
    with pytest.raises(ProtocolError) as info:
        server.next_event()
    assert info.value.code == TOO_LARGE
    with pytest.raises(ProtocolError):
        server.next_event()


def test_oversized_frame_after_valid_ones_comes_after_them():
    server = Connection("server", max_frame=64)
    server.receive_data(raw_frame([0, 1, "m", {}]) + struct.pack(">I", 2**32 - 1))
    assert server.next_event() == Request(1, "m", {})
    with pytest.raises(ProtocolError) as info:
        server.next_event()
    assert info.value.code == TOO_LARGE


def test_frame_of_exactly_max_frame_is_accepted():
    body = msgpack.packb([0, 1, "m", {"s": "x" * 100}])
    assert serve_one(frame(body), max_frame=len(body)) == Request(1, "m", {"s": "x" * 100})
    with pytest.raises(ProtocolError) as info:
        serve_one(frame(body), max_frame=len(body) - 1)
    assert info.value.code == TOO_LARGE


def test_default_max_frame_is_4_mib():
    assert Connection("server").max_frame == DEFAULT_MAX_FRAME == 4 * 1024 * 1024


@pytest.mark.parametrize("max_frame", [0, -1, 2**32, 1.5, "big"])
def test_max_frame_must_be_a_sane_integer(max_frame):
    with pytest.raises(ValueError):
        Connection("server", max_frame=max_frame)


def test_role_must_be_server_or_client():
    with pytest.raises(ValueError):
        Connection("peer")


# -- malformed frames ----------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",  # an empty frame holds no object
        b"\xc1",  # the one byte msgpack never uses
        b"\x94\x00\x01",  # an array of 4 that stops after 2
        msgpack.packb([0, 1, "m", {}]) + b"\x00",  # trailing bytes
        b"\xa2\xff\xfe",  # a str that is not UTF-8
        b"\x94\x00\x01\xa1m\x81\x01\x02",  # an int map key
        msgpack.packb(msgpack.ExtType(5, b"xyz")),
        msgpack.packb([0, 1, "m", {"when": msgpack.Timestamp(0)}]),  # timestamps are ext -1
        b"\xdd\xff\xff\xff\xff",  # an array claiming 4 billion elements
        b"\x91" * 5000 + b"\xc0",  # nested deeper than the unpacker's stack
    ],
    ids=lambda b: b[:12].hex() or "empty",
)
def test_bytes_that_are_not_one_msgpack_object_are_a_protocol_error(body):
    with pytest.raises(ProtocolError) as info:
        serve_one(frame(body))
    assert info.value.code == PARSE_ERROR


def test_a_parse_error_discards_what_follows():
    server = Connection("server")
    server.receive_data(frame(b"\xc1") + raw_frame([0, 1, "m", {}]))
    with pytest.raises(ProtocolError):
        server.next_event()
    assert server.buffered == 0
    server.receive_data(raw_frame([0, 2, "m", {}]))
    with pytest.raises(ProtocolError):
        server.next_event()


@pytest.mark.parametrize(
    "message, msgid, code",
    [
        # Not a request at all: no msgid to answer to.
        ("hello", None, INVALID_REQUEST),
        ({"msgid": 1}, None, INVALID_REQUEST),
        ([], None, INVALID_REQUEST),
        ([0], None, INVALID_REQUEST),
        ([1, 5, None, None], None, INVALID_REQUEST),  # a response sent to the server
        ([2, "notify", {}], None, INVALID_REQUEST),  # msgpack-RPC notifications are not supported
        ([False, 5, "m", {}], None, INVALID_REQUEST),
        ([0.0, 5, "m", {}], None, INVALID_REQUEST),
        # A bad msgid cannot be echoed back.
        ([0, -1, "m", {}], None, INVALID_REQUEST),
        ([0, 2**32, "m", {}], None, INVALID_REQUEST),
        ([0, "5", "m", {}], None, INVALID_REQUEST),
        ([0, True, "m", {}], None, INVALID_REQUEST),
        ([0, 1.0, "m", {}], None, INVALID_REQUEST),
        ([0, None, "m", {}], None, INVALID_REQUEST),
        # A good msgid: the server can reply.
        ([0, 5], 5, INVALID_REQUEST),
        ([0, 5, "m"], 5, INVALID_REQUEST),
        ([0, 5, "m", {}, "extra"], 5, INVALID_REQUEST),
        ([0, 5, 17, {}], 5, INVALID_REQUEST),
        ([0, 5, b"m", {}], 5, INVALID_REQUEST),
        ([0, 5, None, {}], 5, INVALID_REQUEST),
        ([0, 5, "", {}], 5, METHOD_NOT_FOUND),
        ([0, 5, "1st", {}], 5, METHOD_NOT_FOUND),
        ([0, 5, "has space", {}], 5, METHOD_NOT_FOUND),
        ([0, 5, "dotted.name", {}], 5, METHOD_NOT_FOUND),
        ([0, 5, "m\n", {}], 5, METHOD_NOT_FOUND),
        ([0, 5, "é", {}], 5, METHOD_NOT_FOUND),
        ([0, 5, "m" * 129, {}], 5, METHOD_NOT_FOUND),
        ([0, 5, "m", [1, 2]], 5, INVALID_PARAMS),  # positional params are not supported
        ([0, 5, "m", None], 5, INVALID_PARAMS),
        ([0, 5, "m", "x=1"], 5, INVALID_PARAMS),
        ([0, 5, "m", {b"key": 1}], 5, INVALID_PARAMS),
        ([0, 2**32 - 1, "m", []], 2**32 - 1, INVALID_PARAMS),
    ],
)
def test_well_framed_invalid_requests_become_events(message, msgid, code):
    server = Connection("server")
    server.receive_data(raw_frame(message) + raw_frame([0, 9, "next", {}]))
    event = server.next_event()
    assert type(event) is InvalidRequest
    assert (event.msgid, event.code) == (msgid, code)
    assert event.message
    # The stream is intact: the next request is read normally.
    assert server.next_event() == Request(9, "next", {})
    if msgid is not None:
        reply = server.send(error_response(event.msgid, event.code, event.message))
        client = Connection("client")
        client.receive_data(reply)
        assert client.next_event() == Response(msgid, (code, event.message), None)


def test_method_names_at_the_limits():
    assert is_valid_method_name("a" * 128)
    assert is_valid_method_name("Read-File_2")
    assert not is_valid_method_name("a" * 129)
    assert not is_valid_method_name("-a")
    assert not is_valid_method_name(None)
    assert round_trip_request(Request(1, "a" * 128, {})).method == "a" * 128


@pytest.mark.parametrize(
    "message",
    [
        [0, 1, "m", {}],  # a request sent to the client
        [1, 1, None],
        [1, 1, None, None, None],
        [1, -1, None, 1],
        [1, True, None, 1],
        [1, 1, "error", None],
        [1, 1, [1], None],
        [1, 1, [1, 2], None],
        [1, 1, ["1", "m"], None],
        [1, 1, [1, "m"], "and a result"],
        "nope",
    ],
)
def test_a_malformed_response_is_a_protocol_error_for_the_client(message):
    client = Connection("client")
    client.receive_data(raw_frame(message))
    with pytest.raises(ProtocolError) as info:
        client.next_event()
    assert info.value.code == INVALID_REQUEST
    with pytest.raises(ProtocolError):
        client.next_event()


# -- sending -------------------------------------------------------------------


@pytest.mark.parametrize(
    "result",
    [object(), {1: "int key"}, {"nested": {None: 1}}, 2**64, -(2**63) - 1, msgpack.ExtType(1, b"x"), {1, 2}],
    ids=repr,
)
def test_a_result_that_cannot_be_sent_is_a_type_error(result):
    server = Connection("server")
    with pytest.raises(TypeError, match="result of message 4"):
        server.send(Response(4, None, result))
    # The server answers instead with an internal error; that always packs.
    assert server.send(error_response(4, INTERNAL_ERROR, "result not serialisable"))


def test_params_that_cannot_be_sent_are_a_type_error():
    with pytest.raises(TypeError, match="params of message 4"):
        Connection("client").send(Request(4, "m", {"f": open}))


def test_a_message_larger_than_max_frame_is_refused_by_send():
    server = Connection("server", max_frame=100)
    with pytest.raises(ProtocolError) as info:
        server.send(Response(1, None, "x" * 100))
    assert info.value.code == TOO_LARGE
    assert server.send(error_response(1, TOO_LARGE, "result too large"))


def test_each_role_sends_only_its_own_kind():
    with pytest.raises(TypeError):
        Connection("server").send(Request(1, "m", {}))
    with pytest.raises(TypeError):
        Connection("client").send(Response(1, None, None))


@pytest.mark.parametrize(
    "make",
    [
        lambda: Request(-1, "m", {}),
        lambda: Request(2**32, "m", {}),
        lambda: Request(True, "m", {}),
        lambda: Request(1, "bad name", {}),
        lambda: Request(1, "m", [1]),
        lambda: Request(1, "m", {1: 2}),
        lambda: Response(1, (1,), None),
        lambda: Response(1, ("code", "message"), None),
        lambda: Response(1, (1, "message"), "result too"),
    ],
)
def test_invalid_messages_cannot_be_built(make):
    with pytest.raises(ValueError):
        make()


def test_error_as_a_list_becomes_a_tuple():
    assert Response(1, [2, "x"], None).error == (2, "x")


def test_the_codec_imports_with_only_the_standard_library_and_msgpack():
    # The sandbox side loads this file without the rest of heel (nor trio, cffi...).
    import heel._ipc_codec as codec

    code = (
        "import sys, importlib.util\n"
        "for name in ('trio', 'cffi', 'heel', 'typer'): sys.modules[name] = None\n"
        f"spec = importlib.util.spec_from_file_location('codec', {codec.__file__!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['codec'] = module\n"
        "spec.loader.exec_module(module)\n"
        "conn = module.Connection('client')\n"
        "assert conn.send(module.Request(1, 'm', {}))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": ""})


# -- properties ----------------------------------------------------------------

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), children, max_size=5),
    max_leaves=20,
)
method_names = st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,127}", fullmatch=True)
requests = st.builds(
    Request,
    msgid=st.integers(min_value=0, max_value=2**32 - 1),
    method=method_names,
    params=st.dictionaries(st.text(max_size=12), msgpack_values, max_size=5),
)


@FUZZ
@given(requests)
def test_valid_requests_round_trip_exactly(request):
    assert round_trip_request(request) == request


@FUZZ
@given(
    st.integers(min_value=0, max_value=2**32 - 1),
    st.one_of(
        st.tuples(st.just(None), msgpack_values),
        st.tuples(st.tuples(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.text()), st.none()),
    ),
)
def test_valid_responses_round_trip_exactly(msgid, error_and_result):
    error, result = error_and_result
    response = Response(msgid, error, result)
    assert round_trip_response(response) == response


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


def _feed_hostile(role: str, data: bytes, cuts: list[int], max_frame: int) -> None:
    allowed = (Request, InvalidRequest) if role == "server" else (Response,)
    conn = Connection(role, max_frame=max_frame)
    try:
        for chunk in [*_chunked(data, cuts), b""]:
            before = conn.buffered
            conn.receive_data(chunk)
            assert conn.buffered <= before + len(chunk)
            while True:
                event = conn.next_event()
                if event is NEED_DATA or event is CLOSED:
                    break
                assert type(event) in allowed
            # Drained: only the incomplete frame is left.
            assert conn.buffered <= max_frame + 3
        assert event is CLOSED
    except ProtocolError as error:
        assert error.code in (PARSE_ERROR, INVALID_REQUEST, TOO_LARGE)


def _framed_garbage(bodies: list[bytes]) -> bytes:
    return b"".join(frame(b) for b in bodies)


hostile_bytes = st.one_of(
    st.binary(max_size=300),  # anything at all
    st.lists(st.binary(max_size=40), max_size=6).map(_framed_garbage),  # framed, body anything
    # framed msgpack of any shape
    st.lists(msgpack_values, max_size=4).map(lambda vs: b"".join(raw_frame(v) for v in vs)),
    st.lists(
        st.tuples(st.integers(-2, 3), st.integers(-2, 2**32 + 1) | st.booleans(), st.text(max_size=5), msgpack_values),
        max_size=4,
    ).map(lambda ms: b"".join(raw_frame(list(m)) for m in ms)),  # nearly requests/responses
)


@FUZZ
@given(
    st.sampled_from(["server", "client"]),
    hostile_bytes,
    st.lists(st.integers(min_value=0, max_value=400), max_size=10),
    st.integers(min_value=1, max_value=256),
)
def test_hostile_bytes_give_only_documented_outcomes(role, data, cuts, max_frame):
    _feed_hostile(role, data, cuts, max_frame)


def test_a_large_frame_is_decoded_with_the_collector_paused():
    """A frame of a million empty arrays: each pass of the garbage collector
    while they are made would walk all made so far (seconds for 4 MiB).
    None runs while it is decoded (the 1,400 it took before); a small frame changes nothing, and the
    collector is on again afterwards."""
    import gc

    def collections_while_decoding(count: int) -> int:
        body = msgpack.packb([0, 1, "m", {"p": [[] for _ in range(count)]}])
        conn = Connection("server")
        conn.receive_data(struct.pack(">I", len(body)) + body)
        passes = []

        def seen(phase: str, info: dict) -> None:
            if phase == "start":
                passes.append(info["generation"])

        gc.callbacks.append(seen)
        try:
            event = conn.next_event()
        finally:
            gc.callbacks.remove(seen)
        assert isinstance(event, Request) and len(event.params["p"]) == count
        return len(passes)

    assert gc.isenabled()
    # (At most one pass: the first allocation once it is back on may start one.)
    assert collections_while_decoding(1_000_000) <= 1
    assert gc.isenabled()
    assert collections_while_decoding(50_000) > 0  # under 64 KiB: the collector runs as ever
