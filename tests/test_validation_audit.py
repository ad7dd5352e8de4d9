"""Input validation that a mutation audit (helper r23) found untested: each
test here fails when one check of heel's own (config.py, _cliargs.py,
cli.py, venv.py) is weakened, and passes on the real code.  Real sandboxes and real CLI runs
where the behaviour matters; every test is bounded and cleans up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import heel
from heel import PolicyError, _cliargs
from helpers import assert_heel_error

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sandbox")


def heel_cli(*args: str, cwd: str = "/", timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "heel", *args], capture_output=True, timeout=timeout,
                          cwd=cwd)


def assert_refused(*args: str, cwd: str = "/") -> str:
    """heel refused by itself: 125, one 'heel:' line, no traceback."""
    return assert_heel_error(heel_cli(*args, cwd=cwd), 125)


# ---- SecurityConfig takes bools only --------------------------------------------------


@pytest.mark.parametrize("field", ["protect_user_home", "protect_credentials", "protect_cloud_config",
                                   "allow_gpu", "allow_unix_sockets", "strict_network"])
@pytest.mark.parametrize("value", [0, 1, "no", None])
def test_security_config_takes_only_bools(field, value):
    # 0 would silently turn a protection off, "no" would silently keep it on.
    with pytest.raises(PolicyError, match=field):
        heel.SecurityConfig(**{field: value})


# ---- a grant given through a symbolic link --------------------------------------------


async def test_a_grant_through_a_symbolic_link_is_resolved_and_the_sandbox_opens(host_dir):
    (host_dir / "real").mkdir()
    (host_dir / "real" / "f").write_text("through-the-link\n")
    (host_dir / "link").symlink_to("real")
    config = heel.SandboxConfig(readable=[host_dir / "link"], level=heel.IsolationLevel.STRICT)
    # Resolved when the config is made: not the link's name, which would
    # then fail the open as a link that "appeared since".
    assert config.readable == ((host_dir / "real").resolve(),)
    with trio.fail_after(30):
        async with heel.Sandbox(config) as sandbox:
            out = await sandbox.command("cat").arg(str(host_dir / "real" / "f")).output()
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"through-the-link\n"


# ---- config file values of the wrong type name the key --------------------------------


@pytest.mark.parametrize("key", ["protect_home", "allow_gpu", "best_effort"])
def test_config_file_flag_of_the_wrong_type_names_the_key(tmp_path, key):
    config = tmp_path / "c.toml"
    config.write_text(f'{key} = "no"\n')
    stderr = assert_refused("run", "--config", str(config), "true")
    assert f"config {config}: {key} must be true or false" in stderr


# ---- heel python: a failed start leaves no temporary environment ----------------------


def _orphaned_venv_dirs(before: set[str]) -> list[str]:
    """heel-venv-* directories in /var/tmp made since ``before`` whose owner
    lock is free: left by a heel that has ended (a live one holds its lock)."""
    import fcntl

    orphans = []
    for name in set(os.listdir("/var/tmp")) - before:
        if not name.startswith("heel-venv-"):
            continue
        try:
            lock = os.open(os.path.join("/var/tmp", name, ".owner-lock"), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            orphans.append(os.path.join("/var/tmp", name))
        except OSError:
            pass  # another heel's, alive
        finally:
            os.close(lock)
    return orphans


def test_heel_python_failed_start_removes_its_temporary_environment():
    before = set(os.listdir("/var/tmp"))
    try:
        stderr = assert_refused("python", "--python", "/nonexistent/python3", "-p", "msgpack", "-c", "pass")
        assert "/nonexistent/python3" in stderr
        assert _orphaned_venv_dirs(before) == []
    finally:
        for path in _orphaned_venv_dirs(before):
            shutil.rmtree(path, ignore_errors=True)


# ---- config files: typos and wrong types are refused, never ignored -------------------


@pytest.mark.parametrize("text,words", [
    ("timout = 5\n", ["unknown setting 'timout'"]),  # a typo must not drop the limit
    ("protect_hom = false\n", ["unknown setting 'protect_hom'"]),
    ("timeout = true\n", ["timeout must be a number of seconds", "True"]),  # not 1 second
    ("max_procs = false\n", ["max_procs must be a whole number", "False"]),
    ("readable = 5\n", ["readable must be a list of strings"]),
    ("writable = true\n", ["writable must be a list of strings"]),
    ("env = 5\n", ["env must be a table or a list of KEY=VALUE strings", "5"]),  # was a TypeError
    ("env = [true]\n", ["env: expected KEY=VALUE, got True"]),
])
def test_config_file_typos_and_wrong_types_are_refused(tmp_path, text, words):
    config = tmp_path / "c.toml"
    config.write_text(text)
    stderr = assert_refused("run", "--config", str(config), "true")
    for word in words:
        assert word in stderr


# One value of each TOML type (and an empty and a nested list): every setting takes it
# or refuses it with heel's own error, never a Python one.
TOML_VALUES = ['5', '-1', '1.5', 'inf', 'nan', 'true', '"x"', '""', '[]', '[5]', '[["x"]]', '{}',
               '{a = 1}', '1979-05-27T07:32:00Z', '07:32:00']


@pytest.mark.parametrize("value", TOML_VALUES)
def test_every_setting_takes_any_toml_value_or_refuses_it_cleanly(tmp_path, value):
    config = tmp_path / "c.toml"
    for key in _cliargs._BY_KEY:
        config.write_text(f"{key} = {value}\n")
        try:
            _cliargs._config_from(_cliargs.load_file(str(config)), str(config))
        except heel.HeelError:
            pass
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{key} = {value}: {type(exc).__name__}: {exc}")


def test_cli_env_without_equals_is_refused_not_an_empty_value():
    stderr = assert_refused("run", "--env", "FOO", "true")
    assert "--env: expected KEY=VALUE, got 'FOO'" in stderr


# ---- a symbolic link that appears in a granted path after the config was made ---------


async def test_a_link_swapped_into_a_grant_after_the_config_is_a_policy_error(host_dir):
    (host_dir / "grant").mkdir()
    (host_dir / "elsewhere").mkdir()
    config = heel.SandboxConfig(readable=[host_dir / "grant"])
    (host_dir / "grant").rmdir()
    (host_dir / "grant").symlink_to(host_dir / "elsewhere")
    with trio.fail_after(30):
        with pytest.raises(PolicyError, match="now leads to"):
            async with heel.Sandbox(config):
                pass


# ---- VenvConfig and VenvManager arguments -----------------------------------------------


@pytest.mark.parametrize("kwargs,words", [
    ({"packages": ["--index-url=http://evil.example/simple"]}, "installer option"),
    ({"packages": ["-e ."]}, "installer option"),
    ({"index_url": "file:///etc"}, "http(s) URL"),
    ({"index_url": "ftp://example.com/simple"}, "http(s) URL"),
    ({"index_url": "https://example.com/simple", "no_index": True}, "contradict"),
    ({"packages": ["msgpack\n--index-url=http://evil.example/simple"]}, "not a requirement"),
    ({"packages": ["msgpack\0"]}, "not a requirement"),
])
def test_venv_config_refuses(tmp_path, kwargs, words):
    with pytest.raises(PolicyError, match=words.replace("(", r"\(").replace(")", r"\)")):
        heel.VenvConfig(tmp_path / "env", **kwargs)


@pytest.mark.parametrize("make", [heel.VenvConfig, heel.PythonConfig])
def test_a_venv_path_with_the_path_separator_is_refused(tmp_path, make):
    # Its bin/ goes on the sandbox's PATH, which a ":" would cut in two.
    with pytest.raises(PolicyError, match="separates PATH entries"):
        make(tmp_path / "a:b")


@pytest.mark.parametrize("interpreter", ["../../bin/sh", "/bin/sh", "bin/python"])
def test_python_config_interpreter_is_a_name_in_bin(tmp_path, interpreter):
    with pytest.raises(PolicyError, match="interpreter"):
        heel.PythonConfig(tmp_path / "env", interpreter=interpreter)


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 0, -1, True])
async def test_venv_manager_timeout_must_be_finite_and_positive(tmp_path, timeout):
    with trio.fail_after(10):
        with pytest.raises(PolicyError, match="timeout"):
            await heel.VenvManager.create(heel.VenvConfig(tmp_path / "env"), timeout=timeout)
    assert not (tmp_path / "env").exists()


# ---- paths that are not text: PolicyError, as SandboxConfig gives ----------------------
# (a review found a bare ValueError from os.path.realpath, a TypeError from
# a PathLike that gives bytes, and VenvConfig's python not checked at all)


def test_python_config_path_with_nul_is_a_policy_error():
    with pytest.raises(PolicyError, match="venv must be a directory path"):
        heel.PythonConfig("/var/tmp/env\0x")


class _BytesPath:
    def __fspath__(self):
        return b"/var/tmp/heel-bytes-env"


@pytest.mark.parametrize("make", [heel.VenvConfig, heel.PythonConfig])
def test_bytes_pathlike_venv_path_is_a_policy_error(make):
    with pytest.raises(PolicyError):
        make(_BytesPath())
    with pytest.raises(PolicyError):   # SandboxConfig, the neighbour that always refused it
        heel.SandboxConfig(readable=[_BytesPath()])


@pytest.mark.parametrize("python", ["/usr/bin/python3\0x", _BytesPath(), ""])
def test_venv_config_python_must_be_a_path_or_a_name(tmp_path, python):
    with pytest.raises(PolicyError, match="python must be a path or a program name"):
        heel.VenvConfig(tmp_path / "env", python=python)
    # Control: a name on the PATH and a path are taken as given.
    assert heel.VenvConfig(tmp_path / "env", python="python3").python == "python3"
    assert heel.VenvConfig(tmp_path / "env", python=Path(sys.executable)).python == sys.executable


@pytest.mark.parametrize("option,value", [("--max-procs", "1_000"), ("--timeout", "1_0"),
                                          ("--timeout", "\u0663"), ("--max-procs", "\u0663")])
def test_cli_numbers_are_ascii_digits_without_underscores(option, value):
    # int() and float() take both; sizes (--memory 1_000M) never did.
    stderr = assert_refused("run", option, value, "true")
    assert stderr.startswith(f"heel: {option} must be")
    # Control: the plain spelling of the same number is taken.
    plain = heel_cli("run", option, "1000" if option == "--max-procs" else "10", "true")
    assert plain.returncode == 0, plain.stderr.decode()


# ---- the command builder and run(): wrong types are PolicyErrors, at the call ----------


async def test_builder_and_run_refuse_wrong_types_with_policy_error():
    """Each of these was a TypeError or AttributeError from inside heel (and
    run(env=0) was quietly ignored); the control runs the right types."""
    with trio.fail_after(60):
        async with heel.Sandbox(heel.SandboxConfig()) as sb:
            for value in (5, None, 1.5, object()):
                with pytest.raises(PolicyError, match="args"):
                    sb.command("true").args(value)
                with pytest.raises(PolicyError, match="envs"):
                    sb.command("true").envs(value)
                with pytest.raises(PolicyError, match="current_dir"):
                    sb.command("true").current_dir(value)
                with pytest.raises(PolicyError, match="run"):
                    await sb.run(value)
                with pytest.raises(PolicyError, match="args"):
                    await sb.run_python("pass", args=value)
            for value in (0, ["A=1"], "A=1"):
                with pytest.raises(PolicyError, match="envs"):
                    await sb.run(["true"], env=value)
            with pytest.raises(PolicyError, match="run"):
                await sb.run(b"true")
            with pytest.raises(PolicyError, match="current_dir"):
                sb.command("true").current_dir(b"/tmp")
            # control: the same calls with the types they take
            out = await sb.command("sh").args(iter(["-c", "echo $A; pwd"])).envs({"A": "1"}) \
                .current_dir(Path("/tmp")).stdout(heel.Stdio.PIPE).output()
            assert out.stdout == b"1\n/tmp\n"
            done = await sb.run(("sh", "-c", "echo $A"), env={"A": "2"}, capture_stdout=True)
            assert done.stdout == b"2\n"
            assert (await sb.run_python("import sys; print(sys.argv[1:])", args=("a",))).stdout == b"['a']\n"


def test_ipc_decorator_and_venv_progress_refuse_what_is_not_callable():
    with pytest.raises(PolicyError, match="not an async function"):
        heel.IpcRouter().command()(5)  # was an AttributeError
    with pytest.raises(PolicyError, match="on_venv_progress must be callable"):
        heel.Sandbox(on_venv_progress=5)  # was taken, to fail when a venv was built

    async def echo(text: str) -> str:
        return text
    assert heel.IpcRouter().command()(echo) is echo  # control
    heel.Sandbox(on_venv_progress=print)


@pytest.mark.parametrize("flag", ["--config"] + [s.flag for s in _cliargs.SETTINGS
                                                 if s.kind not in ("flag", "switch")])
def test_every_option_given_a_double_dash_value_is_refused_cleanly(flag):
    """argparse reads --OPTION=-- as an empty list; --config=-- was a
    TypeError traceback."""
    stderr = assert_refused("run", f"{flag}=--", "true")
    assert stderr.startswith(f"heel: {flag}")


@pytest.mark.parametrize("args", [["--venv=--", "-c", "pass"], ["--python=--", "-c", "pass"],
                                  ["--python=", "-c", "pass"], ["-c=--"], ["--index-url=--", "-c", "pass"]])
def test_heel_python_options_without_a_value_are_refused(args):
    """--venv=-- and --python=-- were quietly dropped (the run went on
    without them), -c=-- was a TypeError traceback."""
    stderr = assert_refused("python", *args)
    assert "needs a value" in stderr


def test_heel_python_with_its_options_runs():
    """The control: -c with a value."""
    result = heel_cli("python", "-c", "print(6 * 7)")
    assert (result.returncode, result.stdout) == (0, b"42\n"), result.stderr
