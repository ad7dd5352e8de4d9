"""``SecurityConfig(allow_gpu=...)``: the GPU's device nodes are open (ioctl
included) when it is on, and closed when it is off, at every level.

This machine has no GPU, so the test makes a stand-in: a character device
named like NVIDIA's (``/dev/nvidia-heeltest<pid>``, matched by the
``/dev/nvidia*`` grant) with the numbers of /dev/null (1:3).  The kernel
treats it as any device node: Landlock decides whether it may be opened and
whether ioctl reaches the driver.  An ioctl that reaches the null driver
fails with ENOTTY (it is not a terminal); one Landlock stops fails with
EACCES, so the two are told apart.  /dev/null itself, granted at every
level, is the control.  Making a device node needs root (CAP_MKNOD); the
test skips otherwise.  A check on a real GPU (nvidia-smi, a CUDA call) needs
a machine with one: see the README.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest

import heel
from helpers import explain, py

LEVELS = [heel.IsolationLevel.STRICT, heel.IsolationLevel.DEFAULT, heel.IsolationLevel.PERMISSIVE]

ATTEMPT = """
import errno, fcntl, os, sys, termios

def attempt(path):
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        return "open " + errno.errorcode[exc.errno]
    try:
        os.write(fd, b"x")
        try:
            fcntl.ioctl(fd, termios.TCGETS, bytes(64))
        except OSError as exc:
            return "ioctl " + errno.errorcode[exc.errno]
        return "ioctl ok"
    finally:
        os.close(fd)

def read_sys():
    try:
        with open("/sys/devices/system/cpu/online") as f:
            f.read()
        return "sys ok"
    except OSError as exc:
        return "sys " + errno.errorcode[exc.errno]

