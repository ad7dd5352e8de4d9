"""Starting a sandbox, and one command in it.

When a sandbox opens, ``Session`` plans it and ``Prepared`` builds it: the
trampoline (csrc/spawn.c) creates the namespaces, the mount view and the
Landlock domain once, and execs heel-init, the sandbox's zygote
(csrc/init.c).  ``launch`` then asks the zygote for each command: it sends
the argv, environment, cwd, rlimits and fds, and gets back a pidfd for the
command's init.  It does not wait for the command.  Both the trio API and the
synchronous CLI path use it.
"""

from __future__ import annotations

import array
import errno
import fcntl
import functools
import os
import select
import stat
import struct
import sys
import _socket  # not socket: it costs `heel run` ~7 ms (enum, selectors); the network and IPC paths import it
import _thread

TYPE_CHECKING = False  # not typing's: importing typing costs `heel run` ~7 ms
if TYPE_CHECKING:
    import signal
else:
    # The signal module's C core: the same functions and numbers, without the
    # three enums that `import signal` builds (some 1.5 ms of `heel run`).
    import _signal as signal

from . import _native
from . import _landlock as ll
from ._native import lib
from ._plan import SandboxPlan, _under, build_plan
from .config import SandboxConfig
from .errors import SandboxClosed, SandboxUnavailable, SpawnError, spawn_error

if TYPE_CHECKING:
    import socket

    import trio

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
    "proc_kernel_ro": lib.HEEL_MNT_PROC_KERNEL_RO,
}
_MSG = struct.Struct("=iii")  # struct heel_msg
MSG_SIZE = _MSG.size
_LENGTH = struct.Struct("=I")
_HEAD = struct.Struct("=IIII")  # struct heel_request_head
_RLIMIT = struct.Struct("=iIQQ")  # struct heel_rlimit
_REPLY = struct.Struct("=i")
for _layout, _c_type in ((_MSG, "struct heel_msg"), (_HEAD, "struct heel_request_head"),
                         (_RLIMIT, "struct heel_rlimit")):
    if _layout.size != _native.ffi.sizeof(_c_type):  # the protocol with heel-init, checked once
        raise ImportError(f"heel: {_c_type} is {_native.ffi.sizeof(_c_type)} bytes in C, "
                          f"{_layout.size} in Python")
CTL_FD = 3  # heel-init's control socket in the child: after stdin, stdout, stderr


