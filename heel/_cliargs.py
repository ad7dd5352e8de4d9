"""The options of ``heel run`` and ``heel shell``, defined once.

:data:`SETTINGS` is the single list of sandbox options: the argparse parser is
built from it, the keys of a ``--config`` TOML file are checked against it, and
both end in one :class:`~heel.SandboxConfig`.  A TOML key is the long option
without its dashes, ``-`` written ``_`` (``--protect-home`` is
``protect_home``).  Values on the command line override the file's; the
repeatable options (``--readable``, ``--env``, ...) add to the file's lists,
except the network's: ``--network`` or ``--allow-domain`` on the command line
replaces both ``network`` and ``allow_domain`` of the file.

This module imports neither typer nor trio, and argparse only when a
command line needs it (--help, a mistake): ``heel run`` must start fast.
"""

from __future__ import annotations

import math
import os
import stat
import sys
from collections import namedtuple
from types import SimpleNamespace
# Not typing.TYPE_CHECKING: importing typing costs `heel run` ~7 ms; type
# checkers treat this name the same way.
TYPE_CHECKING = False

if TYPE_CHECKING:
    import argparse
    from typing import Any

from .config import (
    IsolationLevel,
    ResourceLimits,
    SandboxConfig,
    SecurityConfig,
    check_env_item,
    check_limit,
    expand_home,
    is_env_name,
    parse_size,
    shown,
)
from .errors import PolicyError

__all__ = ["SETTINGS", "Setting", "UsageError", "parse", "build_config"]

RUN_HELP = "Run COMMAND in a sandbox; its exit status is heel's."
SHELL_HELP = "Start an interactive shell in a sandbox."
PYTHON_HELP = ("Run Python in a sandbox: a SCRIPT, -c CODE, or an interactive interpreter; with "
               "--venv or -p, in a virtual environment built for it.")

NETWORK_CHOICES = ("deny", "allow")

#: Kinds whose values accumulate: the command line adds to the file's.
_LIST_KINDS = ("paths", "names")

#: The keys that together make the network policy.
_NETWORK_KEYS = ("network", "allow_domain")


class UsageError(PolicyError):
    """A command line or config file that heel cannot read."""


class Setting(namedtuple("Setting", "key target kind help metavar", defaults=(None,))):
    """One sandbox option.

    key: the TOML key and the argparse dest; the flag is ``--`` + key with
    dashes.  target: ``section.field`` where the value goes, section being
    ``config`` (SandboxConfig), ``security`` (SecurityConfig) or ``limits``
    (ResourceLimits).  kind: how a value is read (see :func:`_convert`).
    A plain named tuple: it is made at every start of ``heel run``, where
    importing typing or dataclasses would cost more than the command.
    """

    __slots__ = ()

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def add_to(self, group: argparse._ActionsContainer) -> None:
        """Declare this option on an argparse parser (or group).  Every
        default is None, so that "not given" never overrides the file."""
        import argparse

        if self.kind == "level":
            # In any case, as SandboxConfig and the config file take it
            # (the fast parser leaves other cases to this one).
            group.add_argument(self.flag, dest=self.key, choices=[lv.value for lv in IsolationLevel],
                               type=str.lower, default=None, help=self.help)
        elif self.kind == "network":
            group.add_argument(self.flag, dest=self.key, choices=NETWORK_CHOICES, default=None,
                               help=self.help)
        elif self.kind == "flag":
            group.add_argument(self.flag, dest=self.key, action=argparse.BooleanOptionalAction,
                               default=None, help=self.help)
        elif self.kind == "switch":
            group.add_argument(self.flag, dest=self.key, action="store_const", const=True,
                               default=None, help=self.help)
        elif self.kind in (*_LIST_KINDS, "env"):
            group.add_argument(self.flag, dest=self.key, action="append", default=None,
                               metavar=self.metavar, help=self.help)
        else:
            group.add_argument(self.flag, dest=self.key, default=None, metavar=self.metavar,
                               help=self.help)


