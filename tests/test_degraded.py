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
