"""Claims of the README's security model that no other test checked (r35's
audit).  Each attempts the thing for real in a real sandbox, next to a
control showing that the allowed neighbour works; every command is bounded
in time and every process a test starts is killed before it ends."""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil

import pytest
import trio

import heel
from helpers import explain, host_py, py, sh

STRICT, DEFAULT, PERMISSIVE = heel.IsolationLevel.STRICT, heel.IsolationLevel.DEFAULT, heel.IsolationLevel.PERMISSIVE
LEVELS = [STRICT, DEFAULT, PERMISSIVE]


def _namespaces() -> bool:
    return heel.probe().user_namespaces


# ---- Landlock: "the sandbox's, the init's and the command's leave a command 13 of its own" -----

LANDLOCK_STACK = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
class Attr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]
stacked = 0
while stacked < 20:
    attr = Attr(1, 0, 0)  # LANDLOCK_ACCESS_FS_EXECUTE: any handled right makes a domain
    fd = libc.syscall(444, ctypes.byref(attr), ctypes.sizeof(attr), 0)  # landlock_create_ruleset
    if fd < 0:
        print("create", ctypes.get_errno()); break
    rc = libc.syscall(446, fd, 0)  # landlock_restrict_self
    err = ctypes.get_errno()
    os.close(fd)
    if rc != 0:
        print("refused", err); break
    stacked += 1
print("stacked", stacked)
"""


@pytest.mark.parametrize("level", LEVELS)
async def test_a_command_may_stack_13_landlock_domains_of_its_own(level):
    """README (heel-init row): Landlock stacks at most 16 domains, and the
    sandbox's, the init's and the command's leave a command 13.  The 14th
    is refused with E2BIG; the first 13 (the control) work."""
    if heel.probe().landlock_abi < 6:
        pytest.skip("the init's domain of its own needs Landlock ABI 6")
    async with heel.Sandbox(heel.SandboxConfig(level=level)) as sb:
        out = await py(sb, LANDLOCK_STACK)
    assert out.returncode == 0, explain(out)
    assert out.stdout.decode().split() == ["refused", str(errno.E2BIG), "stacked", "13"], explain(out)


# ---- capabilities: "locks the securebits (NOROOT)" ----------------------------------------------

SECUREBITS = r"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
bits = libc.prctl(27, 0, 0, 0, 0)  # PR_GET_SECUREBITS
cleared = libc.prctl(28, 0, 0, 0, 0)  # PR_SET_SECUREBITS to nothing
print(bits, cleared, ctypes.get_errno())
"""

#: SECBIT_NOROOT | SECBIT_NOROOT_LOCKED
NOROOT_LOCKED = 0x3


@pytest.mark.parametrize("level", LEVELS)
async def test_the_securebits_are_locked_with_noroot(level):
    """README (capabilities row): with namespaces (or as root) the
    trampoline locks the securebits with NOROOT, so that uid 0 inside can
    never gain capabilities by an execve; clearing them fails.  Control:
    the bits are read inside, and a host process of the same user has them
    unlocked (where it has)."""
    if not _namespaces() and os.geteuid() != 0:
        pytest.skip("an unprivileged caller without user namespaces may not lock them")
    async with heel.Sandbox(heel.SandboxConfig(level=level)) as sb:
        out = await py(sb, SECUREBITS)
    bits, cleared, err = (int(word) for word in out.stdout.split())
    assert bits >= 0 and bits & NOROOT_LOCKED == NOROOT_LOCKED, explain(out)
    assert cleared == -1 and err == errno.EPERM, explain(out)
    host = host_py(SECUREBITS)
    host_bits = int(host.stdout.split()[0])
    assert host_bits >= 0, explain(host)
    if host_bits & NOROOT_LOCKED == 0:  # the host's own state is not the sandbox's
        assert host_bits != bits, (host_bits, bits)


# ---- rlimits and the limits: POSIX message queues ------------------------------------------------

