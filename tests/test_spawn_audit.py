"""Probes that kill the survivors of a mutation audit of the spawn
trampoline's security steps (csrc/spawn.c, and the command's side of
csrc/init.c), r38.  Each one attacks a real sandbox and looks from outside,
next to a control showing that the allowed neighbour works.  Most need the
host's root: root's sandbox is where the trampoline runs as real root
(mounts built before it enters the prepared user namespace), and making
mounts of the test's own needs it too."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest

import heel
from helpers import explain, sh

DEFAULT = heel.IsolationLevel.DEFAULT

#: Where this checkout's heel is importable from, for the scripts below.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(heel.__file__))

#: The unprivileged id root's sandboxes run as (uid/gid 0 inside).
SANDBOX_ID = 2000000000


def _host_script(code: str, *args: str, wrapper: list[str] = (), timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``code`` with this checkout's heel in a fresh Python on the host,
    under ``wrapper`` (setpriv, unshare)."""
    prelude = f"import sys; sys.path.insert(0, {PACKAGE_ROOT!r})\n"
    return subprocess.run([*wrapper, sys.executable, "-c", prelude + textwrap.dedent(code), *args],
                          capture_output=True, timeout=timeout)


# ---- identity: root's supplementary groups ------------------------------------------------------

GROUP_READER = r"""
import sys, trio, heel

async def main():
    async with heel.Sandbox(heel.SandboxConfig(level=heel.IsolationLevel.DEFAULT)) as sb:
        out = await sb.command("sh").args(["-c", 'for f in "$@"; do cat "$f" 2>/dev/null || echo "refused $f"; done',
                                           "sh", *sys.argv[1:]]).timeout(20).output()
    sys.stdout.write(out.stdout.decode())

trio.run(main)
"""


def test_roots_supplementary_groups_do_not_reach_the_sandbox(root_only, outside_dir):
    """Root's sandbox becomes uid/gid 0 of a user namespace (2000000000
    outside); the supplementary groups of the host process must go too
    (setgroups(0) in become_namespace_root), or the sandbox reads, writes
    and runs what those groups may on the host.  A file of group 4242 with
    only the group's read bit is the attack; one readable by others is the
    control (the sandbox reaches the directory and reads what anyone may)."""
    group = 4242
    secret, public = os.path.join(outside_dir, "group-only"), os.path.join(outside_dir, "public")
    for path, mode, content in ((secret, 0o040, "heel-secret-group\n"), (public, 0o044, "heel-public\n")):
        with open(path, "w") as f:
            f.write(content)
        os.chown(path, 0, group)
        os.chmod(path, mode)
    caller = ["setpriv", f"--groups={group}"]
    groups = subprocess.run([*caller, "id", "-G"], capture_output=True, timeout=10)
    if groups.returncode != 0 or str(group) not in groups.stdout.decode().split():
        pytest.skip(f"setpriv cannot give root a supplementary group here: {groups!r}")
    out = _host_script(GROUP_READER, secret, public, wrapper=caller)
    assert out.returncode == 0, out
    lines = out.stdout.decode().splitlines()
    assert lines == [f"refused {secret}", "heel-public"], out


# ---- mounts: sources and targets resolved without following links ------------------------------

