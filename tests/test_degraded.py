"""Where user namespaces are unavailable (for instance a kernel with
unprivileged user namespaces turned off), heel refuses to run unless asked for
best effort, and then still enforces Landlock, seccomp and the process tree's
end through subreapers.  The machine here has namespaces, so these tests plan
as if it had none: the same C code runs with no namespace flags."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest
import trio

import heel
from helpers import explain, processes_with, unique_marker


async def test_refused_unless_best_effort(no_namespaces):
    with pytest.raises(heel.SandboxUnavailable, match="user namespaces"):
        async with heel.Sandbox(heel.SandboxConfig()):
            pass


async def test_best_effort_still_enforces_landlock_and_seccomp(no_namespaces, outside_dir):
    config = heel.SandboxConfig(best_effort=True)
    async with heel.Sandbox(config) as sb:
        assert "user namespaces" in sb.degraded
        out = await sb.command("sh").args(["-c", f"echo inside > ok; echo x > {outside_dir}/no; "
                                                  "grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status"]).output()
        assert (sb.workdir / "ok").read_text() == "inside\n", explain(out)
        assert b"Permission denied" in out.stderr, explain(out)
        assert not os.path.exists(os.path.join(outside_dir, "no"))
        assert b"NoNewPrivs:\t1" in out.stdout and b"Seccomp:\t2" in out.stdout, explain(out)


#: The file operations Landlock itself refuses, so that they stay refused
#: without the read-only mount view.  (chmod, chown, utime and xattrs are
#: not Landlock's: without namespaces they work on what the sandbox's uid
#: owns, as the README's limits say.)
LANDLOCK_FILE_OPS = ["write", "append", "create_beside", "delete", "rename", "rename_into_workdir", "truncate"]


@pytest.mark.parametrize("op", LANDLOCK_FILE_OPS)
async def test_best_effort_refuses_file_changes_outside_the_workdir(no_namespaces, outside_dir, op):
    """With namespaces the read-only mount view refuses these before
    Landlock is asked; without them Landlock alone does, and it must handle
    each right (TRUNCATE among them).  The target is the sandbox's user's
    own file, mode 0666: only the sandbox stands in the way.  Control: the
    same operation on a file in the workdir works."""
    from test_security_fs import FILE_OPS, OP_SCRIPT, make_own_target, make_target, refused_outside_done_inside

    script = OP_SCRIPT.format(op=FILE_OPS[op])
    outside = make_target(outside_dir)
    async with heel.Sandbox(heel.SandboxConfig(best_effort=True)) as sb:
        assert "user namespaces" in sb.degraded
        inside = await make_own_target(sb)
        await refused_outside_done_inside(sb, script, outside_dir, outside, inside)


async def test_best_effort_timeout_kills_daemons_through_the_subreaper(no_namespaces):
    marker = unique_marker()
    async with heel.Sandbox(heel.SandboxConfig(best_effort=True)) as sb:
        with trio.fail_after(20):
            out = await sb.command("sh").args(
                ["-c", f"setsid sleep {marker} & sleep {marker} & wait"]).timeout(1).output()
        assert out.timed_out, explain(out)
        with trio.fail_after(10):
            while processes_with(marker):
                await trio.sleep(0.05)


#: A command that forks watchers of itself: each reads the command's state
#: over and over, and writes a line to argv[1] if it ever sees it stopped
#: (`T`); argv[2] tells that it ran.
WATCHERS = r"""
import os, sys, time
parent = os.getpid()
for _ in range(4):
    if os.fork() == 0:
        path = "/proc/%d/stat" % parent
        while True:
            try:
                with open(path, "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except OSError:
                continue
            if state == b"T":
                fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                os.write(fd, b"seen\n")
                os._exit(0)
open(sys.argv[2], "w").close()
while True:
    time.sleep(100)
"""


async def test_best_effort_a_commands_end_is_one_kill_that_reaches_nothing_else(no_namespaces):
    """Without a pid namespace too, a command's init sits in a signal-scoped
    Landlock domain of its own (ABI 6) and ends the command's tree with one
    kill(-1), which the kernel delivers to the whole tree at once.  It had
    walked the host's /proc, stopping the tree top-down before killing it,
    which a fork-and-exit bomb can race (see test_lifecycle.py's bomb):
    watchers in the tree saw their parent stopped in every run (10 of 10).
    Scoping, not a namespace, is what keeps that kill(-1) in the tree: a
    process of the host's with the same uid, and another command of the
    same sandbox, live on."""
    if heel.probe().landlock_abi < 6:
        pytest.skip("needs Landlock's signal scoping (ABI 6): the init stops the tree first there")
    marker = unique_marker()
    host = subprocess.Popen(["sleep", "60", marker])
    try:
        async with heel.Sandbox(heel.SandboxConfig(best_effort=True)) as sb:
            assert "user namespaces" in sb.degraded
            neighbour = await sb.command("sleep").args(["60", marker]).spawn()
            seen, ran = sb.workdir / "seen", sb.workdir / "ran"
            with trio.fail_after(30):
                out = await sb.command("python3").args(["-c", WATCHERS, str(seen), str(ran), marker]) \
                    .timeout(1).output()
            assert out.timed_out and ran.exists(), explain(out)  # the control: the watchers ran
            await trio.sleep(0.2)
            assert not seen.exists(), "a watcher saw the command stopped before it was killed"
            left = processes_with(marker)  # the host's sleep and the neighbour's (its init's is sleep's parent)
            assert host.pid in left and len(left) == 2, left
            assert host.poll() is None and neighbour.poll() is None
            neighbour.kill()
            assert await neighbour.wait() == -signal.SIGKILL
    finally:
        host.kill()
        host.wait()


async def test_best_effort_leaves_the_hosts_terminals_closed(no_namespaces):
    """Without namespaces there is no devpts of the sandbox's own, so /dev/pts
    is the host's: it is not granted (heel's pty reaches a command as an fd)."""
    master, slave = os.openpty()
    try:
        path = os.ttyname(slave)
        os.chmod(path, 0o666)  # file modes never stand in the sandbox's way
        with open(path, "w"):  # control: the host opens it
            pass
        async with heel.Sandbox(heel.SandboxConfig(best_effort=True)) as sb:
            out = await sb.command("sh").args(["-c", f"echo hi > {path}"]).output()
        assert out.returncode != 0 and b"Permission denied" in out.stderr, explain(out)
    finally:
        os.close(master)
        os.close(slave)


async def test_best_effort_names_the_abstract_socket_names_it_cannot_keep(no_namespaces):
    security = heel.SecurityConfig(allow_unix_sockets=True)
    async with heel.Sandbox(heel.SandboxConfig(best_effort=True, security=security)) as sb:
        assert "abstract socket names" in sb.degraded
    async with heel.Sandbox(heel.SandboxConfig(best_effort=True)) as sb:  # control: bind() is refused there
        assert "abstract socket names" not in sb.degraded


def _heel_inside_grants() -> list[str]:
    """What a sandbox needs to run this Python's heel: its prefixes and
    heel's own package (an editable install reads the source tree)."""
    package = os.path.dirname(os.path.dirname(os.path.realpath(heel.__file__)))
    return sorted({os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix), package})


