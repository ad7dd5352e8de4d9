"""Nothing a sandbox hands over IPC is dropped on trio's thread.

A sandbox with IPC can make the host drop the last reference of any file of
its (a 4 GiB memfd: about 0.8 s to free), and whoever drops it frees the
file then and there: on trio's thread, every sandbox's timeouts, proxy and
IPC would stand still.  The first test tries each way in (over the broker,
past the fds a message carries, queued on a connection, along a
connection's bytes).  The rest come from r29's review of the change that
moved those drops to a worker thread:

- the sandbox keeps its own fd of the host's end of a connection, and turns
  SO_PASSRIGHTS back on through it once the host has turned it off: the host
  then reads the connection on trio's thread (nothing was waiting when it
  looked), and the recv drops the fds sent along;
- the host closes the broker on trio's thread when the sandbox closes, and
  that purges what the sandbox left queued on it, fds included;
- a sandbox closed while its IPC thread works; hundreds of fds held at once.

Each next to a control that does the same without the attack.
"""

from __future__ import annotations

import errno
import os
import time

import pytest
import trio

import heel
from helpers import kernel_has_passrights

GiB = 1 << 30


def _need_memory(total: int) -> None:
    """Skip unless the kernel says this much memory is available (MemAvailable
    counts the page cache it can drop, which free memory does not)."""
    with open("/proc/meminfo") as info:
        fields = dict(line.split(":", 1) for line in info)
    available = int(fields["MemAvailable"].split()[0]) * 1024
    if available < total + 4 * GiB:
        pytest.skip(f"not enough memory available for the heavy files ({available >> 30} GiB)")


class _Heartbeat:
    """The longest the host's event loop stood still, seen from a task of its."""

    def __init__(self) -> None:
        self.beats: list[float] = []

    async def run(self) -> None:
        while True:
            self.beats.append(time.monotonic())
            await trio.sleep(0.02)

    def longest_gap(self) -> float:
        return max(b - a for a, b in zip(self.beats, self.beats[1:]))


def _ping_router() -> heel.IpcRouter:
    router = heel.IpcRouter()

    @router.command("ping")
    async def ping() -> str:
        return "pong"

    return router


async def _read_until(process, marker: bytes) -> bytes:
    said = b""
    with trio.fail_after(60):
        while marker not in said:
            chunk = await process.stdout.receive_some(1000)
            assert chunk, said
            said += chunk
    return said


async def _hand_over_and_watch(script: str, how: str) -> tuple[bytes, float]:
    """Run ``script how SIZE`` (a 4 GiB memfd) in a sandbox with IPC until
    it says "handed over", and 2 s more while the host frees the file
    wherever it does; then check that the sandbox's calls still work (the
    control).  Returns what the script said and the longest time the host's
    event loop stood still meanwhile."""
    size = 4 * GiB
    _need_memory(3 * size)
    heartbeat = _Heartbeat()
    async with heel.Sandbox(heel.SandboxConfig(ipc=_ping_router())) as sb:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeat.run)
            process = await sb.python().args(["-c", script, how, str(size)]) \
                .stdout(heel.Stdio.PIPE).timeout(90).spawn()
            async with process:
                said = await _read_until(process, b"handed over")
                await trio.sleep(2)
                process.kill()
            nursery.cancel_scope.cancel()
        control = await sb.python().args(["-c", "from heel.client import call; print(call('ping'))"]) \
            .timeout(30).output()
    assert control.stdout == b"pong\n", control
    return said, heartbeat.longest_gap()


async def _fds_held_while(script: str, how: str) -> tuple[bytes, int]:
    """Run ``script how SIZE`` (a 1 GiB memfd) in a sandbox with IPC until
    it says "handed over", and 1.5 s more, counting the host's open fds
    meanwhile.  Returns what it said and how many more fds the host held at
    most than before it started."""
    size = GiB
    _need_memory(size)
    counts: list[int] = []

    async def count_fds() -> None:
        while True:
            counts.append(len(os.listdir("/proc/self/fd")))
            await trio.sleep(0.003)

    async with heel.Sandbox(heel.SandboxConfig(ipc=_ping_router())) as sb:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(count_fds)
            await trio.sleep(0.1)
            process = await sb.python().args(["-c", script, how, str(size)]) \
                .stdout(heel.Stdio.PIPE).timeout(60).spawn()
            async with process:
                said = await _read_until(process, b"handed over")
                await trio.sleep(1.5)
                process.kill()
            nursery.cancel_scope.cancel()
    return said, max(counts) - counts[0]


