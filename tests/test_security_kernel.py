"""Kernel attack surface, attacked for real from inside a sandbox.

Each probe is a small python3 script (ctypes for raw system calls) that
prints ``<name> ok`` or ``<name> errno <n>``.  The same probe run on the host,
unsandboxed, is the control where the host allows the operation: then the
sandbox's refusal is the sandbox's doing.
"""

from __future__ import annotations

import errno
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import trio

import heel
from helpers import compile_c, explain, host_py, py, sh

DEFAULT = heel.IsolationLevel.DEFAULT
STRICT = heel.IsolationLevel.STRICT
PERMISSIVE = heel.IsolationLevel.PERMISSIVE

PRELUDE = """
import ctypes, errno, os, signal, socket, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
X86 = os.uname().machine == 'x86_64'
NR = dict(
    ptrace=101 if X86 else 117,
    process_vm_readv=310 if X86 else 270,
    mount=165 if X86 else 40,
    unshare=272 if X86 else 97,
    clone=56 if X86 else 220,
    io_uring_setup=425,
    bpf=321 if X86 else 280,
    keyctl=250 if X86 else 219,
    add_key=248 if X86 else 217,
    perf_event_open=298 if X86 else 241,
    userfaultfd=323 if X86 else 282,
    setns=308 if X86 else 268,
    getpid=39 if X86 else 172,
    lsm_set_self_attr=460,
)

def sys_call(name, *args):
    ctypes.set_errno(0)
    rc = libc.syscall(ctypes.c_long(NR[name]), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    return rc, ctypes.get_errno()

def report(name, rc, err):
    print(name, 'ok' if rc >= 0 else f'errno {err}', flush=True)

def forked_sleeper():
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    return pid
"""

PROBES = {
    # LSM_ATTR_CURRENT without a context: the host answers EINVAL or EFAULT.
    "lsm_set_self_attr": """
rc, err = sys_call('lsm_set_self_attr', 100, 0, 0, 0)
report('lsm_set_self_attr', rc, err)
""",
    "ptrace_traceme": """
pid = os.fork()
if pid == 0:
    rc, err = sys_call('ptrace', 0, 0, 0, 0)  # PTRACE_TRACEME
    os._exit(0 if rc == 0 else err)
_, status = os.waitpid(pid, 0)
code = os.waitstatus_to_exitcode(status)
report('ptrace_traceme', 0 if code == 0 else -1, code)
""",
    "ptrace_attach": """
child = forked_sleeper()
rc, err = sys_call('ptrace', 16, child, 0, 0)  # PTRACE_ATTACH to our own child
if rc == 0:
    os.waitpid(child, 0)
os.kill(child, signal.SIGKILL); os.waitpid(child, 0)
report('ptrace_attach', rc, err)
""",
    "ptrace_seize_exec_child": """
import subprocess
other = subprocess.Popen(['sleep', '30'])  # another program of the same sandbox
time.sleep(0.1)
rc, err = sys_call('ptrace', 0x4206, other.pid, 0, 0)  # PTRACE_SEIZE
other.kill(); other.wait()
report('ptrace_seize_exec_child', rc, err)
""",
    # The parent: heel-init inside a sandbox (no host control: on the host
    # the parent is the test runner itself).
    "ptrace_seize_parent": """
rc, err = sys_call('ptrace', 0x4206, os.getppid(), 0, 0)  # PTRACE_SEIZE
report('ptrace_seize_parent', rc, err)
""",
    "process_vm_readv": """
secret = ctypes.create_string_buffer(b'heel-child-memory', 64)
child = forked_sleeper()   # same address space layout: the buffer is at the same place
local = ctypes.create_string_buffer(64)
class iovec(ctypes.Structure):
    _fields_ = [('base', ctypes.c_void_p), ('len', ctypes.c_size_t)]
liov = iovec(ctypes.cast(local, ctypes.c_void_p), 64)
riov = iovec(ctypes.cast(secret, ctypes.c_void_p), 64)
rc, err = sys_call('process_vm_readv', child, ctypes.byref(liov), 1, ctypes.byref(riov), 1, 0)
os.kill(child, signal.SIGKILL); os.waitpid(child, 0)
report('process_vm_readv', rc, err)
""",
    "mount": """
os.makedirs('mnt', exist_ok=True)
rc, err = sys_call('mount', b'none', b'mnt', b'tmpfs', 0, None)
report('mount', rc, err)
""",
    "unshare_user": """
rc, err = sys_call('unshare', 0x10000000, 0)  # CLONE_NEWUSER
report('unshare_user', rc, err)
""",
    "clone_newuser": """
rc, err = sys_call('clone', 0x10000000 | signal.SIGCHLD, 0, 0, 0, 0)
if rc == 0:
    os._exit(0)
if rc > 0:
    os.waitpid(rc, 0)
report('clone_newuser', rc, err)
""",
    "io_uring_setup": """
params = ctypes.create_string_buffer(120)
rc, err = sys_call('io_uring_setup', 8, params)
report('io_uring_setup', rc, err)
""",
    "bpf": """
# BPF_MAP_CREATE of a small array map
attr = ctypes.create_string_buffer(struct.pack('=IIII', 2, 4, 4, 1), 128)
rc, err = sys_call('bpf', 0, attr, 128)
report('bpf', rc, err)
""",
    "keyctl": """
rc, err = sys_call('keyctl', 0, ctypes.c_long(-3).value, 1)  # GET_KEYRING_ID of the session keyring
report('keyctl', rc, err)
""",
    "add_key": """
rc, err = sys_call('add_key', b'user', b'heel-test', b'secret', 6, ctypes.c_long(-2).value)
report('add_key', rc, err)
""",
    "perf_event_open": """
attr = ctypes.create_string_buffer(128)
struct.pack_into('=IIQ', attr, 0, 1, 128, 0)   # PERF_TYPE_SOFTWARE, size, PERF_COUNT_SW_CPU_CLOCK
struct.pack_into('=Q', attr, 40, 1 << 5 | 1 << 6)  # exclude_kernel | exclude_hv
rc, err = sys_call('perf_event_open', attr, 0, -1, -1, 0)
report('perf_event_open', rc, err)
""",
    "userfaultfd": """
rc, err = sys_call('userfaultfd', 1)  # UFFD_USER_MODE_ONLY
report('userfaultfd', rc, err)
""",
    # The x32 table: same arch as x86-64, syscall number with bit 30 set.
    "x32_getpid": """
ctypes.set_errno(0)
rc = libc.syscall(ctypes.c_long(0x40000000 | NR['getpid']))
report('x32_getpid', rc, ctypes.get_errno())
""",
}


