"""Running one sandboxed command without trio: for heel.probe() and the CLI's
``run``, which must start fast (importing trio costs more than a command)."""

from __future__ import annotations

import os
import select
import signal
import socket
import time

from . import _native
from ._spawn import (MSG_SIZE, Prepared, decode_message, encode_message, launch, needs_relay,
                     raise_for_error)


def recv_message(sock: socket.socket, *, block: bool = True):
    """One control message, or None at EOF (or, when not blocking, if none is there)."""
    data = b""
    while len(data) < MSG_SIZE:
        try:
            chunk = sock.recv(MSG_SIZE - len(data), 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            if not data:
                return None
            block = True  # a message is half there: the rest follows at once
            continue
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        data += chunk
    return decode_message(data)


def exit_status(ctl: socket.socket, killed: bool, init_status: int) -> int:
    """The command's return code, after heel-init has exited: the EXITED
    message when heel-init sent one, otherwise what happened to heel-init."""
    status = None
    while (msg := recv_message(ctl, block=False)) is not None:
        if msg[0] == _native.MSG_EXITED:
            status = msg[1]
    if status is not None:
        if os.WIFSIGNALED(status):
            return -os.WTERMSIG(status)
        return os.WEXITSTATUS(status)
    if killed:
        return -signal.SIGKILL
    return init_status


def kill_tree(pidfd: int, ctl: socket.socket, pid_namespace: bool, grace: float = 2.0) -> None:
    """Kill the command and every process it started.

    In a pid namespace SIGKILL to heel-init (its pid 1) makes the kernel kill
    all the rest.  Without one, heel-init must kill the tree itself: it is
    asked to, and given ``grace`` seconds before it is killed too (with
    grace=0 the caller waits for it instead).
    """
    if not pid_namespace:
        try:
            ctl.send(encode_message(_native.MSG_KILL), socket.MSG_NOSIGNAL)
            if grace == 0 or select.select([pidfd], [], [], grace)[0]:
                return
        except OSError:
            pass
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass


def waitid_status(pidfd: int) -> int:
    info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
    if info.si_code == os.CLD_EXITED:
        return info.si_status
    return -info.si_status


class Relays:
    """Pipes in place of the host stdio fds that must not be passed as they
    are (see needs_relay), and the copying between them and the host."""

    CHUNK = 65536

    def __init__(self, stdio: tuple[int, int, int]) -> None:
        self.child_fds = list(stdio)
        self._child_ends: list[int] = []
        self.outputs: dict[int, int] = {}  # our read end -> host fd
        self.input: int | None = None  # host fd the sandbox reads from
        self.input_pipe = -1
        self._pending = b""
        for index, fd in enumerate(stdio):
            if not needs_relay(fd):
                continue
            r, w = os.pipe2(os.O_CLOEXEC)
            if index == 0:
                self.input, self.input_pipe = fd, w
                os.set_blocking(w, False)
                self.child_fds[0] = r
                self._child_ends.append(r)
            else:
                self.outputs[r] = fd
                self.child_fds[index] = w
                self._child_ends.append(w)

    def started(self) -> None:
        """The child holds its ends now: close ours."""
        for fd in self._child_ends:
            os.close(fd)
        self._child_ends = []

    def wanted(self) -> tuple[list[int], list[int]]:
        return list(self.outputs), ([self.input_pipe] if self.input_pipe >= 0 else [])

    def pump(self, readable, writable) -> None:
        for r in readable:
            if r in self.outputs:
                self._copy_out(r)
        if self.input_pipe in writable:
            self._copy_in()

    def _copy_out(self, r: int) -> None:
        data = os.read(r, self.CHUNK)
        if not data:
            os.close(r)
            del self.outputs[r]
            return
        _write_all(self.outputs[r], data)

    def _copy_in(self) -> None:
        if not self._pending:
            self._pending = os.read(self.input, self.CHUNK)
            if not self._pending:  # end of the host's file: end of the sandbox's stdin
                self._close_input()
                return
        try:
            self._pending = self._pending[os.write(self.input_pipe, self._pending):]
        except BlockingIOError:
            pass
        except BrokenPipeError:  # the command stopped reading
            self._close_input()

    def _close_input(self) -> None:
        os.close(self.input_pipe)
        self.input_pipe = -1

    def finish(self) -> None:
        """Every sandboxed process is gone: copy what is left, close the rest."""
        for r in list(self.outputs):
            while r in self.outputs:
                self._copy_out(r)
        if self.input_pipe >= 0:
            self._close_input()
        self.started()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def run(prepared: Prepared, argv: list[str], env: dict[str, str], cwd: str,
        stdio: tuple[int, int, int], timeout: float | None = None) -> tuple[int, bool]:
    """Run to completion; returns (returncode, timed_out).  Raises SpawnError.

    ``stdio`` are host fds; those that are files reach the command through
    pipes (see Relays)."""
    relays = Relays(stdio)
    try:
        pid, pidfd, ctl = launch(prepared, argv, env, cwd, tuple(relays.child_fds))
    except BaseException:
        relays.finish()
        raise
    relays.started()
    killed = timed_out = False
    reaped = False
    try:
        first = recv_message(ctl)
        if first is not None:
            raise_for_error(first, argv[0])
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            readers, writers = relays.wanted()
            readable, writable, _ = select.select([pidfd, *readers], writers, [], left)
            relays.pump(readable, writable)
            if pidfd in readable:
                break
            if deadline is not None and time.monotonic() >= deadline and not killed:
                kill_tree(pidfd, ctl, prepared.plan.namespaces)
                killed = timed_out = True
        init_status = waitid_status(pidfd)
        reaped = True
        relays.finish()
        if first is None:
            raise _native_error(init_status, argv[0])
        return exit_status(ctl, killed, init_status), timed_out
    finally:
        if not reaped:
            kill_tree(pidfd, ctl, prepared.plan.namespaces)
            os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
            relays.finish()
        os.close(pidfd)
        ctl.close()


def _native_error(init_status: int, program: str):
    """heel-init went away without a word: report that as a spawn error."""
    from .errors import SpawnError
    import errno

    err = SpawnError("init", errno.ECHILD, program)
    err.strerror = f"{program}: heel-init exited with status {init_status} before starting the command"
    return err
