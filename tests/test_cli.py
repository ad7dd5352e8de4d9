"""The command line: ``python -m heel run/shell/doctor`` in a subprocess.

Synchronous on purpose (the CLI must not run inside trio).  Host-side
fixtures live under /var/tmp: inside the sandbox /tmp is private.
"""

from __future__ import annotations

import errno
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heel import _cliargs
from heel import errors as heel_errors
from helpers import assert_heel_error, processes_with, unique_marker
from heel.errors import PolicyError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sandbox")


def heel(*args: str, input: bytes | None = None, env: dict[str, str] | None = None,
         timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "heel", *args], input=input, capture_output=True,
                          env=env, timeout=timeout)


def test_exit_status_passes_through():
    assert heel("run", "--", "sh", "-c", "exit 7").returncode == 7
    assert heel("run", "true").returncode == 0


def test_killed_by_signal_is_128_plus_n():
    assert heel("run", "sh", "-c", "kill -TERM $$").returncode == 128 + signal.SIGTERM


def test_stdin_and_stdout_pass_through():
    result = heel("run", "cat", input=b"through the sandbox\n")
    assert result.returncode == 0
    assert result.stdout == b"through the sandbox\n"


def test_timeout_exits_124_with_one_line():
    started = time.monotonic()
    result = heel("run", "--timeout", "0.5", "sleep", "30")
    assert time.monotonic() - started < 15
    stderr = assert_heel_error(result, 124)
    assert "timed out" in stderr


def test_missing_program_exits_127():
    stderr = assert_heel_error(heel("run", "no-such-program-heel"), 127)
    assert "no-such-program-heel" in stderr


@pytest.mark.parametrize("runner", ["plain", "trio"])
def test_a_program_that_cannot_be_executed_exits_126(runner):
    """As in a shell: found, but not executable (a directory, a file without
    its x bit).  The sandbox was set up, so not 125 and not "setup failed"."""
    network = ["--network", "allow"] if runner == "trio" else []
    for program in ("/etc", "/etc/passwd"):
        stderr = assert_heel_error(heel("run", *network, "--", program), 126)
        assert f"{program}: cannot execute: Permission denied" in stderr, stderr


@pytest.mark.parametrize("args", [
    ["run", "--level", "bogus", "true"],
    ["run", "--no-such-option", "true"],
    ["run"],
    ["run", "--env", "NOEQUALS", "true"],
    ["run", "--timeout", "soon", "true"],
    ["run", "--max-procs", "0", "true"],
    ["run", "--writable", "/var/tmp/heel-does-not-exist", "true"],
    ["run", "--env=--", "true"], ["run", "--workdir=--", "true"], ["run", "--timeout=--", "true"],
    ["no-such-subcommand"],
])
def test_bad_usage_exits_125(args):
    assert_heel_error(heel(*args), 125)


@pytest.mark.parametrize("size", ["12q", "lots", "-5M"])
def test_memory_parse_errors_exit_125(size):
    stderr = assert_heel_error(heel("run", "--memory", size, "true"), 125)
    assert "--memory" in stderr


def test_memory_limit_is_applied():
    result = heel("run", "--memory", "256M", "sh", "-c", "ulimit -d")
    assert result.stdout.decode().strip() == str(256 * 1024)  # ulimit -d counts KiB


def test_config_file(host_dir):
    secret = host_dir / "secret.txt"
    secret.write_text("on the host\n")
    secret.chmod(0o644)
    config = host_dir / "heel.toml"
    # Relative paths in the file start from the file's directory.
    config.write_text('level = "strict"\nreadable = ["secret.txt"]\nenv = {GREETING = "hello"}\n'
                      'timeout = 10\nmemory = "512M"\nprotect_home = false\n')
    result = heel("run", "--config", str(config), "sh", "-c", f'echo "$GREETING"; cat {secret}')
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello\non the host\n"
    # The command line overrides the file.
    result = heel("run", "--config", str(config), "--env", "GREETING=bye", "sh", "-c", 'echo "$GREETING"')
    assert result.stdout == b"bye\n"


@pytest.mark.parametrize("text", ['bogus_key = 1\n', 'timeout = "x\n', 'memory = "lots"\n',
                                  'max_procs = 2.5\n', 'level = 3\n', 'protect_home = "no"\n'])
def test_bad_config_file_exits_125(host_dir, text):
    config = host_dir / "heel.toml"
    config.write_text(text)
    assert_heel_error(heel("run", "--config", str(config), "true"), 125)


def test_env_and_pass_env():
    env = {**os.environ, "HEEL_TEST_SECRET": "hunter2"}
    show = ["sh", "-c", 'echo "[$HEEL_TEST_SECRET] [$SET_HERE]"']
    assert heel("run", *show, env=env).stdout == b"[] []\n"
    result = heel("run", "--pass-env", "HEEL_TEST_SECRET", "--env", "SET_HERE=x=1", *show, env=env)
    assert result.stdout == b"[hunter2] [x=1]\n"


def test_workdir_is_used_and_kept(host_dir):
    result = heel("run", "--workdir", str(host_dir), "sh", "-c", "pwd; echo kept > out.txt")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == str(host_dir)
    assert (host_dir / "out.txt").read_text() == "kept\n"


def test_strict_level_hides_what_default_shows(host_dir):
    target = host_dir / "visible.txt"
    target.write_text("readable\n")
    target.chmod(0o644)
    assert heel("run", "cat", str(target)).stdout == b"readable\n"
    assert heel("run", "--level", "strict", "cat", str(target)).returncode != 0


