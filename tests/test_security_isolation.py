"""Isolation properties found missing by a security review, attacked for
real from inside real sandboxes: TCP Fast Open past Landlock's port rule,
commands changing the inits' resource limits, root's sandbox id and
$TMPDIR, other sandboxes' temporary directories, the host's network tables
at STRICT.

Each test tries a forbidden thing inside a sandbox, observes from the host
that it failed, and shows next to it that the allowed neighbour works.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import stat
import subprocess
import sys

import pytest
import trio

import heel
from helpers import explain, py, sh

DEFAULT = heel.IsolationLevel.DEFAULT
STRICT = heel.IsolationLevel.STRICT
PERMISSIVE = heel.IsolationLevel.PERMISSIVE

MSG_FASTOPEN = 0x20000000


def _host_listener() -> socket.socket:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(2)
    return srv


def _accepted_data(srv: socket.socket) -> bytes:
    """What the first connection waiting on srv sent (b'' when none came)."""
    try:
        conn, _ = srv.accept()
    except OSError:
        return b""
    with conn:
        conn.settimeout(2)
        try:
            return conn.recv(100)
        except OSError:
            return b""


# ---- 1. TCP Fast Open bypasses Landlock's connect rule (no network namespace) ----

FASTOPEN = """
import socket, sys
port = int(sys.argv[1])
s = socket.socket()
try:
    s.connect(('127.0.0.1', port))
    print('connect ok')
except OSError as e:
    print('connect errno', e.errno)
s = socket.socket()
try:
    s.sendto(b'heel-fastopen-data', 0x20000000, ('127.0.0.1', port))  # MSG_FASTOPEN
    print('fastopen sent')
except OSError as e:
    print('fastopen errno', e.errno)
"""


async def test_fastopen_cannot_bypass_the_port_rule_without_a_network_namespace(no_namespaces):
    """Without namespaces, Landlock's TCP rule is all that keeps the sandbox on
    the proxy's port.  sendto(MSG_FASTOPEN) connects without passing through
    the LSM connect hook, so it reaches any port: the proxy is bypassed."""
    # Control on the host: this kernel does Fast Open from a client.
    with _host_listener() as srv:
        client = socket.socket()
        try:
            client.sendto(b"host-fastopen", MSG_FASTOPEN, srv.getsockname())
        except OSError as exc:
            pytest.skip(f"no TCP Fast Open on this host: {exc}")
        finally:
            client.close()
        if _accepted_data(srv) != b"host-fastopen":
            pytest.skip("TCP Fast Open does not deliver on this host")

    with _host_listener() as srv:
        port = srv.getsockname()[1]
        config = heel.SandboxConfig(level=DEFAULT, network=heel.AllowAll(), best_effort=True)
        async with heel.Sandbox(config) as sb:
            assert "the network namespace" in sb.degraded
            out = await py(sb, FASTOPEN, str(port))
        # Control: an ordinary connect() to that port is refused by Landlock.
        assert b"connect errno 13" in out.stdout, explain(out)
        # The attack, observed from the host: nothing may arrive.
        assert _accepted_data(srv) == b"", explain(out)


# ---- 2. commands can change heel-init's and their init's resource limits ----------

def _limit(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith(name):
                return line
    raise AssertionError(name)


PRLIMIT_INIT = """
import os, resource, time
N = resource.RLIMIT_NOFILE
resource.setrlimit(N, (64, resource.getrlimit(N)[1]))
print('own', resource.prlimit(0, N)[0], 'read', resource.prlimit(1, N)[0] > 0, flush=True)
for pid in (1, os.getppid()):
    try:
        resource.prlimit(pid, N, (64, resource.prlimit(pid, N)[1]))
        print(pid, 'changed', flush=True)
    except OSError as e:
        print(pid, 'errno', e.errno, flush=True)
"""


#: The same attack through a pointer whose low 32 bits are 0: a page mapped
#: at 0x300000000.  A filter that looks at the low word of prlimit64's `new`
#: argument only takes it for NULL (a read of the limits, allowed).
PRLIMIT_HIGH_WORD = """
import ctypes, os, platform, resource, struct, sys
N = resource.RLIMIT_NOFILE
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mmap.restype = ctypes.c_void_p
PRLIMIT64 = {'x86_64': 302, 'aarch64': 261}[platform.machine()]
WANTED = 0x300000000
# MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
addr = libc.mmap(ctypes.c_void_p(WANTED), 4096, 3, 0x22 | 0x100000, -1, 0)
print('mapped', hex(addr or 0), flush=True)
if addr != WANTED:
    sys.exit(4)
