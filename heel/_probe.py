"""What this machine can enforce: ``heel.probe()`` and ``heel doctor``.

Every answer comes from trying: the probe starts a real sandboxed ``true``
with all layers on (and, if that fails, with fewer), so "enforced" means the
kernel accepted it, not that a header said it should.
"""

from __future__ import annotations

import errno
import functools
import os
from collections import namedtuple

from . import _native
from ._plan import Environment, build_plan
from ._spawn import Prepared, make_temp_dir, remove_tree
from .config import IsolationLevel, SandboxConfig, SecurityConfig
from .errors import SandboxUnavailable, SpawnError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .policy import DenyAll

__all__ = ["probe", "ProbeReport", "Protection"]

ENFORCED = "enforced"
DEGRADED = "degraded"
UNAVAILABLE = "unavailable"


class Protection(namedtuple("Protection", "name status detail")):
    """One protection: status is "enforced", "degraded" or "unavailable"."""

    __slots__ = ()


class ProbeReport(namedtuple("ProbeReport", "landlock_abi seccomp user_namespaces euid protections "
                                            "namespace_error", defaults=("",))):
    """What heel.probe() found."""

    __slots__ = ()

    def status(self, name: str) -> str:
        for p in self.protections:
            if p.name == name:
                return p.status
        raise KeyError(name)


def _trial(env: Environment) -> str:
    """Run `true` under a DEFAULT plan for env; '' on success, else why not."""
    from . import _sync

    base = make_temp_dir("heel-probe-", searchable=os.geteuid() == 0)
    try:
        work, tmp = os.path.join(base, "work"), os.path.join(base, "tmp")
        view = os.path.join(base, "view")  # as a Session's (see build_plan's host_view)
        base_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:  # through an fd, never the name (see _spawn.make_path_nofollow)
            for name in ("work", "tmp", "view"):
                os.mkdir(name, 0o700, dir_fd=base_fd)
        finally:
            os.close(base_fd)
        # DEFAULT, which has no network namespace (STRICT always has one): a
        # machine that lets users make the other namespaces but not that one
        # still gets them where no network is asked for.  The workdir goes
        # to the plan only (a config's would be checked as the user's own:
        # refused in /dev/shm, or in a protected home that holds $TMPDIR),
        # and nothing is protected: the trial asks about the kernel, not
        # about this user's files.
        config: SandboxConfig[DenyAll] = SandboxConfig(level=IsolationLevel.DEFAULT, security=SecurityConfig(
            protect_user_home=False, protect_credentials=False, protect_cloud_config=False))
        plan = build_plan(config, workdir=work, host_tmp=tmp, host_view=view, env=env,
                          init_path=_native.INIT_PATH)
        prepared = Prepared(plan)
        try:
            with open(os.devnull, "r+b") as null:
                code, _ = _sync.run(prepared, ["true"], plan.env, work, (null.fileno(),) * 3, timeout=10)
        finally:
            prepared.close()
        return "" if code == 0 else f"`true` exited with {code}"
    except SpawnError as exc:
        if not namespaces_missing(exc):
            # Not the machine's lack (a path the plan cannot reach, say):
            # building a weaker sandbox would hide it.
            raise
        return str(exc)
    finally:
        remove_tree(base)


@functools.lru_cache(maxsize=1)
def environment() -> tuple[Environment, str]:
    """The strongest Environment this machine runs, and why namespaces failed if they did."""
    abi = _native.landlock_abi()
    seccomp = _native.seccomp_arch() != 0
    full = Environment(landlock_abi=abi, seccomp=seccomp, namespaces=True)
    why = _trial(full)
    if not why:
        return full, ""
    return Environment(landlock_abi=abi, seccomp=seccomp, namespaces=False), why


#: Setup stages where a missing kernel feature (user namespaces, the mount
#: API) shows up...
NAMESPACE_STAGES = frozenset({"clone", "userns", "mount"})
#: ...and the errors it shows up as: refusals and missing system calls.
#: Others there (ELOOP, ENOENT, ENOTDIR: a path that is not what the plan
#: says) are the plan's, and never make heel build a weaker sandbox.
NAMESPACE_ERRNOS = frozenset({errno.EPERM, errno.EACCES, errno.EINVAL, errno.ENOSYS, errno.ENOSPC,
                              errno.EUSERS})


def namespaces_missing(exc: BaseException) -> bool:
    """Whether a failed spawn says that this machine lacks namespaces."""
    return (isinstance(exc, SpawnError) and exc.stage in NAMESPACE_STAGES
            and exc.errno in NAMESPACE_ERRNOS)


def assumed_environment() -> Environment:
    """The strongest environment, not tried: for a one-shot caller (the CLI)
    that spares the trial run and falls back to environment() when its first
    spawn fails in a namespace stage."""
    return Environment(landlock_abi=_native.landlock_abi(), seccomp=_native.seccomp_arch() != 0,
                       namespaces=True)