def test_writable(host_dir):
    target = host_dir / "written.txt"
    write = ["sh", "-c", f"echo written > {target}"]
    assert heel("run", *write).returncode != 0
    assert not target.exists()
    assert heel("run", "--writable", str(host_dir), *write).returncode == 0
    assert target.read_text() == "written\n"


def test_shell_reads_commands_from_stdin():
    result = heel("shell", input=b"echo hi; exit 3\n")
    assert result.returncode == 3, result.stderr
    assert result.stdout == b"hi\n"


def test_doctor():
    from heel.config import SandboxConfig
    from heel.errors import SandboxUnavailable
    from heel._probe import environment, require

    env, why = environment()
    try:
        require(env, SandboxConfig(), why)
        expected = 0
    except SandboxUnavailable:
        expected = 1
    result = heel("doctor")
    assert result.returncode == expected
    assert "landlock" in result.stdout.decode()
    from heel._plan import GPU_DEVICES, _existing

    gpu = [line for line in result.stdout.decode().splitlines() if line.startswith("gpu ")]
    assert len(gpu) == 1, result.stdout
    assert ("granted with allow_gpu" in gpu[0]) == bool(_existing(GPU_DEVICES)), gpu


def test_top_level_help_lists_the_commands():
    result = heel("--help")
    assert result.returncode == 0
    listed = {line.strip("│ ").split(" ")[0] for line in result.stdout.decode().splitlines()}
    for command in ("run", "shell", "python", "doctor"):
        assert command in listed, result.stdout.decode()
        assert heel(command, "--help").returncode == 0


def test_run_imports_neither_typer_nor_trio():
    """`heel run` must start fast: typer and trio each cost more than the command."""
    import _cffi_backend

    import heel as package

    # Without site (-S), so that nothing the interpreter's start imports by
    # itself (an editable install's finder brings pathlib, re and enum) hides
    # what heel's run path imports: heel and cffi's backend found through
    # PYTHONPATH instead.
    path = os.pathsep.join([os.path.dirname(os.path.dirname(package.__file__)),
                            os.path.dirname(_cffi_backend.__file__)])
    result = subprocess.run([sys.executable, "-S", "-X", "importtime", "-m", "heel", "run", "--", "true"],
                            capture_output=True, timeout=30, cwd="/", env={**os.environ, "PYTHONPATH": path})
    assert result.returncode == 0, result.stderr
    imported = {line.split("|")[-1].strip() for line in result.stderr.decode().splitlines()}
    assert "heel._spawn" in imported, imported  # it did run heel's path
    assert not {"typer", "trio"} & imported
    # Nor what heel's run path got rid of (each a few ms at every start).
    assert not {"shutil", "tempfile", "threading", "typing", "heel._netaddr", "argparse", "re",
                "glob", "gettext", "signal", "socket"} & imported, imported


# The option table, in process: no sandbox needed.

def test_command_line_overrides_and_extends_the_file(host_dir):
    (host_dir / "a").mkdir()
    (host_dir / "b").mkdir()
    config = host_dir / "heel.toml"
    config.write_text('level = "strict"\ntimeout = 5\nreadable = ["a"]\nenv = {K = "file", L = "file"}\n'
                      'allow_gpu = false\n')
    namespace = _cliargs.parse("run", ["--config", str(config), "--timeout", "9", "--readable",
                                       str(host_dir / "b"), "--env", "K=cli", "--", "true"])
    built = _cliargs.build_config(namespace)
    assert namespace.command == ["true"]
    assert built.level.value == "strict"
    assert built.limits.timeout == 9
    assert built.readable == (host_dir / "a", host_dir / "b")
    assert built.env == {"K": "cli", "L": "file"}
    assert built.security.allow_gpu is False
    assert built.security.protect_user_home is True


def test_every_setting_is_a_flag_and_a_config_key():
    parser = _cliargs.make_parser("run")
    flags = {flag for action in parser._actions for flag in action.option_strings}
    for setting in _cliargs.SETTINGS:
        assert setting.flag in flags
        assert setting.flag == "--" + setting.key.replace("_", "-")


def test_options_after_the_command_belong_to_it():
    namespace = _cliargs.parse("run", ["sh", "--level", "strict"])
    assert namespace.command == ["sh", "--level", "strict"]
    assert namespace.level is None


#: Words of `heel run`/`heel shell` command lines: options, values, mistakes.
_WORDS = sorted({s.flag for s in _cliargs.SETTINGS}
                | {"--no-" + s.flag[2:] for s in _cliargs.SETTINGS if s.kind == "flag"}
                | {"--config", "--no-best-effort", "--levl", "--help", "-h", "-", "--", "",
                   "strict", "default", "bogus", "allow", "deny", "5", "-5", "/x", "~/y", "K=V", "NAME",
                   "true", "sh", "-c", "--timeout=3", "--timeout=", "--level=strict", "--level=bad",
                   "--env=A=B", "--allow-gpu=1", "--best-effort=yes", "--max-procs=2", "--env=--",
                   "--workdir=--", "--readable=--"})


def _parsed(command, parse_args):
    """vars() of the finished namespace, or the UsageError's message."""
    try:
        return vars(_cliargs.finish(command, parse_args()))
    except PolicyError as exc:
        return str(exc)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command=st.sampled_from(["run", "shell"]), args=st.lists(st.sampled_from(_WORDS), max_size=8))
def test_the_plain_parser_reads_every_line_as_argparse_does(command, args):
    plain = _cliargs._parse_plainly(command, list(args))
    if plain is None:  # left to argparse
        return
    assert _parsed(command, lambda: plain) == _parsed(
        command, lambda: _cliargs.make_parser(command).parse_args(list(args)))


