"""Lifecycle: timeouts, orphans, closing, a host that dies, the workdir,
spawn errors, exit statuses, signals and the output limit.

"Nothing is left" is checked from the host by scanning /proc for a `sleep`
whose argument is unique to the test; each test first sees those processes
running (the control), then sees them gone.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import trio

import heel
from helpers import compile_c, explain, kill_marked, process_start, processes_with, py, sh, unique_marker, wait_for_processes

DEFAULT = heel.IsolationLevel.DEFAULT


async def test_timeout_kills_grandchildren():
    marker = unique_marker()
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        result = {}

        async def run():
            start = time.monotonic()
            result["out"] = await sh(sb, f"sleep {marker} & sleep {marker} & wait", timeout=1)
            result["elapsed"] = time.monotonic() - start

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await wait_for_processes(marker, 2)  # control: they do run on the host
        out = result["out"]
        assert out.timed_out, explain(out)
        assert result["elapsed"] < 5, result["elapsed"]
        assert processes_with(marker) == [], "a grandchild outlived the timeout"


DAEMONS = {
    "setsid": """
        setsid sh -c 'touch started; exec sleep {marker}' </dev/null >/dev/null 2>&1 &
        while [ ! -e started ]; do sleep 0.02; done
        exit 0
    """,
    "double_fork": """
        python3 -c '
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        open("started", "w").close()
        os.execvp("sleep", ["sleep", sys.argv[1]])
    os._exit(0)
while not os.path.exists("started"):
    time.sleep(0.02)
' {marker}
    """,
}


@pytest.mark.parametrize("how", sorted(DAEMONS))
async def test_daemon_does_not_outlive_its_command(how):
    marker = unique_marker()
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        out = await sh(sb, textwrap.dedent(DAEMONS[how]).format(marker=marker))
        assert out.returncode == 0 and not out.timed_out, explain(out)
        assert (sb.workdir / "started").exists()  # control: the daemon did start
        assert processes_with(marker) == [], "the daemon outlived the command"
    assert processes_with(marker) == []


async def test_closing_the_sandbox_kills_spawned_processes():
    marker = unique_marker()
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        process = await sb.command("sh").args(
            ["-c", f"sleep {marker} & setsid sleep {marker} & exec sleep {marker}"]).spawn()
        await wait_for_processes(marker, 3)
        assert process.returncode is None
    assert processes_with(marker) == [], "a process outlived its sandbox"
    assert process.returncode is not None


async def test_process_kill_kills_the_tree():
    marker = unique_marker()
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        async with await sb.command("sh").args(["-c", f"sleep {marker} & sleep {marker}; :"]).spawn() as p:
            await wait_for_processes(marker, 2)
            p.kill()
            with trio.fail_after(10):
                code = await p.wait()
            assert code == -signal.SIGKILL
            assert processes_with(marker) == []


HOST_SCRIPT = """
import sys, trio, heel
marker = sys.argv[1]
async def main():
    async with heel.Sandbox(heel.SandboxConfig()) as sb:
        p = await sb.command("sh").args(["-c", f"sleep {marker} & setsid sleep {marker} & exec sleep {marker}"]).spawn()
        print("ready", p.pid, sb.workdir.parent, flush=True)
        await trio.sleep(60)