SETTINGS: tuple[Setting, ...] = (
    Setting("level", "config.level", "level",
            "how much of the file system the sandbox sees (default: default)"),
    Setting("workdir", "config.workdir", "dir",
            "use DIR as the working directory and keep it (default: a fresh one, removed)", "DIR"),
    Setting("readable", "config.readable", "paths", "also allow reading PATH (repeatable)", "PATH"),
    Setting("writable", "config.writable", "paths", "also allow writing PATH (repeatable)", "PATH"),
    Setting("executable", "config.executable", "paths",
            "also allow reading and executing PATH (repeatable)", "PATH"),
    Setting("allow_gpu", "security.allow_gpu", "flag", "give access to GPU devices (default: on)"),
    Setting("protect_home", "security.protect_user_home", "flag",
            "keep the home directory closed (default: on)"),
    Setting("protect_credentials", "security.protect_credentials", "flag",
            "keep keys, tokens and shell histories closed (default: on)"),
    Setting("protect_cloud", "security.protect_cloud_config", "flag",
            "keep cloud configurations (~/.aws, ~/.kube, ...) closed (default: on)"),
    Setting("env", "config.env", "env", "set a variable inside (repeatable)", "KEY=VALUE"),
    Setting("pass_env", "config.env_passthrough", "names",
            "copy the host's variable NAME inside (repeatable)", "NAME"),
    Setting("timeout", "limits.timeout", "seconds",
            "kill the command after SECONDS of wall-clock time; heel then exits 124", "SECONDS"),
    Setting("memory", "limits.memory", "size", "data memory per process (e.g. 512M, 2G)", "SIZE"),
    Setting("max_procs", "limits.processes", "count", "processes and threads the sandbox may have at once (default: 4096, with user namespaces)", "N"),
    Setting("cpu_time", "limits.cpu_time", "seconds", "CPU seconds per process", "SECONDS"),
    Setting("max_file_size", "limits.file_size", "size", "the largest file a process may write", "SIZE"),
    Setting("network", "config.network", "network",
            "deny: no network at all (the default); allow: every host, through heel's proxy"),
    Setting("allow_domain", "config.network", "names",
            "allow only hosts matching PATTERN (exact, *.example.com, an IP or CIDR, with an optional "
            ":PORT), through heel's proxy (repeatable)", "PATTERN"),
    Setting("best_effort", "config.best_effort", "switch",
            "run even where a protection cannot be enforced here (see `heel doctor`)"),
)

_BY_KEY = {s.key: s for s in SETTINGS}


#: The largest --config file heel reads.
MAX_CONFIG_BYTES = 1 << 20

def _parser(**kwargs) -> argparse.ArgumentParser:
    """An argparse parser whose usage errors raise :class:`UsageError` (which
    the CLI reports as one line, exit status 125) instead of printing usage
    and exiting 2, and whose formatter is told the terminal's width:
    otherwise argparse imports shutil for it while options are declared, not
    only for --help.  argparse is imported only here: ``heel run``'s usual
    command lines never need it (see :func:`_parse_plainly`)."""
    import argparse

    class Formatter(argparse.HelpFormatter):
        def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                     width: int | None = None) -> None:
            if width is None:
                try:
                    width = int(os.environ.get("COLUMNS", "")) - 2
                except ValueError:
                    try:
                        width = os.get_terminal_size(2).columns - 2
                    except OSError:
                        width = 78
            super().__init__(prog, indent_increment, max_help_position, max(width, 40))

    class Parser(argparse.ArgumentParser):
        def error(self, message: str):
            raise UsageError(f"{message} (see `{self.prog} --help`)")

    return Parser(formatter_class=Formatter, **kwargs)


def make_parser(command: str) -> argparse.ArgumentParser:
    """The parser of ``heel run`` (command="run") or ``heel shell``."""
    import argparse

    parser = _parser(prog=f"heel {command}", allow_abbrev=False,
                     description={"run": RUN_HELP, "shell": SHELL_HELP, "python": PYTHON_HELP}[command])
    options = parser.add_argument_group("sandbox options")
    for setting in SETTINGS:
        setting.add_to(options)
    parser.add_argument("--config", metavar="FILE",
                        help="read these options from a TOML file (level = \"strict\", "
                             "writable = [\"/x\"], env = {K = \"v\"}, timeout = 5, ...); "
                             "options given here override it")
    if command == "run":
        parser.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND [ARGS]...",
                            help="the program to run and its arguments")
    if command == "python":
        env = parser.add_argument_group("python options")
        env.add_argument("-c", dest="code", metavar="CODE", help="run CODE (as python -c)")
        env.add_argument("--venv", metavar="DIR",
                         help="the virtual environment to use (made when missing, kept); without it, "
                              "-p builds a temporary one")
        env.add_argument("-p", "--package", dest="packages", action="append", default=[], metavar="PKG",
                         help="a package to install in the environment (repeatable)")
        env.add_argument("--python", metavar="EXE",
                         help="the environment's base interpreter (default: the one running heel); without "
                              "an environment, the interpreter to run (default: python3 on the sandbox's PATH)")
        env.add_argument("--system-site-packages", action="store_true",
                         help="let the environment see the base interpreter's packages")
        env.add_argument("--use-uv", action=argparse.BooleanOptionalAction, default=None,
                         help="build with uv (default: when it is installed)")
        env.add_argument("--allow-pip-install", action="store_true",
                         help="make the environment writable inside, so pip install works there")
        env.add_argument("--index-url", metavar="URL", help="the package index (default: PyPI)")
        env.add_argument("--find-links", action="append", default=[], metavar="DIR|URL",
                         help="also look for packages there (repeatable)")
        env.add_argument("--no-index", action="store_true", help="use no index, only --find-links")
        parser.add_argument("script", nargs=argparse.REMAINDER, metavar="[SCRIPT] [ARGS]...",
                            help="the script to run and its arguments (after -c CODE: the arguments)")
    return parser


