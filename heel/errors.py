"""heel's exceptions.

Every exception heel raises on purpose derives from :class:`HeelError`::

    HeelError
    ├── PolicyError (ValueError)         a configuration that cannot be right;
    │                                    raised when the config is built
    ├── SandboxUnavailable               this machine cannot enforce what was asked
    │                                    (no Landlock, no seccomp, no user namespaces);
    │                                    says which protection and what to do
    ├── SandboxClosed (RuntimeError)     the sandbox was used after it was closed
    ├── SpawnError (OSError)             the command could not be started; carries
    │   │                                the setup ``stage`` and ``errno``
    │   └── CommandNotFound (FileNotFoundError)
    ├── CommandFailed                    ``run(check=True)``: non-zero exit status
    │   (subprocess.CalledProcessError)
    ├── CommandTimeout (TimeoutError)    ``run(check=True)``: the timeout killed it
    └── VenvError                        a Python environment cannot be used or built
        ├── InterpreterNotFound          the Python asked for does not exist
        │   (FileNotFoundError)
        ├── BrokenVenv                   the directory is not a usable environment
        │                                (no interpreter, another Python, not a venv)
        └── InstallError                 the installer failed; carries its own message

Errors that mean a bad argument also derive from ``ValueError``, OS-level ones
from ``OSError``, so code that does not know heel still catches them sensibly.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "HeelError",
    "PolicyError",
    "SandboxUnavailable",
    "SandboxClosed",
    "SpawnError",
    "CommandNotFound",
    "CommandFailed",
    "CommandTimeout",
    "VenvError",
    "InterpreterNotFound",
    "BrokenVenv",
    "InstallError",
]


class HeelError(Exception):
    """The root of heel's exceptions."""


class PolicyError(HeelError, ValueError):
    """A sandbox configuration or policy is invalid."""


class SandboxUnavailable(HeelError):
    """The kernel cannot enforce a protection that the configuration requires."""

    def __init__(self, protection: str, reason: str, hint: str = "") -> None:
        self.protection = protection
        self.reason = reason
        self.hint = hint
        message = f"{protection} cannot be enforced: {reason}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class SandboxClosed(HeelError, RuntimeError):
    """The sandbox has been closed."""


class SpawnError(HeelError, OSError):
    """A sandboxed command failed to start.

    ``stage`` names the setup step that failed (``"exec"``, ``"landlock"``,
    ``"mount"``, ...); ``errno`` and ``strerror`` are those of the failed call.
    """

    def __init__(self, stage: str, err: int, program: str = "") -> None:
        self.stage = stage
        self.program = program
        detail = f"{program}: " if program else ""
        # exec is the command's own step: the sandbox was set up by then.
        what = "cannot execute" if stage == "exec" else f"sandbox setup failed at {stage}"
        OSError.__init__(self, err, f"{detail}{what}: {os.strerror(err)}")

    def __str__(self) -> str:
        return self.strerror or super().__str__()

    def __reduce__(self):
        return (type(self), (self.stage, self.errno, self.program))


class CommandNotFound(SpawnError, FileNotFoundError):
    """The program to run does not exist (inside the sandbox's view)."""


def spawn_error(stage: str, err: int, program: str = "", readable=None) -> SpawnError:
    """The right SpawnError subclass for a (stage, errno) pair.  ``readable``:
    whether the sandbox may read a host path (None: nothing is looked at)."""
    if stage == "exec" and err == _errno.ENOENT:
        missing = _missing_loader(program, readable) if readable is not None else ""
        if missing:
            # The program is there; what execve() could not find is what it
            # names to run it (bash's "bad interpreter").
            error = SpawnError(stage, err, program)
            error.strerror = f"{program}: cannot execute: {missing}"
            return error
        return CommandNotFound(stage, err, program)
    return SpawnError(stage, err, program)