HEAVY_FILE = r"""
import os, socket, struct, sys, time
how, size = sys.argv[1], int(sys.argv[2])

def rights(fds):
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds))]

# A large memfd (tmpfs, as an unlinked file in a tmpfs /tmp would be):
# whoever drops its last reference frees its pages (about 0.2 s a GiB); a
# large unlinked file on a disk costs about half that.  That last
# reference is put in flight, in the queue of a socket (heavy), which the
# sandbox then gives away with its last own reference.
fd = os.memfd_create("heavy")
os.posix_fallocate(fd, 0, size)
heavy, wrapper = socket.socketpair()
wrapper.sendmsg([b"x"], rights([fd]))
os.close(fd)
wrapper.close()
broker = socket.socket(fileno=int(os.environ["HEEL_IPC_FD"]))
if how == "broker":  # a connection whose request the host reads, or what it closes
    broker.sendmsg([b"c"], rights([heavy.fileno()]))
elif how == "truncated":  # the fifth fd of a message: dropped inside the host's recvmsg
    broker.sendmsg([b"c"], rights([os.open("/dev/null", os.O_RDONLY) for _ in range(4)] + [heavy.fileno()]))
else:
    ours, theirs = socket.socketpair()
    if how == "queued":  # waiting on the host's end of a connection before the host has it
        ours.sendmsg([b"\0"], rights([heavy.fileno()]))
        heavy.close()
    broker.sendmsg([b"c"], rights([theirs.fileno()]))
    theirs.close()
    if how == "on_connection":  # along with a byte of a request: the host's recv drops it
        time.sleep(0.5)
        try:
            ours.sendmsg([b"\0"], rights([heavy.fileno()]))
        except OSError as exc:
            print("refused", exc.errno, flush=True)
heavy.close()
print("handed over", flush=True)
time.sleep(30)
"""


@pytest.mark.parametrize("how", ["broker", "truncated", "queued", "on_connection", "on_connection_old_kernel"])
async def test_a_heavy_file_handed_over_ipc_is_not_freed_on_the_hosts_event_loop(how, monkeypatch):
    """A sandbox with IPC can make the host drop the last reference of any
    file of its: over the broker (the host closes what is no connection; the
    kernel drops, inside the host's recvmsg, what is past the fds a message
    may carry) or along with a connection's data (the host's recv drops it).
    The last close of a large unlinked file frees its pages then and there:
    4 GiB of a memfd or tmpfs is about 0.8 s, and a disk's worth more.  None of that
    may happen on trio's thread, where every sandbox's timeouts, proxy and
    IPC run.  The control: the same sandbox's calls still work.

    "on_connection_old_kernel": as before Linux 6.16, where the host cannot
    make the kernel refuse fds on a connection (SO_PASSRIGHTS), so it reads
    every byte of it in a worker thread."""
    if how == "on_connection_old_kernel":
        from heel import ipc

        monkeypatch.setattr(ipc, "_SO_PASSRIGHTS", 0x7FFF)  # no such option: ENOPROTOOPT
        how = "on_connection"
        old_kernel = True
    else:
        old_kernel = False
    said, gap = await _hand_over_and_watch(HEAVY_FILE, how)
    if how == "on_connection" and kernel_has_passrights() and not old_kernel:
        assert b"refused %d" % errno.EPERM in said, said  # SO_PASSRIGHTS off: the fd never left
    elif how == "on_connection":
        assert b"refused" not in said, said
    assert gap < 0.4, f"the host's event loop stood still for {gap:.2f} s ({said!r})"


