"""The one module that touches the compiled C core (``heel._heel``).

Everything else in heel goes through the small functions here, which turn
C conventions (negative errno returns) into Python ones.
"""

from __future__ import annotations

import os

from ._version import __version__

try:
    from ._heel import ffi, lib
except ImportError as exc:  # a source tree that was never built
    raise ImportError(
        "heel's compiled module is missing: install heel with pip "
        "(`pip install .` or `pip install -e .` from a source tree)"
    ) from exc

_native_version = ffi.string(lib.heel_native_version()).decode()
if _native_version != __version__:
    raise ImportError(
        f"heel's compiled module is version {_native_version} but the Python sources are "
        f"{__version__}: rebuild it (pip install -e . again after editing csrc/)"
    )

INIT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_heel_init")

STAGES = {
    lib.HEEL_STAGE_CLONE: "clone",
    lib.HEEL_STAGE_SIGNALS: "signals",
    lib.HEEL_STAGE_USERNS: "userns",
    lib.HEEL_STAGE_MOUNT: "mount",
    lib.HEEL_STAGE_FDS: "fds",
    lib.HEEL_STAGE_SETSID: "setsid",
    lib.HEEL_STAGE_CHDIR: "chdir",
    lib.HEEL_STAGE_RLIMIT: "rlimit",
    lib.HEEL_STAGE_CAPS: "capabilities",
    lib.HEEL_STAGE_NO_NEW_PRIVS: "no_new_privs",
    lib.HEEL_STAGE_LANDLOCK: "landlock",
    lib.HEEL_STAGE_SECCOMP: "seccomp",
    lib.HEEL_STAGE_EXEC_INIT: "exec_init",
    lib.HEEL_STAGE_INIT: "init",
    lib.HEEL_STAGE_EXEC: "exec",
    lib.HEEL_STAGE_REQUEST: "request",
    lib.HEEL_STAGE_NETWORK: "network",
}

