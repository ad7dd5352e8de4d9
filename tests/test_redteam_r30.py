"""Red-team review r30 of the C core (heel-init, the trampoline, the relay),
from inside a sandbox: each test does the attack for real and looks from
the host, next to a control that shows the observation can tell."""

from __future__ import annotations

import socket
import time

import pytest
import trio

import heel
from helpers import PROXY_CLIENT, explain, kill_marked, processes_with, py, unique_marker, wait_for_processes
from netservers import RawServer, resolver_for

PERMISSIVE = heel.IsolationLevel.PERMISSIVE
TIMEOUT = 20


# ---- the relay: TCP urgent data -------------------------------------------------------

#: In the sandbox: a CONNECT tunnel through heel's proxy to the test's
#: server, which gets argv[3] bytes of filler, "before", one byte sent with
#: MSG_OOB (TCP urgent data), "after", and a half-close (argv[2] ==
#: "plain": the same without MSG_OOB).  Then it prints what the server
#: answered.
URGENT_CLIENT = PROXY_CLIENT + r"""
target, how, filler = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = connect_proxy()
s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n".encode() + auth + b"\r\n")
head, rest = read_head(s)
print("STATUS", head.splitlines()[0] if head else "none", flush=True)
s.sendall(b"." * filler + b"before")
time.sleep(0.2)
if how == "urgent":
    s.send(b"!", socket.MSG_OOB)
else:
    s.send(b"!")
time.sleep(0.2)
s.sendall(b"after")
s.shutdown(socket.SHUT_WR)
print("ANSWER", read_all(s, rest).decode(errors="replace"), flush=True)
"""


class RecordingServer(RawServer):
    """Records, per connection, every byte up to the client's end of file
    (urgent data inline, as the byte stream has it), then answers with how
    many bytes it got.  It starts reading ``delay`` seconds after the
    connection came: meanwhile what the client sends fills the relay's
    pipe and the sockets' buffers."""

    def __init__(self, delay: float = 0.0) -> None:
        self.received: list[bytes] = []
        self.delay = delay
        super().__init__(self._record)

    @staticmethod
    def _record(conn: socket.socket, server: "RecordingServer") -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        time.sleep(server.delay)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        server.received.append(data)
        conn.sendall(b"got %d" % len(data))
        conn.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("filler, delay", [(0, 0.0), (8 << 20, 1.5)], ids=["alone", "behind-a-full-pipe"])
async def test_an_urgent_byte_does_not_stall_or_cut_a_tunnel(filler, delay):
    """splice() stops at TCP's urgent mark (tcp_read_sock reads no further
    until recv() has passed it), and the relay moved bytes by splice()
    alone: one send(MSG_OOB) from the sandbox stalled its tunnel for good,
    and at the sandbox's end of file the relay took splice()'s 0 for the
    end of the stream, passed it on and reported a clean end, so the
    server got "before" and an EOF, a cut-off stream taken for a complete
    one (what relay.c resets a tunnel to prevent).  Behind a full pipe the
    urgent byte and the FIN reach the relay together, before it has read
    the EPOLLPRI that tells of the byte.  The control: the same bytes with
    no MSG_OOB, and the same urgent byte sent straight to the server from
    the host, both arrive whole."""
    server = RecordingServer(delay)
    sent = b"." * filler + b"before!after"
    try:
        # Control 1: from the host, no relay: every byte arrives.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as direct:
            direct.sendall(b"." * filler + b"before")
            direct.send(b"!", socket.MSG_OOB)
            direct.sendall(b"after")
            direct.shutdown(socket.SHUT_WR)
            assert direct.recv(100) == b"got %d" % len(sent)
        assert server.received == [sent]
        async with heel.Sandbox(heel.SandboxConfig(level=PERMISSIVE, network=heel.AllowList(["rec.test"])),
                                resolver=resolver_for({"rec.test": ["127.0.0.1"]})) as sb:
            target = f"rec.test:{server.port}"
            # Control 2: the tunnel carries the same bytes without MSG_OOB.
            plain = await py(sb, URGENT_CLIENT, target, "plain", str(filler), timeout=TIMEOUT)
            assert f"ANSWER got {len(sent)}" in plain.stdout.decode(), explain(plain)
            assert server.received[1] == sent
            urgent = await py(sb, URGENT_CLIENT, target, "urgent", str(filler), timeout=TIMEOUT)
        assert "STATUS HTTP/1.1 200" in urgent.stdout.decode(), explain(urgent)
        assert len(server.received) == 3, (server.received, explain(urgent))
        got = server.received[2]
        assert got == sent, f"the server got {len(got)} bytes, ending {got[-20:]!r}: the tunnel cut the stream"
        assert "ANSWER got" in urgent.stdout.decode() and not urgent.timed_out, explain(urgent)
    finally:
        server.close()


# ---- a command's init: the freeze's time budget (no pid namespace) -------------------

#: A command whose child forks a process that will not stop, or (argv[2]
#: "plain") one that stops at once, then prints the monotonic clock (the
#: host's: there is no time namespace) and exits.
FREEZE_CLIENT = r"""
import ctypes, os, signal, sys, time
marker, kind = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
if os.fork() == 0:
    if kind == "vfork":
        # A vfork parent waits for its child in the kernel: SIGSTOP never
        # takes (SIGKILL does).  Its child stops itself.
        if libc.vfork() == 0:
            libc.kill(libc.getpid(), signal.SIGSTOP)
            libc._exit(0)
    elif os.fork() == 0:
        os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(0)
    os.execlp("sleep", "sleep", marker)
time.sleep(0.3)
print(time.monotonic(), flush=True)
"""


@pytest.mark.parametrize("kind", ["plain", "vfork"])
async def test_without_a_pid_namespace_a_process_that_never_stops_holds_the_kill_briefly(no_namespaces, kind):
    """Without a pid namespace (or before Landlock ABI 6) a command's init
    stops its tree before it kills it, and waits for each process to stop
    for 200 ms in all (FREEZE_WAIT_NS), so that processes that never stop
    (a vfork parent) cannot hold the kill up for long.  The wait was
    counted in the 20 µs asked of each nanosleep(), not in the time that
    went by: each turn (a /proc read and a sleep the timer slack stretches)
    takes some 140 µs here, so one vfork parent held its command's end for
    1.4 s, and longer on a busy machine (the host kills the init after 5 s,
    midway, and heel-init's sweeps then finish the job).  The control: a
    process that stops at once is killed at once."""
    marker = unique_marker()
    config = heel.SandboxConfig(level=heel.IsolationLevel.DEFAULT, best_effort=True)
    try:
        async with heel.Sandbox(config) as sb:
            process = await (sb.command("python3").args(["-c", FREEZE_CLIENT, marker, kind])
                             .stdout(heel.Stdio.PIPE).spawn())
            async with process:
                await wait_for_processes(marker, 1)
                with trio.fail_after(TIMEOUT):
                    printed = b""
                    while not printed.endswith(b"\n"):
                        printed += await process.stdout.receive_some(100)
                    await process.wait()
                took = time.monotonic() - float(printed)
            assert processes_with(marker) == [], "a process outlived its command"
        # 200 ms of waiting, the command's exit and the host's wakeup: well under 0.6 s.
        assert took < 0.6, f"the init took {took:.2f}s to end a tree with a process that never stops"
    finally:
        kill_marked(marker)