def probe_script(name: str) -> str:
    return PRELUDE + PROBES[name]


def parse(out: bytes, name: str) -> int:
    """0 when the probe's operation worked, else its errno."""
    m = re.search(rf"^{name} (ok|errno (\d+))$".encode(), out, re.M)
    assert m, out
    return 0 if m.group(1) == b"ok" else int(m.group(2))


@pytest.mark.parametrize("name", sorted(PROBES))
async def test_kernel_surface_is_refused(name):
    if name == "x32_getpid" and platform.machine() != "x86_64":
        pytest.skip("x32 is an x86-64 question")
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        out = await py(sb, probe_script(name))
        assert out.returncode == 0, explain(out)
        assert parse(out.stdout, name) == errno.EPERM, explain(out)


# Where the host (as whoever runs the tests) may do the thing, the same probe
# must work there: the sandbox, not the machine, is what refuses it.
HOST_CONTROLS = ["ptrace_traceme", "ptrace_attach", "ptrace_seize_exec_child", "process_vm_readv",
                 "keyctl", "add_key", "io_uring_setup", "unshare_user", "clone_newuser"]


@pytest.mark.parametrize("name", HOST_CONTROLS)
def test_kernel_probe_works_on_the_host(name, tmp_path):
    out = host_py(f"import os; os.chdir({str(tmp_path)!r})\n" + probe_script(name))
    assert out.returncode == 0, explain(out)
    result = parse(out.stdout, name)
    if result != 0 and name in ("unshare_user", "clone_newuser", "io_uring_setup", "keyctl", "add_key"):
        pytest.skip(f"the host itself refuses {name} (errno {result}): no control here")
    assert result == 0, explain(out)


INT80 = r"""
#include <stdio.h>
int main(void)
{
    long ret;
    /* eax = 20: getpid in the 32-bit table */
    __asm__ volatile ("int $0x80" : "=a"(ret) : "a"(20L) : "memory");
    printf("%ld\n", ret);
    return 0;
}
"""


async def test_int80_32bit_syscall_is_refused(tmp_path):
    if platform.machine() != "x86_64":
        pytest.skip("int 0x80 is an x86-64 question")
    binary = compile_c(INT80, tmp_path, "int80", "-O0")
    host = subprocess.run([str(binary)], capture_output=True, timeout=10)
    if host.returncode != 0 or int(host.stdout) <= 0:
        pytest.skip(f"this kernel has no 32-bit syscall table to attack: {host!r}")
    assert int(host.stdout) > 0  # the control: on the host, int 0x80 getpid answers a pid

    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        shutil.copy(binary, sb.workdir / "int80")
        out = await sb.command("./int80").timeout(20).output()
        assert out.returncode == 0, explain(out)
        assert int(out.stdout) == -errno.EPERM, explain(out)


SOCKETS = {
    "raw_icmp": "socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP",
    "packet": "socket.AF_PACKET, socket.SOCK_RAW, 0",
    "udp": "socket.AF_INET, socket.SOCK_DGRAM, 0",
    "udp6": "socket.AF_INET6, socket.SOCK_DGRAM, 0",
    "tcp": "socket.AF_INET, socket.SOCK_STREAM, 0",
    "netlink_route": "socket.AF_NETLINK, socket.SOCK_RAW, 0",
    "netlink_audit": "socket.AF_NETLINK, socket.SOCK_RAW, 9",
    "vsock": "40, socket.SOCK_STREAM, 0",
}


@pytest.mark.parametrize("kind", sorted(SOCKETS))
async def test_socket_families_are_refused(kind):
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        out = await py(sb, f"""
            import socket, sys
            try:
                s = socket.socket({SOCKETS[kind]})
                print('CREATED', s)
            except OSError as e:
                print('refused', e.errno)
                sys.exit(3)
            """)
        assert out.returncode == 3 and b"CREATED" not in out.stdout, explain(out)

        # Control: socketpair() is how processes inside talk, and it works.
        out = await py(sb, """
            import socket
            a, b = socket.socketpair()
            a.sendall(b'ping'); print(b.recv(4).decode())
            """)
        assert out.returncode == 0 and out.stdout == b"ping\n", explain(out)