for pid, soft in ((1, 64), (os.getppid(), 64), (0, 77)):
    hard = resource.prlimit(pid, N)[1]
    ctypes.memmove(addr, struct.pack('=QQ', soft, hard), 16)
    ctypes.set_errno(0)
    rc = libc.syscall(ctypes.c_long(PRLIMIT64), ctypes.c_long(pid), ctypes.c_long(N),
                      ctypes.c_void_p(addr), ctypes.c_void_p(0))
    print('high', 'self' if pid == 0 else pid, 'changed' if rc == 0 else f'errno {ctypes.get_errno()}',
          flush=True)
print('own', resource.getrlimit(N)[0], flush=True)
"""


async def test_command_cannot_change_heel_init_resource_limits():
    """heel-init (pid 1) and each command's init share the command's uid, and
    prlimit() asks for no more than that (Landlock does not mediate it, and
    hidepid only hides /proc).  A command that lowers their RLIMIT_NOFILE
    stops them from reading /proc, on which their cleanup rests.  The filter
    looks at the whole of prlimit64's `new` pointer: one whose low word is 0
    is not taken for NULL."""
    if platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("prlimit64's number is known here for x86_64 and aarch64 only")
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        from heel._spawn import host_pid

        init_pid = host_pid(sb._session.prepared._pidfd)
        before = _limit(init_pid, "Max open files")
        out = await py(sb, PRLIMIT_INIT)
        after = _limit(init_pid, "Max open files")
        high = await py(sb, PRLIMIT_HIGH_WORD)
        after_high = _limit(init_pid, "Max open files")
    # Control: a command may change its own limits (setrlimit, prlimit with
    # pid 0) and read another process's.  Setting another's (its children's
    # too: seccomp cannot tell them from the inits) is refused.
    assert b"own 64 read True" in out.stdout, explain(out)
    assert b"1 errno 1" in out.stdout, explain(out)
    # Observed from the host: heel-init's limits are as heel left them.
    assert after == before, (before, after, explain(out))
    assert b"1 changed" not in out.stdout, explain(out)
    # Through the pointer with a low word of 0: refused too, as the host sees;
    # the same buffer with pid 0 (the control) sets the command's own limit.
    assert high.returncode == 0, explain(high)
    assert after_high == before, (before, after_high, explain(high))
    lines = high.stdout.decode().splitlines()
    assert lines[0] == "mapped 0x300000000" and lines[1] == "high 1 errno 1", explain(high)
    assert lines[2].endswith(" errno 1") and lines[3:] == ["high self changed", "own 77"], explain(high)


SURVIVOR = """
import os, resource, sys, time
attack = sys.argv[1] == 'attack'
N = resource.RLIMIT_NOFILE
if attack:
    # Soft limit 2: poll() on two fds still works, but no /proc file opens.
    hard = resource.prlimit(1, N)[1]
    try:
        resource.prlimit(os.getppid(), N, (2, resource.prlimit(os.getppid(), N)[1]))
        resource.prlimit(1, N, (2, hard))
    except PermissionError:
        print('prlimit refused', flush=True)
if os.fork() == 0:
    os.setsid()
    null = os.open('/dev/null', os.O_RDWR)
    for fd in range(3):
        os.dup2(null, fd)
    if os.fork() == 0:
        time.sleep(1.5)       # the command and its init are gone by now
        if attack:
            try:
                resource.prlimit(1, N, (hard, hard))  # heel-init serves the next command again
            except PermissionError:
                pass
        for _ in range(80):
            with open('alive', 'a') as f:
                f.write('x')
            time.sleep(0.1)
        os._exit(0)
    os._exit(0)
