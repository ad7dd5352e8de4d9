"""Host commands that sandboxed code can call.

The host gives the sandbox a few safe doors (a web search, a database query,
a file fetch) instead of a network::

    router = heel.IpcRouter()

    @router.command("web_search")
    async def web_search(query: str, limit: int = 5) -> list[str]:
        ...

    async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
        await sb.run(["heel", "ipc", "web_search", "--query", "trio"])

Inside, ``heel ipc NAME --key value``, ``heel.client.call(NAME, **params)``
or the wrapper ``NAME --key value`` reach it.  The transport is a socket
that only the sandbox's processes hold (see docs/ipc.md): every command gets
it as fd 3, and each calling process opens a connection of its own by
passing a fresh socketpair end over it.  Handlers run in the sandbox's
nursery, several at once; closing the sandbox cancels those still running.
"""

from __future__ import annotations

import fcntl
import inspect
import os
import resource
import select
import socket
import struct
import termios
import time
import types
import typing
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from . import _ipc_codec as codec
from ._budget import ProcessBudget
from ._spawn import recv_fds
from .errors import PolicyError

__all__ = ["IpcCommand", "IpcRouter"]

#: Parameter types a command may declare, as msgpack carries them.
_TYPES = (str, int, float, bool, bytes, list, dict, type(None))

#: The calls one connection may have running at once (IpcRouter's
#: ``max_calls_per_connection`` default).  While that many run, the host reads
#: nothing more from the connection: a process that pipelines requests without
#: waiting for the answers cannot make the host hold more than this many calls'
#: parameters and answers.
MAX_CALLS_PER_CONNECTION = 64
#: The calls a sandbox may have running at once, over all its connections
#: (IpcRouter's ``max_calls`` default).
MAX_CALLS = 128
#: How many messages of the router's largest size a sandbox's large
#: requests may amount to at once, decoded (running or about to run); see
#: _ByteBudget.  Requests of SMALL_REQUEST bytes or less are not counted:
#: max_calls bounds them (128 x 16 KiB decoded is some 190 MiB at worst),
#: and small calls never wait behind large ones (a call that waits for
#: another, a put for a get, would otherwise wait for ever).
PENDING_MESSAGES = 2
SMALL_REQUEST = 16 * 1024
#: fds the host keeps for everything else before it grants IPC connections
#: (one fd each); see _connection_budget.
_FD_RESERVE = 128
#: A connection is refused, whatever the budget, when its fd leaves fewer
#: than this many below the soft RLIMIT_NOFILE (fds come lowest first, so an
#: fd's number is a count of those open): the fds may have gone elsewhere
#: (the proxies, the host's own files).
_FD_HEADROOM = 32
#: How often (seconds) a connection whose calls are all taken checks whether
#: its caller has gone, since it reads nothing meanwhile.
_HANGUP_POLL = 0.5
#: SO_PASSRIGHTS (Linux 6.16): set to 0, a unix socket refuses fds (the
#: sender's sendmsg fails with EPERM).  Python 3.11 does not name it.
_SO_PASSRIGHTS = {"sparc": 0x5C, "sparc64": 0x5C, "parisc": 0x4051, "parisc64": 0x4051}.get(os.uname().machine, 83)


class IpcCommand:
    """A command the sandbox can call by name.

    Subclass it, set ``name`` and ``parameters`` (parameter name -> type, or a
    tuple of types; the types msgpack carries: str, int, float, bool, bytes,
    list, dict, None), list the parameters that may be left out in
    ``optional``, and implement ``async def handle(self, **params)``.  The
    result must be msgpack-serialisable.  ``IpcRouter.command`` builds one
    from a plain async function.
    """

    name: str = ""
    parameters: Mapping[str, Any] = {}
    optional: frozenset[str] = frozenset()

    async def handle(self, **params: Any) -> Any:
        raise NotImplementedError

    def check(self, params: Mapping[str, Any]) -> str | None:
        """Why ``params`` do not fit this command, or None when they do."""
        # The first unknown name in the message's order, not the least of
        # them all: one is among the first len(parameters) + 1, whereas
        # sorting every name (a request can hold 650,000) would hold trio's
        # thread for longer than decoding them, which is paced and this not.
        for key in params:
            if key not in self.parameters:
                return f"{self.name} has no parameter {key!r}"
        missing = sorted(set(self.parameters) - set(params) - set(self.optional))
        if missing:
            return f"{self.name} needs the parameter {missing[0]!r}"
        for key, value in params.items():
            expected = self.parameters[key]
            if expected is Any:
                continue
            allowed = expected if isinstance(expected, tuple) else (expected,)
            if float in allowed and type(value) is int:
                continue  # an int is a fine float
            if not any(type(value) is t or (t is not bool and t is not int and isinstance(value, t))
                       for t in allowed):
                names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
                return f"{self.name}: {key} must be {names}, not {type(value).__name__}"
        return None


