"""The IPC wire protocol without I/O: bytes in, events out (in the manner of h11).

One :class:`Connection` per channel end.  The transport feeds it what it reads
with :meth:`Connection.receive_data` (``b""`` for end of file), takes events out
with :meth:`Connection.next_event`, and writes what :meth:`Connection.send`
returns.  Nothing here touches a socket or a clock, so the parser can be fuzzed
and tested without either.

Each message is a frame: a 4-byte big-endian unsigned length, then that many
bytes holding one msgpack object, shaped as in msgpack-RPC::

    request   [0, msgid, method, params]    params: a map of named parameters
    response  [1, msgid, error, result]     error: nil or [code, message]

What goes wrong, and who learns of it:

- :class:`ProtocolError` from :meth:`~Connection.next_event`: the byte stream
  cannot be trusted any more (not msgpack, a frame announcing more than
  ``max_frame`` bytes, end of file inside a frame).  Drop the connection; the
  error repeats on every later call.
- :class:`InvalidRequest` event (server side only): a frame that decodes but is
  not a valid request.  Answer ``error_response(ev.msgid, ev.code, ev.message)``
  when ``ev.msgid`` is not None; when it is None nobody can be addressed, so
  drop the connection.
- From :meth:`~Connection.send`: ``TypeError`` for a value msgpack cannot
  pack, ``ProtocolError`` with code :data:`TOO_LARGE` for a message that does
  not fit in a frame.  Nothing was sent and the connection is unharmed.

This module needs only the standard library and msgpack: the sandbox side
(``heel.client``) imports it without the rest of heel.  A connection made with
``pure_python=True`` needs no msgpack either (``heel ipc``, one call per
process, which importing msgpack cost more than the call): it packs and reads
the same bytes with heel._minipack.  See docs/ipc.md.
"""

from __future__ import annotations

import gc
import struct

# typing and dataclasses are left out on purpose: `heel ipc` loads this module
# in the sandbox at every call, where importing them would cost more than the
# call itself.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Literal, Union

msgpack = None  # imported by the first connection that uses it


def _msgpack():
    global msgpack
    if msgpack is None:
        try:
            import msgpack
        except ImportError:  # inside a sandbox whose Python lacks msgpack: the copy heel puts there
            from ._vendor import msgpack  # type: ignore[no-redef]
    return msgpack

__all__ = [
    "PARSE_ERROR",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "INVALID_PARAMS",
    "INTERNAL_ERROR",
    "TOO_LARGE",
    "DEFAULT_MAX_FRAME",
    "ProtocolError",
    "Request",
    "Response",
    "InvalidRequest",
    "NEED_DATA",
    "CLOSED",
    "Connection",
    "error_response",
    "is_valid_method_name",
]

# Error codes, numbered as in JSON-RPC 2.0; TOO_LARGE is in its range for
# implementation-defined server errors.
PARSE_ERROR = -32700  #: the bytes are not msgpack, or a frame was cut short
INVALID_REQUEST = -32600  #: msgpack, but not a valid message
METHOD_NOT_FOUND = -32601  #: no method of that name (or an impossible name)
INVALID_PARAMS = -32602  #: params not a map with str keys, or refused by the method
INTERNAL_ERROR = -32603  #: the method failed, or its result could not be packed
TOO_LARGE = -32000  #: a message larger than the frame limit

DEFAULT_MAX_FRAME = 4 * 1024 * 1024
MAX_MSGID = 2**32 - 1
MAX_METHOD_LEN = 128

_REQUEST = 0
_RESPONSE = 1
_HEADER = struct.Struct(">I")
_NAME_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_NAME_REST = _NAME_START | frozenset("0123456789_-")


class ProtocolError(ValueError):
    """The peer broke the protocol, or a message cannot be framed.

    ``code`` is one of the module's error codes.
    """

    def __init__(self, message: str, code: int = PARSE_ERROR) -> None:
        super().__init__(message)
        self.code = code


def is_valid_method_name(name: object) -> bool:
    """Whether *name* can name a method: ``[A-Za-z][A-Za-z0-9_-]*``, 1 to 128 characters."""
    # [A-Za-z][A-Za-z0-9_-]*, checked by hand: no re (nor the enum it
    # imports) on the sandbox's side of every call.
    return (isinstance(name, str) and 0 < len(name) <= MAX_METHOD_LEN and name[0] in _NAME_START
            and all(c in _NAME_REST for c in name))