trio.run(main)
"""


async def test_sigkill_of_the_host_process_kills_the_sandbox():
    marker = unique_marker()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(heel.__file__))] + sys.path))
    host = subprocess.Popen([sys.executable, "-c", HOST_SCRIPT, marker], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    try:
        readable, _, _ = select.select([host.stdout], [], [], 20)
        line = host.stdout.readline() if readable else b""
        assert line.startswith(b"ready"), (line, host.poll())
        init_pid = int(line.split()[1])  # the command's init, a heel-init
        init_start = process_start(init_pid)
        temp_dir = line.split()[2].decode()
        await wait_for_processes(marker, 3)  # control: the sandbox runs
        assert init_start is not None
        assert os.path.isdir(temp_dir)
        host.send_signal(signal.SIGKILL)
        host.wait(timeout=10)
        # The command's processes and its init go (the init may be killed
        # a moment after them: it was seen alive once, under load, just
        # after the sleeps had gone).  Its pid may be another process's
        # since: the start time tells.
        with trio.fail_after(5):
            while processes_with(marker) or process_start(init_pid) == init_start:
                await trio.sleep(0.05)
        # The dead host could not remove its temporary directory; the next
        # sandbox to open does.
        assert os.path.isdir(temp_dir)
        async with heel.Sandbox():
            pass
        assert not os.path.exists(temp_dir)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        host.stdout.close()
        host.stderr.close()


HOST_WITH_A_CHILD = """
import os, sys, time, trio, heel
marker = sys.argv[1]
async def main():
    async with heel.Sandbox(heel.SandboxConfig()) as sb:
        p = await sb.command("sh").args(["-c", f"sleep {marker} & exec sleep {marker}"]).spawn()
        child = os.fork()
        if child == 0:  # outlives the host, holding every fd the host held
            time.sleep(60)
            os._exit(0)
        print("ready", p.pid, child, flush=True)
        await trio.sleep(60)
trio.run(main)
"""


async def test_sigkill_of_the_host_process_kills_the_sandbox_while_its_child_lives():
    """The host process is SIGKILLed while a child it forked (a worker that
    never execs, say) lives on with copies of every fd the host held, the
    sandbox's control socket too: the sandbox must end with its host all
    the same (heel-init dies with the process that made it), not when that
    child does.  Control: the child is still alive when the sandbox's
    processes are checked, and the sandbox ran before the kill."""
    marker = unique_marker()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(heel.__file__))] + sys.path))
    host = subprocess.Popen([sys.executable, "-c", HOST_WITH_A_CHILD, marker], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    child = None
    try:
        readable, _, _ = select.select([host.stdout], [], [], 20)
        line = host.stdout.readline() if readable else b""
        assert line.startswith(b"ready"), (line, host.poll())
        child = int(line.split()[2])
        await wait_for_processes(marker, 2)  # control: the sandbox runs
        host.send_signal(signal.SIGKILL)
        host.wait(timeout=10)
        def sandboxed():  # the host's child has the marker in its argv too
            return [pid for pid in processes_with(marker) if pid != child]
        with trio.move_on_after(5):
            while sandboxed():
                await trio.sleep(0.05)
        assert os.path.exists(f"/proc/{child}"), "control: the host's child still lives"
        assert sandboxed() == [], "the sandbox outlived its host while the host's child lived"
    finally:
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if host.poll() is None:
            host.kill()
            host.wait()
        host.stdout.close()
        host.stderr.close()
        with trio.move_on_after(10):
            while processes_with(marker):
                await trio.sleep(0.05)


async def test_fresh_workdir_is_removed_on_close():
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        workdir = sb.workdir
        assert workdir.is_dir()
        out = await sh(sb, "echo made inside > file.txt; mkdir -p a/b; echo x > a/b/c")
        assert out.returncode == 0, explain(out)
        assert (workdir / "file.txt").read_text() == "made inside\n"
    assert not workdir.exists()


async def test_given_workdir_is_kept(outside_dir):
    workdir = os.path.join(outside_dir, "work")
    os.mkdir(workdir)
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT, workdir=workdir)) as sb:
        assert str(sb.workdir) == os.path.realpath(workdir)
        out = await sh(sb, "pwd; echo kept > kept.txt")
        assert out.returncode == 0 and out.stdout.strip() == os.path.realpath(workdir).encode(), explain(out)
    assert open(os.path.join(workdir, "kept.txt")).read() == "kept\n"


@pytest.mark.parametrize("program", ["heel-no-such-program", "/usr/bin/heel-no-such-program"])
async def test_missing_program(program):
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        with pytest.raises(heel.CommandNotFound) as info:
            await sb.command(program).timeout(20).output()
        assert isinstance(info.value, FileNotFoundError)
        with pytest.raises(FileNotFoundError):
            await sb.command(program).spawn()
        # Control: an existing program runs.
        out = await sb.command("true").timeout(20).output()
        assert out.returncode == 0


@pytest.mark.parametrize("script, code", [
    ("true", 0),
    ("exit 3", 3),
    ("kill -TERM $$", -signal.SIGTERM),
    ("kill -KILL $$", -signal.SIGKILL),
    ("kill -SEGV $$", -signal.SIGSEGV),
])
async def test_exit_codes_and_signals(script, code):
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        out = await sh(sb, script)
    assert out.returncode == code and not out.timed_out, explain(out)


async def test_send_signal_reaches_the_command():
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        code = """
import os, signal, time
def handler(sig, frame):
    os.write(1, b'got %d\\n' % sig)
    os._exit(7)