class _FunctionCommand(IpcCommand):
    """An IpcCommand around an async function, its parameters from the type hints."""

    def __init__(self, name: str, function: Callable[..., Awaitable[Any]]) -> None:
        if not inspect.iscoroutinefunction(function):
            raise PolicyError(f"IPC command {name!r}: {function!r} is not an async function")
        try:
            hints = typing.get_type_hints(function)
        except Exception as exc:  # a hint naming what does not exist
            raise PolicyError(f"IPC command {name!r}: cannot read its type hints: {exc}") from None
        parameters: dict[str, Any] = {}
        optional = set()
        for param in inspect.signature(function).parameters.values():
            if param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                raise PolicyError(f"IPC command {name!r}: parameter {param.name} must be a named parameter")
            parameters[param.name] = _msgpack_types(name, param.name, hints.get(param.name, Any))
            if param.default is not param.empty:
                optional.add(param.name)
        self.name = name
        self.parameters = parameters
        self.optional = frozenset(optional)
        self._function = function

    async def handle(self, **params: Any) -> Any:
        return await self._function(**params)


def _msgpack_types(command: str, param: str, hint: Any):
    """A type hint as the (tuple of) types the check accepts."""
    if hint is Any:
        return Any
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        members = [_msgpack_types(command, param, a) for a in typing.get_args(hint)]
        if any(member is Any for member in members):
            return Any  # Optional[Any] is Any: None is one of its values already
        return tuple(t for member in members for t in _as_tuple(member))
    if origin is not None:
        hint = origin  # list[str] -> list, dict[str, int] -> dict
    if hint is None:
        hint = type(None)
    if hint not in _TYPES:
        raise PolicyError(f"IPC command {command!r}: parameter {param} has type {hint!r}, "
                          "which msgpack does not carry (use str, int, float, bool, bytes, list, dict)")
    return hint


