"""Python virtual environments for sandboxes.

:class:`VenvManager` builds an environment on the host; :class:`PythonConfig`
puts one in a sandbox (``SandboxConfig(python=...)``), where it is the
``python``, ``python3`` and ``pip`` on the PATH.

Packages are untrusted code: installing an sdist runs its build scripts, and
a wheel can drop a ``.pth`` file that runs at every interpreter start.  So:

- the host runs nothing in an environment, and writes nothing there: a
  sandbox with ``allow_pip_install`` (or a writable grant of it) may change
  its files at any time, even while it is being made.  The host makes the
  empty directory (and the build lock beside it) without following a link,
  and asks the base Python where its pip wheel is;
- making the environment (``uv venv``, or the base's ``venv`` module without
  pip, then pip from the wheel the base ships) and the installer (pip, or
  ``uv pip``) run inside a STRICT heel sandbox that may write the
  environment and see its base Python, uv and the find_links directories,
  and that reaches only the package index, through heel's proxy: code
  planted in the environment by another sandbox (a .pth file) runs there
  with no more than that sandbox had;
- the host reads an environment's files without following links, without
  blocking and with a size limit (pyvenv.cfg), and knows what is installed
  from the ``*.dist-info`` names alone.

What the tools leave (processes, temporary files) is the sandbox's, and
goes when it closes, or when heel dies.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import errno
import os
import re
import shutil
import stat
import subprocess
import sys
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from .config import Frozen, expand_home
from ._spawn import make_path_nofollow, open_dir_nofollow, remove_tree
from .errors import BrokenVenv, InstallError, InterpreterNotFound, PolicyError, SpawnError

if TYPE_CHECKING:
    from .proxy import Resolver

__all__ = ["VenvConfig", "VenvManager", "Venv", "VenvProgress", "PythonConfig"]

#: The hosts pip reaches for the default index (PyPI).
PYPI_HOSTS = ("pypi.org:443", "files.pythonhosted.org:443")
#: How long one install may take, by default.
INSTALL_TIMEOUT = 900.0
# What the host keeps of the installer's output: code planted in the
# environment (a .pth file) runs in the installer and may write without end,
# in lines without end, for as long as the install may take.  The last
# _KEPT_LINES lines, each cut to _MAX_LINE characters (the rest of a longer
# one is dropped), and at most _MAX_OUTPUT bytes of a step that makes the
# environment (which says next to nothing: past it, the step is killed).
_KEPT_LINES = 200
_MAX_LINE = 4096
_MAX_OUTPUT = 1 << 20

# A requirement's project name, optional extras, and an exact pin if there is one.
_REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(?:\[[^\]]*\])?\s*"
    r"(?:==\s*(?P<pin>[A-Za-z0-9.+!_-]+)\s*)?(?P<rest>.*)$")


def canonical_name(name: str) -> str:
    """A project name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


class VenvConfig(Frozen):
    """What environment to build, and where.

    path: the environment's directory (made when missing; kept).
    packages: requirement strings (``"msgpack"``, ``"attrs==23.2.0"``).
    python: the base interpreter (a path, or a name on the PATH); None: the
    one running heel.
    system_site_packages: let the environment see the base's packages.
    use_uv: build with uv (True), venv + pip (False), or uv when it is
    installed (None).  Either way pip is in the environment.
    index_url: the package index (None: PyPI); no_index: use none, only
    find_links (directories or URLs of wheels and sdists).
    """

    _fields = ("path", "packages", "python", "system_site_packages", "use_uv", "index_url",
               "find_links", "no_index")
    path: Path
    packages: tuple[str, ...]
    python: str | None
    system_site_packages: bool
    use_uv: bool | None
    index_url: str | None
    find_links: tuple[str, ...]
    no_index: bool

    def __init__(self, path: str | os.PathLike[str], packages: Iterable[str] = (), *,
                 python: str | os.PathLike[str] | None = None, system_site_packages: bool = False,
                 use_uv: bool | None = None, index_url: str | None = None,
                 find_links: Iterable[str | os.PathLike[str]] = (), no_index: bool = False) -> None:
        path_text = _path_text(path)
        if path_text is None:
            raise PolicyError(f"VenvConfig: path must be a directory path, got {path!r}")
        # Resolved once, now: inspect() refuses the path if a link appears
        # in it later.
        self._set("path", _check_venv_path(Path(os.path.realpath(expand_home(path_text, "VenvConfig"))),
                                           "VenvConfig"))
        items = tuple(_one_or_many(packages, "packages must be requirement strings"))
        for item in items:
            _check_requirement(item)
        self._set("packages", items)
        python_text = None if python is None else _path_text(python)
        if python is not None and python_text is None:
            raise PolicyError(f"VenvConfig: python must be a path or a program name, got {python!r}")
        self._set("python", python_text)
        for name, value in (("system_site_packages", system_site_packages), ("no_index", no_index)):
            if not isinstance(value, bool):
                raise PolicyError(f"VenvConfig: {name} must be a bool, got {value!r}")
            self._set(name, value)
        if use_uv is not None and not isinstance(use_uv, bool):
            raise PolicyError(f"VenvConfig: use_uv must be True, False or None, got {use_uv!r}")
        self._set("use_uv", use_uv)
        if index_url is not None:
            _check_url(index_url, "index_url")
        self._set("index_url", index_url)
        links = []
        for link in _one_or_many(find_links, "find_links must be directories or URLs"):
            text = _path_text(link)
            if text is None:
                raise PolicyError(f"VenvConfig: find_links: {link!r} is not a directory or a URL")
            if text.startswith(("http://", "https://")):
                _check_url(text, "find_links")
                links.append(text)
            else:
                if not os.path.exists(text):
                    raise PolicyError(f"VenvConfig: find_links: {text} does not exist")
                links.append(os.path.abspath(text))
        self._set("find_links", tuple(links))
        if no_index and index_url is not None:
            raise PolicyError("VenvConfig: no_index and index_url contradict each other")


