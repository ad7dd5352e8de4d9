"""Turning a plan into native objects, and starting one command.

``Prepared`` holds what every command of a sandbox shares: the Landlock
ruleset fd, the seccomp program, heel-init's fd, the namespace flags and
mounts.  It is built once, when the sandbox opens.  ``launch`` starts one
command and returns its pid, pidfd and control socket; it does not wait.
Both the trio API and the synchronous CLI path use it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import struct
import tempfile

from . import _native
from ._native import lib
from ._plan import SandboxPlan, build_plan
from .config import SandboxConfig
from .errors import SandboxUnavailable, spawn_error

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACES = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC

_MOUNT_KINDS = {
    "keep_rw": lib.HEEL_MNT_KEEP_RW,
    "readonly": lib.HEEL_MNT_READONLY,
    "bind": lib.HEEL_MNT_BIND,
    "proc": lib.HEEL_MNT_PROC,
    "tmpfs": lib.HEEL_MNT_TMPFS,
    "devpts": lib.HEEL_MNT_DEVPTS,
}
_MSG = struct.Struct("=iii")
CTL_FD = 3  # the control socket's number in the child: after stdin, stdout, stderr


class Prepared:
    """The native side of a plan; close() releases the fds."""

    #: Each command in a mount namespace adds rules for its own /proc and
    #: devpts to the shared ruleset (see spawn.c); after this many commands
    #: the ruleset is rebuilt.
    RULESET_REUSE = 64

    def __init__(self, plan: SandboxPlan) -> None:
        self.plan = plan
        self.landlock_fd = -1
        self.init_fd = -1
        self.userns_fd = -1
        self.launches = 0
        try:
            if not os.access(_native.INIT_PATH, os.X_OK):
                raise SandboxUnavailable(
                    "heel-init", f"{_native.INIT_PATH} is missing", "reinstall heel: the build makes it")
            self.init_fd = os.open(_native.INIT_PATH, os.O_PATH | os.O_CLOEXEC)
            self.landlock_fd = self._ruleset()
            self.seccomp = _native.seccomp_filter(**plan.seccomp)
            if plan.sandbox_id is not None:
                ids = f"0 {plan.sandbox_id} 1\n"
                self.userns_fd = _native.userns_create(ids, ids)
        except BaseException:
            self.close()
            raise
        for path in plan.mountpoints:
            os.makedirs(path, exist_ok=True)
        self.clone_flags = 0
        if plan.namespaces:
            self.clone_flags = NAMESPACES if plan.network_namespace else NAMESPACES & ~CLONE_NEWNET
            if self.userns_fd >= 0:  # the child enters that one instead
                self.clone_flags &= ~CLONE_NEWUSER
        self.mounts = [(_MOUNT_KINDS[m.kind], m.source, m.path, m.access, m.idmap) for m in plan.mounts]
        uid, gid = os.geteuid(), os.getegid()
        self.uid_map = f"{uid} {uid} 1\n".encode()
        self.gid_map = f"{gid} {gid} 1\n".encode()

    def _ruleset(self) -> int:
        plan = self.plan
        if not plan.handled_fs:
            return -1
        fd = _native.landlock_ruleset(plan.handled_fs, plan.handled_net, plan.scoped)
        try:
            for rule in plan.rules:
                try:
                    _native.landlock_add_path(fd, rule.path, rule.access)
                except FileNotFoundError:
                    # Gone since the plan listed it (the host's file system
                    # lives on): nothing there to grant.
                    pass
        except BaseException:
            os.close(fd)
            raise
        return fd

    def ruleset_for_launch(self) -> int:
        """The ruleset fd for the next command, rebuilt every RULESET_REUSE launches."""
        self.launches += 1
        if self.plan.namespaces and self.launches % self.RULESET_REUSE == 0 and self.landlock_fd >= 0:
            fresh = self._ruleset()
            os.close(self.landlock_fd)
            self.landlock_fd = fresh
        return self.landlock_fd

    def close(self) -> None:
        for name in ("landlock_fd", "init_fd", "userns_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


def needs_relay(fd: int) -> bool:
    """Whether a host fd that the caller wants to hand to the sandbox as one
    of its standard streams must be relayed through a pipe instead.

    Pipes, sockets and character devices (terminals, /dev/null) are passed
    as they are.  Anything else, a regular file above all, is not: through
    /proc/self/fd the sandbox would reach the file itself and could chmod,
    truncate or utime it, none of which Landlock mediates."""
    mode = os.fstat(fd).st_mode
    return not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode))


def encode_env(env: dict[str, str]) -> list[bytes]:
    return [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]


def launch(prepared: Prepared, argv: list[str], env: dict[str, str], cwd: str,
           stdio: tuple[int, int, int], extra_fds: tuple[int, ...] = ()):
    """Start one command.  Returns (pid, pidfd, host end of the control socket).

    Setup failures arrive later as an error message on the control socket
    (see read_message); this only raises when clone() itself fails.
    """
    plan = prepared.plan
    host_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        flags = _native.INIT_PIDNS if plan.namespaces else 0
        init_argv = [b"heel-init", str(CTL_FD).encode(), str(flags).encode(),
                     os.fsencode(argv[0])] + [os.fsencode(a) for a in argv]
        native = _native.SpawnPlan(
            init_fd=prepared.init_fd,
            argv=init_argv,
            envp=encode_env(env),
            cwd=cwd,
            fds=[*stdio, child_end.fileno(), *extra_fds],
            report_fd=CTL_FD,
            rlimits=list(plan.rlimits),
            clone_flags=prepared.clone_flags,
            uid_map=prepared.uid_map,
            gid_map=prepared.gid_map,
            mounts=prepared.mounts,
            readonly_root=plan.readonly_root,
            landlock_fd=prepared.ruleset_for_launch(),
            seccomp=prepared.seccomp,
            pdeathsig=signal.SIGKILL,
            userns_fd=prepared.userns_fd,
        )
        pid, pidfd = native.spawn()
    except BaseException:
        host_end.close()
        raise
    finally:
        child_end.close()
    return pid, pidfd, host_end


def decode_message(data: bytes) -> tuple[int, int, int]:
    return _MSG.unpack(data)


def encode_message(kind: int, a: int = 0, b: int = 0) -> bytes:
    return _MSG.pack(kind, a, b)


MSG_SIZE = _MSG.size


def raise_for_error(message: tuple[int, int, int], program: str) -> None:
    kind, a, b = message
    if kind == _native.MSG_ERROR:
        raise spawn_error(_native.STAGES.get(a, str(a)), b, program)


def returncode_from_status(status: int) -> int:
    """A raw wait status as subprocess reports it: the code, or -signal."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