def _as_tuple(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


class IpcRouter:
    """The commands a sandbox may call; give it as ``SandboxConfig(ipc=router)``.

    ``max_message_size`` bounds each message either way (the client inside
    learns it from ``$HEEL_IPC_MAX_MESSAGE``); ``max_connections`` bounds the
    connections a sandbox may hold open at once (each calling process opens
    one), and the sandboxes of the host process together hold at most what
    its RLIMIT_NOFILE leaves room for (see _connection_budget); and
    ``max_calls_per_connection`` bounds the calls one connection may have
    running at once, and ``max_calls`` those of the whole sandbox: while
    that many run, the host reads no more requests (from that connection,
    or from any).  Requests larger than 16 KiB also take room in a budget
    of two messages of max_message_size, before they are decoded (a msgpack
    message can decode to some 90 times its size).  See README (IPC) for
    what that bounds.
    """

    def __init__(self, *, max_message_size: int = codec.DEFAULT_MAX_FRAME,
                 max_connections: int = 256,
                 max_calls_per_connection: int = MAX_CALLS_PER_CONNECTION, max_calls: int = MAX_CALLS) -> None:
        if not isinstance(max_message_size, int) or isinstance(max_message_size, bool) \
                or not 1024 <= max_message_size <= codec.MAX_MSGID:
            raise PolicyError(f"max_message_size must be between 1 KiB and 4 GiB, got {max_message_size!r}")
        if not isinstance(max_connections, int) or isinstance(max_connections, bool) or max_connections < 1:
            raise PolicyError(f"max_connections must be a positive int, got {max_connections!r}")
        if not isinstance(max_calls_per_connection, int) or isinstance(max_calls_per_connection, bool) \
                or max_calls_per_connection < 1:
            raise PolicyError(f"max_calls_per_connection must be a positive int, got {max_calls_per_connection!r}")
        if not isinstance(max_calls, int) or isinstance(max_calls, bool) or max_calls < 1:
            raise PolicyError(f"max_calls must be a positive int, got {max_calls!r}")
        self.max_message_size = max_message_size
        self.max_connections = max_connections
        self.max_calls_per_connection = max_calls_per_connection
        self.max_calls = max_calls
        self._commands: dict[str, IpcCommand] = {}

    def register(self, command: IpcCommand) -> "IpcRouter":
        """Add a command; returns the router, so calls chain."""
        if not isinstance(command, IpcCommand):
            raise PolicyError(f"register() takes an IpcCommand, got {command!r}")
        name = command.name
        if not codec.is_valid_method_name(name):
            raise PolicyError(f"IPC command name {name!r} must match [A-Za-z][A-Za-z0-9_-]* "
                              f"(at most {codec.MAX_METHOD_LEN} characters)")
        if name in self._commands:
            raise PolicyError(f"an IPC command named {name!r} is registered already")
        for key, expected in command.parameters.items():
            if not isinstance(key, str):
                raise PolicyError(f"IPC command {name!r}: parameter names must be strings")
            if expected is not Any and not all(t in _TYPES for t in _as_tuple(expected)):
                raise PolicyError(f"IPC command {name!r}: parameter {key} has a type msgpack does not carry")
        self._commands[name] = command
        return self

    def command(self, name: str | None = None):
        """Decorator: register an async function, named ``name`` or after itself."""
        def decorate(function):
            if name is None and not inspect.iscoroutinefunction(function):
                raise PolicyError(f"IPC command: {function!r} is not an async function")
            self.register(_FunctionCommand(function.__name__ if name is None else name, function))
            return function
        return decorate

    @property
    def names(self) -> list[str]:
        return sorted(self._commands)

    def get(self, name: str) -> IpcCommand | None:
        return self._commands.get(name)


# ---- the host's side of the transport ------------------------------------

async def serve(router: IpcRouter, broker: socket.socket, broker_done: trio.Event | None = None) -> None:
    """Accept connections from the sandbox until cancelled.

    Each message on ``broker`` (a SOCK_SEQPACKET socket whose peer every
    sandboxed process holds) carries one socket end over SCM_RIGHTS: a new
    connection.  Anything else passed along is closed, as is a connection
    over the router's max_connections or the process's budget (see
    _connection_budget).  Nothing the sandbox sends makes this raise: a
    connection that goes wrong is dropped alone.

    The sandbox decides where its files are last closed: any fd it passes,
    and any fd it sends along a connection's bytes, may be the last
    reference to a file of its, and whoever drops that frees the file then
    and there (a large unlinked file or memfd takes about 0.2 s a GiB;
    a lingering socket as long as it likes).  So what the kernel may drop
    or the host may close happens in a worker thread of the sandbox's
    (``threads``, one at a time), never on trio's thread: the broker's
    recvmsg (which drops the fds past the room it gives), the closing of
    what is no connection, and a connection's reads until the kernel
    refuses fds on it (see _refuse_fds).  What heel.client sends, one
    connection alone with no fd waiting on it, is taken on trio's thread,
    where nothing is dropped (see _receive_plain_connection, _fds_queued).

    ``broker_done``, when given, is set as soon as the broker is no longer
    read (its loop left), before the connections' handlers have ended."""
    broker.setblocking(False)
    open_connections = [0]
    all_calls = trio.Semaphore(router.max_calls)
    budget = _ByteBudget(PENDING_MESSAGES * router.max_message_size)
    threads = trio.CapacityLimiter(1)
    async with trio.open_nursery() as nursery:
        # ``broker_done`` is set once this loop is left for good: the broker
        # is no longer used, though handlers may still run (one may be
        # closing the sandbox itself, and waits for its close: see
        # Sandbox._close, which waits for this, not for the whole task).
        try:
            while True:
                # The thread below cannot be cancelled: a sandbox that closed
                # meanwhile (its broker given up, see Session.close_channels)
                # ends this here, before the broker is waited on again.
                await trio.lowlevel.checkpoint_if_cancelled()
                await trio.lowlevel.wait_readable(broker)
                received, copies = _receive_plain_connection(broker)
                if received is None:
                    received = await trio.to_thread.run_sync(_receive_connections, broker, copies,
                                                             limiter=threads)
                if received is None:
                    return  # the channel is broken, or every sandboxed end is closed
                refused = []
                try:
                    while received:
                        fd, unsafe = received[0]
                        if open_connections[0] >= router.max_connections or not _room_for(fd):
                            refused.append(received.pop(0)[0])
                            continue
                        open_connections[0] += 1
                        received.pop(0)
                        nursery.start_soon(_serve_process_connection, router, fd, open_connections, all_calls,
                                           budget, unsafe, threads)
                finally:
                    await _close_in_thread(refused + [fd for fd, _ in received], threads)
        finally:
            if broker_done is not None:
                broker_done.set()


def _receive_plain_connection(broker: socket.socket) -> tuple[list[tuple[int, int | None]] | None, list[int]]:
    """On trio's thread: the next message of the broker when it is what
    heel.client sends, one connection and nothing else, as
    _receive_connections gives it, and []; else None, and the fds to close
    before the worker thread reads the message itself (_receive_connections).

    Nothing is dropped here for good: the message is peeked first, and the
    fds a peek installs, or drops past its room, are copies while the
    message still holds each file; only then is it read, with no room at
    all, and the kernel drops the message's own reference to the socket,
    which the copy kept holds.  (The sandbox cannot take a message off the
    host's end.)  This saves a thread hop, some 200-400 us here, per
    connection."""
    try:
        data, fds, flags, _ = recv_fds(broker, 16, 2, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return [], []
    except OSError:
        return None, []
    if len(fds) != 1 or flags & socket.MSG_CTRUNC or not data:
        return None, fds  # closed in the thread: a close flushes (a file's last writes), copy or not
    fd = fds[0]
    unsafe = _refuse_fds(fd) if _is_connection(fd) else -1
    if unsafe == -1:
        return None, fds
    try:
        broker.recv(16, _NEVER_BLOCK)
    except OSError:
        return None, fds  # the thread sees what is wrong
    return [(fd, unsafe)], []


def _receive_connections(broker: socket.socket, copies: list[int]) -> list[tuple[int, int | None]] | None:
    """In a worker thread: one message from the broker, as the connections
    it carries, each with its count of unsafe bytes (see _refuse_fds); every
    other fd is closed here, and ``copies`` (see _receive_plain_connection)
    first.  [] when there was nothing after all; None when the broker is
    broken or every sandboxed end of it is closed."""
    _close_all(copies)
    try:
        data, fds, _, _ = recv_fds(broker, 16, 4)
    except (BlockingIOError, InterruptedError):
        return []
    except OSError:
        return None
    if not data and not fds and _hung_up(broker):
        return None  # (an empty message alone is no end)
    connections = []
    for fd in fds:
        unsafe = _refuse_fds(fd) if _is_connection(fd) else -1
        if unsafe == -1:
            _close_fd(fd)
        else:
            connections.append((fd, unsafe))
    return connections


def _refuse_fds(fd: int) -> int | None:
    """Make the kernel refuse fds sent to the connection ``fd`` from now on
    (SO_PASSRIGHTS off: the sender's sendmsg fails with EPERM), and count
    the bytes already waiting on it: fds may come with those, sent before
    the host had the connection, and they are read in a worker thread (see
    _converse).  None where the kernel has no SO_PASSRIGHTS (before Linux
    6.16): then every read is.  -1: not a connection after all."""
    try:
        probe = socket.socket(fileno=fd)
    except OSError:
        return -1
    try:
        try:
            probe.setsockopt(socket.SOL_SOCKET, _SO_PASSRIGHTS, 0)
        except OSError:
            return None
        # A sender checks the option and queues its bytes under the
        # socket's state lock, which setsockopt does not take: a sender that
        # read the option before it changed may not have queued yet.
        # getpeername takes that lock (unix_peer_get), so once it returns
        # whatever came with fds is queued, and counted below.
        probe.getpeername()
        if _fds_queued(fd) == 0:
            return 0  # bytes may wait, but no fd came with them: read as any later ones
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return -1
    finally:
        probe.detach()


def _fds_queued(fd: int) -> int | None:
    """How many fds wait in the receive queue of the unix socket ``fd``
    (its fdinfo's scm_fds, which the kernel counts as they are queued and
    received; an out-of-band byte's stay counted after the byte is dropped,
    which errs on the safe side); None when unknown.  heel.client sends its
    first request right after the connection, so its bytes wait, without
    fds, when the host turns SO_PASSRIGHTS off: read on trio's thread, they
    save a thread hop (some 200 us) per connection."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as info:
            text = info.read()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(b"scm_fds:"):
            try:
                return int(line[8:])
            except ValueError:
                return None
    return None


def _recv_in_thread(fd: int, size: int) -> bytes:
    """In a worker thread: up to ``size`` bytes of the connection ``fd``.
    The fds that come along are dropped inside the recv, in this thread
    (the kernel drops what it has no room for where it receives, as a close
    would), never installed: up to 253 at a time, held while the first was
    freed, were fds the host's own files and the other sandboxes' budgets
    count on (see _connection_budget).  b"" at its end or on an error; a
    BlockingIOError when nothing waits."""
    sock = socket.socket(fileno=fd)
    try:
        return sock.recv(size, _NEVER_BLOCK)
    except (BlockingIOError, InterruptedError):
        raise BlockingIOError from None
    except OSError:
        return b""
    finally:
        sock.detach()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        _close_fd(fd)


async def _close_in_thread(fds: list[int], threads: trio.CapacityLimiter) -> None:
    """Close fds of the sandbox's in a worker thread (see serve), even when
    cancelled: the task waits for it."""
    if fds:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_close_all, fds, limiter=threads)


def _connection_budget() -> int | None:
    """How many IPC connections all the sandboxes of this process may hold
    at once (each holds one fd): half of what the soft RLIMIT_NOFILE leaves
    above _FD_RESERVE, at least 16; None without a limit.  The limit itself
    is left alone (as in heel.proxy): raise RLIMIT_NOFILE for more."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(16, (soft - _FD_RESERVE) // 2)


#: The IPC connections open over every sandbox of this process: one
#: sandbox's connections must not take the fds that another's, or the host's
#: own files, need (each router's max_connections is its own).
_process_connections = ProcessBudget(lambda: _connection_budget())  # looked up each time


def _room_for(fd: int) -> bool:
    """Whether the connection ``fd`` may be served, and its place taken in
    _process_connections; not when the fd itself is within _FD_HEADROOM of
    the soft RLIMIT_NOFILE (fds come lowest first, so its number counts
    those open, whatever holds them: the proxies, the host's own files)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and fd >= soft - _FD_HEADROOM:
        return False
    return _process_connections.take()


def _is_connection(fd: int) -> bool:
    """Whether ``fd`` is what heel.client passes: a connected AF_UNIX
    SOCK_STREAM socket.  A pipe, a file, an O_PATH fd of a socket inode
    (fstat calls it a socket, yet it is none), a datagram, seqpacket,
    listening or unconnected socket is not.  Never raises; ``fd`` stays open."""
    try:
        probe = socket.socket(fileno=fd)  # on failure the fd is not taken over
    except Exception:
        return False
    try:
        if probe.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) != socket.AF_UNIX \
                or probe.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) != socket.SOCK_STREAM \
                or probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return False
        probe.getpeername()  # ENOTCONN: no peer to answer
        return True
    except Exception:
        return False
    finally:
        probe.detach()


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass  # closed all the same (EINTR, EIO from a file's last writes)


def _describe_failure(exc: BaseException) -> str:
    """An exception's message for the caller; never raises (a __str__ may)."""
    try:
        message = str(exc)
    except Exception:
        message = ""
    if not isinstance(message, str) or not message:
        try:
            message = type(exc).__name__
        except Exception:
            message = "the command failed"
    return message


async def _take_slot(slots: trio.Semaphore, sock) -> bool:
    """Wait for a free call slot; False when the caller hangs up meanwhile
    (nothing is read while every slot is taken, so its end of file would
    not be seen)."""
    try:
        slots.acquire_nowait()  # a free slot (then nobody waits): no checkpoint, no cancel scope
        return True
    except trio.WouldBlock:
        pass
    while True:
        with trio.move_on_after(_HANGUP_POLL):
            await slots.acquire()
            return True
        if _hung_up(sock):
            return False


class _ByteBudget:
    """The bytes of large requests a sandbox may have decoded at once
    (running or about to run), counted as they came on the wire: a msgpack
    message can decode to Python objects tens of times its size (about 65
    times for an array of empty arrays, 90 for nested maps), so for large
    requests this, not the count of calls, is what bounds the host's
    memory.  One message is always let through alone; 0 bytes never wait."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = trio.Event()
        #: The sandbox's share of trio's thread for decoding its requests.
        self.decoding = _DecodeShare()

    async def acquire(self, size: int) -> None:
        while size and self.used and self.used + size > self.limit:
            await self._changed.wait()
        self.used += size

    def release(self, size: int) -> None:
        if not size:
            return
        self.used -= size
        self._changed.set()
        self._changed = trio.Event()


class _DecodeShare:
    """Decoding a request runs on trio's thread (msgpack holds the GIL
    throughout, so another thread would not free it): up to some 0.8 s for
    a message of 4 MiB, and a sandbox can send many, large or small, over
    many connections.  Its requests are decoded one at a time, and whenever
    the time they took passes half of the time since the window began, the
    next waits until it is half again: the host's other tasks (the other
    sandboxes, the timeouts) get the rest.  Calls at an ordinary pace never
    wait.  The window starts afresh each second, carrying over what is still
    owed: a decode longer than the window (a large message on a loaded
    machine) is still followed by as long for the host."""

    WINDOW = 1.0

    def __init__(self) -> None:
        self._lock = trio.Lock()
        self._start = time.perf_counter()
        self._spent = 0.0

    async def next_event(self, connection: codec.Connection) -> codec.Event:
        if self._owed() <= 0 and not self._lock.locked():
            return self._decode(connection)  # no checkpoint: an ordinary call waits for nothing
        async with self._lock:
            owed = self._owed()
            if owed > 0:
                await trio.sleep(owed)
            return self._decode(connection)

    def _owed(self) -> float:
        """How long the next decode must wait for the host's half."""
        now = time.perf_counter()
        owed = 2 * self._spent - (now - self._start)
        if now - self._start >= self.WINDOW:
            self._start, self._spent = now, max(0.0, owed) / 2
        return owed

    def _decode(self, connection: codec.Connection) -> codec.Event:
        start = time.perf_counter()
        try:
            return connection.next_event()
        finally:
            self._spent += time.perf_counter() - start