def parse(command: str, args: list[str]) -> argparse.Namespace:
    """Parse ``heel run``/``heel shell`` arguments (without the subcommand)."""
    namespace = _parse_plainly(command, args)
    if namespace is None:
        namespace = make_parser(command).parse_args(args)
    return finish(command, namespace)


def finish(command: str, namespace: Any) -> Any:
    """What either parser gave, with the command's "--" dropped and checked."""
    if command == "run":
        argv = namespace.command
        if argv[:1] == ["--"]:  # argparse keeps the separator in a REMAINDER
            argv = argv[1:]
        if not argv:
            raise UsageError("run: no command given (usage: heel run [OPTIONS] [--] COMMAND [ARGS]...)")
        namespace.command = argv
    if command == "python":
        for key, flag in (("code", "-c"), ("venv", "--venv"), ("python", "--python"), ("index_url", "--index-url")):
            value = getattr(namespace, key)
            # argparse reads --venv=-- as []; --python '' would quietly be python3
            if value is not None and (not isinstance(value, str) or (key == "python" and not value)):
                raise UsageError(f"{flag} needs a value, got {value!r}")
        rest = namespace.script
        if rest[:1] == ["--"]:
            rest = rest[1:]
        namespace.script = rest
    return namespace


_BY_FLAG = {s.flag: s for s in SETTINGS}
_CHOICES = {"level": tuple(level.value for level in IsolationLevel), "network": NETWORK_CHOICES}


def _parse_plainly(command: str, args: list[str]) -> Any:
    """``heel run`` and ``heel shell`` command lines of the usual shape, read
    without argparse, whose import and parser cost more than the sandboxed
    command (~5 ms at every start).  Long options exactly as argparse takes
    them (``--key value``, ``--key=value``, ``--no-flag``), then the command.
    None for anything else: --help, an unknown or misspelt option, a missing
    value, a value that looks like an option, a choice not in the list.
    argparse then parses the line, so it gives the help and every error
    message, and a test checks that the two read every line alike."""
    if command not in ("run", "shell"):
        return None
    values: dict[str, Any] = {s.key: None for s in SETTINGS}
    values["config"] = None
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--" or not arg.startswith("-"):
            if command != "run":
                return None
            values["command"] = args[index:]  # as argparse's REMAINDER: parse() drops a "--"
            break
        if not arg.startswith("--"):
            return None
        flag, equals, value = arg.partition("=")
        setting = _BY_FLAG.get(flag)
        if setting is None and flag.startswith("--no-") and not equals:
            negated = _BY_FLAG.get("--" + flag[5:])
            if negated is None or negated.kind != "flag":
                return None
            values[negated.key] = False
            index += 1
            continue
        if flag == "--config":
            kind = key = "config"
        elif setting is not None:
            kind, key = setting.kind, setting.key
        else:
            return None
        if kind in ("flag", "switch"):
            if equals:
                return None
            values[key] = True
            index += 1
            continue
        if not equals:
            index += 1
            if index == len(args) or args[index].startswith("-"):
                return None
            value = args[index]
        if value == "--":  # argparse drops it from a value: whatever that makes, it decides
            return None
        if kind in _CHOICES and value not in _CHOICES[kind]:
            return None
        if kind in (*_LIST_KINDS, "env"):
            values[key] = (values[key] or []) + [value]
        else:
            values[key] = value
        index += 1
    if command == "run" and "command" not in values:
        values["command"] = []
    return SimpleNamespace(**values)


