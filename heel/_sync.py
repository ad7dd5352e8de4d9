"""Running one sandboxed command without trio: for heel.probe() and the CLI's
``run``, which must start fast (importing trio costs more than a command)."""

from __future__ import annotations

import os
import select
import _socket
import stat
import sys
import time

TYPE_CHECKING = False  # not typing's: importing typing costs `heel run` ~7 ms
if TYPE_CHECKING:
    import signal
else:
    # The signal module's C core: the same functions and numbers, without the
    # three enums that `import signal` builds (some 1.5 ms of `heel run`).
    import _signal as signal

from . import _native
from ._spawn import MSG_SIZE, Prepared, decode_message, encode_message, host_pid, needs_relay, raise_for_error
from ._terminal import DRAIN_SECONDS, TerminalBridge


def recv_message(sock: _socket.socket, *, block: bool = True):
    """One control message, or None at EOF (or, when not blocking, if none is there)."""
    data = b""
    while len(data) < MSG_SIZE:
        try:
            chunk = sock.recv(MSG_SIZE - len(data), 0 if block else _socket.MSG_DONTWAIT)
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


def exit_status(ctl: _socket.socket, killed: bool) -> tuple[int, bool]:
    """(the command's return code, lost) once its init has exited: the
    EXITED message when the init sent one; otherwise it was killed (by heel,
    or with the whole sandbox), which reads as SIGKILL.  ``lost``: killed
    without heel's asking (``killed``), from outside (the init or the
    sandbox's pid 1 SIGKILLed on the host), so the command's own status is
    unknown."""
    status = None
    while (msg := recv_message(ctl, block=False)) is not None:
        if msg[0] == _native.MSG_EXITED:
            status = msg[1]
    if status is None:
        return -signal.SIGKILL, not killed
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status), False
    return os.WEXITSTATUS(status), False


#: The name under which a lost status (see exit_status) is reported among
#: the output errors of a run.
INIT_LOST = "init"


def kill_tree(pidfd: int, ctl: _socket.socket, grace: float = 2.0) -> None:
    """Kill the command and every process it started.

    The command's init is asked to: it kills its descendants, which it can
    find all of as their subreaper, and exits.  It gets ``grace`` seconds
    before it is SIGKILLed itself (with grace=0 the caller waits for it
    instead, and does that).  Everything left then dies with the sandbox.
    """
    try:
        ctl.send(encode_message(_native.MSG_KILL), _socket.MSG_NOSIGNAL)
        if grace == 0 or select.select([pidfd], [], [], grace)[0]:
            return
    except OSError:
        pass
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Relays:
    """Pipes in place of the host stdio fds that must not be passed as they
    are (see needs_relay), and the copying between them and the host.

    As the command would with the file itself: stdout and stderr that are
    one file (``> log 2>&1``) share one pipe, so that what the command wrote
    keeps its order; what the command did not read of a stdin file is left
    for the next reader (the offset goes back by what heel read ahead).  A
    host file that refuses output (a full disk) ends that stream's copy:
    the command gets EPIPE, and ``errors`` says what happened.  A stdin that
    cannot be read (opened for writing only: ``0>file``) is an end of file
    for the command, and in ``errors`` too."""

    CHUNK = 65536

    def __init__(self, stdio: tuple[int, int, int]) -> None:
        self.child_fds = list(stdio)
        self._child_ends: list[int] = []
        self.outputs: dict[int, int] = {}  # our read end -> host fd
        self.names: dict[int, str] = {}  # our read end -> "stdout", "stderr" or "stdout and stderr"
        self.input = -1  # host fd the sandbox reads from (with input_pipe)
        self.input_pipe = -1
        self._input_reader = -1  # a read end of our own: what is left in the pipe (FIONREAD)
        self._input_read = 0  # bytes read from the host's file: the most that can go back
        self._pending = b""
        #: (stream, OSError) for each host file that refused the command's
        #: output, and ("stdin", OSError) when the host's stdin could not be read
        self.errors: list[tuple[str, OSError | None]] = []  # None: INIT_LOST
        for index, fd in enumerate(stdio):
            if not needs_relay(fd):
                continue
            if index == 2 and self.child_fds[1] != stdio[1] and same_file(stdio[1], fd):
                # One file behind both: one pipe, in the order written.
                self.child_fds[2] = self.child_fds[1]
                for r in self.names:
                    self.names[r] = "stdout and stderr"
                continue
            r, w = os.pipe2(os.O_CLOEXEC)
            if index == 0:
                self.input, self.input_pipe = fd, w
                os.set_blocking(w, False)
                self.child_fds[0] = r
                self._child_ends.append(r)
                self._input_reader = os.dup(r)
                os.set_inheritable(self._input_reader, False)
            else:
                self.outputs[r] = fd
                self.names[r] = "stdout" if index == 1 else "stderr"
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
        if data:
            try:
                _write_all(self.outputs[r], data)
                return
            except OSError as exc:  # EFBIG, ENOSPC, EIO: the rest would be lost as well
                self.errors.append((self.names[r], exc))
        os.close(r)
        del self.outputs[r]

    def _copy_in(self) -> None:
        if not self._pending:
            try:
                self._pending = os.read(self.input, self.CHUNK)
            except BlockingIOError:  # a non-blocking description: as before, not an end
                raise
            except OSError as exc:  # EBADF (opened for writing only: `0>file`), EIO, EISDIR
                # As the end of the host's file: the command gets end of file.
                self.errors.append(("stdin", exc))
                self._close_input()
                return
            self._input_read += len(self._pending)
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
        """The command's init has ended: copy what is left, close the rest.
        Its processes ended with it, unless it was killed before it could
        end them (from outside, or at heel's grace, starved by a fork bomb):
        a pipe one of them still holds open is given up after DRAIN_SECONDS
        without output (DRAIN_SECONDS of waiting in all), and the sandbox's
        close ends the holder."""
        self.started()  # a launch that failed: heel's copies of the child's ends
        waited = 0.0
        for r in list(self.outputs):
            while r in self.outputs:
                start = time.monotonic()
                if not select.select([r], [], [], max(0.0, DRAIN_SECONDS - waited))[0]:
                    os.close(r)
                    del self.outputs[r]
                    break
                waited += time.monotonic() - start
                self._copy_out(r)
        if self.input_pipe >= 0:
            self._close_input()
        if self._input_reader >= 0:
            give_back_unread(self.input, len(self._pending) + pipe_bytes(self._input_reader), self._input_read)
            self._pending = b""
            os.close(self._input_reader)
            self._input_reader = -1
        self.started()


