"""The Python API: configuration, errors, commands and their results."""

from __future__ import annotations

import os
import errno
import signal
import subprocess

import pytest
import trio

import heel
from heel import IsolationLevel, PolicyError, ResourceLimits, SandboxConfig, SecurityConfig


# ---- configuration: bad input fails when the config is built ------------

@pytest.mark.parametrize("kwargs", [
    {"level": "extreme"},
    {"level": 3},
    {"readable": ["/definitely/not/here"]},
    {"writable": [""]},
    {"writable": ["/tmp/a\0b"]},
    {"workdir": "/etc/hostname"},  # not a directory
    {"env": {"1BAD": "x"}},
    {"env": {"OK": 3}},
    {"env": {"OK": "a\0b"}},
    {"env_passthrough": ["no spaces please"]},
    {"security": "strict"},
    {"limits": {"timeout": 3}},
    {"network": "deny"},
    {"best_effort": "yes"},
])
def test_bad_config_raises_policy_error(kwargs):
    with pytest.raises(PolicyError):
        SandboxConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"timeout": 0}, {"timeout": -1}, {"timeout": float("nan")}, {"memory": "lots"},
    {"memory": 0}, {"open_files": 2}, {"processes": 1.5}, {"cpu_time": True},
    {"file_size": "-1M"}, {"output_bytes": []},
])
def test_bad_limits_raise_policy_error(kwargs):
    with pytest.raises(PolicyError):
        ResourceLimits(**kwargs)


def test_policy_error_is_a_value_error():
    with pytest.raises(ValueError):
        SandboxConfig(level="nope")
    assert issubclass(heel.SpawnError, OSError)
    assert issubclass(heel.CommandNotFound, FileNotFoundError)
    assert issubclass(heel.CommandTimeout, TimeoutError)


def test_sizes_and_levels_are_parsed():
    limits = ResourceLimits(memory="512M", file_size="1GiB", output_bytes=4096)
    assert (limits.memory, limits.file_size, limits.output_bytes) == (512 << 20, 1 << 30, 4096)
    assert SandboxConfig(level="STRICT").level is IsolationLevel.STRICT


@pytest.mark.parametrize("text, size", [
    ("4096", 4096), ("512M", 512 << 20), ("512 m", 512 << 20), ("1.5GiB", 3 << 29), ("2kb", 2048),
    (" 3 T ", 3 << 40), ("10b", 10), ("8KiB", 8 << 10),
])
def test_size_spellings(text, size):
    assert ResourceLimits(memory=text).memory == size


@pytest.mark.parametrize("text", ["", "M", "1.5.2", "1 k b", "1x", "-1M", "\u0661\u0662", "1e3", ".5M", "1.M", "8iB"])
def test_sizes_that_are_no_size(text):
    with pytest.raises(PolicyError, match="cannot read"):
        ResourceLimits(memory=text)


@pytest.mark.parametrize("name", ["", "1A", "A-B", "A B", "A\n", "\u00c9", "A=B"])
def test_env_names_must_be_portable(name):
    with pytest.raises(PolicyError, match="variable name"):
        SandboxConfig(env={name: "x"})


def test_config_is_frozen():
    config = SandboxConfig()
    with pytest.raises(AttributeError):
        config.level = IsolationLevel.PERMISSIVE  # type: ignore[misc]