@pytest.mark.parametrize("args", [
    ["--", "true"], ["true"], ["sh", "-c", "echo --level"],
    ["--level", "strict", "--timeout", "5", "--memory=1G", "--", "sh", "-c", "x"],
    ["--no-allow-gpu", "--env", "A=B", "--env", "C=D", "--readable", "/x", "--best-effort", "true"],
    ["--allow-domain", "*.example.com", "--allow-domain", "pypi.org:443", "curl", "x"],
])
def test_usual_command_lines_need_no_argparse(args):
    plain = _cliargs._parse_plainly("run", args)
    assert plain is not None
    assert vars(_cliargs.finish("run", plain)) == vars(
        _cliargs.finish("run", _cliargs.make_parser("run").parse_args(args)))


def test_usage_errors_are_policy_errors():
    with pytest.raises(PolicyError, match="--memory"):
        _cliargs.build_config(_cliargs.parse("run", ["--memory", "x", "true"]))


# ---- network ---------------------------------------------------------------------


@pytest.fixture
def web():
    from netservers import HttpServer

    server = HttpServer("heel-cli-web")
    yield server
    server.close()


def test_allow_domain_reaches_what_it_names_and_reports_denials(web):
    # --noproxy '': NO_PROXY sends loopback straight to the sandbox's own.
    script = (f"curl -sS --noproxy '' http://127.0.0.1:{web.port}/yes; "
              "curl -sS -o /dev/null -w '%{http_code}\\n' http://denied.test/no")
    result = heel("run", "--allow-domain", "127.0.0.1", "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == ["heel-cli-web GET /yes 0", "403"], result
    denials = [line for line in result.stderr.decode().splitlines() if line.startswith("heel: network denied")]
    assert len(denials) == 1 and "http denied.test:80 by sh" in denials[0], result.stderr
    assert [path for _, path, _ in web.requests] == ["/yes"]


def test_network_allow_still_refuses_internal_addresses(web):
    result = heel("run", "--network", "allow", "--", "curl", "-sS", "--noproxy", "", "-o", "/dev/null",
                  "-w", "%{http_code}",
                  f"http://127.0.0.1:{web.port}/")
    assert result.stdout == b"403", result
    assert "internal address" in result.stderr.decode()
    assert web.requests == []


def test_network_deny_is_the_default_and_has_no_proxy():
    result = heel("run", "--", "sh", "-c", "echo ${HTTP_PROXY:-none}")
    assert result.stdout == b"none\n"


@pytest.mark.parametrize("args,message", [
    (["--network", "deny", "--allow-domain", "a.test"], "contradict"),
    (["--network", "sometimes"], "invalid choice"),
    (["--allow-domain", "a.*.test"], "a.*.test"),
])
def test_network_usage_errors(args, message):
    result = heel("run", *args, "--", "true")
    assert message in assert_heel_error(result, 125)


# ---- heel python ---------------------------------------------------------------------

needs_system_python = pytest.mark.skipif(not os.access("/usr/bin/python3", os.X_OK), reason="needs /usr/bin/python3")


def test_python_code_script_and_stdin(host_dir):
    result = heel("python", "--python", "/usr/bin/python3", "-c", "import sys; print(sys.argv[1:])", "a", "b c")
    assert result.stdout == b"['a', 'b c']\n", result
    script = host_dir / "hello.py"
    script.write_text("import sys\nprint('script', sys.argv[1:])\nsys.exit(4)\n")
    script.chmod(0o644)
    result = heel("python", str(script), "x")
    assert (result.returncode, result.stdout) == (4, b"script ['x']\n"), result
    result = heel("python", input=b"print(6 * 7)\n")
    assert result.stdout == b"42\n", result
    result = heel("python", "-", "y", input=b"import sys; print(sys.argv[1:])\n")  # as python - reads it
    assert result.stdout == b"['y']\n", result


def test_python_missing_script_is_a_heel_error(host_dir):
    result = heel("python", str(host_dir / "nope.py"))
    assert "no such script" in assert_heel_error(result, 125)


def test_python_script_in_a_protected_place_is_named_as_such(tmp_path):
    """The script heel python is given is granted to the sandbox: one in a
    protected place is refused, and the message speaks of the script and
    of the command line's options, not of a readable path nobody passed."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    script = home / ".ssh" / "s.py"
    script.write_text("print('ran')\n")
    result = heel("python", str(script), env={**os.environ, "HOME": str(home)})
    stderr = assert_heel_error(result, 125)
    assert "the script" in stderr and "--no-protect" in stderr and "readable path" not in stderr, stderr


@needs_system_python
def test_python_with_packages_builds_a_temporary_environment(host_dir):
    import sys as host_sys

    sys_path = str(Path(__file__).parent)
    host_sys.path.insert(0, sys_path)
    from pkgtools import build_wheel

    wheels = host_dir / "wheels"
    wheels.mkdir()
    wheels.chmod(0o755)
    build_wheel(str(wheels), "heelgamma", "3.0", "VALUE = 'gamma'\n")
    for f in wheels.iterdir():
        f.chmod(0o644)
    result = heel("python", "--python", "/usr/bin/python3", "-p", "heelgamma", "--no-index",
                  "--find-links", str(wheels), "-c", "import heelgamma, sys; print(heelgamma.VALUE, sys.prefix)",
                  timeout=180)
    assert result.returncode == 0, result.stderr
    value, prefix = result.stdout.decode().split()
    assert value == "gamma" and prefix.startswith("/var/tmp/heel-venv-")
    assert "installing" in result.stderr.decode()
    assert not os.path.exists(os.path.dirname(prefix)), "the temporary environment was left behind"
    failed = heel("python", "--python", "/usr/bin/python3", "-p", "heel-not-there", "--no-index",
                  "--find-links", str(wheels), "-c", "pass", timeout=180)
    stderr = failed.stderr.decode()
    assert failed.returncode == 125 and "heel-not-there" in stderr, stderr
    assert "No matching distribution found" in stderr or "unsatisfiable" in stderr, stderr


@pytest.mark.parametrize("network", [False, True], ids=["sync runner", "trio runner (a network)"])
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_a_signal_kills_the_tree(network, signum, code):
    marker = f"47{int(network)}{signum}.25"  # an unlikely sleep duration, to find leftovers by
    options = ["--network", "allow"] if network else []
    # The test may run with SIGINT ignored (a background job): the CLI must see it.
    process = subprocess.Popen(
        [sys.executable, "-m", "heel", "run", *options, "--", "sh", "-c", f"sleep {marker} & sleep {marker}"],
        stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        time.sleep(1.5)  # let it start
        process.send_signal(signum)
        assert process.wait(timeout=15) == code
        assert b"Traceback" not in process.stderr.read()
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    time.sleep(0.2)
    leftovers = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True)
    assert leftovers.stdout == b""


def test_with_a_network_heel_errors_are_still_one_line():
    result = heel("run", "--network", "allow", "--", "heel-no-such-program")
    assert "command not found" in assert_heel_error(result, 127)


# ---- found in review: a linked $TMPDIR, and what counts as "no namespaces" ----------


def test_a_symlinked_tmpdir_keeps_every_namespace(tmp_path):
    """The sandbox's private directories live under $TMPDIR and are mount
    sources, opened without following links: a $TMPDIR reached through a
    link must still give the full sandbox, not one without namespaces."""
    real = tmp_path / "real"
    real.mkdir()
    os.chmod(tmp_path, 0o755)
    (tmp_path / "link").symlink_to(real)
    env = {**os.environ, "TMPDIR": str(tmp_path / "link")}
    result = heel("run", "--best-effort", "--", "sh", "-c",
                  "readlink /proc/self/ns/user /proc/self/ns/pid /proc/self/ns/mnt", env=env)
    assert result.returncode == 0, result.stderr
    inside = result.stdout.decode().split()
    host = [os.readlink(f"/proc/self/ns/{ns}") for ns in ("user", "pid", "mnt")]
    assert len(inside) == 3 and all(a != b for a, b in zip(inside, host)), (inside, host)
    assert b"running without" not in result.stderr  # nothing was given up
    assert not os.listdir(real)  # and nothing left behind


@pytest.mark.parametrize("stage, err, missing", [
    ("clone", errno.EPERM, True), ("userns", errno.EINVAL, True), ("mount", errno.ENOSYS, True),
    ("mount", errno.EPERM, True), ("mount", errno.ELOOP, False), ("mount", errno.ENOENT, False),
    ("mount", errno.ENOTDIR, False), ("landlock", errno.EPERM, False), ("exec", errno.ENOENT, False),
])
def test_only_a_refused_namespace_counts_as_missing_namespaces(stage, err, missing):
    """A path that is not what the plan says (ELOOP, ENOENT at the mount
    stage) must fail the run, never make heel fall back to a sandbox without
    namespaces (with --best-effort, silently weaker)."""
    from heel._probe import namespaces_missing

    assert namespaces_missing(heel_errors.SpawnError(stage, err)) is missing


# ---- a terminal as stdio: a pty of heel's own (found in review) ------------------


def _controlling_terminal() -> None:
    """In the child: a session of its own, with its stdin as the controlling
    terminal (as a login shell has), so job control applies."""
    import fcntl
    import termios

    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _on_a_terminal(args: list[str], send: list[tuple[bytes, bytes]] = (), timeout: float = 30,
                   program: list[str] | None = None, hang_up_after: float | None = None):
    """Run `heel run ARGS` (or ``program`` ARGS) with a fresh terminal as its
    stdin, stdout, stderr and controlling terminal, as in an interactive
    shell.  ``send``: (what must have been written, what is then typed),
    in order; ``hang_up_after``: the terminal goes away then.
    Returns (exit status, output, the terminal's mode and settings before,
    and after)."""
    import termios

    master, slave = os.openpty()
    try:
        path = os.ttyname(slave)
        before = (os.stat(path).st_mode, termios.tcgetattr(slave))
        program = program or [sys.executable, "-m", "heel", "run"]
        process = subprocess.Popen([*program, *args], stdin=slave, stdout=slave, stderr=slave,
                                   preexec_fn=_controlling_terminal)
        start = time.monotonic()
        output, pending, deadline = b"", list(send), start + timeout
        next_piece = start
        while process.poll() is None and time.monotonic() < deadline:
            if hang_up_after is not None and time.monotonic() > start + hang_up_after and master >= 0:
                os.close(master)
                os.close(slave)
                master = slave = -1
            if master >= 0 and select.select([master], [], [], 0.1)[0]:
                output += os.read(master, 65536)
            elif master < 0:
                time.sleep(0.05)
            if master >= 0 and pending and pending[0][0] in output and time.monotonic() >= next_piece:
                os.write(master, pending.pop(0)[1])
                next_piece = time.monotonic() + 0.3  # one piece at a time, as typed
        if process.poll() is None:
            process.kill()
        code = process.wait(10)
        after = None
        if master >= 0:
            while select.select([master], [], [], 0.2)[0]:
                try:
                    output += os.read(master, 65536)
                except OSError:
                    break
            after = (os.stat(path).st_mode, termios.tcgetattr(slave))
        return code, output.decode(errors="replace"), before, after
    finally:
        for fd in (master, slave):
            if fd >= 0:
                os.close(fd)


#: The two runners of the CLI: the plain one, and trio's (with a network).
RUNNERS = {"plain": [], "trio": ["--network", "allow"]}


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("level", ["default", "permissive"])
def test_the_users_terminal_cannot_be_changed_from_inside(level, runner):
    """chmod and stty on the terminal the command got reach heel's pty, not
    the user's terminal: whatever the command does, the terminal heel ran
    on has its mode and settings back afterwards.  (At PERMISSIVE, root's
    sandbox owns root's files, so without the pty the chmod would land.)"""
    code, output, before, after = _on_a_terminal([
        "--level", level, *RUNNERS[runner], "--", "sh", "-c",
        "test -t 0 && test -t 1 && echo on-a-tty; chmod 0666 /proc/self/fd/0 && echo chmod-ran; "
        "stty -echo -icanon && echo stty-ran"])
    assert code == 0, output
    assert "on-a-tty" in output and "stty-ran" in output, output
    assert after == before, output  # mode (whatever chmod did inside) and termios


NAMES_ITS_TERMINAL = 'name=$(tty) && test "$name" -ef /proc/self/fd/0 && echo "named:$name"'


@pytest.mark.parametrize("runner", RUNNERS)
def test_the_command_can_name_its_terminal(runner):
    """The pty comes from the sandbox's own devpts, so `tty` (ttyname(3))
    inside finds it under /dev/pts: programs that look their terminal up
    by name (tmux, script, ssh -t) work.  From the host's devpts the name
    would lead nowhere in the sandbox's view ("not a tty")."""
    code, output, before, after = _on_a_terminal([*RUNNERS[runner], "--", "sh", "-c", NAMES_ITS_TERMINAL])
    assert code == 0, output
    assert "named:/dev/pts/" in output, output
    assert after == before


@pytest.mark.parametrize("runner", RUNNERS)
def test_typed_input_and_ctrl_c_reach_the_command(runner):
    """Interactive: what is typed goes to the command through its pty (which
    echoes it), and ^C is a SIGINT for the command, not for heel."""
    code, output, before, after = _on_a_terminal(
        [*RUNNERS[runner], "--", "sh", "-c", "echo ready; read line; echo got:$line; exec sleep 30"],
        send=[(b"ready", b"hello\r"), (b"got:", b"\x03")])
    assert "got:hello" in output, output
    assert code == 130, output  # sleep ended by SIGINT: 128 + 2
    assert after == before  # raw while it ran, restored after


LIBRARY_ON_A_TERMINAL = """
import sys, trio, heel

async def main():
    config = heel.SandboxConfig(level=heel.IsolationLevel.PERMISSIVE)
    async with heel.Sandbox(config) as sb:
        status = await sb.command("sh").args(["-c", sys.argv[1]]).stdin(heel.Stdio.INHERIT).status()
    sys.exit(status.returncode)

trio.run(main)
"""


def test_the_library_gives_inherited_terminals_a_pty_too():
    """Stdio.INHERIT of a terminal, from the library: the command gets a pty
    (plain mode: the host terminal stays as it was, and keeps its ^C)."""
    code, output, before, after = _on_a_terminal(
        ["test -t 0 && test -t 1 && echo on-a-tty; chmod 0666 /proc/self/fd/1; stty -echo; "
         f"{NAMES_ITS_TERMINAL}; echo done"],
        program=[sys.executable, "-c", LIBRARY_ON_A_TERMINAL])
    assert code == 0, output
    assert "on-a-tty" in output and "named:/dev/pts/" in output and "done" in output, output
    assert after == before, output


@pytest.mark.parametrize("level", ["default", "permissive"])
def test_a_command_can_reopen_its_terminal_by_name(level):
    """`echo x > /dev/stderr`, `tee /dev/stdout`: a command reopens its pty
    through /proc/self/fd.  Tried by review: ptys of mode 0 (so that no
    command could open another's by name) broke this for every user.  As
    root at DEFAULT the pty belongs to the host's root, nobody inside, and
    reopening it fails there (README); `>&2` works everywhere."""
    reopen_works = level == "permissive" or os.geteuid() != 0
    code, output, before, after = _on_a_terminal(["--level", level, "--", "sh", "-c",
                                                  "echo dup-works >&2; echo by-name > /dev/stderr && echo reopened"])
    assert code == 0 or not reopen_works, output
    assert "dup-works" in output, output
    assert ("reopened" in output) == reopen_works, output
    assert after == before


PTYS_TAKEN = '''
import sys, trio, heel

HOG = """
import os, time
fds = []
try:
    while True:
        fds.append(os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY))
except OSError as e:
    print(len(fds), e.errno, flush=True)
time.sleep(60)
"""

async def main():
    async with heel.Sandbox() as sb:
        hog = await sb.command("python3").args(["-c", HOG]).stdout(heel.Stdio.PIPE).spawn()
        print("hog", (await hog.stdout.receive_some(100)).decode().strip(), flush=True)
        status = await sb.command("sh").args(["-c", "chmod 0 /dev/pts/ptmx; test -t 0 && echo still-a-tty"]) \\
            .stdin(heel.Stdio.INHERIT).status()
        hog.kill()
    sys.exit(status.returncode)

trio.run(main)
'''


def test_a_sandbox_takes_few_ptys_and_its_commands_keep_a_terminal():
    """The sandbox's devpts holds at most 256 ptys (all sandboxes share one
    pool of the kernel's), and is read-only (no chmod of its ptmx).  When
    its commands hold every pty it may have, a command on a terminal still
    gets one: the host's."""
    code, output, before, after = _on_a_terminal([], program=[sys.executable, "-c", PTYS_TAKEN], timeout=60)
    assert code == 0, output
    taken = re.search(r"hog (\d+) (\d+)", output)
    assert taken and int(taken[2]) == errno.ENOSPC, output
    assert 250 <= int(taken[1]) <= 256, output  # the sandbox's max, not the kernel's pool (thousands)
    assert "Read-only file system" in output and "still-a-tty" in output, output
    assert after == before


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_typed_end_of_file_reaches_a_command_whose_output_is_piped(runner):
    """Plain mode (stdin the terminal, stdout a pipe): ^D typed on the
    host terminal is an end of file for the command as well."""
    heel_run = " ".join([sys.executable, "-m", "heel", "run", *RUNNERS[runner]])
    code, output, before, after = _on_a_terminal(
        ["-c", f"echo ready; {heel_run} -- wc -c | cat"], send=[(b"ready", b"hello\n"), (b"hello", b"\x04")], program=["sh"])
    assert code == 0, output
    assert output.split()[-1] == "6", output  # "hello\n"
    assert after == before


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_background_heel_is_not_stopped_by_its_terminal(runner):
    """`heel run ... &`: heel is not the terminal's foreground job, so it
    neither sets the terminal (SIGTTOU would stop it) nor reads it
    (SIGTTIN); the command's stdin is /dev/null."""
    job = ("import subprocess, sys; "
           f"args = [sys.executable, '-m', 'heel', 'run', *{RUNNERS[runner]!r}, '--', 'sh', '-c', "
           "'sleep 0.5; cat; echo bgdone']; "
           "sys.exit(subprocess.Popen(args, preexec_fn=__import__('os').setpgrp).wait())")
    code, output, before, after = _on_a_terminal(["-c", job], program=[sys.executable],
                                                    send=[(b"", b"typed\n")], timeout=20)
    assert code == 0 and "bgdone" in output, output
    assert after == before


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_terminal_that_stops_reading_stalls_the_command_not_heel(runner):
    """Output to a terminal that is not read (^S, a stalled link) blocks the
    command, not heel: its timeout still ends the command on time.  (heel's
    own last line then waits for the terminal, as any program's would.)"""
    marker = f"heel-stall-{unique_marker()}"
    master, slave = os.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "heel", "run", *RUNNERS[runner], "--timeout", "1", "--", "yes", marker],
            stdin=slave, stdout=slave, stderr=slave, preexec_fn=_controlling_terminal)
        try:
            time.sleep(5)  # the terminal is not read meanwhile
            left = [pid for pid in processes_with(marker) if pid != process.pid]  # heel's own argv has it too
            deadline = time.monotonic() + 30
            while process.poll() is None and time.monotonic() < deadline:
                if select.select([master], [], [], 0.1)[0]:
                    os.read(master, 65536)
        finally:
            if process.poll() is None:
                process.kill()
            code = process.wait(10)
    finally:
        os.close(master)
        os.close(slave)
    assert not left, "the timeout did not end the command while the terminal was stalled"
    assert code == 124


