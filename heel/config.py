"""Sandbox configuration: levels, protections, limits.

Every class here is frozen and validated when it is built: a bad value raises
:class:`~heel.errors.PolicyError` at once, never later inside a spawn.
"""

from __future__ import annotations

import enum
import math
import os
from types import MappingProxyType
from collections.abc import Iterable, Mapping
# Not typing.TYPE_CHECKING: importing typing costs `heel run` ~7 ms; type
# checkers treat this name the same way.
TYPE_CHECKING = False

from .errors import PolicyError
from .policy import DenyAll, NetworkPolicy

__all__ = ["IsolationLevel", "SecurityConfig", "ResourceLimits", "SandboxConfig", "parse_size"]

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from typing import Generic, TypeVar, Union

    from .ipc import IpcRouter
    from .proxy import NetworkEvent
    from .venv import PythonConfig

    PathLike = Union[str, "os.PathLike[str]"]
    P = TypeVar("P", bound=NetworkPolicy)

    class _GenericInPolicy(Generic[P]):
        """Type checkers see SandboxConfig[AllowList] and friends."""
else:
    P = None

    class _GenericInPolicy:
        # SandboxConfig[SomePolicy] works at run time too, without importing
        # typing (which `heel run` would pay for at every start).
        def __class_getitem__(cls, item):
            return cls


class Frozen:
    """An immutable value: its fields are set once in __init__ (through
    _set), compared and hashed by value, and shown in repr.  Plain classes
    rather than dataclasses, because `heel run` builds these at every start
    and importing dataclasses alone costs it more than the command."""

    _fields: tuple[str, ...] = ()

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: make a new one with replace()")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen")

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, Mapping) else v
                          for v in self._values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({fields})"

    def replace(self, **changes):
        """A copy with some fields changed (validated like a new one)."""
        values = {name: getattr(self, name) for name in self._fields}
        unknown = set(changes) - set(values)
        if unknown:
            raise PolicyError(f"{type(self).__name__} has no field {sorted(unknown)[0]!r}")
        values.update(changes)
        return type(self)(**values)


class IsolationLevel(enum.Enum):
    """How much of the file system the sandbox sees.

    STRICT: read, write and execute only in the workdir (and its private tmp);
    read and execute the system runtime (/usr, /lib*, /bin, /sbin, the
    non-secret part of /etc, a few /dev nodes, its own /proc).
    DEFAULT: STRICT plus read-only access to the rest of the file system.
    PERMISSIVE: read and write everywhere.
    At every level the protected places stay closed.
    """

    STRICT = "strict"
    DEFAULT = "default"
    PERMISSIVE = "permissive"


class SecurityConfig(Frozen):
    """Protections that hold at every isolation level.

    protect_user_home, protect_credentials, protect_cloud_config: keep those
    places closed.  allow_gpu: grant the GPU device nodes and driver files.
    allow_unix_sockets: socket(AF_UNIX); off by default, so the sandbox cannot
    connect to host sockets (D-Bus, docker.sock, ssh-agent); socketpair()
    works either way.
    strict_network: refuse to open a sandbox with a network policy where no
    network namespace can hold it, even with ``best_effort``.  Without user
    namespaces only Landlock's TCP port rule stands between the sandbox and
    the network, and it matches ports, not addresses: a direct connection to
    the proxy's port number on another host is possible there.
    """

    _fields = ("protect_user_home", "protect_credentials", "protect_cloud_config", "allow_gpu",
               "allow_unix_sockets", "strict_network")
    protect_user_home: bool
    protect_credentials: bool
    protect_cloud_config: bool
    allow_gpu: bool
    allow_unix_sockets: bool
    strict_network: bool

    def __init__(self, *, protect_user_home: bool = True, protect_credentials: bool = True,
                 protect_cloud_config: bool = True, allow_gpu: bool = True,
                 allow_unix_sockets: bool = False, strict_network: bool = False) -> None:
        for name, value in (("protect_user_home", protect_user_home),
                            ("protect_credentials", protect_credentials),
                            ("protect_cloud_config", protect_cloud_config),
                            ("allow_gpu", allow_gpu), ("allow_unix_sockets", allow_unix_sockets),
                            ("strict_network", strict_network)):
            if not isinstance(value, bool):
                raise PolicyError(f"SecurityConfig.{name} must be a bool, got {value!r}")
            self._set(name, value)