class Session:
    """What an open sandbox owns on the host: its temporary directory (the
    private tmp, and the workdir unless the config names one) and the
    prepared native objects.  Used by heel.Sandbox and by the CLI."""

    def __init__(self, config: SandboxConfig, env=None) -> None:
        """``env``: the Environment to plan for; by default the probed one."""
        from ._probe import environment, require

        why = ""
        if env is None:
            env, why = environment()
        self.degraded = require(env, config, why)
        self.base = tempfile.mkdtemp(prefix="heel-")
        try:
            tmp = os.path.join(self.base, "tmp")
            shm = os.path.join(self.base, "shm")
            mask = os.path.join(self.base, "empty")
            os.mkdir(tmp, 0o700)
            os.mkdir(shm, 0o700)
            os.mkdir(mask, 0o555)
            if config.workdir is None:
                workdir = os.path.join(self.base, "work")
                os.mkdir(workdir, 0o700)
            else:
                workdir = str(config.workdir)
            plan = build_plan(config, workdir=workdir, host_tmp=tmp, host_shm=shm, host_mask=mask,
                              env=env, init_path=_native.INIT_PATH)
            self.prepared = Prepared(plan)
        except BaseException:
            shutil.rmtree(self.base, ignore_errors=True)
            raise

    @property
    def plan(self) -> SandboxPlan:
        return self.prepared.plan

    def close(self) -> None:
        self.prepared.close()
        shutil.rmtree(self.base, ignore_errors=True)