# Each check returns what is wrong, or None.  The same checks guard the
# constructors (ValueError) and the parser (InvalidRequest / ProtocolError).


def _msgid_problem(msgid: object) -> str | None:
    # bool is an int subclass; msgpack's true is not a message id.
    if type(msgid) is not int or not 0 <= msgid <= MAX_MSGID:
        return f"msgid must be an integer in [0, 2**32), not {_describe(msgid)}"
    return None


def _method_problem(method: object) -> str | None:
    if not is_valid_method_name(method):
        return (
            f"method must be a name matching [A-Za-z][A-Za-z0-9_-]* of at most {MAX_METHOD_LEN} characters,"
            f" not {_describe(method)}"
        )
    return None


def _params_problem(params: object) -> str | None:
    if not isinstance(params, dict):
        return f"params must be a map of named parameters, not {_describe(params)}"
    for key in params:
        if not isinstance(key, str):
            return f"params keys must be strings, not {_describe(key)}"
    return None


def _error_problem(error: object) -> str | None:
    if error is None:
        return None
    if (
        not isinstance(error, (tuple, list))
        or len(error) != 2
        or type(error[0]) is not int
        or not isinstance(error[1], str)
    ):
        return f"error must be nil or [code: int, message: str], not {_describe(error)}"
    return None


def _describe(value: object) -> str:
    # reprlib: a message can be megabytes; its description stays a line.
    import reprlib  # only on the error path: the sandbox imports this module at every call

    return f"{type(value).__name__} {reprlib.repr(value)}"


class _Record:
    """A small immutable value: compared and hashed by its fields, shown with them."""

    __slots__: tuple[str, ...] = ()

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Request(_Record):
    """A call: ``method(**params)``, answered by the :class:`Response` with the same ``msgid``."""

    __slots__ = ("msgid", "method", "params")
    msgid: int
    method: str
    params: dict[str, Any]

    def __init__(self, msgid: int, method: str, params: dict[str, Any]) -> None:
        problem = _msgid_problem(msgid) or _method_problem(method) or _params_problem(params)
        if problem:
            raise ValueError(problem)
        self._set("msgid", msgid)
        self._set("method", method)
        self._set("params", params)


class Response(_Record):
    """The answer to request ``msgid``: ``error`` is None and ``result`` the value,
    or ``error`` is ``(code, message)`` and ``result`` is None."""

    __slots__ = ("msgid", "error", "result")
    msgid: int
    error: tuple[int, str] | None
    result: Any

    def __init__(self, msgid: int, error: tuple[int, str] | None, result: Any = None) -> None:
        problem = _msgid_problem(msgid) or _error_problem(error)
        if problem is None and error is not None and result is not None:
            problem = "a response carries an error or a result, not both"
        if problem:
            raise ValueError(problem)
        self._set("msgid", msgid)
        self._set("error", None if error is None else tuple(error))
        self._set("result", result)


class InvalidRequest(_Record):
    """A frame that decoded but is not a valid request (server side).

    ``msgid`` is the request's id when it could be read, else None (then no
    reply can be addressed and the server drops the connection).
    """

    __slots__ = ("msgid", "code", "message")
    msgid: int | None
    code: int
    message: str

    def __init__(self, msgid: int | None, code: int, message: str) -> None:
        self._set("msgid", msgid)
        self._set("code", code)
        self._set("message", message)


