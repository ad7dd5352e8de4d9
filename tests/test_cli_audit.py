"""A mutation audit of ``heel run``'s options (r43): each test runs the real
CLI in a subprocess and observes from outside that an option the command
line gives is enforced as asked, no wider: a place left closed, a grant
that gives no more than it names, a limit that holds, a timeout that ends
the command in time and says so, a signal to heel that ends the command's
whole tree.  Each kills mutants of heel/_cliargs.py, heel/cli.py or
heel/_sync.py that survived the other CLI tests (one found a bug: see
test_the_first_of_two_signals_decides_the_exit_status).

Synchronous on purpose (the CLI must not run inside trio).  Host-side
fixtures live under /var/tmp: inside the sandbox /tmp is private.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import make_home_with_secrets, processes_with

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sandbox")


def heel(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "heel", *args], capture_output=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


# ---- the protections and their --no- forms ------------------------------------------------

#: Reads each path given; prints "READ <path>" or "refused <path>".
_READ_EACH = 'for f in "$@"; do if cat "$f" >/dev/null 2>&1; then echo "READ $f"; else echo "refused $f"; fi; done'


@pytest.fixture
def home(host_dir):
    """A home under /var/tmp with a credential (~/.ssh), a cloud config
    (~/.aws) and an ordinary file, each readable by every uid: only heel
    stands between the sandbox and them."""
    path, secrets, _ = make_home_with_secrets(str(host_dir), {".ssh": "id_ed25519", ".aws": "credentials"})
    credential = os.path.join(path, ".ssh", "id_ed25519")
    cloud = os.path.join(path, ".aws", "credentials")
    plain = os.path.join(path, "notes.txt")
    with open(plain, "w") as file:
        file.write("ordinary\n")
    os.chmod(plain, 0o666)
    assert set(secrets) == {credential, cloud}
    return path, {"credential": credential, "cloud": cloud, "plain": plain}


def _readable(home_files: tuple[str, dict[str, str]], *options: str) -> set[str]:
    """Which of the home's files a command in a sandbox with these options reads."""
    path, files = home_files
    result = heel("run", *options, "--", "sh", "-c", _READ_EACH, "sh", *files.values(),
                  env={**os.environ, "HOME": path})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == len(files), result
    by_path = {file: kind for kind, file in files.items()}
    return {by_path[line.split(" ", 1)[1]] for line in lines if line.startswith("READ ")}


@pytest.mark.parametrize("options, opened", [
    ([], set()),
    (["--no-protect-home"], {"plain"}),
    (["--no-protect-home", "--no-protect-cloud"], {"plain", "cloud"}),
    (["--no-protect-home", "--no-protect-credentials"], {"plain", "credential"}),
    (["--no-protect-home", "--no-protect-credentials", "--no-protect-cloud"], {"plain", "credential", "cloud"}),
    # the last of a flag and its --no- form wins, as with any option
    (["--no-protect-home", "--no-protect-cloud", "--protect-cloud"], {"plain"}),
    (["--no-protect-home", "--protect-home"], set()),
])
def test_each_no_protect_option_opens_its_own_place_and_no_other(home, options, opened):
    """--no-protect-cloud opens the cloud configs, never the keys, and
    --no-protect-credentials the reverse: an option wired to the other's
    setting would open a place the command line kept closed."""
    assert _readable(home, *options) == opened


def test_a_protection_on_the_command_line_overrides_the_file(home, host_dir):
    """A config file that opens everything, and a command line that closes
    it again: the command line wins, flag by flag."""
    config = host_dir / "open.toml"
    config.write_text("protect_home = false\nprotect_credentials = false\nprotect_cloud = false\n")
    assert _readable(home, "--config", str(config)) == {"plain", "credential", "cloud"}
    assert _readable(home, "--config", str(config), "--protect-credentials") == {"plain", "cloud"}
    assert _readable(home, "--config", str(config), "--protect-cloud") == {"plain", "credential"}
    assert _readable(home, "--config", str(config), "--protect-home") == set()


# ---- grants: each gives what it names, no more --------------------------------------------


@pytest.fixture
def tool_dir(host_dir):
    """A directory with an executable script in it, open to every uid."""
    tools = host_dir / "tools"
    tools.mkdir()
    tools.chmod(0o777)
    script = tools / "tool.sh"
    script.write_text("#!/bin/sh\necho tool ran\n")
    script.chmod(0o755)
    return tools