async def _take_slots(connection_slots: trio.Semaphore, all_calls: trio.Semaphore, budget: _ByteBudget,
                      size: int, sock) -> bool:
    """A slot of the connection's, one of the sandbox's and ``size`` bytes of
    its budget, before the request is decoded; False (and nothing held) when
    the caller hangs up meanwhile (see _take_slot)."""
    if not await _take_slot(connection_slots, sock):
        return False
    try:
        if await _take_slot(all_calls, sock):
            if not size:
                return True  # a small request takes no bytes (see SMALL_REQUEST)
            try:
                while True:
                    with trio.move_on_after(_HANGUP_POLL):
                        await budget.acquire(size)
                        return True
                    if _hung_up(sock):
                        break
            except BaseException:
                all_calls.release()
                raise
            all_calls.release()
    except BaseException:
        connection_slots.release()
        raise
    connection_slots.release()
    return False


async def _take_budget(budget: _ByteBudget, size: int, sock) -> bool:
    """``size`` bytes of the budget; False (and nothing held) when the
    caller hangs up meanwhile (see _take_slot)."""
    while True:
        with trio.move_on_after(_HANGUP_POLL):
            await budget.acquire(size)
            return True
        if _hung_up(sock):
            return False


async def _read_unsafe(sock, unsafe: list[int | None], threads: trio.CapacityLimiter) -> bytes:
    """The next bytes of ``sock`` that may come with fds: read in a worker
    thread, which closes the fds (see serve)."""
    while True:
        await trio.lowlevel.wait_readable(sock)
        size = 65536 if unsafe[0] is None else min(65536, unsafe[0])
        try:
            data = await trio.to_thread.run_sync(_recv_in_thread, sock.fileno(), size, limiter=threads)
        except BlockingIOError:
            continue
        if unsafe[0] is not None:
            unsafe[0] = 0 if not data else unsafe[0] - len(data)
        return data


