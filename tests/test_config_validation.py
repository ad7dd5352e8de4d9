"""Configurations heel must refuse when they are built, with one clear line:
limits past what the kernel (or time arithmetic) can take, config files that
cannot be read, paths that cannot be granted, and the precedence of the
command line's network options over a --config file's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import heel
from heel import _cliargs
from heel.config import ResourceLimits, SandboxConfig, parse_size

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sandbox")


def heel_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "heel", *args], capture_output=True, timeout=timeout,
                          cwd="/")


def assert_refused(*args: str) -> str:
    """heel refused the command line by itself: 125, one 'heel:' line, no traceback."""
    result = heel_cli(*args)
    stderr = result.stderr.decode()
    assert result.returncode == 125, stderr
    assert stderr.startswith("heel: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    return stderr


def _nr_open() -> int:
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        return 1048576


# ---- limits past their bounds -------------------------------------------------------


@pytest.mark.parametrize("args,words", [
    (["--timeout", "1e300"], ["--timeout", "1000000000"]),
    (["--memory", "1" + "0" * 400], ["--memory", "2**62"]),
    (["--memory", "1" + "0" * 5000], ["--memory", "2**62"]),  # longer than int() reads
    (["--memory", "99999999999T"], ["--memory", "2**62"]),
    (["--max-procs", "99999999999999999999999"], ["--max-procs", "4194304"]),
    (["--cpu-time", "1e30"], ["--cpu-time", "1000000000"]),
    (["--max-file-size", "9999999999999T"], ["--max-file-size", "2**62"]),
])
def test_cli_limits_past_their_bounds_exit_125(args, words):
    stderr = assert_refused("run", *args, "true")
    for word in words:
        assert word in stderr


@pytest.mark.parametrize("limits,words", [
    ({"memory": 2**70}, ["memory", "2**62"]),
    ({"memory": "99999999999T"}, ["memory", "2**62"]),
    ({"file_size": 2**62 + 1}, ["file_size", "2**62"]),
    ({"output_bytes": "1" + "0" * 400}, ["output_bytes", "2**62"]),
    ({"processes": 2**64}, ["processes", "4194304"]),
    ({"processes": 2**22 + 1}, ["processes", "4194304"]),
    ({"cpu_time": 1e30}, ["cpu_time", "1000000000"]),
    ({"timeout": 1e300}, ["timeout", "1000000000"]),
    ({"timeout": 10**9 + 1}, ["timeout", "1000000000"]),
    ({"open_files": 2**40}, ["open_files", str(_nr_open())]),
    ({"open_files": _nr_open() + 1}, ["open_files", str(_nr_open())]),
])
def test_api_limits_past_their_bounds(limits, words):
    with pytest.raises(heel.PolicyError) as info:
        ResourceLimits(**limits)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("limits", [
    {"timeout": 10**400}, {"cpu_time": -10**400}, {"processes": 10**400}, {"open_files": 10**400},
    {"timeout": 10**5000}, {"cpu_time": -10**5000}, {"memory": -10**5000}, {"processes": -(10**5000)},
])
def test_api_limits_of_any_size_are_policy_errors(limits):
    """Ints past a float's range raised OverflowError (math.isfinite), and
    past 4300 digits ValueError (the message's repr) (found by review)."""
    with pytest.raises(heel.PolicyError) as info:
        ResourceLimits(**limits)
    assert "\n" not in str(info.value) and len(str(info.value)) < 200


async def test_command_timeout_of_any_size_is_a_policy_error():
    async with heel.Sandbox() as sb:
        with pytest.raises(heel.PolicyError):
            sb.command("true").timeout(10**400)
        with pytest.raises(heel.PolicyError):
            await sb.run(["true"], timeout=10**400)
        assert (await sb.command("true").timeout(10**3).status()).returncode == 0


class _BytesPath:
    def __fspath__(self):
        return b"/tmp"


@pytest.mark.parametrize("kwargs", [
    {"readable": ["/tmp/" + "a" * 300]},  # a name longer than NAME_MAX
    {"workdir": "/" + "a" * 5000},
    {"readable": [_BytesPath()]},
    {"workdir": _BytesPath()},
    {"env_passthrough": None},
    {"env_passthrough": 5},
])
def test_odd_config_values_are_policy_errors(kwargs):
    """Each raised OSError or TypeError from deep inside (found by review)."""
    with pytest.raises(heel.PolicyError):
        SandboxConfig(**kwargs)


def test_a_path_this_user_cannot_reach_is_a_policy_error(tmp_path):
    """As a user who cannot pass a directory on the way (root cannot be
    refused that way: /proc/1/root is the case that refuses root too)."""
    with pytest.raises(heel.PolicyError):
        SandboxConfig(readable=["/proc/1/root/etc"] if os.geteuid() == 0 else ["/root/.bashrc"])


def test_config_file_numbers_of_any_size_exit_125(tmp_path):
    config = tmp_path / "c.toml"
    for text in (f"timeout = {10**400}\n", f"max_procs = {10**400}\n", f"cpu_time = -{10**400}\n"):
        config.write_text(text)
        assert_refused("run", "--config", str(config), "true")


def test_limits_at_their_bounds_are_taken():
    limits = ResourceLimits(timeout=10**9, cpu_time=10**9, memory=2**62, file_size=2**62,
                            output_bytes=2**62, processes=2**22, open_files=_nr_open())
    assert limits.memory == 2**62 and limits.processes == 2**22
    assert ResourceLimits(open_files=3).open_files == 3  # the documented minimum stays


def test_parse_size_turns_overflow_into_policy_error():
    # 2**62 + 1 too: read exactly, not through a float that rounds it to 2**62
    for text in ("1" + "0" * 400, "1" + "0" * 5000, "99999999999T", str(2**62 + 1), "4194304.5T"):
        with pytest.raises(heel.PolicyError):
            parse_size(text)
    assert parse_size("4096") == 4096
    assert parse_size("1.5G") == 3 << 29
    assert parse_size("0.1k") == 102
    assert parse_size("4T") == 4 << 40
    assert parse_size("4194304T") == parse_size(str(2**62)) == 2**62


def test_sizes_that_are_no_sizes():
    """"1iB" was read as 1 byte ("iB" needs a unit before it), and "0.5"
    (less than a byte) was said to be "not positive"."""
    with pytest.raises(heel.PolicyError, match="cannot read"):
        parse_size("1iB")
    with pytest.raises(heel.PolicyError, match="at least 1 byte"):
        parse_size("0.5")
    assert parse_size("1KiB") == parse_size("1kb") == 1024 and parse_size("1b") == 1  # the controls


def test_cli_numbers_past_ints_digit_limit_name_the_range():
    import subprocess
    import sys

    huge = "9" * 5000  # past int()'s 4300 digits
    result = subprocess.run([sys.executable, "-m", "heel", "run", "--max-procs", huge, "--", "true"],
                            capture_output=True, timeout=60)
    assert result.returncode == 125 and b"must be at most 4194304" in result.stderr, result


def test_cli_level_in_any_case_as_the_api_and_the_config_file_take_it():
    import subprocess
    import sys

    assert heel.SandboxConfig(level="STRICT").level is heel.IsolationLevel.STRICT
    result = subprocess.run([sys.executable, "-m", "heel", "run", "--level", "STRICT", "--", "true"],
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result


def test_config_file_limits_past_their_bounds(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("timeout = 1e300\n")
    stderr = assert_refused("run", "--config", str(config), "true")
    assert "timeout" in stderr and "1000000000" in stderr


# ---- the command line's network options win over the file's -------------------------


def _network_of(tmp_path, toml: str, *args: str):
    config = tmp_path / "c.toml"
    config.write_text(toml)
    namespace = _cliargs.parse("run", ["--config", str(config), *args, "true"])
    return _cliargs.build_config(namespace).network


def test_cli_allow_domain_overrides_file_network(tmp_path):
    policy = _network_of(tmp_path, 'network = "allow"\n', "--allow-domain", "example.com")
    assert isinstance(policy, heel.AllowList)


def test_cli_network_overrides_file_allow_domain(tmp_path):
    assert isinstance(_network_of(tmp_path, 'allow_domain = ["example.com"]\n', "--network", "deny"),
                      heel.DenyAll)
    assert isinstance(_network_of(tmp_path, 'allow_domain = ["example.com"]\n', "--network", "allow"),
                      heel.AllowAll)


def test_cli_allow_domain_replaces_file_allow_domain(tmp_path):
    policy = _network_of(tmp_path, 'allow_domain = ["a.test"]\n', "--allow-domain", "b.test")
    assert isinstance(policy, heel.AllowList)
    assert "b.test" in repr(policy) and "a.test" not in repr(policy)


def test_file_network_stays_without_network_options(tmp_path):
    assert isinstance(_network_of(tmp_path, 'network = "allow"\n'), heel.AllowAll)
    assert isinstance(_network_of(tmp_path, 'network = "allow"\n', "--timeout", "5"), heel.AllowAll)


def test_cli_network_override_runs(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('allow_domain = ["example.com"]\n')
    result = heel_cli("run", "--config", str(config), "--network", "deny", "true")
    assert result.returncode == 0, result.stderr.decode()


def test_contradicting_network_options_on_the_command_line_are_refused(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('network = "allow"\n')
    stderr = assert_refused("run", "--config", str(config), "--network", "deny", "--allow-domain", "a.test",
                            "true")
    assert "contradict" in stderr


# ---- config files that cannot be read ---------------------------------------------------


def test_config_file_not_utf8_is_a_clean_error(tmp_path):
    config = tmp_path / "c.toml"
    config.write_bytes(b"\xff\xfe")
    stderr = assert_refused("run", "--config", str(config), "true")
    assert "not valid TOML" in stderr
    with pytest.raises(heel.PolicyError, match="not valid TOML"):
        _cliargs.load_file(str(config))


# ---- messages name their field once -----------------------------------------------------


def test_cli_env_message_names_the_option_once():
    stderr = assert_refused("run", "--env", "A B=1", "true")
    assert stderr == "heel: --env: 'A B' is not a variable name\n"


def test_config_env_message_names_the_key_once(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("env = {A = 1}\n")
    stderr = assert_refused("run", "--config", str(config), "true")
    assert "env: env:" not in stderr
    assert stderr.startswith(f"heel: config {config}: env: the value of A must be a string")


def test_api_env_messages_are_unchanged():
    with pytest.raises(heel.PolicyError, match=r"^env: 'A B' is not a variable name$"):
        SandboxConfig(env={"A B": "1"})


# ---- empty paths in a config file ------------------------------------------------------


@pytest.mark.parametrize("toml,key", [('workdir = ""\n', "workdir"), ('readable = [""]\n', "readable"),
                                      ('writable = [""]\n', "writable")])
def test_config_file_empty_path_is_refused(tmp_path, toml, key):
    config = tmp_path / "c.toml"
    config.write_text(toml)
    stderr = assert_refused("run", "--config", str(config), "true")
    assert key in stderr


def test_cli_empty_workdir_is_refused():
    assert "workdir" in assert_refused("run", "--workdir", "", "true")


# ---- paths that cannot be granted -------------------------------------------------------


_KERNEL_PATHS = ["/proc", "/proc/self", "/sys", "/sys/kernel", "/dev", "/dev/pts"]


@pytest.mark.parametrize("path", ["/", *_KERNEL_PATHS])
@pytest.mark.parametrize("option", ["--workdir", "--writable"])
def test_cli_unwritable_paths_exit_125(option, path):
    stderr = assert_refused("run", option, path, "true")
    assert option.lstrip("-") in stderr
    if path == "/":
        assert "permissive" in stderr


@pytest.mark.parametrize("path", ["/", *_KERNEL_PATHS])
@pytest.mark.parametrize("field", ["workdir", "writable"])
def test_api_unwritable_paths(field, path):
    value = path if field == "workdir" else [path]
    with pytest.raises(heel.PolicyError) as info:
        SandboxConfig(**{field: value})
    message = str(info.value)
    assert message.startswith(f"{field}: ") and "\n" not in message
    if path == "/":
        assert "PERMISSIVE" in message or "permissive" in message


def test_api_writable_next_to_kernel_paths_is_taken(tmp_path):
    # /devices or /procfoo would not be in /dev or /proc: only whole components count
    config = SandboxConfig(writable=[tmp_path], workdir=tmp_path)
    assert config.workdir == tmp_path.resolve()


# ---- network settings in a config file speak of the file ------------------------------


@pytest.mark.parametrize("text,words", [
    ('network = "allow"\nallow_domain = ["a.test"]\n', ["network = 'allow'", "allow_domain"]),
    ('allow_domain = ["*"]\n', ["allow_domain", "'*'"]),
])
def test_network_errors_in_a_config_file_name_the_file_not_options(tmp_path, text, words):
    """Found by exploratory testing: the file's contradiction was reported as
    `--network allow and --allow-domain`, and a bad pattern without the file."""
    config = tmp_path / "c.toml"
    config.write_text(text)
    stderr = assert_refused("run", "--config", str(config), "--", "true")
    assert f"config {config}:" in stderr and "--" not in stderr.split(":", 2)[2], stderr
    for word in words:
        assert word in stderr, stderr


# ---- ~ never becomes / ----------------------------------------------------------------


def _passwd_home() -> Path:
    import pwd

    home = pwd.getpwuid(os.geteuid()).pw_dir
    if not os.path.isabs(home) or os.path.normpath(home) == "/" or not os.path.isdir(home):
        pytest.skip(f"this user's password-database home is {home!r}")
    return Path(home).resolve()


@pytest.mark.parametrize("home", ["", None, "relative"], ids=["empty", "unset", "relative"])
@pytest.mark.parametrize("field", ["readable", "executable"])
def test_tilde_with_no_usable_home_is_the_password_databases_home(monkeypatch, home, field):
    """Found by review: with HOME="" os.path.expanduser("~") is "/", so a
    STRICT sandbox given readable=["~"] read the whole file system (and
    "~/x" was "/x")."""
    expected = _passwd_home()
    if home is None:
        monkeypatch.delenv("HOME", raising=False)
    else:
        monkeypatch.setenv("HOME", home)
    config = SandboxConfig(level="strict", **{field: ["~"]})
    assert getattr(config, field) == (expected,)
    assert Path("/") not in getattr(config, field)


def test_tilde_slash_with_an_empty_home_is_beneath_the_home_not_the_root(monkeypatch):
    """With HOME="" "~/etc" was "/etc"."""
    home = _passwd_home()
    monkeypatch.setenv("HOME", "")
    assert heel.config.expand_home("~/etc", "readable") == f"{home}/etc"
    if not (home / "etc").exists():
        with pytest.raises(heel.PolicyError, match="does not exist"):
            SandboxConfig(readable=["~/etc"])


@pytest.mark.parametrize("value", ["~", "~/", "~/x"])
def test_a_home_that_is_the_root_is_refused(monkeypatch, value):
    """HOME=/ would grant the whole file system as well: refused, not silent."""
    monkeypatch.setenv("HOME", "/")
    with pytest.raises(heel.PolicyError, match="cannot expand"):
        SandboxConfig(readable=[value])


def test_tilde_of_an_unknown_user_is_refused_clearly():
    with pytest.raises(heel.PolicyError, match="no user"):
        SandboxConfig(readable=["~heel-no-such-user-xyz/a"])


def test_tilde_with_home_set_is_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert SandboxConfig(readable=["~"]).readable == (tmp_path.resolve(),)


def test_config_file_tilde_with_an_empty_home_is_not_the_root(tmp_path, monkeypatch):
    """The TOML path goes through _cliargs._path: the same expansion."""
    monkeypatch.setenv("HOME", "")
    config = tmp_path / "c.toml"
    config.write_text('readable = ["~"]\nexecutable = ["~"]\n')
    values = _cliargs.load_file(str(config))
    assert values["readable"] == (str(_passwd_home()),) or Path(values["readable"][0]).resolve() == _passwd_home()
    monkeypatch.setenv("HOME", "/")
    with pytest.raises(heel.PolicyError, match=f"config {config}: readable: cannot expand"):
        _cliargs.load_file(str(config))


def test_isolation_level_behaves_as_an_enum():
    """IsolationLevel is an Enum: what users (and typer, pydantic) rely on."""
    import enum

    import copy
    import pickle

    L = heel.IsolationLevel
    assert list(L) == [L.STRICT, L.DEFAULT, L.PERMISSIVE] and len(L) == 3
    assert [(m.name, m.value) for m in L] == [("STRICT", "strict"), ("DEFAULT", "default"),
                                              ("PERMISSIVE", "permissive")]
    assert L("default") is L.DEFAULT and L(L.STRICT) is L.STRICT and L["PERMISSIVE"] is L.PERMISSIVE
    assert all(isinstance(m, L) for m in L) and L.STRICT in L and L.STRICT != L.DEFAULT
    assert repr(L.STRICT) == "<IsolationLevel.STRICT: 'strict'>" and str(L.DEFAULT) == "IsolationLevel.DEFAULT"
    for member in L:
        assert pickle.loads(pickle.dumps(member)) is member and copy.deepcopy(member) is member
        assert {member: 1}[L(member.value)] == 1
    with pytest.raises(ValueError):
        L("STRICTER")
    with pytest.raises(KeyError):
        L["strict"]
    with pytest.raises(AttributeError):
        L.STRICT.value = "permissive"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        L.STRICT = L.PERMISSIVE  # type: ignore[misc]
    assert L.STRICT.value == "strict" and L.STRICT.name == "STRICT"
    assert issubclass(L, enum.Enum) and list(L.__members__) == ["STRICT", "DEFAULT", "PERMISSIVE"]
