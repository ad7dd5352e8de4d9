"""A mutation audit of the trio API layer (heel/sandbox.py, heel/process.py).

143 mutants, each one small weakening of one line (a check dropped, a
condition flipped, a bound moved, an env step, kill, reap or cleanup
skipped, an error swallowed), were run against the existing tests of the
layer (test_api, test_api_concurrency, test_cancel_sweep, test_lifecycle,
test_lifecycle_audit, test_validation_audit, test_config_validation,
test_security_isolation, test_network, and for the survivors the files that
exercise the branch: test_cli, test_cli_edges, test_security_fs, test_venv).
76 were caught.  Of the 67 that survived, the tests here kill 51; no
production bug was found, only behaviour no test pinned (what a mutant
did instead in brackets):

- errors raised early: Sandbox() of what is no SandboxConfig or no callable
  resolver; a Sandbox opened twice, or after aclose() before it ever opened
  [it opened, and its close was then a no-op: heel-init and the temporary
  directory stayed]; run([]); run_python() of bytes or of one string as
  args; the builder's timeout(True / nan / inf / 0), stderr(), current_dir()
  with NUL, an empty program name; run_python() after the sandbox closed
  [an OSError, not SandboxClosed];
- the environment: env_remove() after env() of one name; the config's env
  over the proxy's variables, a command's env() over the config's;
- streams: run() without capture and status() write to the host's own
  stdout/stderr (all copied when they return); spawn() does not hand over
  the host's stdin; NULL is writable; bytearray/memoryview stdin; bytes and
  path arguments; input a command does not read is no error; a host file
  that refuses output is recorded for the CLI;
- output_bytes: exactly the limit is whole; the limit is one budget for
  stdout and stderr together;
- timeouts: run(check=False) returns a timed-out result; CommandTimeout is a
  TimeoutError naming the command's own timeout, which wins over the
  config's; the config's applies otherwise; status() and run_python()
  report one; a timed-out result with code 0 is no success; run(check)
  raises for a command killed by a signal (a negative code);
- run_python(): its input, its args, its timeout, the PythonConfig's
  interpreter (python()), and never writing into a file the sandbox planted
  under the snippet's name (O_EXCL);
- Process: pid is -1 once gone; signals and kills after the end are no-ops,
  and so is a signal to a command whose init died unreaped; a signal sent
  while the init's socket is full still arrives; ``async with process``
  closes its streams and kills by heel's own request (no "init lost"); a
  Ctrl-C while aclose() waits is raised once it is done; the sandbox forgets
  reaped processes; the proxy's map of command names is bounded.

Equivalent (11): O_NOFOLLOW beside O_EXCL (O_CREAT|O_EXCL never follows a
link); env() discarding a pending env_remove() (removals are applied before
the command's own values); a relative current_dir() not joined to the
workdir (every init starts there, the zygote's cwd); the kill after a
timeout, the kill-all-first loop of close, a second kill message, a signal
after the end (aclose()/kill() or a closed socket do the same); an empty
exception group (none exists); send_signal(SIGKILL) forwarded rather than
kill() (heel-init kills the rest when the command dies); IPC started after
close (close waits for it before closing the broker); _started() raising
before it reaped (the caller's aclose() reaps).  Not killed (5), each only
reachable in a race or a window a test cannot place: a relay started as the
sandbox closes running uncancelled; close's grace for relays to copy what is
left; SIGSTOP in the full-socket fallback (unseen while the init is
stopped); a Ctrl-C ending finish_despite_ctrl_c's wait early; ECONNRESET
before heel-init's first word.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

import heel
from heel import AllowList, PolicyError, ResourceLimits, SandboxConfig, Stdio

from helpers import COMMAND_TIMEOUT, explain, process_start, sh


def _env_of(out: heel.Output) -> dict[str, str]:
    assert out.returncode == 0, explain(out)
    return dict(line.split("=", 1) for line in out.stdout.decode().splitlines() if "=" in line)


# ---- errors raised early --------------------------------------------------

@pytest.mark.parametrize("build", [
    lambda: heel.Sandbox({"level": "strict"}),
    lambda: heel.Sandbox("config"),
    lambda: heel.Sandbox(SandboxConfig(), resolver="127.0.0.1"),
    lambda: heel.Sandbox(SandboxConfig(), on_venv_progress=42),
])
def test_a_sandbox_of_what_is_no_config_or_callable_is_refused_when_built(build):
    with pytest.raises(PolicyError):
        build()
    heel.Sandbox(SandboxConfig(), resolver=lambda host, port: [], on_venv_progress=print)  # the control


@pytest.mark.parametrize("build", [
    lambda cmd: cmd.timeout(True),
    lambda cmd: cmd.timeout(float("nan")),
    lambda cmd: cmd.timeout(float("inf")),
    lambda cmd: cmd.timeout(0),
    lambda cmd: cmd.timeout(0.0),
    lambda cmd: cmd.timeout("1"),
    lambda cmd: cmd.stderr("pipe"),
    lambda cmd: cmd.stdout(None),
    lambda cmd: cmd.envs([("A", "1")]),
    lambda cmd: cmd.current_dir("sub\0dir"),
    lambda cmd: cmd.arg("a\0b"),
    lambda cmd: cmd.args(3),
])
async def test_the_builder_refuses_what_it_cannot_run_when_it_is_set(build):
    async with heel.Sandbox() as sb:
        with pytest.raises(PolicyError):
            build(sb.command("true"))
        control = sb.command("true").timeout(0.5).timeout(30).stderr(Stdio.PIPE).envs({"A": "1"}).current_dir("sub")
        assert control.effective_timeout() == 30


async def test_an_empty_program_name_is_refused():
    async with heel.Sandbox() as sb:
        for name in ("", b""):
            with pytest.raises(PolicyError):
                sb.command(name)


async def test_the_configs_timeout_applies_unless_the_command_sets_one():
    async with heel.Sandbox(SandboxConfig(limits=ResourceLimits(timeout=0.001))) as sb:
        out = await sb.command("sleep").arg("30").output()
        control = await sb.command("true").timeout(COMMAND_TIMEOUT).output()
    assert out.timed_out and out.returncode == -signal.SIGKILL, explain(out)
    assert control.returncode == 0 and not control.timed_out, explain(control)


async def test_run_of_an_empty_argument_list_is_a_policy_error():
    async with heel.Sandbox() as sb:
        for empty in ([], ()):
            with pytest.raises(PolicyError, match="needs a command"):
                await sb.run(empty)
        assert (await sb.run(["true"])).returncode == 0  # the control


async def test_a_sandbox_opens_once():
    """Opened again, while open or after it closed, a Sandbox refuses with
    SandboxClosed, and the first opening goes on unharmed (the control)."""
    sb = heel.Sandbox()
    async with sb:
        with pytest.raises(heel.SandboxClosed):
            await sb.__aenter__()
        assert (await sb.command("true").timeout(COMMAND_TIMEOUT).status()).success
    with pytest.raises(heel.SandboxClosed):
        async with sb:
            pass


async def test_a_sandbox_closed_before_it_opened_never_opens(private_tmp):
    """aclose() before ``async with``: the sandbox is closed for good.  It
    opened regardless, and then its close at the end of the block was a
    no-op (closed already): heel-init and the temporary directory stayed
    for as long as the host lived."""
    sb = heel.Sandbox()
    await sb.aclose()
    with pytest.raises(heel.SandboxClosed):
        async with sb:
            pass
    assert os.listdir(private_tmp) == []


# ---- the environment inside ---------------------------------------------

async def test_env_remove_takes_back_a_value_the_command_set():
    """env() then env_remove() of the same name: unset inside, as the
    last call asked; env_remove() then env(): set.  A name never touched
    (the control) keeps its value."""
    async with heel.Sandbox(SandboxConfig(env={"KEPT": "k"})) as sb:
        out = await (sb.command("env").env("GONE", "1").env_remove("GONE")
                     .env_remove("BACK").env("BACK", "2").timeout(COMMAND_TIMEOUT).output())
    env = _env_of(out)
    assert "GONE" not in env
    assert env["BACK"] == "2" and env["KEPT"] == "k"


async def test_the_configs_env_wins_over_the_proxy_variables_and_the_commands_over_both():
    """With a proxy heel sets http_proxy, NO_PROXY and the rest for each
    command; a value the config gives for one of them is what the command
    sees (as in the plan), and a command's own env() wins over the config."""
    config = SandboxConfig(network=AllowList(["example.invalid"]), env={"NO_PROXY": "config-value",
                                                                        "EXTRA": "config"})
    async with heel.Sandbox(config) as sb:
        out = await sb.command("env").env("EXTRA", "command").timeout(COMMAND_TIMEOUT).output()
    env = _env_of(out)
    assert env["NO_PROXY"] == "config-value"
    assert env["EXTRA"] == "command"
    assert env["http_proxy"].startswith("http://cmd")  # the control: the proxy's variables are set


