"""Where user namespaces are unavailable (for instance a kernel with
unprivileged user namespaces turned off), heel refuses to run unless asked for
best effort, and then still enforces Landlock, seccomp and the process tree's
end through subreapers.  The machine here has namespaces, so these tests plan
as if it had none: the same C code runs with no namespace flags."""

from __future__ import annotations

import os

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