def test_readable_grants_reading_not_executing(tool_dir):
    """At STRICT, --readable DIR lets the command read DIR's files and not
    run them; --executable DIR runs them."""
    script = str(tool_dir / "tool.sh")
    read = heel("run", "--level", "strict", "--readable", str(tool_dir), "--", "cat", script)
    assert read.returncode == 0 and b"echo tool ran" in read.stdout, read
    ran = heel("run", "--level", "strict", "--readable", str(tool_dir), "--", script)
    assert b"tool ran" not in ran.stdout
    assert ran.returncode == 126, ran  # found, but not executable there
    ran = heel("run", "--level", "strict", "--executable", str(tool_dir), "--", script)
    assert (ran.returncode, ran.stdout) == (0, b"tool ran\n"), ran


@pytest.mark.parametrize("option", ["--readable", "--executable"])
def test_readable_and_executable_grant_no_writing(tool_dir, option):
    """Nothing written, changed or removed in a place granted for reading or
    executing, looked at from the host; --writable, the control, writes."""
    target = tool_dir / "made.txt"
    script = f"echo made > {target}; echo changed >> {tool_dir / 'tool.sh'}; rm -f {tool_dir / 'tool.sh'}"
    heel("run", "--level", "strict", option, str(tool_dir), "--", "sh", "-c", script)
    assert not target.exists()
    assert (tool_dir / "tool.sh").read_text() == "#!/bin/sh\necho tool ran\n"
    result = heel("run", "--level", "strict", "--writable", str(tool_dir), "--", "sh", "-c", f"echo made > {target}")
    assert result.returncode == 0, result.stderr
    assert target.read_text() == "made\n"


# ---- network -------------------------------------------------------------------------------


def _proxy_inside(*options: str) -> str:
    result = heel("run", *options, "--", "sh", "-c", "echo ${HTTP_PROXY:-none}")
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().strip()


def test_network_deny_given_explicitly_is_no_network(host_dir):
    """`--network deny` is DenyAll, as no option is: no proxy inside (the
    only way out of a sandbox); also over a file's `network = "allow"`."""
    assert _proxy_inside("--network", "allow") != "none"  # the control: a proxy shows
    assert _proxy_inside("--network", "deny") == "none"
    assert _proxy_inside("--network=deny") == "none"
    config = host_dir / "net.toml"
    config.write_text('network = "allow"\n')
    assert _proxy_inside("--config", str(config)) != "none"
    assert _proxy_inside("--config", str(config), "--network", "deny") == "none"
    config.write_text('network = "deny"\n')
    assert _proxy_inside("--config", str(config)) == "none"


# ---- limits ---------------------------------------------------------------------------------

#: Forks children that wait on a pipe until it fails or 40 run, prints how
#: many it started, then lets them all go.
_FORK_UP_TO_40 = """
import os
r, w = os.pipe()
n = 0
for _ in range(40):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    n += 1
print(n, flush=True)
os.close(w)
for _ in range(n):
    os.wait()
"""


def test_max_procs_limits_the_processes():
    free = heel("run", "--timeout", "30", "--", "python3", "-c", _FORK_UP_TO_40)
    assert (free.returncode, free.stdout) == (0, b"40\n"), free  # the control: 40 start
    limited = heel("run", "--timeout", "30", "--max-procs", "8", "--", "python3", "-c", _FORK_UP_TO_40)
    assert limited.returncode == 0, limited.stderr
    assert int(limited.stdout) < 8, limited


def test_cpu_time_kills_a_spinning_command():
    """--cpu-time 1: a busy loop is killed by the kernel (SIGXCPU) long
    before the wall-clock backstop, which would be 124."""
    result = heel("run", "--cpu-time", "1", "--timeout", "40", "--", "python3", "-c", "while True: pass")
    assert result.returncode in (128 + signal.SIGXCPU, 128 + signal.SIGKILL), result


def test_max_file_size_bounds_what_is_written(host_dir):
    """--max-file-size 4K: a 1 MB write stops at 4 KiB, seen on the host."""
    result = heel("run", "--workdir", str(host_dir), "--max-file-size", "4K", "--", "sh", "-c",
                  "head -c 1000000 /dev/zero > big")
    assert result.returncode != 0, result
    assert os.path.getsize(host_dir / "big") <= 4096


# ---- the timeout: in time, and said --------------------------------------------------------