def _one_or_many(value, what: str) -> list:
    """``value`` as a list: one string or path alone, or any iterable;
    PolicyError("VenvConfig: ``what``") for anything else."""
    if isinstance(value, (str, os.PathLike)):
        return [value]
    try:
        return list(value)
    except TypeError:
        raise PolicyError(f"VenvConfig: {what}, got {value!r}") from None


def _path_text(value: object) -> str | None:
    """The text of a str or os.PathLike path; None where it is not one, is
    empty, holds a NUL or is bytes (a PathLike may give bytes)."""
    if not isinstance(value, (str, os.PathLike)):
        return None
    text = os.fspath(value)
    if not isinstance(text, str) or not text or "\0" in text:
        return None
    return text


def _check_venv_path(path: Path, what: str) -> Path:
    """PolicyError for an environment path that cannot be a PATH entry: its
    bin/ is put on the sandbox's PATH, which a ":" would cut in two (so
    ``python`` and ``pip`` would not be the environment's).  ``path`` is
    the resolved one: a link in the given path may lead to such a name."""
    if os.pathsep in os.fspath(path):
        raise PolicyError(f"{what}: the environment path {path} contains {os.pathsep!r}, which separates "
                          "PATH entries: its bin/ could not be put on the PATH; choose a path without it")
    return path


def _check_requirement(item: object) -> None:
    if not isinstance(item, str) or not item.strip() or "\0" in item or "\n" in item:
        raise PolicyError(f"VenvConfig: {item!r} is not a requirement")
    # An option in disguise (`--index-url=...`, `-e .`) would change what the
    # installer does, not what it installs.
    if item.lstrip().startswith("-"):
        raise PolicyError(f"VenvConfig: {item!r} looks like an installer option, not a requirement")


