"""Building an environment leaves nothing behind when heel is interrupted
or killed in the middle of it: no temporary directories (the tools' or
heel's), no processes.  The tools (venv, pip from its wheel, uv) run in a
sandbox of the build's own, so this is the sandbox's cleanup, seen from
outside.

Offline: one tiny wheel from a find_links directory.  Each `heel python`
here gets a private $TMPDIR; the temporary environment itself goes to
/var/tmp/heel-venv-*, found from heel's "creating ..." line.  Every wait is
bounded, and whatever a test started is killed at its end.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from pkgtools import shared_wheels

SYSTEM_PYTHON = "/usr/bin/python3"
pytestmark = pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason="needs /usr/bin/python3")

_VENV = re.compile(r"/var/tmp/heel-venv-[0-9a-f]+")


@pytest.fixture(scope="module")
def wheels():
    with shared_wheels(("heelcleanup", "1.0", "VALUE = 'cleanup'\n")) as directory:
        yield directory


@pytest.fixture
def tmpdir_private():
    directory = tempfile.mkdtemp(prefix="venv-cleanup-")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def processes() -> dict[int, str]:
    """pid -> command line (arguments joined by spaces), of every process
    that can be read."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline:
            found[int(name)] = cmdline
    return found


def holding(text: str) -> dict[int, str]:
    """The processes whose command line contains ``text``, this one aside."""
    return {pid: cmd for pid, cmd in processes().items() if text in cmd and pid != os.getpid()}


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def kill_all(text: str) -> None:
    """SIGKILL what is left of a test's processes (those whose command line
    names its unique path)."""
    for pid in holding(text):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def temp_leftovers(directory: str) -> list[str]:
    """Temporary directories (heel's, tempfile's, pip's) anywhere in ``directory``."""
    found = []
    for root, dirs, files in os.walk(directory):
        found += [os.path.join(root, d) for d in dirs if d.startswith(("tmp", "heel-", "pip-"))]
    return found


class Heel:
    """`python -m heel python ...` building an environment with venv + pip
    (seconds: time to interrupt it), its stderr collected by a thread."""

    def __init__(self, wheels: str, tmpdir: str, code: str = "pass") -> None:
        argv = [sys.executable, "-m", "heel", "python", "--python", SYSTEM_PYTHON, "--no-use-uv", "--no-index",
                "--find-links", wheels, "-p", "heelcleanup", "-c", code]
        env = dict(os.environ, TMPDIR=tmpdir)
        self.process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, start_new_session=True)
        self.stderr: list[str] = []
        self.stdout = b""
        self._readers = [threading.Thread(target=self._read_stderr, daemon=True),
                         threading.Thread(target=self._read_stdout, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr.append(line.decode(errors="replace"))

    def _read_stdout(self) -> None:
        self.stdout = self.process.stdout.read()

    def venv_base(self, timeout: float = 60) -> str:
        """The /var/tmp/heel-venv-* directory, from heel's "creating" line."""
        def found():
            for line in list(self.stderr):
                m = _VENV.search(line)
                if m:
                    return m.group(0)
            if self.process.poll() is not None:
                pytest.fail(f"heel ended ({self.process.returncode}) before building: {''.join(self.stderr)}")
            return None
        return wait_until(found, timeout, "heel to start creating the environment")

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except OSError:
                pass
            self.process.wait(timeout=10)


def wait_for_pip_bootstrap(heel: Heel, base: str, tmpdir: str) -> None:
    """Until pip, run from its wheel, is installing itself in the new
    environment and has made its temporary directory somewhere under
    ``tmpdir`` (in the build sandbox's private /tmp): the moment an
    interruption used to leave it behind."""
    def ready():
        if heel.process.poll() is not None:
            pytest.fail(f"heel ended ({heel.process.returncode}) too soon: {''.join(heel.stderr)}")
        if not any("runpy" in cmd and ".whl" in cmd for cmd in holding(base).values()):
            return False
        return any(os.path.basename(p).startswith("pip-") for p in temp_leftovers(tmpdir))
    wait_until(ready, 60, "pip's bootstrap and its temporary directory")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_build_leaves_nothing(wheels, tmpdir_private, signum):
    heel = Heel(wheels, tmpdir_private)
    base = None
    try:
        base = heel.venv_base()
        wait_for_pip_bootstrap(heel, base, tmpdir_private)
        heel.process.send_signal(signum)
        assert heel.wait(timeout=30) == 128 + signum, "".join(heel.stderr)
        # heel waits for the tools before it exits: nothing is left, at once.
        assert holding(base) == {}
        assert temp_leftovers(tmpdir_private) == []
        assert os.listdir(tmpdir_private) == []
        assert not os.path.exists(base)
    finally:
        heel.kill()
        if base is not None:
            kill_all(base)
            shutil.rmtree(base, ignore_errors=True)


def test_killed_build_tools_end_and_next_run_sweeps(wheels, tmpdir_private):
    heel = Heel(wheels, tmpdir_private)
    base = None
    try:
        base = heel.venv_base()
        wait_for_pip_bootstrap(heel, base, tmpdir_private)
        heel.process.kill()
        heel.wait(timeout=30)
        # The build's sandbox dies with heel.
        wait_until(lambda: not holding(base), 15, f"the tools building {base} to end")
        # ...at once, not when done: pip had only begun (it takes seconds to
        # install itself).
        assert not os.path.exists(os.path.join(base, "env", "bin", "pip"))
        # What heel could not remove is left until the next run.
        assert os.path.isdir(base)
        assert temp_leftovers(tmpdir_private) != []

        after = Heel(wheels, tmpdir_private, code="import heelcleanup; print(heelcleanup.VALUE)")
        try:
            assert after.wait(timeout=300) == 0, "".join(after.stderr)
            assert after.stdout.strip() == b"cleanup"
            assert after.venv_base() != base
        finally:
            after.kill()
        assert not os.path.exists(base)
        assert temp_leftovers(tmpdir_private) == []
    finally:
        heel.kill()
        if base is not None:
            kill_all(base)
            shutil.rmtree(base, ignore_errors=True)


# ---- the pieces: the owner lock and the sweep --------------------------------------------

def test_owned_temp_dir_is_swept_only_when_its_owner_is_gone(tmp_path):
    from heel._spawn import make_owned_temp_dir, make_temp_dir, release_owned_temp_dir, sweep_orphaned_temp_dirs

    root = str(tmp_path)
    alive, lock = make_owned_temp_dir("heel-venv-", root)
    assert os.listdir(alive) == [".owner-lock"]
    unlocked = make_temp_dir("heel-venv-", root)  # not made this way: not heel's to judge
    target = make_temp_dir("elsewhere-", root)
    os.symlink(target, os.path.join(root, "heel-venv-link"))
    # An owner that died: its lock went with it.
    code = ("import sys; from heel._spawn import make_owned_temp_dir; "
            "print(make_owned_temp_dir('heel-venv-', sys.argv[1])[0])")
    dead = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, timeout=60,
                          check=True).stdout.strip()
    assert os.path.isdir(dead)
    sweep_orphaned_temp_dirs(root, "heel-venv-")
    assert not os.path.exists(dead)
    assert os.path.isdir(alive) and os.path.isdir(unlocked) and os.path.isdir(target)
    assert os.path.islink(os.path.join(root, "heel-venv-link"))
    release_owned_temp_dir(alive, lock)
    assert not os.path.exists(alive)


def test_a_planted_fifo_as_lock_file_does_not_hang_the_sweep(tmp_path):
    """/var/tmp is shared, and a PERMISSIVE sandbox may write there: a FIFO
    named like the owner lock blocked the sweep (and so every later heel
    python) in open() for ever.  It is passed over; a real orphan next to
    it is removed (the control)."""
    root = str(tmp_path)
    planted = os.path.join(root, "heel-venv-planted")
    os.mkdir(planted)
    os.mkfifo(os.path.join(planted, ".owner-lock"))
    code = ("import sys; from heel._spawn import make_owned_temp_dir; "
            "print(make_owned_temp_dir('heel-venv-', sys.argv[1])[0])")
    dead = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, timeout=60,
                          check=True).stdout.strip()
    sweep = ("import sys; from heel._spawn import sweep_orphaned_temp_dirs; "
             "sweep_orphaned_temp_dirs(sys.argv[1], 'heel-venv-')")
    subprocess.run([sys.executable, "-c", sweep, root], timeout=20, check=True)
    assert os.path.isdir(planted) and not os.path.exists(dead)


