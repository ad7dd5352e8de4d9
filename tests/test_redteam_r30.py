"""Red-team review r30 of the C core (heel-init, the trampoline, the relay),
from inside a sandbox: each test does the attack for real and looks from
the host, next to a control that shows the observation can tell."""

from __future__ import annotations

import socket
import time

import pytest

import heel
from helpers import PROXY_CLIENT, explain, py
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