TIOCSTI = """
import ctypes, errno, fcntl, os, sys, termios
libc = ctypes.CDLL(None, use_errno=True)
master, slave = os.openpty()
pid = os.fork()
if pid == 0:
    # A new session whose controlling terminal is this pty: the case in
    # which the kernel itself lets TIOCSTI through (legacy_tiocsti=1).
    # (TIOCSCTTY, as login_tty(3) does: the sandbox's ptys cannot be
    # opened by name, see heel's devpts.)
    os.setsid()
    fd = slave
    fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
    results = []
    try:
        fcntl.ioctl(fd, termios.TIOCSTI, b'x')
        results.append('ok')
    except OSError as e:
        results.append(str(e.errno))
    ctypes.set_errno(0)
    c = ctypes.c_char(b'y')
    rc = libc.ioctl(fd, ctypes.c_ulong(termios.TIOCSTI | (1 << 32)), ctypes.byref(c))
    results.append('ok' if rc == 0 else str(ctypes.get_errno()))
    print(' '.join(results), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""


async def test_tiocsti_is_refused():
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        out = await py(sb, TIOCSTI)
        assert out.returncode == 0, explain(out)
        assert out.stdout.split() == [str(errno.EPERM).encode()] * 2, explain(out)
    # Control: on the host the same code is not refused with EPERM (it either
    # works, or the kernel's legacy_tiocsti=0 answers EIO).
    host = host_py(TIOCSTI)
    assert host.returncode == 0, explain(host)
    assert str(errno.EPERM).encode() not in host.stdout.split(), explain(host)


async def test_no_capabilities_and_no_new_privs():
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        out = await sh(sb, "cat /proc/self/status")
        assert out.returncode == 0, explain(out)
    status = dict(line.split(":\t", 1) for line in out.stdout.decode().splitlines() if ":\t" in line)
    assert status["NoNewPrivs"].strip() == "1"
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, (cap, status[cap])
    # Control: the host process that ran this test has a bounding set.
    host = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
    assert int(host["CapBnd"], 16) != 0


AMBIENT_CALLER = r"""
import sys, trio
sys.path.insert(0, sys.argv[1])
import heel
from heel import _probe

env, _ = _probe.environment()  # as if this machine had no user namespaces
_probe.environment = lambda: (env._replace(namespaces=False), "turned off for this test")


async def main():
    async with heel.Sandbox(heel.SandboxConfig(best_effort=True)) as sb:
        out = await sb.command("sh").args(
            ["-c", "grep -E '^Cap(Inh|Prm|Eff|Amb)' /proc/self/status; chmod 0666 " + sys.argv[2]]).output()
    sys.stdout.write(out.stdout.decode() + out.stderr.decode())