async def test_the_proxys_record_of_command_names_is_bounded():
    """Each command gets a proxy user name of its own, mapped to its program
    for NetworkRequest.command; the map keeps the latest 4096, so a
    long-lived sandbox does not grow it without end.  (Filled here by hand
    to the bound: 4096 real commands take minutes on a loaded machine.)"""
    async with heel.Sandbox(SandboxConfig(network=AllowList(["example.invalid"]))) as sb:
        commands = sb._proxy.commands
        out = await sb.command("printenv").arg("http_proxy").timeout(COMMAND_TIMEOUT).output()
        first = out.stdout.decode().split("//")[1].split(":")[0]
        assert commands == {first: "printenv"}, explain(out)  # the control
        for i in range(4095):
            commands[f"filler{i}"] = "filler"
        out = await sb.command("true").timeout(COMMAND_TIMEOUT).output()
        assert len(commands) == 4096
        assert first not in commands and list(commands.values())[-1] == "true"


# ---- what goes where: the default streams -------------------------------

async def test_run_without_capture_writes_to_the_hosts_own_stdout_and_stderr(capfd):
    """run() leaves what it does not capture on the host's stdout and
    stderr (relayed into capfd's files), and captures what it is asked to."""
    async with heel.Sandbox() as sb:
        done = await sb.run("echo to-out; echo to-err >&2")
        assert (done.stdout, done.stderr) == (None, None)
        host = capfd.readouterr()
        assert (host.out, host.err) == ("to-out\n", "to-err\n")
        captured = await sb.run("echo to-out; echo to-err >&2", capture_stdout=True, capture_stderr=True)
        assert (captured.stdout, captured.stderr) == (b"to-out\n", b"to-err\n")
        assert capfd.readouterr() == ("", "")