class _Signal:
    """NEED_DATA and CLOSED: two sentinels, compared with ``is``."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__


NEED_DATA = _Signal("NEED_DATA")  #: no complete frame yet: feed more bytes
CLOSED = _Signal("CLOSED")  #: the peer ended the stream at a frame boundary

if TYPE_CHECKING:
    Event = Union[Request, Response, InvalidRequest, _Signal]


def error_response(msgid: int, code: int, message: str) -> Response:
    """The response that reports failure *code* with *message* to request *msgid*."""
    return Response(msgid, (code, message), None)


def _reject_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack extension types are not accepted (type {code})")


class Connection:
    """One end of an IPC channel: ``role="server"`` reads requests and sends
    responses, ``role="client"`` the other way round.

    ``max_frame`` bounds a message body in bytes, both ways.  The connection
    holds at most one incomplete frame (``max_frame + 3`` bytes) besides the
    complete frames fed but not yet taken out with :meth:`next_event`; the body
    of a frame announcing more than ``max_frame`` is never stored.
    """

    def __init__(self, role: Literal["server", "client"], max_frame: int = DEFAULT_MAX_FRAME, *,
                 pure_python: bool = False) -> None:
        if role not in ("server", "client"):
            raise ValueError(f"role must be 'server' or 'client', not {role!r}")
        if type(max_frame) is not int or not 1 <= max_frame <= MAX_MSGID:
            raise ValueError(f"max_frame must be an integer in [1, 2**32), not {max_frame!r}")
        self.role = role
        self.max_frame = max_frame
        self.pure_python = pure_python
        self._partial = bytearray()  # the start of a frame whose end has not arrived
        # Complete frames not yet decoded, then perhaps the error that ends the stream.
        # A list rather than collections.deque (which costs `heel ipc` its
        # import): it rarely holds more than a frame or two.
        self._frames: list[bytes | ProtocolError] = []
        self._framed = 0  # bytes held in self._frames
        self._eof = False
        self._failed = False  # a ProtocolError is queued or was raised: ignore further bytes

    @property
    def buffered(self) -> int:
        """Bytes received and held, not yet turned into events."""
        return len(self._partial) + self._framed

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the peer; ``b""`` means end of file.

        Never raises for what the peer sent: a broken stream shows up, in
        order, as a :class:`ProtocolError` from :meth:`next_event`.
        """
        if self._failed:
            return
        if self._eof:
            if data:
                raise RuntimeError("receive_data() after end of file")
            return
        if not data:
            self._eof = True
            if self._partial:
                self._fail(ProtocolError(f"end of file inside a frame ({len(self._partial)} bytes of it received)"))
            return
        self._partial += data
        self._split_frames()

    def _split_frames(self) -> None:
        buffer = self._partial
        start = 0
        while len(buffer) - start >= _HEADER.size:
            (length,) = _HEADER.unpack_from(buffer, start)
            if length > self.max_frame:
                message = f"a frame of {length} bytes announced, more than the limit of {self.max_frame}"
                self._fail(ProtocolError(message, TOO_LARGE))
                return
            end = start + _HEADER.size + length
            if end > len(buffer):
                break
            self._frames.append(bytes(buffer[start + _HEADER.size : end]))
            self._framed += length
            start = end
        del buffer[:start]

    def _fail(self, error: ProtocolError) -> None:
        # Complete frames before the failure are still delivered, then the error.
        self._failed = True
        self._partial.clear()
        self._frames.append(error)

    def next_frame_size(self) -> int | None:
        """The size in bytes of the complete frame the next :meth:`next_event`
        would decode, or None when the next event is not one (no frame yet,
        the end, or an error): a server can make room for what a message
        decodes to before it decodes it."""
        if self._frames and isinstance(self._frames[0], bytes):
            return len(self._frames[0])
        return None

    def partial_frame_size(self) -> int | None:
        """The size a frame announced whose end has not arrived yet (None:
        no frame begun, or its header is not whole): a server can make room
        for it before it reads the rest."""
        if self._failed or len(self._partial) < _HEADER.size:
            return None
        return _HEADER.unpack_from(self._partial, 0)[0]

    def next_event(self) -> Event:
        """The next event: a :class:`Request` or :class:`InvalidRequest` (server),
        a :class:`Response` (client), :data:`NEED_DATA` or :data:`CLOSED`.

        Raises :class:`ProtocolError` when the stream is broken; the caller
        drops the connection.
        """
        if not self._frames:
            return CLOSED if self._eof else NEED_DATA
        frame = self._frames[0]
        if isinstance(frame, ProtocolError):
            raise frame  # stays queued: every later call raises it again
        self._frames.pop(0)
        self._framed -= len(frame)
        try:
            message = _decode(frame, self.pure_python)
            if self.role == "server":
                return _parse_request(message)
            return _parse_response(message)
        except ProtocolError as error:
            # Nothing after a broken frame can be trusted.
            self._frames.clear()
            self._framed = 0
            self._fail(error)
            raise

    def send(self, event: Request | Response) -> bytes:
        """The bytes that carry *event* (a :class:`Request` from a client, a
        :class:`Response` from a server)."""
        if self.role == "client" and type(event) is Request:
            message: list[Any] = [_REQUEST, event.msgid, event.method, event.params]
        elif self.role == "server" and type(event) is Response:
            message = [_RESPONSE, event.msgid, None if event.error is None else list(event.error), event.result]
        else:
            expected = "Request" if self.role == "client" else "Response"
            raise TypeError(f"a {self.role} sends a {expected}, not {type(event).__name__}")
        what = f"the {'params' if type(event) is Request else 'result'} of message {event.msgid}"
        try:
            if self.pure_python:
                from . import _minipack

                body = _minipack.packb(message)
            else:
                body = _msgpack().packb(message, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as error:
            # ValueError: nested too deeply; OverflowError: an int beyond 64 bits.
            raise TypeError(f"{what} cannot be packed as msgpack: {error}") from None
        if len(body) > self.max_frame:
            raise ProtocolError(
                f"message {event.msgid} takes {len(body)} bytes, more than the limit of {self.max_frame}", TOO_LARGE
            )
        try:
            # What the peer would refuse (map keys other than str or bytes,
            # extension types) must fail here, not drop the connection there.
            _decode(body, self.pure_python)
        except ProtocolError as error:
            raise TypeError(f"{what} would be refused by the peer: {error}") from None
        return _HEADER.pack(len(body)) + body


#: Frames larger than this are decoded with the garbage collector paused.
GC_PAUSE_ABOVE = 4 * 1024


def _decode(frame: bytes, pure_python: bool = False) -> object:
    size = len(frame)
    # A large frame can hold millions of small containers (four million empty
    # arrays in 4 MiB), and each pass of the collector while they are made
    # walks all those made so far: 1.8 s to decode such a frame, 0.4 s with
    # the collector paused.  Nothing decoded can form a cycle, so nothing is
    # left for it to find.
    paused = size > GC_PAUSE_ABOVE and gc.isenabled()
    if paused:
        gc.disable()
    try:
        if pure_python:
            from . import _minipack

            return _minipack.unpackb(frame)
        return _msgpack().unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            ext_hook=_reject_ext,
            max_str_len=size,
            max_bin_len=size,
            max_array_len=size,
            max_map_len=size // 2,
            max_ext_len=0,
        )
    except ValueError as error:  # msgpack's errors, bad UTF-8 and _reject_ext all derive from it
        reason = str(error) or type(error).__name__
        raise ProtocolError(f"a frame of {size} bytes is not one msgpack object: {reason}") from None
    finally:
        if paused:
            gc.enable()