trio.run(main)
"""


def test_ambient_capabilities_of_the_caller_are_dropped_without_namespaces(root_only, outside_dir):
    """An unprivileged caller with an ambient capability (systemd's
    AmbientCapabilities=, setpriv) keeps it across exec: where there is no
    user namespace, the sandbox must still start with none."""
    caller = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
              "--inh-caps=+fowner", "--ambient-caps=+fowner"]
    victim, control = os.path.join(outside_dir, "victim"), os.path.join(outside_dir, "control")
    for path in (victim, control):
        with open(path, "w") as f:
            f.write("root's\n")
        os.chmod(path, 0o600)
    # Control: with the ambient CAP_FOWNER, nobody may chmod root's file on the host.
    host = subprocess.run([*caller, "chmod", "0640", control], capture_output=True, timeout=10)
    if host.returncode != 0:
        pytest.skip(f"setpriv cannot give an ambient capability here: {host.stderr!r}")
    assert os.stat(control).st_mode & 0o777 == 0o640
    package_root = os.path.dirname(os.path.dirname(heel.__file__))
    usable = subprocess.run([*caller, sys.executable, "-c", f"import sys; sys.path.insert(0, {package_root!r}); "
                             "import heel, trio"], capture_output=True, timeout=30)
    if usable.returncode != 0:
        pytest.skip(f"this Python or heel is not usable by nobody: {usable.stderr[-300:]!r}")
    out = subprocess.run([*caller, sys.executable, "-c", AMBIENT_CALLER, package_root, victim],
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out
    caps = dict(line.split(":", 1) for line in out.stdout.decode().splitlines() if line.startswith("Cap"))
    assert set(caps) == {"CapInh", "CapPrm", "CapEff", "CapAmb"}, out
    assert all(int(value, 16) == 0 for value in caps.values()), caps
    assert b"Operation not permitted" in out.stdout, out
    assert os.stat(victim).st_mode & 0o777 == 0o600  # observed from outside: unchanged


SETUID_PROBE = r"""
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(void)
{
    char line[256];
    FILE *f = fopen("/proc/self/status", "r");
    printf("euid=%d\n", (int)geteuid());
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "CapEff:", 7) == 0 || strncmp(line, "CapPrm:", 7) == 0)
            fputs(line, stdout);
    return 0;
}
"""


async def test_setuid_root_binary_gains_no_capabilities(root_only, outside_dir):
    binary = compile_c(SETUID_PROBE, outside_dir, "setuid-probe")
    os.chown(binary, 0, 0)
    os.chmod(binary, 0o4755)
    # Control: run by an unprivileged user on the host, the setuid bit makes it root.
    host = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", binary],
                          capture_output=True, timeout=10)
    if host.returncode != 0 or b"euid=0" not in host.stdout:
        pytest.skip(f"setuid does not work under {outside_dir} on this host: {host!r}")
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        out = await sb.command(binary).timeout(20).output()
    assert out.returncode == 0, explain(out)
    assert re.search(rb"CapEff:\s+0+\n", out.stdout) and re.search(rb"CapPrm:\s+0+\n", out.stdout), \
        explain(out)


# ---- secrets in the environment ---------------------------------------------

async def test_host_environment_secrets_stay_out(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "heel-secret-aws-env")
    monkeypatch.setenv("GITHUB_TOKEN", "heel-secret-gh-env")
    monkeypatch.setenv("HEEL_PASSED", "heel-passed-value")
    config = heel.SandboxConfig(level=DEFAULT, env_passthrough=["HEEL_PASSED"])
    async with heel.Sandbox(config) as sb:
        out = await sh(sb, "env; cat /proc/self/environ /proc/1/environ | tr '\\0' '\\n'")
    assert out.returncode == 0, explain(out)
    assert b"heel-secret" not in out.stdout, explain(out)
    # Control: a variable the config names does get through.
    assert b"HEEL_PASSED=heel-passed-value" in out.stdout, explain(out)


async def test_the_command_gets_only_the_documented_variables(monkeypatch):
    """The command's environment is a clean one: PATH, HOME, TMPDIR, LANG,
    LANGUAGE, LC_*, TERM, COLORTERM, TZ and what the config names, nothing
    else of the host's.  Host variables that point at the user's agents and
    sessions, or that carry a secret under a name no list of secrets knows,
    are set on the host and must not appear inside, whatever their name
    looks like.  Controls: the variables that are passed (TZ, LC_ALL, one the
    config names) arrive with the host's values."""
    import json

    leaks = {
        "SSH_AUTH_SOCK": "/tmp/ssh-heel/agent.1", "DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/user/1/bus",
        "XDG_RUNTIME_DIR": "/run/user/1", "KUBECONFIG": "/root/.kube/config", "VAULT_TOKEN": "heel-leak",
        "HEEL_UNLISTED": "heel-leak", "LCX_NOT_A_LOCALE": "heel-leak", "TERMINFO_DIRS": "/heel-leak",
    }
    for name, value in leaks.items():
        monkeypatch.setenv(name, value)
    passed = {"TZ": "Europe/Paris", "LC_ALL": "C.UTF-8", "HEEL_NAMED": "heel-named-value"}
    for name, value in passed.items():
        monkeypatch.setenv(name, value)
    config = heel.SandboxConfig(level=DEFAULT, env_passthrough=["HEEL_NAMED"], env={"HEEL_SET": "x"})
    async with heel.Sandbox(config) as sb:
        out = await py(sb, "import json, os; print(json.dumps(dict(os.environ)))")
    assert out.returncode == 0, explain(out)
    inside = json.loads(out.stdout)
    documented = {"PATH", "HOME", "TMPDIR", "LANG", "LANGUAGE", "TERM", "COLORTERM", "TZ", "HEEL_NAMED", "HEEL_SET"}
    extra = {name for name in inside if name not in documented and not name.startswith("LC_")}
    assert extra == set(), (extra, inside)
    assert {name: inside.get(name) for name in passed} == passed, inside


# ---- resource limits -------------------------------------------------------------

FORK_BOMB = """
import os, sys
r, w = os.pipe()
children = 0
try:
    while children < 200:
        pid = os.fork()
        if pid == 0:
            os.close(w)
            os.read(r, 1)   # wait until the parent closes the pipe
            os._exit(0)
        children += 1
except OSError as e:
    print('fork refused', e.errno)
print('children', children, flush=True)
os.close(w)
for _ in range(children):
    os.wait()
"""


async def test_fork_bomb_is_bounded():
    limits = heel.ResourceLimits(processes=20)
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT, limits=limits)) as sb:
        out = await py(sb, FORK_BOMB)
    assert out.returncode == 0, explain(out)
    children = int(re.search(rb"children (\d+)", out.stdout).group(1))
    assert b"fork refused" in out.stdout, explain(out)
    # Control that forking works at all, and the bound (python itself is one of the 20).
    assert 5 <= children <= 20, explain(out)
    # The host is fine.
    assert subprocess.run(["true"], timeout=10).returncode == 0


THREADS = """
import threading, time
threading.stack_size(64 * 1024)
stop = threading.Event()
started = 0
try:
    while started < 6000:
        threading.Thread(target=stop.wait, daemon=True).start()
        started += 1
except RuntimeError as e:
    print('refused', e)
print('started', started, flush=True)
stop.set()
"""


async def test_processes_have_a_limit_by_default():
    """Found by review: with no `processes` in the config, a fork bomb
    (one that forks and exits, so the init's kill cannot catch up) took
    every pid of the host's (pid_max 32768 here): the host could start
    nothing for minutes.  The default is 4096 processes and threads per
    sandbox, counted in its user namespace; a config's own limit wins."""
    if not heel.probe().user_namespaces:
        pytest.skip("without user namespaces heel sets no default (the count would be the user's)")
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        out = await py(sb, THREADS)
    assert out.returncode == 0, explain(out)
    started = int(re.search(rb"started (\d+)", out.stdout).group(1))
    assert b"refused" in out.stdout, explain(out)
    assert 4000 <= started <= 4096, explain(out)
    # Control: a config's own limit above the default is the one that holds.
    limits = heel.ResourceLimits(processes=5000)
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT, limits=limits)) as sb:
        out = await py(sb, THREADS)
    assert out.returncode == 0, explain(out)
    started = int(re.search(rb"started (\d+)", out.stdout).group(1))
    assert 4900 <= started <= 5000, explain(out)