@pytest.mark.parametrize("network", [[], ["--network", "allow"]], ids=["plain", "trio"])
def test_the_timeout_ends_the_command_in_time_and_exits_124(host_dir, network):
    """--timeout 1 ends the command before it writes, 1.5 s later, a file
    the host looks for; heel says so and exits 124 on either runner (a
    network runs the command under trio)."""
    started = time.monotonic()
    result = heel("run", *network, "--workdir", str(host_dir), "--timeout", "1", "--", "sh", "-c",
                  "echo early > early; sleep 2.5; echo late > late")
    assert result.returncode == 124, result
    assert b"timed out after 1 seconds" in result.stderr, result.stderr
    assert (host_dir / "early").exists()  # it did start
    time.sleep(max(0.0, started + 3.5 - time.monotonic()))  # and nothing of it lived on to write it
    assert not (host_dir / "late").exists()


@pytest.mark.parametrize("network", [[], ["--network", "allow"]], ids=["plain", "trio"])
def test_the_timeout_ends_a_command_that_never_stops_writing(host_dir, network):
    """Output that keeps coming does not put the deadline off.  Into files:
    heel relays a file's output itself (a pipe the command gets as it is),
    so heel has something to copy at every turn of its loop."""
    out, err = host_dir / "out", host_dir / "err"
    started = time.monotonic()
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        code = subprocess.run([sys.executable, "-m", "heel", "run", *network, "--timeout", "1", "--", "sh", "-c",
                               "while :; do echo x; echo y >&2; done"],
                              stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, timeout=60).returncode
    assert code == 124, err.read_bytes()[-300:]
    assert time.monotonic() - started < 20
    assert out.read_bytes().startswith(b"x\nx\n")  # it did write, through heel
    assert err.read_bytes().rstrip().endswith(b"timed out after 1 seconds and was killed")


def test_the_timeout_ends_a_command_that_floods_the_terminal():
    """A flood (yes) into heel's terminal: heel has output to copy at every
    turn of its loop, and the deadline still holds.  The test's terminal is
    drained and thrown away, so the flood costs no disk."""
    import threading

    master, slave = os.openpty()
    drained = [0]

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: heel is gone and the terminal with it
                return
            if not data:
                return
            drained[0] += len(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    started = time.monotonic()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "heel", "run", "--timeout", "1", "--", "yes"],
                                stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, start_new_session=True)
        os.close(slave)
        slave = -1
        try:
            code = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            said = proc.stderr.read()
            proc.stderr.close()
    finally:
        if slave >= 0:
            os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    assert code == 124, said
    assert time.monotonic() - started < 20
    assert drained[0] > 65536  # it did flood, through heel


# ---- a repeated option: the last one counts, as argparse reads it ---------------------------


def test_a_repeated_option_takes_its_last_value(host_dir):
    """An alias or wrapper gives `--timeout 600`, the user adds `--timeout
    1`: the last value counts (argparse's reading, which the fast parser
    must share), never the first, which would be the weaker one here."""
    started = time.monotonic()
    result = heel("run", "--timeout", "30", "--timeout", "1", "--", "sleep", "20")
    assert result.returncode == 124, result
    assert time.monotonic() - started < 15
    result = heel("run", "--timeout=30", "--timeout=1", "--", "sleep", "20")
    assert result.returncode == 124, result
    target = host_dir / "visible.txt"
    target.write_text("readable\n")
    target.chmod(0o644)
    assert heel("run", "--level", "permissive", "--", "cat", str(target)).returncode == 0  # the control
    result = heel("run", "--level", "permissive", "--level", "strict", "--", "cat", str(target))
    assert result.returncode != 0 and b"readable" not in result.stdout, result
    result = heel("run", "--memory", "4G", "--memory=256M", "--", "sh", "-c", "ulimit -d")
    assert result.stdout.strip() == str(256 * 1024).encode(), result


@pytest.mark.parametrize("args", [
    ["--timeout", "30", "--timeout", "1"], ["--timeout=30", "--timeout", "1"], ["--level", "permissive", "--level=strict"],
    ["--workdir", "/a", "--workdir", "/b"], ["--network", "allow", "--network", "deny"],
    ["--max-procs", "100", "--max-procs=3"], ["--config", "/a.toml", "--config=/b.toml"],
])
def test_the_fast_parser_takes_the_last_of_a_repeated_option_as_argparse_does(args):
    from heel import _cliargs

    plain = _cliargs._parse_plainly("run", [*args, "--", "true"])
    assert plain is not None
    assert vars(plain) == vars(_cliargs.make_parser("run").parse_args([*args, "--", "true"]))