async def test_a_writable_place_swapped_for_a_link_while_the_sandbox_opens_fails_its_start(
        root_only, outside_dir, monkeypatch):
    """The child clones each writable place and attaches it over itself,
    resolving both without following links (openat2 RESOLVE_NO_SYMLINKS):
    a sandbox that may write the directory holding another sandbox's grant
    could swap the grant for a link between heel's checks and the clone.
    The swap is made here just before the trampoline runs.  Followed, the
    link would put a writable, idmapped copy of root's directory over it,
    where uid 0 of the sandbox owns root's files (chmod needs no Landlock
    right).  The start must fail at the mount stage, and root's file keep
    its mode.  Control: the same grant, not swapped, opens and is writable."""
    from heel import _native, _probe

    _probe.environment()  # the probe's own trial spawn runs before the patch
    granted = os.path.join(outside_dir, "granted")
    victim_dir = os.path.join(outside_dir, "roots")
    os.mkdir(granted)
    os.chmod(granted, 0o777)
    os.mkdir(victim_dir)
    os.chmod(victim_dir, 0o755)
    victim = os.path.join(victim_dir, "file")
    with open(victim, "w") as f:
        f.write("root's\n")
    os.chmod(victim, 0o600)
    config = heel.SandboxConfig(level=DEFAULT, writable=[granted])

    async with heel.Sandbox(config) as sb:  # control
        out = await sh(sb, f"echo ok > {granted}/made && cat {granted}/made")
        assert out.returncode == 0 and out.stdout == b"ok\n", explain(out)

    original = _native.SpawnPlan.spawn

    def swap_then_spawn(self):
        if not os.path.islink(granted):
            os.rename(granted, granted + ".moved")
            os.symlink(victim_dir, granted)
        return original(self)

    monkeypatch.setattr(_native.SpawnPlan, "spawn", swap_then_spawn)
    try:
        async with heel.Sandbox(config) as sb:
            out = await sh(sb, f"chmod 0666 {granted}/file; echo ran")
    except heel.SpawnError as exc:
        assert (exc.stage, exc.errno) == ("mount", errno.ELOOP), exc
    else:
        pytest.fail(f"the sandbox opened through the link: {explain(out)}")
    assert os.stat(victim).st_mode & 0o777 == 0o600


# ---- mounts: the read-only view reaches every submount -----------------------------------------

SUBMOUNT_CHMOD = r"""
import os, subprocess, sys, trio, heel
base, owner = sys.argv[1], int(sys.argv[2])
sub = os.path.join(base, "sub")
os.mkdir(sub)
subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0777", "tmpfs", sub], check=True)
files = [os.path.join(base, "on-root"), os.path.join(sub, "on-submount")]
for path in files:
    open(path, "w").close()
    os.chown(path, owner, owner)
    os.chmod(path, 0o644)

async def main():
    async with heel.Sandbox(heel.SandboxConfig(level=heel.IsolationLevel.DEFAULT)) as sb:
        out = await sb.command("sh").args(["-c", 'for f in "$@"; do chmod 0666 "$f" 2>&1 | grep -o "Read-only file system" || echo "changed $f"; done',
                                           "sh", *files]).timeout(20).output()
    sys.stdout.write(out.stdout.decode())
    print(*(oct(os.stat(path).st_mode & 0o777) for path in files))

trio.run(main)
"""


def test_the_read_only_view_covers_the_hosts_submounts(root_only, outside_dir):
    """README (namespaces): "The mount view is read-only except the writable
    places, so chmod, chown, utime, xattr and truncate fail outside them
    even for the owner" (Landlock does not mediate those).  The view is made
    read-only recursively: a file system mounted below / (here a tmpfs the
    test mounts in a mount namespace of its own) is read-only too.  The files
    belong to the sandbox's own id, so only the mount's flag stands in the
    way; the file on the root file system is the control that the chmod is
    tried and refused there."""
    out = _host_script(SUBMOUNT_CHMOD, outside_dir, str(SANDBOX_ID),
                       wrapper=["unshare", "--mount", "--propagation", "private"])
    if out.returncode != 0 and b"mount" in out.stderr and b"Traceback" not in out.stderr:
        pytest.skip(f"no mount namespace of the test's own here: {out.stderr[-300:]!r}")
    assert out.returncode == 0, out
    assert out.stdout.decode().splitlines() == ["Read-only file system"] * 2 + ["0o644 0o644"], out


# ---- mounts: nothing propagates back to the host ------------------------------------------------

PROPAGATION = r"""
import sys, trio, heel

def mounts():
    with open("/proc/self/mountinfo") as f:
        return {line.split()[0]: line.split()[4] for line in f}

async def main():
    before = mounts()
    async with heel.Sandbox(heel.SandboxConfig(level=heel.IsolationLevel.DEFAULT)) as sb:
        out = await sb.command("sh").args(["-c", "grep -c . /proc/self/mountinfo"]).timeout(20).output()
        during = mounts()
    print("inside", int(out.stdout) > 0)
    print("new", sorted(during[i] for i in set(during) - set(before)))

trio.run(main)
"""


