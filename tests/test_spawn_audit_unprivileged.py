"""Probes that kill the survivors of a mutation audit of the spawn
trampoline's paths that run for an unprivileged caller (csrc/spawn.c,
heel/_spawn.py), r39: the user namespace's uid_map and gid_map (a non-root
caller keeps its uid, mapped to itself), and the (stage, errno) report of
a failed setup step, before and after the fd layout.

The unprivileged run of the suite (.ci/run, as nobody) had no test in
which the trampoline itself failed: the ones that do are root's.  A
failure is provoked here through the plan Python hands the trampoline
(heel._native.SpawnPlan, wrapped): the child really fails that step, in a
real sandbox, and the error is read from outside, next to a control that
opens the same sandbox unchanged."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

import heel
from heel import _native
from helpers import explain, heel_init_children, sh

DEFAULT = heel.IsolationLevel.DEFAULT


@pytest.fixture
def unprivileged():
    # Root's sandboxes enter a prepared namespace (uid 0 inside, 2000000000
    # outside) and write no map in the child: tests/test_spawn_audit.py.
    if os.geteuid() == 0:
        pytest.skip("this test is about an unprivileged caller")


def _ids(text: str) -> list[list[int]]:
    return [[int(field) for field in line.split()] for line in text.strip().splitlines()]


# ---- identity: the maps of an unprivileged caller's user namespace ------------------------------

async def test_a_non_root_callers_uid_and_gid_are_mapped_to_themselves(unprivileged):
    """README: "A non-root caller keeps its uid, mapped to itself."  The
    trampoline writes "uid uid 1" and "gid gid 1" (after "deny" to
    setgroups).  A map that sends the caller to 0 inside, or to another id,
    or none at all (the kernel then shows the overflow id, 65534, which is
    nobody's own: only the maps tell it apart) was not seen by any test.
    Read from inside and, for heel-init, from the host; control: a file the
    command makes is the caller's on the host."""
    uid, gid = os.geteuid(), os.getegid()
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        out = await sh(sb, "cat /proc/self/uid_map; echo --; cat /proc/self/gid_map; echo --; "
                           "cat /proc/self/setgroups; echo --; id -u; id -g; echo x > made")
        inits = heel_init_children()
        outside = []
        for pid in inits:
            with open(f"/proc/{pid}/uid_map") as f, open(f"/proc/{pid}/gid_map") as g:
                outside.append((_ids(f.read()), _ids(g.read())))
        made = os.stat(sb.workdir / "made")
    assert out.returncode == 0, explain(out)
    uid_map, gid_map, setgroups, ids = out.stdout.decode().split("--\n")
    assert _ids(uid_map) == [[uid, uid, 1]], explain(out)
    assert _ids(gid_map) == [[gid, gid, 1]], explain(out)
    assert setgroups.strip() == "deny", explain(out)
    assert ids.split() == [str(uid), str(gid)], explain(out)
    # From the host: heel-init's namespace maps the same ids (a reader in the
    # parent namespace sees its own ids in the second column).
    assert len(inits) == 1 and outside == [([[uid, uid, 1]], [[gid, gid, 1]])], outside
    # Control: the host's own namespace is not the sandbox's.
    with open("/proc/self/uid_map") as f:
        assert _ids(f.read()) != [[uid, uid, 1]]
    assert (made.st_uid, made.st_gid) == (uid, gid)


# ---- the trampoline's (stage, errno) report ---------------------------------------------------

def _break_plan(monkeypatch, **changes):
    """Make every SpawnPlan the trampoline gets carry ``changes``."""
    real = _native.SpawnPlan

    def broken(**kwargs):
        kwargs.update(changes)
        return real(**kwargs)

    monkeypatch.setattr(_native, "SpawnPlan", broken)


async def _opens(config: heel.SandboxConfig) -> None:
    async with heel.Sandbox(config) as sb:
        out = await sh(sb, "echo opened")
    assert out.stdout == b"opened\n", explain(out)


@pytest.mark.parametrize("network", [False, True], ids=["", "network"])
async def test_a_map_the_child_may_not_write_fails_the_start_as_userns_eperm(unprivileged, monkeypatch, network):
    """A uid_map of two ids is refused to an unprivileged writer (EPERM):
    the sandbox fails to open with SpawnError("userns", EPERM), the stage
    and errno the trampoline sent.  Not "exited before it started", not
    the stage of another step, not the errno swapped for the stage.  The
    report comes before the proxy's listener (network) and the ptmx the
    host waits for: the host must read it there as the error it is."""
    config = heel.SandboxConfig(level=DEFAULT, network=heel.AllowAll() if network else heel.DenyAll())
    await _opens(config)  # control (and heel's environment probe, before the plan is broken)
    uid = os.geteuid()
    _break_plan(monkeypatch, uid_map=f"{uid} {uid} 2\n".encode())
    with pytest.raises(heel.SpawnError) as caught:
        async with heel.Sandbox(config):
            pass
    assert (caught.value.stage, caught.value.errno) == ("userns", errno.EPERM), repr(caught.value)
    monkeypatch.undo()
    await _opens(config)


async def test_a_workdir_the_child_cannot_enter_fails_the_start_as_chdir_enoent(monkeypatch):
    """The trampoline's chdir into the sandbox's workdir (the one before
    heel-init, not a command's own)."""
    config = heel.SandboxConfig(level=DEFAULT)
    await _opens(config)
    _break_plan(monkeypatch, cwd="/no/such/heel-r39-dir")
    with pytest.raises(heel.SpawnError) as caught:
        async with heel.Sandbox(config):
            pass
    assert (caught.value.stage, caught.value.errno) == ("chdir", errno.ENOENT), repr(caught.value)


async def test_a_failure_after_the_fd_layout_is_still_reported(monkeypatch, outside_dir):
    """After layout_fds() the control socket is at report_fd, and every fd
    above heel-init's is closed: the report must follow it there.  A
    heel-init the kernel cannot run (not an executable format, where the
    sandbox may execute) fails its execveat, after the layout, with
    ENOEXEC: reported as ("exec_init", ENOEXEC), not lost (the host then
    saw only "heel-init exited before it started") nor taken for the
    command's own exec.  Control: the host refuses to run it alike."""
    fake = os.path.join(outside_dir, "heel-init")
    with open(fake, "wb") as f:
        f.write(b"\x7fELF but not one\n" + b"\0" * 64)
    os.chmod(fake, 0o755)
    with pytest.raises(OSError) as host:
        os.execv(fake, [fake])  # fails before anything of this process is replaced
    assert host.value.errno == errno.ENOEXEC
    config = heel.SandboxConfig(level=DEFAULT, executable=[outside_dir], readable=[outside_dir])
    await _opens(config)
    monkeypatch.setattr(_native, "INIT_PATH", fake)
    with pytest.raises(heel.SpawnError) as caught:
        async with heel.Sandbox(config):
            pass
    assert not isinstance(caught.value, heel.CommandNotFound)
    assert (caught.value.stage, caught.value.errno) == ("exec_init", errno.ENOEXEC), repr(caught.value)


MAPS_OF_A_CALLER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import trio, heel

async def main():
    async with heel.Sandbox(heel.SandboxConfig(level=heel.IsolationLevel.DEFAULT)) as sb:
        out = await sb.command("sh").args(["-c", "cat /proc/self/uid_map /proc/self/gid_map; id -u; id -g"]).output()
    sys.stdout.write(out.stdout.decode() + out.stderr.decode())

trio.run(main)
"""


def test_a_callers_uid_and_gid_that_differ_are_each_mapped_to_themselves(root_only):
    """The unprivileged run above has nobody's uid and gid, both 65534, and
    the kernel's overflow id is 65534 too: a trampoline that wrote the gid
    into uid_map (or the uid into gid_map) passes there.  Here root runs
    heel as a caller whose uid and gid differ.  Control: the caller's ids
    on the host."""
    uid, gid = 65534, 65533
    caller = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    host = subprocess.run([*caller, "sh", "-c", "id -u; id -g"], capture_output=True, timeout=10)
    assert host.stdout.split() == [str(uid).encode(), str(gid).encode()], host
    package_root = os.path.dirname(os.path.dirname(heel.__file__))
    usable = subprocess.run([*caller, sys.executable, "-c", f"import sys; sys.path.insert(0, {package_root!r}); "
                             "import heel, trio"], capture_output=True, timeout=30)
    if usable.returncode != 0:
        pytest.skip(f"this Python or heel is not usable by uid {uid}: {usable.stderr[-300:]!r}")
    out = subprocess.run([*caller, sys.executable, "-c", MAPS_OF_A_CALLER, package_root],
                         capture_output=True, timeout=60, cwd="/")
    assert out.returncode == 0, out
    lines = out.stdout.decode().splitlines()
    assert [line.split() for line in lines] == [
        [str(uid), str(uid), "1"], [str(gid), str(gid), "1"], [str(uid)], [str(gid)]], out
