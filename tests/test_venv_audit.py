"""Mutation audit of heel/venv.py's host side (r40): probes that kill the
survivors.  Each plants something a sandbox that may write an environment
(or the directory that holds it) could plant, builds or opens the real
environment, and looks from the host, next to an allowed control.

- pyvenv.cfg: a link to a good cfg is refused, as is a file past the size
  limit (one at the limit is read); a NUL in `home` is no crash.
- the build lock (``<path>.heel-lock``): 0600 while held and removed by its
  holder, never a file that replaced it; a link is refused and nothing is
  made where it points; a FIFO is refused at once; a waiter gives up on
  time without blocking trio and leaves the holder's file; a waiter that
  gets the lock of a file no longer at the path waits on the new one.
- a build that fails in a directory it was given leaves that empty
  directory, and nothing where there was none.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import trio

import heel
from heel import venv as venv_module
from helpers import explain

SYSTEM_PYTHON = "/usr/bin/python3"
pytestmark = pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason="needs /usr/bin/python3")


#: The size limit of pyvenv.cfg (heel.venv._MAX_CFG), as a number here: a
#: limit raised in the code must fail the probe, not move it.
CFG_LIMIT = 65536


def lock_of(path: str) -> str:
    return path + venv_module.LOCK_SUFFIX


def hold_lock(path: str) -> int:
    """What another builder (or a sandbox that may write the parent) does:
    make the lock file and hold flock on it."""
    fd = os.open(lock_of(path), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


# ---- pyvenv.cfg ---------------------------------------------------------------------


async def test_a_pyvenv_cfg_that_links_to_a_good_one_is_refused(venv_dir, outside_dir):
    """A link is refused for what it is, not only when it leads to a device
    or a FIFO: one to a well-formed cfg elsewhere (a host file the sandbox
    chose) is not read.  Control: the same bytes in the file itself."""
    config = heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON)
    await heel.VenvManager.create(config)
    cfg = os.path.join(venv_dir, "pyvenv.cfg")
    elsewhere = os.path.join(outside_dir, "pyvenv.cfg")
    shutil.move(cfg, elsewhere)
    os.symlink(elsewhere, cfg)
    with trio.fail_after(30), pytest.raises(heel.BrokenVenv, match="pyvenv.cfg"):
        await heel.VenvManager.create(config)
    with pytest.raises(heel.BrokenVenv, match="pyvenv.cfg"):
        async with heel.Sandbox(heel.SandboxConfig(python=heel.PythonConfig(venv_dir))):
            pass
    os.unlink(cfg)
    shutil.copyfile(elsewhere, cfg)
    await heel.VenvManager.create(config)


async def test_a_pyvenv_cfg_past_the_size_limit_is_refused(venv_dir):
    """pyvenv.cfg is a few lines: one of 64 KiB (heel.venv._MAX_CFG) is read
    (control), one byte more is refused, not read in part."""
    config = heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON)
    await heel.VenvManager.create(config)
    cfg = os.path.join(venv_dir, "pyvenv.cfg")
    with open(cfg, "rb") as f:
        text = f.read()
    pad = CFG_LIMIT - len(text) - 2
    with open(cfg, "wb") as f:
        f.write(text + b"#" + b"x" * pad + b"\n")
    assert os.path.getsize(cfg) == CFG_LIMIT
    await heel.VenvManager.create(config)  # the control: at the limit
    with open(cfg, "ab") as f:
        f.write(b"\n")
    with pytest.raises(heel.BrokenVenv, match="small regular file"):
        await heel.VenvManager.create(config)


async def test_a_nul_in_home_is_no_crash(venv_dir):
    """A `home` with a NUL in it names no directory: a STRICT sandbox of the
    environment opens without granting it (os.path.realpath would raise
    ValueError), and the environment's Python runs (its base is in /usr)."""
    config = heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON)
    await heel.VenvManager.create(config)
    cfg = os.path.join(venv_dir, "pyvenv.cfg")
    with open(cfg) as f:
        lines = [line for line in f if not line.startswith("home")]
    with open(cfg, "w") as f:
        f.write("home = /us\0r/bin\n" + "".join(lines))  # in the part that is resolved
    strict = heel.SandboxConfig(level=heel.IsolationLevel.STRICT, python=heel.PythonConfig(venv_dir))
    with trio.fail_after(60):
        async with heel.Sandbox(strict) as sb:
            out = await sb.run_python("print('ok')")
    assert out.stdout == b"ok\n", explain(out)


