"""A systematic cancellation sweep of the public async API (r33).

test_api_concurrency.py cancels after wall-clock delays, which lands where
it happens to.  Here a trio Instrument cancels the caller's scope at the
k-th schedule point, for k = 0, 1, 2, ... until the operation completes
without the cancel having fired, so that every place the operation yields
to trio gets a cancel, and so does its start (k = -1: a scope cancelled
before the call).  The timing of threads and sockets varies the count a
little from one run to the next; the sweep goes on until the end,
whatever it is.  Two counts: the steps of the calling task only ("own"),
and every step of every task ("all": the cancel then also lands while the
operation's helper tasks, the proxy, IPC, stdin feeding and output
draining, are at each of their own points).

After each cancelled try: no fd is left open that was not before, the temp
root ($TMPDIR, private to the test) holds what it held before, no process
carrying the test's marker argument (and, for a sandbox opened and closed,
no child of this process) is left, the exception the caller saw is
trio.Cancelled itself (caught by the caller's scope), and trio's cancel
state is intact (the next checkpoint passes).  A sandbox whose command was
cancelled runs the next one.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from contextlib import asynccontextmanager

import pytest
import trio

import heel
from helpers import explain, processes_with, unique_marker

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

#: The most tries one sweep may take: far above what an operation takes
#: (a sandbox opens in under 100 steps of all tasks), so that a sweep that
#: never ends (an operation that never completes) fails rather than hangs.
MAX_STEPS = 2000


#: heel's helper tasks (sandbox.py): a Cancelled raised in one of them is
#: not the caller's.
_HELPER_TASKS = {"feed", "drain", "relay", "_relay_in", "_relay_out", "_run_proxy"}


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _descendants() -> list[tuple[int, bytes]]:
    """This process's live descendants (pid, command line): a sandbox's
    heel-init is a child of the host process; zombies count (unreaped)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, queue = [], [os.getpid()]
    while queue:
        for child in parents.get(queue.pop(), []):
            try:
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    found.append((child, f.read().replace(b"\0", b" ")))
            except OSError:
                found.append((child, b"?"))
            queue.append(child)
    return found


class _CancelAt(trio.abc.Instrument):
    """Cancels ``scope`` just before the k-th counted task step (counting
    from 0): of ``task`` only, or of every task when it is None.  The cancel
    is then delivered at that task's (or the operation's) next unshielded
    checkpoint.  Counts only while ``armed``."""

    def __init__(self, k: int, scope: trio.CancelScope, task: trio.lowlevel.Task | None) -> None:
        self.k, self.scope, self.task = k, scope, task
        self.steps = 0
        self.fired = False
        self.armed = True

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if not self.armed or (self.task is not None and task is not self.task):
            return
        if self.steps == self.k and not self.fired:
            self.fired = True
            self.scope.cancel()
        self.steps += 1


@asynccontextmanager
async def _cancel_at(k: int, mode: str):
    """A cancel scope that an instrument cancels at step k (see _CancelAt)."""
    with trio.CancelScope() as scope:
        instrument = _CancelAt(k, scope, trio.lowlevel.current_task() if mode == "own" else None)
        trio.lowlevel.add_instrument(instrument)
        try:
            yield instrument
        finally:
            trio.lowlevel.remove_instrument(instrument)
    instrument.cancelled_caught = scope.cancelled_caught


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return f"{type(exc).__name__}({[_describe(e) for e in exc.exceptions]})"
    return f"{type(exc).__name__}({exc})"