PASSRIGHTS_BACK_ON = r"""
import os, socket, struct, sys, time
how, size = sys.argv[1], int(sys.argv[2])
SO_PASSRIGHTS = 83

def rights(fds):
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds))]

heavy = os.memfd_create("heavy")
os.posix_fallocate(heavy, 0, size)
broker = socket.socket(fileno=int(os.environ["HEEL_IPC_FD"]))
ours, theirs = socket.socketpair()
broker.sendmsg([b"c"], rights([theirs.fileno()]))
# theirs is kept: passing an fd copies it, and this copy is the same socket
# as the host's end of the connection.
deadline = time.monotonic() + 20
while theirs.getsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS) != 0:  # the host has turned it off
    assert time.monotonic() < deadline, "the host never turned SO_PASSRIGHTS off"
    time.sleep(0.001)
time.sleep(0.2)  # and has counted the bytes waiting (none)
if how == "back_on":
    try:
        theirs.setsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS, 1)
        print("back on", flush=True)
    except OSError as exc:
        print("setsockopt refused", exc.errno, flush=True)
theirs.close()
try:
    ours.sendmsg([b"\0"], rights([heavy]))
    print("sent", flush=True)
except OSError as exc:
    print("refused", exc.errno, flush=True)
os.close(heavy)
print("handed over", flush=True)
time.sleep(30)
"""


@pytest.mark.skipif(not kernel_has_passrights(), reason="SO_PASSRIGHTS needs Linux 6.16")
@pytest.mark.parametrize("how", ["back_on", "control"])
async def test_the_sandbox_cannot_turn_passrights_back_on_through_its_copy_of_a_connection(how):
    """The socket the sandbox passes as a connection stays the sandbox's too
    (SCM_RIGHTS copies an fd, it does not move it): through its own fd of
    it, the sandbox sets SO_PASSRIGHTS back to 1 after the host turned it
    off and counted nothing waiting, then sends a 4 GiB memfd along a byte.
    The host reads the connection on trio's thread (its unsafe count is 0),
    and that recv drops the memfd there.  The control leaves the option
    alone: the kernel refuses the fd (EPERM).  Either way the host's event
    loop must not stand still, and the sandbox's calls still work."""
    said, gap = await _hand_over_and_watch(PASSRIGHTS_BACK_ON, how)
    if how == "control":
        assert b"refused %d" % errno.EPERM in said, said
    assert gap < 0.4, f"the host's event loop stood still for {gap:.2f} s ({said!r})"


LEFT_ON_THE_BROKER = r"""
import os, socket, struct, sys, time
blocker_size, size = int(sys.argv[1]), int(sys.argv[2])

def rights(fds):
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds))]

blocker = os.memfd_create("blocker")
os.posix_fallocate(blocker, 0, blocker_size)
heavy = os.memfd_create("heavy")
os.posix_fallocate(heavy, 0, size)
broker = socket.socket(fileno=int(os.environ["HEEL_IPC_FD"]))
# The host closes the blocker in its worker thread (a while); meanwhile the
# heavy file waits, queued on the broker.
broker.sendmsg([b"c"], rights([blocker]))
broker.sendmsg([b"c"], rights([heavy]))
os.close(blocker)
os.close(heavy)
print("handed over", flush=True)
time.sleep(30)
"""