async def test_memory_limit():
    limits = heel.ResourceLimits(memory="256M")
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT, limits=limits)) as sb:
        big = await py(sb, "b = bytearray(1 << 30); print('ALLOCATED', len(b))")
        assert b"ALLOCATED" not in big.stdout and big.returncode != 0, explain(big)
        assert b"MemoryError" in big.stderr, explain(big)
        # Control: a modest allocation works.
        small = await py(sb, "b = bytearray(16 << 20); b[-1] = 1; print('ALLOCATED', len(b))")
        assert small.returncode == 0 and b"ALLOCATED" in small.stdout, explain(small)


async def test_cpu_time_limit_kills_busy_loop():
    limits = heel.ResourceLimits(cpu_time=1)
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT, limits=limits)) as sb:
        start = time.monotonic()
        out = await py(sb, "while True: pass")
        elapsed = time.monotonic() - start
        assert not out.timed_out, explain(out)
        assert out.returncode in (-24, -9), explain(out)  # SIGXCPU, then SIGKILL at the hard limit
        assert elapsed < 10, elapsed
        # Control: a short computation finishes under the same limit.
        out = await py(sb, "print(sum(range(10000)))")
        assert out.returncode == 0 and out.stdout == b"49995000\n", explain(out)


CORE_DUMP = """
import os, resource
soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
try:
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    raised = 'raised'
except (ValueError, OSError):
    raised = 'refused'
pid = os.fork()
if pid == 0:
    os.abort()
_, status = os.waitpid(pid, 0)
print(soft, hard, raised, os.WTERMSIG(status), os.WCOREDUMP(status), flush=True)
"""


def _core_files(directory) -> list[str]:
    return [name for name in os.listdir(directory) if name.startswith("core")]


@pytest.mark.parametrize("level", [STRICT, DEFAULT])
async def test_core_dumps_are_off(level, tmp_path):
    """A crashing command must leave no core dump: one holds its whole
    memory, is bounded by no file_size limit, and, where core_pattern is a
    pipe, is handed to a helper of the host's.  The command raises
    RLIMIT_CORE to the most it may (refused: the hard limit is 0) and
    aborts a child: nothing is dumped, and no core file appears in its
    workdir.  Control: the same script run on the host, where the hard
    limit allows it, raises the limit and (with a core_pattern that names a
    file in the crashing process's directory) dumps a core there."""
    async with heel.Sandbox(heel.SandboxConfig(level=level)) as sb:
        out = await py(sb, CORE_DUMP)
        left = _core_files(sb.workdir)
    assert out.returncode == 0, explain(out)
    assert out.stdout.split() == [b"0", b"0", b"refused", str(signal.SIGABRT).encode(), b"False"], explain(out)
    assert left == [], left
    # Control, on the host.
    if resource.getrlimit(resource.RLIMIT_CORE)[1] == 0:
        pytest.skip("the host's own hard RLIMIT_CORE is 0: no control possible")
    host = subprocess.run([sys.executable, "-c", CORE_DUMP], cwd=tmp_path, capture_output=True, timeout=60)
    said = host.stdout.split()
    assert said[2:4] == [b"raised", str(signal.SIGABRT).encode()], host
    with open("/proc/sys/kernel/core_pattern") as f:
        pattern = f.read().strip()
    dumped = _core_files(tmp_path)
    for name in dumped:
        os.unlink(tmp_path / name)  # the size of a Python process
    if not pattern.startswith("|") and "/" not in pattern:
        assert said[4] == b"True" and dumped, host


async def test_file_size_limit():
    limits = heel.ResourceLimits(file_size="1M")
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT, limits=limits)) as sb:
        out = await sh(sb, "head -c 3000000 /dev/zero > big")
        assert out.returncode != 0, explain(out)  # SIGXFSZ kills head (or EFBIG)
        assert os.path.getsize(sb.workdir / "big") <= 1 << 20
        out = await py(sb, """
            import errno
            try:
                open('big2', 'wb').write(bytes(3000000))
            except OSError as e:
                print('refused', errno.errorcode[e.errno])
            """)
        assert b"refused EFBIG" in out.stdout, explain(out)
        assert os.path.getsize(sb.workdir / "big2") <= 1 << 20
        # Control: a file under the limit is written whole.
        out = await sh(sb, "head -c 100000 /dev/zero > small")
        assert out.returncode == 0, explain(out)
        assert os.path.getsize(sb.workdir / "small") == 100000


async def test_open_files_limit_binds_the_command_not_heels_setup():
    """open_files is the command's RLIMIT_NOFILE: set last, after heel-init's
    own steps (its Landlock ruleset needs an fd), so a small limit binds the
    command alone.  Before, 4 failed every command at heel's setup (EMFILE)."""
    limits = heel.ResourceLimits(open_files=4)
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT, limits=limits)) as sb:
        out = await sh(sb, "echo ran")  # a dynamically linked shell, with one fd to load libc
        assert out.returncode == 0 and out.stdout == b"ran\n", explain(out)
        # fds 0-3 are the command's to have, fd 4 is over the limit
        out = await sh(sb, "exec 3</dev/null && echo three; exec 4</dev/null && echo four")
    assert b"three" in out.stdout and b"four" not in out.stdout, explain(out)


# ---- setuid/setgid bits ----------------------------------------------------------