def same_file(a: int, b: int) -> bool:
    """Whether host fds a and b write to one file at one place (``> f 2>&1``)."""
    try:
        sa, sb = os.fstat(a), os.fstat(b)
        return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino) and os.lseek(a, 0, os.SEEK_CUR) == os.lseek(
            b, 0, os.SEEK_CUR)
    except OSError:
        return False


def pipe_bytes(fd: int) -> int:
    """How many bytes wait in the pipe that fd is an end of (FIONREAD)."""
    import fcntl
    import termios

    try:
        return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)
    except OSError:
        return 0


def give_back_unread(fd: int, unread: int, read: int) -> None:
    """Move a regular file's offset back by what heel read of it and the
    command did not: the next reader (the rest of a `while read` loop) gets
    it.  Never by more than heel ``read`` for the command: the command can
    write into its own stdin pipe (reopened through /proc/self/fd/0), and
    must not move the host's offset back before where its input began."""
    unread = min(unread, read)
    if unread <= 0:
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.lseek(fd, -unread, os.SEEK_CUR)
    except OSError:
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def run(prepared: Prepared, argv: list[str], env: dict[str, str], cwd: str,
        stdio: tuple[int, int, int], timeout: float | None = None,
        interactive: bool = False, output_errors: list | None = None) -> tuple[int, bool]:
    """Run to completion; returns (returncode, timed_out).  Raises SpawnError.

    ``stdio`` are host fds.  Terminals among them are replaced by a pty of
    heel's own (heel._terminal; ``interactive``: the host terminal goes raw
    and the pty becomes the command's controlling terminal, for the CLI);
    files reach the command through pipes (see Relays).  ``output_errors``
    receives (stream, OSError) for each host file that refused output."""
    bridge = TerminalBridge(stdio, interactive, prepared.ptmx)
    previous: dict = {}  # the signal handlers ours replaced
    relays = None
    tree = TreeStopper()
    try:
        relays = Relays((bridge.child_fds[0], bridge.child_fds[1], bridge.child_fds[2]))
        _handle_terminal_signals(bridge, previous, tree if interactive else None)
        return _run(prepared, argv, env, cwd, relays, bridge, timeout, tree)
    finally:
        if relays is not None and output_errors is not None:
            output_errors.extend(relays.errors)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        bridge.close()


#: How often a heel sent to the background looks whether it is back (and
#: may read the terminal again).
BACKGROUND_RECHECK = 0.5