def test_explicit_grant_inside_protected_place_is_refused(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    config = SandboxConfig(readable=[home / ".ssh"], security=SecurityConfig(protect_user_home=False))

    async def open_it():
        async with heel.Sandbox(config):
            pass

    with pytest.raises(PolicyError, match="protected"):
        trio.run(open_it)


# ---- commands ------------------------------------------------------------

async def test_output_captures_both_streams_and_the_code():
    async with heel.Sandbox() as sb:
        out = await sb.command("sh").args(["-c", "echo out; echo err >&2; exit 3"]).output()
    assert (out.stdout, out.stderr, out.returncode, out.timed_out) == (b"out\n", b"err\n", 3, False)
    assert not out.success


async def test_stdin_bytes_arguments_env_and_cwd():
    async with heel.Sandbox() as sb:
        (sb.workdir / "sub").mkdir()
        out = await (sb.command("sh").arg("-c").arg('cat; printf "%s|%s|%s" "$1" "$GREETING" "$(pwd)"')
                     .arg("zero").arg("one two").env("GREETING", "hi").current_dir("sub")
                     .stdin(b"in\n").output())
    assert out.stdout == f"in\none two|hi|{sb.workdir}/sub".encode()


async def test_commands_share_the_workdir():
    async with heel.Sandbox() as sb:
        await sb.command("sh").args(["-c", "echo 42 > shared.txt"]).status()
        out = await sb.command("cat").arg("shared.txt").output()
        assert out.stdout == b"42\n"
        assert (sb.workdir / "shared.txt").read_text() == "42\n"


async def test_environment_is_clean_and_points_at_private_places(monkeypatch):
    monkeypatch.setenv("HEEL_TEST_SECRET", "do-not-leak")
    async with heel.Sandbox(SandboxConfig(env={"EXTRA": "1"})) as sb:
        out = await sb.command("env").output()
    env = dict(line.split("=", 1) for line in out.stdout.decode().splitlines())
    assert "HEEL_TEST_SECRET" not in env
    assert env["EXTRA"] == "1"
    assert env["HOME"] == str(sb.workdir)
    assert env["TMPDIR"] == "/tmp"
    assert set(env) <= {"PATH", "HOME", "TMPDIR", "EXTRA", "LANG", "LANGUAGE", "TERM", "COLORTERM", "TZ"} \
        | {k for k in env if k.startswith("LC_")}


async def test_env_remove():
    async with heel.Sandbox(SandboxConfig(env={"GONE": "1"})) as sb:
        out = await sb.command("sh").args(["-c", 'echo "[$GONE]"']).env_remove("GONE").output()
    assert out.stdout == b"[]\n"


async def test_timeout_is_reported():
    async with heel.Sandbox() as sb:
        with trio.fail_after(10):
            out = await sb.command("sleep").arg("30").timeout(0.3).output()
    assert out.timed_out and out.returncode == -signal.SIGKILL


async def test_a_timeout_that_is_up_before_the_start_times_the_command_out():
    """A timeout shorter than the start itself: the command is started and
    killed, and reported like any other timeout (it was trio.TooSlowError,
    neither a HeelError nor a TimeoutError)."""
    async with heel.Sandbox() as sb:
        out = await sb.command("sleep").arg("30").timeout(1e-9).output()
        assert out.timed_out and out.returncode == -signal.SIGKILL
        with pytest.raises(heel.CommandTimeout):
            await sb.run(["sleep", "30"], timeout=1e-9)
        with pytest.raises(PolicyError, match="at most"):
            sb.command("true").timeout(1e300)  # past what select() and trio can wait
        assert (await sb.command("true").timeout(30).output()).returncode == 0  # the control


async def test_many_tasks_may_wait_for_one_process():
    """As with trio.Process: any number of tasks wait() at once, and one of
    them cancelled leaves the others waiting."""
    async with heel.Sandbox() as sb:
        process = await sb.command("sh").args(["-c", "sleep 0.5; exit 3"]).spawn()
        codes = []

        async def wait():
            codes.append(await process.wait())

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                async with trio.open_nursery() as cancelled:
                    cancelled.start_soon(process.wait)  # waits on the pidfd...
                    await trio.sleep(0.05)
                    for _ in range(4):
                        nursery.start_soon(wait)  # ...these on it
                    await trio.sleep(0.05)
                    cancelled.cancel_scope.cancel()  # it goes: one of the others takes over
        assert codes == [3, 3, 3, 3]


async def test_run_is_shaped_like_trio_run_process():
    async with heel.Sandbox() as sb:
        done = await sb.run(["sh", "-c", "cat; exit 0"], input=b"x", capture_stdout=True)
        assert isinstance(done, subprocess.CompletedProcess)
        assert (done.returncode, done.stdout, done.stderr) == (0, b"x", None)
        with pytest.raises(heel.CommandFailed) as failed:
            await sb.run("exit 4", capture_stderr=True)
        assert failed.value.returncode == 4
        assert isinstance(failed.value, subprocess.CalledProcessError)
        unchecked = await sb.run("exit 5", check=False)
        assert unchecked.returncode == 5
        with pytest.raises(heel.CommandTimeout):
            await sb.run(["sleep", "30"], timeout=0.3)


async def test_spawn_gives_streams_and_signals():
    async with heel.Sandbox() as sb:
        cmd = sb.command("sh").args(["-c", "trap 'echo got-term; exit 7' TERM; echo ready; "
                                           "while :; do sleep 0.05; done"])
        process = await cmd.stdout(heel.Stdio.PIPE).spawn()
        async with process:
            with trio.fail_after(10):
                assert await process.stdout.receive_some(100) == b"ready\n"
                process.send_signal(signal.SIGTERM)
                rest = b""
                while chunk := await process.stdout.receive_some(100):
                    rest += chunk
                assert rest == b"got-term\n"
                assert await process.wait() == 7
        assert process.returncode == 7 and process.poll() == 7


async def test_spawn_stdin_pipe():
    async with heel.Sandbox() as sb:
        process = await sb.command("cat").stdin(heel.Stdio.PIPE).stdout(heel.Stdio.PIPE).spawn()
        async with process:
            await process.stdin.send_all(b"echo\n")
            await process.stdin.aclose()
            data = b""
            while chunk := await process.stdout.receive_some(100):
                data += chunk
            assert data == b"echo\n"
            assert await process.wait() == 0


async def test_missing_program_and_bad_cwd_are_spawn_errors():
    async with heel.Sandbox() as sb:
        with pytest.raises(heel.CommandNotFound) as missing:
            await sb.command("no-such-program-heel").output()
        assert missing.value.errno == 2 and missing.value.stage == "exec"
        with pytest.raises(heel.SpawnError) as bad_cwd:
            await sb.command("true").current_dir("/no/such/dir").output()
        assert bad_cwd.value.stage == "chdir"
        # The sandbox is still usable after a failed spawn.
        assert (await sb.command("true").status()).success


@pytest.mark.parametrize("build", [
    lambda sb: sb.command("a\0b"),
    lambda sb: sb.command("true").arg(3),
    lambda sb: sb.command("true").args("abc"),
    lambda sb: sb.command("true").env("A B", "x"),
    lambda sb: sb.command("true").timeout(-1),
    lambda sb: sb.command("true").stdout("pipe"),
    lambda sb: sb.command("true").stdin(42),
])
async def test_bad_command_arguments_raise_policy_error(build):
    async with heel.Sandbox() as sb:
        with pytest.raises(PolicyError):
            build(sb)


async def test_closed_sandbox_refuses_commands():
    sb = heel.Sandbox()
    with pytest.raises(heel.SandboxClosed):
        sb.command("true")  # not open yet: no workdir to resolve
        await sb.command("true").output()
    async with sb:
        pass
    with pytest.raises(heel.SandboxClosed):
        await sb.command("true").output()


async def test_given_workdir_is_used_and_kept(tmp_path):
    async with heel.Sandbox(SandboxConfig(workdir=tmp_path)) as sb:
        assert sb.workdir == tmp_path.resolve()
        await sb.command("sh").args(["-c", "echo kept > file"]).status()
    assert (tmp_path / "file").read_text() == "kept\n"


async def test_fresh_workdir_is_removed_on_close():
    async with heel.Sandbox() as sb:
        workdir = sb.workdir
        await sb.command("sh").args(["-c", "mkdir -p a/b && echo x > a/b/c"]).status()
        assert (workdir / "a/b/c").exists()
    assert not workdir.exists()


async def test_output_limit_truncates_and_kills():
    async with heel.Sandbox(SandboxConfig(limits=ResourceLimits(output_bytes=10000))) as sb:
        with trio.fail_after(10):
            out = await sb.command("yes").output()
    assert out.truncated and len(out.stdout) == 10000 and out.returncode != 0


def test_probe_reports_every_protection():
    report = heel.probe()
    names = {p.name for p in report.protections}
    assert {"landlock", "seccomp", "mount_view", "pid_namespace", "capabilities"} <= names
    for p in report.protections:
        assert p.status in ("enforced", "degraded", "unavailable")
    if report.landlock_abi:
        assert report.status("landlock") == "enforced"


def test_import_heel_does_not_import_trio():
    code = "import sys, heel; heel.SandboxConfig(); print('trio' in sys.modules)"
    out = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


async def test_a_path_that_vanishes_after_planning_is_skipped(tmp_path):
    """The plan lists the host's directories when the sandbox opens; one
    removed before the ruleset is (re)built must not break the sandbox."""
    from heel import _sync
    from heel._plan import Rule
    from heel._spawn import Prepared

    gone = tmp_path / "gone"
    gone.mkdir()
    async with heel.Sandbox() as sb:
        plan = sb.plan._replace(rules=sb.plan.rules + (Rule(str(gone), 1),))
        gone.rmdir()
        prepared = Prepared(plan)
        try:
            with open(os.devnull, "r+b") as null:
                code, _ = _sync.run(prepared, ["true"], plan.env, plan.workdir, (null.fileno(),) * 3)
            assert code == 0
        finally:
            prepared.close()


async def test_a_single_file_under_tmp_can_be_granted(tmp_path_factory):
    import tempfile

    fd, path = tempfile.mkstemp(prefix="heel-granted-", dir="/tmp")
    os.write(fd, b"granted file\n")
    os.close(fd)
    os.chmod(path, 0o644)
    try:
        async with heel.Sandbox(heel.SandboxConfig(level="strict", readable=[path])) as sb:
            out = await sb.command("cat").arg(path).output()
            other = await sb.command("sh").args(["-c", "ls /tmp | grep -c heel-granted-"]).output()
        assert out.stdout == b"granted file\n", out
        assert other.stdout == b"1\n", other  # that file only, in the private /tmp
    finally:
        os.unlink(path)


def test_the_plans_path_patterns_match_as_glob_does(tmp_path):
    import glob

    from heel._plan import _existing

    for name in ("ssh_host_rsa_key", "ssh_host_rsa_key.pub", "ssh_host_key", ".hidden_key", "key", "nvidia0"):
        (tmp_path / name).touch()
    patterns = [f"{tmp_path}/{p}" for p in ("ssh_host_*key", "*key", "nvidia*", "*", "key", "missing", "x*")]
    for pattern in patterns:
        assert _existing([pattern]) == sorted(glob.glob(pattern)), pattern
    with pytest.raises(ValueError):
        _existing([f"{tmp_path}/*/key"])


def test_an_async_network_event_callback_is_refused():
    """on_network_event is called, not awaited: an async one would never run
    (it was accepted, and only a RuntimeWarning said so)."""
    async def callback(event) -> None:
        pass

    with pytest.raises(PolicyError, match="on_network_event"):
        SandboxConfig(on_network_event=callback)
    SandboxConfig(on_network_event=lambda event: None)  # the control


# ---- misuse gets heel's errors (found by review) ----------------------------------------


async def test_send_signal_refuses_what_is_no_signal():
    """999 and -1 were dropped by heel-init without a word, "x" raised
    struct.error."""
    async with heel.Sandbox() as sb:
        process = await sb.command("sleep").arg("30").spawn()
        for sig in (999, -1, 0, "x", True, 2.0):
            with pytest.raises(heel.PolicyError):
                process.send_signal(sig)
        process.send_signal(signal.SIGTERM)  # the neighbour: a real signal still arrives
        assert await process.wait() == -signal.SIGTERM


async def test_leaving_a_sandbox_not_entered_or_left_already_is_sandbox_closed():
    """AttributeError and trio's IndexError came out of __aexit__."""
    never = heel.Sandbox()
    with pytest.raises(heel.SandboxClosed):
        await never.__aexit__(None, None, None)
    sb = heel.Sandbox()
    async with sb:
        pass
    with pytest.raises(heel.SandboxClosed):
        await sb.__aexit__(None, None, None)


async def test_a_request_past_heel_inits_limit_fails_alone():
    """An argument list of more than 16 MiB was taken by heel-init for a
    broken stream: it ended, and the whole sandbox with it (found by
    review).  It is E2BIG now, as a 5 MiB one is from execve, and the
    sandbox goes on."""
    async with heel.Sandbox() as sb:
        for size in (5, 17):
            with pytest.raises(heel.SpawnError) as caught:
                await sb.command("true").arg("x" * (size << 20)).output()
            assert caught.value.errno == errno.E2BIG, (size, caught.value)
        out = await sb.command("echo").arg("still here").output()
    assert out.stdout == b"still here\n", out
