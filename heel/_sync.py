"""Running one sandboxed command without trio: for heel.probe() and the CLI's
``run``, which must start fast (importing trio costs more than a command)."""

from __future__ import annotations

import os
import select
import signal
import socket
import time

from . import _native
from ._spawn import MSG_SIZE, Prepared, decode_message, encode_message, launch, raise_for_error


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


def run(prepared: Prepared, argv: list[str], env: dict[str, str], cwd: str,
        stdio: tuple[int, int, int], timeout: float | None = None) -> tuple[int, bool]:
    """Run to completion; returns (returncode, timed_out).  Raises SpawnError."""
    pid, pidfd, ctl = launch(prepared, argv, env, cwd, stdio)
    killed = timed_out = False
    reaped = False
    try:
        first = recv_message(ctl)
        if first is not None:
            raise_for_error(first, argv[0])
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if select.select([pidfd], [], [], left)[0]:
                break
            if deadline is not None and time.monotonic() >= deadline:
                kill_tree(pidfd, ctl, prepared.plan.namespaces)
                killed = timed_out = True
        init_status = waitid_status(pidfd)
        reaped = True
        if first is None:
            raise _native_error(init_status, argv[0])
        return exit_status(ctl, killed, init_status), timed_out
    finally:
        if not reaped:
            kill_tree(pidfd, ctl, prepared.plan.namespaces)
            os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
        os.close(pidfd)
        ctl.close()


def _native_error(init_status: int, program: str):
    """heel-init went away without a word: report that as a spawn error."""
    from .errors import SpawnError
    import errno

    err = SpawnError("init", errno.ECHILD, program)
    err.strerror = f"{program}: heel-init exited with status {init_status} before starting the command"
    return err