async def test_status_inherits_the_hosts_stdout_all_copied_when_it_returns(capfd):
    """status() leaves stdout/stderr on the host's own (here capfd's files,
    so relayed): everything the command wrote is there when status()
    returns, before any other checkpoint."""
    size = 1 << 20
    async with heel.Sandbox() as sb:
        status = await sb.command("sh").args(["-c", f"head -c {size} /dev/zero | tr '\\0' x; echo err >&2"]) \
            .timeout(COMMAND_TIMEOUT).status()
        host = capfd.readouterr()  # no checkpoint since status() returned
    assert status.success and not status.timed_out
    assert host.out == "x" * size and host.err == "err\n"


async def test_a_host_file_that_refuses_the_output_is_reported(tmp_path):
    """stdout a host file that takes no writes (opened read-only here; a
    full disk in life): the copy ends, and the sandbox records why, for
    the CLI to say.  The control: a writable file gets the output and no
    report."""
    refusing = tmp_path / "refusing"
    refusing.write_text("")
    saved = os.dup(1)
    try:
        for mode, expected in ((os.O_WRONLY, []), (os.O_RDONLY, ["stdout"])):
            fd = os.open(refusing, mode)
            try:
                os.dup2(fd, 1)  # a host file: relayed
                async with heel.Sandbox() as sb:
                    await sb.command("echo").arg("x").timeout(COMMAND_TIMEOUT).status()
                    assert [name for name, _ in sb._output_errors] == expected
                    assert all(isinstance(exc, OSError) for _, exc in sb._output_errors)
            finally:
                os.dup2(saved, 1)
                os.close(fd)
            if not expected:
                assert refusing.read_text() == "x\n"
    finally:
        os.close(saved)