class _Sweep:
    """The state checked between tries."""

    def __init__(self, tmp_root, marker: str | None = None, *, children: bool = True) -> None:
        self.tmp_root = tmp_root
        self.marker = marker
        self.children = children
        self.fds = _open_fds()
        self.tmp = sorted(os.listdir(tmp_root))
        self.kids = {pid for pid, _ in _descendants()} if children else set()
        self.tries = 0
        self.cancelled = 0

    async def check(self, k: int, mode: str, raised: BaseException | None, instrument: _CancelAt) -> None:
        where = f"cancel at step {k} ({mode})"
        self.tries += 1
        if raised is not None:
            # The caller's own scope caught it: only a bare Cancelled may
            # have come out of the operation (a group of them came out of
            # `async with Sandbox` and output(), from heel's nurseries).
            assert type(raised) is trio.Cancelled, f"{where}: the caller got {_describe(raised)}"
            # ... raised in the caller's own task, not one of heel's helper
            # tasks' (whose traceback leads deep into heel).
            frames = [(os.path.basename(frame.f_code.co_filename), frame.f_code.co_name)
                      for frame, _ in traceback.walk_tb(raised.__traceback__)]
            assert not [f for f in frames if f[0] in ("proxy.py", "ipc.py") or f[1] in _HELPER_TASKS], \
                f"{where}: the Cancelled came from a helper task: {frames}"
            assert instrument.cancelled_caught, where
            self.cancelled += 1
        # A cancelled command's copies of host files (relays, in the
        # sandbox's nursery) end in the background once it is reaped: a
        # moment, not never.
        with trio.move_on_after(2):
            while _open_fds() - self.fds:
                await trio.sleep(0.01)
        leaked = _open_fds() - self.fds
        assert not leaked, f"{where}: fds left open: {sorted(leaked)} " + \
            str({fd: _fd_target(fd) for fd in leaked})
        assert sorted(os.listdir(self.tmp_root)) == self.tmp, \
            f"{where}: the temp root holds {os.listdir(self.tmp_root)} (was {self.tmp})"
        if self.marker is not None:
            assert processes_with(self.marker) == [], f"{where}: the command is still running"
        if self.children:
            left = [(pid, cmd) for pid, cmd in _descendants() if pid not in self.kids]
            assert not left, f"{where}: processes left: {left}"


def _fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


async def _sweep(op, state: _Sweep, mode: str, *, after=None) -> None:
    """Run ``op(instrument)`` under a cancel at step k, for k = -1 (the
    scope cancelled before the operation starts: its first checkpoints,
    which need not yield, see the cancel only so), 0, 1, ... until the
    cancel no longer fires; check the state after each try, and
    ``await after()`` (the sandbox still serves, say)."""
    for k in range(-1, MAX_STEPS):
        raised = None
        async with _cancel_at(k, mode) as instrument:
            if k < 0:  # cancelled before it starts
                instrument.fired = True
                instrument.scope.cancel()
            try:
                await op(instrument)
            except BaseException as exc:
                raised = exc
                raise
        # trio's state is whole: the caller is no longer cancelled.
        await trio.lowlevel.checkpoint()
        await state.check(k, mode, raised, instrument)
        if after is not None:
            await after()
        if not instrument.fired:
            return
    pytest.fail(f"the operation took more than {MAX_STEPS} steps")


async def _sandbox_runs(sb: heel.Sandbox) -> None:
    with trio.fail_after(10):
        assert (await sb.command("true").status()).returncode == 0


CONFIGS = {
    "default": lambda: heel.SandboxConfig(),
    "proxy": lambda: heel.SandboxConfig(network=heel.AllowList(["example.test"])),
    "ipc": lambda: heel.SandboxConfig(ipc=heel.IpcRouter()),
    "timeout": lambda: heel.SandboxConfig(limits=heel.ResourceLimits(timeout=5)),
}


async def _warm_up(config) -> None:
    """One whole open and close first: what trio and heel make once per
    process (the thread cache, the wakeup fds) is not a leak."""
    async with heel.Sandbox(config) as sb:
        await _sandbox_runs(sb)