def _handle_terminal_signals(bridge: TerminalBridge, previous: dict, tree: "TreeStopper | None" = None) -> None:
    """SIGWINCH: the host terminal's new size goes to the pty.  SIGTSTP (^Z
    at a terminal heel does not hold raw, a `kill -TSTP`; at one it holds
    raw ^Z itself goes to the command): with ``tree`` (the CLI), the
    command's processes are stopped first (SIGSTOP), then the terminal's
    settings go back to the shell and heel stops; when heel is continued
    (SIGCONT: `fg`, `bg`), so is the command, and the terminal is raw again
    once heel is the foreground job again.  The handlers replaced go into
    ``previous``."""
    handlers = {}
    if bridge.master >= 0:
        handlers[signal.SIGWINCH] = lambda signum, frame: bridge.resize()

    def stop(signum, frame) -> None:
        stop_with_command(tree, bridge)

    if bridge.interactive or (tree is not None and signal.getsignal(signal.SIGTSTP) != signal.SIG_IGN):
        handlers[signal.SIGTSTP] = stop
    if bridge.interactive:
        handlers[signal.SIGCONT] = lambda signum, frame: bridge.resume()  # `fg` after a stop or `bg`
    try:
        for signum, handler in handlers.items():
            previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread: the size stays what it was
        pass


def stop_with_command(tree: "TreeStopper | None", bridge: TerminalBridge) -> None:
    """SIGTSTP: stop the command's processes (``tree``), give the shell its
    terminal settings back and stop heel; once heel is continued, so is the
    command, and the terminal is raw again if heel is in the foreground."""
    stopped = tree.stop() if tree is not None else []
    try:
        bridge.suspend()
        os.kill(os.getpid(), signal.SIGSTOP)
        bridge.resume()
    finally:
        TreeStopper.resume(stopped)


class TreeStopper:
    """Stops and continues every process of a running command, for the
    CLI's SIGTSTP (heel-init forwards a signal to the command's process
    only, and SIGSTOP not at all).

    As heel-init's own freeze before a kill: top-down from the command's
    init, each process is stopped before its children are listed (so it can
    fork no more), and every signal goes through a pidfd pinned on a
    process checked to be the lister's child, so that a pid freed and taken
    by an unrelated process is never signalled.  The init itself is not
    stopped: it must still answer heel (a kill at the timeout).  A process
    that does not stop (uninterruptible sleep) is listed all the same."""

    MOST = 65536  # processes; pidfds are held while the command is stopped
    WAIT = 0.2  # seconds in all for processes to take their stop
    WALKS = 64  # walks of the tree at most, each after one that met a process not stopped yet

    def __init__(self) -> None:
        self.pidfd = -1  # the command's init, while it runs

    def stop(self) -> list[int]:
        """Stop the tree: the pidfds of the processes stopped, for resume()."""
        if self.pidfd < 0:
            return []
        init = _pinned_pid(self.pidfd)
        if init <= 0:
            return []
        stopped: list[int] = []
        seen: set[int] = set()  # pids stopped (pinned by their pidfds while held)
        waited = 0.0
        try:
            # Again from the top until a walk meets only stopped processes: a
            # process that forked and exited before it was reached left its
            # child to the init (the subreaper), after the init's children
            # were listed.
            for _ in range(self.WALKS):
                fresh = False  # a process this walk found that no walk had stopped
                level = [(pid, init) for pid in _children(init)]
                index = 0
                while index < len(level) and len(stopped) < self.MOST:
                    pid, parent = level[index]
                    index += 1
                    if pid in seen:
                        # Stopped already: it forks no more, but a child it
                        # had then may have been missed; list them again.
                        level.extend((child, pid) for child in _children(pid))
                        continue
                    fresh = True
                    pidfd = _pin_child(pid, parent)
                    if pidfd < 0:
                        continue
                    stopped.append(pidfd)
                    seen.add(pid)
                    try:
                        signal.pidfd_send_signal(pidfd, signal.SIGSTOP)
                    except OSError:
                        continue
                    while not _has_stopped(pid) and waited < self.WAIT:
                        time.sleep(0.001)
                        waited += 0.001
                    children = _children(pid)
                    if _pinned_pid(pidfd) == pid:  # the list was that process's, not a new one's
                        level.extend((child, pid) for child in children)
                if not fresh:
                    break
        except BaseException:
            self.resume(stopped)
            raise
        return stopped

    @staticmethod
    def resume(stopped: list[int]) -> None:
        """SIGCONT what stop() stopped (children first), and let the pidfds go."""
        for pidfd in reversed(stopped):
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGCONT)
            except OSError:
                pass
            os.close(pidfd)
        stopped.clear()


