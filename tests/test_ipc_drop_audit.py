"""Mutation audit (r32) of the code that keeps the fds a sandbox hands over
IPC from being dropped (or kept) on the host's trio thread, and of the
relay's urgent data: what the tests of test_ipc_drop_review.py,
test_redteam_r30.py and the others let through.

- a connection whose queued bytes (fds along them) are more than one read
  of 64 KiB: after the first read in the worker thread the rest must still
  be read there (_read_unsafe's count), and a connection that ends before
  the rest was read must be closed there too (_serve_connection), since
  the close purges the fds still queued;
- a broker message with a connection and another fd, or another fd alone:
  the host must not keep the other fd (nor the copy its peek made) open;
- a sandbox closed while the IPC worker thread is about to read the broker
  must not close the broker under it (Sandbox._close waits for _ipc_done);
- a connection over the router's max_connections is closed (its queue,
  fds too, purged) in the worker thread;
- a broker message of 253 fds: the host reads it with room for four, and
  holds no more than that at once;
- the relay gets past TCP's urgent mark when epoll tells of urgent data,
  not only at the sender's end of file (test_redteam_r30's client always
  half-closes, and the end of file got past the mark too).

Each next to a control that does the same without the attack: a real
sandbox, observed from the host.
"""

from __future__ import annotations

import os
import socket

import pytest
import trio

import heel
from helpers import PROXY_CLIENT, explain, py
from netservers import RawServer, resolver_for
from test_ipc_drop_review import (GiB, _fds_held_while, _hand_over_and_watch, _Heartbeat, _need_memory, _ping_router,
                                  _read_until)

QUEUED_PAST_ONE_READ = r"""
import os, socket, struct, sys, threading, time
from heel import _ipc_codec as codec
how, size = sys.argv[1], int(sys.argv[2])

def rights(fds):
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds))]

fd = os.memfd_create("heavy")
os.posix_fallocate(fd, 0, size)
heavy, wrapper = socket.socketpair()
wrapper.sendmsg([b"x"], rights([fd]))
os.close(fd)
wrapper.close()
if how == "garbage":  # a frame announcing 4 GiB: the host drops the connection after its first read
    data = b"\xff" * 75000
else:  # requests of some 15 KB each (each answered with an error: ping takes no pad)
    conn = codec.Connection("client", 1 << 20, pure_python=True)
    count = 5 if how == "requests" else 2  # 75 KB: more than one read of 64 KiB; the control 30 KB
    data = b"".join(conn.send(codec.Request(i, "ping", {"pad": "x" * 15000})) for i in range(count))
ours, theirs = socket.socketpair()
# Queued before the host has the connection, the fd with the very last byte.
ours.sendall(data[:-1])
ours.sendmsg([data[-1:]], rights([heavy.fileno()]))
heavy.close()
threading.Thread(target=lambda: [None for _ in iter(lambda: ours.recv(65536), b"")], daemon=True).start()
broker = socket.socket(fileno=int(os.environ["HEEL_IPC_FD"]))
broker.sendmsg([b"c"], rights([theirs.fileno()]))
theirs.close()
print("handed over", flush=True)
time.sleep(30)
"""


@pytest.mark.parametrize("how", ["requests", "garbage", "control"])
async def test_fds_queued_past_the_first_read_of_a_connection_are_not_freed_on_the_hosts_event_loop(how):
    """The sandbox queues 75 KB on a connection before it hands it over,
    with a 4 GiB memfd (in a socket) along the last byte.  The host counts
    those bytes as unsafe and reads them in its worker thread 64 KiB at a
    time: the second read, which drops the memfd, must be made there too
    ("requests": the count goes down by what was read, not to 0).  With
    "garbage" the stream is broken from its first frame, and the host drops
    the connection after its first read, with the memfd still queued:
    the close that purges it must be made in the worker thread too.  The
    control queues 30 KB, which one read takes."""
    said, gap = await _hand_over_and_watch(QUEUED_PAST_ONE_READ, how)
    assert gap < 0.4, f"the host's event loop stood still for {gap:.2f} s ({said!r})"


STRAY_FD = r"""
import os, socket, struct, sys, time
how = sys.argv[1]

def rights(fds):
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds))]

stray = os.memfd_create("heel-audit-stray")
broker = socket.socket(fileno=int(os.environ["HEEL_IPC_FD"]))
ours, theirs = socket.socketpair()
if how == "with_connection":
    broker.sendmsg([b"c"], rights([theirs.fileno(), stray]))
elif how == "alone":
    broker.sendmsg([b"c"], rights([stray]))
else:  # the control: a connection alone
    broker.sendmsg([b"c"], rights([theirs.fileno()]))
os.close(stray)
theirs.close()
print("handed over", flush=True)
time.sleep(30)
"""


