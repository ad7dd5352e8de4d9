"""IPC against hostile fds and fd exhaustion, with real sandboxes.

Sandboxed code passes the host, over fd 3, fds that are no connection (an
O_PATH fd of a socket inode it made, a pipe, a file, a seqpacket socket,
the broker itself), and several sandboxes of one host process open as many
connections as they can.  Everything is observed from the host: its
``async with Sandbox`` goes on, its fds come back, it can still open files,
and ordinary calls work afterwards.
"""

from __future__ import annotations

import os
import resource

import pytest
import trio

import heel
from heel import ipc
from helpers import IPC_RAW as RAW, Ticks, explain, py, sh  # RAW: a raw connection, as heel.client opens one


def _add_router() -> heel.IpcRouter:
    router = heel.IpcRouter()

    @router.command("add")
    async def add(a: int, b: int = 1) -> int:
        return a + b

    return router


def _host_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _fds_settle(expected: int, timeout: float = 5) -> int:
    """The host's fd count once it is down to ``expected`` (connections end
    when the host sees their end of file, a little after the caller exits),
    or whatever it is after ``timeout``."""
    with trio.move_on_after(timeout):
        while _host_fds() > expected:
            await trio.sleep(0.05)
    return _host_fds()


async def _call_add(sb: heel.Sandbox, a: int, *, retry_for: float = 0) -> heel.Output:
    """`heel ipc add --a A` in the sandbox, tried again for ``retry_for``
    seconds while it fails (the host gives connections back asynchronously)."""
    deadline = trio.current_time() + retry_for
    while True:
        out = await sh(sb, f"heel ipc add --a {a}", timeout=10)
        if out.returncode == 0 or trio.current_time() >= deadline:
            return out
        await trio.sleep(0.1)


# A script (after RAW) that reads one reply frame from a raw connection.
_RECV = """
def recv_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data
def ping(sock, msgid):
    # True: the host answered add(a=msgid) on sock; False: it closed sock.
    try:
        sock.sendall(frame(msgpack.packb([0, msgid, "add", {"a": msgid}])))
        head = recv_exactly(sock, 4)
        body = head and recv_exactly(sock, struct.unpack(">I", head)[0])
    except (ConnectionResetError, BrokenPipeError):
        return False
    if body is None:
        return False
    reply = msgpack.unpackb(body)
    assert reply == [1, msgid, None, msgid + 1], reply
    return True
"""

_HOSTILE_FDS = RAW + _RECV + """
import stat
results = {}
broker = socket.socket(fileno=os.dup(3))
def send(*fds):
    socket.send_fds(broker, [b"c"], list(fds))
def closed_within(probe, seconds=10):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            probe()
        except (BrokenPipeError, ConnectionRefusedError, ConnectionResetError):
            return True
        except BlockingIOError:
            pass
        time.sleep(0.02)
    return False

# An O_PATH fd of a socket inode: fstat says socket, yet no socket call works on it.
os.mknod("s.sock", stat.S_IFSOCK | 0o600)
opath = os.open("s.sock", os.O_PATH)
send(opath)
# A pipe's read end: once the host closes its copy, writing fails with EPIPE.
r, w = os.pipe()
send(r)
os.close(r)
os.set_blocking(w, False)
results["pipe_closed"] = closed_within(lambda: os.write(w, b"x"))
# A regular file.
f = os.open("plain", os.O_RDWR | os.O_CREAT, 0o600)
send(f)
os.close(f)
# One end of a seqpacket socketpair (the seccomp filter refuses datagram
# ones): once the host closes it, sending fails with EPIPE.
q1, q2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
send(q2.fileno())
q2.close()
q1.setblocking(False)
results["seqpacket_closed"] = closed_within(lambda: q1.send(b"x"))
# The sandbox's end of the broker itself (a seqpacket socket).
send(broker.fileno())
# An O_PATH fd, a pipe and a good connection in one message: the good one is served.
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
r2, w2 = os.pipe()
send(opath, r2, theirs.fileno())
theirs.close(); os.close(opath); os.close(r2)
ours.settimeout(10)
results["good_next_to_bad_fds"] = ping(ours, 7)
ours.close()
print(results)
assert all(results.values()), results
print("OK")
"""