def test_a_command_that_closes_its_stdio_is_not_hung_up():
    """The pty stays open while the command runs (closing it would send its
    session SIGHUP), also under trio's runner."""
    code, output, _, _ = _on_a_terminal(
        ["--network", "allow", "--", "sh", "-c", "exec </dev/null >/dev/null 2>&1; sleep 1; exit 7"])
    assert code == 7, output


def test_two_heels_on_one_terminal_leave_it_as_it_was():
    """The second heel finds the terminal raw (the first one's) and leaves
    it alone: after both, the terminal has its own settings back."""
    heel_run = f"{sys.executable} -m heel run"
    code, output, before, after = _on_a_terminal(
        # (sh gives a job started with & /dev/null as stdin unless told otherwise)
        ["-c", f"{heel_run} -- sleep 1 </dev/tty & sleep 0.3; {heel_run} -- sleep 2; wait"], program=["sh"])
    assert code == 0, output
    assert after == before


def test_a_terminal_that_goes_away_ends_the_command():
    """Without a SIGHUP for heel (here: heel is not in the terminal's
    session), the end of its terminal still ends the command."""
    job = ("import os, signal, subprocess, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
           "p = subprocess.Popen([sys.executable, '-m', 'heel', 'run', '--', 'sleep', '60'], start_new_session=True); "
           "sys.exit(p.wait())")
    code, output, _, _ = _on_a_terminal(["-c", job], program=[sys.executable], hang_up_after=1.5, timeout=30)
    assert code == 128 + 9, output  # killed with its tree