MQUEUE = r"""
import ctypes, os, resource, sys
libc = ctypes.CDLL(None, use_errno=True)
name = sys.argv[1].encode()
fd = libc.mq_open(name, os.O_CREAT | os.O_RDWR | os.O_EXCL, 0o600, None)
err = ctypes.get_errno()
if fd >= 0:
    libc.mq_unlink(name)
print(fd >= 0, err if fd < 0 else 0, resource.getrlimit(resource.RLIMIT_MSGQUEUE)[0])
"""


@pytest.mark.parametrize("level", LEVELS)
async def test_posix_message_queues_are_refused_and_bounded(level):
    """README (limits: "256 KiB of message queues ... a backstop, since
    Landlock refuses mq_open inside").  mq_open fails with EACCES, and
    RLIMIT_MSGQUEUE is 256 KiB (or the host's hard limit, when lower).
    Control: the same mq_open on the host works."""
    if not _namespaces():
        pytest.skip("without user namespaces heel sets no message-queue share")
    name = f"/heel-r35-{os.getpid()}"
    host = host_py(MQUEUE, name)
    if host.stdout.split()[:1] != [b"True"]:
        pytest.skip(f"mq_open does not work on this host either: {host.stdout!r}")
    async with heel.Sandbox(heel.SandboxConfig(level=level)) as sb:
        out = await py(sb, MQUEUE, name)
    opened, err, limit = out.stdout.split()
    assert opened == b"False" and int(err) == errno.EACCES, explain(out)
    hard = resource.getrlimit(resource.RLIMIT_MSGQUEUE)[1]
    expected = 256 * 1024 if hard < 0 else min(256 * 1024, hard)
    assert int(limit) == expected, explain(out)


# ---- seccomp: prlimit64 sets only the caller's own limits --------------------------------------

PRLIMIT_TOOL = r"""
sleep 30 & child=$!
prlimit --pid $child --nofile=100:100 2>/dev/null; echo "child $?"
prlimit --pid $$ --nofile=100:100 2>/dev/null; echo "self $?"
echo "cmd $(prlimit --nofile=100:100 sh -c 'ulimit -n')"
echo "ulimit $(sh -c 'ulimit -n 50 && ulimit -n')"
kill $child
"""


async def test_prlimit_pid_fails_and_prlimit_cmd_works():
    """README (seccomp row): "`prlimit --pid N` inside fails, for the
    command's own children and its own pid too (`prlimit CMD`, and
    `setrlimit`, work)", with util-linux's own prlimit tool."""
    if shutil.which("prlimit") is None:
        pytest.skip("no prlimit here")
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        out = await sh(sb, PRLIMIT_TOOL)
    lines = out.stdout.decode().splitlines()
    assert lines == ["child 1", "self 1", "cmd 100", "ulimit 50"], explain(out)


# ---- seccomp: scheduling calls without a pid namespace ------------------------------------------

SCHEDULING_TOOLS = r"""
sleep 30 & child=$!
renice -n 5 -p $child >/dev/null 2>&1; echo "renice $?"
taskset -p 1 $child >/dev/null 2>&1; echo "taskset $?"
echo "nice $(nice -n 3 sh -c 'cut -d" " -f19 /proc/self/stat')"
python3 -c '
import ctypes, os, threading
os.sched_setaffinity(0, os.sched_getaffinity(0))
libc = ctypes.CDLL(None, use_errno=True)
mask = ctypes.c_ulong(1)
rc = libc.pthread_setaffinity_np(ctypes.c_ulong(threading.get_ident()), ctypes.sizeof(mask), ctypes.byref(mask))
print("affinity0 ok")
print("pthread", rc)
'
kill $child
"""


def _need_tools():
    for tool in ("renice", "taskset", "nice"):
        if shutil.which(tool) is None:
            pytest.skip(f"no {tool} here")