async def test_spawn_does_not_hand_over_the_hosts_stdin():
    """spawn()'s stdin is /dev/null unless set: a pipe on the host's fd 0
    with data in it is not the command's to read."""
    saved = os.dup(0)
    r, w = os.pipe()
    try:
        os.write(w, b"host-stdin-data\n")
        os.close(w)
        os.dup2(r, 0)
        async with heel.Sandbox() as sb:
            process = await sb.command("cat").stdout(Stdio.PIPE).stderr(Stdio.PIPE).spawn()
            async with process:
                data = b""
                with trio.fail_after(COMMAND_TIMEOUT):
                    while chunk := await process.stdout.receive_some(100):
                        data += chunk
                    assert await process.wait() == 0
            assert data == b""
            # The control: set to INHERIT, the host's pipe is read.
            process = await sb.command("cat").stdin(Stdio.INHERIT).stdout(Stdio.PIPE).spawn()
            async with process:
                with trio.fail_after(COMMAND_TIMEOUT):
                    data = b""
                    while chunk := await process.stdout.receive_some(100):
                        data += chunk
            assert data == b"host-stdin-data\n"
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(r)


async def test_null_streams_take_what_the_command_writes():
    """Stdio.NULL is /dev/null opened for reading and writing: a command
    writing to a NULL stdout or stderr succeeds, and reads end of file."""
    async with heel.Sandbox() as sb:
        status = await (sb.command("sh").args(["-c", "echo out || exit 8; echo err >&2 || exit 9; "
                                                     "test -z \"$(cat)\" || exit 10"])
                        .stdin(Stdio.NULL).stdout(Stdio.NULL).stderr(Stdio.NULL).timeout(COMMAND_TIMEOUT).status())
        failed = await sh(sb, "exit 8")  # the control: a failure shows
    assert status.returncode == 0 and failed.returncode == 8


async def test_input_the_command_does_not_read_is_no_error():
    """output() with more stdin bytes than a pipe holds, to a command that
    reads none: the command's end is not the caller's failure."""
    async with heel.Sandbox() as sb:
        out = await sb.command("true").stdin(b"x" * (4 << 20)).timeout(COMMAND_TIMEOUT).output()
        control = await sb.command("wc").arg("-c").stdin(b"x" * (4 << 20)).timeout(COMMAND_TIMEOUT).output()
    assert out.returncode == 0, explain(out)
    assert control.stdout.strip() == str(4 << 20).encode(), explain(control)


async def test_stdin_takes_a_bytearray_and_a_memoryview():
    async with heel.Sandbox() as sb:
        for value in (bytearray(b"from-bytearray"), memoryview(b"from-memoryview")):
            out = await sb.command("cat").stdin(value).timeout(COMMAND_TIMEOUT).output()
            assert out.stdout == bytes(value), explain(out)


async def test_arguments_may_be_bytes_and_paths():
    async with heel.Sandbox() as sb:
        out = await (sb.command(Path("printf")).arg("%s|%s|%s").arg(b"bytes").arg(Path("a/path"))
                     .args([b"more"]).timeout(COMMAND_TIMEOUT).output())
    assert out.stdout == b"bytes|a/path|more", explain(out)


# ---- output_bytes -----------------------------------------------------------

async def test_output_of_exactly_output_bytes_is_whole():
    """The limit is the most kept: output of exactly that size is not
    truncated (nor the command killed); one byte more is."""
    async with heel.Sandbox(SandboxConfig(limits=ResourceLimits(output_bytes=10))) as sb:
        whole = await sb.command("printf").arg("0123456789").timeout(COMMAND_TIMEOUT).output()
        over = await sb.command("printf").arg("0123456789a").timeout(COMMAND_TIMEOUT).output()
    assert (whole.stdout, whole.truncated, whole.returncode) == (b"0123456789", False, 0)
    assert (over.stdout, over.truncated) == (b"0123456789", True)


async def test_output_bytes_bounds_stdout_and_stderr_together():
    """output_bytes is one budget for both streams: 6 bytes on each with a
    limit of 10 keep 10 in all, and say truncated."""
    async with heel.Sandbox(SandboxConfig(limits=ResourceLimits(output_bytes=10))) as sb:
        out = await sh(sb, "printf 123456; printf abcdef >&2")
        control = await sh(sb, "printf 1234; printf abcd >&2")
    assert out.truncated and len(out.stdout) + len(out.stderr) == 10, explain(out)
    assert (control.stdout, control.stderr, control.truncated) == (b"1234", b"abcd", False)


