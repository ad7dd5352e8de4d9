"""The trio face of the C tunnel relay (csrc/relay.c).

After the proxy's handshake, ``await relay(client, upstream)`` hands both
sockets to a relay thread, which splices their bytes until the tunnel ends,
and returns how it ended.  No trio task runs per tunnel.

A pool of relay threads serves the whole process: ``THREADS`` of them, each
with its own epoll set, started together on first use and outliving
``trio.run``.  A new tunnel goes to the thread with the fewest tunnels.  One
thread moves some 6 GiB/s of loopback tunnels, a core's worth; where the
machine has cores to spare, more threads let many tunnels go faster
(benchmarks/bench_proxy.py, and the README's Performance section).

What waits for completions belongs to one trio run (a ``RunVar``), so a
later ``trio.run`` in the same process starts afresh.  Each thread reports
completions as records on a pipe of its own; trio lets one task at a time
wait on an fd, so for each pipe the first waiting task of a run reads it for
everyone and hands that job on when it leaves.  Trio runs in other threads
may read the same pipe at the same time: a record read by a run that does
not own the tunnel is handed to the run that does (``_owners``).

A pool that could not start every thread (out of fds or threads) is the
threads that did start, for the rest of the process.  A child made by
``os.fork()`` starts a pool of its own, but holds copies of the fds of the
parent's tunnels, as of every fd, until it execs (they are close-on-exec) or
exits: heel's own children are exec'd at once.
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


def _default_threads() -> int:
    """One relay thread per four CPUs this process may run on, 1 to 8: the
    senders and receivers of the tunnels' bytes need the other cores."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except OSError:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // 4))


#: How many relay threads the process starts on first use.  Changing it
#: later takes effect only through ``_restart_pool`` (tests, benchmarks).
THREADS = _default_threads()


class _Slot:
    """One relay thread and how many tunnels it carries now."""

    def __init__(self) -> None:
        self.relay = _native.Relay()
        self.tunnels = 0


_pool: list[_Slot] | None = None
_pool_lock = threading.Lock()
_tunnel_ids = itertools.count(1)


def _get_pool() -> list[_Slot]:
    global _pool
    with _pool_lock:
        if _pool is None:
            # The first thread must start; where a later one cannot (out of
            # fds or threads), the pool is the threads that did.
            pool = [_Slot()]
            try:
                while len(pool) < THREADS:
                    pool.append(_Slot())
            except OSError:
                pass
            except BaseException:   # interrupted: no thread left outside a pool
                for slot in pool:
                    slot.relay.stop()
                raise
            _pool = pool
        return _pool


def _take_slot() -> _Slot:
    pool = _get_pool()
    with _pool_lock:
        slot = min(pool, key=lambda s: s.tunnels)
        slot.tunnels += 1
        return slot


def _release_slot(slot: _Slot) -> None:
    with _pool_lock:
        slot.tunnels -= 1


def _restart_pool(threads: int) -> None:
    """Stop the pool (its tunnels end without completions) and make the
    next tunnel start ``threads`` relay threads.  For tests and benchmarks,
    with no tunnel running."""
    global _pool, THREADS
    with _pool_lock:
        pool, _pool = _pool, None
        THREADS = threads
    for slot in pool or ():
        slot.relay.stop()


def _forget_relay_after_fork() -> None:
    # A forked child has the relays' memory but not their threads.
    global _pool, _pool_lock, _owners, _owners_lock
    _pool = None
    _pool_lock = threading.Lock()
    _owners = {}
    _owners_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_relay_after_fork)


class _Waiter:
    def __init__(self) -> None:
        self.result: RelayResult | None = None
        self.wake = trio.Event()


class _Completions:
    """Waiters of one trio run on one relay thread, by tunnel id, and who
    of them reads that relay's pipe."""

    def __init__(self) -> None:
        self.waiters: dict[int, _Waiter] = {}
        self.reading = False
        self.token = trio.lowlevel.current_trio_token()
        self.read_scope: trio.CancelScope | None = None

    def deliver(self, tunnel_id: int, result: RelayResult) -> None:
        """In this run's thread: the tunnel's result to its waiter."""
        waiter = self.waiters.get(tunnel_id)
        if waiter is None:   # it gave up (cancelled, past its grace)
            return
        waiter.result = result
        waiter.wake.set()
        if self.read_scope is not None:
            # This run's reader may be that very waiter, waiting on a pipe
            # from which another run took its record.
            self.read_scope.cancel()

    def dispatch(self, records) -> None:
        for tunnel_id, a_to_b, b_to_a, error in records:
            result = RelayResult(a_to_b, b_to_a, error)
            with _owners_lock:
                owner = _owners.get(tunnel_id)
            if owner is self:
                self.deliver(tunnel_id, result)
            elif owner is not None:   # a trio run's in another thread
                try:
                    owner.token.run_sync_soon(owner.deliver, tunnel_id, result)
                except trio.RunFinishedError:
                    pass
            # else: a waiter that gave up, in this run or an ended one

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
                with trio.CancelScope() as self.read_scope:
                    await trio.lowlevel.wait_readable(relay.notify_fd)
            finally:
                self.read_scope = None
                self.reading = False
            self.dispatch(relay.read_done())
        return waiter.result


_completions: trio.lowlevel.RunVar = trio.lowlevel.RunVar("heel_relay_completions")

#: Each live tunnel's waiters, by tunnel id, whatever trio run (and thread)
#: they belong to.
_owners: dict[int, _Completions] = {}
_owners_lock = threading.Lock()


def _run_completions(slot: _Slot) -> _Completions:
    """This trio run's waiters on the given relay thread."""
    try:
        by_relay = _completions.get()
    except LookupError:
        by_relay = {}
        _completions.set(by_relay)
    completions = by_relay.get(slot.relay)
    if completions is None:
        completions = by_relay[slot.relay] = _Completions()
    return completions


def _take_fd(sock: socket.socket | trio.socket.SocketType) -> int:
    """The socket's fd, which the caller now owns; the socket object is
    left closed (fileno() == -1)."""
    trio.lowlevel.notify_closing(sock)
    return sock.detach()


@trio.lowlevel.enable_ki_protection
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

    Protected from KeyboardInterrupt (trio delivers it elsewhere), which
    could otherwise land between two steps and leak fds or a tunnel count.
    """
    tunnel_id = next(_tunnel_ids)
    slot = _take_slot()
    try:
        fd_a = _take_fd(sock_a)
        try:
            fd_b = _take_fd(sock_b)
        except BaseException:
            os.close(fd_a)
            raise
        relay_thread = slot.relay
        completions = _run_completions(slot)
        waiter = _Waiter()
        completions.waiters[tunnel_id] = waiter
        with _owners_lock:
            _owners[tunnel_id] = completions
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
            with _owners_lock:
                del _owners[tunnel_id]
            del completions.waiters[tunnel_id]
            completions.hand_over_reading()
    finally:
        _release_slot(slot)
