"""The library's promises under trio cancellation and concurrency: a
sandbox opened half-way and cancelled, closed early or from another task,
processes signalled, waited on and polled at once.  Nothing is left open or
running, and what callers get is a result or a HeelError, never trio's
internals.  (Found by exploratory testing of the API.)"""

from __future__ import annotations

import os
import signal

import pytest
import trio

import heel
from helpers import explain


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


async def test_a_sandbox_cancelled_while_it_opens_leaves_nothing(private_tmp):
    """Cancelled in __aenter__ after the sandbox started (its proxy was
    starting): the caller's scope catches it, and the sandbox is closed
    whole.  It corrupted trio's cancel-scope stack and leaked the sandbox."""
    config = heel.SandboxConfig(network=heel.AllowList(["example.test"]), ipc=heel.IpcRouter())
    before = _open_fds()
    for delay in [0, 0.001, 0.003, 0.01, 0.03]:
        with trio.move_on_after(delay) as scope:
            async with heel.Sandbox(config):
                await trio.sleep(10)
        assert scope.cancelled_caught
    assert os.listdir(private_tmp) == []
    assert _open_fds() <= before
    async with heel.Sandbox(config) as sb:  # the control: trio is intact, and it opens
        assert (await sb.command("true").status()).returncode == 0


async def test_a_sandbox_that_fails_half_open_raises_its_own_error(private_tmp, monkeypatch):
    """A failure after the IPC server was scheduled (here the proxy's, made
    to fail) reaches the caller as it is: the server, started after the
    sandbox closed, turned it into ExceptionGroup([OSError(EBADF)])."""
    import heel.proxy

    class Boom(Exception):
        pass

    def fail(*args, **kwargs):
        raise Boom("the proxy could not be made")

    monkeypatch.setattr(heel.proxy.Proxy, "__init__", fail)
    config = heel.SandboxConfig(network=heel.AllowList(["example.test"]), ipc=heel.IpcRouter())
    with pytest.raises(Boom):
        async with heel.Sandbox(config):
            pass
    assert os.listdir(private_tmp) == []


def test_closing_early_inside_the_block_leaves_the_body_running(private_tmp):
    """aclose() in the body closes the sandbox; the body goes on, and a
    command then raises SandboxClosed.  It cancelled the body with a
    trio.Cancelled that escaped the block.  (A trio.run of its own: under
    pytest-trio's nursery the stray Cancelled went unseen.)"""
    reached = []

    async def main() -> None:
        async with heel.Sandbox() as sb:
            assert (await sb.command("true").status()).returncode == 0
            await sb.aclose()
            await trio.sleep(0)
            reached.append("body")
            with pytest.raises(heel.SandboxClosed):
                await sb.command("true").status()
        reached.append("after")

    trio.run(main)
    assert reached == ["body", "after"]
    assert os.listdir(private_tmp) == []


async def test_a_command_running_when_another_task_closes_the_sandbox_gets_its_output():
    """output() in one task, aclose() in another: the command is killed and
    output() returns what it had written (it raised an ExceptionGroup of
    ClosedResourceError)."""
    results = []
    async with trio.open_nursery() as nursery:
        async with heel.Sandbox() as sb:
            async def run() -> None:
                results.append(await sb.command("sh").args(["-c", "echo partial; exec sleep 30"]).output())

            nursery.start_soon(run)
            with trio.fail_after(10):
                while not any(p for p in sb._processes):
                    await trio.sleep(0.01)
            await trio.sleep(0.3)  # the echo is written
    (out,) = results
    assert out.returncode == -signal.SIGKILL and out.stdout == b"partial\n", out


async def test_commands_starting_while_the_sandbox_closes_end_at_once():
    """Starts queued behind heel-init when the sandbox closes fail at once
    with SandboxClosed (they waited 30 s, shielded)."""
    outcomes = []

    async def start(sb) -> None:
        try:
            outcomes.append((await sb.command("true").status()).returncode)
        except heel.SandboxClosed:
            outcomes.append("closed")

    async def start_later(sb, delay: float) -> None:
        await trio.sleep(delay)
        await start(sb)

    rounds = 6
    with trio.fail_after(20):  # a round took 30 s when a start waited on a closed socket
        for round_ in range(rounds):
            async with trio.open_nursery() as nursery:
                async with heel.Sandbox() as sb:
                    for index in range(100):
                        nursery.start_soon(start_later, sb, (index % 25) * 0.002)
                    await trio.sleep(0.02 + round_ * 0.005)
    assert len(outcomes) == 100 * rounds and set(outcomes) <= {0, -signal.SIGKILL, "closed"}, set(outcomes)