def test_a_home_under_tmp_is_hidden_by_the_private_tmp():
    """A protected place under /tmp (here $HOME) is out of sight behind the
    sandbox's private /tmp: nothing to cover there, and nothing fails."""
    home = tempfile.mkdtemp(dir="/tmp", prefix="heel-home-")
    try:
        with open(os.path.join(home, "secret"), "w") as f:
            f.write("heel-secret-home\n")
        result = heel("run", "--", "sh", "-c", f"cat {home}/secret; echo ran",
                      env={**os.environ, "HOME": home})
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().strip() == "ran", result
    finally:
        shutil.rmtree(home)


def test_a_partial_line_and_one_typed_end_of_file_reach_the_command():
    """Plain mode: "ab" then ^D gives the command "ab" (no newline), and a
    second ^D its end of file, as without heel."""
    heel_run = f"{sys.executable} -m heel run"
    code, output, _, _ = _on_a_terminal(
        ["-c", f"echo ready; {heel_run} -- cat | od -c"],
        send=[(b"ready", b"ab"), (b"ab", b"\x04"), (b"ab", b"\x04")], program=["sh"])
    assert code == 0, output
    assert "a   b" in output, output


def test_a_heel_sent_to_the_background_later_is_not_stopped():
    """Started as the terminal's foreground job, then put in the background
    (as ^Z and `bg` do): heel stops reading the terminal, so typing does not
    stop it (SIGTTIN), and it ends with its command."""
    job = ("import os, signal, subprocess, sys, time\n"
           "signal.signal(signal.SIGTTOU, signal.SIG_IGN)\n"
           "p = subprocess.Popen([sys.executable, '-m', 'heel', 'run', '--', 'sh', '-c', "
           "'sleep 2; echo done-in-background'], preexec_fn=os.setpgrp)\n"
           "os.tcsetpgrp(0, p.pid)\n"  # heel in the foreground...
           "time.sleep(1)\n"
           "os.tcsetpgrp(0, os.getpgrp())\n"  # ...and then not
           "print('now-in-background', flush=True)\n"
           "sys.exit(p.wait())\n")
    code, output, before, after = _on_a_terminal(
        ["-c", job], program=[sys.executable], send=[(b"now-in-background", b"typed\n")], timeout=30)
    assert code == 0 and "done-in-background" in output, output


