"""Network and IPC reach: the sandbox tries to talk to, or signal, the host.

The host side holds the listener (or the process) and checks afterwards that
nothing arrived (or that it is still alive); a host-side client proves the
listener would have seen a connection.
"""

from __future__ import annotations

import errno
import os
import secrets
import select
import socket
import sys
import tempfile
import time

import pytest
import trio

import heel
from helpers import explain, py

DEFAULT = heel.IsolationLevel.DEFAULT
STRICT = heel.IsolationLevel.STRICT
PERMISSIVE = heel.IsolationLevel.PERMISSIVE


def nothing_arrived(sock: socket.socket, wait: float = 0.3) -> bool:
    """True when no connection (or datagram) is waiting on sock after `wait` seconds."""
    readable, _, _ = select.select([sock], [], [], wait)
    return not readable


def accept_one(server: socket.socket) -> bytes:
    readable, _, _ = select.select([server], [], [], 5)
    assert readable, "the host-side control did not reach the listener"
    conn, _ = server.accept()
    with conn:
        conn.settimeout(5)
        return conn.recv(100)


@pytest.fixture
def tcp_listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    with server:
        yield server


@pytest.fixture
def udp_receiver():
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    with receiver:
        yield receiver


@pytest.fixture
def unix_listener(outside_dir):
    path = os.path.join(outside_dir, "host.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o777)
    server.listen(8)
    server.setblocking(False)
    with server:
        yield server, path


@pytest.fixture
def abstract_listener():
    name = b"\0heel-test-" + secrets.token_hex(8).encode()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(name)
    server.listen(8)
    server.setblocking(False)
    with server:
        yield server, name


CONNECT_TCP = """
import socket, sys
port = int(sys.argv[1])
for family, host in ((socket.AF_INET, '127.0.0.1'), (socket.AF_INET6, '::ffff:127.0.0.1')):
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(3)
        s.connect((host, port))
        s.sendall(b'leak')
        print('CONNECTED', host)
    except OSError as e:
        print('refused', host, e.errno)
"""


async def test_tcp_to_host_listener(tcp_listener):
    port = tcp_listener.getsockname()[1]
    async with heel.Sandbox(heel.SandboxConfig(level=PERMISSIVE)) as sb:
        out = await py(sb, CONNECT_TCP, str(port))
    assert out.returncode == 0 and b"CONNECTED" not in out.stdout, explain(out)
    assert out.stdout.count(b"refused") == 2, explain(out)
    assert nothing_arrived(tcp_listener), "a connection from the sandbox reached the host"
    # Control: the listener does see a connection from the host.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(b"host")
        assert accept_one(tcp_listener) == b"host"


async def test_udp_to_host(udp_receiver):
    port = udp_receiver.getsockname()[1]
    async with heel.Sandbox(heel.SandboxConfig(level=PERMISSIVE)) as sb:
        out = await py(sb, """
            import socket, sys
            try:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.sendto(b'leak', ('127.0.0.1', int(sys.argv[1])))
                print('SENT')
            except OSError as e:
                print('refused', e.errno)
            """, str(port))
    assert out.returncode == 0 and b"SENT" not in out.stdout, explain(out)
    assert nothing_arrived(udp_receiver), "a datagram from the sandbox reached the host"
    # Control: a datagram from the host arrives.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(b"host", ("127.0.0.1", port))
    assert not nothing_arrived(udp_receiver, wait=5)
    assert udp_receiver.recv(100) == b"host"


CONNECT_UNIX = """
import socket, sys
name = sys.argv[1]
if name.startswith('@'):
    name = '\\0' + name[1:]
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect(name)
    s.sendall(b'leak')
    print('CONNECTED')
except OSError as e:
    print('refused', e.errno)
    sys.exit(3)
"""


def unix_arg(name) -> str:
    return "@" + name[1:].decode() if isinstance(name, bytes) else name


@pytest.mark.parametrize("kind", ["pathname", "abstract"])
async def test_host_unix_sockets_unreachable_by_default(kind, request):
    server, name = request.getfixturevalue(f"{'unix' if kind == 'pathname' else 'abstract'}_listener")
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        out = await py(sb, CONNECT_UNIX, unix_arg(name))
    assert out.returncode == 3 and b"CONNECTED" not in out.stdout, explain(out)
    assert nothing_arrived(server), "a connection from the sandbox reached the host socket"
    # Control: the host can connect to it.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(name)
        client.sendall(b"host")
        assert accept_one(server) == b"host"


async def test_abstract_host_socket_unreachable_with_unix_sockets_allowed(abstract_listener):
    server, name = abstract_listener
    security = heel.SecurityConfig(allow_unix_sockets=True)
    async with heel.Sandbox(heel.SandboxConfig(level=PERMISSIVE, security=security)) as sb:
        out = await py(sb, CONNECT_UNIX, unix_arg(name))
    assert out.returncode == 3 and b"CONNECTED" not in out.stdout, explain(out)
    assert nothing_arrived(server)


async def test_pathname_host_socket_reachable_with_unix_sockets_allowed(unix_listener):
    """What allow_unix_sockets=True means: socket(AF_UNIX) is allowed, and a
    pathname socket of the host that the sandbox can see is then reachable
    (Landlock before ABI 9 does not mediate connect() to a unix socket; the
    read-only view does not stop it either).  Abstract sockets stay closed."""
    server, path = unix_listener
    security = heel.SecurityConfig(allow_unix_sockets=True)
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT, security=security)) as sb:
        out = await py(sb, CONNECT_UNIX, path)
    assert out.returncode == 0 and b"CONNECTED" in out.stdout, explain(out)
    assert accept_one(server) == b"leak"