@pytest.mark.parametrize("how", ["closed_at_once", "control"])
async def test_what_the_sandbox_leaves_on_the_broker_is_not_freed_on_the_hosts_event_loop(how):
    """The sandbox passes a 3 GiB memfd over the broker (the host closes it
    in the sandbox's worker thread: some 0.6 s), and right after it a 4 GiB
    one, which waits in the broker's queue meanwhile.  The sandbox is then
    closed: aclose() cancels the IPC task and closes the broker on trio's
    thread (Session.close_channels), and closing it purges its queue: the
    4 GiB memfd is freed there.  The control waits until the host has read
    (and closed, in its thread) both before it closes the sandbox."""
    blocker_size, size = 3 * GiB, 4 * GiB
    _need_memory(blocker_size + size)
    heartbeat = _Heartbeat()
    said = b""
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(heartbeat.run)
        try:
            async with heel.Sandbox(heel.SandboxConfig(ipc=_ping_router())) as sb:
                process = await sb.python().args(["-c", LEFT_ON_THE_BROKER, str(blocker_size), str(size)]) \
                    .stdout(heel.Stdio.PIPE).timeout(90).spawn()
                said = await _read_until(process, b"handed over")
                if how == "control":
                    await trio.sleep(4)
                # the `async with` ends here: the sandbox closes, the command with it
        except Exception as exc:  # (see the test below: the close may also raise)
            failure = exc
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    gap = heartbeat.longest_gap()
    assert gap < 0.4, f"the host's event loop stood still for {gap:.2f} s ({said!r}, {failure!r})"
    if failure is not None:
        raise failure


BLOCKER_ONLY = r"""
import os, socket, struct, sys, time
fd = os.memfd_create("blocker")
os.posix_fallocate(fd, 0, int(sys.argv[1]))
broker = socket.socket(fileno=int(os.environ["HEEL_IPC_FD"]))
broker.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
os.close(fd)
print("handed over", flush=True)
time.sleep(30)
"""


@pytest.mark.parametrize("how", ["closed_at_once", "control"])
async def test_a_sandbox_closed_while_its_ipc_thread_works_closes_without_an_error(how):
    """The IPC task waits, uncancellable, for its worker thread (here closing
    a 2 GiB memfd the sandbox passed: some 0.4 s); the sandbox closes
    meanwhile, and close_channels() closes the broker.  When the thread
    returns, the cancelled task went round its loop to wait_readable() on
    the closed socket (fileno -1) before any checkpoint, and trio's
    ValueError came out of the user's `async with heel.Sandbox`.  The
    control closes the sandbox once the thread is done."""
    _need_memory(2 * GiB)
    async with heel.Sandbox(heel.SandboxConfig(ipc=_ping_router())) as sb:
        process = await sb.python().args(["-c", BLOCKER_ONLY, str(2 * GiB)]) \
            .stdout(heel.Stdio.PIPE).timeout(90).spawn()
        await _read_until(process, b"handed over")
        if how == "control":
            await trio.sleep(3)
    # reaching here, without an exception, is the test


MANY_FDS_QUEUED = r"""
import os, socket, struct, sys, time
how, size = sys.argv[1], int(sys.argv[2])
heavy = os.memfd_create("heavy")
os.posix_fallocate(heavy, 0, size)
null = os.open("/dev/null", os.O_RDONLY)
fds = [heavy] + ([null] * 252 if how == "many" else [])  # one fd may be listed many times
broker = socket.socket(fileno=int(os.environ["HEEL_IPC_FD"]))
ours, theirs = socket.socketpair()
# Queued before the host has the connection: SO_PASSRIGHTS comes too late
# for it, and the host reads it in its worker thread.
ours.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds))])
os.close(heavy)
broker.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", theirs.fileno()))])
theirs.close()
print("handed over", flush=True)
time.sleep(30)
"""


@pytest.mark.parametrize("how", ["many", "control"])
async def test_a_sandbox_does_not_make_the_host_hold_hundreds_of_its_fds(how):
    """The bytes queued on a connection before the host has it are read in
    the sandbox's worker thread with room for 253 fds, which are installed
    in the host's fd table and then closed one by one: the first a 1 GiB
    memfd (some 0.2 s to free), the host held the 252 others meanwhile.
    A sandbox can do that again and again, and every sandbox at once; the
    host keeps only half of its RLIMIT_NOFILE (less 128) for itself and
    counts 32 of headroom (heel.ipc._connection_budget, _room_for): at a
    soft limit of 1024 two sandboxes fill it and the host's own opens fail
    with EMFILE.  The fds need no room: dropped inside the recv, they are
    freed in the same thread.  The control passes the memfd alone."""
    said, grown = await _fds_held_while(MANY_FDS_QUEUED, how)
    assert grown < 32, f"the host held {grown} more fds at once ({said!r})"