MSG_ERROR = lib.HEEL_MSG_ERROR
MSG_EXITED = lib.HEEL_MSG_EXITED
MSG_KILL = lib.HEEL_MSG_KILL
MSG_LISTENER = lib.HEEL_MSG_LISTENER
MSG_PTMX = lib.HEEL_MSG_PTMX
MSG_SIGNAL = lib.HEEL_MSG_SIGNAL


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 when Landlock is unavailable."""
    abi = lib.heel_landlock_abi()
    return abi if abi > 0 else 0


def landlock_ruleset(handled_fs: int, handled_net: int, scoped: int) -> int:
    return _check(lib.heel_landlock_create(handled_fs, handled_net, scoped), "landlock_create_ruleset")


def landlock_add_path(ruleset_fd: int, path: str, allowed: int) -> None:
    _check(lib.heel_landlock_add_path(ruleset_fd, os.fsencode(path), allowed), f"landlock rule for {path}")


def landlock_add_port(ruleset_fd: int, port: int, allowed: int) -> None:
    _check(lib.heel_landlock_add_port(ruleset_fd, port, allowed), f"landlock rule for port {port}")


def userns_create(uid_map: str, gid_map: str) -> int:
    """A user namespace with these maps; returns its fd."""
    return _check(lib.heel_userns_create(uid_map.encode(), gid_map.encode()), "user namespace")


def seccomp_arch() -> int:
    return lib.heel_seccomp_arch()


class SpawnPlan:
    """A heel_spawn_plan with every buffer it points to kept alive."""

    def __init__(
        self,
        *,
        init_fd: int,
        argv: list[bytes],
        envp: list[bytes],
        cwd: str | None,
        fds: list[int],
        report_fd: int,
        clone_flags: int,
        uid_map: bytes,
        gid_map: bytes,
        mounts: list[tuple[int, str | None, str, int, bool]],
        readonly_root: bool,
        landlock_fd: int,
        pdeathsig: int,
        userns_fd: int,
        proxy_port: int = 0,
    ) -> None:
        keep = []

        def cstr(value):
            if value is None:
                return ffi.NULL
            data = ffi.new("char[]", os.fsencode(value))
            keep.append(data)
            return data

        def cstr_array(items):
            arr = ffi.new("char *[]", len(items) + 1)
            for i, item in enumerate(items):
                arr[i] = cstr(item)
            arr[len(items)] = ffi.NULL
            keep.append(arr)
            return arr

        p = ffi.new("struct heel_spawn_plan *")
        p.init_fd = init_fd
        p.argv = cstr_array(argv)
        p.envp = cstr_array(envp)
        p.cwd = cstr(cwd)
        fd_arr = ffi.new("int[]", fds)
        keep.append(fd_arr)
        p.fds = fd_arr
        p.nfds = len(fds)
        p.report_fd = report_fd
        p.clone_flags = clone_flags
        p.uid_map = cstr(uid_map)
        p.gid_map = cstr(gid_map)
        mnt = ffi.new("struct heel_mount_op[]", max(1, len(mounts)))
        for i, (kind, source, path, access, idmap) in enumerate(mounts):
            mnt[i].kind = kind
            mnt[i].source = cstr(source)
            mnt[i].path = cstr(path)
            mnt[i].access = access
            mnt[i].idmap = int(idmap)
        keep.append(mnt)
        p.mounts = mnt
        p.nmounts = len(mounts)
        p.readonly_root = int(readonly_root)
        p.landlock_fd = landlock_fd
        p.pdeathsig = pdeathsig
        p.userns_fd = userns_fd
        p.proxy_port = proxy_port
        self._plan = p
        self._keep = keep

    def spawn(self) -> tuple[int, int]:
        """Clone the child; returns (pid, pidfd).  Raises SpawnError (stage
        "clone") if clone fails."""
        from .errors import SpawnError

        pidfd = ffi.new("int *", -1)
        pid = lib.heel_spawn(self._plan, pidfd)
        if pid < 0:
            raise SpawnError("clone", -pid)
        return pid, pidfd[0]


# ---- the tunnel relay (csrc/relay.c) ------------------------------------

RELAY_DONE_SIZE = ffi.sizeof("struct heel_relay_done")


class Relay:
    """The C relay: one thread that splices the bytes of every tunnel added.

    ``add`` takes ownership of both fds.  Each tunnel's end arrives as a
    record on ``notify_fd``; ``read_done`` decodes what is there.
    """

    def __init__(self) -> None:
        out = ffi.new("struct heel_relay **")
        _check(lib.heel_relay_start(out), "relay start")
        self._relay = out[0]
        self.notify_fd: int = lib.heel_relay_notify_fd(self._relay)

    def add(self, fd_a: int, fd_b: int, tunnel_id: int) -> None:
        """Relay between fd_a and fd_b; both fds belong to the relay now,
        even when this raises."""
        _check(lib.heel_relay_add(self._relay, fd_a, fd_b, tunnel_id), "relay add")

    def cancel(self, tunnel_id: int) -> None:
        _check(lib.heel_relay_cancel(self._relay, tunnel_id), "relay cancel")

    def read_done(self) -> list[tuple[int, int, int, int]]:
        """The completions waiting on notify_fd, as (id, a_to_b, b_to_a,
        errno); empty when there are none."""
        records = []
        while True:
            try:
                data = os.read(self.notify_fd, RELAY_DONE_SIZE * 256)
            except BlockingIOError:
                break
            # Records are written whole and read in multiples of their size.
            buf = ffi.from_buffer("struct heel_relay_done[]", data)
            for i in range(len(data) // RELAY_DONE_SIZE):
                done = buf[i]
                records.append((done.id, done.a_to_b, done.b_to_a, done.error))
        return records

    def stop(self) -> None:
        """End every tunnel (without completions) and the thread; closes notify_fd."""
        if self._relay != ffi.NULL:
            lib.heel_relay_stop(self._relay)
            self._relay = ffi.NULL
            self.notify_fd = -1
