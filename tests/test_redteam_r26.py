"""Review r26: a sandbox with IPC and a network policy freezes the host.

The host receives fds from the sandbox over the IPC broker, and closes
every one that is not an IPC connection (heel.ipc.serve), in trio's thread;
the kernel itself drops the ones past the four a message may carry, in
that thread too, as recvmsg returns.  When that is the last reference to a
TCP socket with SO_LINGER set and data that cannot leave (its peer has a
full receive buffer), close() waits for the FIN to be acknowledged, up to
the linger time: the whole host process stops (every sandbox's timeout,
the proxy, close) for as long as the sandbox wants.  Inside a network
namespace the sandbox gets such a peer of its own: listen() binds an
ephemeral port, and sendto(MSG_FASTOPEN) connects to it without asking
Landlock's connect rule.
"""

from __future__ import annotations

import time

import pytest
import trio

import heel

from helpers import py


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
async def test_r26_lingering_socket_over_ipc_does_not_freeze_host(how):
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


async def test_r26_so_linger_refused_other_options_work():
    """The linger is what makes close() wait; SO_KEEPALIVE, a neighbour, works."""
    sb_config = heel.SandboxConfig(network=heel.AllowList(["example.invalid"]))
    code = ("import socket, struct\n"
            "s = socket.socket()\n"
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)\n"
            "print('keepalive', s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))\n"
            "try:\n"
            "    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 5))\n"
            "    print('linger set')\n"
            "except OSError as exc:\n"
            "    print('linger refused', exc.errno)\n")
    async with heel.Sandbox(sb_config) as sb:
        out = await py(sb, code)
    assert b"keepalive 1" in out.stdout, out
    assert b"linger refused 1" in out.stdout, out