_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

#: The largest limits heel takes.  Past them a spawn would fail late, with no
#: Heel error: rlimits are packed as u64 (and RLIMIT_NPROC gets +2 in _plan),
#: and a timeout goes into select()'s time_t.
MAX_SECONDS = 10**9  # ~31 years: timeout and cpu_time
MAX_SIZE = 2**62  # bytes: memory, file_size, output_bytes
MAX_PROCESSES = 2**22  # the kernel's PID_MAX_LIMIT: no more can exist at once
#: A number with more digits is past every bound (and int() refuses
#: thousands of digits): it is read as MAX_SIZE + 1.
_MAX_DIGITS = 30


def shown(value) -> str:
    """repr(value), cut short: a message stays readable for 5000 digits
    (and an int of more than 4300, which repr() refuses, is one too)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"a {'negative ' if value < 0 else ''}number of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _read_size(text: str) -> int | None:
    """Bytes in ``text``: a decimal number, then optionally spaces, a unit
    (k, m, g, t: powers of 1024) and ``b`` or ``ib``, in either case, as in
    ``512M``, ``1.5 GiB``, ``4096``; None when it is not that.  Written out
    rather than as a regular expression: ``re`` costs ``heel run`` ~3 ms."""
    text = text.strip().lower()
    binary = text.endswith("ib")
    for tail in ("ib", "b"):
        if text.endswith(tail):
            text = text[:-len(tail)]
            break
    unit = text[-1:] if text[-1:] in ("k", "m", "g", "t") else ""
    if binary and not unit:  # "1iB": "iB" belongs after a unit (KiB)
        return None
    number = text[:len(text) - len(unit)].rstrip()
    whole, dot, fraction = number.partition(".")
    if not (whole.isascii() and whole.isdigit()) or (dot and not (fraction.isascii() and fraction.isdigit())):
        return None
    # In integers, not float(): a float is inf past 1e308 (int() of it
    # raises OverflowError) and rounds a number near MAX_SIZE onto it.
    if len(whole.lstrip("0")) > _MAX_DIGITS:
        return MAX_SIZE + 1
    fraction = fraction[:_MAX_DIGITS]  # what it drops is below one byte
    scale = _SIZE_UNITS[unit]
    return int(whole) * scale + int(fraction or "0") * scale // 10 ** len(fraction)


def parse_size(value: int | str, what: str = "size") -> int:
    """A byte count from an int or a string such as ``"512M"`` or ``"2GiB"``,
    at most MAX_SIZE (2**62)."""
    if isinstance(value, bool):
        raise PolicyError(f"{what} must be a number of bytes, got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        read = _read_size(value)
        if read is None:
            raise PolicyError(f"{what}: cannot read {value!r} as a size (examples: 4096, 512M, 2G)")
        number = read
    else:
        raise PolicyError(f"{what} must be an int or a string such as '512M', got {type(value).__name__}")
    if number <= 0:
        raise PolicyError(f"{what} must be at least 1 byte, got {shown(value)}")
    if number > MAX_SIZE:
        raise PolicyError(f"{what} must be at most 2**62 bytes (4 EiB), got {shown(value)}")
    return number


def _positive_number(value, what: str, *, integer: bool = False):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyError(f"{what} must be a number, got {shown(value)}")
    if integer and not isinstance(value, int):
        raise PolicyError(f"{what} must be a whole number, got {shown(value)}")
    # Only a float can be inf or nan; math.isfinite() of an int past 1e308 overflows.
    if isinstance(value, float) and not math.isfinite(value):
        raise PolicyError(f"{what} must be a finite number, got {shown(value)}")
    if value <= 0:
        raise PolicyError(f"{what} must be positive, got {shown(value)}")
    return value


def _nr_open() -> int:
    """The kernel's largest RLIMIT_NOFILE: setrlimit() above it fails with EPERM."""
    try:
        with open("/proc/sys/fs/nr_open", "rb") as file:
            return int(file.read())
    except (OSError, ValueError):
        return 1048576  # the kernel's default