time.sleep(0.3)
print('command done', flush=True)
"""


async def _survivor_growth(mode: str) -> tuple[int, int, object]:
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        out = await py(sb, SURVIVOR, mode)
        alive = sb.workdir / "alive"
        await trio.sleep(3)
        first = alive.stat().st_size if alive.exists() else 0
        await trio.sleep(1)
        second = alive.stat().st_size if alive.exists() else 0
    return first, second, out


async def test_no_process_outlives_its_command_by_starving_the_inits():
    """'When the command exits, [its init] kills everything the command
    started (setsid'd and double-forked daemons included) before it reports
    the exit status', and heel-init kills the orphans that outlive an init.
    Lowering both inits' RLIMIT_NOFILE (prlimit) makes both cleanups read no
    /proc and kill nothing: a daemon keeps running in the sandbox after the
    command was reported done (and past its timeout)."""
    # Control: without the limits trick the daemon dies with its command.
    first, second, out = await _survivor_growth("control")
    assert out.returncode == 0 and b"command done" in out.stdout, explain(out)
    assert first == second == 0, (first, second)

    first, second, out = await _survivor_growth("attack")
    assert out.returncode == 0 and b"command done" in out.stdout, explain(out)
    # Observed from the host, seconds after the command's end: nothing writes.
    assert second == first, f"a process of the finished command is still writing: {first} -> {second} bytes"


@pytest.fixture
def use_tmpdir(monkeypatch):
    """Sets $TMPDIR for the test; the probe's cached environment, which
    depends on where heel's directories go, is forgotten before and after."""
    from heel import _probe

    def use(path: str) -> None:
        monkeypatch.setenv("TMPDIR", path)
        _probe.environment.cache_clear()

    yield use
    _probe.environment.cache_clear()


# ---- 3. root with $TMPDIR outside /tmp: "no namespaces", and best effort runs as real root ----

async def test_root_with_tmpdir_elsewhere_is_not_taken_for_a_machine_without_namespaces(
        root_only, outside_dir, use_tmpdir):
    """Root's sandboxes run as uid 2000000000 and cannot enter heel's 0700
    temporary directory when $TMPDIR is not /tmp (only the private /tmp is
    idmapped): the trial run fails at chdir (EACCES), which environment()
    takes for a kernel without namespaces.  With best_effort the sandbox then
    runs as the real uid 0, which may chmod any root-owned file."""
    from heel import _probe

    tmpdir = os.path.join(outside_dir, "tmpdir")
    os.mkdir(tmpdir)
    os.chmod(tmpdir, 0o1777)
    victim = os.path.join(outside_dir, "victim")
    with open(victim, "w") as f:
        f.write("root's\n")
    os.chmod(victim, 0o600)
    use_tmpdir(tmpdir)
    env, why = _probe.environment()
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT, best_effort=True)) as sb:
        out = await sh(sb, f"echo mine > mine && chmod 0640 mine && echo own=ok; chmod 0666 {victim}")
        mine = os.stat(sb.workdir / "mine").st_mode & 0o777
    # Control: the workdir's own files can be chmod'ed.
    assert b"own=ok" in out.stdout and mine == 0o640, explain(out)
    # Observed from the host: the root-owned file outside is unchanged.
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o600, explain(out)
    assert env.namespaces, why


# ---- 4. sandboxes read each other's private tmp and workdir when $TMPDIR is not /tmp ----

TWO_SANDBOXES = r"""
import sys, trio
sys.path.insert(0, sys.argv[1])
import heel


async def main():
    cfg = heel.SandboxConfig(level=heel.IsolationLevel.DEFAULT)
    async with heel.Sandbox(cfg) as victim, heel.Sandbox(cfg) as other:
        out = await victim.command('sh').args(
            ['-c', 'echo heel-secret-work > "$HOME/secret" && echo heel-secret-tmp > /tmp/secret']).output()
        assert out.returncode == 0, out
        out = await other.command('sh').args(
            ['-c', 'echo mine > own; cat own; cat ' + sys.argv[2] + '/heel-*/work/secret '
                   + sys.argv[2] + '/heel-*/tmp/secret']).timeout(20).output()
        sys.stdout.write(out.stdout.decode())


trio.run(main)
"""


SHM_SCRIPT = """
import errno, json, os, sys
name = sys.argv[1]
seen = {'listed': name in os.listdir('/dev/shm')}
try:
    os.stat('/dev/shm/' + name)
    seen['stat'] = 'ok'
except OSError as e:
    seen['stat'] = errno.errorcode[e.errno]
try:  # what shm_open and multiprocessing's semaphores do
    with open('/dev/shm/own-segment', 'w') as f:
        f.write('mine')
    seen['own'] = open('/dev/shm/own-segment').read()
except OSError as e:
    seen['own'] = errno.errorcode[e.errno]
print(json.dumps(seen))
"""