async def test_unix_sockets_allowed_reach_even_unlisted_pathname_sockets(unix_listener):
    """What allow_unix_sockets=True means, stated as a test: Landlock does not
    mediate connect() to a pathname socket, so at STRICT, where the socket's
    directory cannot even be listed, a connection still arrives.  The README
    says so; the default (False) refuses socket(AF_UNIX) altogether."""
    server, path = unix_listener
    security = heel.SecurityConfig(allow_unix_sockets=True)
    # A grant beside the socket's directory keeps STRICT from covering the
    # top-level directory that holds both (which would hide the socket too:
    # the test below).
    beside = tempfile.mkdtemp(dir=os.path.dirname(os.path.dirname(path)), prefix="heel-test-beside-")
    os.chmod(beside, 0o755)
    try:
        config = heel.SandboxConfig(level=STRICT, security=security, readable=[beside])
        async with heel.Sandbox(config) as sb:
            hidden = await py(sb, "import os, sys; os.listdir(os.path.dirname(sys.argv[1]))", path)
            assert hidden.returncode != 0, explain(hidden)  # the directory itself is not readable
            out = await py(sb, CONNECT_UNIX, path)
    finally:
        os.rmdir(beside)
    assert b"CONNECTED" in out.stdout, explain(out)
    assert accept_one(server) == b"leak"


async def test_strict_covers_unix_sockets_in_top_level_directories_it_is_not_given(unix_listener):
    """At STRICT a top-level directory that holds nothing the sandbox is
    given is covered, sockets in it (docker.sock, D-Bus in /run) too: even
    allow_unix_sockets cannot reach them.  The control is the test above."""
    server, path = unix_listener
    top = "/" + path.split("/")[1] + "/"
    if any(os.path.realpath(p).startswith(top) for p in (heel.__file__, sys.prefix, tempfile.gettempdir())):
        pytest.skip("heel itself or its temporary directories are in the socket's top-level directory")
    security = heel.SecurityConfig(allow_unix_sockets=True)
    async with heel.Sandbox(heel.SandboxConfig(level=STRICT, security=security)) as sb:
        out = await py(sb, CONNECT_UNIX, path)
    assert b"CONNECTED" not in out.stdout, explain(out)
    assert select.select([server], [], [], 0.5)[0] == []  # nothing arrived


INTERNAL_UNIX = """
import os, socket, sys
path = os.path.join(os.getcwd(), 'inner.sock')
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen(1)
pid = os.fork()
if pid == 0:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    client.sendall(b'inside')
    os._exit(0)
conn, _ = server.accept()
print(conn.recv(100).decode())
os.waitpid(pid, 0)
"""