def _host_fds_of(name: str) -> list[str]:
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if name in target:
            held.append(f"{fd} -> {target}")
    return held


@pytest.mark.parametrize("how", ["with_connection", "alone", "control"])
async def test_the_host_keeps_no_fd_the_sandbox_passes_along_with_or_instead_of_a_connection(how):
    """A broker message that carries a connection and a memfd, or a memfd
    alone: the host closes what is no connection (and the copies its peek
    of the message made).  An fd it kept would hold the sandbox's file (of
    any size) in the host for as long as the host runs, and one fd of the
    host's RLIMIT_NOFILE with it, each time the sandbox sends one.  A second
    later the host holds no fd of it; the control passes a connection
    alone (and the observation sees the memfd while the sandbox holds it:
    it is looked for in the host only)."""
    async with heel.Sandbox(heel.SandboxConfig(ipc=_ping_router())) as sb:
        process = await sb.python().args(["-c", STRAY_FD, how]).stdout(heel.Stdio.PIPE).timeout(60).spawn()
        async with process:
            said = await _read_until(process, b"handed over")
            await trio.sleep(1)
            held = _host_fds_of("heel-audit-stray")
            process.kill()
        control = await sb.python().args(["-c", "from heel.client import call; print(call('ping'))"]) \
            .timeout(30).output()
    assert control.stdout == b"pong\n", control
    assert not held, f"the host still holds the sandbox's memfd: {held} ({said!r})"


NOT_A_CONNECTION = r"""
import os, socket, struct, time
broker = socket.socket(fileno=int(os.environ["HEEL_IPC_FD"]))
null = os.open("/dev/null", os.O_RDONLY)
broker.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", null))])
print("handed over", flush=True)
time.sleep(30)
"""


@pytest.mark.parametrize("how", ["closed_at_once", "control"])
async def test_the_broker_is_not_closed_under_the_ipc_worker_thread(how, monkeypatch):
    """What is no plain connection is read from the broker in the sandbox's
    worker thread, which no cancel stops (and which may first spend a
    while closing what came before: here a second, as a large memfd would).
    A sandbox closed meanwhile must wait for that thread before it closes
    the broker (Sandbox._close waits for _ipc_done): else the thread reads
    an fd number that is closed, or by then another file's of the host.
    The thread looks, as it is about to read, whether the broker is still
    open.  The control closes the sandbox once the thread is done."""
    import threading
    import time

    from heel import ipc

    entered = threading.Event()
    seen: list[int] = []
    real = ipc._receive_connections

    def slow(broker, copies):
        entered.set()
        time.sleep(1)
        seen.append(broker.fileno())
        return real(broker, copies)

    monkeypatch.setattr(ipc, "_receive_connections", slow)
    async with heel.Sandbox(heel.SandboxConfig(ipc=_ping_router())) as sb:
        process = await sb.python().args(["-c", NOT_A_CONNECTION]).stdout(heel.Stdio.PIPE).timeout(60).spawn()
        await _read_until(process, b"handed over")
        with trio.fail_after(10):
            while not entered.is_set():
                await trio.sleep(0.01)
        if how == "control":
            await trio.sleep(1.5)
    assert seen and seen[0] >= 0, f"the broker was closed while the worker thread was to read it ({seen})"


# ---- the relay: an urgent byte in a conversation that is not ended -----------------------

#: In the sandbox: a CONNECT tunnel to the test's server, which gets
#: "before", one byte (argv[2] == "urgent": sent with MSG_OOB) and "after";
#: the client then waits for the server's answer without ending its side
#: (a request and its reply, as an interactive protocol has it).
URGENT_CONVERSATION = PROXY_CLIENT + r"""
target, how = sys.argv[1], sys.argv[2]
s = connect_proxy()
s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n".encode() + auth + b"\r\n")
head, rest = read_head(s)
print("STATUS", head.splitlines()[0] if head else "none", flush=True)
s.sendall(b"before")
time.sleep(0.2)
s.send(b"!", socket.MSG_OOB if how == "urgent" else 0)
time.sleep(0.2)
s.sendall(b"after")
s.settimeout(5)
try:
    print("ANSWER", read_all(s, rest).decode(errors="replace"), flush=True)
except socket.timeout:
    print("STALLED", flush=True)
"""