async def test_renice_and_taskset_fail_without_a_pid_namespace(no_namespaces):
    """README (seccomp row): without a pid namespace "`nice CMD` and
    `os.sched_setaffinity(0, ...)` work; `renice -p`, `taskset -p` and
    `pthread_setaffinity_np()` (which names a thread by its tid) fail with
    EPERM there", even on the command's own child."""
    _need_tools()
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT, best_effort=True)) as sb:
        assert "user namespaces" in sb.degraded
        out = await sh(sb, SCHEDULING_TOOLS)
    lines = out.stdout.decode().splitlines()
    assert lines == ["renice 1", "taskset 1", "nice 3", "affinity0 ok", f"pthread {errno.EPERM}"], explain(out)


async def test_renice_and_taskset_reach_the_sandboxs_own_processes_in_a_pid_namespace():
    """README (seccomp row): "In a pid namespace these calls reach the
    sandbox's own processes only, and are left as they are": the same
    script as above, where each of them works."""
    _need_tools()
    if not _namespaces():
        pytest.skip("needs a pid namespace")
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        out = await sh(sb, SCHEDULING_TOOLS)
    lines = out.stdout.decode().splitlines()
    assert lines == ["renice 0", "taskset 0", "nice 3", "affinity0 ok", "pthread 0"], explain(out)


# ---- the limits: "No setuid/setgid bits at all" -------------------------------------------------

@pytest.fixture
def shared_dir(host_dir):
    """conftest's host_dir, as a string: every uid may use it (root's sandboxes run as another uid)."""
    return str(host_dir)


async def test_chmod_775_of_a_setgid_directory_is_refused(shared_dir):
    """README (limits): "That includes `chmod 775` on a directory that
    already carries the setgid bit: GNU chmod keeps the bit".  Controls: the
    same chmod of a plain directory works, and so does clearing the bit."""
    sgid, plain = os.path.join(shared_dir, "sgid"), os.path.join(shared_dir, "plain")
    os.mkdir(sgid)
    os.mkdir(plain)
    os.chmod(sgid, 0o2777)
    os.chmod(plain, 0o777)
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT, writable=[shared_dir])) as sb:
        out = await sh(sb, f"cd {shared_dir}; chmod 775 sgid; echo sgid $?; chmod 775 plain; echo plain $?; "
                           "chmod g-s sgid; echo clear $?")
    assert out.stdout.decode().split() == ["sgid", "1", "plain", "0", "clear", "0"], explain(out)
    assert b"Operation not permitted" in out.stderr, explain(out)
    assert os.stat(plain).st_mode & 0o7777 == 0o775
    assert os.stat(sgid).st_mode & 0o7777 == 0o777  # only the clearing went through


# ---- the limits: the process budget and each command's init -------------------------------------

THREADS = r"""
import threading
threading.stack_size(65536)
stop = threading.Event()
started = 1  # this thread
try:
    while started < 10000:
        threading.Thread(target=stop.wait, daemon=True).start()
        started += 1
except RuntimeError:
    pass
stop.set()
print(started)
"""


async def test_each_command_running_at_once_takes_one_more_of_the_process_budget():
    """README (rlimits row and limits): `processes` is counted in the
    sandbox's user namespace for its commands together, heel-init and the
    command's init aside; each further command running at once costs its
    own process and one more for its init.  A command alone reaches the
    budget (the control); beside a running `sleep` it gets two fewer."""
    if not _namespaces():
        pytest.skip("the count is the sandbox's own only with a user namespace")
    limits = heel.ResourceLimits(processes=40)
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT, limits=limits)) as sb:
        alone = await py(sb, THREADS)
        async with await sb.command("sleep").arg("30").spawn() as other:
            beside = await py(sb, THREADS)
            other.kill()
    assert int(alone.stdout) == 40, explain(alone)
    assert int(beside.stdout) == 38, explain(beside)


# ---- the limits: "They share one IPC socket (fd 3)" ---------------------------------------------