def check_limit(field: str, value, what: str) -> None:
    """Raise PolicyError when ``value`` is past the largest that the
    ResourceLimits ``field`` (a time or a count, not a size) takes; ``what``
    names it in the message."""
    if field == "open_files":
        most, unit = _nr_open(), " (the kernel's fs.nr_open)"
    elif field == "processes":
        most, unit = MAX_PROCESSES, ""
    else:
        most, unit = MAX_SECONDS, " seconds"
    if value > most:
        raise PolicyError(f"{what} must be at most {most}{unit}, got {shown(value)}")


class ResourceLimits(Frozen):
    """Limits for each command.

    timeout: wall-clock seconds, then the whole process tree is killed.
    memory: bytes of data memory per process (RLIMIT_DATA: heap and private
    mappings; not the address space, so GPU runtimes still start).
    cpu_time: CPU seconds per process (RLIMIT_CPU).
    file_size: the largest file a process may write (RLIMIT_FSIZE).
    open_files: open file descriptors per process (RLIMIT_NOFILE).
    processes: processes (and threads) at once (RLIMIT_NPROC, counted inside
    the sandbox's user namespace: across its commands running at the same
    time).  None: 4096, heel's default, where the sandbox has a user
    namespace (without one the kernel would count all of the user's
    processes, and no limit is set unless asked for).
    output_bytes: captured stdout+stderr; past it the command is killed and
    the output marked truncated.
    Sizes accept ints or strings such as ``"512M"``.  Each has a bound, past
    which it is refused: 10**9 seconds, 2**62 bytes, 2**22 processes, the
    kernel's fs.nr_open files.
    """

    _fields = ("timeout", "memory", "cpu_time", "file_size", "open_files", "processes", "output_bytes")
    timeout: float | None
    memory: int | None
    cpu_time: float | None
    file_size: int | None
    open_files: int | None
    processes: int | None
    output_bytes: int | None

    def __init__(self, *, timeout: float | None = None, memory: int | str | None = None,
                 cpu_time: float | None = None, file_size: int | str | None = None,
                 open_files: int | None = None, processes: int | None = None,
                 output_bytes: int | str | None = None) -> None:
        self._set("timeout", _positive_number(timeout, "timeout"))
        self._set("cpu_time", _positive_number(cpu_time, "cpu_time"))
        self._set("open_files", _positive_number(open_files, "open_files", integer=True))
        self._set("processes", _positive_number(processes, "processes", integer=True))
        for name, value in (("memory", memory), ("file_size", file_size), ("output_bytes", output_bytes)):
            self._set(name, None if value is None else parse_size(value, name))
        if self.open_files is not None and self.open_files < 3:
            raise PolicyError("open_files must be at least 3 (stdin, stdout and stderr)")
        for name in ("timeout", "cpu_time", "open_files", "processes"):
            if getattr(self, name) is not None:
                check_limit(name, getattr(self, name), name)