# ---- --best-effort: only when asked, and never silent ---------------------------------------

#: heel's CLI (main) on a machine taken to have no user namespaces: the
#: probe says so, as conftest's no_namespaces fixture makes it for the library.
_WITHOUT_NAMESPACES = """
import sys
from heel import _probe
weak = _probe.assumed_environment()._replace(namespaces=False)
_probe.assumed_environment = lambda: weak
_probe.environment = lambda: (weak, "turned off for this test")
from heel.cli import console
sys.argv[0] = "heel"
console()
"""


@pytest.mark.parametrize("network", [[], ["--network", "allow"]], ids=["plain", "trio"])
def test_a_protection_this_machine_lacks_is_refused_unless_best_effort_and_then_said(host_dir, network):
    """Without user namespaces, the default sandbox cannot be had: heel
    refuses (125) and the command does not run; with --best-effort it runs
    and heel says what it runs without."""
    def run(*options):
        return subprocess.run([sys.executable, "-c", _WITHOUT_NAMESPACES, "run", *network, *options,
                               "--workdir", str(host_dir), "--", "sh", "-c", "echo ran > ran.txt"],
                              capture_output=True, timeout=60, stdin=subprocess.DEVNULL)

    refused = run()
    assert refused.returncode == 125, refused
    assert b"cannot be enforced" in refused.stderr, refused.stderr
    assert not (host_dir / "ran.txt").exists()
    ran = run("--best-effort")
    assert ran.returncode == 0, ran.stderr
    assert (host_dir / "ran.txt").read_text() == "ran\n"
    said = [line for line in ran.stderr.decode().splitlines() if line.startswith("heel: running without")]
    assert len(said) == 1 and "--best-effort" in said[0], ran.stderr


# ---- a signal that would end heel ends the command's whole tree first ------------------------


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    proc.stdout.close()
    proc.stderr.close()


def _left_after(marker: str) -> list[int]:
    """The processes still carrying marker after up to 2 s; killed, and
    returned for the test to report."""
    deadline = time.monotonic() + 2
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = processes_with(marker)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


_ENDING = [signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM]


@pytest.mark.parametrize("network", [[], ["--network", "allow"]], ids=["plain", "trio"])
@pytest.mark.parametrize("signum, namespaces", [(s, False) for s in _ENDING] + [(signal.SIGHUP, True)],
                         ids=[f"{signal.Signals(s).name}, no namespaces" for s in _ENDING] + ["SIGHUP, namespaces"])