def _parse_request(message: object) -> Request | InvalidRequest:
    if (
        not isinstance(message, list)
        or len(message) < 2
        or type(message[0]) is not int
        or message[0] != _REQUEST
        or _msgid_problem(message[1])
    ):
        return InvalidRequest(
            None, INVALID_REQUEST, f"expected a request [0, msgid, method, params], got {_describe(message)}"
        )
    msgid = message[1]
    if len(message) != 4:
        return InvalidRequest(
            msgid, INVALID_REQUEST, f"a request has 4 elements [0, msgid, method, params], not {len(message)}"
        )
    _, _, method, params = message
    if not isinstance(method, str):
        return InvalidRequest(msgid, INVALID_REQUEST, f"method must be a string, not {_describe(method)}")
    problem = _method_problem(method)
    if problem:
        return InvalidRequest(msgid, METHOD_NOT_FOUND, problem)
    problem = _params_problem(params)
    if problem:
        return InvalidRequest(msgid, INVALID_PARAMS, problem)
    return Request(msgid, method, params)


def _parse_response(message: object) -> Response:
    # The host is the only peer of a client; a malformed answer leaves nothing to reply to.
    if not isinstance(message, list) or len(message) != 4 or type(message[0]) is not int or message[0] != _RESPONSE:
        raise ProtocolError(f"expected a response [1, msgid, error, result], got {_describe(message)}", INVALID_REQUEST)
    _, msgid, error, result = message
    try:
        return Response(msgid, error, result)
    except ValueError as problem:
        raise ProtocolError(f"invalid response: {problem}", INVALID_REQUEST) from None