def _signalled_on_a_terminal(during) -> tuple[int, list, list]:
    """`heel run -- sh -c 'echo ready; sleep 3'` on a fresh terminal that is
    its controlling terminal; once "ready" is there, ``during(process,
    terminal)`` runs.  Returns (exit status, the terminal's settings before,
    and after)."""
    import termios

    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        process = subprocess.Popen([sys.executable, "-m", "heel", "run", "--", "sh", "-c", "echo ready; sleep 3"],
                                   stdin=slave, stdout=slave, stderr=slave, preexec_fn=_controlling_terminal)
        output, deadline = b"", time.monotonic() + 20
        while b"ready" not in output and time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                output += os.read(master, 65536)
        during(process, slave)
        while process.poll() is None and time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                os.read(master, 65536)
        if process.poll() is None:
            process.kill()
        code = process.wait(10)
        return code, before, termios.tcgetattr(slave)
    finally:
        os.close(master)
        os.close(slave)


def test_a_stopped_heel_gives_the_shell_its_terminal_settings_back():
    """kill -TSTP heel (^Z itself goes to the command): while heel is
    stopped the terminal has the shell's settings; raw again after SIGCONT;
    restored at the end."""
    import termios

    seen = {}

    def stop_and_go_on(process, terminal):
        seen["running"] = termios.tcgetattr(terminal)
        process.send_signal(signal.SIGTSTP)
        time.sleep(0.5)
        seen["stopped"] = termios.tcgetattr(terminal)
        process.send_signal(signal.SIGCONT)
        time.sleep(0.5)
        seen["going on"] = termios.tcgetattr(terminal)

    code, before, after = _signalled_on_a_terminal(stop_and_go_on)
    assert not seen["running"][3] & termios.ICANON  # raw while the command runs
    assert seen["stopped"] == before
    assert not seen["going on"][3] & termios.ICANON
    assert code == 0 and after == before