signal.signal(signal.SIGTERM, handler)
os.write(1, b'ready\\n')
time.sleep(30)
"""
        async with await sb.command("python3").args(["-c", code]).stdout(heel.Stdio.PIPE).spawn() as p:
            with trio.fail_after(20):
                seen = b""
                while b"ready" not in seen:
                    seen += await p.stdout.receive_some(100)
                p.send_signal(signal.SIGTERM)
                assert await p.wait() == 7
                while chunk := await p.stdout.receive_some(100):
                    seen += chunk
            assert b"got 15" in seen

        # Without a handler SIGTERM ends the command, and terminate() says so.
        async with await sb.command("sleep").arg("30").spawn() as p:
            await trio.sleep(0.1)
            p.terminate()
            with trio.fail_after(10):
                assert await p.wait() == -signal.SIGTERM


async def test_output_limit_truncates_and_kills():
    limits = heel.ResourceLimits(output_bytes=100_000)
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT, limits=limits)) as sb:
        start = time.monotonic()
        out = await sb.command("yes").timeout(20).output()
        assert time.monotonic() - start < 10
        assert out.truncated and not out.timed_out, explain(out)
        assert 0 < len(out.stdout) <= 100_000
        assert out.returncode == -signal.SIGKILL, explain(out)
        # Control: a small output is whole and not marked.
        out = await sh(sb, "echo hello")
        assert out.stdout == b"hello\n" and not out.truncated, explain(out)


async def test_orphans_of_a_killed_init_die_while_the_sandbox_lives():
    """If a command's init dies before it could kill what the command started
    (the host SIGKILLs it after its grace time), the orphans come to heel-init,
    which kills them: they do not live on until the sandbox closes."""
    marker = unique_marker()
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        process = await sb.command("sh").args(["-c", f"sleep {marker} & setsid sleep {marker} & wait"]).spawn()
        async with process:
            await wait_for_processes(marker, 2)
            os.kill(process.pid, signal.SIGKILL)  # the init, not through heel
            with trio.fail_after(10):
                while processes_with(marker):
                    await trio.sleep(0.05)
        # Control: the sandbox still runs commands.
        assert (await sb.command("true").status()).success


async def test_any_signal_reaches_the_command_not_its_init():
    """A signal the init does not expect (SIGPWR, whose default is to end the
    process) goes to the command; the init lives to kill what is left."""
    marker = unique_marker()
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        process = await sb.command("sh").args(["-c", f"sleep {marker} & exec sleep {marker}"]).spawn()
        async with process:
            await wait_for_processes(marker, 2)
            process.send_signal(signal.SIGPWR)
            with trio.fail_after(10):
                assert await process.wait() == -signal.SIGPWR
            assert processes_with(marker) == []


DEEP_AND_LOCKED = """
import os
os.makedirs("locked/inner")
open("locked/inner/f", "w").close()
os.chmod("locked/inner", 0o500)
os.chmod("locked", 0o000)
os.mkdir("deep")
os.chdir("deep")
for _ in range(3000):  # past Python's recursion limit and the fd limit alike
    os.mkdir("d")
    os.chdir("d")