def _children(pid: int) -> list[int]:
    """The children of every thread of process pid, as /proc lists them."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as file:
                out.extend(int(word) for word in file.read().split())
        except (OSError, ValueError):
            pass
    return out


def _status_field(path: str, field: bytes) -> int:
    try:
        with open(path, "rb") as file:
            for line in file:
                if line.startswith(field):
                    return int(line[len(field):])
    except (OSError, ValueError):
        pass
    return -2


def _pinned_pid(pidfd: int) -> int:
    """The pid that a pidfd's process has now: -1 once it has been reaped."""
    try:
        return host_pid(pidfd)
    except (OSError, ValueError):
        return -2


def _pin_child(pid: int, parent: int) -> int:
    """A pidfd on process pid, checked to be parent's child (the pidfd is
    opened first, then the parent read, then the pidfd found still on that
    pid); -1 when it cannot be pinned."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return -1
    if _status_field(f"/proc/{pid}/status", b"PPid:") == parent and _pinned_pid(pidfd) == pid:
        return pidfd
    os.close(pidfd)
    return -1


def _has_stopped(pid: int) -> bool:
    """Whether a process has stopped (or died): its state is T, t, Z or X."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            text = file.read()
    except OSError:
        return True
    end = text.rfind(b")")
    return end < 0 or text[end + 2:end + 3] in (b"T", b"t", b"Z", b"X", b"")


def _run(prepared: Prepared, argv: list[str], env: dict[str, str], cwd: str, relays: Relays,
         bridge: TerminalBridge, timeout: float | None, tree: TreeStopper) -> tuple[int, bool]:
    try:
        stdin, stdout, stderr = relays.child_fds
        pidfd, ctl = prepared.launch(argv, env, cwd, (stdin, stdout, stderr), ctty=bridge.interactive)
    except BaseException:
        relays.finish()
        raise
    tree.pidfd = pidfd
    relays.started()
    bridge.started()
    pty_open = bridge.master >= 0
    killed = timed_out = False
    ended = False
    try:
        first = recv_message(ctl)
        if first is None:
            raise _init_vanished(argv[0])
        raise_for_error(first, argv[0], prepared.plan)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            readers, writers = relays.wanted()
            if pty_open:
                if bridge.output_waiting:
                    writers.append(bridge.out_fd)
                else:
                    readers.append(bridge.master)
            # Typed input goes on to the pty even once no fd of the command's
            # holds it (pty_open False: it closed its stdio, as a daemon
            # does): the pty is still its controlling terminal, so ^C typed
            # at the raw host terminal must reach it, and nothing typed may
            # be left in the host terminal's queue for the user's shell to
            # run once heel is gone (as trio's runner does too).
            if bridge.master >= 0:
                if bridge.input_waiting:
                    writers.append(bridge.master)
                elif bridge.may_read():
                    readers.append(bridge.host_in)
                elif bridge.host_in >= 0:  # in the background: look again in a while
                    left = BACKGROUND_RECHECK if left is None else min(left, BACKGROUND_RECHECK)
            readable, writable, _ = select.select([pidfd, *readers], writers, [], left)
            relays.pump(readable, writable)
            if pty_open:
                if bridge.out_fd in writable:
                    bridge.flush_output()
                elif bridge.master in readable:
                    pty_open = bridge.copy_output()
            if bridge.master >= 0:
                if bridge.host_in in readable or (bridge.input_waiting and bridge.master in writable):
                    bridge.copy_input()
                if bridge.host_gone and not killed:  # the user's terminal went away: so does the command
                    kill_tree(pidfd, ctl)
                    killed = True
            if pidfd in readable:
                break
            if deadline is not None and time.monotonic() >= deadline and not killed:
                kill_tree(pidfd, ctl)
                killed = timed_out = True
        ended = True
        relays.finish()
        bridge.drain()
        code, lost = exit_status(ctl, killed)
        if lost:
            relays.errors.append((INIT_LOST, None))
        return code, timed_out
    finally:
        tree.pidfd = -1
        if not ended:
            kill_tree(pidfd, ctl)
            select.select([pidfd], [], [], 5.0)
            relays.finish()
        os.close(pidfd)
        ctl.close()


def _init_vanished(program: str):
    """A command's init went away without a word: report that as a spawn error."""
    from .errors import SpawnError
    import errno

    err = SpawnError("init", errno.ECHILD, program)
    err.strerror = f"{program}: heel-init ended before starting the command"
    return err