def _hung_up(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLHUP | select.POLLRDHUP)
    return any(events & (select.POLLHUP | select.POLLRDHUP) for _, events in poller.poll(0))


async def _serve_process_connection(router: IpcRouter, fd: int, open_connections: list[int],
                                    all_calls: trio.Semaphore, budget: _ByteBudget, unsafe: int | None,
                                    threads: trio.CapacityLimiter) -> None:
    """_serve_connection, for a connection that holds room in _process_connections."""
    try:
        await _serve_connection(router, fd, open_connections, all_calls, budget, unsafe, threads)
    finally:
        _process_connections.give_back()


async def _serve_connection(router: IpcRouter, fd: int, open_connections: list[int],
                            all_calls: trio.Semaphore, budget: _ByteBudget, unsafe: int | None,
                            threads: trio.CapacityLimiter) -> None:
    """Serve the connection ``fd`` (which this now owns) until it ends.

    ``unsafe``: how many of its first bytes may come with fds, to be read
    in a worker thread of ``threads`` (None: all; see _refuse_fds).
    Whatever its peer does, only this connection is dropped: an error it
    causes ends it, and its fd and its place in ``open_connections`` are
    given back whatever happens.  (A KeyboardInterrupt or SystemExit from a
    handler, and cancellation, still go through.)"""
    state = [unsafe]
    try:
        try:
            stdlib_sock = socket.socket(fileno=fd)
        except OSError:  # not a socket after all: nothing to serve
            await _close_in_thread([fd], threads)
            return
        sock = None
        try:
            sock = trio.socket.from_stdlib_socket(stdlib_sock)
            await _converse(router, sock, all_calls, budget, state, threads)
        except Exception:
            pass  # whatever the peer made go wrong ends its connection, not the sandbox
        finally:
            # Closing purges what is still queued, fds too: not on trio's
            # thread while some may be (the sandbox's end of it is its own).
            if sock is not None:
                trio.lowlevel.notify_closing(sock)
            if state[0] == 0:
                stdlib_sock.close()
            else:
                await _close_in_thread([stdlib_sock.detach()], threads)
    finally:
        open_connections[0] -= 1