open("bottom", "w").close()
os.chmod(".", 0o500)
tmp = os.environ["TMPDIR"]
os.mkdir(tmp + "/ro")
open(tmp + "/ro/f", "w").close()
os.chmod(tmp + "/ro", 0o500)
print("made")
"""


async def test_what_a_sandbox_leaves_is_removed_however_deep_or_locked():
    """The sandbox's workdir and private tmp are removed on close even when
    it nested directories thousands deep (closing hit RecursionError and left
    them) and made some unwritable or unreadable (as a non-root user that
    stopped the removal, and every later sweep)."""
    async with heel.Sandbox() as sb:
        out = await py(sb, DEEP_AND_LOCKED)
        assert out.returncode == 0 and out.stdout == b"made\n", explain(out)
        base = os.path.dirname(str(sb.workdir))
        assert os.path.isdir(base)
    assert not os.path.lexists(base)


def test_remove_tree_passes_over_another_users_closed_directory():
    """As a non-root user, a directory of another user's that is closed to
    this one is left, and the rest removed: remove_tree raised EBADF and
    stopped half-way."""
    if os.geteuid() != 0:
        pytest.skip("making another user's directory needs root")
    outer = tempfile.mkdtemp(prefix="heel-test-rm-", dir="/var/tmp")  # reachable by nobody
    try:
        _remove_as_nobody(Path(outer))
    finally:
        subprocess.run(["rm", "-rf", outer], check=True)


def _remove_as_nobody(tmp_path) -> None:
    base = tmp_path / "tree"
    (base / "mine" / "sub").mkdir(parents=True)
    (base / "mine" / "sub" / "f").write_text("x")
    (base / "theirs").mkdir(mode=0o700)
    (base / "theirs" / "f").write_text("root's")
    (base / "zlast").mkdir()
    for path in (base, base / "mine", base / "mine" / "sub", base / "mine" / "sub" / "f", base / "zlast"):
        os.chown(path, 65534, 65534)
    os.chmod(tmp_path, 0o755)
    code = f"from heel._spawn import remove_tree; remove_tree({str(base)!r})"
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             sys.executable, "-c", code], capture_output=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stderr.decode()
    assert sorted(os.listdir(base)) == ["theirs"]
    assert (base / "theirs" / "f").read_text() == "root's"


def test_remove_tree_never_follows_links(tmp_path):
    """The temporary directory is the sandbox's to fill: links it leaves
    there (to directories and to files) are removed, their targets kept."""
    from heel._spawn import make_temp_dir, remove_tree

    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "keep.txt").write_text("keep")
    (outside / "file.txt").write_text("keep too")
    base = make_temp_dir("heel-test-remove-")
    assert oct(os.stat(base).st_mode & 0o777) == "0o700"
    os.makedirs(os.path.join(base, "work", "deep"))
    open(os.path.join(base, "work", "deep", "f"), "w").close()
    os.symlink(outside, os.path.join(base, "work", "dirlink"))
    os.symlink(outside / "file.txt", os.path.join(base, "work", "deep", "filelink"))
    remove_tree(base)
    assert not os.path.lexists(base)
    assert (outside / "sub" / "keep.txt").read_text() == "keep"
    assert (outside / "file.txt").read_text() == "keep too"


# ---- Ctrl-C in the middle of heel's own steps ----------------------------------------------

# Run in a child Python of its own: a KeyboardInterrupt there is the test's
# subject, not pytest's.  heel-init is stopped (SIGSTOP) from outside, so that
# heel waits for it (as on a loaded machine), and the Ctrl-C lands in that wait.
_CTRL_C_PRELUDE = r"""
import os, signal, sys, threading, time, tempfile
import trio, heel

def init_pid(sb):
    with open(f"/proc/self/fdinfo/{sb._session.prepared._pidfd}") as f:
        return int(next(line.split()[1] for line in f if line.startswith("Pid:")))

def tree(pid):
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            pass
    found = [pid]
    while more := [c for c, parent in parents.items() if parent in found and c not in found]:
        found += more
    return found

def ctrl_c_while_stopped(pid):
    # heel-init and every process under it: nothing in the sandbox answers.
    stopped = tree(pid)
    for p in stopped:
        os.kill(p, signal.SIGSTOP)
    def later():
        time.sleep(0.4)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.4)
        for p in stopped:
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass
    threading.Thread(target=later, daemon=True).start()
"""

_CTRL_C_WHILE_STARTING = _CTRL_C_PRELUDE + r"""
async def main():
    async with heel.Sandbox() as sb:
        ctrl_c_while_stopped(init_pid(sb))
        try:
            await sb.command("sh").args(["-c", "echo first; exit 1"]).output()
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted")
        for i in range(3):
            out = await sb.command("sh").args(["-c", f"echo cmd{i}; exit {10 + i}"]).output()
            print(out.returncode, out.stdout.decode().strip())