@pytest.mark.parametrize("mode", ["own", "all"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
async def test_open_and_close_cancelled_at_every_step(private_tmp, name, mode):
    """1. ``async with Sandbox(config): await trio.sleep(0)``, cancelled at
    each step from the start of __aenter__ to the end of __aexit__."""
    config = CONFIGS[name]()
    await _warm_up(config)
    state = _Sweep(private_tmp)

    async def op(instrument) -> None:
        async with heel.Sandbox(config):
            await trio.sleep(0)

    with trio.fail_after(40):
        await _sweep(op, state, mode)
    assert state.cancelled > 0
    await _warm_up(config)  # the control: it opens and runs


@pytest.mark.parametrize("mode", ["own", "all"])
@pytest.mark.parametrize("name", ["default", "proxy", "ipc"])
async def test_close_cancelled_from_outside_still_finishes(private_tmp, name, mode):
    """5. A cancel that fires while __aexit__ runs (counted from the end of
    the body; k = -1, a scope cancelled from the start, cancels the spawn
    instead): the close finishes all the same and leaves nothing, and the
    caller gets Cancelled or, where nothing after the shielded close
    checkpoints, nothing."""
    config = CONFIGS[name]()
    await _warm_up(config)
    marker = unique_marker()
    state = _Sweep(private_tmp, marker)

    async def op(instrument) -> None:
        instrument.armed = False
        async with heel.Sandbox(config) as sb:
            await sb.command("sleep").arg(marker).spawn()  # left for the close to kill
            instrument.armed = True
        assert sb._closed and sb._close_done is not None and sb._close_done.is_set()

    with trio.fail_after(40):
        await _sweep(op, state, mode)
    # (Not asserted that some try raised: where nothing is left in the
    # sandbox's nursery once the shielded close ends, __aexit__ has no
    # checkpoint after it, and the cancel reaches the caller's next one.)


@pytest.fixture
async def open_sandbox(private_tmp):
    config = heel.SandboxConfig(limits=heel.ResourceLimits(timeout=20))
    async with heel.Sandbox(config) as sb:
        await _sandbox_runs(sb)
        yield sb
    assert os.listdir(private_tmp) == []


@pytest.mark.parametrize("mode", ["own", "all"])
async def test_output_cancelled_at_every_step(private_tmp, open_sandbox, mode):
    """2. output() of a command that writes to both streams, cancelled at
    each step; the sandbox runs the next command."""
    sb = open_sandbox
    marker = unique_marker()
    state = _Sweep(private_tmp, marker, children=False)  # the sandbox's heel-init stays
    results = []

    async def op(instrument) -> None:
        out = await sb.command("sh").args(["-c", "echo hi; echo err >&2", marker]).output()
        results.append(out)

    with trio.fail_after(40):
        await _sweep(op, state, mode, after=lambda: _sandbox_runs(sb))
    assert state.cancelled > 0
    out = results[-1]
    assert (out.stdout, out.stderr, out.returncode) == (b"hi\n", b"err\n", 0), explain(out)


DATA = bytes(range(256)) * 800  # 200 KiB: more than a pipe holds


@pytest.mark.parametrize("mode", ["own", "all"])
@pytest.mark.parametrize("how", ["output", "run"])
async def test_input_fed_cancelled_at_every_step(private_tmp, open_sandbox, mode, how):
    """3. cat fed 200 KiB of stdin (output() with stdin bytes, and run()
    with input=), cancelled at each step, in the caller or while its helper
    tasks feed and drain."""
    sb = open_sandbox
    marker = unique_marker()
    state = _Sweep(private_tmp, marker, children=False)
    results = []

    async def op(instrument) -> None:
        if how == "output":
            out = await sb.command("cat").arg("-").arg(marker).stdin(DATA).output()
            results.append((out.stdout, out.returncode))
        else:
            done = await sb.run(["cat", "-", marker], input=DATA, capture_stdout=True, check=False)
            results.append((done.stdout, done.returncode))

    with trio.fail_after(40):
        await _sweep(op, state, mode, after=lambda: _sandbox_runs(sb))
    assert state.cancelled > 0
    # cat reads stdin, then fails on the marker (no such file): exit 1
    stdout, returncode = results[-1]
    assert stdout == DATA and returncode == 1, (len(stdout), returncode)


@pytest.mark.parametrize("mode", ["own", "all"])
async def test_spawn_and_wait_cancelled_then_the_close_kills(private_tmp, mode):
    """4. spawn() then wait() on a long sleep, cancelled at each step (and,
    past the last, by a timer: the wait itself never ends); a second wait()
    on the same Process is not disturbed by the cancelled one; the sandbox's
    close kills the command."""
    await _warm_up(heel.SandboxConfig())
    marker = unique_marker()
    state = _Sweep(private_tmp, marker)
    spawned = []

    async def op(instrument) -> None:
        async with heel.Sandbox() as sb:
            process = None
            try:
                with trio.move_on_after(0.5):  # past the last step: the wait never ends
                    process = await sb.command("sleep").arg(marker).spawn()
                    spawned.append(process)
                    await process.wait()
                    pytest.fail("sleep ended")
                instrument.armed = False  # the rest is the check, not swept
            finally:
                if process is not None:
                    assert process.returncode is None
                    if not instrument.armed:
                        # not cancelled from outside: the Process still works
                        assert process.poll() is None
                        with trio.move_on_after(0.05):
                            await process.wait()
                        assert processes_with(marker), "the command died with the cancelled wait"
                else:
                    # A cancelled spawn() left nothing running
                    assert processes_with(marker) == []
            # left running: the close kills it

    with trio.fail_after(40):
        await _sweep(op, state, mode)
    assert state.cancelled > 0
    assert spawned and all(p.returncode == -signal.SIGKILL for p in spawned), \
        [p.returncode for p in spawned]


@pytest.mark.parametrize("mode", ["own", "all"])
async def test_a_host_file_as_stdin_cancelled_at_every_step(private_tmp, open_sandbox, tmp_path, mode):
    """3b. A command whose stdin is the host's, a regular file (relayed
    through a pipe: heel._spawn.needs_relay), cancelled at each step.  A
    cancel before the start (at launch_async's lock) left the relay's own
    read end of the pipe open for good, one fd per command."""
    sb = open_sandbox
    path = tmp_path / "input"
    path.write_bytes(DATA)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    saved = os.dup(0)
    results = []
    try:
        os.dup2(fd, 0)
        marker = unique_marker()
        state = _Sweep(private_tmp, marker, children=False)

        async def op(instrument) -> None:
            os.lseek(0, 0, os.SEEK_SET)
            out = await sb.command("cat").args(["-", marker]).stdin(heel.Stdio.INHERIT).output()
            results.append(out)

        with trio.fail_after(40):
            await _sweep(op, state, mode, after=lambda: _sandbox_runs(sb))
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(fd)
    assert state.cancelled > 0
    out = results[-1]
    assert out.stdout == DATA and out.returncode == 1, explain(out)


@pytest.mark.parametrize("name", ["proxy", "ipc"])
async def test_the_bodys_error_survives_a_cancel_of_the_callers_scope(private_tmp, name):
    """The body fails while the caller's scope is cancelled: its error
    reaches the caller.  The proxy's or IPC's task raised Cancelled too,
    and the group of them took the place of the body's error, which the
    caller's scope then swallowed with the cancel: the error was lost, and
    the program went on after the scope as if nothing had failed."""
    class BodyError(Exception):
        pass

    config = CONFIGS[name]()
    with trio.fail_after(10):
        with pytest.raises(BodyError):
            with trio.CancelScope() as scope:
                async with heel.Sandbox(config):
                    await trio.sleep(0.05)  # the background task is running
                    scope.cancel()
                    raise BodyError("the body's own")
    assert os.listdir(private_tmp) == []


@pytest.mark.parametrize("mode", ["own", "all"])
async def test_run_python_cancelled_at_every_step(private_tmp, open_sandbox, mode):
    """run_python(), cancelled at each step: the snippet it wrote to the
    sandbox's private tmp is removed too."""
    sb = open_sandbox
    marker = unique_marker()
    state = _Sweep(private_tmp, marker, children=False)
    results = []

    async def op(instrument) -> None:
        results.append(await sb.run_python("import sys; print(sys.argv[1])", args=[marker], input=b"x"))

    def snippets() -> list[str]:
        return [name for name in os.listdir(sb.plan.host_tmp) if name.startswith("heel_python_")]

    async def after() -> None:
        assert snippets() == [], "a snippet was left in the sandbox's tmp"
        await _sandbox_runs(sb)

    with trio.fail_after(40):
        await _sweep(op, state, mode, after=after)
    assert state.cancelled > 0
    assert results[-1].stdout == f"{marker}\n".encode(), explain(results[-1])