def expand_home(text: str, what: str) -> str:
    """``text`` with a leading ``~`` or ``~user`` replaced by that home.

    Not os.path.expanduser: with HOME set but empty it makes ``~`` into
    ``/`` (and ``~/x`` into ``/x``), so a grant of the home would grant the
    whole file system.  ``~`` is $HOME when that is an absolute path, else
    the password database's home of the effective user; ``~user`` is that
    user's.  A home that is not an absolute path, or is ``/`` itself, is
    refused (PolicyError): the caller can name the place it means."""
    if not text.startswith("~"):
        return text
    end = text.find("/")
    end = len(text) if end < 0 else end
    name, rest = text[1:end], text[end:]
    if name:
        import pwd

        try:
            home = pwd.getpwnam(name).pw_dir
        except (KeyError, ValueError):  # ValueError: a NUL in the name
            raise PolicyError(f"{what}: {text}: there is no user {name!r} whose home ~{name} could be") from None
        where = f"the home of {name}"
    else:
        home = os.environ.get("HOME", "")
        where = "$HOME"
        if not os.path.isabs(home):  # unset, empty or relative: the password database's
            import pwd

            try:
                home = pwd.getpwuid(os.geteuid()).pw_dir
            except KeyError:
                home = ""
            where = f"$HOME is {'empty or unset' if not os.environ.get('HOME') else 'not absolute'}, and " \
                    "the password database's home"
    if not os.path.isabs(home):
        raise PolicyError(f"{what}: cannot expand {text}: {where} is {home!r}, not an absolute path; "
                          "give the path itself")
    home = os.path.normpath(home)
    if home in ("/", "//"):
        raise PolicyError(f"{what}: cannot expand {text}: {where} is /, the whole file system; "
                          "give the path itself")
    return home + rest


def _paths(value: Iterable[PathLike] | PathLike, what: str,
           spelled: list[tuple[str, str]] | None = None) -> tuple[Path, ...]:
    """The paths, absolute and resolved (PolicyError for one that is not
    there).  ``spelled``: gets (as given, resolved) for each path given
    through a symbolic link, made absolute."""
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    out = []
    try:
        items = list(value)
    except TypeError:
        raise PolicyError(f"{what} must be a list of paths, got {value!r}") from None
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise PolicyError(f"{what}: {item!r} is not a path")
        try:
            text = os.fspath(item)
        except TypeError as exc:
            raise PolicyError(f"{what}: {item!r} is not a path ({exc})") from None
        if not isinstance(text, str):
            raise PolicyError(f"{what}: {item!r} is not a path of text (bytes paths are not taken)")
        if not text or "\0" in text:
            raise PolicyError(f"{what}: {text!r} is not a valid path")
        from pathlib import Path  # only when there are paths: it costs `heel run` otherwise

        path = Path(expand_home(text, what))
        if not path.is_absolute():
            path = Path.cwd() / path  # outside the try: a removed cwd is the CLI's to name
        try:
            os.stat(path)
            resolved = path.resolve(strict=True)
            out.append(resolved)
            given = os.path.normpath(path)
            if spelled is not None and given != str(resolved):
                spelled.append((given, str(resolved)))
        except FileNotFoundError:
            raise PolicyError(f"{what}: {text} does not exist") from None
        except OSError as exc:  # a name too long, a directory this user cannot pass, a loop of links
            raise PolicyError(f"{what}: {text}: {exc.strerror or exc}") from None
    return tuple(out)


#: Kernel file systems, and why the sandbox cannot write the host's: a bind
#: mount of them for writing fails ("Invalid argument") at every spawn.
_KERNEL_DIRS = {"proc": "the sandbox has its own /proc", "dev": "the sandbox has its own devpts",
                "sys": "it holds the kernel's settings"}


def _check_writable(paths: tuple[Path, ...], what: str, level: "IsolationLevel") -> None:
    """Refuse a writable place that no mount can give: / or a kernel file system."""
    for path in paths:
        if len(path.parts) == 1:  # resolved and absolute: only / has one part
            if level is IsolationLevel.PERMISSIVE:
                raise PolicyError(f"{what}: / is the whole file system, which the permissive level "
                                  "already writes; give it a directory of its own")
            raise PolicyError(f"{what}: / is the whole file system; to write everywhere use the "
                              "permissive level (--level permissive, IsolationLevel.PERMISSIVE)")
        if path.parts[1] in _KERNEL_DIRS:
            top = path.parts[1]
            raise PolicyError(f"{what}: {path}: the host's /{top} cannot be made writable "
                              f"({_KERNEL_DIRS[top]})")


