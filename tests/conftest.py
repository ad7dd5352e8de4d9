"""Fixtures for tests that attack a real sandbox and look from the host.

Inside a sandbox /tmp is private, so every target "outside the workdir"
lives under /var/tmp, in a directory made for the test and removed after it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from helpers import unique_marker

#: Files of the fake home: path -> content.  Each credential carries a
#: secret that must never show up in a sandbox's output.
CREDENTIALS = {
    ".ssh/id_rsa": "-----BEGIN OPENSSH PRIVATE KEY----- heel-secret-ssh",
    ".aws/credentials": "[default]\naws_secret_access_key = heel-secret-aws\n",
    ".netrc": "machine example.com login me password heel-secret-netrc\n",
    ".config/gh/hosts.yml": "github.com:\n  oauth_token: heel-secret-gh\n",
    ".bash_history": "export TOKEN=heel-secret-history\n",
}
ORDINARY_IN_HOME = {"notes.txt": "heel-ordinary-notes\n"}


def _rmtree(path: str) -> None:
    # A test may have taken permissions away (that is what some attacks try).
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            if os.path.islink(os.path.join(root, name)):
                continue  # a link has no mode of its own (Linux has no lchmod)
            try:
                os.chmod(os.path.join(root, name), 0o700, follow_symlinks=False)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def outside_dir():
    """A fresh directory under /var/tmp: outside the workdir, visible at DEFAULT."""
    path = tempfile.mkdtemp(dir="/var/tmp", prefix="heel-test-")
    # Open to everyone: file modes never stand in the sandbox's way, so a
    # refusal seen by a test is the sandbox's doing, whatever uid runs inside.
    os.chmod(path, 0o777)
    try:
        yield path
    finally:
        _rmtree(path)


def make_home(base: str, *, with_ssh: bool = True) -> str:
    home = os.path.join(base, "home")
    os.mkdir(home)
    files = dict(CREDENTIALS) if with_ssh else {k: v for k, v in CREDENTIALS.items() if not k.startswith(".ssh/")}
    files.update(ORDINARY_IN_HOME)
    for rel, content in files.items():
        path = os.path.join(home, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(content)
    # Readable and writable by the file modes: only heel stands in the way.
    for root, dirs, files in os.walk(home):
        os.chmod(root, 0o777)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666)
    return home


@pytest.fixture
def fake_home(outside_dir, monkeypatch):
    """A home with credentials in it, as $HOME of the host (heel protects $HOME)."""
    home = make_home(outside_dir)
    monkeypatch.setenv("HOME", home)
    return home


@pytest.fixture
def fake_home_without_ssh(outside_dir, monkeypatch):
    home = make_home(outside_dir, with_ssh=False)
    monkeypatch.setenv("HOME", home)
    return home


@pytest.fixture
def host_sleeper():
    """A host process (not in any sandbox) with a secret in its environment."""
    marker = unique_marker()
    env = dict(os.environ, HEEL_HOST_SECRET="heel-secret-environ")
    proc = subprocess.Popen(["sleep", marker], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def root_only():
    if os.geteuid() != 0:
        pytest.skip("this test is about running as root")


@pytest.fixture
def no_namespaces(monkeypatch):
    """Plan as if this machine had no user namespaces: the same C code runs
    without namespace flags (see test_degraded.py)."""
    from heel import _probe

    env, _ = _probe.environment()
    monkeypatch.setattr(_probe, "environment",
                        lambda: (env._replace(namespaces=False), "turned off for this test"))


@pytest.fixture
def web():
    """A loopback HTTP server that answers with its name, the method and the path."""
    from netservers import HttpServer

    server = HttpServer("heel-test-web")
    yield server
    server.close()


@pytest.fixture
def echo():
    """A loopback TCP echo server."""
    from netservers import EchoServer

    server = EchoServer()
    yield server
    server.close()


try:
    _ExceptionGroup = BaseExceptionGroup
except NameError:  # Python 3.10: trio brings the backport
    from exceptiongroup import BaseExceptionGroup as _ExceptionGroup


def _skip_reason(exc: BaseException | None) -> str | None:
    """The message of the one Skipped inside the exception group that
    pytest-trio turns into a bare ``pytest.skip()`` (it drops the reason)."""
    group = exc.__context__ if exc is not None else None
    leaves, queue = [], [group] if isinstance(group, _ExceptionGroup) else []
    while queue:
        ex = queue.pop()
        if isinstance(ex, _ExceptionGroup):
            queue.extend(ex.exceptions)
        else:
            leaves.append(ex)
    if len(leaves) == 1 and isinstance(leaves[0], pytest.skip.Exception) and leaves[0].msg:
        return leaves[0].msg
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Give a trio test's skip its reason back (see _skip_reason)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and call.excinfo is not None and isinstance(report.longrepr, tuple):
        reason = _skip_reason(call.excinfo.value)
        if reason is not None:  # and the test's place rather than pytest-trio's
            path, line, _ = item.location
            report.longrepr = (path, (line or 0) + 1, f"Skipped: {reason}")


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """A temp root of the test's own: what a sandbox leaves there shows."""
    root = tmp_path / "tmproot"
    root.mkdir()
    monkeypatch.setenv("TMPDIR", str(root))
    return root


@pytest.fixture
def host_dir():
    """A directory on the host that the sandbox can see (unlike the host's /tmp)."""
    path = Path(tempfile.mkdtemp(prefix="heel-cli-test-", dir="/var/tmp"))
    # Open to every uid: started as root, heel runs the command as another
    # one, and a refusal a test sees must be the sandbox's, not the file mode's.
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def venv_dir():
    """Where a test's environment goes: ``<dir>/env`` in a fresh directory in
    /var/tmp that every uid may search (root's sandboxes run as another)."""
    base = tempfile.mkdtemp(prefix="heel-venv-test-", dir="/var/tmp")
    os.chmod(base, 0o755)
    yield os.path.join(base, "env")
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def var_tmpdir():
    """A $TMPDIR outside /tmp, as many users set it (TMPDIR=/var/tmp, a
    scratch disk): an ordinary directory, searchable by everyone; what heel
    leaves in it shows."""
    path = tempfile.mkdtemp(prefix="heel-test-tmpdir-", dir="/var/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def gpu_node():
    """A stand-in GPU node: a character device named like NVIDIA's (matched
    by the /dev/nvidia* grant) with the numbers of /dev/null, so that writing
    to it works wherever Landlock lets it open.  Root only."""
    import stat

    if os.geteuid() != 0:
        pytest.skip("making a stand-in device node needs root")
    path = f"/dev/nvidia-heeltest{os.getpid()}"
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except OSError as exc:
        pytest.skip(f"cannot make a device node here: {os.strerror(exc.errno)}")
    try:
        os.chmod(path, 0o666)  # whatever the umask: only the sandbox may stand in the way
        yield path
    finally:
        os.unlink(path)
