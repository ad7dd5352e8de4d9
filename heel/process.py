"""A running sandboxed command, under trio.

trio cannot wrap a pid it did not start, so heel has its own Process, shaped
like trio's: ``wait()``, ``poll()``, ``send_signal()``, ``terminate()``,
``kill()``, ``pid``, ``returncode`` and trio streams for stdin/stdout/stderr.
It waits on a pidfd, so there is no SIGCHLD handler and no race with pid reuse.

``pid`` is the host's pid of the command's init (heel-init's code, pid 1 of
the command's pid namespace); the command runs as its child.  Signals sent to the Process are forwarded by
heel-init to the command; ``kill()`` kills the command and every process it
started.
"""

from __future__ import annotations

import os
import select
import signal
import _socket
from typing import Callable

import trio

from . import _native, _sync
from ._plan import SandboxPlan
from ._spawn import MSG_SIZE, decode_message, encode_message, host_pid, raise_for_error
from .errors import PolicyError

__all__ = ["Process"]


class Process:
    """A command running in a sandbox.  Create it with ``Command.spawn()``."""

    def __init__(self, *, pidfd: int, ctl: _socket.socket, args: list[str],
                 stdin: trio.lowlevel.FdStream | None,
                 stdout: trio.lowlevel.FdStream | None, stderr: trio.lowlevel.FdStream | None,
                 on_reaped: Callable[["Process"], None] | None = None, plan: SandboxPlan | None = None) -> None:
        self._pid: int | None = None
        self._plan = plan  # the sandbox's (for what a SpawnError may say)
        self.args = args
        self.stdin: trio.abc.SendStream | None = stdin
        self.stdout: trio.abc.ReceiveStream | None = stdout
        self.stderr: trio.abc.ReceiveStream | None = stderr
        self.returncode: int | None = None
        self._pidfd = pidfd
        self._ctl = ctl
        ctl.setblocking(False)
        self._killed = False
        self._lost = False  # its init was killed from outside heel: its own status is unknown
        self._on_reaped = on_reaped
        self._relays: list[trio.Event] = []  # copies of inherited host files still running
        self._exited = trio.Event()  # set once reaped
        self._waiter: trio.Event | None = None  # set when the task waiting on the pidfd is done

    @property
    def pid(self) -> int:
        """The host's pid of the command's init (the command is its child).
        Read from the pidfd on first use; -1 once the process is gone."""
        if self._pid is None:
            self._pid = host_pid(self._pidfd) if self._pidfd >= 0 else -1
        return self._pid

    def __repr__(self) -> str:
        state = "running" if self.returncode is None else f"returncode={self.returncode}"
        return f"<heel.Process pid={self.pid} {self.args!r} {state}>"

    async def _started(self) -> None:
        """Wait for heel-init's first message: started, or why not."""
        data = b""
        while len(data) < MSG_SIZE:
            await trio.lowlevel.wait_readable(self._ctl)
            try:
                chunk = self._ctl.recv(MSG_SIZE - len(data))
            except (BlockingIOError, InterruptedError):
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                # The command's init ended before a word: say so.
                await self.wait()
                raise _sync._init_vanished(self.args[0])
            data += chunk
        raise_for_error(decode_message(data), self.args[0], self._plan)

    async def wait(self) -> int:
        """Wait for the command to exit; returns its code (or -signal)."""
        while self.returncode is None:
            if self._waiter is not None:
                # trio lets one task at a time wait on an fd: the others wait
                # for it to reap, or to be cancelled (as trio.Process allows).
                await self._waiter.wait()
                continue
            self._waiter = waiter = trio.Event()
            try:
                await trio.lowlevel.wait_readable(self._pidfd)
                if self.returncode is None:
                    self._reap()
            except trio.ClosedResourceError:
                if self.returncode is None:  # poll() reaps, and closes the pidfd: else not ours
                    raise
            finally:
                self._waiter = None
                waiter.set()
        assert self.returncode is not None
        return self.returncode

    def poll(self) -> int | None:
        """The return code if the command has exited, else None."""
        if self.returncode is None and select.select([self._pidfd], [], [], 0)[0]:
            self._reap()
        return self.returncode

    def _reap(self) -> None:
        # The command's init is the sandbox zygote's child, not ours: the
        # zygote reaps it, and the status comes in the init's last message.
        self.returncode, self._lost = _sync.exit_status(self._ctl, self._killed)
        self._exited.set()
        self._close_fds()
        if self._on_reaped is not None:
            self._on_reaped(self)

    def _close_fds(self) -> None:
        if self._pidfd >= 0:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if self._ctl.fileno() >= 0:
            trio.lowlevel.notify_closing(self._ctl)
            self._ctl.close()

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the command (heel-init forwards it).  SIGKILL kills
        the whole tree, like kill().  A number that is no signal is a
        PolicyError (heel-init would drop it without a word)."""
        if isinstance(sig, bool) or not isinstance(sig, int) or not 0 < sig < signal.NSIG:
            raise PolicyError(f"send_signal takes a signal number (1 to {signal.NSIG - 1}), got {sig!r}")
        if sig == signal.SIGKILL:
            self.kill()
        elif self.returncode is None:
            # As a message the init passes on, not a signal to the init:
            # SIGSTOP would stop the init itself (it cannot be caught), and
            # one path for all keeps their order (SIGSTOP, then SIGCONT).
            try:
                self._ctl.send(encode_message(_native.MSG_SIGNAL, sig), _socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                # The init is not reading its socket (a flood of signals): the
                # signal then goes to it directly, to be forwarded.
                if sig != signal.SIGSTOP:
                    try:
                        signal.pidfd_send_signal(self._pidfd, sig)
                    except ProcessLookupError:
                        pass
            except OSError:
                pass  # the init is gone: so is the command

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Kill the command and every process it started."""
        if self.returncode is None and not self._killed:
            self._killed = True
            _sync.kill_tree(self._pidfd, self._ctl, grace=0)

    @trio.lowlevel.enable_ki_protection
    async def aclose(self) -> None:
        """Close the streams, kill what is left, and reap."""
        interrupted: list[KeyboardInterrupt] = []
        with trio.CancelScope(shield=True):
            for stream in (self.stdin, self.stdout, self.stderr):
                if stream is not None:
                    await finish_despite_ctrl_c(stream.aclose, interrupted)
            if self.returncode is None:
                self.kill()
                with trio.move_on_after(5):
                    await finish_despite_ctrl_c(self.wait, interrupted)
                if self.returncode is None:  # heel-init did not answer the kill message
                    try:
                        signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                    except ProcessLookupError:
                        pass  # the init has just ended, and been reaped: its end is on the way
                    await finish_despite_ctrl_c(self.wait, interrupted)
        if interrupted:
            raise interrupted[0]

    async def __aenter__(self) -> "Process":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


async def finish_despite_ctrl_c(wait, interrupted: list[KeyboardInterrupt]) -> None:
    """``await wait()`` to its end, a Ctrl-C or not: each KeyboardInterrupt
    is kept in ``interrupted`` (for the caller to raise once done) and the
    wait goes on.  A Ctrl-C reaches trio's main task even in a shielded wait
    of a KI-protected function; closing must still finish (each wait it
    makes is bounded), or the sandbox's heel-init, temporary directory and
    proxy would stay for as long as the host lives."""
    while True:
        try:
            await wait()
            return
        except KeyboardInterrupt as exc:
            interrupted.append(exc)