async def test_a_command_that_shuts_down_fd_3_ends_ipc_for_the_later_ones():
    """README (limits: "Commands of one sandbox share it"): the IPC socket
    is fd 3 of every command, and a shutdown() of it ends IPC for the
    commands after it.  Control: a call before it works."""
    router = heel.IpcRouter()

    @router.command("ping")
    async def ping() -> str:
        return "pong"

    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT, ipc=router)) as sb:
        before = await sh(sb, "readlink /proc/self/fd/3; heel ipc ping")
        cut = await py(sb, "import socket; socket.socket(fileno=3).shutdown(socket.SHUT_RDWR); print('shut')")
        with trio.fail_after(30):
            after = await sh(sb, "heel ipc ping")
    assert before.returncode == 0 and re.match(rb"socket:\[\d+\]\n.*pong", before.stdout, re.S), explain(before)
    assert cut.stdout == b"shut\n", explain(cut)
    assert after.returncode != 0 and b"pong" not in after.stdout, explain(after)


# ---- seccomp: personality changes; Landlock: /proc/self/attr ------------------------------------

PERSONALITY_AND_ATTR = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
query = libc.personality(0xffffffff)
changed = libc.personality(0x0040000)  # ADDR_NO_RANDOMIZE, as `setarch -R` asks
print("personality", query >= 0, changed, ctypes.get_errno())
for name in ("current", "exec"):
    path = "/proc/self/attr/" + name
    try:
        os.close(os.open(path, os.O_RDONLY))
        readable = "ok"
    except OSError as exc:
        readable = exc.errno
    try:
        os.close(os.open(path, os.O_WRONLY))
        writable = "ok"
    except OSError as exc:
        writable = exc.errno
    print(name, readable, writable)
"""


@pytest.mark.parametrize("level", LEVELS)
async def test_personality_changes_and_proc_attr_writes_are_refused(level):
    """README (seccomp row): personality changes are refused ("and
    `lsm_set_self_attr` is refused, as Landlock refuses writes to
    /proc/self/attr").  Controls: the personality query works, and the same
    attr files open for reading."""
    config = heel.SandboxConfig(level=level, security=heel.SecurityConfig(allow_gpu=False))
    async with heel.Sandbox(config) as sb:
        out = await py(sb, PERSONALITY_AND_ATTR)
    lines = out.stdout.decode().splitlines()
    assert lines[0] == f"personality True -1 {errno.EPERM}", explain(out)
    assert lines[1:] == [f"current ok {errno.EACCES}", f"exec ok {errno.EACCES}"], explain(out)


# ---- the level table: PERMISSIVE writes beside a protected place --------------------------------

async def test_permissive_makes_no_new_entry_beside_a_protected_place(shared_dir, monkeypatch):
    """README (level table): PERMISSIVE writes everywhere but /dev, /proc,
    /sys and the protected places, except that a directory holding a
    protected place is not granted itself (only its other entries are), so
    nothing new can be made directly in it (`/` and `/etc`, for root).
    Here the protected place is a $HOME made for the test.  Controls: an
    existing file beside the home is written, and a file is made in a
    directory beside it."""
    home = os.path.join(shared_dir, "home")
    sub = os.path.join(shared_dir, "sub")
    existing = os.path.join(shared_dir, "existing")
    for path in (home, sub):
        os.mkdir(path)
        os.chmod(path, 0o777)
    with open(existing, "w") as f:
        f.write("before\n")
    os.chmod(existing, 0o666)
    monkeypatch.setenv("HOME", home)
    async with heel.Sandbox(heel.SandboxConfig(level=PERMISSIVE, best_effort=True)) as sb:
        out = await sh(sb, f"cd {shared_dir}; touch new; echo new $?; touch sub/made; echo sub $?; "
                           "echo after >> existing; echo existing $?; touch home/x; echo home $?")
    assert out.stdout.decode().split() == ["new", "1", "sub", "0", "existing", "0", "home", "1"], explain(out)
    assert not os.path.exists(os.path.join(shared_dir, "new"))
    assert not os.path.exists(os.path.join(home, "x"))
    assert os.path.exists(os.path.join(sub, "made"))
    assert open(existing).read() == "before\nafter\n"