print(attempt(sys.argv[1]), "|", attempt("/dev/null"), "|", read_sys())
"""


def _report(out) -> list[str]:
    assert out.returncode == 0, explain(out)
    return [part.strip() for part in out.stdout.decode().split("|")]


@pytest.mark.parametrize("level", LEVELS, ids=lambda lv: lv.value)
async def test_gpu_nodes_are_granted_with_allow_gpu(level, gpu_node):
    config = heel.SandboxConfig(level=level, security=heel.SecurityConfig(allow_gpu=True))
    async with heel.Sandbox(config) as sb:
        node, null, sysfs = _report(await py(sb, ATTEMPT, gpu_node))
    # Opened and written, and the ioctl reached the driver (which is no tty).
    assert node == "ioctl ENOTTY", node
    assert null == "ioctl ENOTTY", null
    assert sysfs == "sys ok"  # what drivers read under /sys, at STRICT too


@pytest.mark.parametrize("level", LEVELS, ids=lambda lv: lv.value)
async def test_gpu_nodes_are_closed_without_allow_gpu(level, gpu_node):
    config = heel.SandboxConfig(level=level, security=heel.SecurityConfig(allow_gpu=False))
    async with heel.Sandbox(config) as sb:
        node, null, sysfs = _report(await py(sb, ATTEMPT, gpu_node))
    assert node == f"open {errno.errorcode[errno.EACCES]}", node
    assert null == "ioctl ENOTTY", null  # the control: ordinary device nodes still work
    if level is heel.IsolationLevel.STRICT:
        # /sys is opened at STRICT only for a GPU; without one it is
        # covered (ENOENT), or, with no mount view, refused by Landlock.
        assert sysfs in ("sys ENOENT", "sys EACCES"), sysfs


async def test_strict_opens_sys_only_where_there_is_a_gpu():
    """allow_gpu is on by default, and at STRICT it is what opens /sys (which
    tells of the host's hardware: MAC addresses, serial numbers).  On a host
    without GPU nodes there is nothing for a driver to find, so /sys stays
    closed; the test above, with a stand-in node, is the control."""
    from heel._plan import GPU_DEVICES, _existing

    if _existing(GPU_DEVICES):
        pytest.skip("this host has GPU device nodes")
    config = heel.SandboxConfig(level=heel.IsolationLevel.STRICT)
    assert config.security.allow_gpu
    async with heel.Sandbox(config) as sb:
        node, null, sysfs = _report(await py(sb, ATTEMPT, "/dev/nvidia-none"))
    assert node == f"open {errno.errorcode[errno.ENOENT]}", node
    assert null == "ioctl ENOTTY", null
    assert sysfs in ("sys ENOENT", "sys EACCES"), sysfs


#: One thread names another by writing /proc/self/task/TID/comm, as CUDA's
#: cuInit does (fopen "w": O_CREAT|O_TRUNC); then the kernel's own files of
#: /proc are opened for writing (never written): sysctls (shmmax is the
#: sandbox's own IPC namespace's, which its root owns), the PSI trigger
#: files (mode 0666; a trigger is a host-wide poll), sysrq.  Prints "named NAME" or
#: "name ERRNO", then what the kernel's files gave.
NAME_A_THREAD = """
import errno, os, threading
ready, done, tids = threading.Event(), threading.Event(), []
def worker():
    tids.append(threading.get_native_id())
    ready.set()
    done.wait(10)
thread = threading.Thread(target=worker)
thread.start()
ready.wait(10)
path = f"/proc/self/task/{tids[0]}/comm"
try:
    with open(path, "w") as f:
        f.write("heel-named")
    print("named", open(path).read().strip())
except OSError as exc:
    print("name", errno.errorcode[exc.errno])
done.set()
thread.join()
kernel = []
for path in ("/proc/sys/kernel/hostname", "/proc/sys/vm/drop_caches", "/proc/sysrq-trigger",
             "/proc/pressure/cpu", "/proc/sys/kernel/shmmax"):
    try:
        os.close(os.open(path, os.O_WRONLY))
        kernel.append("OPENED " + path)
    except OSError as exc:
        kernel.append("refused")
print(" ".join(kernel))
"""

#: Every other pid of the sandbox, tried for writing: comm and oom_score_adj
#: (which any process of the same uid may raise) are opened, never written.
WRITE_OTHERS = """
import os
mine = {os.getpid(), os.getppid()}
reached = []
for pid in range(1, 200):
    if pid in mine:
        continue
    for name in ("comm", "oom_score_adj"):
        try:
            os.close(os.open(f"/proc/{pid}/{name}", os.O_WRONLY))
            reached.append((pid, name))
        except OSError:
            pass
print("reached", reached)
"""


@pytest.mark.parametrize("level", LEVELS, ids=lambda lv: lv.value)
async def test_a_thread_can_name_another_where_there_is_a_gpu(level, gpu_node):
    """CUDA names its threads through /proc (cuInit fails with 304 if it
    cannot): with a GPU, the sandbox's own /proc is writable, except for
    root's sandboxes at PERMISSIVE, which run as the host's uid 0 (README).
    The kernel's files there stay closed either way, and so do the
    processes of another command (see the next test)."""
    config = heel.SandboxConfig(level=level, security=heel.SecurityConfig(allow_gpu=True))
    async with heel.Sandbox(config) as sb:
        out = await py(sb, NAME_A_THREAD)
    assert out.returncode == 0, explain(out)
    named, kernel = out.stdout.decode().splitlines()
    if level is heel.IsolationLevel.PERMISSIVE and os.geteuid() == 0:
        assert named == "name EACCES", explain(out)
    else:
        assert named == "named heel-named", explain(out)
    assert kernel == " ".join(["refused"] * 5), explain(out)


@pytest.mark.parametrize("level", LEVELS, ids=lambda lv: lv.value)
async def test_proc_stays_read_only_without_allow_gpu(level, gpu_node):
    config = heel.SandboxConfig(level=level, security=heel.SecurityConfig(allow_gpu=False))
    async with heel.Sandbox(config) as sb:
        out = await py(sb, NAME_A_THREAD)
    assert out.returncode == 0, explain(out)
    assert out.stdout.decode().splitlines() == ["name EACCES", " ".join(["refused"] * 5)], explain(out)


async def test_proc_stays_read_only_where_there_is_no_gpu():
    from heel._plan import GPU_DEVICES, _existing

    if _existing(GPU_DEVICES):
        pytest.skip("this host has GPU device nodes")
    async with heel.Sandbox(heel.SandboxConfig()) as sb:
        out = await py(sb, NAME_A_THREAD)
    assert out.returncode == 0, explain(out)
    assert out.stdout.decode().splitlines() == ["name EACCES", " ".join(["refused"] * 5)], explain(out)


@pytest.mark.parametrize("level", LEVELS, ids=lambda lv: lv.value)
async def test_a_writable_proc_reaches_no_other_command(level, gpu_node):
    """With the GPU's writable /proc, another command of the same sandbox,
    its init and heel-init are still out of reach (not even listed).
    Control: the command names its own thread (previous tests)."""
    import trio

    config = heel.SandboxConfig(level=level, security=heel.SecurityConfig(allow_gpu=True))
    async with heel.Sandbox(config) as sb:
        victim = await sb.command("sleep").arg("30.75").spawn()
        async with victim:
            await trio.sleep(0.2)
            out = await py(sb, WRITE_OTHERS)
            victim.kill()
    assert out.returncode == 0, explain(out)
    assert out.stdout.decode().strip() == "reached []", explain(out)


#: Unix sockets by type: a seqpacket one bound to an abstract name, listened
#: on and connected to (what CUDA does), then a stream and a datagram one;
#: then a connection to the host's listener named in argv[1].
UNIX_SOCKETS = """
import errno, os, socket, sys
def attempt(kind):
    try:
        s = socket.socket(socket.AF_UNIX, kind)
    except OSError as exc:
        return errno.errorcode[exc.errno]
    with s:
        if kind == socket.SOCK_SEQPACKET:
            s.bind("\\0heel-gpu-own-%d" % os.getpid())
            s.listen(1)
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c:
                c.connect(s.getsockname())
                c.send(b"x")
                conn, _ = s.accept()
                assert conn.recv(1) == b"x"
        return "ok"
def reach(address):
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c:
            c.connect(address)
        return "CONNECTED"
    except OSError as exc:
        return errno.errorcode[exc.errno]
print(attempt(socket.SOCK_SEQPACKET), attempt(socket.SOCK_STREAM), attempt(socket.SOCK_DGRAM),
      reach(sys.argv[1].replace("@", "\\0", 1)))
"""


def _seqpacket_listener(address: str, mode: int | None = None):
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(address)
    if mode is not None:
        os.chmod(address, mode)
    s.listen(4)
    return s


@pytest.mark.parametrize("level", LEVELS, ids=lambda lv: lv.value)
async def test_a_gpu_gets_seqpacket_unix_sockets_of_its_own(level, gpu_node):
    """CUDA listens on an abstract seqpacket socket (cuInit fails with 304
    without it): with a GPU, seqpacket unix sockets are allowed, in a network
    namespace of the sandbox's own.  Stream and datagram ones, what host
    daemons listen on, stay refused, and the host's abstract sockets stay
    out of reach (another namespace; Landlock's scope too)."""
    name = f"heel-gpu-host-{os.getpid()}"
    config = heel.SandboxConfig(level=level, security=heel.SecurityConfig(allow_gpu=True))
    with _seqpacket_listener("\0" + name):
        async with heel.Sandbox(config) as sb:
            out = await py(sb, UNIX_SOCKETS, "@" + name)
    assert out.returncode == 0, explain(out)
    if level is heel.IsolationLevel.PERMISSIVE and os.geteuid() == 0:
        # The host's uid 0 (root's 0600 listeners): no GPU grants (README).
        assert out.stdout.decode().split() == ["EPERM"] * 4, explain(out)
        return
    own, stream, dgram, host = out.stdout.decode().split()
    assert (own, stream, dgram) == ("ok", "EPERM", "EPERM"), explain(out)
    assert host in ("ECONNREFUSED", "EPERM"), explain(out)


@pytest.mark.parametrize("level", LEVELS, ids=lambda lv: lv.value)
async def test_no_unix_sockets_without_allow_gpu(level, gpu_node):
    config = heel.SandboxConfig(level=level, security=heel.SecurityConfig(allow_gpu=False))
    async with heel.Sandbox(config) as sb:
        out = await py(sb, UNIX_SOCKETS, "@heel-none")
    assert out.returncode == 0, explain(out)
    assert out.stdout.decode().split() == ["EPERM"] * 4, explain(out)


@pytest.mark.parametrize("level", [heel.IsolationLevel.DEFAULT, heel.IsolationLevel.PERMISSIVE],
                         ids=lambda lv: lv.value)
async def test_a_gpu_sandbox_reaches_a_hosts_seqpacket_socket_only_by_its_mode(level, gpu_node, outside_dir):
    """The documented limit: a seqpacket socket can connect to a host's
    seqpacket listener whose path it can name and whose mode lets its uid
    write.  Such listeners are rare, and root's (udev's control socket,
    systemd-coredump) are 0600: root's sandboxes run as another uid, and
    at PERMISSIVE, where they run as the host's uid 0, get no seqpacket
    sockets at all."""
    private = os.path.join(outside_dir, "private.sock")
    public = os.path.join(outside_dir, "public.sock")
    config = heel.SandboxConfig(level=level, security=heel.SecurityConfig(allow_gpu=True))
    with _seqpacket_listener(private, 0o600), _seqpacket_listener(public, 0o666):
        async with heel.Sandbox(config) as sb:
            closed = await py(sb, UNIX_SOCKETS, private)
            reached = await py(sb, UNIX_SOCKETS, public)
    if level is heel.IsolationLevel.PERMISSIVE:
        assert closed.stdout.decode().split() == ["EPERM"] * 4, explain(closed)
        assert reached.stdout.decode().split() == ["EPERM"] * 4, explain(reached)
    else:
        assert closed.stdout.decode().split()[-1] == "EACCES", explain(closed)
        assert reached.stdout.decode().split()[-1] == "CONNECTED", explain(reached)


#: Run from a mount namespace of the test's own, whose /proc the host side
#: changes first (argv[1]): "subset", a subset=pid procfs over /proc, as
#: under systemd's ProcSubset=pid, where the host's view of /proc lists no
#: kernel entries; or "submount", a tmpfs with a marker file mounted on
#: /proc/sys/fs/binfmt_misc, as binfmt_misc is on many hosts.  Then a GPU
#: sandbox opens the PSI trigger file for writing, lists binfmt_misc, and
#: names a thread (the control).
UNUSUAL_HOST_PROC = """
import os, subprocess, sys, trio, heel
if sys.argv[1] == "subset":
    subprocess.run(["mount", "-t", "proc", "-o", "subset=pid", "proc", "/proc"], check=True)
else:
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/proc/sys/fs/binfmt_misc"], check=True)
    open("/proc/sys/fs/binfmt_misc/heel-host-marker", "w").close()
PROBE = '''
import errno, os, threading
def attempt(path):
    try:
        os.close(os.open(path, os.O_WRONLY))
        return "OPENED"
    except OSError as exc:
        return errno.errorcode[exc.errno]
path = "/proc/sys/fs/binfmt_misc"
listed = ",".join(sorted(os.listdir(path))) if os.path.isdir(path) else "none"
stop = threading.Event()
thread = threading.Thread(target=stop.wait)
thread.start()
named = attempt(f"/proc/self/task/{thread.native_id}/comm")
stop.set()
thread.join()
print(attempt("/proc/pressure/cpu"), listed or "empty", named)
'''
async def main():
    config = heel.SandboxConfig(security=heel.SecurityConfig(allow_gpu=True))
    async with heel.Sandbox(config) as sb:
        out = await sb.command("python3").args(["-c", PROBE]).timeout(30).output()
    sys.stdout.write(out.stdout.decode())
    sys.stderr.write(out.stderr.decode())
trio.run(main)
"""


@pytest.mark.parametrize("host_proc", ["subset", "submount"])
def test_the_kernel_entries_of_a_writable_proc_stay_closed_whatever_the_hosts_proc(host_proc, gpu_node):
    """What is made read-only in a GPU sandbox's writable /proc is read from
    the procfs the sandbox mounts, not from the host's view of /proc: a host
    whose /proc is subset=pid (no kernel entries to list) still gets the PSI
    trigger files closed; and each entry is cloned alone from that procfs,
    so a host's submount under its own /proc (binfmt_misc) does not come
    in.  Control: the sandbox still names its threads."""
    import shutil
    import subprocess
    import sys

    if not shutil.which("unshare") or not os.path.exists("/proc/pressure/cpu"):
        pytest.skip("needs unshare(1) and PSI (/proc/pressure)")
    if host_proc == "submount" and not os.path.isdir("/proc/sys/fs/binfmt_misc"):
        pytest.skip("no /proc/sys/fs/binfmt_misc here")
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c",
                             UNUSUAL_HOST_PROC, host_proc], capture_output=True, timeout=120)
    if host_proc == "subset" and b"mount" in result.stderr and result.returncode != 0:
        pytest.skip(f"no subset=pid procfs here: {result.stderr[-300:]!r}")
    assert result.returncode == 0, explain(result)
    assert result.stdout.decode().split() == ["EROFS", "empty", "OPENED"], explain(result)


async def test_a_non_nvidia_gpu_node_is_granted_without_cudas_extras():
    """/dev/kfd (AMD) and /dev/dri are granted like NVIDIA's nodes, but the
    two grants CUDA needs (a writable /proc, seqpacket sockets) come only
    with an NVIDIA node: a cloud VM's display adapter asks for neither."""
    from heel._plan import GPU_DEVICES, _existing

    if os.geteuid() != 0:
        pytest.skip("making a stand-in device node needs root")
    if _existing(GPU_DEVICES):
        pytest.skip("this host has GPU device nodes")
    os.mknod("/dev/kfd", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    try:
        os.chmod("/dev/kfd", 0o666)
        async with heel.Sandbox(heel.SandboxConfig()) as sb:
            node = _report(await py(sb, ATTEMPT, "/dev/kfd"))[0]
            named = await py(sb, NAME_A_THREAD)
            sockets = await py(sb, UNIX_SOCKETS, "@heel-none")
    finally:
        os.unlink("/dev/kfd")
    assert node == "ioctl ENOTTY", node  # granted, ioctl included
    assert named.stdout.decode().splitlines()[0] == "name EACCES", explain(named)
    assert sockets.stdout.decode().split() == ["EPERM"] * 4, explain(sockets)