async def test_setuid_bit_cannot_be_set_on_files():
    """A setuid copy of a shell, made inside and run by the host later, would be
    root's when heel runs as root (the writable places are idmapped): the
    filter refuses setuid/setgid bits on chmod and on file creation."""
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        out = await sh(sb, "cp /bin/true ./t && chmod 4755 ./t; echo chmod=$?")
        assert b"chmod=0" not in out.stdout and b"chmod=" in out.stdout, explain(out)
        assert os.stat(sb.workdir / "t").st_mode & (0o4000 | 0o2000) == 0
        out = await sh(sb, "chmod 2755 ./t; echo chmod=$?")
        assert b"chmod=0" not in out.stdout, explain(out)
        assert os.stat(sb.workdir / "t").st_mode & (0o4000 | 0o2000) == 0
        # Control: an ordinary mode change goes through, and the host sees it.
        out = await sh(sb, "chmod 755 ./t; echo chmod=$?")
        assert b"chmod=0" in out.stdout, explain(out)
        assert os.stat(sb.workdir / "t").st_mode & 0o7777 == 0o755

        out = await py(sb, """
            import errno, os
            for name, mode in (('suid', 0o4755), ('sgid', 0o2755), ('plain', 0o755), ('sticky', 0o1644)):
                try:
                    os.close(os.open(name, os.O_CREAT | os.O_WRONLY, mode))
                    print(name, 'ok')
                except OSError as e:
                    print(name, errno.errorcode[e.errno])
            # Opening without O_CREAT ignores the mode argument, whatever it holds.
            os.close(os.open('plain', os.O_RDONLY, 0o4755))
            print('open-rdonly ok')
            """)
        assert out.returncode == 0, explain(out)
        assert out.stdout.split(b"\n")[:5] == [b"suid EPERM", b"sgid EPERM", b"plain ok", b"sticky ok",
                                               b"open-rdonly ok"], explain(out)
        assert not (sb.workdir / "suid").exists() and not (sb.workdir / "sgid").exists()
        assert os.stat(sb.workdir / "plain").st_mode & 0o7000 == 0


SETID_SCRIPT = PRELUDE + """
import stat
os.umask(0o022)
how = sys.argv[1]
AT_FDCWD = -100

def raw(nr, *args):
    ctypes.set_errno(0)
    rc = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc

def make(name, mode):
    if how == 'fchmod':
        fd = os.open(name, os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    elif how == 'fchmodat2':
        os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644))
        raw(452, AT_FDCWD, name.encode(), mode, 0)
    elif how == 'creat':
        os.close(raw(85, name.encode(), mode))
    elif how == 'mknod':
        os.mknod(name, stat.S_IFREG | mode)
    elif how == 'openat2':
        open_how = ctypes.create_string_buffer(struct.pack('=QQQ', os.O_CREAT | os.O_WRONLY, mode, 0), 24)
        os.close(raw(437, AT_FDCWD, name.encode(), open_how, 24))

for name, mode in (('suid', 0o4755), ('sgid', 0o2755), ('plain', 0o755)):
    try:
        make(name, mode)
        print(name, 'ok')
    except OSError as e:
        print(name, errno.errorcode.get(e.errno, e.errno))
"""

#: Other ways to a file's mode than chmod(1) and open(): each one a system
#: call of its own in the filter's list (or, for openat2, its ENOSYS).
SETID_PATHS = ["fchmod", "fchmodat2", "creat", "mknod", "openat2"]


@pytest.mark.parametrize("how", SETID_PATHS)
async def test_setuid_bit_cannot_be_set_through_any_mode_setting_call(how, tmp_path):
    """Every call that sets a mode is checked, not only chmod and open:
    fchmod on an open file, fchmodat2 (Linux 6.6), creat, mknod of a regular
    file, and openat2, whose mode is in memory out of the filter's reach (so
    the filter answers ENOSYS to all of it).  Each bit on a file of its own;
    the host looks at the modes.  Controls: on the host the same calls set
    every bit (so they exist here and do what they say), and inside the same
    call with 0755 works and the host sees 0755."""
    if how == "creat" and platform.machine() != "x86_64":
        pytest.skip("creat has a system call of its own on x86-64 only")
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    host = host_py(f"import os; os.chdir({str(host_dir)!r})\n" + SETID_SCRIPT, how)
    assert host.returncode == 0, explain(host)
    if host.stdout.split() == [b"suid", b"ENOSYS", b"sgid", b"ENOSYS", b"plain", b"ENOSYS"]:
        pytest.skip(f"this kernel has no {how}: no control here")
    # The control on the host: the call sets the bits (the host's user owns
    # the files and is in their group).
    assert host.stdout.split(b"\n")[:3] == [b"suid ok", b"sgid ok", b"plain ok"], explain(host)
    assert os.stat(host_dir / "suid").st_mode & 0o7777 == 0o4755
    for made in host_dir.iterdir():  # no set-id file of the host's left behind
        made.unlink()

    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        out = await py(sb, SETID_SCRIPT, how)
        assert out.returncode == 0, explain(out)
        refused = "ENOSYS" if how == "openat2" else "EPERM"
        expected = [f"suid {refused}", f"sgid {refused}", f"plain {refused if how == 'openat2' else 'ok'}"]
        # Observed from the host: no file of the sandbox's has a set-id bit.
        for name in ("suid", "sgid", "plain"):
            path = sb.workdir / name
            if path.exists():
                assert os.stat(path).st_mode & 0o6000 == 0, (name, oct(os.stat(path).st_mode), explain(out))
        assert out.stdout.decode().splitlines() == expected, explain(out)
        if how != "openat2":
            # Control: the same call with an ordinary mode works, as the host sees.
            assert os.stat(sb.workdir / "plain").st_mode & 0o7777 == 0o755, explain(out)
        else:
            # Control: open() (openat), the call callers fall back to, creates it.
            out = await py(sb, "import os; os.umask(0o022); "
                               "os.close(os.open('plain', os.O_CREAT | os.O_WRONLY, 0o755))")
            assert out.returncode == 0, explain(out)
            assert os.stat(sb.workdir / "plain").st_mode & 0o7777 == 0o755