def test_a_sweep_cut_short_leaves_a_directory_the_next_sweep_removes(tmp_path, monkeypatch):
    """A sweep (or a close) interrupted half way, by a SIGTERM say, used to
    leave a directory without its lock file, which no later sweep would
    touch again.  The lock goes last, so what is left is still an orphan."""
    from heel import _spawn

    root = str(tmp_path)
    code = ("import os, sys; from heel._spawn import make_owned_temp_dir; "
            "p = make_owned_temp_dir('heel-', sys.argv[1])[0]; "
            "[open(os.path.join(p, f'f{i}'), 'w').close() for i in range(50)]; "
            "os.makedirs(os.path.join(p, 'work', 'deep')); print(p)")
    dead = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, timeout=60,
                          check=True).stdout.strip()
    real_unlink = _spawn._unlink
    calls = []

    def interrupted(name, dir_fd):
        calls.append(name)
        if len(calls) == 50:  # the last of the files: only the lock is left after it
            raise KeyboardInterrupt
        real_unlink(name, dir_fd)

    monkeypatch.setattr(_spawn, "_unlink", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _spawn.sweep_orphaned_temp_dirs(root, "heel-")
    monkeypatch.setattr(_spawn, "_unlink", real_unlink)
    assert os.path.isdir(dead) and os.path.exists(os.path.join(dead, ".owner-lock"))
    _spawn.sweep_orphaned_temp_dirs(root, "heel-")
    assert not os.path.exists(dead)


def test_mount_points_are_made_without_following_links(tmp_path):
    """Mount points and root's 0711 directories are made in heel's own
    directories, where a sandbox that may write the place of $TMPDIR could
    have put a link: heel must fail there, not create or chmod elsewhere."""
    from heel._spawn import make_path_nofollow

    base = tmp_path / "base"
    elsewhere = tmp_path / "elsewhere"
    base.mkdir()
    elsewhere.mkdir()
    make_path_nofollow(str(base / "a" / "b"))
    make_path_nofollow(str(base / "a" / "file"), is_file=True)
    assert (base / "a" / "b").is_dir() and (base / "a" / "file").is_file()  # the control
    os.symlink(elsewhere, base / "link")
    with pytest.raises(OSError):
        make_path_nofollow(str(base / "link" / "made"))
    with pytest.raises(OSError):
        make_path_nofollow(str(base / "link" / "file"), is_file=True)
    assert os.listdir(elsewhere) == []
    # A FIFO where a file's mount point goes: refused at once, not waited on
    # for ever (the open used to block the host's event loop).
    os.mkfifo(base / "a" / "fifo")
    result = subprocess.run([sys.executable, "-c", "import sys; from heel._spawn import make_path_nofollow\n"
                             "try:\n    make_path_nofollow(sys.argv[1], is_file=True)\n"
                             "except OSError as e:\n    print('refused', e.errno)",
                             str(base / "a" / "fifo")], capture_output=True, timeout=20)
    assert result.stdout.startswith(b"refused"), result