@pytest.mark.parametrize("level", [heel.IsolationLevel.DEFAULT, heel.IsolationLevel.PERMISSIVE],
                         ids=lambda level: level.value)
async def test_heel_inside_a_sandbox_runs_with_best_effort_and_stays_closed(outside_dir, level):
    """A sandbox's uid 0 (root's, or a user's mapped to 0) holds no
    capability: heel run inside it cannot set securebits or shrink the
    bounding set, and needs not, since they are so already.  It refuses to
    run without namespaces, and with --best-effort runs the command with
    Landlock and seccomp on, no capability and the outside still closed."""
    inner = [sys.executable, "-m", "heel", "run"]
    script = (f"grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status; echo x > ok; "
              f"echo x > {outside_dir}/no || echo refused")
    grants = _heel_inside_grants()
    # This Python may live in a home directory (pyenv's): credentials stay closed.
    config = heel.SandboxConfig(level=level, readable=grants, executable=grants,
                                security=heel.SecurityConfig(protect_user_home=False))
    async with contextlib.AsyncExitStack() as stack:
        try:
            sb = await stack.enter_async_context(heel.Sandbox(config))
        except heel.PolicyError as exc:
            # Root's DEFAULT runs as an unprivileged uid, which cannot reach
            # a Python under /root (0700); PERMISSIVE runs the same test.
            if level is heel.IsolationLevel.DEFAULT and "cannot be reached" in str(exc):
                pytest.skip(str(exc))
            raise
        # Inside, the workdir is $HOME, whose .ssh heel would keep closed:
        # the inner command's workdir is below it.
        (sb.workdir / "in").mkdir()
        refused = await sb.command(inner[0]).args([*inner[1:], "--", "true"]).timeout(60).output()
        out = await sb.command(inner[0]).args([*inner[1:], "--best-effort", "--no-protect-home", "--workdir", str(sb.workdir / "in"),
                                               "--", "sh", "-c", script]).timeout(60).output()
        assert refused.returncode == 125 and b"user namespaces" in refused.stderr, explain(refused)
        assert out.returncode == 0, explain(out)
        assert b"CapEff:\t0000000000000000" in out.stdout, explain(out)
        assert b"CapBnd:\t0000000000000000" in out.stdout, explain(out)
        assert b"NoNewPrivs:\t1" in out.stdout and b"refused" in out.stdout, explain(out)
        assert (sb.workdir / "in" / "ok").read_text() == "x\n", explain(out)
    assert not os.path.exists(os.path.join(outside_dir, "no"))