class Prepared:
    """A running sandbox: its zygote, and the way to ask it for commands.
    close() kills everything in the sandbox."""

    def __init__(self, plan: SandboxPlan, ipc_fd: int = -1) -> None:
        """``ipc_fd``: the sandbox's end of the IPC socket, given to every command."""
        self.plan = plan
        self._ipc_fd = ipc_fd
        self._lock = _thread.allocate_lock()  # one request at a time on the zygote's socket...
        self._trio_lock: trio.Lock | None = None  # ...and under trio, without blocking the event loop
        self._pidfd = -1
        self._ctl: _socket.socket | None = None
        #: the proxy's listening socket, made inside the sandbox's network namespace
        self.proxy_listener: socket.socket | None = None
        #: an O_PATH fd of the ptmx of the sandbox's own devpts (-1: none),
        #: where the ptys for commands on a terminal come from (open_pty)
        self.ptmx = -1
        #: How heel-init ended, once reaped: (si_code, si_status) of its
        #: waitid (CLD_EXITED and 0 when it ended by itself, as it does
        #: without a pid namespace; CLD_KILLED and SIGKILL, heel's, with one).
        self.init_ended: tuple[int, int] | None = None
        for path, is_file in plan.mountpoints:
            try:
                make_path_nofollow(path, is_file)
            except OSError as exc:  # a link or something else put there (by a sandbox that may write it)
                raise SpawnError("mountpoint", exc.errno or errno.EIO, path) from None
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        plan = self.plan
        if not os.access(_native.INIT_PATH, os.X_OK):
            raise SandboxUnavailable("heel-init", f"{_native.INIT_PATH} is missing",
                                     "reinstall heel: the build makes it")
        opened: list[int] = []
        host_end, child_end = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self._ctl = host_end
        try:
            init_fd = os.open(_native.INIT_PATH, os.O_PATH | os.O_CLOEXEC)
            opened.append(init_fd)
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            opened.append(null)
            landlock_fd = self._ruleset()
            if landlock_fd >= 0:
                opened.append(landlock_fd)
            userns_fd = -1
            if plan.sandbox_id is not None:
                ids = f"0 {plan.sandbox_id} 1\n"
                try:
                    userns_fd = _native.userns_create(ids, ids)
                except OSError as exc:  # a stage like the others: namespaces_missing() judges it
                    raise SpawnError("userns", exc.errno or errno.EINVAL) from None
                opened.append(userns_fd)
            clone_flags = 0
            if plan.namespaces:
                clone_flags = NAMESPACES if plan.network_namespace else NAMESPACES & ~CLONE_NEWNET
                if userns_fd >= 0:  # the child enters that one instead
                    clone_flags &= ~CLONE_NEWUSER
            uid, gid = os.geteuid(), os.getegid()
            native = _native.SpawnPlan(
                init_fd=init_fd,
                argv=[b"heel-init", str(CTL_FD).encode(), str(_init_flags(plan)).encode()]
                + ([str(CTL_FD + 1).encode()] if self._ipc_fd >= 0 else []),
                envp=[],
                cwd=plan.workdir,
                fds=[null, null, null, child_end.fileno()] + ([self._ipc_fd] if self._ipc_fd >= 0 else []),
                report_fd=CTL_FD,
                clone_flags=clone_flags,
                uid_map=f"{uid} {uid} 1\n".encode(),
                gid_map=f"{gid} {gid} 1\n".encode(),
                mounts=[(_MOUNT_KINDS[m.kind], m.source, m.path, m.access, m.idmap) for m in plan.mounts],
                readonly_root=plan.readonly_root,
                landlock_fd=landlock_fd,
                # With a pid namespace heel-init's death is the end of every
                # process in it: SIGKILL.  Without one it ends nothing by
                # itself, and a SIGKILL in the middle of its last sweep
                # (which stops every descendant before it kills them) left
                # the tree stopped for ever: SIGTERM, which heel-init reads
                # as the host's end, sweeps and exits.
                pdeathsig=signal.SIGKILL if plan.namespaces else signal.SIGTERM,
                userns_fd=userns_fd,
                proxy_port=plan.proxy_port if plan.network_namespace else 0,
            )
            _, self._pidfd = native.spawn()
        finally:
            child_end.close()
            for fd in opened:
                os.close(fd)
        if plan.proxy_port and plan.network_namespace:
            fd = _receive_fd(host_end, _native.MSG_LISTENER)
            import socket  # what trio's proxy needs; only networked sandboxes get here

            self.proxy_listener = socket.socket(fileno=fd)
            self.proxy_listener.setblocking(False)
        if plan.namespaces and any(m.kind == "devpts" for m in plan.mounts):
            self.ptmx = _receive_fd(host_end, _native.MSG_PTMX)
        first = _recv_exactly(host_end, MSG_SIZE)
        if first is None:
            raise SandboxUnavailable("the sandbox", "heel-init exited before it started")
        raise_for_error(decode_message(first), "heel-init")

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
                except OSError as exc:
                    if exc.errno != errno.ELOOP:
                        raise
                    # The plan resolved every path; a link in it now was
                    # put there since (see heel_landlock_add_path).
                    error = SpawnError("landlock", errno.ELOOP, rule.path)
                    error.strerror = (f"{rule.path}: a symbolic link has replaced part of this path while the "
                                      "sandbox was being set up (something that may write there changed it); "
                                      "nothing was granted")
                    raise error from None
            if plan.handled_net and plan.proxy_port:
                # TCP connect to the proxy's port only; never bind.  Without a
                # network namespace this is what keeps the sandbox off every
                # other port (on any address: Landlock matches ports only).
                _native.landlock_add_port(fd, plan.proxy_port, ll.CONNECT_TCP)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def launch(self, argv: list[str], env: dict[str, str], cwd: str,
               stdio: tuple[int, int, int], ctty: bool = False) -> tuple[int, _socket.socket]:
        """Start one command.  Returns (pidfd of its init, control socket).

        ``ctty``: stdin is a pty heel made (heel._terminal), to become the
        command's controlling terminal.  Failures of the command's own setup
        arrive later as an error message on the control socket (see
        raise_for_error).  This blocks until heel-init answers; under trio,
        use launch_async."""
        with self._lock:
            host_end, child_end = self._send_request(argv, env, cwd, stdio, ctty)
            return self._take_reply(argv, host_end, child_end), host_end

    async def launch_async(self, argv: list[str], env: dict[str, str], cwd: str,
                           stdio: tuple[int, int, int], ctty: bool = False) -> tuple[int, _socket.socket]:
        """launch() for trio: the event loop runs on while heel-init works
        (a sandbox under load must not stall the host's other tasks)."""
        import trio

        protected = trio.lowlevel.enable_ki_protection(_launch_async)  # not at import: `heel run` has no trio
        return await protected(self, trio, argv, env, cwd, stdio, ctty)

    def _send_request(self, argv: list[str], env: dict[str, str], cwd: str,
                      stdio: tuple[int, int, int], ctty: bool) -> tuple[_socket.socket, _socket.socket]:
        payload = _encode_request(argv, env, cwd, self.plan.rlimits, lib.HEEL_REQUEST_CTTY if ctty else 0)
        if len(payload) > lib.HEEL_REQUEST_MAX:
            # heel-init takes a request this long for a broken stream and
            # ends (with it the sandbox); execve() would refuse it anyway.
            raise spawn_error("exec", errno.E2BIG, argv[0])
        host_end, child_end = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            if self._ctl is None:
                raise SandboxClosed("the sandbox is closed")
            try:
                self._ctl.sendmsg([_LENGTH.pack(len(payload))],
                                  [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", [*stdio, child_end.fileno()]))])
                self._ctl.sendall(payload)
            except OSError as exc:
                raise SandboxClosed(f"the sandbox's heel-init is gone: {exc}") from None
        except BaseException:
            host_end.close()
            child_end.close()
            raise
        return host_end, child_end

    def _take_reply(self, argv: list[str], host_end: _socket.socket, child_end: _socket.socket) -> int:
        """heel-init's answer to the request just sent: the pidfd of the
        command's init."""
        try:
            if self._ctl is None:
                raise SandboxClosed("the sandbox is closed")
            try:
                data, fds, _, _ = recv_fds(self._ctl, _REPLY.size, 1)
            except OSError as exc:
                raise SandboxClosed(f"the sandbox's heel-init is gone: {exc}") from None
            if len(data) != _REPLY.size:
                for fd in fds:
                    os.close(fd)
                raise SandboxClosed("the sandbox's heel-init is gone")
            (result,) = _REPLY.unpack(data)
            if result < 0 or not fds:
                for fd in fds:
                    os.close(fd)
                raise spawn_error("clone", -result if result < 0 else errno.EIO, argv[0])
            return fds[0]
        except BaseException:
            host_end.close()
            raise
        finally:
            child_end.close()

    def close(self) -> None:
        """Kill every process of the sandbox and reap its heel-init."""
        self.close_channels()
        self.reap()

    def close_channels(self) -> None:
        """Close the sockets to the sandbox (in the trio thread, where trio
        watches them): heel-init, told so, kills what it started."""
        if self.proxy_listener is not None:
            self.proxy_listener.close()
            self.proxy_listener = None
        if self.ptmx >= 0:
            os.close(self.ptmx)
            self.ptmx = -1
        if self._ctl is not None:
            with self._lock:
                trio = sys.modules.get("trio")  # not imported for it: the CLI's plain runner has none
                if trio is not None:
                    try:
                        trio.lowlevel.notify_closing(self._ctl)  # wakes a launch_async waiting on it
                    except RuntimeError:
                        pass  # not in a trio run
                self._ctl.close()
                self._ctl = None

    def reap(self) -> None:
        """Kill heel-init, and with it every process of the sandbox, and
        wait for it: blocking (a tree of thousands takes a while to die),
        so under trio in a thread of its own."""
        if self._pidfd >= 0:
            # In a pid namespace heel-init is its pid 1: its death is every
            # process's.  Without one, the closed socket has told it to kill
            # what it started; give it a moment before the SIGKILL.
            if not self.plan.namespaces:
                select.select([self._pidfd], [], [], 2.0)
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                info = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED)
                if info is not None:
                    self.init_ended = (info.si_code, info.si_status)
            except ChildProcessError:  # a host that ignores SIGCHLD: the kernel reaped it
                pass
            os.close(self._pidfd)
            self._pidfd = -1


def _init_flags(plan: SandboxPlan) -> int:
    flags = lib.HEEL_INIT_PIDNS if plan.namespaces else 0
    if plan.seccomp["allow_unix_sockets"]:
        flags |= lib.HEEL_INIT_UNIX_SOCKETS
    elif plan.seccomp["allow_unix_seqpacket"]:
        flags |= lib.HEEL_INIT_UNIX_SEQPACKET
    if plan.seccomp["allow_inet_stream"]:
        flags |= lib.HEEL_INIT_INET_STREAM
        if not plan.network_namespace:
            # listen() there would open a port on the host's interfaces, and
            # MSG_FASTOPEN would connect past Landlock's port rule.
            flags |= lib.HEEL_INIT_NO_LISTEN | lib.HEEL_INIT_NO_FASTOPEN
    if not plan.network_namespace and not plan.seccomp["allow_unix_sockets"]:
        # Only socketpairs and TCP clients: nothing to bind, and a bound
        # abstract name would be taken in the host's namespace.
        flags |= lib.HEEL_INIT_NO_BIND
    if plan.seccomp["allow_netlink_route"]:
        flags |= lib.HEEL_INIT_NETLINK_ROUTE
    if plan.handled_fs:  # Landlock is there: each command in a domain of its own
        flags |= lib.HEEL_INIT_SCOPE
    return flags


def _encode_request(argv: list[str], env: dict[str, str], cwd: str, rlimits, flags: int = 0) -> bytes:
    """A command request's payload (see heel.h); flags: HEEL_REQUEST_*."""
    strings = [os.fsencode(cwd), os.fsencode(argv[0])] + [os.fsencode(a) for a in argv]
    strings += [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
    return b"".join([
        _HEAD.pack(len(argv), len(env), len(rlimits), flags),
        *(_RLIMIT.pack(resource, 0, soft, hard) for resource, soft, hard in rlimits),
        *(s + b"\0" for s in strings),
    ])


def host_pid(pidfd: int) -> int:
    """The pid of a pidfd's process as the host sees it (heel-init reports
    it in the sandbox's pid namespace)."""
    with open(f"/proc/self/fdinfo/{pidfd}") as info:
        for line in info:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    return -1


async def _launch_async(prepared: Prepared, trio, argv: list[str], env: dict[str, str], cwd: str,
                        stdio: tuple[int, int, int], ctty: bool) -> tuple[int, _socket.socket]:
    """Prepared.launch_async.  KI-protected, so that a Ctrl-C comes only at
    the wait for the reply, never between the parts of a request; and there
    the exchange is finished first.  A request sent must have its reply
    read, or every later command would get the one before's (its init, and
    so its exit status): a Ctrl-C reaches the main task even in a shielded
    wait.  The command it started is then killed, and the Ctrl-C goes on."""
    if prepared._trio_lock is None:
        prepared._trio_lock = trio.Lock()
    async with prepared._trio_lock:
        host_end, child_end = prepared._send_request(argv, env, cwd, stdio, ctty)
        assert prepared._ctl is not None  # _send_request raised if it was closed
        interrupted: KeyboardInterrupt | None = None
        # Shielded: the reply must be read even by a cancelled caller.
        # Bounded, for a heel-init that never answers: then the sandbox is
        # broken, and closed.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(30) as waited:
                while True:
                    try:
                        await trio.lowlevel.wait_readable(prepared._ctl)
                        break
                    except KeyboardInterrupt as exc:
                        interrupted = exc
                    except trio.ClosedResourceError:  # close() from another task
                        host_end.close()
                        child_end.close()
                        raise SandboxClosed("the sandbox is closed") from None
        if waited.cancelled_caught:
            host_end.close()
            child_end.close()
            # Its sockets only, here on the trio loop: the kill and the
            # reaping (blocking) are left to the sandbox's close, in a thread.
            prepared.close_channels()
            raise SandboxClosed("the sandbox's heel-init stopped answering; the sandbox is closed")
        pidfd = prepared._take_reply(argv, host_end, child_end)
        if interrupted is not None:
            from ._sync import kill_tree

            try:
                kill_tree(pidfd, host_end, grace=1.0)
            finally:
                os.close(pidfd)
                host_end.close()
            raise interrupted
        return pidfd, host_end


def recv_fds(sock: _socket.socket, size: int, maxfds: int, flags: int = 0) -> tuple[bytes, list[int], int, object]:
    """socket.recv_fds, with the fds received close-on-exec: a child the
    host starts later must not inherit a sandbox's listener or pidfds.
    (socket.recv_fds drops its flags argument before Python 3.12.)"""
    fds = array.array("i")
    data, ancdata, flags, address = sock.recvmsg(size, _socket.CMSG_SPACE(maxfds * fds.itemsize),
                                                 _socket.MSG_CMSG_CLOEXEC | flags)
    for level, kind, payload in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    return data, list(fds), flags, address


def _receive_fd(ctl: _socket.socket, kind: int) -> int:
    """An fd that the trampoline sends with a message of this kind before
    heel-init starts (MSG_LISTENER, MSG_PTMX), or the error that stopped it
    first."""
    data, fds, _, _ = recv_fds(ctl, MSG_SIZE, 1)
    message = decode_message(data) if len(data) == MSG_SIZE else None
    if message is not None and message[0] == kind and len(fds) == 1:
        return fds[0]
    for fd in fds:
        os.close(fd)
    if message is not None:
        raise_for_error(message, "heel-init")
    raise SandboxUnavailable("the sandbox", "heel-init exited before it started")


def _recv_exactly(sock: _socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def needs_relay(fd: int) -> bool:
    """Whether a host fd that the caller wants to hand to the sandbox as one
    of its standard streams must be relayed through a pipe instead.

    Pipes (named ones too: relaying one would read ahead what the next
    reader of the FIFO should get, and block on it; see the README's
    limits), sockets and character devices (/dev/null; terminals are
    replaced by a pty of heel's own before this is asked, see
    heel._terminal) are passed as they are.  Anything else, a regular file
    above all, is not: through /proc/self/fd the sandbox would reach the
    file itself and could chmod, truncate or utime it, none of which
    Landlock mediates."""
    mode = os.fstat(fd).st_mode
    return not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode))


def decode_message(data: bytes) -> tuple[int, int, int]:
    return _MSG.unpack(data)


def encode_message(kind: int, a: int = 0, b: int = 0) -> bytes:
    return _MSG.pack(kind, a, b)


def raise_for_error(message: tuple[int, int, int], program: str, plan: SandboxPlan | None = None) -> None:
    """A SpawnError for heel-init's error message; ``plan``: the sandbox's,
    so that the error may say what of the program is missing (only from
    what the sandbox itself may read)."""
    kind, a, b = message
    if kind == _native.MSG_ERROR:
        raise spawn_error(_native.STAGES.get(a, str(a)), b, program,
                          None if plan is None else functools.partial(sandbox_reads, plan))


def sandbox_reads(plan: SandboxPlan, path: str, directory: bool = False) -> bool:
    """Whether the sandbox of ``plan`` may read the host's file (or list
    the directory) at ``path`` by that name: a Landlock rule that reads it
    reaches it, no protected place holds it, and the name is not one of the
    sandbox's own /tmp or /dev/shm (unless a grant brings the host's file
    there, the workdir say)."""
    if any(_under(path, d) for d in plan.protected):
        return False
    rules = plan.rules
    own = next((m for m in plan.mounts if m.kind == "bind" and _under(path, m.path)), None)
    if own is not None:  # in the sandbox's own /tmp or /dev/shm: only what is granted there is the host's
        rules = tuple(rule for rule in rules if _under(rule.path, own.path) and rule.path != own.path
                      and not _under(rule.path, own.source))
    right = ll.READ_DIR if directory else ll.READ_FILE
    return any(rule.access & right and _under(path, rule.path) for rule in rules)


#: The name of heel's temporary directories; the lock file in each is held
#: (flock) by the process that owns it, for as long as it lives.
TEMP_PREFIX = "heel-"
_LOCK = ".owner-lock"


# shutil and tempfile are not imported here: together they cost `heel run`
# about 8 ms at every start, for the three small things below.

def guard_standard_fds() -> None:
    """Put /dev/null on each of fds 0, 1 and 2 that is closed (a daemon, cron,
    `heel run ... >&-`).  Otherwise the first fds heel opens (a lock file,
    its socket to heel-init) would take those numbers, and a command handed
    "its stdout" would be handed one of them."""
    for fd in range(3):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd, unless fd is not the lowest
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def temp_root() -> str:
    """Where temporary directories go: $TMPDIR (or $TEMP, $TMP) when it is a
    directory, else /tmp (tempfile.gettempdir's first choices), with its
    symbolic links resolved: the sandbox's private directories are mount
    sources, which the trampoline opens without following links."""
    for name in ("TMPDIR", "TEMP", "TMP"):
        value = os.environ.get(name)
        if value and os.path.isdir(value):
            return os.path.realpath(value)
    return os.path.realpath("/tmp")


def make_temp_dir(prefix: str, root: str | None = None, *, searchable: bool = False) -> str:
    """A new private (0700) directory in ``root`` (default temp_root()), as
    tempfile.mkdtemp.  ``searchable``: 0711, for root's sandbox directories,
    whose unprivileged sandbox id must pass through it to its workdir; what
    is inside keeps modes of its own (see Session)."""
    from_environment = not root
    root = root or temp_root()
    for _ in range(100):
        path = os.path.join(root, prefix + os.urandom(6).hex())
        try:
            os.mkdir(path, 0o700)
            if searchable:
                # After mkdir, as the umask would take the bit away; through an
                # fd, never the name: a sandbox that may write where $TMPDIR
                # is could have put a link there since.
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    os.fchmod(fd, 0o711)
                finally:
                    os.close(fd)
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            if not from_environment:
                raise
            from .errors import PolicyError

            raise PolicyError(f"cannot make heel's temporary directory in {root} (from $TMPDIR, $TEMP or $TMP, "
                              f"else /tmp): {exc.strerror}; set TMPDIR to a directory you can write") from None
    raise FileExistsError(f"no free temporary directory name in {root}")


def open_dir_nofollow(path: str, create: bool = False) -> int:
    """An O_RDONLY fd of the directory ``path``, reached from / without
    following a link at any step (a link met fails with ELOOP); made where
    missing when ``create``.  For paths that come resolved (no links of the
    host's own in them) and lead through places a sandbox may write."""
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in (part for part in path.split("/") if part):
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except NotADirectoryError:  # what O_DIRECTORY says of a link: ELOOP, as for any other
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), part) from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_path_nofollow(path: str, is_file: bool = False) -> None:
    """os.makedirs(path) (and an empty file at the end when ``is_file``),
    walking from / without following a link at any step: mount points are
    made in heel's directories, where a sandbox that may write the place of
    $TMPDIR could have put one.  The paths come resolved (no links of the
    host's own in them); a link met fails with ELOOP."""
    if not is_file:
        os.close(open_dir_nofollow(path, create=True))
        return
    parent = open_dir_nofollow(os.path.dirname(path), create=True)
    try:
        # O_RDONLY|O_NONBLOCK: a FIFO planted there opens at once (and is
        # refused below) instead of waiting for ever for a reader.
        fd = os.open(os.path.basename(path), os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o644, dir_fd=parent)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EEXIST, "a mount point for a file is there, and is not a file", path)
        finally:
            os.close(fd)
    finally:
        os.close(parent)