# ---- timeouts ---------------------------------------------------------------

async def test_run_timeout_with_check_false_returns_and_the_commands_timeout_wins():
    """A timeout under run(check=False) is a result, not an error; with
    check it is CommandTimeout (a TimeoutError) that names the command's
    own timeout, not the config's."""
    async with heel.Sandbox(SandboxConfig(limits=ResourceLimits(timeout=600))) as sb:
        done = await sb.run(["sleep", "30"], timeout=1e-9, check=False)
        assert done.returncode == -signal.SIGKILL
        with pytest.raises(heel.CommandTimeout) as raised:
            await sb.run(["sleep", "30"], timeout=1e-9)
        assert isinstance(raised.value, TimeoutError) and isinstance(raised.value, heel.HeelError)
        assert raised.value.timeout == 1e-9
        assert (await sb.run(["true"])).returncode == 0  # the control


async def test_run_raises_for_a_command_killed_by_a_signal():
    """check: a command that died of a signal (a negative returncode) failed
    too, as with subprocess.run(check=True)."""
    async with heel.Sandbox() as sb:
        with pytest.raises(heel.CommandFailed) as failed:
            await sb.run("kill -TERM $$")
        assert failed.value.returncode == -signal.SIGTERM
        assert (await sb.run("kill -TERM $$", check=False)).returncode == -signal.SIGTERM  # the control


def test_a_timed_out_result_is_no_success_even_with_code_zero():
    """A command that exits 0 just as its time is up (the kill then finds it
    gone) reads returncode 0 and timed_out: that is no success.  The race
    cannot be arranged from outside, so the results are built here."""
    assert not heel.Output(b"", b"", 0, timed_out=True).success
    assert not heel.ExitStatus(0, timed_out=True).success
    assert heel.Output(b"", b"", 0).success and heel.ExitStatus(0).success  # the control


async def test_status_reports_a_timeout():
    async with heel.Sandbox() as sb:
        status = await sb.command("sleep").arg("30").timeout(1e-9).status()
        control = await sb.command("true").timeout(COMMAND_TIMEOUT).status()
    assert status.timed_out and not status.success
    assert control.success and not control.timed_out


# ---- Process ----------------------------------------------------------------

async def test_pid_of_a_process_first_asked_once_it_is_gone_is_minus_one():
    async with heel.Sandbox() as sb:
        process = await sb.command("true").spawn()
        with trio.fail_after(COMMAND_TIMEOUT):
            assert await process.wait() == 0
        assert process.pid == -1
        running = await sb.command("sleep").arg("30").spawn()
        async with running:
            assert running.pid > 0  # the control: a live one has its init's pid
            os.kill(running.pid, 0)


async def test_closing_the_sandbox_reaps_a_process_left_running():
    """A spawned process the caller never waited for is killed and reaped
    when the sandbox closes: its returncode says so afterwards."""
    async with heel.Sandbox() as sb:
        process = await sb.command("sleep").arg("30").spawn()
        assert process.returncode is None
    assert process.returncode == -signal.SIGKILL


async def test_a_long_lived_sandbox_keeps_no_record_of_finished_processes():
    """The sandbox holds each of its processes until it is reaped, for its
    close to kill; then it forgets it (it kept every Process, its args and
    streams, for as long as the sandbox lived)."""
    async with heel.Sandbox() as sb:
        running = await sb.command("sleep").arg("30").spawn()
        for _ in range(5):
            assert (await sb.command("true").timeout(COMMAND_TIMEOUT).status()).returncode == 0
            spawned = await sb.command("true").spawn()
            with trio.fail_after(COMMAND_TIMEOUT):
                await spawned.wait()
        assert sb._processes == {running}  # the control: the live one is held
        running.kill()
        with trio.fail_after(COMMAND_TIMEOUT):
            await running.wait()
        assert sb._processes == set()


