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
the command does to its pty ends with the command.  With namespaces the pty
comes from the sandbox's own devpts (heel._spawn.Prepared.ptmx), so that
``tty`` and ttyname(3) inside name it; without, from the host's.

Two modes:

- interactive (``heel run`` and ``heel shell``, when stdin and stdout are
  the terminal, heel is its foreground job and nobody else holds it raw):
  the host terminal is raw while the command runs and the pty, a copy of
  the terminal's settings, is the command's controlling terminal, so ^C,
  ^Z, line editing and full-screen programs work inside as outside.  The
  settings are restored afterwards.
- plain (the library's Stdio.INHERIT, and the CLI otherwise): the host
  terminal keeps its settings and heel keeps its ^C; the pty echoes
  nothing (the host terminal did), and a ^D typed there reaches the
  command as its pty's end-of-file character.

A background job (heel not in the terminal's foreground process group)
never reads the terminal, which would stop it (SIGTTIN): its command's stdin
is /dev/null, as with ``nohup``.  Output goes to the host terminal through a
non-blocking file description of heel's own, so a terminal that stops
reading (^S, a stalled link) stalls the command, never heel's timeouts or
event loop.  When the host terminal hangs up, the runners end the command.

The runners (heel._sync for the CLI's plain runner, heel.sandbox under trio)
wait on the fds named here and call the copy methods; this module only moves
bytes between fds that are ready.
"""

from __future__ import annotations

import os
import stat
import time

__all__ = ["TerminalBridge", "is_terminal", "line_end"]

CHUNK = 65536
#: How long the end of a command may take to reach a host terminal that
#: does not read.
DRAIN_SECONDS = 2.0

_raw_terminals = 0  # bridges holding a host terminal raw, process-wide


def is_terminal(fd: int) -> bool:
    try:
        return fd >= 0 and stat.S_ISCHR(os.fstat(fd).st_mode) and os.isatty(fd)
    except OSError:
        return False


def line_end() -> str:
    """What ends a line heel itself writes to stderr: "\\r\\n" while a host
    terminal is raw (no output processing turns "\\n" into both)."""
    return "\r\n" if _raw_terminals else "\n"


def _char(value) -> bytes:
    """A control character from tcgetattr's cc list (bytes, or an int)."""
    return value if isinstance(value, bytes) else bytes([value])


def _reopen(fd: int, mode: int, shared: list[int]) -> int:
    """A non-blocking file description of heel's own for the terminal on
    ``fd``: O_NONBLOCK there leaves the user's shell's description alone.
    Through /proc/self/fd; else, for a terminal heel's uid does not own (su,
    sudo -u), through /dev/tty when that is the same terminal; else a dup of
    the shared description, made non-blocking for the run (its fd goes into
    ``shared``, so that close() makes it blocking again, as ssh does)."""
    flags = mode | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        return os.open(f"/proc/self/fd/{fd}", flags)
    except OSError:
        pass
    try:
        tty = os.open("/dev/tty", flags)
        if os.fstat(tty).st_rdev == os.fstat(fd).st_rdev:
            return tty
        os.close(tty)
    except OSError:
        pass
    copy = os.dup(fd)
    if os.get_blocking(copy):
        os.set_blocking(copy, False)
        shared.append(copy)
    return copy


def _in_foreground(fd: int) -> bool:
    """Whether heel may read and set the terminal without being stopped
    (SIGTTIN, SIGTTOU): it is the foreground job of its controlling
    terminal, or the terminal is not its controlling terminal at all."""
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:  # not our controlling terminal: no job control applies
        return True


def _raw_settings(termios, settings: list) -> list:
    """cfmakeraw: bytes as typed, nothing echoed, processed or turned into
    signals by the host terminal (the command's pty does all that)."""
    raw = [*settings[:6], list(settings[6])]
    raw[0] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
                | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    raw[1] &= ~termios.OPOST
    raw[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    raw[2] &= ~(termios.CSIZE | termios.PARENB)
    raw[2] |= termios.CS8
    raw[6][termios.VMIN], raw[6][termios.VTIME] = 1, 0
    return raw


# From <asm-generic/ioctls.h>, which Python's termios module does not carry.
_TIOCSPTLCK = 0x40045431  # _IOW('T', 0x31, int): lock or unlock the pty's end
_TIOCGPTPEER = 0x5441  # _IO('T', 0x41): open the pty's end from the master (Linux 4.13)


def open_pty(ptmx: int = -1) -> tuple[int, int]:
    """A new pty, (master, end), both close-on-exec.  ``ptmx``: an O_PATH
    fd of the ptmx of the devpts to make it in (-1: the host's, os.openpty).
    The end is opened through the master (TIOCGPTPEER), never by its name,
    so nothing in that devpts can stand in for it."""
    if ptmx < 0:
        return os.openpty()  # both close-on-exec (PEP 446)
    import fcntl

    try:
        master = os.open(f"/proc/self/fd/{ptmx}", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        # The sandbox's devpts is full (its commands hold every pty it may
        # have): a pty of the host's, which only `tty` inside can tell.
        return os.openpty()
    try:
        fcntl.ioctl(master, _TIOCSPTLCK, bytes(4))  # unlockpt(3)
        end = fcntl.ioctl(master, _TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except BaseException:
        os.close(master)
        raise
    return master, end


class TerminalBridge:
    """A pty in place of the host terminals among a command's stdio fds.

    ``child_fds``: what the command gets (the pty's end for each terminal;
    /dev/null for a background job's stdin).  ``host_in``: the host fd to
    read typed input from (-1: none, or no more).  ``out_fd``: heel's own
    non-blocking description of the host terminal that output goes to.
    ``master``: heel's end of the pty (-1 when no fd was a terminal).
    ``host_gone``: the host terminal hung up; the runner ends the command.
    """

    def __init__(self, stdio: tuple[int, int, int], interactive: bool = False, ptmx: int = -1) -> None:
        """``ptmx``: an O_PATH fd of the devpts ptmx to make the pty with
        (-1: the host's /dev/ptmx)."""
        self.child_fds = list(stdio)
        self.master = self.host_in = self.out_fd = -1
        self.interactive = False
        self.host_gone = False
        self._slave = self._null = -1
        self._saved: list | None = None  # the host terminal's settings, while it is raw
        self._raw_fd = -1  # ...and the fd they go back on
        self._pending_in = b""  # typed, not yet taken by the pty
        self._pending_out = b""  # written by the command, not yet taken by the host terminal
        self._eof = b"\x04"
        self._line_ends: tuple[bytes, ...] = ()  # plain mode: what ends a line the host's read returns
        self._shared: list[int] = []  # dups of the user's descriptions made non-blocking for the run
        #: when output last moved (the end of a command is drained while it does)
        self.progress_at = 0.0
        terminals = [index for index, fd in enumerate(stdio) if is_terminal(fd)]
        if not terminals:
            return
        import termios

        try:
            self.master, self._slave = open_pty(ptmx)
            for index in terminals:
                self.child_fds[index] = self._slave
            host = stdio[terminals[0]]
            foreground = _in_foreground(host)
            if 0 in terminals:
                if foreground:
                    # A description of heel's own, non-blocking: a read never
                    # blocks heel, and each bridge waits on an fd of its own.
                    self.host_in = _reopen(stdio[0], os.O_RDONLY, self._shared)
                else:
                    self._null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                    self.child_fds[0] = self._null
            self.out_fd = _reopen(next(stdio[i] for i in (1, 2, 0) if i in terminals), os.O_WRONLY,
                                  self._shared)
            settings = termios.tcgetattr(host)
            self._eof = _char(settings[6][termios.VEOF])
            self.interactive = bool(interactive and foreground and 0 in terminals and 1 in terminals
                                    and settings[3] & termios.ICANON)  # not raw already: nobody else's
            if not self.interactive:
                # The host terminal echoes, edits lines and processes output already.
                if settings[3] & termios.ICANON:
                    self._line_ends = tuple({b"\n", _char(settings[6][termios.VEOL]),
                                             _char(settings[6][termios.VEOL2])} - {b"\0"})
                settings[3] &= ~(termios.ECHO | termios.ECHONL)
                settings[1] &= ~termios.OPOST
            termios.tcsetattr(self._slave, termios.TCSANOW, settings)
            self.resize()
            os.set_blocking(self.master, False)
            if self.interactive:
                self._go_raw(termios)
        except termios.error as exc:  # not an OSError: made one, for the callers' handlers
            self.close()
            raise OSError(*exc.args) from None
        except BaseException:
            self.close()
            raise

    def _go_raw(self, termios) -> None:
        global _raw_terminals
        saved = termios.tcgetattr(self.host_in)
        raw = _raw_settings(termios, saved)
        # Saved first: whatever interrupts from here on, close() restores.
        self._saved, self._raw_fd = saved, self.host_in
        _raw_terminals += 1
        termios.tcsetattr(self.host_in, termios.TCSAFLUSH, raw)

    def suspend(self) -> None:
        """heel is about to stop (SIGTSTP): give the user's shell its
        terminal settings back."""
        if self._saved is not None:
            import termios

            try:
                termios.tcsetattr(self._raw_fd, termios.TCSANOW, self._saved)
            except (OSError, termios.error):
                pass

    def resume(self) -> None:
        """heel continues (SIGCONT, `fg`): raw again if it is in the
        foreground and the shell has put its settings back (they are saved
        anew); nothing in the background (`bg`), or while already raw."""
        if self._saved is None or not _in_foreground(self._raw_fd):
            return
        import termios

        try:
            settings = termios.tcgetattr(self._raw_fd)
            if not settings[3] & termios.ICANON:  # raw already: ours
                return
            self._saved = settings
            termios.tcsetattr(self._raw_fd, termios.TCSAFLUSH, _raw_settings(termios, settings))
        except (OSError, termios.error):
            pass

    def resize(self) -> None:
        """Give the pty the host terminal's window size (at the start, and
        on SIGWINCH)."""
        if self.master < 0:
            return
        import fcntl
        import termios

        try:
            size = fcntl.ioctl(self.out_fd, termios.TIOCGWINSZ, bytes(8))
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)
        except OSError:
            pass

    def started(self) -> None:
        """The command holds the pty's end now: close heel's copy, so that
        the end of the command's last holder reads as the end here."""
        for name in ("_slave", "_null"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    # ---- moving bytes ------------------------------------------------------

    @property
    def input_waiting(self) -> bool:
        """Typed input waits for room in the pty: wait for master writable."""
        return bool(self._pending_in)

    @property
    def output_waiting(self) -> bool:
        """Output waits for the host terminal: wait for out_fd writable, and
        read no more from the pty meanwhile (the command then blocks)."""
        return bool(self._pending_out)

    def may_read(self) -> bool:
        """Whether heel may read typed input now: only as the terminal's
        foreground job (a read in the background would stop heel, SIGTTIN).
        A job sent to the background later waits until it is brought back."""
        return self.host_in >= 0 and _in_foreground(self.host_in)

    def copy_input(self) -> bool:
        """host_in is readable, or the pty has room again: pass typed input
        on.  False once there is no more (the host terminal hung up)."""
        if not self._pending_in:
            if not _in_foreground(self.host_in):  # sent to the background since the runner looked
                return True
            try:
                data = os.read(self.host_in, CHUNK)
            except BlockingIOError:  # another reader was first
                return True
            except OSError:
                if not self._gone(self.host_in):  # EIO for a background read (SIGTTIN ignored)
                    return True
                return self._hang_up()
            if not data:
                if self._gone(self.host_in):
                    return self._hang_up()
                data = self._eof  # ^D in the host's line discipline: the same for the pty's
            elif self._line_ends and not data.endswith(self._line_ends):
                data += self._eof  # ^D after part of a line pushed it out: push it on as well
            self._pending_in = data
        try:
            self._pending_in = self._pending_in[os.write(self.master, self._pending_in):]
        except BlockingIOError:
            pass
        except OSError:  # nobody holds the pty any more: the input has nowhere to go
            self._pending_in = b""
        return True

    def copy_output(self) -> bool:
        """The pty is readable: take what the command wrote and pass it on.
        False once every holder of the pty's end has closed it."""
        try:
            data = os.read(self.master, CHUNK)
        except BlockingIOError:
            return True
        except OSError:  # EIO: no process holds the pty's end
            return False
        if not data:
            return False
        self._pending_out = data
        self.flush_output()
        return True

    def flush_output(self) -> None:
        """out_fd is writable: write what waits."""
        try:
            self._pending_out = self._pending_out[os.write(self.out_fd, self._pending_out):]
            self.progress_at = time.monotonic()
        except BlockingIOError:
            pass
        except OSError:  # EIO: the host terminal hung up
            self._pending_out = b""
            self._hang_up()

    def _hang_up(self) -> bool:
        global _raw_terminals
        if self._saved is not None:  # no terminal left to restore
            self._saved = None
            _raw_terminals -= 1
        if self.host_in >= 0:
            if self.host_in in self._shared:  # the shell's description: blocking again
                self._shared.remove(self.host_in)
                try:
                    os.set_blocking(self.host_in, True)
                except OSError:
                    pass
            os.close(self.host_in)  # heel's own description (or dup)
            self.host_in = -1
        self.host_gone = True
        return False

    @staticmethod
    def _gone(fd: int) -> bool:
        """An empty read: ^D typed, or a terminal that hung up (whose
        settings can no longer be read)?"""
        import termios

        try:
            termios.tcgetattr(fd)
            return False
        except (OSError, termios.error):
            return True

    def drain(self) -> None:
        """The command has ended: pass on what it left in the pty, for as
        long as the host terminal takes it; given up after DRAIN_SECONDS in
        which it took nothing (held with ^S, or gone)."""
        import select

        if self.master < 0 or self.host_gone:
            return
        self.progress_at = time.monotonic()
        while True:
            left = self.progress_at + DRAIN_SECONDS - time.monotonic()
            if left <= 0:
                return
            if self._pending_out:
                if select.select([], [self.out_fd], [], left)[1]:
                    self.flush_output()
            elif not select.select([self.master], [], [], 0)[0] or not self.copy_output():
                return

    def close(self) -> None:
        """Restore the host terminal and close the pty."""
        global _raw_terminals
        try:
            if self._saved is not None:
                import termios

                saved, self._saved = self._saved, None
                _raw_terminals -= 1
                # In the background the shell has the terminal, with its own
                # settings (and setting it would stop heel: SIGTTOU).
                if _in_foreground(self._raw_fd):
                    try:
                        termios.tcsetattr(self._raw_fd, termios.TCSANOW, saved)
                        # What was typed while the command ran is the
                        # command's: what it left unread (a full pty's
                        # input that it never read, its terminal's replies
                        # to the queries it wrote) must not wait in the
                        # terminal for the user's shell to run as a command
                        # line.  (Not TCSAFLUSH: that waits for output to
                        # drain, for ever on a terminal stopped with ^S.)
                        termios.tcflush(self._raw_fd, termios.TCIFLUSH)
                    except (OSError, termios.error):
                        pass
            for fd in self._shared:
                try:
                    os.set_blocking(fd, True)
                except OSError:
                    pass
            self._shared = []
        finally:
            for name in ("master", "out_fd", "host_in", "_slave", "_null"):
                fd = getattr(self, name)
                if fd >= 0:
                    setattr(self, name, -1)
                    os.close(fd)