async def test_sigstop_stops_the_command_not_its_init():
    """send_signal(SIGSTOP) pauses the command, and SIGCONT resumes it; it
    stopped heel's init instead, so the command ran on and kill() was
    ignored."""
    async with heel.Sandbox() as sb:
        process = await sb.command("sh").args(["-c", "while :; do echo tick; sleep 0.05; done"]) \
            .stdout(heel.Stdio.PIPE).spawn()
        async with process:
            assert await process.stdout.receive_some(100)
            process.send_signal(signal.SIGSTOP)
            await trio.sleep(0.3)  # what was in flight arrives
            with trio.move_on_after(0.1):
                while await process.stdout.receive_some(1000):
                    pass
            ticks = b""
            with trio.move_on_after(0.6):
                ticks += await process.stdout.receive_some(1000)
            assert ticks == b"", ticks
            process.send_signal(signal.SIGCONT)
            with trio.fail_after(5):
                assert b"tick" in await process.stdout.receive_some(1000)  # the control: it runs again
            process.send_signal(signal.SIGSTOP)
            process.terminate()  # a stopped command still ends when asked
            process.send_signal(signal.SIGCONT)
            with trio.fail_after(5):
                assert await process.wait() == -signal.SIGTERM


async def test_sigstop_then_sigcont_at_once_leaves_the_command_running():
    """The two arrive in the order sent (SIGSTOP went by message and SIGCONT
    by signal, and the init handled signals first: the command stayed
    stopped)."""
    async with heel.Sandbox() as sb:
        process = await sb.command("sh").args(["-c", "while :; do echo tick; sleep 0.02; done"]) \
            .stdout(heel.Stdio.PIPE).spawn()
        async with process:
            assert await process.stdout.receive_some(100)
            for _ in range(10):
                process.send_signal(signal.SIGSTOP)
                process.send_signal(signal.SIGCONT)
            await trio.sleep(0.2)
            with trio.move_on_after(0.1):
                while await process.stdout.receive_some(1000):
                    pass
            with trio.fail_after(5):
                assert b"tick" in await process.stdout.receive_some(1000)


async def test_wait_and_poll_from_two_tasks():
    """poll() in one task may reap while wait() waits in another: wait()
    returns the code (it raised ClosedResourceError)."""
    async with heel.Sandbox() as sb:
        for _ in range(10):
            process = await sb.command("sleep").arg("0.05").spawn()
            codes = []

            async def waiter() -> None:
                codes.append(await process.wait())

            async def poller() -> None:
                while process.poll() is None:
                    await trio.sleep(0)

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(waiter)
                    nursery.start_soon(poller)
            assert codes == [0]


async def test_spawn_refuses_stdin_bytes_it_would_not_feed():
    async with heel.Sandbox() as sb:
        with pytest.raises(heel.PolicyError, match="Stdio.PIPE"):
            await sb.command("cat").stdin(b"hello\n").spawn()
        out = await sb.command("cat").stdin(b"hello\n").output()  # the control: output() feeds them
        assert out.stdout == b"hello\n", explain(out)


async def test_a_long_lived_sandbox_keeps_no_record_of_finished_copies(tmp_path):
    """Commands whose stdout is a host file are copied through a relay; the
    sandbox forgets each relay once it ended (it kept two per command)."""
    target = tmp_path / "out"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    saved = os.dup(1)
    try:
        os.dup2(fd, 1)  # stdout a host file: relayed
        async with heel.Sandbox() as sb:
            for _ in range(20):
                assert (await sb.command("echo").arg("x").status()).returncode == 0
            assert len(sb._relays) == 0
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(fd)
    assert target.read_bytes() == b"x\n" * 20