async def test_fds_that_are_no_connection_do_not_hurt_the_host():
    # An O_PATH fd of a socket inode passed the host's S_ISSOCK check, and
    # socket.socket(fileno=) then raised EBADF out of the IPC server: the
    # host's `async with Sandbox` failed with an ExceptionGroup, and the fd
    # and the connection's count leaked.
    before = _host_fds()
    with trio.fail_after(30):
        async with heel.Sandbox(heel.SandboxConfig(ipc=_add_router())) as sb:
            out = await _call_add(sb, 1)           # warm: every fd the sandbox keeps is open
            assert out.returncode == 0 and out.stdout == b"2\n", explain(out)
            await trio.sleep(0.3)                    # the host sees that call's connection end
            base = _host_fds()
            out = await py(sb, _HOSTILE_FDS)
            assert out.returncode == 0 and b"OK" in out.stdout, explain(out)
            out = await _call_add(sb, 41)            # the control: the host still serves
            assert out.returncode == 0 and out.stdout == b"42\n", explain(out)
            assert await _fds_settle(base) == base, "the host kept fds the sandbox passed it"
        assert await _fds_settle(before) <= before


_HOG = RAW + _RECV + """
want = int(sys.argv[1])
socks = [connect() for _ in range(want)]
held = [s for i, s in enumerate(socks) if ping(s, i)]
print("HELD", len(held), flush=True)
while not os.path.exists("go"):
    time.sleep(0.02)
for s in socks:
    s.close()
"""


async def _read_line(stream) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some()
        if not chunk:
            break
        data += chunk
    return data


async def test_sandboxes_of_one_process_share_one_connection_budget():
    # Each sandbox's IPC server granted (soft RLIMIT_NOFILE - 128) // 2
    # connections of its own: a few hostile sandboxes together took every fd
    # of the host process, whose own open() then failed with EMFILE.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = 256
    if hard != resource.RLIM_INFINITY and hard < limit:
        pytest.skip(f"needs a hard fd limit of {limit} or more")
    if _host_fds() > 64:
        pytest.skip("the test process has too many fds open already")
    sandboxes, per_sandbox = 3, 50
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        budget = ipc._connection_budget()
        assert budget is not None and budget < sandboxes * per_sandbox
        with trio.fail_after(60):
            async with heel.Sandbox(heel.SandboxConfig(ipc=_add_router())) as a, \
                    heel.Sandbox(heel.SandboxConfig(ipc=_add_router())) as b, \
                    heel.Sandbox(heel.SandboxConfig(ipc=_add_router())) as c:
                boxes = [a, b, c]
                hogs = [await sb.command("python3").args(["-c", _HOG, str(per_sandbox)])
                        .stdout(heel.Stdio.PIPE).spawn() for sb in boxes]
                try:
                    held = []
                    for hog in hogs:
                        line = await _read_line(hog.stdout)
                        assert line.startswith(b"HELD "), line
                        held.append(int(line.split()[1]))
                    # All the sandboxes together stay within the process's budget.
                    assert sum(held) <= budget, (held, budget)
                    assert sum(held) == budget, (held, budget)   # and it is what they got, no less
                    # The host can still open files meanwhile.
                    files = []
                    try:
                        for _ in range(40):
                            files.append(os.open("/dev/null", os.O_RDONLY))
                    finally:
                        for fd in files:
                            os.close(fd)
                    # A call over the budget fails at once, with an error (no hang):
                    # the host closes its connection (the client reports EPIPE or
                    # ECONNRESET, whichever comes first).
                    out = await sh(a, "heel ipc add --a 1", timeout=10)
                    assert out.returncode == 1 and not out.timed_out, explain(out)
                    assert out.stderr.startswith(b"heel ipc: "), explain(out)
                finally:
                    for sb in boxes:
                        (sb.workdir / "go").write_bytes(b"")
                    with trio.move_on_after(10):
                        for hog in hogs:
                            await hog.wait()
                    for hog in hogs:
                        hog.kill()
                # Once they let go, every sandbox calls as usual.
                for sb in boxes:
                    out = await _call_add(sb, 41, retry_for=5)
                    assert out.returncode == 0 and out.stdout == b"42\n", explain(out)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_connection_made_blocking_again_does_not_block_the_host():
    """The connection's socket is the sandbox's own open file: it clears the
    O_NONBLOCK that the host set on it, then sends one byte and keeps quiet.
    The host must not block in recv() (that would stop every task of the
    host's process): its other tasks go on, and the command's timeout still
    ends the command."""
    script = RAW + _RECV + """
import fcntl
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
socket.send_fds(socket.socket(fileno=os.dup(3)), [b"c"], [theirs.fileno()])
ours.settimeout(10)
assert ping(ours, 1)  # the host serves it, and has made it non-blocking
flags = fcntl.fcntl(theirs.fileno(), fcntl.F_GETFL)
print("host made it non-blocking:", bool(flags & os.O_NONBLOCK), flush=True)
fcntl.fcntl(theirs.fileno(), fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
ours.send(b"\\0")  # a frame's first byte: the host reads it, and waits for more
print("cleared", flush=True)
time.sleep(60)
"""
    ticks = Ticks()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticks.run)
        async with heel.Sandbox(heel.SandboxConfig(ipc=_add_router())) as sb:
            with trio.fail_after(30):  # the host hung: the test fails instead
                out = await py(sb, script, timeout=3)
            ticks.stop()
    assert b"host made it non-blocking: True" in out.stdout and b"cleared" in out.stdout, explain(out)
    assert out.timed_out, explain(out)
    # Another task of the host ran while the command held its connection
    # (3 s: some 300 ticks).
    assert ticks.count >= 100, ticks.count


