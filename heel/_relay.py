"""The trio face of the C tunnel relay (csrc/relay.c).

After the proxy's handshake, ``await relay(client, upstream)`` hands both
sockets to the relay thread, which splices their bytes until the tunnel ends,
and returns how it ended.  No trio task runs per tunnel.

One relay thread serves the whole process; it starts on first use and
outlives ``trio.run``.  What waits for completions belongs to one trio run
(a ``RunVar``), so a later ``trio.run`` in the same process starts afresh.
Completions arrive as records on one pipe; trio lets one task at a time wait
on an fd, so the first waiting task reads the pipe for everyone and hands
that job on when it leaves.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
from dataclasses import dataclass

import trio

from . import _native

__all__ = ["RelayResult", "relay"]

#: How long a cancelled relay() waits for the relay thread to close the fds.
CANCEL_GRACE_S = 2.0


@dataclass(frozen=True)
class RelayResult:
    """How a tunnel ended.  Byte counts are what reached each destination;
    ``error`` is 0 when both directions ended with EOF, else the errno that
    ended the tunnel (both connections are then reset).  A cancelled
    ``relay()`` raises instead of returning one."""

    a_to_b: int
    b_to_a: int
    error: int = 0


_process_relay: _native.Relay | None = None
_process_relay_lock = threading.Lock()
_tunnel_ids = itertools.count(1)


def _get_relay() -> _native.Relay:
    global _process_relay
    with _process_relay_lock:
        if _process_relay is None:
            _process_relay = _native.Relay()
        return _process_relay


def _forget_relay_after_fork() -> None:
    # A forked child has the relay's memory but not its thread.
    global _process_relay, _process_relay_lock
    _process_relay = None
    _process_relay_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_relay_after_fork)


class _Waiter:
    def __init__(self) -> None:
        self.result: RelayResult | None = None
        self.wake = trio.Event()


class _Completions:
    """Waiters of one trio run, by tunnel id, and who reads the pipe."""

    def __init__(self) -> None:
        self.waiters: dict[int, _Waiter] = {}
        self.reading = False

    def dispatch(self, records) -> None:
        for tunnel_id, a_to_b, b_to_a, error in records:
            waiter = self.waiters.get(tunnel_id)
            if waiter is not None:   # else: a waiter that gave up, or an earlier run's
                waiter.result = RelayResult(a_to_b, b_to_a, error)
                waiter.wake.set()

    def hand_over_reading(self) -> None:
        if not self.reading:
            for waiter in self.waiters.values():
                if waiter.result is None:
                    waiter.wake.set()
                    return

    async def wait(self, relay: _native.Relay, waiter: _Waiter) -> RelayResult:
        while waiter.result is None:
            if self.reading:
                await waiter.wake.wait()
                if waiter.result is None:
                    waiter.wake = trio.Event()
                continue
            self.reading = True
            try:
                await trio.lowlevel.wait_readable(relay.notify_fd)
            finally:
                self.reading = False
            self.dispatch(relay.read_done())
        return waiter.result


_completions: trio.lowlevel.RunVar = trio.lowlevel.RunVar("heel_relay_completions")


def _run_completions() -> _Completions:
    try:
        return _completions.get()
    except LookupError:
        completions = _Completions()
        _completions.set(completions)
        return completions


def _take_fd(sock: socket.socket | trio.socket.SocketType) -> int:
    """The socket's fd, which the caller now owns; the socket object is
    left closed (fileno() == -1)."""
    trio.lowlevel.notify_closing(sock)
    return sock.detach()


async def relay(sock_a: socket.socket | trio.socket.SocketType,
                sock_b: socket.socket | trio.socket.SocketType) -> RelayResult:
    """Relay bytes between two connected stream sockets until the tunnel
    ends, in C, and say how it ended.

    Both sockets are taken over (detached: their objects are closed), also
    when this raises.  Bytes already read from a socket in Python must be
    sent on before calling this.  An EOF in one direction is passed on with
    ``shutdown(SHUT_WR)`` while the other direction keeps flowing.  When the
    calling task is cancelled, both connections are reset and closed before
    ``Cancelled`` propagates (waiting at most ``CANCEL_GRACE_S``).
    """
    relay_thread = _get_relay()
    completions = _run_completions()
    tunnel_id = next(_tunnel_ids)
    fd_a = _take_fd(sock_a)
    try:
        fd_b = _take_fd(sock_b)
    except BaseException:
        os.close(fd_a)
        raise
    waiter = _Waiter()
    completions.waiters[tunnel_id] = waiter
    try:
        relay_thread.add(fd_a, fd_b, tunnel_id)
        try:
            return await completions.wait(relay_thread, waiter)
        except BaseException:
            relay_thread.cancel(tunnel_id)
            with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_GRACE_S):
                await completions.wait(relay_thread, waiter)
            raise
    finally:
        del completions.waiters[tunnel_id]
        completions.hand_over_reading()