trio.run(main)
"""

_CTRL_C_WHILE_CLOSING = _CTRL_C_PRELUDE + r"""
async def main(network):
    config = heel.SandboxConfig(network=heel.AllowAll() if network else heel.DenyAll())
    sb = heel.Sandbox(config)
    try:
        with trio.fail_after(20):
            async with sb:
                pid = init_pid(sb)
                base = sb._session.base
                await sb.command("sleep").arg("60").spawn()
                ctrl_c_while_stopped(pid)
        print("not interrupted")
    except KeyboardInterrupt:
        print("interrupted")
    time.sleep(0.5)
    print("heel-init", "gone" if not os.path.exists(f"/proc/{pid}") else "left")
    print("temporary directory", "gone" if not os.path.exists(base) else "left")

trio.run(main, sys.argv[1] == "network")
"""


_CTRL_C_WHILE_WAITING = _CTRL_C_PRELUDE + r"""
async def main():
    async with heel.Sandbox() as sb:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            await sb.command("sleep").arg("5").output()
            print("not interrupted")
        except KeyboardInterrupt:
            print("KeyboardInterrupt")
        except BaseExceptionGroup as group:
            print("group", group)
        out = await sb.command("sh").args(["-c", "exit 7"]).output()
        print(out.returncode)

trio.run(main)
"""


def _run_child(script: str, *args: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, timeout=60)
    return result.stdout.decode().splitlines() + [f"exit {result.returncode}", result.stderr.decode()[-2000:]]


def test_ctrl_c_while_a_command_starts_leaves_the_sandbox_in_step():
    """A Ctrl-C after a start request was sent and before heel-init's
    reply was read left the reply queued: every later command got the one
    before's init, and so its exit status (found by review).  The program
    here catches the KeyboardInterrupt and goes on, as a REPL or an agent
    loop does."""
    lines = _run_child(_CTRL_C_WHILE_STARTING)
    assert lines[:4] == ["interrupted", "10 cmd0", "11 cmd1", "12 cmd2"], lines


def test_ctrl_c_while_output_waits_is_a_bare_keyboard_interrupt():
    """It came out of output() in a BaseExceptionGroup, which `except
    KeyboardInterrupt` misses (found by review)."""
    lines = _run_child(_CTRL_C_WHILE_WAITING)
    assert lines[:2] == ["KeyboardInterrupt", "7"], lines


@pytest.mark.parametrize("network", ["network", "none"])
def test_ctrl_c_while_the_sandbox_closes_still_closes_it(network):
    """A Ctrl-C in the waits of closing left heel-init running and the
    temporary directory in place for as long as the host lived; with a
    network policy, leaving `async with` then hung (found by review)."""
    lines = _run_child(_CTRL_C_WHILE_CLOSING, network)
    assert lines[:3] == ["interrupted", "heel-init gone", "temporary directory gone"], lines


# ---- killing a tree that fights back -------------------------------------------------------

HYDRA_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
/* hydra DEPTH ACTED READY MODE MARKER: a chain DEPTH deep in which every
 * process but the first asks for SIGUSR1 when its parent dies, and then
 * appends to ACTED and forks a new child.  The deepest makes READY.  MODE
 * "vfork": each level is a vfork child (its own memory, like fork), so its
 * parent waits in uninterruptible sleep, where SIGSTOP never takes.
 * (MARKER only names the processes for the test.) */
static const char *acted;
static void parent_died(int sig) {
    (void)sig;
    int fd = open(acted, O_WRONLY | O_CREAT | O_APPEND, 0666);
    write(fd, "x", 1);
    close(fd);
    if (fork() == 0)
        for (;;)
            pause();
}
int main(int argc, char **argv) {
    int depth = atoi(argv[1]);
    acted = argv[2];
    signal(SIGUSR1, parent_died);
    int vfork_mode = strcmp(argv[4], "vfork") == 0;
    for (int d = 0; d < depth; d++) {
        pid_t pid = vfork_mode ? (pid_t)syscall(SYS_clone, CLONE_VFORK | SIGCHLD, 0, 0, 0, 0) : fork();
        if (pid < 0)
            return 1;
        if (pid > 0)
            for (;;)
                pause();
        prctl(PR_SET_PDEATHSIG, SIGUSR1);
    }
    close(open(argv[3], O_WRONLY | O_CREAT | O_EXCL, 0644));
    for (;;)
        pause();
}
"""