async def test_leaving_a_process_block_closes_its_streams_and_kills_it():
    """``async with process``: on the way out its streams are closed and
    the command killed and reaped, by heel (not reported as an init killed
    from outside, which the control is)."""
    async with heel.Sandbox() as sb:
        process = await sb.command("sleep").arg("30").stdin(Stdio.PIPE).stdout(Stdio.PIPE).spawn()
        with trio.fail_after(COMMAND_TIMEOUT):
            async with process:
                pass
        assert process.returncode == -signal.SIGKILL
        with pytest.raises(trio.ClosedResourceError):
            await process.stdout.receive_some(1)
        with pytest.raises(trio.ClosedResourceError):
            await process.stdin.send_all(b"x")
        assert sb._output_errors == []  # what the CLI reports: nothing
        other = await sb.command("sleep").arg("30").spawn()
        os.kill(other.pid, signal.SIGKILL)  # the control: the init killed from outside heel
        with trio.fail_after(COMMAND_TIMEOUT):
            assert await other.wait() == -signal.SIGKILL
        assert [name for name, _ in sb._output_errors] == ["init"]


async def test_a_signal_for_a_command_whose_init_died_is_no_error():
    """The init killed from outside, not reaped yet: a signal sent then
    goes nowhere, without an error, and wait() tells what happened."""
    async with heel.Sandbox() as sb:
        process = await sb.command("sleep").arg("30").spawn()
        pid = process.pid
        os.kill(pid, signal.SIGKILL)
        with trio.fail_after(COMMAND_TIMEOUT):
            while process_start(pid) is not None:
                await trio.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        process.terminate()
        with trio.fail_after(COMMAND_TIMEOUT):
            assert await process.wait() == -signal.SIGKILL


async def test_a_signal_sent_while_the_inits_socket_is_full_still_arrives():
    """A flood of signals fills the socket to the command's init (stopped
    here from the host, so that it reads none); a signal sent then goes to
    the init directly, which forwards it once it runs again (it was
    dropped without a word)."""
    async with heel.Sandbox() as sb:
        process = await (sb.command("sh").args(["-c", "trap 'exit 7' TERM; echo ready; "
                                                      "while :; do sleep 0.05; done"])
                         .stdout(Stdio.PIPE).spawn())
        async with process:
            with trio.fail_after(COMMAND_TIMEOUT):
                assert await process.stdout.receive_some(100) == b"ready\n"
            os.kill(process.pid, signal.SIGSTOP)
            for _ in range(20000):  # far more than the socket holds
                process.send_signal(signal.SIGWINCH)  # ignored by sh
            process.send_signal(signal.SIGTERM)
            os.kill(process.pid, signal.SIGCONT)
            with trio.fail_after(COMMAND_TIMEOUT):
                assert await process.wait() == 7


CTRL_C_WHILE_A_PROCESS_CLOSES = r"""
import os, signal
import trio, heel

@trio.lowlevel.enable_ki_protection  # the Ctrl-C waits for the next blocking await: aclose()'s wait
async def ctrl_c_then_close(process):
    os.kill(os.getpid(), signal.SIGINT)
    await process.aclose()

async def main():
    async with heel.Sandbox() as sb:
        process = await sb.command("sleep").arg("30").spawn()
        os.kill(process.pid, signal.SIGSTOP)  # its init answers no kill: aclose() waits 5 s, then SIGKILLs it
        try:
            await ctrl_c_then_close(process)
            print("not interrupted", process.returncode)
        except KeyboardInterrupt:
            print("interrupted", process.returncode)

signal.signal(signal.SIGINT, signal.default_int_handler)  # a Ctrl-C, even where the test runner ignores SIGINT
trio.run(main)
"""