@pytest.mark.parametrize("allow", [True, False])
async def test_unix_sockets_inside_the_sandbox(allow):
    security = heel.SecurityConfig(allow_unix_sockets=allow)
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT, security=security)) as sb:
        out = await py(sb, INTERNAL_UNIX)
        if allow:
            assert out.returncode == 0 and out.stdout == b"inside\n", explain(out)
        else:
            assert out.returncode != 0 and b"PermissionError" in out.stderr, explain(out)
        # socketpair() works either way.
        pair = await py(sb, """
            import os, socket
            a, b = socket.socketpair()
            if os.fork() == 0:
                a.sendall(b'pair'); os._exit(0)
            print(b.recv(4).decode()); os.wait()
            """)
        assert pair.returncode == 0 and pair.stdout == b"pair\n", explain(pair)


async def test_signals_do_not_reach_host_processes(host_sleeper):
    pid = host_sleeper.pid
    async with heel.Sandbox(heel.SandboxConfig(level=PERMISSIVE)) as sb:
        out = await py(sb, """
            import os, signal, subprocess, sys
            pid = int(sys.argv[1])
            for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP):
                try:
                    os.kill(pid, sig)
                    print('SIGNALLED', pid, sig)
                except OSError as e:
                    print('refused', sig, e.errno)
            print('shell kill:', subprocess.run(['kill', '-TERM', str(pid)], capture_output=True).returncode)
            # Control: a process of the sandbox itself can be signalled.
            child = subprocess.Popen(['sleep', '30'])
            os.kill(child.pid, signal.SIGTERM)
            print('own child:', child.wait())
            """, str(pid))
        assert out.returncode == 0, explain(out)
        assert b"SIGNALLED" not in out.stdout and b"shell kill: 0" not in out.stdout, explain(out)
        assert b"own child: -15" in out.stdout, explain(out)
        # Everything at once: kill(-1) reaches every process the caller may signal.
        # (ESRCH: nothing the caller may signal; the host process must survive either way.)
        out = await py(sb, """
            import os, signal
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
            print('sent')
            """)
        assert out.returncode == 0 and out.stdout == b"sent\n", explain(out)
    time.sleep(0.2)
    assert host_sleeper.poll() is None, "the host process was killed from inside the sandbox"
    with open(f"/proc/{pid}/stat") as f:
        assert f.read().split(") ")[1][0] in "SR", "the host process was stopped from inside the sandbox"