@pytest.mark.parametrize("level", [STRICT, DEFAULT])
async def test_the_hosts_shared_memory_is_out_of_sight(level):
    """/dev/shm is the sandbox's own: a segment the host (or another
    sandbox of the same user) keeps there can be neither listed nor
    stat()ed, which Landlock alone would not prevent.  Control: the sandbox
    makes, writes and reads a segment of its own there, and the host's
    segment is still in the host's /dev/shm."""
    import json
    import tempfile

    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm on this host")
    fd, host_segment = tempfile.mkstemp(dir="/dev/shm", prefix="heel-test-host-")
    os.close(fd)
    try:
        async with heel.Sandbox(heel.SandboxConfig(level=level)) as sb:
            out = await py(sb, SHM_SCRIPT, os.path.basename(host_segment))
        assert out.returncode == 0, explain(out)
        seen = json.loads(out.stdout)
        assert seen == {"listed": False, "stat": "ENOENT", "own": "mine"}, seen
        assert os.path.exists(host_segment)
        assert not os.path.exists("/dev/shm/own-segment")
    finally:
        os.unlink(host_segment)


async def test_sandboxes_cannot_read_each_others_temporary_directories(outside_dir, monkeypatch):
    """heel makes each sandbox's workdir and private /tmp under $TMPDIR.  When
    that is not /tmp, the private /tmp hides nothing: at DEFAULT another
    sandbox of the same user reads both (the directories are 0700, but the
    same uid runs inside).  As root (whose sandboxes cannot start with such a
    $TMPDIR, see above) the two sandboxes are run by nobody."""
    tmpdir = os.path.join(outside_dir, "tmpdir")
    os.mkdir(tmpdir)
    os.chmod(tmpdir, 0o1777)
    package_root = os.path.dirname(os.path.dirname(heel.__file__))
    if os.geteuid() == 0:
        caller = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
        try:
            usable = subprocess.run([*caller, "-c", f"import sys; sys.path.insert(0, {package_root!r}); "
                                     "import heel, trio"], capture_output=True, timeout=30)
        except OSError as exc:
            pytest.skip(f"this Python is not usable by nobody: {exc}")
        if usable.returncode != 0:
            pytest.skip(f"this Python or heel is not usable by nobody: {usable.stderr[-300:]!r}")
        env = dict(os.environ, TMPDIR=tmpdir, HOME="/nonexistent")
        done = subprocess.run([*caller, "-c", TWO_SANDBOXES, package_root, tmpdir],
                              capture_output=True, timeout=90, env=env)
        assert done.returncode == 0, done
        stdout = done.stdout
    else:
        monkeypatch.setenv("TMPDIR", tmpdir)
        cfg = heel.SandboxConfig(level=DEFAULT)
        async with heel.Sandbox(cfg) as victim, heel.Sandbox(cfg) as other:
            out = await sh(victim, 'echo heel-secret-work > "$HOME/secret" && echo heel-secret-tmp > /tmp/secret')
            assert out.returncode == 0, explain(out)
            out = await sh(other, f"echo mine > own; cat own; cat {tmpdir}/heel-*/work/secret "
                                  f"{tmpdir}/heel-*/tmp/secret")
        stdout = out.stdout
    # Control: the second sandbox works with its own files.
    assert stdout.startswith(b"mine\n"), stdout
    # The first sandbox's secrets stay out of the second.
    assert b"heel-secret" not in stdout, stdout


# ---- 5. STRICT sees the host's network tables in /proc/net -------------------------

async def test_strict_does_not_see_the_hosts_connections():
    """Under DenyAll heel makes no network namespace, so /proc/net (which
    STRICT grants as part of "its own /proc") is the host's: every listening
    port and connection of the host, and the paths of its unix sockets."""
    with _host_listener() as srv:
        port = srv.getsockname()[1]
        async with heel.Sandbox(heel.SandboxConfig(level=STRICT)) as sb:
            out = await sh(sb, "cat /proc/self/status >/dev/null && echo own=ok; cat /proc/net/tcp /proc/net/tcp6")
    # Control: the sandbox's own /proc is readable.
    assert b"own=ok" in out.stdout, explain(out)
    # The host's listener (0100007F:PORT, state 0A) must not be listed.
    assert not re.search(rb"0100007F:%04X 00000000:0000 0A" % port, out.stdout), explain(out)