def test_a_signal_that_ends_heel_kills_the_tree_and_leaves_nothing(var_tmpdir, signum, network, namespaces):
    """SIGHUP (a closed terminal), SIGQUIT, SIGUSR1/2, SIGALRM: heel unwinds,
    kills every process of the command, removes its temporary directory and
    exits 128+N.  Without a pid namespace (--best-effort on a machine
    without user namespaces) nothing but heel's unwinding kills the
    command's background children: a signal left to its default action
    would end heel and leave them running (or its temporary directory,
    with the command's files, when heel-init ends them)."""
    marker = f"{41000 + os.getpid() % 1000}.{signum}{len(network)}{int(namespaces)}"
    heel_argv = ["-m", "heel"] if namespaces else ["-c", _WITHOUT_NAMESPACES]
    command = f"sleep {marker} & sleep {marker} & echo ready; wait"
    proc = subprocess.Popen([sys.executable, *heel_argv, "run", *network, "--best-effort", "--", "sh", "-c", command],
                            env={**os.environ, "TMPDIR": var_tmpdir}, cwd="/", stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"
        signalled = time.monotonic()
        proc.send_signal(signum)
        code = proc.wait(timeout=20)
        # at once: the tree is killed, not waited for (heel's runner gives
        # a tree it did not kill 5 s before it moves on)
        prompt = time.monotonic() - signalled < 4
        said = proc.stderr.read().decode()
    finally:
        _end(proc)
    left = _left_after(marker)
    assert (code, left, os.listdir(var_tmpdir), prompt) == (128 + signum, [], [], True), said


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "no namespaces"])
@pytest.mark.parametrize("network", [[], ["--network", "allow"]], ids=["plain", "trio"])
def test_the_first_of_two_signals_decides_the_exit_status(var_tmpdir, network, namespaces):
    """SIGINT, then at once SIGTERM (a supervisor that escalates): heel
    exits 130, as the first one says, with the tree killed and nothing left.
    (Python runs pending handlers lowest number first, so SIGINT goes first
    even when both wait.)  Found by this audit: under trio (a network) the
    SIGTERM ended heel by its default action in the middle of the cleanup,
    which left the sandbox's temporary directory behind."""
    marker = f"{43000 + os.getpid() % 1000}.{len(network)}{int(namespaces)}"
    heel_argv = ["-m", "heel"] if namespaces else ["-c", _WITHOUT_NAMESPACES]
    proc = subprocess.Popen([sys.executable, *heel_argv, "run", *network, "--best-effort", "--", "sh", "-c",
                             f"sleep {marker} & echo ready; wait"],
                            env={**os.environ, "TMPDIR": var_tmpdir}, cwd="/", stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
        said = proc.stderr.read().decode()
    finally:
        _end(proc)
    left = _left_after(marker)
    assert (code, left, os.listdir(var_tmpdir)) == (128 + signal.SIGINT, [], []), said


# ---- --allow-gpu / --no-allow-gpu ----------------------------------------------------------


def test_no_allow_gpu_closes_the_gpu_nodes(gpu_node, host_dir):
    """On by default; --no-allow-gpu closes the node (the open is refused),
    as does a file's allow_gpu = false, which --allow-gpu overrides."""
    write = ["--", "sh", "-c", f"echo x > {gpu_node} && echo opened"]
    assert heel("run", *write).stdout == b"opened\n"  # the control
    assert heel("run", "--allow-gpu", *write).stdout == b"opened\n"
    closed = heel("run", "--no-allow-gpu", *write)
    assert closed.returncode != 0 and b"opened" not in closed.stdout, closed
    config = host_dir / "gpu.toml"
    config.write_text("allow_gpu = false\n")
    assert heel("run", "--config", str(config), *write).stdout == b""
    assert heel("run", "--config", str(config), "--allow-gpu", *write).stdout == b"opened\n"
    assert heel("run", "--allow-gpu", "--no-allow-gpu", *write).stdout == b""


# ---- each option's value reaches the setting it names ---------------------------------------


@pytest.mark.parametrize("parser", ["plain", "argparse"])
def test_each_flag_reaches_its_own_setting_and_no_other(parser):
    """In process, for both parsers: every --flag and --no-flag sets the
    field it names to what it says, and leaves every other field at its
    default.  (What each field then does is observed from outside above.)"""
    from heel import _cliargs
    from heel.config import SecurityConfig

    fields = {"allow_gpu": "allow_gpu", "protect_home": "protect_user_home",
              "protect_credentials": "protect_credentials", "protect_cloud": "protect_cloud_config"}
    assert set(fields) == {s.key for s in _cliargs.SETTINGS if s.kind == "flag"}
    default = SecurityConfig()
    for key, field in fields.items():
        for value in (True, False):
            flag = ("--" if value else "--no-") + key.replace("_", "-")
            args = [flag, "--", "true"]
            namespace = _cliargs._parse_plainly("run", args) if parser == "plain" else \
                _cliargs.make_parser("run").parse_args(args)
            security = _cliargs.build_config(_cliargs.finish("run", namespace)).security
            for name in SecurityConfig._fields:  # allow_unix_sockets and strict_network too
                assert getattr(security, name) == (value if name == field else getattr(default, name)), (flag, name)


# ---- a config file's empty path grants nothing ----------------------------------------------


@pytest.mark.parametrize("key", ["writable", "readable", "executable", "workdir"])
def test_an_empty_path_in_a_config_file_is_refused_not_its_directory(host_dir, key):
    """Relative paths in a file start from its directory: "" joined to it
    would be that directory itself, granted whole.  Refused (125), and
    nothing written there; on the command line "" is refused as well."""
    config = host_dir / "c.toml"
    config.write_text(f'{key} = {"" if key == "workdir" else [""]!r}\n'.replace("'", '"'))
    target = host_dir / "written.txt"
    result = heel("run", "--config", str(config), "--", "sh", "-c", f"echo x > {target}")
    assert result.returncode == 125, result
    assert b"'' is not a valid path" in result.stderr, result.stderr
    assert not target.exists()
    result = heel("run", f"--{key}", "", "--", "sh", "-c", f"echo x > {target}")
    assert result.returncode == 125, result
    assert not target.exists()