async def test_modify_ldt_and_fanotify_are_refused():
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        out = await py(sb, PRELUDE + """
buf = ctypes.create_string_buffer(64)
if X86:
    ctypes.set_errno(0)
    rc = libc.syscall(ctypes.c_long(154), ctypes.c_long(0), buf, ctypes.c_long(64))  # modify_ldt(read)
    report('modify_ldt', rc, ctypes.get_errno())
ctypes.set_errno(0)
# fanotify_init(FAN_CLASS_NOTIF | FAN_REPORT_FID, O_RDONLY): the kind the kernel grants
# without CAP_SYS_ADMIN (since 5.13), so only the filter stands in the way.
rc = libc.syscall(ctypes.c_long(300 if X86 else 262), ctypes.c_long(0x200), ctypes.c_long(0))
report('fanotify_init', rc, ctypes.get_errno())
ctypes.set_errno(0)
rc = libc.syscall(ctypes.c_long(NR['getpid']))
report('getpid', rc, ctypes.get_errno())
""")
        assert out.returncode == 0, explain(out)
        if platform.machine() == "x86_64":
            assert parse(out.stdout, "modify_ldt") == errno.EPERM, explain(out)
        assert parse(out.stdout, "fanotify_init") == errno.EPERM, explain(out)
        assert parse(out.stdout, "getpid") == 0, explain(out)  # control: the raw syscall path works


PEEK_AT_OTHER_COMMANDS = """
import os, signal
mine = {os.getpid(), os.getppid()}
visible = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
print('visible-others', [p for p in visible if p not in mine])
reached = []
for pid in range(1, 200):
    if pid in mine:
        continue
    for name, attempt in (('environ', lambda: open(f'/proc/{pid}/environ', 'rb').read()),
                          ('cmdline', lambda: open(f'/proc/{pid}/cmdline', 'rb').read()),
                          ('mem', lambda: open(f'/proc/{pid}/mem', 'rb')),
                          ('kill', lambda: os.kill(pid, signal.SIGTERM))):
        try:
            attempt()
            reached.append((pid, name))
        except OSError:
            pass
print('reached', reached)
print('self', open('/proc/self/cmdline', 'rb').read().split(b'\\0')[0].decode())
"""


@pytest.mark.parametrize("level", [STRICT, DEFAULT, PERMISSIVE])
async def test_commands_of_one_sandbox_cannot_reach_each_other(level):
    """Each command is in a Landlock domain of its own: another command of the
    same sandbox (and its init, and heel-init) is not even listed in /proc,
    and cannot be signalled nor have its command line, environment or memory
    read.  At every level: root's sandbox at PERMISSIVE keeps the real gid 0,
    which hidepid=invisible lets see every process.  Control: the command
    sees itself."""
    if not heel.probe().landlock_abi >= 6:
        pytest.skip("needs Landlock ABI 6 (scoping)")
    async with heel.Sandbox(heel.SandboxConfig(level=level)) as sb:
        victim = await sb.command("sh").args(["-c", "export SECRET=heel-cross; exec sleep 31.25"]).spawn()
        async with victim:
            await trio.sleep(0.2)
            out = await py(sb, PEEK_AT_OTHER_COMMANDS)
            assert out.returncode == 0, explain(out)
            lines = out.stdout.decode().splitlines()
            assert lines == ["visible-others []", "reached []", "self python3"], explain(out)
            assert victim.poll() is None  # still running: no signal arrived


NESTED_RULE = """
import errno, os
from heel import _landlock as ll, _native
os.mkdir('real'); os.mkdir('real/y'); os.symlink('real', 'l')
fd = _native.landlock_ruleset(ll.handled_fs(1), 0, 0)
try:
    _native.landlock_add_path(fd, os.path.abspath('l/y'), ll.READ & ll.handled_fs(1))
    print('granted through the link')
except OSError as e:
    print('refused', errno.errorcode.get(e.errno))
_native.landlock_add_path(fd, os.path.abspath('real/y'), ll.READ & ll.handled_fs(1))
print('control granted')
"""