async def test_root_refuses_a_workdir_its_sandbox_id_cannot_reach(root_only, outside_dir):
    """As root the sandbox runs as an unprivileged id: a workdir below a
    directory that others may not search is refused at once, with a message
    that says which directory, not as a failed chdir inside."""
    private = os.path.join(outside_dir, "private")
    work = os.path.join(private, "work")
    os.makedirs(work)
    os.chmod(private, 0o700)
    with pytest.raises(heel.PolicyError, match=r"not searchable by other users.*chmod o\+x"):
        async with heel.Sandbox(heel.SandboxConfig(workdir=work)):
            pass
    # Control: once others may pass through, the same workdir works.
    os.chmod(private, 0o711)
    async with heel.Sandbox(heel.SandboxConfig(workdir=work)) as sb:
        out = await sh(sb, "pwd && echo hi > f && cat f")
    assert out.stdout == f"{work}\nhi\n".encode(), explain(out)


async def test_root_names_a_tmpdir_its_sandbox_id_cannot_reach(root_only, outside_dir, use_tmpdir):
    private = os.path.join(outside_dir, "private")
    tmpdir = os.path.join(private, "tmp")
    os.makedirs(tmpdir)
    os.chmod(private, 0o700)
    use_tmpdir(tmpdir)
    with pytest.raises(heel.PolicyError, match=r"temporary directory is in .*set TMPDIR"):
        async with heel.Sandbox(heel.SandboxConfig()):
            pass
    assert os.listdir(tmpdir) == []  # nothing left behind


async def test_root_with_a_private_tmpdir_runs(root_only, outside_dir, use_tmpdir):
    """A $TMPDIR that is itself 0700 is covered by the sandbox's own
    (idmapped) view: the way to the workdir is heel's, and reachable."""
    tmpdir = os.path.join(outside_dir, "private-tmp")
    os.mkdir(tmpdir)
    os.chmod(tmpdir, 0o700)
    use_tmpdir(tmpdir)
    async with heel.Sandbox(heel.SandboxConfig()) as sb:
        out = await sh(sb, "echo hi > f && cat f && ls -a ..")
    assert out.returncode == 0 and out.stdout.startswith(b"hi\n"), explain(out)
    assert os.listdir(tmpdir) == []


# ---- a link put into a granted path ----------------------------------------------------------


def _granted_and_secret(base: str) -> tuple[str, str]:
    """base/proj (granted: holds `file`) and base/secret (never granted:
    holds `data`); both open to every uid, so only the sandbox refuses."""
    proj, secret = os.path.join(base, "proj"), os.path.join(base, "secret")
    for path, name, text in ((proj, "file", "PROJ\n"), (secret, "data", "SECRET\n")):
        os.mkdir(path)
        os.chmod(path, 0o755)
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
        os.chmod(os.path.join(path, name), 0o644)
    return proj, secret


def _swap_for_link(proj: str, secret: str) -> None:
    """What a sandbox given base writable can do: the granted directory
    moved aside, a link to elsewhere in its place."""
    os.rename(proj, proj + ".moved")
    os.symlink(secret, proj)


async def test_a_link_put_in_a_granted_path_after_the_config_was_made_is_refused(outside_dir):
    """The config resolves its paths when it is made; a sandbox that may
    write the directory holding one can replace it with a link before a
    later sandbox opens, which then granted where the link points."""
    proj, secret = _granted_and_secret(outside_dir)
    config = heel.SandboxConfig(level=STRICT, readable=[proj])
    async with heel.Sandbox(config) as sb:  # the control: the grant, and only it
        out = await sh(sb, f"cat {proj}/file; cat {secret}/data")
    assert out.stdout == b"PROJ\n" and b"SECRET" not in out.stdout, explain(out)
    _swap_for_link(proj, secret)
    with pytest.raises(heel.PolicyError, match="now leads to"):
        async with heel.Sandbox(config):
            pass


async def test_a_link_swapped_in_while_the_sandbox_opens_grants_nothing(outside_dir, monkeypatch):
    """Between the plan (every path resolved) and the Landlock ruleset
    (each path opened) a few milliseconds pass, in which a sandbox that may
    write the directory can swap in a link: the ruleset followed it and
    granted the link's target.  The swap is made here at that moment."""
    from heel import _spawn

    proj, secret = _granted_and_secret(outside_dir)
    config = heel.SandboxConfig(level=STRICT, readable=[proj])
    real_build_plan = _spawn.build_plan

    def plan_then_swap(*args, **kwargs):
        plan = real_build_plan(*args, **kwargs)
        _swap_for_link(proj, secret)
        return plan

    monkeypatch.setattr(_spawn, "build_plan", plan_then_swap)
    with pytest.raises(heel.SpawnError) as caught:
        async with heel.Sandbox(config) as sb:
            out = await sh(sb, f"cat {proj}/data")
            pytest.fail(f"the sandbox opened; the command read: {out.stdout!r}")
    assert caught.value.stage == "landlock" and "symbolic link" in str(caught.value), caught.value


