"""Small helpers shared by the security and lifecycle tests.

Every security test attempts the forbidden thing for real inside a real
sandbox and checks from the host that it failed; these helpers only run
commands, look at files and look for processes.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import trio

import heel

#: A bound on every command a test runs inside a sandbox.
COMMAND_TIMEOUT = 20


async def sh(sb: "heel.Sandbox", script: str, *, timeout: float = COMMAND_TIMEOUT) -> "heel.Output":
    """Run ``sh -c script`` in the sandbox and capture its output."""
    return await sb.command("sh").args(["-c", script]).timeout(timeout).output()


async def py(sb: "heel.Sandbox", code: str, *args: str, timeout: float = COMMAND_TIMEOUT) -> "heel.Output":
    """Run ``python3 -c code args...`` (the system Python) in the sandbox."""
    return await sb.command("python3").args(["-c", textwrap.dedent(code), *args]).timeout(timeout).output()


def host_py(code: str, *args: str, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
    """The same kind of script run on the host, unsandboxed: the control."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True,
                          timeout=timeout)


def explain(out) -> str:
    """A readable account of an Output (or CompletedProcess) for assertion messages."""
    return (f"returncode={out.returncode} timed_out={getattr(out, 'timed_out', None)}\n"
            f"stdout={out.stdout[-2000:]!r}\nstderr={out.stderr[-2000:]!r}")


def snapshot(path: str) -> dict | None:
    """Everything the host can observe about a file: content, metadata, xattrs.

    ctime is in it: any change of mode, owner, times, xattrs or links moves it.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    data = open(path, "rb").read() if os.path.isfile(path) and not os.path.islink(path) else None
    try:
        xattrs = {name: os.getxattr(path, name, follow_symlinks=False)
                  for name in os.listxattr(path, follow_symlinks=False)}
    except OSError:
        xattrs = None
    return {
        "data": data, "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
        "nlink": st.st_nlink, "size": st.st_size, "mtime": st.st_mtime_ns,
        "ctime": st.st_ctime_ns, "ino": st.st_ino, "xattrs": xattrs,
    }


def assert_heel_error(result: subprocess.CompletedProcess, code: int) -> str:
    """heel failed by itself: the exit status, one 'heel:' line, no traceback."""
    stderr = result.stderr.decode()
    assert result.returncode == code, stderr
    assert stderr.startswith("heel: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    return stderr


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), None where
    there is no such process or it has died (a zombie): with it, a later
    look tells the same process from another given the freed pid since."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def unique_marker() -> str:
    """A `sleep` argument no other process on the host has: NNN.NNNNNN seconds."""
    return f"{random.randint(600, 999)}.{random.randint(100000, 999999)}"


def processes_with(arg: str) -> list[int]:
    """Host pids whose command line has ``arg`` as one of its arguments."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if arg.encode() in argv:
            found.append(int(entry))
    return found


async def wait_for_processes(marker: str, count: int, timeout: float = 10) -> list[int]:
    """Poll the host's /proc until `count` processes carry `marker`."""
    import trio

    with trio.fail_after(timeout):
        while len(found := processes_with(marker)) < count:
            await trio.sleep(0.02)
    return found