def remove_tree(path: str, keep_last: str | None = None) -> None:
    """shutil.rmtree(path, ignore_errors=True) for a tree a sandbox filled,
    which may hold links, directories it made unwritable, and nesting deeper
    than any recursion or fd limit.  Nothing is followed: entries are
    reached through directory fds, links are unlinked as they are.  A
    directory that is not u+rwx is made so (this user's own only) before it
    is emptied.  No recursion and three fds at most: each subdirectory met
    below the top is moved up into the top under a name of heel's, and
    emptied there in turn.  ``keep_last``: a file in the top that goes
    only once all else has (the owner lock: a removal cut short leaves a
    directory the next sweep still knows to be heel's)."""
    path = os.path.abspath(path)
    # The directory that holds it is reached without following a link: a
    # sandbox that may write a place above (a venv's parent) could have
    # swapped one in, which would have the tree removed elsewhere.
    try:
        parent = open_dir_nofollow(os.path.dirname(path))
    except OSError:
        return
    try:
        top = _open_removable(os.path.basename(path), parent)
    except OSError:
        os.close(parent)
        return
    if top is None:
        os.close(parent)
        return
    try:
        pending: list[str] = []
        try:
            _empty(top, top, pending, keep_last)
        except OSError:
            pass
        while pending:
            name = pending.pop()
            try:
                fd = _open_removable(name, top)
            except OSError:  # not this user's to open: left as it is
                continue
            if fd is None:  # no longer a directory: as a file
                _unlink(name, top)
                continue
            try:
                _empty(fd, top, pending)
            except OSError:
                pass
            finally:
                os.close(fd)
            try:
                os.rmdir(name, dir_fd=top)
            except OSError:
                pass
        if keep_last is not None:
            _unlink(keep_last, top)
    finally:
        os.close(top)
    try:
        os.rmdir(os.path.basename(path), dir_fd=parent)
    except OSError:
        pass
    finally:
        os.close(parent)