async def test_datagram_socketpair_cannot_reach_host_unix_socket(outside_dir):
    """socketpair(AF_UNIX, SOCK_DGRAM) would give a socket that sendto() can
    aim at any pathname socket of the host (/dev/log, a daemon's), with
    socket(AF_UNIX) refused: only stream and seqpacket pairs are allowed."""
    os.chmod(outside_dir, 0o777)
    path = os.path.join(outside_dir, "host-dgram.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        os.chmod(path, 0o666)
        receiver.setblocking(False)
        async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
            out = await py(sb, """
                import socket, sys
                try:
                    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                    a.sendto(b'leak', sys.argv[1])
                    print('SENT')
                except OSError as e:
                    print('refused', e.errno)
                """, path)
            assert out.returncode == 0 and b"SENT" not in out.stdout, explain(out)
            assert out.stdout == b"refused 1\n", explain(out)
            # Control: the stream pair that processes inside talk over works.
            pair = await py(sb, """
                import socket
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                a.sendall(b'pair'); print(b.recv(4).decode())
                """)
            assert pair.returncode == 0 and pair.stdout == b"pair\n", explain(pair)
        try:
            leaked = receiver.recv(100)
        except BlockingIOError:
            leaked = None
        assert leaked is None, f"a datagram from the sandbox reached the host socket: {leaked!r}"
        # Control: a datagram from the host does arrive.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"host", path)
        assert receiver.recv(100) == b"host"


PORT_RULE = """
import ctypes, socket, sys
from heel import _landlock as ll, _native
allowed, denied = int(sys.argv[1]), int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
fd = _native.landlock_ruleset(0, ll.BIND_TCP | ll.CONNECT_TCP, 0)
_native.landlock_add_port(fd, allowed, ll.CONNECT_TCP)
assert libc.syscall(446, fd, 0) == 0  # landlock_restrict_self
for port in (allowed, denied):
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port))
        print(port, "connected")
    except OSError as e:
        print(port, "refused", e.errno)
"""


def test_landlock_tcp_port_rule():
    """heel's Landlock port rules (ABI 4), on the kernel: a process that
    restricted itself connects to the port its rule allows and no other
    (the network policy issue builds on this)."""
    import subprocess
    import sys

    if heel.probe().landlock_abi < 4:
        pytest.skip("needs Landlock ABI 4")
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    try:
        allowed, denied = (s.getsockname()[1] for s in listeners)
        done = subprocess.run([sys.executable, "-c", PORT_RULE, str(allowed), str(denied)],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [f"{allowed} connected", f"{denied} refused 13"], done.stdout
    finally:
        for s in listeners:
            s.close()


SQUAT = """
import socket, sys, time
name = b"\\0" + sys.argv[1].encode()
s = socket.socket(socket.AF_UNIX) if sys.argv[2] == "socket" else socket.socketpair()[0]
try:
    s.bind(name)
    print("bound", flush=True)
except OSError as exc:
    print("refused", exc.errno, flush=True)
time.sleep(30)
"""


@pytest.mark.parametrize("allow", [False, True])
async def test_abstract_names_of_the_host_cannot_be_taken(allow):
    """A socket bound to an abstract name takes it in its network namespace:
    a sandbox sharing the host's could take a name a host service needs
    (an X server's @/tmp/.X11-unix/X0).  Without unix sockets bind() is
    refused (a socketpair needs no name); with them, the sandbox gets a
    network namespace of its own, whose names are its own."""
    name = f"heel-squat-{secrets.token_hex(8)}"
    # (No GPU grant: where a GPU is granted, seqpacket sockets come with a
    # network namespace of their own, and bind() works there.)
    security = heel.SecurityConfig(allow_unix_sockets=allow, allow_gpu=False)
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT, security=security)) as sb:
        cmd = sb.command("python3").args(["-c", SQUAT, name, "socket" if allow else "pair"])
        process = await cmd.stdout(heel.Stdio.PIPE).timeout(60).spawn()
        async with process:
            with trio.fail_after(20):
                said = (await process.stdout.receive_some(100)).decode().split()
            # While the sandboxed process lives, the name is still free on the host.
            host = socket.socket(socket.AF_UNIX)
            try:
                host.bind(b"\0" + name.encode())
            finally:
                host.close()
            process.kill()
    assert said == (["bound"] if allow else ["refused", str(errno.EPERM)]), said


AUTOBIND = """
import socket, sys, time
pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    for end in pair:
        end.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    print("passcred", flush=True)
except OSError as exc:
    print("refused", exc.errno, flush=True)
pair[0].send(b"x")
assert pair[1].recv(1) == b"x"  # the pair works either way
name = pair[0].getsockname()  # bytes for an abstract name, "" for none
print("name", name.hex() if name else "-", flush=True)
time.sleep(30)
"""


@pytest.mark.parametrize("allow", [False, True])
async def test_a_socketpair_takes_no_abstract_name_of_the_host_by_autobind(allow):
    """A unix socket that passes credentials (SO_PASSCRED) is given an
    abstract name by the kernel when it sends: a name bound without bind().
    Without unix sockets (no network namespace) SO_PASSCRED is refused, so
    no name of the host's is taken; with them (a network namespace of the
    sandbox's own), it works and the name is the sandbox's alone: neither
    shows up among the host's sockets while the process lives."""
    security = heel.SecurityConfig(allow_unix_sockets=allow, allow_gpu=False)
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT, security=security)) as sb:
        cmd = sb.command("python3").args(["-c", AUTOBIND])
        process = await cmd.stdout(heel.Stdio.PIPE).timeout(60).spawn()
        async with process:
            said = b""
            with trio.fail_after(20):
                while said.count(b"\n") < 2:
                    said += await process.stdout.receive_some(100)
            with open("/proc/net/unix") as table:
                host_names = {line.split()[-1] for line in table.read().splitlines()[1:] if len(line.split()) > 7}
            process.kill()
    lines = said.decode().split("\n")
    assert lines[0] == ("passcred" if allow else f"refused {errno.EPERM}"), said
    name = lines[1].split()[1]
    if allow:
        # Autobound: "\0" and five hex digits, after the family.
        assert name != "-", said
        abstract = "@" + bytes.fromhex(name)[1:].decode()
        assert abstract not in host_names, abstract
    else:
        assert name == "-", said