# Every read and write on a connection: the socket is the sandbox's, passed
# over SCM_RIGHTS, so its open file, and the O_NONBLOCK flag trio set on
# it, is shared with the sandbox, which may clear the flag again.  A plain
# recv() would then block trio's whole thread (every sandbox's proxy, IPC
# and timeout, and the host's own tasks) for as long as the sandbox liked.
_NEVER_BLOCK = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


async def _converse(router: IpcRouter, sock, all_calls: trio.Semaphore, budget: _ByteBudget,
                    unsafe: list[int | None], threads: trio.CapacityLimiter) -> None:
    """Read requests from ``sock`` and answer them until it ends.  While
    ``unsafe[0]`` is not 0, reads are made in a worker thread of
    ``threads`` and counted down (see _refuse_fds and serve)."""
    connection = codec.Connection("server", router.max_message_size)
    send_lock = trio.Lock()
    # A slot per running call, held until its answer is sent: at most this
    # many handlers, and answers waiting to be sent, per connection.
    slots = trio.Semaphore(router.max_calls_per_connection)

    async def reply(response: codec.Response) -> None:
        try:
            data = connection.send(response)
        except codec.ProtocolError as exc:
            data = connection.send(codec.error_response(response.msgid, exc.code, str(exc)))
        except Exception as exc:  # TypeError: not msgpack; anything else a strange result raised
            data = connection.send(codec.error_response(response.msgid, codec.INTERNAL_ERROR,
                                                        _describe_failure(exc)))
        try:
            send_lock.acquire_nowait()  # free: no checkpoint (sock.send has one)
        except trio.WouldBlock:
            await send_lock.acquire()
        try:
            view = memoryview(data)
            while view:
                view = view[await sock.send(view, _NEVER_BLOCK):]
        except OSError:
            pass  # the caller is gone
        finally:
            send_lock.release()

    def release(size: int) -> None:
        slots.release()
        all_calls.release()
        budget.release(size)

    async def run(request: codec.Request, size: int) -> None:
        try:
            await answer(request)
        finally:
            del request  # its parameters go before the slot does
            release(size)

    async def answer(request: codec.Request) -> None:
        command = router.get(request.method)
        if command is None:
            await reply(codec.error_response(request.msgid, codec.METHOD_NOT_FOUND,
                                             f"no command named {request.method!r}"))
            return
        try:
            problem = command.check(request.params)
        except Exception as exc:  # a subclass's own check: its failure is the caller's answer too
            await reply(codec.error_response(request.msgid, codec.INTERNAL_ERROR, _describe_failure(exc)))
            return
        if problem:
            await reply(codec.error_response(request.msgid, codec.INVALID_PARAMS, problem))
            return
        try:
            result = await command.handle(**request.params)
        except Exception as exc:  # the handler's failure is the caller's answer, not the host's crash
            await reply(codec.error_response(request.msgid, codec.INTERNAL_ERROR, _describe_failure(exc)))
            return
        await reply(codec.Response(request.msgid, None, result))

    # Bytes of the byte budget taken for a large frame while it arrives: a
    # connection holds no more than a small frame's worth that the budget
    # does not count.  They pass to the request once the frame is whole.
    reserved = 0
    try:
        async with trio.open_nursery() as handlers:
            while True:
                announced = connection.partial_frame_size()
                if not reserved and announced is not None and announced > SMALL_REQUEST:
                    if not await _take_budget(budget, announced, sock):
                        handlers.cancel_scope.cancel()
                        return
                    reserved = announced
                try:
                    if unsafe[0] == 0:
                        data = await sock.recv(65536, _NEVER_BLOCK)
                    else:
                        data = await _read_unsafe(sock, unsafe, threads)
                except OSError:
                    data = b""
                connection.receive_data(data)
                while True:
                    # Room for a request is taken before it is decoded: while
                    # every slot, or the sandbox's byte budget, is taken, the
                    # host decodes and reads nothing more from this connection.
                    size = connection.next_frame_size()
                    if size is not None and size <= SMALL_REQUEST:
                        size = 0  # counted by the slots only (see SMALL_REQUEST)
                    # The frame reserved for is the first to be whole: every
                    # one before it was taken before more was read.
                    held, reserved = (reserved, 0) if size and size == reserved else (0, reserved)
                    if size is not None and not await _take_slots(slots, all_calls, budget, size - held, sock):
                        budget.release(held)
                        handlers.cancel_scope.cancel()
                        return
                    try:
                        event = (connection.next_event() if size is None
                                 else await budget.decoding.next_event(connection))
                    except codec.ProtocolError:
                        event = codec.CLOSED  # the stream cannot be trusted: drop it
                    if size is not None and not isinstance(event, codec.Request):
                        release(size)  # not a call after all
                    if event is codec.NEED_DATA:
                        break
                    if event is codec.CLOSED:
                        # Nobody is left to read an answer: stop the work too.
                        handlers.cancel_scope.cancel()
                        return
                    if isinstance(event, codec.InvalidRequest):
                        if event.msgid is None:
                            handlers.cancel_scope.cancel()
                            return
                        await reply(codec.error_response(event.msgid, event.code, event.message))
                    elif isinstance(event, codec.Request):  # the only other event on a server connection
                        assert size is not None  # a request comes from a frame
                        handlers.start_soon(run, event, size)
                if not data:
                    handlers.cancel_scope.cancel()
                    return
    finally:
        budget.release(reserved)  # a frame that never came whole
