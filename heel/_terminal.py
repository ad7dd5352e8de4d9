"""Terminals as a command's standard streams: a pty of heel's own, never the
host's terminal itself.

A host terminal handed to the sandbox as it is could be changed for good
from inside.  Through ``/proc/self/fd/0`` the command reaches the terminal's
inode, which its uid owns when a non-root user runs heel, and neither
Landlock nor seccomp sees an ``fchmod`` or a ``tcsetattr`` on an inherited
fd: it could make the user's terminal world-readable (another local user
would then read what is typed into it long after heel exited) or leave it
without echo.  So each command that would get a terminal gets a fresh pty
instead, and heel copies bytes between the two, as ``ssh -t`` does.  What
the command does to its pty ends with the command.

Two modes:

- interactive (the CLI, when stdin and stdout are the terminal): the host
  terminal is put in raw mode for the run and the pty, a copy of the
  terminal's settings, becomes the command's controlling terminal, so ^C,
  ^Z, line editing and full-screen programs work inside as outside.  The
  host terminal's settings are restored afterwards.
- plain (the library, Stdio.INHERIT): the host terminal stays as it is
  (heel's process keeps its ^C), and the pty only echoes nothing back.

This module is sans-I/O apart from the pty itself: the runners (heel._sync
for the CLI, heel.sandbox under trio) move the bytes.
"""

from __future__ import annotations

import os
import stat

__all__ = ["TerminalBridge", "is_terminal"]

CHUNK = 65536


def is_terminal(fd: int) -> bool:
    try:
        return stat.S_ISCHR(os.fstat(fd).st_mode) and os.isatty(fd)
    except OSError:
        return False


class TerminalBridge:
    """A pty in place of the host terminals among a command's stdio fds.

    ``child_fds``: what the command gets (the pty's end for each terminal).
    ``host_in``: the host fd to read the user's input from (-1: none);
    ``host_out``: the host terminal to write the command's output to.
    ``master``: heel's end of the pty (-1 when no fd was a terminal).
    """

    def __init__(self, stdio: tuple[int, int, int], interactive: bool = False) -> None:
        self.child_fds = list(stdio)
        self.master = self.host_in = self.host_out = -1
        self.interactive = False
        self._slave = -1
        self._saved: list | None = None  # the host terminal's settings, while raw
        self._raw_fd = -1  # ...and the fd they are restored on
        self._pending = b""  # input read from the host, not yet taken by the pty
        terminals = [index for index, fd in enumerate(stdio) if is_terminal(fd)]
        if not terminals:
            return
        import termios

        self.master, self._slave = os.openpty()  # both close-on-exec (PEP 446)
        host = stdio[terminals[0]]
        for index in terminals:
            self.child_fds[index] = self._slave
        self.host_in = stdio[0] if 0 in terminals else -1
        self.host_out = next(stdio[i] for i in (1, 2, 0) if i in terminals)
        try:
            settings = termios.tcgetattr(host)
            self.interactive = interactive and 0 in terminals and 1 in terminals
            if not self.interactive:
                # The host terminal echoes what is typed already.
                settings[3] &= ~(termios.ECHO | termios.ECHONL)
            termios.tcsetattr(self._slave, termios.TCSANOW, settings)
            self.resize()
            os.set_blocking(self.master, False)
            if self.interactive:
                saved = termios.tcgetattr(self.host_in)
                raw = termios.tcgetattr(self.host_in)
                # cfmakeraw: bytes as typed, nothing echoed or turned into signals here.
                raw[0] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
                            | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
                raw[1] &= ~termios.OPOST
                raw[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
                raw[2] &= ~(termios.CSIZE | termios.PARENB)
                raw[2] |= termios.CS8
                raw[6][termios.VMIN], raw[6][termios.VTIME] = 1, 0
                termios.tcsetattr(self.host_in, termios.TCSAFLUSH, raw)
                self._saved, self._raw_fd = saved, self.host_in
        except termios.error as exc:  # not an OSError: made one, for the callers' handlers
            self.close()
            raise OSError(*exc.args) from None
        except BaseException:
            self.close()
            raise

    def resize(self) -> None:
        """Give the pty the host terminal's window size (at the start, and
        on SIGWINCH)."""
        if self.master < 0:
            return
        import fcntl
        import termios

        try:
            size = fcntl.ioctl(self.host_out, termios.TIOCGWINSZ, bytes(8))
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)
        except OSError:
            pass

    def started(self) -> None:
        """The command holds the pty's end now: close heel's copy, so that
        the end of the command's last holder reads as the end here."""
        if self._slave >= 0:
            os.close(self._slave)
            self._slave = -1

    # ---- moving bytes: each returns False once its side has ended ----------

    def copy_input(self) -> bool:
        """The host's input is readable (or the pty has room again): pass
        what there is to the pty."""
        if not self._pending:
            try:
                self._pending = os.read(self.host_in, CHUNK)
            except OSError:
                self._pending = b""
            if not self._pending:  # the terminal hung up
                self.host_in = -1
                return False
        try:
            self._pending = self._pending[os.write(self.master, self._pending):]
        except BlockingIOError:
            pass
        except OSError:  # the pty is gone
            self._pending = b""
            self.host_in = -1
            return False
        return True

    @property
    def input_waiting(self) -> bool:
        """Input is held back until the pty has room: wait for it writable."""
        return bool(self._pending)

    def copy_output(self) -> bool:
        """The pty is readable: write what the command wrote to the host
        terminal.  False once every holder of the pty's end has closed it."""
        try:
            data = os.read(self.master, CHUNK)
        except BlockingIOError:
            return True
        except OSError:  # EIO: no process holds the pty's end any more
            return False
        if not data:
            return False
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.host_out, view):]
            except BlockingIOError:
                import select

                select.select([], [self.host_out], [], 1.0)
            except OSError:  # the host terminal went away: the output goes nowhere
                return True
        return True

    def drain(self) -> None:
        """The command has ended: pass on what it left in the pty."""
        while self.master >= 0 and self.copy_output():
            try:
                import select

                if not select.select([self.master], [], [], 0)[0]:
                    break
            except OSError:
                break

    def close(self) -> None:
        """Restore the host terminal and close the pty."""
        if self._saved is not None:
            import termios

            try:
                termios.tcsetattr(self._raw_fd, termios.TCSADRAIN, self._saved)
            except (OSError, termios.error):
                pass
            self._saved = None
            self._raw_fd = -1
        for name in ("master", "_slave"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