def _missing_loader(program: str, readable) -> str:
    """For an absolute ``program``: its #! interpreter, described, when
    that does not exist even on the host (so it is not just hidden by the
    sandbox, which may hide the program as well), or the interpreter of
    its interpreter (a script too), as deep as the kernel goes; else ''.

    Only files the sandbox itself may read (``readable``) are looked at:
    the program and its interpreters are named by the command line, which
    a model may write, and the answer (or its absence) would tell it of a
    host file it cannot see, or show it a protected file's first line."""
    chain = []
    path = program
    for _ in range(4):  # the kernel's own limit on nested interpreters
        path = os.path.normpath(path) if path.startswith("/") else ""
        # By its own name only: a link on the way (one the sandbox made in
        # its workdir, to a protected place) would lead the host's look
        # where the sandbox's own cannot go.
        if not path or path.startswith("/dev/") or not readable(path) or os.path.realpath(path) != path:
            # Looked up in the sandbox's PATH, relative to its cwd, or out
            # of its sight (in its own /tmp, which is not the host's).
            return ""
        interpreter = _shebang(path)
        if interpreter is None:
            return ""
        chain.append(repr(interpreter))
        target = os.path.normpath(interpreter) if interpreter.startswith("/") else ""
        # Said missing only where the sandbox could list it as missing itself.
        parent = os.path.dirname(target)
        if target and not target.startswith("/dev/") and readable(parent, True) \
                and os.path.realpath(parent) == parent and not _exists_nofollow(target):
            return f"its interpreter {chain[0]}" + "".join(f", whose interpreter {name}" for name in chain[1:]) \
                + " does not exist"
        path = interpreter
    return ""


def _exists_nofollow(path: str) -> bool:
    """os.path.lexists(path), with no link followed on the way (see _shebang)."""
    from ._spawn import open_dir_nofollow

    try:
        parent = open_dir_nofollow(os.path.dirname(path))
    except FileNotFoundError:
        return False  # a directory on the way is missing
    except OSError:
        return True  # a link on the way, or no way to look: not known to be missing
    try:
        os.stat(os.path.basename(path), dir_fd=parent, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False
    except OSError:
        return True
    finally:
        os.close(parent)


def _shebang(program: str) -> str | None:
    """The interpreter that the #! line of the regular file ``program``
    names, or None."""
    import stat

    from ._spawn import open_dir_nofollow

    # Only a regular file, never through a link, at the end or on the way:
    # the path may be in the workdir, where the sandbox could have put a
    # FIFO (an open() that waits for ever) or a link to anything heel may
    # open, or swap a directory for a link after the caller looked at it.
    try:
        parent = open_dir_nofollow(os.path.dirname(program))
    except OSError:
        return None
    try:
        name = os.path.basename(program)
        if not stat.S_ISREG(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
            return None
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
    except OSError:
        return None
    finally:
        os.close(parent)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        head = os.read(fd, 256)
    except OSError:
        return None
    finally:
        os.close(fd)
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].split()
    return os.fsdecode(words[0]) if words else None


class CommandTimeout(HeelError, TimeoutError):
    """``run(check=True)``: the command ran past its timeout and was killed."""

    def __init__(self, cmd, timeout: float, stdout: bytes | None = None, stderr: bytes | None = None):
        self.cmd = cmd
        self.timeout = timeout
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(f"command {cmd!r} timed out after {timeout} seconds")


class VenvError(HeelError):
    """A Python environment cannot be used or built."""


class InterpreterNotFound(VenvError, FileNotFoundError):
    """The Python interpreter asked for does not exist or cannot run."""


class BrokenVenv(VenvError):
    """A directory that should hold a virtual environment does not hold a usable one."""


class InstallError(VenvError):
    """The package installer failed.  ``output`` is what it said."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


def __getattr__(name: str):
    # CommandFailed derives from subprocess.CalledProcessError; importing
    # subprocess costs the CLI's fast path more than it ever needs, so the
    # class is made on first use.
    if name == "CommandFailed":
        import subprocess

        class CommandFailed(HeelError, subprocess.CalledProcessError):
            """``run(check=True)``: the command exited with a non-zero status."""

            __module__ = __name__

            def __str__(self) -> str:
                return subprocess.CalledProcessError.__str__(self)

        globals()["CommandFailed"] = CommandFailed
        return CommandFailed
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