@pytest.mark.parametrize("mode", ["fork", "vfork"])
@pytest.mark.parametrize("namespaces", ["namespaces", "none"])
async def test_a_tree_is_stopped_whole_before_any_of_it_is_killed(outside_dir, monkeypatch, namespaces, mode):
    """The inits killed a tree a level at a time: each round its children
    (their orphans come to it for the next).  So every process outlived its
    parent for a while, and could act on it (fork again, from a parent-death
    signal); a chain 3000 deep outlived the time the host gives without a
    pid namespace, and ran on under the host's init (found by review).
    Every process is now stopped first, top-down, and only then killed: no
    process of this tree gets to act on its parent's death."""
    binary = compile_c(HYDRA_C, outside_dir, "hydra", "-O1")
    if namespaces == "none":
        from heel import _probe

        env, _ = _probe.environment()
        monkeypatch.setattr(_probe, "environment", lambda: (env._replace(namespaces=False), "off for this test"))
    acted, ready, marker = os.path.join(outside_dir, "acted"), os.path.join(outside_dir, "ready"), unique_marker()
    config = heel.SandboxConfig(level=DEFAULT, writable=[outside_dir], best_effort=True)
    try:
        async with heel.Sandbox(config) as sb:
            process = await sb.command(binary).args(["6", acted, ready, mode, marker]).spawn()
            with trio.fail_after(60):
                while not os.path.exists(ready):
                    await trio.sleep(0.05)
            assert len(processes_with(marker)) == 7  # the control: the whole chain runs
            process.kill()
            assert await process.wait() == -signal.SIGKILL
        await trio.sleep(0.3)
        assert processes_with(marker) == []
        assert not os.path.exists(acted), "a process acted on its parent's death"
    finally:
        kill_marked(marker)


HOPPER_C = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <signal.h>
#include <unistd.h>
/* Fork `width` children and exit at once, in every generation: each child
 * is left to the command's init, and the tree is never the same twice. */