def require(env: Environment, config: SandboxConfig, why_no_namespaces: str) -> list[str]:
    """Raise SandboxUnavailable for what the config needs and this machine lacks,
    unless best_effort; returns the list of what is missing."""
    missing = []
    if env.landlock_abi < 1:
        missing.append(("Landlock", "the kernel has no Landlock (Linux >= 5.13 with lsm=landlock)"))
    if not env.seccomp:
        missing.append(("seccomp", "this architecture is not supported by heel's filter"))
    if not env.namespaces:
        missing.append(("user namespaces",
                        f"{why_no_namespaces or 'unavailable'}; without them chmod/chown/utime outside the "
                        "workdir, processes that call setsid, and the process limit cannot be contained"))
    if config.security.allow_unix_sockets and not env.namespaces:
        missing.append(("abstract socket names",
                        "without a network namespace a sandbox that may make unix sockets can bind "
                        "abstract names in the host's (an X server's or D-Bus's, say)"))
    if config.limits.processes and env.euid == 0 and (
            not env.namespaces or config.level is IsolationLevel.PERMISSIVE):
        missing.append(("the process limit",
                        "RLIMIT_NPROC never binds uid 0, and root runs PERMISSIVE sandboxes as uid 0 "
                        "(other levels, or a non-root caller, have a limit that binds)"))
    if not config.network.denies_everything and not env.namespaces:
        if env.landlock_abi < 4:
            # Nothing at all would hold TCP: not a weaker sandbox but none.
            raise SandboxUnavailable(
                "the network policy", "without user namespaces heel needs Landlock ABI 4 (Linux >= 6.7) "
                "to keep TCP to the proxy's port, and this kernel has "
                + (f"ABI {env.landlock_abi}" if env.landlock_abi else "no Landlock"),
                "use DenyAll(), or enable unprivileged user namespaces")
        weaker = ("the network namespace",
                  "without user namespaces the proxy's port is held by a Landlock TCP rule, which matches "
                  "the port on every address: a direct connection to that port number on another host "
                  "is possible")
        if config.security.strict_network:
            raise SandboxUnavailable(*weaker, "SecurityConfig(strict_network=True) refuses that")
        missing.append(weaker)
    if missing and not config.best_effort:
        name, reason = missing[0]
        raise SandboxUnavailable(name, reason, "see `python -m heel doctor`; best_effort=True runs anyway")
    return [name for name, _ in missing]


def probe() -> ProbeReport:
    """What this machine enforces, protection by protection.  Raises
    PolicyError when the trial sandbox cannot be made for a reason of this
    process's, not the machine's (an unusable $TMPDIR, say)."""
    env, why = environment()
    abi = env.landlock_abi
    ns = env.namespaces
    root = env.euid == 0

    def p(name, ok, detail_ok, detail_bad, partial=False):
        status = ENFORCED if ok else (DEGRADED if partial else UNAVAILABLE)
        return Protection(name, status, detail_ok if ok else detail_bad)

    items = [
        p("landlock", abi >= 1, f"ABI {abi}", "no Landlock in this kernel"),
        p("seccomp", env.seccomp, "deny list, socket and ioctl filters, architecture check",
          "unsupported architecture"),
        p("filesystem", abi >= 1, "Landlock allow-list", "no file system allow-list"),
        p("file_refer", abi >= 2, "cross-directory links and renames checked",
          "ABI 1: every cross-directory rename or link is refused", partial=abi >= 1),
        p("truncate", abi >= 3 or ns, "truncate outside writable places refused",
          "truncate(2) outside the workdir is not mediated"),
        p("tcp", abi >= 4, "TCP bind/connect refused (Landlock ABI 4)",
          "only seccomp's socket filter stops TCP", partial=env.seccomp),
        p("device_ioctl", abi >= 5, "ioctl only on granted devices", "ioctl on opened devices not mediated",
          partial=env.seccomp),
        p("scoping", abi >= 6, "no signals to host processes, no host abstract unix sockets",
          "signals and abstract sockets are contained only by the namespaces", partial=ns),
        p("command_isolation", abi >= 6,
          "each command in a Landlock domain of its own: no signals, ptrace or /proc access between "
          "the commands of a sandbox",
          "commands of one sandbox cannot ptrace or read one another (Landlock domains), but can "
          "signal one another (scoping needs ABI 6)", partial=abi >= 1),
        p("user_namespace", ns, "an unprivileged user namespace per sandbox", why or "unavailable"),
        p("mount_view", ns, "read-only view outside writable places (no chmod/chown/utime/xattr)",
          "chmod, chown, utime and xattr changes outside the workdir are possible"),
        p("pid_namespace", ns, "every process dies with the command or the sandbox",
          "processes that escape the subreaper may outlive the sandbox", partial=True),
        p("network_namespace", ns, "only loopback: no route out, no UDP, no DNS; the proxy listens "
          "inside at 127.0.0.1 and nothing else can reach it (for STRICT, a network policy, unix "
          "sockets or a GPU; DenyAll at DEFAULT and PERMISSIVE needs none: no internet socket at all)",
          "TCP held by Landlock's port rule and seccomp (no UDP, no listen()): a direct connection to "
          "the proxy's port number on another host is possible, and the proxy's listener on the "
          "host's loopback is guarded by a secret" if abi >= 4 else
          "no network policy can be enforced (needs Landlock ABI 4); only DenyAll works",
          partial=abi >= 4),
        p("capabilities", True, "none inside (bounding set emptied, securebits locked)", ""),
        p("process_limit", ns or not root,
          "RLIMIT_NPROC counted inside the sandbox's user namespace (4096 unless the config sets one)"
          + ("; not for PERMISSIVE, whose root sandboxes run as the real uid 0" if root else "")
          if ns else "RLIMIT_NPROC, counted over all of this user's processes; none by default",
          "RLIMIT_NPROC does not bind uid 0 without a user namespace"),
    ]
    return ProbeReport(landlock_abi=abi, seccomp=env.seccomp, user_namespaces=ns, euid=env.euid,
                       protections=tuple(items), namespace_error=why)