def is_env_name(name: object) -> bool:
    """A portable variable name: ASCII letters, digits and ``_``, not
    starting with a digit."""
    return (isinstance(name, str) and name.isascii() and name[:1] != "" and not name[0].isdigit()
            and name.replace("_", "a").isalnum())


class SandboxConfig(Frozen, _GenericInPolicy[P]):
    """Everything a :class:`~heel.Sandbox` enforces.  Keyword arguments only.

    level: an :class:`IsolationLevel` (or its name).
    security: the :class:`SecurityConfig` protections.
    readable / writable / executable: extra paths, granted beneath; writable
    ones (and the workdir) neither / nor in /proc, /sys or /dev.
    env: variables set inside; env_passthrough: names copied from the host.
    workdir: None for a fresh private directory removed on close, or a
    directory that is used and kept.
    limits: :class:`ResourceLimits` for each command.
    network: a network policy; :class:`~heel.DenyAll` (no network) by default.
    Anything else gives the sandbox heel's proxy, which asks the policy about
    every connection (see heel.policy).
    on_network_event: called with each :class:`~heel.NetworkEvent` (a
    decision of the proxy, with the bytes moved) as it happens; a plain
    function, which must not block.  ``Sandbox.network_events()`` keeps them too.
    best_effort: run even when a protection cannot be enforced on this
    machine (``heel.probe()`` says which); by default that is an error.
    ipc: an :class:`~heel.IpcRouter` whose commands the sandbox may call.
    python: a :class:`~heel.PythonConfig`: a virtual environment that is the
    sandbox's ``python``, ``python3`` and ``pip``.
    """

    _fields = ("level", "security", "readable", "writable", "executable", "env", "env_passthrough",
               "workdir", "limits", "network", "best_effort", "ipc", "on_network_event", "python")
    level: IsolationLevel
    security: SecurityConfig
    readable: tuple[Path, ...]
    writable: tuple[Path, ...]
    executable: tuple[Path, ...]
    env: Mapping[str, str]
    env_passthrough: tuple[str, ...]
    workdir: Path | None
    limits: ResourceLimits
    network: P
    best_effort: bool
    ipc: IpcRouter | None
    on_network_event: Callable[[NetworkEvent], object] | None
    python: PythonConfig | None

    def __init__(
        self,
        *,
        level: IsolationLevel | str = IsolationLevel.DEFAULT,
        security: SecurityConfig | None = None,
        readable: Iterable[PathLike] = (),
        writable: Iterable[PathLike] = (),
        executable: Iterable[PathLike] = (),
        env: Mapping[str, str] | None = None,
        env_passthrough: Iterable[str] = (),
        workdir: PathLike | None = None,
        limits: ResourceLimits | None = None,
        network: P | None = None,
        best_effort: bool = False,
        ipc=None,
        on_network_event: Callable[[NetworkEvent], object] | None = None,
        python: PythonConfig | None = None,
    ) -> None:
        put = self._set
        if isinstance(level, str):
            try:
                level = IsolationLevel(level.lower())
            except ValueError:
                raise PolicyError(f"unknown isolation level {level!r}: use strict, default or permissive") from None
        if not isinstance(level, IsolationLevel):
            raise PolicyError(f"level must be an IsolationLevel, got {level!r}")
        put("level", level)
        security = SecurityConfig() if security is None else security
        if not isinstance(security, SecurityConfig):
            raise PolicyError(f"security must be a SecurityConfig, got {security!r}")
        put("security", security)
        spelled: list[tuple[str, str]] = []
        put("readable", _paths(readable, "readable", spelled))
        put("writable", _paths(writable, "writable", spelled))
        _check_writable(self.writable, "writable", level)
        put("executable", _paths(executable, "executable", spelled))
        #: (as given, resolved) for the grants given through a symbolic link
        #: (/var/run/docker.sock for /run/docker.sock): at STRICT, the way
        #: the command names them must not be covered (see heel._plan).
        #: Not a field: it does not change what the config grants.
        self._set("_spelled", tuple(spelled))
        put("env", MappingProxyType(_env(env or {})))
        if not isinstance(env_passthrough, (str, Iterable)):
            raise PolicyError(f"env_passthrough must be a list of variable names, got {env_passthrough!r}")
        names = (env_passthrough,) if isinstance(env_passthrough, str) else tuple(env_passthrough)
        for name in names:
            if not is_env_name(name):
                raise PolicyError(f"env_passthrough: {name!r} is not a variable name")
        put("env_passthrough", names)
        if workdir is not None:
            (wd,) = _paths([workdir], "workdir")
            if not wd.is_dir():
                raise PolicyError(f"workdir: {wd} is not a directory")
            _check_writable((wd,), "workdir", level)
            workdir = wd
        put("workdir", workdir)
        limits = ResourceLimits() if limits is None else limits
        if not isinstance(limits, ResourceLimits):
            raise PolicyError(f"limits must be a ResourceLimits, got {limits!r}")
        put("limits", limits)
        policy = DenyAll() if network is None else network
        if not isinstance(policy, NetworkPolicy):
            raise PolicyError(f"network must be a network policy such as heel.DenyAll(), got {policy!r}")
        put("network", policy)
        if on_network_event is not None and not callable(on_network_event):
            raise PolicyError(f"on_network_event must be callable, got {on_network_event!r}")
        if on_network_event is not None and _is_async_function(on_network_event):
            # It is called, not awaited: an async one would never run.
            raise PolicyError("on_network_event must be a plain function: it is called from the proxy, "
                              "not awaited")
        put("on_network_event", on_network_event)
        if python is not None:
            from .venv import PythonConfig  # only for those who use it

            if not isinstance(python, PythonConfig):
                raise PolicyError(f"python must be a heel.PythonConfig, got {python!r}")
        put("python", python)
        if not isinstance(best_effort, bool):
            raise PolicyError(f"best_effort must be a bool, got {best_effort!r}")
        put("best_effort", best_effort)
        if ipc is not None:
            from .ipc import IpcRouter  # trio: only for those who use IPC

            if not isinstance(ipc, IpcRouter):
                raise PolicyError(f"ipc must be a heel.IpcRouter, got {ipc!r}")
        put("ipc", ipc)

    def replace(self, **changes):
        """A copy with some fields changed (validated like a new one); the
        spellings through links of the grants it still has go with it."""
        new = super().replace(**changes)
        granted = {str(p) for p in (*new.readable, *new.writable, *new.executable)}
        kept = [pair for pair in self._spelled if pair[1] in granted and pair not in new._spelled]
        new._set("_spelled", new._spelled + tuple(kept))
        return new


def _env(env: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(env, Mapping):
        raise PolicyError(f"env must be a mapping of names to strings, got {env!r}")
    out = {}
    for key, value in env.items():
        check_env_item(key, value)
        out[key] = value
    return out


def _is_async_function(function) -> bool:
    """An ``async def`` function (or a callable object whose __call__ is one),
    without importing inspect on heel run's path."""
    code = getattr(getattr(function, "__call__", None), "__code__", None) if not hasattr(function, "__code__") \
        else function.__code__
    return code is not None and bool(code.co_flags & 0x80)  # CO_COROUTINE


def check_env_item(key, value, what: str = "env") -> None:
    """Raise PolicyError unless key=value is a valid environment entry;
    ``what`` names the setting in the message."""
    if not is_env_name(key):
        raise PolicyError(f"{what}: {key!r} is not a variable name")
    if not isinstance(value, str) or "\0" in value:
        raise PolicyError(f"{what}: the value of {key} must be a string without NUL bytes")