def kill_marked(marker: str) -> None:
    """What a failed test left running: stopped first (so it forks no
    more), then killed."""
    import signal

    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in processes_with(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


#: Code prepended to sandboxed scripts: a raw IPC connection, as heel.client
#: opens one (a socketpair end passed over fd 3), with msgpack at hand.
IPC_RAW = """
import os, socket, struct, sys, time
from heel._ipc_codec import _msgpack
msgpack = _msgpack()
def connect():
    broker = socket.socket(fileno=os.dup(int(os.environ.get("HEEL_IPC_FD", "3"))))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    socket.send_fds(broker, [b"c"], [theirs.fileno()])
    theirs.close()
    broker.close()
    ours.settimeout(10)
    return ours
def frame(body):
    return struct.pack(">I", len(body)) + body
def closed_by_host(sock):
    # True when the host drops the connection (EOF or reset) within the timeout.
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
"""


#: The start of an in-sandbox client that speaks to the proxy named by
#: $HTTP_PROXY itself, so that a test controls every byte it sends and sees
#: every byte of the answer: ``proxy`` (the URL's parts), ``credential``
#: and ``auth`` (its Proxy-Authorization line), ``connect_proxy()``,
#: ``read_all()`` (to the end, or a reset), ``read_head()`` (an answer's head
#: as text, and the bytes after it) and ``socks_connect()`` (user and
#: password, then CONNECT to a name); ``connect_and_send()`` and
#: ``socks_and_send()`` open a tunnel, send a payload and a half-close, and
#: print the answer and what came back.
PROXY_CLIENT = r"""
import base64, os, socket, struct, sys, time, urllib.parse

proxy = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])
credential = base64.b64encode(f"{proxy.username}:{proxy.password}".encode()).decode()
auth = f"Proxy-Authorization: Basic {credential}\r\n".encode()


def connect_proxy(timeout=10):
    return socket.create_connection((proxy.hostname, proxy.port), timeout=timeout)


def read_all(s, data=b""):
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def read_head(s):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head.decode(errors="replace"), rest


def socks_connect(name, port):
    s = connect_proxy()
    user, password = proxy.username.encode(), proxy.password.encode()
    s.sendall(b"\x05\x01\x02")
    assert s.recv(2) == b"\x05\x02"
    s.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
    assert s.recv(2) == b"\x01\x00"
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + int(port).to_bytes(2, "big"))
    return s


def connect_and_send(target, payload):
    s = connect_proxy()
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n".encode() + auth + b"\r\n")
    head, rest = read_head(s)
    print("STATUS", head.splitlines()[0] if head else "none")
    if head.startswith("HTTP/1.1 200"):
        s.sendall(payload.encode())
        s.shutdown(socket.SHUT_WR)
        print("DATA", read_all(s, rest).decode(errors="replace"))
    else:
        print("BODY", read_all(s, rest).decode(errors="replace").strip())


def socks_and_send(host, port, payload):
    s = socks_connect(host.encode(), int(port))
    reply = s.recv(262)
    print("SOCKS", reply[1])
    if reply[1] == 0:
        s.sendall(payload.encode())
        s.shutdown(socket.SHUT_WR)
        print("DATA", read_all(s).decode(errors="replace"))
"""


def usable_uv() -> str | None:
    """uv where heel's installer sandbox can run it: on the PATH, and not in
    a home directory (which that sandbox keeps closed; CI's unprivileged run
    keeps its venv, and so its uv, in its home, and tests heel's fallback to
    pip there)."""
    import shutil

    from heel._plan import _under, home_directories

    found = shutil.which("uv")
    if found is None:
        return None
    real = os.path.realpath(found)
    return None if any(_under(real, home) for home in home_directories()) else found


def make_home_with_secrets(base: str, places: dict[str, str | None]) -> tuple[str, dict[str, str], list[str]]:
    """A home in ``base`` with each of ``places`` (a path relative to it ->
    a file inside it, or None when the place is a file) holding a secret
    that names it, and beside each an ordinary file (the control) that names
    it too; every directory and file open to every uid, so that only heel
    stands in the way.  Returns the home, secret file -> content, and the
    ordinary files."""
    home = os.path.join(base, "home")
    secrets, ordinary = {}, []
    for n, (rel, inner) in enumerate(sorted(places.items())):
        secret = os.path.join(home, rel, inner) if inner else os.path.join(home, rel)
        os.makedirs(os.path.dirname(secret), exist_ok=True)
        with open(secret, "w") as f:
            f.write(f"heel-secret-{n}")
        secrets[secret] = f"heel-secret-{n}"
        beside = os.path.join(os.path.dirname(os.path.join(home, rel)), f"heel-ordinary-{n}")
        with open(beside, "w") as f:
            f.write(f"heel-ordinary-{n}")
        ordinary.append(beside)
    for root, _, files in os.walk(home):
        os.chmod(root, 0o777)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666)
    return home, secrets, ordinary


def kernel_has_passrights() -> bool:
    """Whether this kernel has SO_PASSRIGHTS (Linux 6.16)."""
    import socket

    a, b = socket.socketpair()
    with a, b:
        try:
            a.setsockopt(socket.SOL_SOCKET, 83, 0)
            return True
        except OSError:
            return False


#: Run with paths as arguments: "READ path content" for each it reads,
#: "refused path errno" for each it cannot.
READ_EACH = """
import os, sys
for path in sys.argv[1:]:
    try:
        print('READ', path, open(path).read(), flush=True)
    except OSError as e:
        print('refused', path, e.errno, flush=True)
"""


def compile_c(source: str, directory, name: str, *flags: str) -> str:
    """Build a test program from C source text with gcc, in ``directory``
    (kept out of the sandbox's way by the caller): its path.  Skips the test
    where there is no gcc."""
    import shutil
    import subprocess

    import pytest

    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the test program")
    path = os.path.join(str(directory), name + ".c")
    binary = os.path.join(str(directory), name)
    with open(path, "w") as f:
        f.write(source)
    subprocess.run(["gcc", *flags, "-o", binary, path], check=True, timeout=60)
    return binary


def heel_init_children() -> list[int]:
    """The host pids of this process's children whose argv[0] is heel-init
    (its comm is the fd it was executed from): its sandboxes' heel-inits."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0")[0]
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if argv0 == b"heel-init" and ppid == os.getpid():
            found.append(int(pid))
    return found


class Ticks:
    """A task of the host's that counts its sleeps of 10 ms until stopped:
    what the rest of the host got of trio's thread meanwhile."""

    def __init__(self) -> None:
        self.count = 0
        self._stop = trio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            await trio.sleep(0.01)
            self.count += 1

    def stop(self) -> None:
        self._stop.set()