# ---- scheduling of host processes without a pid namespace -------------------------------------

SCHED_ATTACK = r"""
import ctypes, os, platform, sys
victim = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
IOPRIO_SET = {"x86_64": 251, "aarch64": 30}[platform.machine()]
IDLE_IO = 3 << 13  # IOPRIO_CLASS_IDLE

def attempt(name, call):
    try:
        call()
        print(name, "ok")
    except OSError as exc:
        print(name, "errno", exc.errno)

def ioprio(who):
    if libc.syscall(IOPRIO_SET, 1, who, IDLE_IO) != 0:
        raise OSError(ctypes.get_errno(), "ioprio_set")

for target in (victim, 0):  # the host's process, then the control: the command itself
    attempt(f"setpriority {target}", lambda: os.setpriority(os.PRIO_PROCESS, target, 19))
    attempt(f"affinity {target}", lambda: os.sched_setaffinity(target, {0}))
    attempt(f"scheduler {target}", lambda: os.sched_setscheduler(target, os.SCHED_IDLE, os.sched_param(0)))
    attempt(f"ioprio {target}", lambda: ioprio(target))
# Every process of a uid (who 0: the caller's own), refused whoever it names.
attempt("prio_user", lambda: os.setpriority(os.PRIO_USER, 65533, 19))
"""


async def test_host_processes_keep_their_scheduling_without_a_pid_namespace(no_namespaces):
    """Without a pid namespace the sandbox sees the user's host processes,
    and setpriority, sched_setaffinity, sched_setscheduler and ioprio_set
    need no more than the same uid (Landlock's signal scope does not cover
    them): a command could make heel's own Python, or any process of the
    user's, nice 19, SCHED_IDLE and pinned to one CPU (found by review).
    The same calls on the command itself still work."""
    import ctypes
    import platform

    if platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("ioprio_get's number is known here for x86_64 and aarch64 only")
    victim = subprocess.Popen(["sleep", "60"])
    try:
        before = (os.getpriority(os.PRIO_PROCESS, victim.pid), os.sched_getaffinity(victim.pid),
                  os.sched_getscheduler(victim.pid))
        async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT, best_effort=True)) as sb:
            out = await py(sb, SCHED_ATTACK, str(victim.pid))
        after = (os.getpriority(os.PRIO_PROCESS, victim.pid), os.sched_getaffinity(victim.pid),
                 os.sched_getscheduler(victim.pid))
        libc = ctypes.CDLL(None, use_errno=True)
        ioprio_class = libc.syscall({"x86_64": 252, "aarch64": 31}[platform.machine()], 1, victim.pid) >> 13
    finally:
        victim.kill()
        victim.wait()
    lines = out.stdout.decode().splitlines()
    assert after == before and ioprio_class != 3, (before, after, ioprio_class, explain(out))
    assert [line for line in lines if line.endswith(" 0 ok")] == [
        "setpriority 0 ok", "affinity 0 ok", "scheduler 0 ok", "ioprio 0 ok"], explain(out)
    assert all(line.endswith("errno 1") for line in lines if not line.endswith(" 0 ok")), explain(out)


# ---- descriptors of the host's that a sandbox's command inherits -------------------------------

#: Which fds the command holds (found without opening one: fstat on each
#: number), what /proc/self/fd says they are, and a read of the host's fd.
FD_LISTING = """
import errno, os, resource, sys
planted = int(sys.argv[1])
held = []
for fd in range(min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 65536)):
    try:
        os.fstat(fd)
    except OSError:
        continue
    held.append(fd)
print('held', held)
for fd in held:
    print('fd', fd, os.readlink(f'/proc/self/fd/{fd}'))
print('listed', sorted(int(name) for name in os.listdir('/proc/self/fd')))
try:
    print('read', os.pread(planted, 100, 0))  # at 0: the control's read moved the shared offset
except OSError as e:
    print('read', errno.errorcode[e.errno])
"""