LIBRARY_TWO_READERS = """
import os, signal, trio, heel

async def main():
    async with heel.Sandbox() as sb:
        async def one(seconds):
            await sb.command("sleep").arg(seconds).stdin(heel.Stdio.INHERIT).status()
        async with trio.open_nursery() as nursery:  # the first to start ends first
            nursery.start_soon(one, "0.6")
            await trio.sleep(0.2)
            nursery.start_soon(one, "1.2")
        os.kill(os.getpid(), signal.SIGWINCH)  # a window resize after both
        await trio.sleep(0.3)
    print("both-ended")

trio.run(main)
"""


def test_two_library_commands_may_inherit_a_terminal_at_once():
    code, output, _, _ = _on_a_terminal([], program=[sys.executable, "-c", LIBRARY_TWO_READERS])
    assert code == 0 and "both-ended" in output, output


def test_what_a_command_leaves_reaches_a_slow_terminal_whole():
    """The end of a command's output goes on to the terminal for as long as
    the terminal takes it (here about 2.5 KB/s), not for a fixed while."""
    master, slave = os.openpty()
    try:
        process = subprocess.Popen([sys.executable, "-m", "heel", "run", "--", "seq", "1", "3000"],
                                   stdin=slave, stdout=slave, stderr=slave, preexec_fn=_controlling_terminal)
        output, deadline = b"", time.monotonic() + 60
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                output += os.read(master, 256)
                time.sleep(0.1)
            elif process.poll() is not None:
                break
        if process.poll() is None:
            process.kill()
        code = process.wait(10)
    finally:
        os.close(master)
        os.close(slave)
    lines = output.decode().split()
    assert code == 0 and len(lines) == 3000 and lines[-1] == "3000", (code, len(lines), lines[-3:])