def _check_url(url: object, what: str) -> None:
    if not isinstance(url, str):
        raise PolicyError(f"VenvConfig: {what} must be a URL string, got {url!r}")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (a port that is no number, or out of range, raises)
    except ValueError as exc:
        raise PolicyError(f"VenvConfig: {what} {url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PolicyError(f"VenvConfig: {what} must be an http(s) URL, got {url!r}")


class VenvProgress(NamedTuple):
    """A step of building an environment: ``phase`` is "create", "install"
    or "done"; ``done``/``total`` count the packages to install; ``message``
    is the installer's line."""

    phase: str
    message: str
    done: int = 0
    total: int = 0


class Venv(NamedTuple):
    """A built environment: its directory, interpreter and Python version."""

    path: Path
    python: Path
    version: tuple[int, int]
    packages: tuple[str, ...]


class VenvManager:
    """Builds environments on the host; see the module docstring for who runs what."""

    @classmethod
    async def create(cls, config: VenvConfig, *, on_progress: Callable[[VenvProgress], object] | None = None,
                     resolver: Resolver | None = None, timeout: float = INSTALL_TIMEOUT) -> Venv:
        """Build (or reuse and extend) the environment ``config`` describes.

        An existing environment is reused and only missing packages are
        installed; one that is broken (no interpreter, another Python, not a
        venv at all) raises :class:`BrokenVenv` and is left alone, as does a
        path the host cannot examine or make.  Builds of one path take turns
        (:func:`_build_lock`): a later one waits up to ``timeout`` seconds.
        ``resolver``: the proxy's name resolution for the installer (tests).
        """
        import trio

        if not isinstance(config, VenvConfig):
            raise PolicyError(f"VenvManager.create needs a VenvConfig, got {config!r}")
        if (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
                or timeout != timeout or timeout == float("inf")):
            raise PolicyError(f"VenvManager.create: timeout must be a number of seconds above 0, got {timeout!r}")
        if on_progress is not None and not callable(on_progress):
            raise PolicyError(f"VenvManager.create: on_progress must be callable, got {on_progress!r}")

        def report(phase: str, message: str, done: int = 0, total: int = 0) -> None:
            if on_progress is not None:
                on_progress(VenvProgress(phase, message, done, total))

        path = config.path
        base = find_interpreter(config.python)
        _check_not_protected(base, path)
        version = await trio.to_thread.run_sync(interpreter_version, base)
        uv = _uv(config.use_uv)
        # One build of a path at a time (two sandboxes opening with one
        # VenvConfig, two heel processes): a second builder waits here, then
        # finds the environment made and its packages installed, instead of
        # tearing down a half-built one it took for its own.
        async with _build_lock(path, timeout):
            try:
                existed = path.exists()
                fresh = not existed or _is_empty_dir(path)
            except OSError as exc:
                raise _unusable(path, exc) from None
            if not fresh:
                inspect(path, version)
            else:
                report("create", f"creating {path} with Python {version[0]}.{version[1]}")
                try:
                    await _make_venv(path, base, uv, config.system_site_packages, timeout)
                    inspect(path, version)
                except BaseException:
                    # Half an environment would read as a broken one next time.
                    remove_tree(os.fspath(path))
                    if existed:
                        with contextlib.suppress(OSError):
                            make_path_nofollow(os.fspath(path))  # the empty directory it was given
                    raise
            # Off trio's thread: it lists directories a sandbox may fill.
            installed = await trio.to_thread.run_sync(installed_distributions, path)
            missing = [req for req in config.packages if not _satisfied(req, installed)]
            if missing:
                await _install(config, path, base, uv, missing, report, resolver, timeout)
                installed = await trio.to_thread.run_sync(installed_distributions, path)
                still = [req for req in missing if not _satisfied(req, installed)]
                if still:
                    raise InstallError(f"the installer finished but {', '.join(still)} is not installed in {path}")
        report("done", f"{path} is ready", len(missing), len(missing))
        return Venv(path, path / "bin" / "python", version, tuple(sorted(installed)))


def _unusable(path: Path, exc: OSError) -> BrokenVenv:
    """BrokenVenv for a path the host cannot even examine or make (a name
    too long, a directory above it that this user may not search)."""
    return BrokenVenv(f"{path} cannot be used for an environment: {exc.strerror or exc}"
                      + (f" ({exc.filename})" if exc.filename and os.fspath(exc.filename) != os.fspath(path)
                         else ""))


#: The lock file of a build of ``<path>``: ``<path>.heel-lock``, beside it.
LOCK_SUFFIX = ".heel-lock"
# Seconds between tries of a held lock: doubling from the first to the last.
_LOCK_POLL = (0.02, 0.25)


@contextlib.asynccontextmanager
async def _build_lock(path: Path, wait: float):
    """Hold the exclusive build lock of ``path`` (flock on
    ``<path>.heel-lock`` in its parent directory, made there if missing)
    for the body, waiting at most ``wait`` seconds for another builder
    (InstallError after that).

    The lock is tried without blocking, between trio sleeps: the event loop
    never blocks, and a cancelled wait leaves no thread behind that could
    take the lock later.  The file is opened without following a link and
    must be a regular file (BrokenVenv otherwise); it is removed by the
    holder, still holding it, when done, so a waiter that then gets the lock
    of the removed file checks that its file is still the one at the path,
    and starts again if not.  A heel killed while holding it leaves the
    file (and no lock: the kernel drops it); the next build reuses and
    removes it.  Where the parent directory cannot be written (a shared
    environment this user only reads) there is nothing to build and no lock
    is taken.  Any process that can read the file can hold the lock, hence
    the bounded wait."""
    lock = path.parent / (path.name + LOCK_SUFFIX)
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as exc:
        raise _unusable(path, exc) from None
    # The parent is reached (and made) without following a link: a sandbox
    # that may write a directory above the environment (its workdir, say)
    # could have swapped one in since the config was made.
    try:
        parent = open_dir_nofollow(os.fspath(path.parent), create=True)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BrokenVenv(f"{path} now leads through a symbolic link, which heel does not follow") from None
        raise _unusable(path, exc) from None
    try:
        async with _locked(lock, path, parent, wait):
            yield
    finally:
        os.close(parent)


@contextlib.asynccontextmanager
async def _locked(lock: Path, path: Path, parent: int, wait: float):
    """_build_lock's lock, its file in the directory open as ``parent``."""
    import fcntl

    import trio

    deadline = trio.current_time() + wait
    while True:
        fd = _open_lock(lock, path, parent)
        if fd is None:
            yield
            return
        try:
            delay = _LOCK_POLL[0]
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                except OSError as exc:
                    if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                        # A file system without locks: build as before.
                        os.close(fd)
                        fd = -1
                        break
                    raise _unusable(lock, exc) from None
                if trio.current_time() >= deadline:
                    raise InstallError(f"another build of {path} has held {lock} for more than {wait:g} "
                                       "seconds; if no build is running, a process that holds the file open "
                                       "holds the lock")
                await trio.sleep(delay)
                delay = min(delay * 2, _LOCK_POLL[1])
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        if fd < 0:
            yield
            return
        if _same_file(fd, lock.name, parent):
            break
        os.close(fd)  # removed, or replaced, by the builder before: the lock of another file
    try:
        yield
    finally:
        try:
            if _same_file(fd, lock.name, parent):
                with contextlib.suppress(OSError):
                    os.unlink(lock.name, dir_fd=parent)
        finally:
            os.close(fd)  # and with it the lock


def _open_lock(lock: Path, path: Path, parent: int) -> int | None:
    """The lock file's descriptor (made when missing, never through a
    link), or None where this user may not make it."""
    try:
        fd = os.open(lock.name, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600,
                     dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return None
        if exc.errno == errno.ELOOP:
            raise BrokenVenv(f"{lock}, the build lock of {path}, is a symbolic link, which heel does not "
                             "follow: remove it") from None
        raise _unusable(path, exc) from None
    try:
        kind = os.fstat(fd).st_mode
    except OSError:
        kind = 0
    if not stat.S_ISREG(kind):
        os.close(fd)
        raise BrokenVenv(f"{lock}, the build lock of {path}, is not a regular file: remove it")
    return fd


def _same_file(fd: int, name: str, parent: int) -> bool:
    """Whether ``name`` in ``parent`` (not followed) is still the file open as ``fd``."""
    try:
        here, there = os.fstat(fd), os.stat(name, dir_fd=parent, follow_symlinks=False)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def find_interpreter(python: str | None) -> Path:
    """The base interpreter as an absolute path, or InterpreterNotFound."""
    if python is None:
        # The interpreter behind the one running heel (not a venv's link to it).
        candidate = getattr(sys, "_base_executable", None) or sys.executable
    elif os.sep in python:
        candidate = python
    else:
        candidate = shutil.which(python) or ""
        if not candidate:
            raise InterpreterNotFound(f"no {python!r} on the PATH")
    if not candidate or not os.path.isfile(candidate) or not os.access(candidate, os.X_OK):
        raise InterpreterNotFound(f"{candidate or python}: no such Python interpreter")
    return Path(os.path.abspath(candidate))


def base_prefix(base: Path) -> str:
    """The installation prefix of an interpreter (/usr for /usr/bin/python3)."""
    return os.path.dirname(os.path.dirname(os.path.realpath(base)))


def _check_not_protected(base: Path, path: Path) -> None:
    """PolicyError, before anything is built, when the environment or its
    base Python lies in a place heel's sandboxes keep closed (a pyenv
    Python in the home directory, say): no sandbox could run it."""
    from ._plan import _under, protected_paths
    from .config import SandboxConfig

    denied = protected_paths(SandboxConfig())
    for what, place in (("the base Python", base_prefix(base)), ("the environment", os.fspath(path))):
        for d in denied:
            if _under(place, d):
                raise PolicyError(f"{what} ({place}) is inside the protected place {d}, which sandboxes keep "
                                  "closed: use a Python and a directory outside it "
                                  "(VenvConfig(..., python='/usr/bin/python3'))")


def interpreter_version(base: Path) -> tuple[int, int]:
    """The (major, minor) of the host's own base interpreter."""
    try:
        out = subprocess.run([os.fspath(base), "-I", "-c", "import sys; print(*sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30, cwd="/", env=_host_tool_env())
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InterpreterNotFound(f"{base} does not run: {exc}") from None
    fields = out.stdout.split()
    if out.returncode != 0 or len(fields) != 2 or not all(f.isdigit() for f in fields):
        raise InterpreterNotFound(f"{base} is not a working Python interpreter: "
                                  f"{(out.stderr or out.stdout).strip()[-300:]}")
    return int(fields[0]), int(fields[1])


def _uv(use_uv: bool | None) -> str | None:
    """uv's real path, when it is to be used.  It runs inside the
    installer's sandbox, which keeps the home directory closed: a uv in
    ~/.local/bin or ~/.cargo/bin cannot run there."""
    if use_uv is False:
        return None
    found = shutil.which("uv")
    if not found:
        if use_uv:
            raise InstallError("use_uv=True but uv is not installed (pip install uv, or use_uv=None)")
        return None
    found = os.path.realpath(found)
    from ._plan import _under, home_directories

    home = next((h for h in home_directories() if _under(found, h)), None)
    if home is not None:
        if use_uv:
            raise InstallError(f"uv ({found}) lives in {home}, which the installer's sandbox keeps closed: "
                               "install uv outside the home directory, or use_uv=None to use pip")
        return None
    return found


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


#: pyvenv.cfg is a few lines; more is not one.
_MAX_CFG = 65536


def read_pyvenv_cfg(path: Path) -> dict[str, str]:
    """pyvenv.cfg's settings.  A sandbox with allow_pip_install may have
    replaced the file, so it is opened without following a link and without
    blocking, and must be a small regular file (not /dev/zero, not a FIFO):
    BrokenVenv otherwise."""
    fd = os.open(path / "pyvenv.cfg", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_CFG:
            raise BrokenVenv(f"{path}/pyvenv.cfg is not a small regular file")
        data = os.read(fd, _MAX_CFG + 1)
    finally:
        os.close(fd)
    values = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip().lower()] = value.strip()
    return values


def inspect(path: Path, want: tuple[int, int] | None = None) -> dict[str, str]:
    """Check, without running anything in it, that ``path`` is a usable
    environment (of Python ``want``); returns its pyvenv.cfg.  BrokenVenv
    otherwise."""
    try:
        kind = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        kind = 0
    except OSError as exc:
        # Not even examinable: a name too long, a directory above it that
        # this user may not search.
        raise _unusable(path, exc) from None
    if not stat.S_ISDIR(kind):
        raise BrokenVenv(f"{path} is not a directory")
    if os.path.realpath(path) != os.fspath(path):
        # A parent was swapped for a link since the path was resolved: the
        # grants would land on whatever it points at.
        raise BrokenVenv(f"{path} now leads through a symbolic link (to {os.path.realpath(path)})")
    try:
        cfg = read_pyvenv_cfg(path)
    except FileNotFoundError:
        raise BrokenVenv(f"{path} is not a virtual environment (no pyvenv.cfg); heel leaves it alone") from None
    except OSError as exc:
        raise BrokenVenv(f"{path}/pyvenv.cfg cannot be read: {exc.strerror}") from None
    python = path / "bin" / "python"
    try:
        kind = os.lstat(python).st_mode
    except OSError:
        kind = 0
    if not (stat.S_ISLNK(kind) or stat.S_ISREG(kind)) or not os.path.exists(python):
        # A link (to the base) or a copy; a dangling link is no interpreter.
        raise BrokenVenv(f"{path} has no interpreter ({python} is missing or points nowhere); "
                         "remove the directory to rebuild it")
    found = _cfg_version(cfg)
    if want is not None and found is not None and found != want:
        raise BrokenVenv(f"{path} was made with Python {found[0]}.{found[1]}, not {want[0]}.{want[1]}; "
                         "remove it or ask for that Python")
    return cfg


def _cfg_version(cfg: dict[str, str]) -> tuple[int, int] | None:
    text = cfg.get("version_info") or cfg.get("version") or ""
    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


#: The most names heel reads in one directory of an environment (lib,
#: site-packages): a sandbox that may write it could make millions, which
#: the host would list, and hold, each time the environment is opened.
#: Real environments have a few thousand at most.
MAX_LISTED = 100_000


def _listed(directory: Path, keep) -> list:
    """``keep(entry)`` of each entry of ``directory`` that it does not map
    to None; BrokenVenv past MAX_LISTED entries, kept or not."""
    kept = []
    with os.scandir(directory) as entries:
        for count, entry in enumerate(entries, 1):
            if count > MAX_LISTED:
                raise BrokenVenv(f"{directory} holds more than {MAX_LISTED:,} names, which no environment "
                                 "heel made does: remove the environment and let heel make it again")
            value = keep(entry)
            if value is not None:
                kept.append(value)
    return kept


def site_packages(path: Path) -> list[Path]:
    """The environment's lib/python*/site-packages, each step a directory
    of its own, not a link: a sandbox that may write the environment could
    point one at a host directory, whose names heel would then read."""
    def directories(parent: Path, match) -> list[Path]:
        try:
            return _listed(parent, lambda e: Path(e.path) if match(e.name) and e.is_dir(follow_symlinks=False)
                           else None)
        except OSError:
            return []

    if os.path.islink(path / "lib"):
        return []
    found = [site for version in directories(path / "lib", lambda name: name.startswith("python"))
             for site in directories(version, lambda name: name == "site-packages")]
    return sorted(found)


def installed_distributions(path: Path) -> dict[str, str]:
    """Canonical project name -> version, from the *.dist-info directory
    names (``name-version.dist-info``): reading names runs nothing."""
    found: dict[str, str] = {}
    for directory in site_packages(path):
        try:
            names = _listed(directory, lambda e: e.name if e.name.endswith(".dist-info") else None)
        except OSError:
            continue
        for entry in names:
            stem = entry[: -len(".dist-info")]
            name, sep, version = stem.partition("-")
            if sep:
                found[canonical_name(name)] = version
    return found


def _satisfied(requirement: str, installed: dict[str, str]) -> bool:
    """Whether ``requirement`` is surely met.  Only a bare name or an exact
    pin can be judged from names; anything else goes to the installer,
    which knows better (and does nothing when it is met)."""
    m = _REQUIREMENT.match(requirement)
    if m is None or m.group("rest").strip():
        return False
    version = installed.get(canonical_name(m.group("name")))
    if version is None:
        return False
    return m.group("pin") is None or m.group("pin") == version


#: pip run from its wheel, installing itself: what ensurepip does.
#: ``python -I -c _PIP_FROM_WHEEL WHEEL pip-arguments...``
_PIP_FROM_WHEEL = ("import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
                   "runpy.run_module('pip', run_name='__main__', alter_sys=True)")


async def _make_venv(path: Path, base: Path, uv: str | None, system_site_packages: bool, timeout: float) -> None:
    """Make the environment, with pip in it so that ``pip`` is on the
    sandbox's PATH, inside a STRICT sandbox that may write it and nothing
    else (the installer's, see _installer_sandbox).

    Not on the host: a sandbox that may write ``path`` (allow_pip_install,
    a writable grant) may plant files in it while it is being built, and
    the new interpreter would run them (venv's ensurepip runs it, and so
    does ``uv pip install --python``), as would any tool that writes there
    follow a link planted in it.  The host only makes the empty directory,
    without following a link.

    The pip wheel is the one the base Python ships (ensurepip's, or
    Debian's /usr/share/python-wheels).  With uv: ``uv venv``, then uv
    installs that wheel, offline: a fraction of a second (``uv venv --seed``
    would fetch pip from the network).  Otherwise, or when that fails: the
    base's venv module without pip, then pip run from the wheel installs
    itself (seconds)."""
    import trio

    from .sandbox import Sandbox, Stdio

    wheel = await trio.to_thread.run_sync(_bundled_pip_wheel, base)
    if wheel is None:
        raise InstallError(f"{base} ships no pip wheel (it has no ensurepip, and there is none in "
                           "/usr/share/python-wheels), so heel cannot put pip in an environment made from it; "
                           "install that Python's venv support (Debian and Ubuntu: python3-venv)")
    try:
        make_path_nofollow(os.fspath(path))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BrokenVenv(f"{path} now leads through a symbolic link, which heel does not follow") from None
        raise _unusable(path, exc) from None
    python = os.fspath(path / "bin" / "python")
    site = ["--system-site-packages"] if system_site_packages else []
    ways = []
    if uv:
        ways.append([[uv, "venv", "--quiet", "--no-config", *site, "--python", os.fspath(base), os.fspath(path)],
                     [uv, "pip", "install", "--quiet", "--no-config", "--offline", "--no-index", "--python", python,
                      os.fspath(wheel)]])
    ways.append([[os.fspath(base), "-I", "-m", "venv", "--without-pip", *site, os.fspath(path)],
                 [python, "-I", "-c", _PIP_FROM_WHEEL, os.fspath(wheel), "install", "--quiet", "--no-cache-dir",
                  "--no-index", "--disable-pip-version-check", os.fspath(wheel)]])
    # Emptied, inside too, before the standard way is tried after uv's.
    empty = [os.fspath(base), "-I", "-S", "-c",
             "import os, shutil, sys\n"
             "for e in os.scandir(sys.argv[1]):\n"
             "    shutil.rmtree(e.path) if e.is_dir(follow_symlinks=False) else os.unlink(e.path)",
             os.fspath(path)]
    failure = ""
    async with Sandbox(_installer_sandbox(path, base, uv, [os.fspath(wheel)], None, timeout)) as sb:
        for index, steps in enumerate(ways):
            if index:
                await sb.command(empty[0]).args(empty[1:]).stdin(Stdio.NULL).timeout(timeout).output()
            for argv in steps:
                try:
                    out = await (sb.command(argv[0]).args(argv[1:]).stdin(Stdio.NULL).timeout(timeout)
                                 .output())
                except SpawnError as exc:
                    failure = f"{argv[0]} could not start: {exc}"
                    break
                if out.returncode != 0:
                    failure = (out.stderr or out.stdout).decode(errors="replace").strip()[-2000:]
                    if out.timed_out:
                        failure = f"{argv[0]} did not finish within {timeout:g} seconds"
                    break
            else:
                return
    raise InstallError(f"creating {path} failed: {failure}", failure)


def _installer_sandbox(path: Path, base: Path, uv: str | None, readable: list[str], network, timeout: float):
    """The STRICT sandbox that makes an environment and installs in it: it
    may write the environment and run its base Python and uv, reads
    ``readable`` and reaches what ``network`` allows (None: nothing)."""
    from .config import IsolationLevel, ResourceLimits, SandboxConfig

    # STRICT: the installer runs the environment's own interpreter, which an
    # earlier sandbox with allow_pip_install may have changed (a .pth file),
    # so it sees no more than such a sandbox did: the environment, its base
    # Python, uv and the find_links directories, and the index hosts.
    executable = [base_prefix(base)] + ([uv] if uv else [])
    config = SandboxConfig(
        level=IsolationLevel.STRICT, writable=[path], readable=readable, executable=executable,
        **({"network": network} if network is not None else {}),
        limits=ResourceLimits(timeout=timeout, output_bytes=_MAX_OUTPUT),
        env={"PIP_NO_CACHE_DIR": "1", "PYTHONDONTWRITEBYTECODE": "1", "UV_NO_CACHE": "1",
             "UV_PYTHON_DOWNLOADS": "never"})
    # The grant is resolved again here, following links: one swapped in
    # above the environment since (by a sandbox that may write there) would
    # give the installer another directory to write, another project's
    # environment say.  From here on the plan holds the path to what it
    # resolves to now, and a later link fails the sandbox's start.
    if config.writable != (path,):
        raise BrokenVenv(f"{path} now leads through a symbolic link (to {config.writable[0]}), which heel "
                         "does not follow")
    return config


def _bundled_pip_wheel(base: Path) -> Path | None:
    """The pip wheel the base Python ships, if it can be found without
    running anything but the base interpreter."""
    try:
        out = subprocess.run([os.fspath(base), "-I", "-c",
                              "import ensurepip, os; print(os.path.dirname(ensurepip.__file__))"],
                             capture_output=True, text=True, timeout=30, cwd="/", env=_host_tool_env())
    except (OSError, subprocess.TimeoutExpired):
        out = None
    places = []
    if out is not None and out.returncode == 0 and out.stdout.strip():
        places.append(Path(out.stdout.strip()) / "_bundled")
    places.append(Path("/usr/share/python-wheels"))  # Debian and Ubuntu keep them here
    for place in places:
        wheels = sorted(place.glob("pip-*-py3-none-any.whl")) if place.is_dir() else []
        if wheels:
            return wheels[-1]
    return None


def _host_tool_env() -> dict[str, str]:
    """The environment of the base interpreter when heel asks it where its
    pip wheel is: without the variables that steer Python, pip or uv (a
    sandbox may have written the files they point at)."""
    return {name: value for name, value in os.environ.items()
            if not name.startswith(("UV_", "PIP_", "PYTHON", "VIRTUAL_ENV", "CONDA"))}


def installer_policy(config: VenvConfig):
    """The network the installer needs: the index and the find_links hosts."""
    from .policy import AllowList, DenyAll

    hosts: list[str] = []
    if not config.no_index:
        if config.index_url is None:
            hosts += PYPI_HOSTS
        else:
            hosts.append(_host_pattern(config.index_url))
    hosts += [_host_pattern(link) for link in config.find_links if link.startswith(("http://", "https://"))]
    return AllowList(hosts) if hosts else DenyAll()


def _host_pattern(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{host}:{port}"


def _installer_argv(config: VenvConfig, path: Path, uv: str | None, requirements: list[str]) -> list[str]:
    python = os.fspath(path / "bin" / "python")
    if uv:
        argv = [uv, "pip", "install", "--no-config", "--python", python]
    else:
        argv = [python, "-m", "pip", "install", "--progress-bar", "off", "--disable-pip-version-check",
                "--no-input"]
    if config.no_index:
        argv.append("--no-index")
    elif config.index_url is not None:
        argv += ["--index-url", config.index_url]
    for link in config.find_links:
        argv += ["--find-links", link]
    # An http:// index named in the config is trusted by that naming; pip
    # would otherwise ignore it.
    plain = [u for u in (config.index_url, *config.find_links) if u and u.startswith("http://")]
    # (_check_url saw to it that each has a host)
    hosts = {host for host in (urllib.parse.urlsplit(u).hostname for u in plain) if host}
    for host in sorted(hosts):
        argv += ["--allow-insecure-host" if uv else "--trusted-host", host]
    return argv + ["--", *requirements] if not uv else argv + requirements


async def _install(config: VenvConfig, path: Path, base: Path, uv: str | None, requirements: list[str],
                   report: Callable[..., None], resolver, timeout: float) -> None:
    """Run the installer inside a sandbox that may write the environment and
    reach the index, and nothing else of the host."""
    import trio

    from .sandbox import Sandbox, Stdio

    readable = [link for link in config.find_links if not link.startswith(("http://", "https://"))]
    sandbox_config = _installer_sandbox(path, base, uv, readable, installer_policy(config), timeout)
    total = len(requirements)
    done = 0
    report("install", f"installing {', '.join(requirements)}", 0, total)
    lines: collections.deque[str] = collections.deque(maxlen=_KEPT_LINES)
    async with Sandbox(sandbox_config, resolver=resolver) as sb:
        argv = _installer_argv(config, path, uv, requirements)
        command = sb.command(argv[0]).args(argv[1:])
        command.stdin(Stdio.NULL).stdout(Stdio.PIPE).stderr(Stdio.PIPE).timeout(timeout)
        try:
            process = await command.spawn()
        except SpawnError as exc:
            raise InstallError(f"the installer could not start: {exc}") from exc
        async with process:
            stdout, stderr = process.stdout, process.stderr
            assert stdout is not None and stderr is not None  # both Stdio.PIPE above

            async def read_stderr() -> None:
                cutter = _LineCutter()
                async for chunk in stderr:
                    lines.extend(cutter.feed(chunk))
                lines.extend(cutter.end())

            def progress(line: str) -> None:
                nonlocal done
                lines.append(line)
                if line.startswith(("Collecting ", "Processing ", "Downloading ")):
                    done = min(total, done + line.startswith(("Collecting ", "Processing ")))
                if line.strip():
                    report("install", line.strip(), done, total)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_stderr)
                cutter = _LineCutter()
                async for chunk in stdout:
                    for line in cutter.feed(chunk):
                        progress(line)
                for line in cutter.end():
                    progress(line)
            code = await process.wait()
    if code != 0:
        output = "\n".join(lines).strip()
        # The installer's own last words: pip ends with its ERROR lines, uv
        # with its explanation of why nothing fits.
        detail = "\n".join([line for line in lines if line.strip()][-12:])
        raise InstallError(f"installing {', '.join(requirements)} into {path} failed (exit {code}):\n"
                           f"{detail[-4000:]}", output)


class _LineCutter:
    """An installer's output stream as lines, each cut to _MAX_LINE
    characters: the rest of a longer line is dropped as it comes, so the
    host holds no more than one line's start and one chunk, and looks at
    each byte once, however long a line the installer (or code planted in
    the environment) writes."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._overlong = False  # the line being read was cut: its rest is dropped

    def feed(self, chunk: bytes) -> list[str]:
        """The lines that ``chunk`` completes (or cuts)."""
        return self._split(self._decoder.decode(chunk))

    def end(self) -> list[str]:
        """The last line, when the stream ended without a newline."""
        lines = self._split(self._decoder.decode(b"", final=True))
        if self._pending and not self._overlong:
            lines.append(self._pending)
        self._pending = ""
        return lines

    def _split(self, text: str) -> list[str]:
        # A carriage return ends a line too, as str.splitlines() had it
        # (a progress bar redraws its line with one).
        *complete, rest = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        lines = []
        for piece in complete:
            if not self._overlong:
                lines.append((self._pending + piece)[:_MAX_LINE])
            self._pending, self._overlong = "", False
        if not self._overlong:
            self._pending += rest
            if len(self._pending) > _MAX_LINE:
                lines.append(self._pending[:_MAX_LINE])
                self._pending, self._overlong = "", True
        return lines


class PythonConfig(Frozen):
    """A Python environment in a sandbox (``SandboxConfig(python=...)``).

    venv: a :class:`VenvConfig` (built, or extended, when the sandbox opens)
    or the path of an existing environment.  interpreter: the program in
    its bin/ to run (default ``python``).  allow_pip_install: the
    environment is writable inside, so ``pip install`` works there (through
    the proxy, when the network policy allows the index); otherwise it is
    read-only and executable.
    """

    _fields = ("venv", "interpreter", "allow_pip_install")
    venv: VenvConfig | Path
    interpreter: str
    allow_pip_install: bool

    def __init__(self, venv: VenvConfig | str | os.PathLike[str], *, interpreter: str | None = None,
                 allow_pip_install: bool = False) -> None:
        if isinstance(venv, (str, os.PathLike)):
            venv_text = _path_text(venv)
            if venv_text is None:
                raise PolicyError(f"PythonConfig: venv must be a directory path, got {venv!r}")
            venv = _check_venv_path(Path(os.path.realpath(expand_home(venv_text, "PythonConfig"))),
                                    "PythonConfig")
        elif not isinstance(venv, VenvConfig):
            raise PolicyError(f"PythonConfig: venv must be a VenvConfig or a path, got {venv!r}")
        self._set("venv", venv)
        interpreter = "python" if interpreter is None else interpreter
        if (not isinstance(interpreter, str) or interpreter in ("", ".", "..") or "/" in interpreter
                or "\0" in interpreter):
            raise PolicyError(f"PythonConfig: interpreter must be a program name in the venv's bin/, "
                              f"got {interpreter!r}")
        self._set("interpreter", interpreter)
        if not isinstance(allow_pip_install, bool):
            raise PolicyError(f"PythonConfig: allow_pip_install must be a bool, got {allow_pip_install!r}")
        self._set("allow_pip_install", allow_pip_install)

    @property
    def path(self) -> Path:
        return self.venv.path if isinstance(self.venv, VenvConfig) else self.venv

    @property
    def executable(self) -> Path:
        return self.path / "bin" / self.interpreter