@pytest.mark.parametrize("connections, elements", [(1, 1024 * 1024), (64, 16 * 1024 - 32)])
async def test_requests_back_to_back_leave_the_host_time_to_run(connections, elements):
    """Requests of empty arrays (the slowest to decode for their size),
    sent back to back for four seconds: large ones (a million arrays) over
    one connection, or small ones (16 KiB, under the byte budget's bar) over
    64 connections at once.  Decoding holds trio's thread, but the sandbox's
    requests are decoded one at a time and take at most half of the time,
    so the host's other tasks go on.  (Before: a 10 ms ticker ran 2.5% of
    the times it could for large requests, 3% for small ones.)"""
    script = RAW + """
import select
n, count = int(sys.argv[1]), int(sys.argv[2])
data = frame(msgpack.packb([0, 1, "add", {"a": [[]] * n}]))
socks = [connect() for _ in range(count)]
for s in socks:
    s.setblocking(False)
at = {s.fileno(): 0 for s in socks}
by_fd = {s.fileno(): s for s in socks}
poller = select.epoll()
for s in socks:
    poller.register(s.fileno(), select.EPOLLIN | select.EPOLLOUT)
sent, deadline = 0, time.time() + 4
while time.time() < deadline:
    for fd, events in poller.poll(0.1):
        s = by_fd[fd]
        if events & select.EPOLLIN:
            try:
                while s.recv(1 << 20):
                    pass
            except BlockingIOError:
                pass
        if events & select.EPOLLOUT:
            try:
                at[fd] += s.send(data[at[fd]:])
            except BlockingIOError:
                continue
            if at[fd] == len(data):
                at[fd], sent = 0, sent + 1
print("sent", sent, flush=True)
"""
    ticks = Ticks()
    async with trio.open_nursery() as nursery:
        async with heel.Sandbox(heel.SandboxConfig(ipc=_add_router())) as sb:
            nursery.start_soon(ticks.run)
            start = trio.current_time()
            out = await py(sb, script, str(elements), str(connections), timeout=60)
            elapsed = trio.current_time() - start
            ticks.stop()
    assert out.returncode == 0 and b"sent" in out.stdout, explain(out)
    sent = int(out.stdout.split()[1])
    assert sent >= 2, explain(out)
    # Half of the time is the host's, less what the rest of the requests'
    # handling takes: the ticker runs at least a fifth of the times it could.
    assert ticks.count >= 0.2 * elapsed / 0.01, (ticks.count, elapsed, sent)