@pytest.mark.parametrize("how", ["SIGUSR1", "SIGSTOP-then-fg"])
def test_the_terminal_is_right_after_other_signals(how):
    """A signal that would end heel (SIGUSR1) still restores the terminal;
    after a SIGSTOP that heel cannot see, the shell takes its settings back
    and `fg` (SIGCONT) makes heel's terminal raw again."""
    import termios

    resumed = []

    def signal_it(process, terminal):
        if how == "SIGUSR1":
            process.send_signal(signal.SIGUSR1)
            return
        shells = termios.tcgetattr(terminal)
        process.send_signal(signal.SIGSTOP)
        time.sleep(0.3)
        termios.tcsetattr(terminal, termios.TCSANOW, shells)  # as the shell puts its settings back
        process.send_signal(signal.SIGCONT)
        time.sleep(0.5)
        resumed.append(termios.tcgetattr(terminal))

    code, before, after = _signalled_on_a_terminal(signal_it)
    if resumed:
        assert not resumed[0][3] & termios.ICANON  # raw again
    assert code == (128 + signal.SIGUSR1 if how == "SIGUSR1" else 0)
    assert after == before


# ---- closed standard streams (found by exploratory testing) ------------------------

REPORT_FDS = ('r=; for fd in 0 1 2; do r="$r $(readlink /proc/$$/fd/$fd)"; done; '
              'echo $r > "$REPORT"; echo out; echo err >&2')

LIBRARY_INHERITS = """
import sys, trio, heel

async def main():
    config = heel.SandboxConfig(workdir=sys.argv[1], env={"REPORT": sys.argv[1] + "/fds"})
    async with heel.Sandbox(config) as sb:
        status = await sb.command("sh").args(["-c", sys.argv[2]]).stdin(heel.Stdio.INHERIT).status()
    sys.exit(status.returncode)

trio.run(main)
"""


def test_library_stdin_that_cannot_be_read_is_an_end_of_file(tmp_path):
    """Stdio.INHERIT of a stdin opened for writing only (`0>file`): the
    command reads end of file, and the sandbox closes as usual; it used to
    end in an ExceptionGroup(OSError) out of `async with Sandbox`.  The
    control: the same file opened for reading is passed whole."""
    data = tmp_path / "input.txt"
    data.write_text("heel-input\n")
    script = 'cat > "$REPORT"; echo "cat=$?" >> "$REPORT"'
    argv = [sys.executable, "-c", LIBRARY_INHERITS, str(tmp_path), script]
    report = tmp_path / "fds"
    for redirect, expected in (("0>>", "cat=0\n"), ("<", "heel-input\ncat=0\n")):
        result = subprocess.run(["sh", "-c", f"{shlex.join(argv)} {redirect}{shlex.quote(str(data))}"],
                                capture_output=True, timeout=60)
        assert result.returncode == 0 and b"Traceback" not in result.stderr, result
        assert report.read_text() == expected, (redirect, result)


@pytest.mark.parametrize("how", ["cli", "cli-trio", "library"])
@pytest.mark.parametrize("closed", ["<&-", ">&-", "2>&-", "<&- >&-", ">&- 2>&-", "<&- >&- 2>&-"])
def test_a_closed_standard_stream_is_dev_null_for_the_command(tmp_path, how, closed):
    """heel started without some of fds 0-2: the command gets /dev/null there,
    never an fd heel opened since (its lock file, its socket to heel-init,
    trio's wakeup socket) that took the free number."""
    report = tmp_path / "fds"
    if how == "library":
        argv = [sys.executable, "-c", LIBRARY_INHERITS, str(tmp_path), REPORT_FDS]
    else:
        argv = [sys.executable, "-m", "heel", "run", "--workdir", str(tmp_path), "--env", f"REPORT={report}",
                *(["--network", "allow"] if how == "cli-trio" else []), "--", "sh", "-c", REPORT_FDS]
    # The closing applies to heel's command line only; the shell reports on its own stdout.
    result = subprocess.run(["sh", "-c", f"{shlex.join(argv)} {closed}; echo status=$?"],
                            input=b"", capture_output=True, timeout=60)  # stdin: a pipe
    assert result.stdout.endswith(b"status=0\n"), result
    seen = report.read_text().split()
    closed_fds = {fd for fd, token in enumerate(("<&-", " >&-", "2>&-")) if token in f" {closed}"}
    assert closed_fds and len(seen) == 3, (closed_fds, seen)
    for fd, target in enumerate(seen):
        if fd in closed_fds:
            assert target == "/dev/null", (fd, seen)
        else:
            assert target != "/dev/null", (fd, seen)  # the control: open streams are passed as they are


@pytest.mark.parametrize("option", ["--readable", "--executable"])
def test_a_read_only_grant_of_tmp_is_refused_not_laid_over_the_private_tmp(option):
    """--readable /tmp would lay a read-only view of the host's /tmp over the
    sandbox's private one (as root, over the workdir too: every command
    failed at chdir).  It is refused, saying what to grant instead; a
    directory under /tmp is the control, and comes into the private /tmp."""
    result = heel("run", option, "/tmp", "--", "true")
    assert "private /tmp" in assert_heel_error(result, 125)
    with tempfile.TemporaryDirectory(dir="/tmp") as shared:
        os.chmod(shared, 0o755)
        with open(os.path.join(shared, "data"), "w") as f:
            f.write("shared data\n")
        os.chmod(os.path.join(shared, "data"), 0o644)
        result = heel("run", "--level", "strict", option, shared, "--", "sh", "-c",
                      f'cat {shared}/data && touch "$TMPDIR/mine" && echo private-tmp-writable')
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"shared data\nprivate-tmp-writable\n"