_REMOVING = ".heel-removing-"


def _open_removable(name: str, dir_fd: int | None) -> int | None:
    """An fd to read the directory ``name`` (in dir_fd), made u+rwx first
    when it is this user's and is not; None when it is not a directory.
    PermissionError for another user's directory closed to this one."""
    flags = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, os.O_RDONLY | flags, dir_fd=dir_fd)
    except (NotADirectoryError, FileNotFoundError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link
            return None
        if exc.errno != errno.EACCES:
            raise
        # Unreadable (chmod 000, say): opened as a path, which needs no
        # permission on it, made readable through that fd, never a name.
        handle = os.open(name, os.O_PATH | flags, dir_fd=dir_fd)
        try:
            if os.fstat(handle).st_uid != os.geteuid():
                raise PermissionError(errno.EACCES, "another user's directory", name) from None
            os.chmod(f"/proc/self/fd/{handle}", 0o700)
            return os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        finally:
            os.close(handle)
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o700 != 0o700 and st.st_uid == os.geteuid():
            os.fchmod(fd, 0o700)  # its entries can be unlinked, and it moved
    except BaseException:
        os.close(fd)
        raise
    return fd


def _empty(fd: int, top: int, pending: list[str], keep: str | None = None) -> None:
    """Unlink what is in the directory fd but directories, which go to
    ``pending``: by name when fd is the top, else moved up into the top.
    ``keep``: a name left in place (in the top only)."""
    with os.scandir(fd) as entries:
        names = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
    for name, is_dir in names:
        if name == keep and fd == top:
            continue
        if not is_dir:
            _unlink(name, fd)
        elif fd == top:
            pending.append(name)
        else:
            try:
                # Moving a directory to another parent writes its "..": it must be u+rwx.
                sub = _open_removable(name, fd)
                if sub is not None:
                    os.close(sub)
                new = _free_name(top)
                os.rename(name, new, src_dir_fd=fd, dst_dir_fd=top)
                pending.append(new)
            except OSError:
                pass


def _free_name(top: int) -> str:
    for _ in range(1000):
        name = _REMOVING + os.urandom(6).hex()
        try:
            os.lstat(name, dir_fd=top)
        except FileNotFoundError:
            return name
    raise FileExistsError("no free name to remove a tree with")


def _unlink(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def make_owned_temp_dir(prefix: str, root: str | None = None, *, searchable: bool = False) -> tuple[str, int]:
    """A new private directory, as make_temp_dir, that carries the owner lock
    of heel's other temporary directories; returns it and the lock's fd,
    held (flock) until release_owned_temp_dir or until this process dies,
    after which sweep_orphaned_temp_dirs removes it.

    The lock file is locked under another name and then renamed, so that a
    sweep never finds it unlocked while its owner lives."""
    path = make_temp_dir(prefix, root, searchable=searchable)
    lock = dir_fd = -1
    try:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        lock = os.open(_LOCK + ".new", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                       dir_fd=dir_fd)
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.rename(_LOCK + ".new", _LOCK, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        if lock >= 0:
            os.close(lock)
        remove_tree(path)
        raise
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)
    return path, lock


def release_owned_temp_dir(path: str, lock: int) -> None:
    """Remove a make_owned_temp_dir directory, then let its lock go."""
    try:
        remove_tree(path, keep_last=_LOCK)
    finally:
        os.close(lock)


def sweep_orphaned_temp_dirs(root: str | None = None, prefix: str = TEMP_PREFIX) -> None:
    """Remove the ``prefix*`` directories in ``root`` (default temp_root())
    that make_owned_temp_dir made for a process that died without removing
    them (SIGKILL, a crash): their lock is free.  A directory without the
    lock file is not heel's to judge, and is left alone.

    Only this user's directories are looked at, and nothing in them is
    followed: a directory in /tmp may have been planted by anyone."""
    base = root or temp_root()
    euid = os.geteuid()
    try:
        entries = list(os.scandir(base))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != euid:
                continue
            dir_fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                # Non-blocking: a FIFO planted there must not hang heel.
                lock = os.open(_LOCK, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            continue  # gone, not ours, or being made: leave it
        try:
            st = os.fstat(lock)
            # Only a lock file heel made: not a FIFO or device, nor a hard
            # link to another directory's lock, which heel would hold a moment.
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != euid:
                continue
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its owner is alive
        finally:
            os.close(lock)
        remove_tree(entry.path, keep_last=_LOCK)


class Session:
    """What an open sandbox owns on the host: its temporary directory (the
    private tmp, and the workdir unless the config names one) and the
    running sandbox.  Used by heel.Sandbox and by the CLI."""

    def __init__(self, config: SandboxConfig, env=None) -> None:
        """``env``: the Environment to plan for; by default the probed one."""
        from ._probe import environment, require

        guard_standard_fds()
        self._finishing = _thread.allocate_lock()  # finish() once, from whichever thread
        why = ""
        if env is None:
            env, why = environment()
        self.degraded = require(env, config, why)
        sweep_orphaned_temp_dirs()
        # Held until close, or until this process dies: then the next
        # sandbox to open removes the directory.
        # Root's sandbox runs as an unprivileged id that must pass through
        # it to the workdir: 0711, and each directory inside is 0700 but the
        # empty mask (idmapped when mounted) or the lock file (0600).
        self.base, self._lock = make_owned_temp_dir(TEMP_PREFIX, searchable=os.geteuid() == 0)
        #: the host's end of the IPC socket (heel.ipc.serve), when the config has a router
        self.ipc: socket.socket | None = None
        #: without namespaces: the proxy's listener on the host's 127.0.0.1
        self._host_listener: socket.socket | None = None
        try:
            tmp = os.path.join(self.base, "tmp")
            shm = os.path.join(self.base, "shm")
            mask = os.path.join(self.base, "empty")
            view = os.path.join(self.base, "view")  # read-only inside; heel makes mount points in it
            mask_file = os.path.join(self.base, "empty-file")
            # Made through an fd of the base, never its name (see make_path_nofollow).
            base_fd = os.open(self.base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                for name, mode in (("tmp", 0o700), ("shm", 0o700), ("empty", 0o555), ("view", 0o700)):
                    os.mkdir(name, mode, dir_fd=base_fd)
                os.close(os.open("empty-file", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o444, dir_fd=base_fd))
                if config.workdir is None:
                    os.mkdir("work", 0o700, dir_fd=base_fd)
            finally:
                os.close(base_fd)
            workdir = os.path.join(self.base, "work") if config.workdir is None else str(config.workdir)
            proxy_port, secret = 0, ""
            if not config.network.denies_everything:
                import secrets

                secret = secrets.token_hex(16)
                if not env.namespaces:
                    # Any local process can reach this one: the secret in the
                    # sandbox's proxy URLs is what the proxy asks for.
                    import socket

                    self._host_listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    self._host_listener.bind(("127.0.0.1", 0))
                    self._host_listener.listen(4096)
                    self._host_listener.setblocking(False)
                    proxy_port = self._host_listener.getsockname()[1]
            plan = build_plan(config, workdir=workdir, host_tmp=tmp, host_shm=shm, host_mask=mask,
                              host_mask_file=mask_file, host_view=view, env=env, init_path=_native.INIT_PATH,
                              proxy_port=proxy_port, proxy_secret=secret)
            ipc_fd = -1
            if config.ipc is not None:
                plan = _prepare_ipc(plan, config.ipc)
                import socket

                self.ipc, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                ipc_fd = theirs.fileno()
            try:
                self.prepared = Prepared(plan, ipc_fd)
            finally:
                if ipc_fd >= 0:
                    theirs.close()
        except BaseException:
            self._remove()
            raise

    @property
    def plan(self) -> SandboxPlan:
        return self.prepared.plan

    @property
    def proxy_listener(self) -> socket.socket | None:
        """Where the proxy accepts the sandbox's connections (None: no network)."""
        return self._host_listener or self.prepared.proxy_listener

    @property
    def proxy_requires_secret(self) -> bool:
        """Whether processes other than the sandbox's can reach the listener."""
        return self._host_listener is not None

    def close(self) -> None:
        self.close_channels()
        self.finish()

    def close_channels(self) -> None:
        """The fast part of close(): the sockets, in the thread that runs trio.
        Not the IPC broker's end: closing it purges what the sandbox left
        queued there, fds too, and whoever drops a file's last reference
        frees it then and there (a 4 GiB memfd: some 0.8 s).  finish(), in
        a thread, closes it (trio is told here: nothing waits on it after)."""
        self.prepared.close_channels()
        if self._host_listener is not None:
            self._host_listener.close()
            self._host_listener = None
        if self.ipc is not None:
            trio = sys.modules.get("trio")  # not imported for it: the CLI's plain runner has none
            if trio is not None:
                try:
                    trio.lowlevel.notify_closing(self.ipc)
                except RuntimeError:
                    pass  # not in a trio run

    def finish(self) -> None:
        """The slow part of close(), which may run in a thread of its own:
        heel-init and every process killed and reaped, the temporary
        directory (with a workdir of any size) removed.  Once: a second
        call waits for the first one's end."""
        with self._finishing:
            try:
                self.prepared.reap()
            finally:
                self._remove()

    def _close_sockets(self) -> None:
        if self._host_listener is not None:
            self._host_listener.close()
            self._host_listener = None
        if self.ipc is not None:
            self.ipc.close()

    def _remove(self) -> None:
        self._close_sockets()
        if self._lock >= 0:
            release_owned_temp_dir(self.base, self._lock)
            self._lock = -1


#: What heel.client needs inside a sandbox, copied there: the standard
#: library does the rest.
_CLIENT_FILES = ("client.py", "_ipc_codec.py", "_minipack.py")

# The launcher and the wrappers are Python scripts run with -S (no
# site-packages): heel.client needs only the standard library and the msgpack
# beside it, and without a shell in between and without site every call
# starts faster.
_LAUNCHER = """#!/usr/bin/env -S python3 -S
\"\"\"heel inside a sandbox: only `heel ipc` is here (see heel.client).\"\"\"
import sys

from heel.cli import main

sys.exit(main())
"""

# heel.cli (and heel.__main__) of the package inside: the launcher's work.  A
# real heel installed in the sandbox (a venv's console script, `python -m
# heel`) imports this package too, since it comes first on PYTHONPATH, so
# `heel ipc` works whichever `heel` the PATH finds first.
_CLI = """\"\"\"heel inside a sandbox: only `heel ipc` is here (see heel.client).\"\"\"
import sys


def main(argv=None):
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] != ["ipc"]:
        sys.stderr.write("heel: inside a sandbox only 'heel ipc NAME [ARGS...]' works\\n")
        return 2
    from heel.client import main as ipc

    return ipc(args[1:])


def console():
    sys.exit(main())
"""

_MAIN = """import sys

from heel.cli import main

sys.exit(main())
"""

_WRAPPER = """#!/usr/bin/env -S python3 -S
\"\"\"{name}: the host's IPC command of that name (heel ipc {name} ARGS...).\"\"\"
import sys

from heel.client import main

sys.exit(main([{name!r}] + sys.argv[1:]))
"""


def _write_files(directory: str, entries: list[tuple[str, bytes, int]]) -> None:
    """Write new files (name, data, mode) in ``directory`` (made if missing),
    neither following a link nor writing into anything already there."""
    dir_fd = open_dir_nofollow(directory, create=True)
    try:
        for name, data, mode in entries:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                         dir_fd=dir_fd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
    finally:
        os.close(dir_fd)


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _prepare_ipc(plan: SandboxPlan, router) -> SandboxPlan:
    """Make heel.client importable and `heel ipc` runnable inside: a small
    package and launchers in the sandbox's private tmp, whatever Python the
    sandbox runs.  Returns the plan with the environment that finds them."""
    import msgpack

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.join(plan.host_tmp, ".heel")
    package = os.path.join(root, "lib", "heel")
    vendor = os.path.join(package, "_vendor", "msgpack")
    files: dict[str, list[tuple[str, bytes, int]]] = {package: [], vendor: [], os.path.join(package, "_vendor"): [],
                                                      os.path.join(root, "bin"): []}
    files[package].append(("__init__.py", b'"""heel inside a sandbox: only heel.client is here."""\n', 0o644))
    files[os.path.join(package, "_vendor")].append(("__init__.py", b"", 0o644))
    for name, text in (("cli.py", _CLI), ("__main__.py", _MAIN)):
        files[package].append((name, text.encode(), 0o644))
    for name in _CLIENT_FILES:
        files[package].append((name, _read_file(os.path.join(here, name)), 0o644))
    # msgpack whole: its C extension serves a sandbox Python of the host's
    # version, and msgpack falls back to its pure-Python modules otherwise.
    source = os.path.dirname(os.path.abspath(msgpack.__file__))
    for name in os.listdir(source):
        if name.endswith((".py", ".so")):
            files[vendor].append((name, _read_file(os.path.join(source, name)), 0o644))
    scripts = {"heel": _LAUNCHER}
    # A wrapper per command, unless its name would shadow something heel
    # itself needs on the PATH.
    scripts.update({name: _WRAPPER.format(name=name) for name in router.names if name != "heel"})
    files[os.path.join(root, "bin")] += [(name, text.encode(), 0o755) for name, text in scripts.items()]
    # The private tmp is the sandbox's to write, and (where $TMPDIR's place
    # is not covered) another sandbox's of the same user too: nothing is
    # followed, and nothing that is there already is written into.
    for directory, entries in files.items():
        try:
            _write_files(directory, entries)
        except OSError as exc:  # something else wrote there meanwhile
            raise SpawnError("ipc", exc.errno or errno.EIO) from None
    inside = os.path.join(plan.tmp, ".heel")
    env = dict(plan.env)
    env["HEEL_IPC_FD"] = str(lib.HEEL_IPC_FD)
    env["HEEL_IPC_MAX_MESSAGE"] = str(router.max_message_size)  # the client's limit too
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(inside, "lib"), env.get("PYTHONPATH")]))
    # At the end of PATH: the sandbox's own programs win over a wrapper's name.
    env["PATH"] = env["PATH"] + os.pathsep + os.path.join(inside, "bin")
    return plan._replace(env=env)
