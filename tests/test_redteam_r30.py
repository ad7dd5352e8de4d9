"""Red-team review r30 of the C core (heel-init, the trampoline, the relay),
from inside a sandbox: each test does the attack for real and looks from
the host, next to a control that shows the observation can tell."""

from __future__ import annotations

import socket
import threading

import trio

import heel
from helpers import PROXY_CLIENT, explain, py
from netservers import RawServer, resolver_for

PERMISSIVE = heel.IsolationLevel.PERMISSIVE
TIMEOUT = 20


# ---- the relay: TCP urgent data -------------------------------------------------------

#: In the sandbox: a CONNECT tunnel through heel's proxy to the test's
#: server, which gets "before", one byte sent with MSG_OOB (TCP urgent
#: data), "after", and a half-close (argv[2] == "plain": the same without
#: MSG_OOB).  Then it prints what the server answered.
URGENT_CLIENT = PROXY_CLIENT + r"""
target, how = sys.argv[1], sys.argv[2]
s = connect_proxy()
s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n".encode() + auth + b"\r\n")
head, rest = read_head(s)
print("STATUS", head.splitlines()[0] if head else "none", flush=True)
s.sendall(b"before")
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
    many bytes it got."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.done = threading.Event()
        super().__init__(self._record)

    @staticmethod
    def _record(conn: socket.socket, server: "RecordingServer") -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        server.received.append(data)
        server.done.set()
        conn.sendall(b"got %d" % len(data))
        conn.shutdown(socket.SHUT_WR)


async def test_an_urgent_byte_does_not_stall_or_cut_a_tunnel():
    """splice() stops at TCP's urgent mark (tcp_read_sock reads no further
    until recv() has passed it), and the relay moved bytes by splice()
    alone: one send(MSG_OOB) from the sandbox stalled its tunnel for good,
    and at the sandbox's end of file the relay took splice()'s 0 for the
    end of the stream, passed it on and reported a clean end, so the
    server got "before" and an EOF, a cut-off stream taken for a complete
    one (what relay.c resets a tunnel to prevent).  The control: the same
    bytes with no MSG_OOB, and the same urgent byte sent straight to the
    server from the host, both arrive whole."""
    server = RecordingServer()
    try:
        # Control 1: from the host, no relay: every byte arrives.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as direct:
            direct.sendall(b"before")
            direct.send(b"!", socket.MSG_OOB)
            direct.sendall(b"after")
            direct.shutdown(socket.SHUT_WR)
            assert direct.recv(100) == b"got 12"
        assert server.received == [b"before!after"]
        async with heel.Sandbox(heel.SandboxConfig(level=PERMISSIVE, network=heel.AllowList(["rec.test"])),
                                resolver=resolver_for({"rec.test": ["127.0.0.1"]})) as sb:
            target = f"rec.test:{server.port}"
            # Control 2: the tunnel carries the same bytes without MSG_OOB.
            plain = await py(sb, URGENT_CLIENT, target, "plain", timeout=TIMEOUT)
            assert "ANSWER got 12" in plain.stdout.decode(), explain(plain)
            assert server.received[1] == b"before!after"
            urgent = await py(sb, URGENT_CLIENT, target, "urgent", timeout=TIMEOUT)
        assert "STATUS HTTP/1.1 200" in urgent.stdout.decode(), explain(urgent)
        assert len(server.received) == 3, (server.received, explain(urgent))
        got = server.received[2]
        assert got.startswith(b"before") and got.endswith(b"after"), \
            f"the server got {got!r}: the tunnel cut the stream at the urgent byte"
        assert "ANSWER got" in urgent.stdout.decode() and not urgent.timed_out, explain(urgent)
    finally:
        server.close()