def _answer_at_after(conn: socket.socket, server) -> None:
    """Read until "after" has come (urgent data inline), answer, close."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    data = b""
    conn.settimeout(10)
    while not data.endswith(b"after"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    server.received.append(data)
    conn.sendall(b"got %d" % len(data))
    conn.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("how", ["urgent", "plain"])
async def test_an_urgent_byte_does_not_stall_a_tunnel_whose_client_waits_for_an_answer(how):
    """splice() stops at TCP's urgent mark; the relay gets past it when
    epoll tells of urgent data (EPOLLPRI, asked for in endpoint_wanted, and
    the EAGAIN it then makes flow_fill take for the mark), not only at the
    sender's end of file.  test_redteam_r30's client half-closes right
    after its bytes, and the end of file got past the mark as well: here it
    waits for the server's answer, and the server answers once it has read
    "after".  The control sends the same byte without MSG_OOB."""
    server = RawServer(_answer_at_after)
    server.received = []
    try:
        async with heel.Sandbox(heel.SandboxConfig(level=heel.IsolationLevel.PERMISSIVE,
                                                   network=heel.AllowList(["rec.test"])),
                                resolver=resolver_for({"rec.test": ["127.0.0.1"]})) as sb:
            out = await py(sb, URGENT_CONVERSATION, f"rec.test:{server.port}", how, timeout=30)
        said = out.stdout.decode()
        assert "STATUS HTTP/1.1 200" in said, explain(out)
        assert "ANSWER got 12" in said, f"the tunnel stalled at the urgent mark: {explain(out)} {server.received}"
        assert server.received == [b"before!after"]
    finally:
        server.close()



# ---- a connection refused (max_connections) is closed in the worker thread ---------------

REFUSED_CONNECTION = r"""
import os, socket, struct, sys, time
from heel.client import call
how, size = sys.argv[1], int(sys.argv[2])

def rights(fds):
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds))]

fd = os.memfd_create("heavy")
os.posix_fallocate(fd, 0, size)
# A connected stream socket (what a connection is), with the memfd queued
# on it: the host's close of it purges the queue and frees the memfd.
heavy, wrapper = socket.socketpair()
wrapper.sendmsg([b"x"], rights([fd]))
os.close(fd)
wrapper.close()
if how == "over_the_limit":
    print(call("ping"), flush=True)  # this process's connection: the router's one
broker = socket.socket(fileno=int(os.environ["HEEL_IPC_FD"]))
broker.sendmsg([b"c"], rights([heavy.fileno()]))
heavy.close()
print("handed over", flush=True)
time.sleep(30)
"""


@pytest.mark.parametrize("how", ["over_the_limit", "control"])
async def test_a_connection_over_max_connections_is_not_freed_on_the_hosts_event_loop(how):
    """The router takes one connection (max_connections=1); the sandbox
    holds it, then passes a second one with a 4 GiB memfd queued on it.
    The host refuses it and closes it, which purges its queue: in the
    worker thread (serve's _close_in_thread), not on trio's.  The control
    passes the same socket as the only connection: the host reads it, in
    the worker thread too (its bytes came with fds)."""
    size = 4 * GiB
    _need_memory(3 * size)
    router = heel.IpcRouter(max_connections=1)

    @router.command("ping")
    async def ping() -> str:
        return "pong"

    heartbeat = _Heartbeat()
    async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeat.run)
            process = await sb.python().args(["-c", REFUSED_CONNECTION, how, str(size)]) \
                .stdout(heel.Stdio.PIPE).timeout(90).spawn()
            async with process:
                said = await _read_until(process, b"handed over")
                await trio.sleep(2)
                process.kill()
            nursery.cancel_scope.cancel()
    if how == "over_the_limit":
        assert b"pong" in said, said
    gap = heartbeat.longest_gap()
    assert gap < 0.4, f"the host's event loop stood still for {gap:.2f} s ({said!r})"


# ---- the broker's message: at most four fds installed in the host ------------------------

MANY_FDS_ON_THE_BROKER = r"""
import os, socket, struct, sys, time
how, size = sys.argv[1], int(sys.argv[2])
heavy = os.memfd_create("heavy")
os.posix_fallocate(heavy, 0, size)
null = os.open("/dev/null", os.O_RDONLY)
fds = [heavy] + ([null] * 252 if how == "many" else [])  # one fd may be listed many times
broker = socket.socket(fileno=int(os.environ["HEEL_IPC_FD"]))
broker.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds))])
os.close(heavy)
print("handed over", flush=True)
time.sleep(30)
"""


@pytest.mark.parametrize("how", ["many", "control"])
async def test_a_broker_message_does_not_make_the_host_hold_hundreds_of_fds(how):
    """A broker message may carry 253 fds; the host reads it with room for
    four (_receive_connections), and the kernel drops the rest inside the
    recvmsg.  With room for them all they are installed in the host's fd
    table and closed one by one, the first a 1 GiB memfd (some 0.2 s): the
    host holds the 252 others meanwhile (see test_ipc_drop_review's test of
    a connection's queue, and _connection_budget).  The control passes the
    memfd alone."""
    said, grown = await _fds_held_while(MANY_FDS_ON_THE_BROKER, how)
    assert grown < 32, f"the host held {grown} more fds at once ({said!r})"