def test_nothing_the_sandbox_mounts_propagates_to_the_host(root_only):
    """The trampoline makes every mount of the new namespace private before
    it builds the view.  On a systemd host / is a shared mount, and root's
    sandbox's mount namespace belongs to the host's user namespace, so
    without that its private /tmp, /dev/shm and /proc would be mounted over
    the host's own.  The host side here is a mount namespace of the test's
    whose mounts are shared, as systemd makes them; the control is that the
    sandbox does have mounts of its own."""
    out = _host_script(PROPAGATION, wrapper=["unshare", "--mount", "--propagation", "shared"])
    if out.returncode != 0 and b"unshare" in out.stderr and b"Traceback" not in out.stderr:
        pytest.skip(f"no mount namespace of the test's own here: {out.stderr[-300:]!r}")
    assert out.returncode == 0, out
    assert out.stdout.decode().splitlines() == ["inside True", "new []"], out


# ---- fds: heel-init holds only what the plan passes ---------------------------------------------

INHERITABLE_FDS = r"""
import os, sys
marker, ipc = sys.argv[1], sys.argv[2] == "ipc"
source = os.open(marker, os.O_RDONLY)
planted = []
for fd in range(3, 64):  # before trio and heel open anything: every low fd is the host's file
    if fd != source:
        os.dup2(source, fd, inheritable=True)
        planted.append(fd)
import trio, heel
sys.path.insert(0, sys.argv[3])
from helpers import heel_init_children as heel_inits

async def main():
    mine = sum(os.readlink(f"/proc/self/fd/{fd}") == marker for fd in planted)
    config = heel.SandboxConfig(level=heel.IsolationLevel.DEFAULT, ipc=heel.IpcRouter() if ipc else None)
    async with heel.Sandbox(config) as sb:
        inits = heel_inits()
        held = {}
        for name in os.listdir(f"/proc/{inits[0]}/fd"):
            try:
                held[int(name)] = os.readlink(f"/proc/{inits[0]}/fd/{name}")
            except FileNotFoundError:
                pass
        out = await sb.command("sh").args(["-c", "echo alive"]).timeout(20).output()
    print("host", mine == len(planted))
    print("inits", len(inits))
    print("passed", held.get(0), held.get(3, "").startswith("socket:"))
    print("leaked", sorted(fd for fd, target in held.items() if target == marker))
    print(out.stdout.decode().strip())

trio.run(main)
"""


@pytest.mark.parametrize("ipc", ["", "ipc"])
def test_heel_init_inherits_no_fd_of_the_hosts(ipc, outside_dir):
    """The trampoline closes every fd above the ones it passes (close_range
    from heel-init's own fd + 1): an fd of the host's that is not
    close-on-exec (one a library made inheritable, or a caller's) must not
    reach heel-init, which runs in the sandbox with the sandbox's uid.  A
    fresh host process holds its file at every fd from 3 to 63 before it
    opens anything else; heel-init's fds, read from the host, must lead to
    none of them.  Control: the host's own table holds them, and
    heel-init's shows its passed fds (/dev/null and the control socket).
    Root only: heel-init is not dumpable, so its /proc/PID/fd belongs to
    root, and a non-root caller (whose namespace maps no uid 0) cannot list
    it; the trampoline's code is the same for both."""
    if os.geteuid() != 0:
        pytest.skip("heel-init's fd table can be read from the host by root only (it is not dumpable)")
    marker = os.path.join(outside_dir, "host-only")
    open(marker, "w").close()
    out = _host_script(INHERITABLE_FDS, marker, ipc, os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0, out
    assert out.stdout.decode().splitlines() == [
        "host True", "inits 1", "passed /dev/null True", "leaked []", "alive"], out