# ---- the build lock -----------------------------------------------------------------


async def test_the_build_lock_is_private_while_held_and_removed_by_its_holder(venv_dir):
    seen = []

    def on_progress(event: heel.VenvProgress) -> None:
        if event.phase == "create":
            seen.append(os.lstat(lock_of(venv_dir)))

    await heel.VenvManager.create(heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON), on_progress=on_progress)
    (st,) = seen
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077 == 0, oct(st.st_mode)
    assert not os.path.lexists(lock_of(venv_dir))
    assert os.path.isfile(os.path.join(venv_dir, "pyvenv.cfg"))


async def test_the_holder_never_removes_a_lock_file_that_replaced_its_own(venv_dir):
    """Another file at the lock path (put there while the build ran) is not
    the holder's to remove: the holder removes its own file only."""
    replaced = []

    def on_progress(event: heel.VenvProgress) -> None:
        if event.phase == "create":
            os.rename(lock_of(venv_dir), lock_of(venv_dir) + ".was")
            fd = os.open(lock_of(venv_dir), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            replaced.append(os.fstat(fd).st_ino)
            os.close(fd)

    await heel.VenvManager.create(heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON), on_progress=on_progress)
    assert os.lstat(lock_of(venv_dir)).st_ino == replaced[0]
    # Control: with its own file at the path, the holder removes it.
    os.unlink(lock_of(venv_dir))
    shutil.rmtree(venv_dir)
    await heel.VenvManager.create(heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON))
    assert not os.path.lexists(lock_of(venv_dir))


@pytest.mark.parametrize("target_exists", [False, True])
async def test_a_lock_that_is_a_link_is_refused_and_nothing_is_made_where_it_points(
        venv_dir, outside_dir, target_exists):
    target = os.path.join(outside_dir, "target")
    if target_exists:
        with open(target, "w") as f:
            f.write("keep\n")
    os.symlink(target, lock_of(venv_dir))
    config = heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON)
    with trio.fail_after(60), pytest.raises(heel.BrokenVenv, match="symbolic link"):
        await heel.VenvManager.create(config)
    assert os.path.exists(target) == target_exists
    if target_exists:
        with open(target) as f:
            assert f.read() == "keep\n"
    assert not os.path.exists(venv_dir)  # nothing built
    assert os.path.islink(lock_of(venv_dir))
    os.unlink(lock_of(venv_dir))  # the control: without the link it builds
    await heel.VenvManager.create(config)
    assert os.path.isfile(os.path.join(venv_dir, "pyvenv.cfg"))


def test_a_fifo_as_lock_file_is_refused_at_once(venv_dir):
    """A FIFO at the lock path: opened without blocking (no writer would
    ever come) and refused as no regular file; nothing is built.  In a
    child process, bounded: a blocking open could not be cancelled."""
    os.makedirs(os.path.dirname(venv_dir), exist_ok=True)
    os.mkfifo(lock_of(venv_dir))
    code = ("import sys, trio, heel\n"
            "try:\n"
            "    trio.run(heel.VenvManager.create, heel.VenvConfig(sys.argv[1], python=sys.argv[2]))\n"
            "except heel.BrokenVenv as exc:\n"
            "    print('BrokenVenv', exc)\n"
            "else:\n"
            "    print('built')\n")
    start = time.monotonic()
    try:
        out = subprocess.run([sys.executable, "-c", code, venv_dir, SYSTEM_PYTHON], capture_output=True,
                             text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("a FIFO as the lock file hangs the build")
    assert "BrokenVenv" in out.stdout and "not a regular file" in out.stdout, out.stdout + out.stderr
    assert time.monotonic() - start < 30
    assert not os.path.exists(venv_dir)
    assert stat.S_ISFIFO(os.lstat(lock_of(venv_dir)).st_mode)


async def test_a_waiter_gives_up_on_time_without_blocking_and_leaves_the_holders_lock(venv_dir):
    """A lock held longer than the timeout: the waiter raises InstallError
    after ``timeout`` seconds, trio's other tasks run meanwhile, and the
    holder's file is still at the path (a waiter that removed it would let
    the next builder in beside the holder).  The holder lets go after 8
    seconds, so a waiter that blocked would end, too late.  Control: once
    the holder is gone, the build goes through."""
    os.makedirs(os.path.dirname(venv_dir), exist_ok=True)
    fd = hold_lock(venv_dir)
    held = os.fstat(fd).st_ino
    released = threading.Lock()

    def release() -> None:
        if released.acquire(blocking=False):
            os.close(fd)

    timer = threading.Timer(8, release)
    timer.start()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(0.05)
            ticks += 1

    try:
        config = heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON)
        start = time.monotonic()
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticker)
                with pytest.raises(heel.InstallError, match="held"):
                    await heel.VenvManager.create(config, timeout=1.5)
                nursery.cancel_scope.cancel()
        assert time.monotonic() - start < 6
        assert ticks >= 5  # the event loop ran while the waiter waited
        assert os.lstat(lock_of(venv_dir)).st_ino == held
        assert not os.path.exists(venv_dir)
    finally:
        timer.cancel()
        release()
    await heel.VenvManager.create(config)
    assert not os.path.lexists(lock_of(venv_dir))


