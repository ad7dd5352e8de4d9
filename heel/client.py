"""Calling the host's commands from inside a sandbox.

    from heel.client import call
    hits = call("web_search", query="trio", limit=3)

and, from a shell, ``heel ipc web_search --query trio --limit 3``.  This
module needs only the standard library and msgpack, and heel makes both
importable inside every sandbox that has an IPC router (whatever Python runs
there), so nothing has to be installed.

Each process opens one connection, on first use: it makes a socketpair and
passes one end to the host over the sandbox's IPC socket (fd 3, or
$HEEL_IPC_FD).  Calls are synchronous; threads of one process share the
connection, one call at a time.  A call left midway (any exception, a
KeyboardInterrupt included) drops the connection, and the next call opens a
fresh one, so a late answer is never taken for another call's.  The message
size limit is the router's, from $HEEL_IPC_MAX_MESSAGE.
"""

from __future__ import annotations

import _thread
import itertools
import os
import struct
import sys

# The C module under `socket`: importing socket (and the selectors it pulls
# in) would cost `heel ipc` more than its call.  Only socketpair, sendmsg,
# recv and close are used, which _socket has as such.
import _socket

from . import _ipc_codec as codec

__all__ = ["call", "IpcError", "main"]


class IpcError(Exception):
    """The host answered with an error: ``code`` (see docs/ipc.md) and ``message``."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


_lock = _thread.allocate_lock()  # threading's Lock, without importing threading
# Connections read and write msgpack with msgpack itself, except in `heel ipc`
# (main()), one call per process, whose start importing msgpack would double:
# there heel._minipack does it, in a little pure Python, with the same bytes.
_pure_python = False
_ids = itertools.count(1)
_state: dict = {"pid": None, "sock": None, "connection": None}


def _drop() -> None:
    """Forget this process's connection (closing it); the next call opens another."""
    sock = _state["sock"]
    _state.update(pid=None, sock=None, connection=None)
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


def _after_fork_in_child() -> None:
    # Another thread may have been inside call(), holding the lock and midway
    # through a message on the parent's connection: the child starts afresh.
    global _lock
    _lock = _thread.allocate_lock()
    _drop()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _max_message() -> int:
    """The router's message size limit, which heel passes in $HEEL_IPC_MAX_MESSAGE."""
    try:
        size = int(os.environ.get("HEEL_IPC_MAX_MESSAGE", ""))
    except ValueError:
        return codec.DEFAULT_MAX_FRAME
    return size if 1 <= size <= codec.MAX_MSGID else codec.DEFAULT_MAX_FRAME


def _connect() -> tuple[_socket.socket, codec.Connection]:
    fd = int(os.environ.get("HEEL_IPC_FD", "3"))
    try:
        broker = _socket.socket(fileno=os.dup(fd))
    except OSError as exc:
        raise IpcError(codec.INTERNAL_ERROR, f"no IPC channel here (fd {fd}: {exc.strerror}): not a heel "
                       "sandbox with an IPC router, or a parent closed the fd (Python's subprocess "
                       f"does: pass pass_fds=({fd},))") from None
    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        broker.sendmsg([b"c"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack("i", theirs.fileno()))])
    finally:
        theirs.close()
        broker.close()
    return ours, codec.Connection("client", _max_message(), pure_python=_pure_python)


def call(name: str, /, **params):
    """Call the host's command ``name`` with keyword parameters; returns its result.

    ``name`` is positional-only, so a command may have a parameter called
    ``name`` too.  Raises IpcError when the host answers with an error, or
    when a message is larger than the router's limit or malformed (``code``
    TOO_LARGE, PARSE_ERROR...); ConnectionError when the host went away."""
    with _lock:
        if _state["pid"] != os.getpid():  # a forked child opens its own
            _drop()
            _state["sock"], _state["connection"] = _connect()
            _state["pid"] = os.getpid()
        sock, connection = _state["sock"], _state["connection"]
        msgid = next(_ids) % codec.MAX_MSGID
        try:
            data = connection.send(codec.Request(msgid, name, params))
        except codec.ProtocolError as exc:  # too large: nothing was sent, the connection is fine
            raise IpcError(exc.code, str(exc)) from None
        try:
            sock.sendall(data)
            del data
            while True:
                event = connection.next_event()
                if event is codec.NEED_DATA:
                    connection.receive_data(sock.recv(65536))
                    continue
                if event is codec.CLOSED:
                    raise ConnectionError("the host closed the IPC connection")
                break
        except codec.ProtocolError as exc:
            _drop()  # the stream cannot be trusted: the next call reconnects
            raise IpcError(exc.code, str(exc)) from None
        except BaseException:
            # OSError, or anything that left the call midway (KeyboardInterrupt,
            # an exception from a signal handler): the answer may still come,
            # and the next call must not read it as its own.
            _drop()
            raise
    if event.msgid != msgid:
        raise IpcError(codec.INTERNAL_ERROR, f"a reply to {event.msgid} came for {msgid}")
    if event.error is not None:
        raise IpcError(*event.error)
    return event.result


def _parse_args(args: list[str]) -> tuple[str, dict]:
    """``NAME [--key value]... | NAME --json OBJECT | NAME -`` (JSON on stdin).

    A value is read as JSON when it parses as JSON (3, true, [1,2], "text"),
    else taken as the string it is."""
    if not args or args[0].startswith("-"):
        raise ValueError("usage: heel ipc NAME [--key value ...] | NAME --json '{...}' | NAME - (JSON on stdin)")
    name, rest = args[0], args[1:]
    if not rest:
        return name, {}
    import json

    if rest == ["-"]:
        params = json.load(sys.stdin)
    elif rest[:1] == ["--json"]:
        if len(rest) != 2:
            raise ValueError("--json takes one JSON object")
        params = json.loads(rest[1])
    else:
        params = {}
        if len(rest) % 2:
            raise ValueError(f"{rest[-1]} has no value")
        for key, value in zip(rest[::2], rest[1::2]):
            if not key.startswith("--") or len(key) < 3:
                raise ValueError(f"expected --key value, got {key!r}")
            try:
                params[key[2:].replace("-", "_")] = json.loads(value)
            except ValueError:
                params[key[2:].replace("-", "_")] = value
    if not isinstance(params, dict):
        raise ValueError("the parameters must be a JSON object")
    return name, params


def main(argv: list[str] | None = None) -> int:
    """``heel ipc NAME [ARGS...]``: prints the result (text as is, anything
    else as JSON) and exits 0; on error prints one line to stderr, exits 1."""
    global _pure_python
    args = sys.argv[1:] if argv is None else argv
    _pure_python = True
    try:
        name, params = _parse_args(args)
        result = call(name, **params)
    except (ValueError, TypeError, IpcError, OSError) as exc:  # TypeError: params msgpack cannot carry
        print(f"heel ipc: {exc}", file=sys.stderr)
        return 1
    if isinstance(result, str):
        sys.stdout.write(result if result.endswith("\n") else result + "\n")
    elif isinstance(result, bytes):
        sys.stdout.buffer.write(result)
    elif result is None or isinstance(result, bool):
        print({None: "null", True: "true", False: "false"}[result])  # JSON, without importing json
    else:
        import json

        print(json.dumps(result, default=repr))
    return 0


if __name__ == "__main__":
    sys.exit(main())