def build_config(namespace: argparse.Namespace) -> SandboxConfig:
    """The SandboxConfig that the parsed options (and their --config file) describe."""
    values: dict[str, Any] = {}
    if namespace.config is not None:
        values = load_file(namespace.config)
    network_from = None  # where the network keys come from, for messages: None is the command line
    if any(getattr(namespace, key) is not None for key in _NETWORK_KEYS):
        # One policy from the two keys: added to the file's, --allow-domain
        # would contradict its `network = "allow"` (and --network its
        # allow_domain), where the command line must win.
        for key in _NETWORK_KEYS:
            values.pop(key, None)
    elif namespace.config is not None:
        network_from = f"config {namespace.config}"

    for setting in SETTINGS:
        raw = getattr(namespace, setting.key)
        if raw is None:
            continue
        value = _convert(setting, raw, setting.flag, base=None)
        if setting.kind in _LIST_KINDS:
            value = values.get(setting.key, ()) + value
        elif setting.kind == "env":
            value = {**values.get(setting.key, {}), **value}
        values[setting.key] = value
    return _config_from(values, network_from)


def load_file(path: str) -> dict[str, Any]:
    """The settings of a TOML config file, read and checked; relative paths in
    it are taken from the file's directory."""
    if not isinstance(path, str) or not path or "\0" in path:  # argparse reads --config=-- as []
        raise UsageError(f"--config must be a path, got {path!r}")
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise UsageError("--config needs Python 3.11 or the tomli package") from None
    try:
        # A settings file is small: /dev/zero or a FIFO no one writes must
        # not keep heel reading (or waiting to open it) for ever.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise UsageError(f"config {path}: not a regular file")
            text = file.read(MAX_CONFIG_BYTES + 1)
        if len(text) > MAX_CONFIG_BYTES:
            raise UsageError(f"config {path}: larger than {MAX_CONFIG_BYTES // 1024} KiB, too large for a settings file")
        data = tomllib.loads(text.decode("utf-8"))
    except OSError as exc:
        raise UsageError(f"config {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:  # TOML is UTF-8, or not TOML
        raise UsageError(f"config {path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise _too_deep(path) from None
    unknown = sorted(set(data) - set(_BY_KEY))
    if unknown:
        raise UsageError(f"config {path}: unknown setting {unknown[0]!r} "
                         f"(known: {', '.join(_BY_KEY)})")
    base = os.path.dirname(os.path.abspath(path))
    try:
        return {key: _convert(_BY_KEY[key], value, f"config {path}: {key}", base)
                for key, value in data.items()}
    except RecursionError:  # the repr of a value nested deeper than Python recurses, in its error
        raise _too_deep(path) from None


def _too_deep(path: str) -> UsageError:
    """A config file whose values nest thousands deep (arrays, inline
    tables, dotted keys), within its size limit: tomllib, and the repr of
    such a value in a message, recurse past Python's limit."""
    return UsageError(f"config {path}: its values are nested too deeply for a settings file")


def _config_from(values: dict[str, Any], network_from: str | None = None) -> SandboxConfig:
    """``network_from``: the config file the network keys come from (None:
    the command line), which messages about them name."""
    sections: dict[str, dict[str, Any]] = {"config": {}, "security": {}, "limits": {}}
    values = dict(values)
    network, patterns = values.pop("network", None), values.pop("allow_domain", None)
    if network is not None or patterns is not None:
        try:
            sections["config"]["network"] = _network_policy(network, patterns, network_from)
        except UsageError:
            raise
        except PolicyError as exc:  # a malformed pattern
            raise UsageError(f"{network_from}: allow_domain: {exc}" if network_from else str(exc)) from None
    for key, value in values.items():
        section, field = _BY_KEY[key].target.split(".")
        sections[section][field] = value
    return SandboxConfig(**sections["config"], security=SecurityConfig(**sections["security"]),
                         limits=ResourceLimits(**sections["limits"]))


def _network_policy(network: str | None, patterns: tuple[str, ...] | None, origin: str | None = None):
    """--network and --allow-domain (or a config file's network and
    allow_domain: ``origin`` names it) as one policy."""
    from .policy import AllowAll, AllowList, DenyAll

    if patterns is not None:
        if network is not None and origin is not None:
            raise UsageError(f"{origin}: network = {network!r} and allow_domain contradict each other: "
                             "allow_domain alone allows only the hosts it names")
        if network is not None:
            raise UsageError(f"--network {network} and --allow-domain contradict each other: "
                             "--allow-domain alone allows only the hosts it names")
        return AllowList(patterns)
    return AllowAll() if network == "allow" else DenyAll()


def _convert(setting: Setting, value: Any, label: str, base: str | None) -> Any:
    """One option's value, from the command line (strings, lists of strings)
    or from TOML (typed); ``label`` names it in errors, ``base`` is the
    directory that relative paths start from (None: the current one)."""
    kind = setting.kind
    if kind == "level":
        if not isinstance(value, str):
            raise UsageError(f"{label} must be one of strict, default, permissive; got {value!r}")
        return value
    if kind == "network":
        if value not in NETWORK_CHOICES:
            raise UsageError(f"{label} must be deny or allow; got {value!r}")
        return value
    if kind == "dir":
        return _path(value, label, base)
    if kind == "paths":
        return tuple(_path(item, label, base) for item in _strings(value, label))
    if kind in ("flag", "switch"):
        if not isinstance(value, bool):
            raise UsageError(f"{label} must be true or false, got {value!r}")
        return value
    if kind == "names":
        names = _strings(value, label)
        if setting.target == "config.env_passthrough":
            for name in names:  # here as well as in SandboxConfig, so the message names the option
                if not is_env_name(name):
                    raise UsageError(f"{label}: {name!r} is not a variable name")
        return names
    if kind == "env":
        return _env(value, label)
    if kind in ("seconds", "count"):
        if kind == "seconds":
            number = _number(value, label, float, "a number of seconds")
        else:
            number = _number(value, label, int, "a whole number")
        # here as well as in ResourceLimits, so the message names the option
        check_limit(setting.target.split(".")[1], number, label)
        return number
    if kind == "size":
        return parse_size(value, label)
    raise AssertionError(f"unknown setting kind {kind!r}")


def _strings(value: Any, label: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise UsageError(f"{label} must be a list of strings, got {value!r}")
    return tuple(items)


def _path(value: Any, label: str, base: str | None) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{label} must be a path, got {value!r}")
    if not value:  # joined to a file's directory, "" would quietly be that directory
        raise UsageError(f"{label}: '' is not a valid path")
    if "\0" in value:  # expand_home would read the password database for it
        raise UsageError(f"{label}: {value!r} is not a valid path")
    path = expand_home(value, label)
    return path if base is None else os.path.join(base, path)


def _env(value: Any, label: str) -> dict[str, str]:
    if isinstance(value, dict):  # from TOML: a table
        pairs = list(value.items())
    else:  # KEY=VALUE strings: the command line's, or TOML's list (or one string)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{label} must be a table or a list of KEY=VALUE strings, got {value!r}")
        pairs = []
        for item in value:
            if not isinstance(item, str):  # argparse's reading of --env=--
                raise UsageError(f"{label}: expected KEY=VALUE, got {item!r}")
            key, sep, text = item.partition("=")
            if not sep:
                raise UsageError(f"{label}: expected KEY=VALUE, got {item!r}")
            pairs.append((key, text))
    for key, text in pairs:
        check_env_item(key, text, label)
    return dict(pairs)


def _number(value: Any, label: str, number_type: type, what: str) -> Any:
    """A positive int or float from a string or a TOML number.  A string is
    ASCII without underscores, as sizes are: int() and float() would also
    take '1_000' and other scripts' digits."""
    if isinstance(value, str) and (not value.isascii() or "_" in value):
        raise UsageError(f"{label} must be {what}, got {shown(value)}")
    try:
        # TOML's true is an int to Python, and 2.5 must not become 2 processes
        if isinstance(value, bool) or not isinstance(value, (str, int, number_type)):
            raise ValueError
        number = number_type(value)
    except OverflowError:  # an int past a float's range (TOML takes any)
        raise UsageError(f"{label} must be a finite number, got {shown(value)}") from None
    except ValueError:
        text = value.strip() if isinstance(value, str) else ""
        if not (number_type is int and text.isascii() and text.lstrip("+").isdigit()):
            raise UsageError(f"{label} must be {what}, got {shown(value)}") from None
        # Digits past int()'s limit (4300): far past any limit, which the
        # caller's range check names (with a number of the same size).
        number = 10 ** (len(text.lstrip("+").lstrip("0")) - 1)
    if isinstance(number, float) and not math.isfinite(number):
        raise UsageError(f"{label} must be a finite number, got {shown(value)}")
    if number <= 0:
        raise UsageError(f"{label} must be positive, got {shown(value)}")
    return number