async def test_a_waiter_waits_on_the_lock_file_that_is_at_the_path(venv_dir):
    """The holder removes its file while it still holds it; a waiter that
    then gets the lock of that removed file must see it is no longer the one
    at the path and wait for the new one, whose holder builds meanwhile.
    Played here: the waiter waits on file A; A is moved away and file B,
    held, put at the path; A is let go.  The waiter must not build."""
    os.makedirs(os.path.dirname(venv_dir), exist_ok=True)
    lock = lock_of(venv_dir)
    first = hold_lock(venv_dir)
    second = -1
    config = heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON)

    def opened_by_others() -> int:
        count = 0
        for name in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{name}") == lock:
                    count += 1
            except OSError:
                pass
        return count

    async def swap() -> None:
        nonlocal second
        with trio.fail_after(30):
            while opened_by_others() < 2:  # ours, and the waiter's
                await trio.sleep(0.02)
        os.rename(lock, lock + ".was")
        second = hold_lock(venv_dir)
        os.close(first)  # the waiter gets A's lock now

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(swap)
                with pytest.raises(heel.InstallError, match="held"):
                    await heel.VenvManager.create(config, timeout=4)
        assert not os.path.exists(venv_dir)
        assert os.lstat(lock).st_ino == os.fstat(second).st_ino
    finally:
        with pytest.raises(OSError):
            os.close(first)
        if second >= 0:
            os.close(second)
    await heel.VenvManager.create(config)  # the control: nobody holds it now
    assert os.path.isfile(os.path.join(venv_dir, "pyvenv.cfg"))


# ---- a build that fails -------------------------------------------------------------


@pytest.mark.parametrize("given", [True, False])
async def test_a_failed_build_leaves_the_empty_directory_it_was_given(venv_dir, monkeypatch, given):
    """pip from a wheel that is none fails in the build's sandbox: what was
    made goes, and a directory that was given (empty) is there again, empty;
    where there was none, none is left."""
    scratch = tempfile.mkdtemp(prefix="heel-venv-badwheel-", dir="/var/tmp")
    try:
        os.chmod(scratch, 0o755)
        bogus = os.path.join(scratch, "pip-99.0-py3-none-any.whl")
        with open(bogus, "w") as f:
            f.write("not a zip\n")
        os.chmod(bogus, 0o644)
        monkeypatch.setattr(venv_module, "_bundled_pip_wheel", lambda base: venv_module.Path(bogus))
        if given:
            os.makedirs(venv_dir)
        with trio.fail_after(120), pytest.raises(heel.InstallError):
            await heel.VenvManager.create(heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON, use_uv=False))
        if given:
            assert os.path.isdir(venv_dir) and not os.path.islink(venv_dir) and os.listdir(venv_dir) == []
        else:
            assert not os.path.lexists(venv_dir)
        assert not os.path.lexists(lock_of(venv_dir))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