# ---- the host's event loop and the sockets a sandbox hands over ---------------------

ATTACK = r"""
import os, socket, struct, sys, time
listener = socket.socket()
listener.listen(1)  # an ephemeral port of the sandbox's network namespace
port = listener.getsockname()[1]
c = socket.socket()
c.sendto(b"x", socket.MSG_FASTOPEN, ("127.0.0.1", port))  # never accepted, never read
c.setblocking(False)
try:
    while True:
        c.send(b"\0" * 65536)
except BlockingIOError:
    pass
try:
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 100000))
    print("linger set", flush=True)
except OSError as exc:
    print("linger refused:", exc.errno, flush=True)
fds = [c.fileno()]
if sys.argv[1] == "truncated":  # the fifth fd of a message is dropped by the kernel
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(4)] + fds
broker = socket.socket(fileno=int(os.environ["HEEL_IPC_FD"]))
broker.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds))])
c.close()
print("handed over", flush=True)
time.sleep(float(sys.argv[2]))  # the listener lives on: the host's close() waits
"""


@pytest.mark.parametrize("how", ["closed_by_host", "truncated"])
async def test_a_lingering_socket_handed_over_ipc_does_not_freeze_the_host(how):
    """Review r26: the host closes the fds a sandbox hands over IPC that are
    no IPC connection (and the kernel drops, as recvmsg returns, those past
    the four a message may carry), in trio's thread.  The last close() of a
    TCP socket with SO_LINGER and data its peer does not read waits up to the
    linger time: the host's event loop, every timeout with it, stood still
    for as long as the sandbox chose.  Inside its network namespace the
    sandbox is its own peer (listen() on an ephemeral port, MSG_FASTOPEN)."""
    router = heel.IpcRouter()

    @router.command("ping")
    async def ping() -> str:
        return "pong"

    config = heel.SandboxConfig(network=heel.AllowList(["example.invalid"]), ipc=router)
    beats: list[float] = []

    async def heartbeat():
        while True:
            beats.append(time.monotonic())
            await trio.sleep(0.05)

    async with heel.Sandbox(config) as sb:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeat)
            started = time.monotonic()
            out = await sb.python().args(["-c", ATTACK, how, "8"]).timeout(2).output()
            ended = time.monotonic()
            nursery.cancel_scope.cancel()
    assert b"handed over" in out.stdout, (out.stdout, out.stderr)
    gaps = [b - a for a, b in zip(beats, beats[1:])]
    # The command's 2 s timeout ends it, and trio never stops meanwhile.
    assert out.timed_out and ended - started < 5, (ended - started, out.stdout)
    assert max(gaps) < 1.5, f"the host's event loop stood still for {max(gaps):.1f} s ({out.stdout!r})"


@pytest.mark.parametrize("with_ipc", [True, False], ids=["ipc", "no-ipc"])
async def test_so_linger_is_refused_where_the_sandbox_has_ipc(with_ipc):
    """The linger is what makes the host's close() wait, and only IPC hands
    the host a socket of the sandbox's: there SO_LINGER is refused, and
    SO_KEEPALIVE, a neighbour, works.  Without IPC SO_LINGER works (programs
    reset connections with a zero linger)."""
    config = heel.SandboxConfig(network=heel.AllowList(["example.invalid"]),
                                ipc=heel.IpcRouter() if with_ipc else None)
    code = ("import socket, struct\n"
            "s = socket.socket()\n"
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)\n"
            "print('keepalive', s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))\n"
            "try:\n"
            "    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 5))\n"
            "    print('linger set', struct.unpack('ii', s.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)))\n"
            "except OSError as exc:\n"
            "    print('linger refused', exc.errno)\n")
    async with heel.Sandbox(config) as sb:
        out = await py(sb, code)
    assert b"keepalive 1" in out.stdout, out
    if with_ipc:
        assert b"linger refused 1" in out.stdout, out
    else:
        assert b"linger set (1, 5)" in out.stdout, out