@pytest.mark.parametrize("level", [DEFAULT, PERMISSIVE], ids=lambda level: level.value)
async def test_landlock_rules_follow_no_link_where_openat2_is_hidden(level):
    """Inside a sandbox (heel's seccomp answers openat2 with ENOSYS, as some
    hosts' policies do) heel's Landlock rules are made by the fallback,
    which followed a link in the middle of the path (open() with O_NOFOLLOW
    covers the last component only).  Run heel itself in a sandbox: a rule
    through a link is refused, the same path without it is granted."""
    # heel and its Python brought into sight, wherever they are: under /tmp
    # (the sandbox's own there), in a home (pyenv's, or CI's unprivileged
    # run's venv; credentials stay closed), the interpreter behind a venv's
    # link, and heel's source tree (an editable install reads it).
    package = os.path.dirname(os.path.dirname(os.path.realpath(heel.__file__)))
    grants = sorted({os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix), package})
    config = heel.SandboxConfig(level=level, readable=grants, executable=grants,
                                security=heel.SecurityConfig(protect_user_home=False))
    try:
        async with heel.Sandbox(config) as sb:
            # Control: heel itself runs inside, with its compiled part.
            seen = await sb.command(sys.executable).args(["-c", "import heel._native"]).timeout(30).output()
            assert seen.returncode == 0, explain(seen)
            out = await sb.command(sys.executable).args(["-c", NESTED_RULE]).timeout(30).output()
    except heel.PolicyError as exc:
        # Root's DEFAULT runs as an unprivileged uid, which cannot reach a
        # Python under /root (0700); PERMISSIVE (the real uid 0) runs it.
        if level is DEFAULT and os.geteuid() == 0 and "cannot be reached" in str(exc):
            pytest.skip(f"root's DEFAULT sandbox cannot reach this Python: {exc}")
        raise
    assert out.returncode == 0, explain(out)
    assert out.stdout == b"refused ELOOP\ncontrol granted\n", explain(out)


LEASE = """
import errno, fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.lockf(fd, fcntl.LOCK_SH)  # control: a lock on a file opened for reading works
try:
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    print("lease", flush=True)
except OSError as exc:
    print("refused", exc.errno, flush=True)
time.sleep(30)
"""


@pytest.mark.parametrize("level", [STRICT, DEFAULT, PERMISSIVE])
async def test_no_lease_holds_up_the_hosts_writers(level, tmp_path):
    """A read lease makes whoever opens the file for writing next wait for
    the holder (up to 45 s, again and again), and needs only to own the file
    opened read-only: a non-root user's sandbox could hold up the user's
    own host processes on any of the user's files it may read.  The lease is
    refused, on a file of the sandbox's own in its workdir too, and a host
    process opens that file for writing at once while the command lives;
    a read lock (the control) works."""
    async with heel.Sandbox(heel.SandboxConfig(level=level)) as sb:
        target = sb.workdir / "leased"
        await sh(sb, "echo data > leased")
        process = await sb.command("python3").args(["-c", LEASE, str(target)]).stdout(
            heel.Stdio.PIPE).timeout(60).spawn()
        async with process:
            with trio.fail_after(20):
                said = await process.stdout.receive_some(100)
            # A host writer: with a lease it would wait for the lease's break.
            with trio.fail_after(20):
                writer = await trio.run_process(
                    [sys.executable, "-c", f"open({str(target)!r}, 'a').write('x')"], check=False)
            process.kill()
    assert said.decode().split() == ["refused", str(errno.EPERM)], said
    assert writer.returncode == 0


HOARD = r"""
import ctypes, errno, os, signal, sys, time
libc = ctypes.CDLL(None, use_errno=True)
# Watches first, all on one instance: one file of the workdir each.
watcher = libc.inotify_init1(os.O_CLOEXEC)
os.mkdir('watched')
watches = 0
while watches < 17000:
    name = f'watched/{watches}'.encode()
    open(name, 'w').close()
    if libc.inotify_add_watch(watcher, name, 2) < 0:  # IN_MODIFY
        break
    watches += 1
watch_errno = ctypes.get_errno() if watches < 17000 else 0
instances = 0
while instances < 10000:
    if libc.inotify_init1(os.O_CLOEXEC) < 0:
        break
    instances += 1
inotify_errno = ctypes.get_errno()
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN])
queued = 0
while queued < 200000:
    if libc.sigqueue(os.getpid(), signal.SIGRTMIN, 0) < 0:
        break
    queued += 1
print(instances, errno.errorcode.get(inotify_errno, inotify_errno), queued,
      watches, errno.errorcode.get(watch_errno, watch_errno), flush=True)
time.sleep(30)
"""

HOST_SHARE = r"""
import ctypes, os, signal
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(os.O_CLOEXEC)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN])
print(fd >= 0, libc.sigqueue(os.getpid(), signal.SIGRTMIN, 0) == 0, libc.inotify_add_watch(fd, b'/', 2) >= 0)
"""


@pytest.mark.parametrize("level", [STRICT, PERMISSIVE])
async def test_a_sandbox_takes_a_bounded_share_of_its_users_kernel_quotas(level):
    """inotify instances and pending signals are counted for the user at
    every level of user namespaces up to the host's: a command that took
    all it could left its user (root, when root runs heel) unable to watch a
    file or queue a signal on the host.  The sandbox's share is bounded (32
    instances, 16384 watches, 4096 signals), and while the command holds
    all of it a host process of the same user gets each.  Control: the
    command got some."""
    if not heel.probe().user_namespaces:
        pytest.skip("the bounds are per user namespace")
    async with heel.Sandbox(heel.SandboxConfig(level=level)) as sb:
        process = await sb.command("python3").args(["-c", HOARD]).stdout(heel.Stdio.PIPE).timeout(60).spawn()
        async with process:
            with trio.fail_after(30):
                said = b""
                while not said.endswith(b"\n"):
                    said += await process.stdout.receive_some(100)
            host = await trio.run_process([sys.executable, "-c", HOST_SHARE], capture_stdout=True)
            process.kill()
    instances, why, queued, watches, watch_why = said.decode().split()
    assert 1 <= int(instances) <= 32 and why == "EMFILE", said
    assert 1 <= int(queued) <= 4096, said
    assert 1 <= int(watches) <= 16384 and watch_why == "ENOSPC", said
    assert host.stdout.decode().split() == ["True", "True", "True"], host.stdout