def _held(stdout: bytes, name: str) -> list[int]:
    m = re.search(rb"^%s \[([\d, ]*)\]$" % name.encode(), stdout, re.M)
    assert m, stdout
    return [int(n) for n in m.group(1).split(b",") if n.strip()]


@pytest.mark.parametrize("level, ipc", [(STRICT, False), (DEFAULT, False), (DEFAULT, True)],
                         ids=["strict", "default", "default-ipc"])
async def test_the_hosts_open_files_do_not_reach_the_command(level, ipc, outside_dir):
    """heel promises the command closed fds: a descriptor the host process
    left open and inheritable (a shell's `40<secret`, or a library's
    leftover) does not reach it, whatever it opens.  Inside, the command
    holds 0, 1 and 2, and the IPC socket when the sandbox has IPC; a read of
    the host's descriptor number fails with EBADF.  Control: a host
    subprocess that keeps fds sees the descriptor and reads the secret."""
    secret = os.path.join(outside_dir, "secret")
    with open(secret, "w") as f:
        f.write("heel-secret-fd\n")
    os.chmod(secret, 0o600)
    planted = 40
    while True:  # the first free number from 40: never clobber one of the test runner's
        try:
            os.fstat(planted)
        except OSError:
            break
        planted += 1
    fd = os.open(secret, os.O_RDONLY)
    try:
        os.dup2(fd, planted, inheritable=True)
        try:
            control = subprocess.run([sys.executable, "-c", FD_LISTING, str(planted)], close_fds=False,
                                     capture_output=True, timeout=20)
            config = heel.SandboxConfig(level=level, ipc=heel.IpcRouter() if ipc else None)
            async with heel.Sandbox(config) as sb:
                out = await py(sb, FD_LISTING, str(planted))
                ipc_fd = await sh(sb, 'echo "$HEEL_IPC_FD"')
        finally:
            os.close(planted)
    finally:
        os.close(fd)
    assert control.returncode == 0, explain(control)
    assert planted in _held(control.stdout, "held"), explain(control)
    assert b"read b'heel-secret-fd\\n'" in control.stdout, explain(control)

    assert out.returncode == 0, explain(out)
    assert b"heel-secret" not in out.stdout + out.stderr, explain(out)
    assert b"read EBADF" in out.stdout, explain(out)
    held = _held(out.stdout, "held")
    if ipc:
        number = int(ipc_fd.stdout)
        assert held == [0, 1, 2, number], explain(out)
        assert re.search(rb"^fd %d socket:" % number, out.stdout, re.M), explain(out)
    else:
        assert ipc_fd.stdout == b"\n", explain(ipc_fd)
        assert held == [0, 1, 2], explain(out)
    # /proc/self/fd lists the same, and one more: the listing's own descriptor.
    listed = _held(out.stdout, "listed")
    assert len(listed) == len(held) + 1 and set(held) < set(listed), explain(out)


@pytest.mark.parametrize("level", [STRICT, DEFAULT, PERMISSIVE], ids=lambda level: level.value)
async def test_the_sandbox_is_a_session_of_its_own(level):
    """heel-init leads a session and a process group of its own, and so does
    each command: the host's terminal and its job control (a Ctrl-C to the
    foreground group, a SIGHUP at hang-up) never reach into the sandbox,
    and no command can take the host's terminal as its controlling one.
    Seen from the host, through /proc.  Control: the test itself is in
    another session, which its own child shares."""
    from heel._spawn import host_pid

    async with heel.Sandbox(heel.SandboxConfig(level=level)) as sb:
        init = host_pid(sb._session.prepared._pidfd)
        process = await sb.command("sleep").args(["30"]).spawn()
        try:
            with trio.fail_after(10):  # the command is the child of its init (process.pid)
                while not (children := _children(process.pid)):
                    await trio.sleep(0.01)
            command = children[0]
            sessions = {"init": (os.getsid(init), os.getpgid(init)),
                        "command": (command, os.getsid(command), os.getpgid(command))}
        finally:
            process.kill()
            await process.wait()
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getsid(0))"], capture_output=True,
                           text=True, timeout=30)
    assert int(child.stdout) == os.getsid(0)  # the control: a plain child stays in the test's session
    assert sessions["init"] == (init, init), sessions
    assert os.getsid(0) != init
    command, sid, pgid = sessions["command"]
    assert sid == pgid == command, sessions


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(n) for n in f.read().split()]