int main(int argc, char **argv) {
    int width = atoi(argv[1]);
    close(open(argv[2], O_WRONLY | O_CREAT, 0644));  /* it ran */
    if (fork() > 0)  /* the command's own process stays; its children hop */
        for (;;)
            pause();
    for (;;) {
        int made = 0;
        for (int i = 0; i < width; i++) {
            pid_t pid = fork();
            if (pid == 0)
                goto child;
            if (pid > 0)
                made++;
        }
        if (made)
            _exit(0);
        continue;  /* at the process limit: try again */
    child:;
    }
}
"""


async def test_a_fork_and_exit_bomb_is_killed_and_other_commands_live_on(outside_dir):
    """Found by review: a bomb whose processes fork and exit (every child
    left to the init) ran past its timeout for minutes: the init, one
    runnable process among thousands, raced it a process at a time.  The
    init now sits in a signal-scoped Landlock domain of its own and ends
    its command with one kill(-1), which the kernel delivers to the whole
    tree at once.  The control: another command of the same sandbox, in a
    sibling domain, is not touched by that kill(-1).  The bomb stops at
    the default process limit (4096)."""
    binary = compile_c(HOPPER_C, outside_dir, "hopper", "-O1")
    ran, marker = os.path.join(outside_dir, "ran"), unique_marker()
    config = heel.SandboxConfig(level=DEFAULT, writable=[outside_dir])
    try:
        async with heel.Sandbox(config) as sb:
            neighbour = await sb.command("sleep").arg("60").spawn()
            with trio.fail_after(45):  # the bomb's kill: minutes before the fix
                out = await sb.command(binary).args(["3", ran, marker]).timeout(2).output()
            assert out.timed_out, explain(out)
            assert os.path.exists(ran)  # the control: the bomb ran
            await trio.sleep(0.3)
            assert processes_with(marker) == []
            assert neighbour.poll() is None, "another command of the sandbox was killed too"
            assert (await sb.command("true").status()).returncode == 0  # the sandbox serves on
            neighbour.kill()
            assert await neighbour.wait() == -signal.SIGKILL
    finally:
        kill_marked(marker)


# ---- closing: on its own thread, once, whatever the host does -----------------------------


async def test_closing_does_not_queue_behind_the_applications_threads():
    """Closing finishes in a thread (the kill, the reaping, the removal), and
    used trio's default limiter: with the application's 40 threads all
    waiting (here, on an event set only after the close), the close waited
    behind them, shielded, for ever."""
    import threading

    release = threading.Event()
    watchdog_fired = []

    def watchdog() -> None:  # bounds the test where closing waits for the threads
        if not release.wait(20):
            watchdog_fired.append(True)
            release.set()

    threading.Thread(target=watchdog, daemon=True).start()
    async with trio.open_nursery() as nursery:
        for _ in range(trio.to_thread.current_default_thread_limiter().total_tokens):
            nursery.start_soon(trio.to_thread.run_sync, release.wait)
        await trio.sleep(0.2)  # every token taken
        try:
            async with heel.Sandbox(heel.SandboxConfig()) as sb:
                workdir = sb.workdir
                assert (await sb.command("true").status()).returncode == 0
            assert not watchdog_fired, "the close waited for the application's threads"
            assert not workdir.exists()
        finally:
            release.set()


async def test_a_second_close_returns_once_the_first_has_removed_the_workdir():
    """A task that closes the sandbox while the body ends: the second
    aclose() returned at once, so `async with` exited with the workdir still
    on disk."""
    seen = []
    async with heel.Sandbox(heel.SandboxConfig()) as sb:
        workdir = sb.workdir
        (workdir / "many").mkdir()
        for i in range(2000):
            (workdir / "many" / str(i)).touch()

        async def close_and_look():
            await sb.aclose()
            seen.append(workdir.exists())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(close_and_look)
            nursery.start_soon(close_and_look)
    assert seen == [False, False] and not workdir.exists()


def test_a_host_that_ignores_sigchld_can_run_and_close_a_sandbox():
    """With SIGCHLD ignored, the kernel reaps children itself and waitid()
    fails with ECHILD: closing raised ChildProcessError and left the
    temporary directory."""
    script = textwrap.dedent("""
        import signal, trio, heel
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        async def main():
            async with heel.Sandbox(heel.SandboxConfig()) as sb:
                workdir = sb.workdir
                print((await sb.command("true").status()).returncode)
            print(workdir.exists())
        trio.run(main)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert result.returncode == 0 and result.stdout == b"0\nFalse\n", result


CHAIN = """
import os, sys, time
for _ in range(int(sys.argv[1])):
    if os.fork() > 0:
        os.wait()
        os._exit(0)
time.sleep(300)
"""


async def test_without_namespaces_what_outlives_a_killed_init_dies_with_the_sandbox(monkeypatch):
    """Without namespaces heel-init is the subreaper of the commands'
    orphans: when a command's init dies (SIGKILLed from outside), what it
    left comes to heel-init a level at a time, and heel-init's last sweep
    at the close kills what is left.  Found by review: that sweep
    dereferenced a NULL command, heel-init segfaulted at every close, and a
    chain of processes ran on after the sandbox."""
    from heel import _probe

    env, _ = _probe.environment()
    monkeypatch.setattr(_probe, "environment", lambda: (env._replace(namespaces=False), "off for this test"))
    marker = unique_marker()
    config = heel.SandboxConfig(level=DEFAULT, best_effort=True)
    try:
        async with heel.Sandbox(config) as sb:
            process = await sb.command("python3").args(["-c", CHAIN, "60", marker]).spawn()
            with trio.fail_after(30):
                while len(processes_with(marker)) < 61:
                    await trio.sleep(0.05)
            os.kill(process.pid, signal.SIGKILL)  # the command's init
            assert await process.wait() == -signal.SIGKILL
            prepared = sb._session.prepared
        with trio.fail_after(10):
            while processes_with(marker):
                await trio.sleep(0.05)
        # heel-init ended by itself (it is given 2 s), after its sweep.
        assert prepared.init_ended == (os.CLD_EXITED, 0), prepared.init_ended
    finally:
        kill_marked(marker)