def test_ctrl_c_while_a_process_closes_is_raised_once_it_is_closed():
    """A Ctrl-C while Process.aclose() waits for the kill: the close goes
    on to its end (the process reaped), and then the KeyboardInterrupt is
    raised, not swallowed."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_A_PROCESS_CLOSES], capture_output=True, timeout=120)
    assert result.stdout.decode() == f"interrupted {-signal.SIGKILL}\n", result


async def test_signals_and_kills_after_the_end_are_no_ops():
    async with heel.Sandbox() as sb:
        process = await sb.command("sh").args(["-c", "exit 3"]).spawn()
        with trio.fail_after(COMMAND_TIMEOUT):
            assert await process.wait() == 3
        process.kill()
        process.terminate()
        process.send_signal(signal.SIGKILL)
        process.send_signal(signal.SIGSTOP)
        assert process.returncode == 3 and process.poll() == 3
        with pytest.raises(PolicyError):
            process.send_signal(0)  # the control: what is no signal is still refused


# ---- run_python and python() -------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda sb: sb.run_python(b"print(1)"),
    lambda sb: sb.run_python("print(1)", args="ab"),
    lambda sb: sb.run_python("print(1)", args=b"ab"),
    lambda sb: sb.run_python("print(1)", args=3),
])
async def test_run_python_refuses_what_is_no_source_or_no_argument_list(call):
    async with heel.Sandbox() as sb:
        with pytest.raises(PolicyError):
            await call(sb)
        out = await sb.run_python("import sys; print(sys.argv[1:])", args=["ab"])  # the control
        assert out.stdout == b"['ab']\n", explain(out)


async def test_run_python_feeds_its_input():
    async with heel.Sandbox() as sb:
        out = await sb.run_python("import sys; print(sys.stdin.read()[::-1])", input=b"olleh")
        control = await sb.run_python("import sys; print(repr(sys.stdin.read()))")
    assert out.stdout == b"hello\n", explain(out)
    assert control.stdout == b"''\n", explain(control)


async def test_run_python_never_writes_into_a_file_the_sandbox_planted(monkeypatch):
    """The snippet's file in the private tmp is created afresh (O_EXCL): a
    file the sandbox left under the name heel picks (here made predictable)
    is passed over, not written into, and the snippet runs from a new one."""
    import secrets

    names = iter(["deadbeef", "cafef00d"])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(names))
    async with heel.Sandbox() as sb:
        planted = os.path.join(sb.plan.host_tmp, "heel_python_1_deadbeef.py")
        out = await sh(sb, f"printf '%s' 'print(\"planted\")  # the sandbox wrote this' > {sb.plan.tmp}/heel_python_1_deadbeef.py")
        assert out.returncode == 0 and os.path.exists(planted), explain(out)
        out = await sb.run_python("print('mine')")
        assert out.stdout == b"mine\n", explain(out)
        with open(planted) as f:
            assert f.read() == 'print("planted")  # the sandbox wrote this'
        assert not os.path.exists(os.path.join(sb.plan.host_tmp, "heel_python_1_cafef00d.py"))  # removed after


async def test_python_is_the_configs_interpreter(host_dir):
    """sb.python() (and run_python()) run the PythonConfig's interpreter,
    not whatever python3 the PATH finds (the control, without one)."""
    venv = host_dir / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (venv / "bin" / "python").write_text('#!/bin/sh\necho "the venv\'s python: $*"\n')
    (venv / "bin" / "python").chmod(0o755)
    venv.chmod(0o755)
    (venv / "bin").chmod(0o755)
    async with heel.Sandbox(SandboxConfig(python=heel.PythonConfig(venv))) as sb:
        out = await sb.python().arg("x").timeout(COMMAND_TIMEOUT).output()
    assert out.stdout == b"the venv's python: x\n", explain(out)
    async with heel.Sandbox() as sb:
        out = await sb.python().args(["-c", "print('python3')"]).timeout(COMMAND_TIMEOUT).output()
    assert out.stdout == b"python3\n", explain(out)


async def test_run_python_has_a_timeout():
    async with heel.Sandbox() as sb:
        out = await sb.run_python("import time; time.sleep(30)", timeout=1e-9)
        control = await sb.run_python("print(1)", timeout=COMMAND_TIMEOUT)
    assert out.timed_out and out.returncode == -signal.SIGKILL, explain(out)
    assert control.stdout == b"1\n" and not control.timed_out


async def test_run_python_after_the_sandbox_closed_is_sandbox_closed():
    sb = heel.Sandbox()
    async with sb:
        assert (await sb.run_python("print(1)")).stdout == b"1\n"  # the control
    with pytest.raises(heel.SandboxClosed):
        await sb.run_python("print(1)")
    with pytest.raises(heel.SandboxClosed):
        await sb.command("true").spawn()


async def test_run_passes_env_and_cwd():
    async with heel.Sandbox() as sb:
        (sb.workdir / "sub").mkdir()
        done = await sb.run(["sh", "-c", 'echo "$A $(pwd)"'], env={"A": "from-run"}, cwd="sub",
                            capture_stdout=True)
    assert done.stdout == f"from-run {sb.workdir}/sub\n".encode()
