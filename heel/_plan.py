"""From a SandboxConfig to a plan: pure Python, inspectable, testable without
spawning anything.

A plan says which Landlock rules to add, which mounts the child makes in its
mount namespace, the environment, the rlimits and the seccomp options.
Protected places (home, credentials, cloud configs) are kept out of every
grant by *expanding* the grant around them: Landlock cannot deny a path inside
a granted one, so instead of granting a directory that contains a protected
place, heel grants each of its entries except that place (and lists the
directory itself).  In a mount namespace, protected places inside writable
regions are additionally made read-only mounts, since Landlock does not
mediate chmod, chown, utime or xattr changes.
"""

from __future__ import annotations

import os
import pwd
import resource
import stat
from collections import namedtuple

from . import _landlock as ll
from .config import IsolationLevel, SandboxConfig
from .errors import PolicyError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .venv import PythonConfig

#: What every program needs to run: read and execute.
RUNTIME_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
#: Device nodes every level may read and write (never block devices).
DEVICE_NODES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty")
#: Device trees that terminals need (ioctl allowed; TIOCSTI is refused by seccomp).
TERMINAL_DEVICES = ("/dev/pts", "/dev/ptmx")
GPU_DEVICES = ("/dev/nvidia*", "/dev/nvidia-caps", "/dev/dri", "/dev/kfd")
GPU_DRIVER_INFO = ("/proc/driver/nvidia",)  # closed by a mount when allow_gpu is off
#: Trees never granted wholesale: devices, kernel interfaces.
SYSTEM_TREES = ("/dev", "/proc", "/sys")

CREDENTIALS_IN_HOME = (
    ".ssh", ".gnupg", ".netrc", ".git-credentials", ".pypirc", ".npmrc", ".yarnrc",
    ".docker/config.json", ".cargo/credentials", ".cargo/credentials.toml", ".config/gh",
    ".config/hub", ".pgpass", ".my.cnf", ".password-store", ".local/share/keyrings",
    ".gnome2/keyrings", ".bash_history", ".zsh_history", ".sh_history", ".history",
    ".python_history", ".node_repl_history", ".psql_history", ".mysql_history",
    ".local/share/fish/fish_history", ".terraform.d/credentials.tfrc.json",
    # More REPL histories (a redis AUTH or a connection string is typed there).
    ".ipython/profile_default/history.sqlite", ".rediscli_history", ".sqlite_history",
    ".dbshell", ".mongosh",
    # git's other credential stores, HashiCorp Vault's token, registry logins
    # (podman/buildah/skopeo, RubyGems, Composer), Maven's master password, the
    # 1Password CLI, Python keyring's file store.
    ".config/git/credentials", ".git-credential-cache", ".vault-token",
    ".config/containers/auth.json", ".gem/credentials", ".config/composer/auth.json",
    ".composer/auth.json", ".m2/settings-security.xml", ".config/op",
    ".local/share/python_keyring",
    # Browser and mail profiles: cookies and saved passwords (Firefox's cookies
    # are a plain SQLite file).
    ".mozilla", ".thunderbird", ".config/google-chrome", ".config/chromium",
    ".config/BraveSoftware",
)
SYSTEM_CREDENTIALS = (
    "/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers",
    "/etc/sudoers.d", "/etc/ssl/private", "/etc/ssh/ssh_host_*key", "/etc/security/opasswd",
)
CLOUD_IN_HOME = (
    ".aws", ".azure", ".config/gcloud", ".kube", ".oci", ".config/doctl",
    # s3cmd, boto/gsutil, rclone, OpenStack's clouds.yaml, Hetzner, Linode,
    # Alibaba, IBM Cloud, Scaleway, Fly.io.
    ".s3cfg", ".boto", ".config/rclone", ".config/openstack", ".config/hcloud",
    ".config/linode-cli", ".aliyun", ".bluemix", ".config/scw", ".fly",
)

#: Where a tool's environment variable (of heel's own process: the user's)
#: moves one of the places above: (variable, protection, the place relative to
#: the value, "" for the value itself).  Only absolute values count, each
#: element of a ":"-separated KUBECONFIG.  $XDG_CONFIG_HOME and $XDG_DATA_HOME
#: move every place under ~/.config and ~/.local/share (see _moved_places).
MOVED_BY_ENVIRONMENT = (
    ("GNUPGHOME", "credentials", ""), ("DOCKER_CONFIG", "credentials", "config.json"),
    ("CARGO_HOME", "credentials", "credentials"), ("CARGO_HOME", "credentials", "credentials.toml"),
    ("GH_CONFIG_DIR", "credentials", ""), ("PASSWORD_STORE_DIR", "credentials", ""),
    ("HISTFILE", "credentials", ""), ("VAULT_CONFIG_PATH", "credentials", ""),
    ("XDG_RUNTIME_DIR", "credentials", "containers/auth.json"),  # podman's login, by default
    ("REGISTRY_AUTH_FILE", "credentials", ""),
    ("AWS_SHARED_CREDENTIALS_FILE", "cloud", ""), ("AWS_CONFIG_FILE", "cloud", ""),
    ("CLOUDSDK_CONFIG", "cloud", ""), ("AZURE_CONFIG_DIR", "cloud", ""),
    ("KUBECONFIG", "cloud", ""), ("RCLONE_CONFIG", "cloud", ""),
    ("OCI_CLI_CONFIG_FILE", "cloud", ""), ("BOTO_CONFIG", "cloud", ""),
)

#: Outside id of a sandbox that root starts (it is uid/gid 0 inside its
#: user namespace): it owns nothing on the host, and RLIMIT_NPROC binds it.
ROOT_SANDBOX_ID = 2_000_000_000

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Host variables that are copied in because programs need them and they hold no secret.
PASSED_THROUGH = ("LANG", "LANGUAGE", "TERM", "COLORTERM", "TZ")


#: Where the proxy listens inside a sandbox's network namespace (127.0.0.1):
#: the namespace is the sandbox's alone, so a fixed port collides with nothing.
PROXY_PORT_INSIDE = 3128
#: The user name in the proxy URLs of a sandbox's environment; each command
#: gets its own (see heel.sandbox), so that the proxy can tell who asks.
PROXY_USER = "heel"


def proxy_environment(port: int, user: str, secret: str) -> dict[str, str]:
    """The variables that point the tools of a sandbox at heel's proxy.

    ALL_PROXY is an http:// URL too: the proxy speaks SOCKS5 on the same
    port, but a socks URL breaks clients without SOCKS support (httpx
    without socksio refuses to start).  HEEL_SOCKS_PROXY names it for those
    that want it."""
    http = f"http://{user}:{secret}@127.0.0.1:{port}"
    variables = {}
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        variables[name] = variables[name.upper()] = http
    variables["no_proxy"] = variables["NO_PROXY"] = "localhost,127.0.0.1,::1"
    # npm reads its own settings; Node's built-in fetch honours the
    # variables above only when asked to (Node >= 22.21 / 24.5).
    variables["npm_config_proxy"] = variables["npm_config_https_proxy"] = http
    variables["NODE_USE_ENV_PROXY"] = "1"
    variables["HEEL_SOCKS_PROXY"] = f"socks5h://{user}:{secret}@127.0.0.1:{port}"
    return variables


# Plain named tuples rather than dataclasses: `heel run` builds a plan at
# every start, and importing dataclasses costs it more than the command.

class Rule(namedtuple("Rule", "path access")):
    """Landlock: allow ``access`` beneath ``path``."""

    __slots__ = ()


class MountOp(namedtuple("MountOp", "kind path source access idmap", defaults=(None, 0, False))):
    """One step of the child's mount namespace (see csrc/heel.h).

    kind: "keep_rw", "readonly", "bind", "proc", "tmpfs" or "devpts".
    source: what to clone for "bind" and "readonly" ("readonly": path itself
    when None).  access: the Landlock rights the child grants on a file system
    it mounts fresh.  idmap: show files owned by uid/gid 0 as the sandbox's
    own (the root identity).
    """

    __slots__ = ()


class Environment(namedtuple("Environment", "landlock_abi seccomp namespaces euid egid")):
    """What this machine can enforce (see heel.probe()).  namespaces: user,
    mount, pid, ipc (and net) namespaces with the mount view."""

    __slots__ = ()

    def __new__(cls, landlock_abi: int, seccomp: bool, namespaces: bool,
                euid: int | None = None, egid: int | None = None) -> "Environment":
        return super().__new__(cls, landlock_abi, seccomp, namespaces,
                               os.geteuid() if euid is None else euid,
                               os.getegid() if egid is None else egid)


class SandboxPlan(namedtuple("SandboxPlan", [
        "level", "workdir", "host_tmp", "tmp", "rules", "handled_fs", "handled_net", "scoped",
        "namespaces", "network_namespace", "mounts", "readonly_root", "env", "rlimits", "seccomp",
        "protected", "mountpoints", "sandbox_id", "proxy_port", "proxy_secret"],
        defaults=(0, ""))):
    """Everything a sandbox enforces, computed from its config.

    host_tmp is the private tmp on the host, tmp the same as the sandbox sees
    it.  rules: the Landlock rules.  network_namespace: a network namespace of
    its own (only loopback); not needed when the sandbox may create no
    internet socket at all and Landlock scopes abstract unix sockets.
    mountpoints: (path, is_file) inside host_tmp for each mount point to make
    there: a file for a granted file, else a directory.
    sandbox_id: when heel runs as root, the unprivileged outside id the
    sandbox runs as.  proxy_port: where the sandbox reaches heel's proxy, at
    127.0.0.1 (0: no network at all); proxy_secret: the credential in the
    proxy URLs of its environment.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        # The proxy credential stays out of logs and tracebacks.
        text = super().__repr__()
        return text.replace(self.proxy_secret, "<secret>") if self.proxy_secret else text


def home_directories() -> list[str]:
    """The invoking user's home (from the password database) and $HOME."""
    homes = []
    try:
        homes.append(pwd.getpwuid(os.geteuid()).pw_dir)
    except KeyError:
        pass
    if os.environ.get("HOME"):
        homes.append(os.environ["HOME"])
    out = []
    for home in homes:
        home = os.path.abspath(home)
        if home != "/" and home not in out:
            out.append(home)
    return out


def protected_paths(config: SandboxConfig) -> list[str]:
    """Every place that stays closed, existing or not, with symlinks resolved too."""
    sec = config.security
    paths: list[str] = []
    for home in home_directories():
        # A home that holds the system itself (HOME=/usr, a service account's)
        # is not closed whole, which would close the runtime: its credentials are.
        if sec.protect_user_home and not any(_under(d, home) for d in (*RUNTIME_DIRS, *SYSTEM_TREES)):
            paths.append(home)
        if sec.protect_credentials:
            paths += [os.path.join(home, p) for p in CREDENTIALS_IN_HOME]
        if sec.protect_cloud_config:
            paths += [os.path.join(home, p) for p in CLOUD_IN_HOME]
    paths += _moved_places(sec)
    if sec.protect_credentials:
        for pattern in SYSTEM_CREDENTIALS:
            # What the file permissions already close to this user needs no
            # rule (for uid 0 nothing is closed: every one of them counts).
            paths += [p for p in _existing([pattern]) if _accessible(p)]
    out: dict[str, None] = {}  # ordered, without repeats
    resolved: dict[str, str] = {}
    for path in map(os.path.normpath, paths):
        out.setdefault(path)
        out.setdefault(_realpath(path, resolved))
    return list(out)


def _realpath(path: str, resolved: dict[str, str]) -> str:
    """os.path.realpath(path) of a normalised absolute path, with the
    directories resolved on the way kept in ``resolved``: the protected
    places share their parents (the home, ~/.config), and realpath alone
    looks at every component of every place again."""
    parent, _, name = path.rpartition("/")
    if not name:
        return path  # "/"
    if parent not in resolved:
        resolved[parent] = _realpath(parent, resolved) if parent else ""
    joined = resolved[parent].rstrip("/") + "/" + name
    try:
        is_link = stat.S_ISLNK(os.lstat(joined).st_mode)
    except OSError:
        return joined  # missing (or unreadable): nothing to follow, as realpath
    return os.path.realpath(joined) if is_link else joined


def _moved_places(sec) -> list[str]:
    """The protected places that the user's environment moves out of the
    home (MOVED_BY_ENVIRONMENT, $XDG_CONFIG_HOME, $XDG_DATA_HOME), for the
    protections that are on.  A place that is "/" or holds the system
    (GNUPGHOME=/usr), as a home there, or lies in the programs' part of it
    or in /dev, /proc or /sys (/usr/lib, HISTFILE=/dev/null: never a user's
    secret) is not closed: it would close the runtime.  One in /etc is
    (KUBECONFIG=/etc/kubernetes/admin.conf)."""
    on = {"credentials": sec.protect_credentials, "cloud": sec.protect_cloud_config}
    places = []
    for variable, protection, inside in MOVED_BY_ENVIRONMENT:
        if on[protection]:
            for value in os.environ.get(variable, "").split(":" if variable == "KUBECONFIG" else None):
                places.append(os.path.join(value, inside) if inside else value)
    for variable, default in (("XDG_CONFIG_HOME", ".config/"), ("XDG_DATA_HOME", ".local/share/")):
        base = os.environ.get(variable, "")
        for protection, lists in (("credentials", CREDENTIALS_IN_HOME), ("cloud", CLOUD_IN_HOME)):
            if on[protection] and base:
                places += [os.path.join(base, p[len(default):]) for p in lists if p.startswith(default)]
    programs = [d for d in (*RUNTIME_DIRS, *SYSTEM_TREES) if d != "/etc"]  # HISTFILE=/dev/null
    return [p for p in map(os.path.normpath, places)
            if os.path.isabs(p) and not any(_under(d, p) for d in (*RUNTIME_DIRS, *SYSTEM_TREES))
            and not any(_under(p, d) for d in programs)]


def _accessible(path: str) -> bool:
    """Could the sandbox (same uid, no capabilities) read or change this path?"""
    if os.geteuid() == 0:
        return True
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return st.st_uid == os.geteuid() or os.access(path, os.R_OK) or os.access(path, os.W_OK)


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def expand(path: str, access: int, denied: list[str], is_dir: bool = True) -> list[Rule]:
    """Rules granting ``access`` beneath ``path`` except beneath any denied path.

    A directory that holds a denied place is not granted itself (only listed,
    READ_DIR); each of its entries is granted in turn, recursively.  Symbolic
    links are skipped there: Landlock checks the target of a link, and
    following one could grant a denied place.  A rule on a file carries only
    the rights that apply to files.
    """
    inside = [d for d in denied if _under(d, path)]
    if not inside:
        return [Rule(path, access if is_dir else access & ll.FILE_RIGHTS)]
    if path in inside:
        return []
    rules = [Rule(path, access & ll.READ_DIR)] if access & ll.READ_DIR else []
    # The denied places below, by the entry of `path` that leads to them:
    # every other entry is granted whole, without looking further.
    prefix = path.rstrip("/") + "/"
    below: dict[str, list[str]] = {}
    for d in inside:
        below.setdefault(d[len(prefix):].split("/", 1)[0], []).append(d)
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError:
        return rules
    for entry in entries:
        if entry.is_symlink():
            continue
        is_entry_dir = entry.is_dir(follow_symlinks=False)
        if entry.name in below:
            rules += expand(entry.path, access, below[entry.name], is_entry_dir)
        else:
            rules.append(Rule(entry.path, access if is_entry_dir else access & ll.FILE_RIGHTS))
    return rules


def _existing(patterns) -> list[str]:
    """The paths that exist among ``patterns``, each a path or a path with
    one ``*`` in its last component (``/dev/nvidia*``): what heel's own
    lists need of glob.glob, without the imports of glob (fnmatch, re)."""
    out: list[str] = []
    for pattern in patterns:
        directory, _, name = pattern.rpartition("/")
        if "*" in directory or name.count("*") > 1 or "?" in pattern or "[" in pattern:
            raise ValueError(f"{pattern}: only one * in the last component is supported")
        if "*" not in name:
            out += [pattern] if os.path.lexists(pattern) else []
            continue
        head, _, tail = name.partition("*")
        try:
            names = os.listdir(directory or "/")
        except OSError:
            continue
        out += sorted(os.path.join(directory, n) for n in names
                      if n.startswith(head) and n.endswith(tail) and len(n) >= len(head) + len(tail)
                      and (head or not n.startswith(".")))
    return out


def _check_unchanged(config: SandboxConfig) -> None:
    """The config's paths were resolved when it was made; refuse one in which
    a symbolic link has appeared since.  Something that may write a
    directory on the way (another sandbox given it writable) could otherwise
    point a later sandbox's grant anywhere its user may reach."""
    for kind in ("readable", "writable", "executable", "workdir"):
        value = getattr(config, kind)
        for path in map(str, value if isinstance(value, tuple) else [value] if value is not None else []):
            real = os.path.realpath(path)
            if real != path:
                raise PolicyError(
                    f"{kind} path {path} now leads to {real}: a symbolic link has replaced part of it since the "
                    "config was made (something that may write there changed it); heel grants only what the "
                    "config named, so make the config again if that is meant")


def _rules_for(path: str, access: int, denied: list[str], abi_mask: int) -> list[Rule]:
    """The rules for one grant: the path resolved once (expansion then only
    walks real directories), the rights masked to what the ABI handles."""
    real = os.path.realpath(path)
    if not os.path.exists(real):
        return []
    return [r for r in expand(real, access & abi_mask, denied, os.path.isdir(real)) if r.access]


def is_nvidia(node: str) -> bool:
    """Whether a GPU node is NVIDIA's: only those bring the grants CUDA
    needs (build_plan), where they were seen; a cloud VM's /dev/dri (a
    display adapter) asks for neither."""
    return node.startswith("/dev/nvidia")


def _known_python_prefixes(python) -> set[str]:
    """The installation prefixes of the Pythons heel can vouch for: the one
    running it, and the base a VenvConfig names."""
    import sys

    from .venv import VenvConfig, base_prefix, find_interpreter

    known = {os.path.realpath(sys.base_prefix)}
    if isinstance(python.venv, VenvConfig):
        known.add(base_prefix(find_interpreter(python.venv.python)))
    return known


def _with_python(
    config: SandboxConfig, python: PythonConfig, denied: list[str]
) -> tuple[SandboxConfig, dict[str, str]]:
    """The config with its Python environment (``python``, the config's own)
    granted (the venv, and the base interpreter's prefix that its bin/python
    links to), and the variables that make it the sandbox's python."""
    from .venv import inspect

    venv = python.path
    cfg = inspect(venv)
    home = cfg.get("home", "")
    if "\0" in home:
        home = ""  # names no directory (os.path.realpath would raise ValueError)
    # Resolved once, here, and granted as resolved: pyvenv.cfg and the
    # links in the path it names may be a sandbox's (allow_pip_install), one
    # that runs while this sandbox opens.  Checked by one resolution and
    # granted by another, a link it flips between a Python heel knows and
    # any host directory would have the second granted at STRICT.
    prefix = os.path.realpath(os.path.dirname(os.path.abspath(home))) if home else ""
    for what, path in (("the venv", str(venv)), ("the venv's base Python", prefix)):
        for d in denied:
            if path and _under(path, d):
                raise PolicyError(
                    f"{what} ({path}) is inside the protected place {d}: make the venv elsewhere, from a "
                    "Python outside it (VenvConfig(python='/usr/bin/python3'); on the command line "
                    "--python /usr/bin/python3), or turn that protection off")
    executable: list[str | os.PathLike[str]] = list(config.executable)
    writable = list(config.writable)
    # Only STRICT needs the prefix granted (the other levels read all but the
    # protected places).  pyvenv.cfg is a file the sandbox may have written
    # (allow_pip_install), so its `home` is granted only when it names a
    # Python heel knows: the base of the VenvConfig, or the one running heel.
    covered = any(_under(prefix, d) for d in RUNTIME_DIRS)
    if (config.level is IsolationLevel.STRICT and prefix and prefix != "/" and not covered
            and os.path.isdir(prefix)):
        if prefix not in _known_python_prefixes(python):
            raise PolicyError(
                f"the venv {venv} names {home} as its base Python, which heel did not make it from: at "
                "STRICT heel grants only a base it knows (PythonConfig(VenvConfig(..., python=...)), or the "
                "Python running heel)")
        executable.append(prefix)
    (writable if python.allow_pip_install else executable).append(venv)
    variables = {"VIRTUAL_ENV": str(venv), "PATH": str(venv / "bin")}
    if not python.allow_pip_install:
        variables["PYTHONDONTWRITEBYTECODE"] = "1"  # the venv is read-only inside
    return config.replace(executable=executable, writable=writable), variables


def _views(host_tmp: str, shm: str | None, host_view: str | None, granted: list[str]) -> list[tuple[str, str]]:
    """The directories a sandbox gets a view of its own at, as (path inside,
    host source): its private /tmp and /dev/shm, and a read-only cover over
    the directory that holds heel's temporary directories when that is
    elsewhere (see build_plan's host_view).  That cover is left out where a
    path the config grants (the workdir, a writable, readable or executable
    one) holds it: what is granted stays as it is on the host."""
    views = [("/tmp", host_tmp)] if os.path.isdir("/tmp") else []
    if shm:
        views.append(("/dev/shm", shm))
    temp_parent = os.path.dirname(os.path.dirname(host_tmp))
    if (host_view and _coverable(temp_parent) and not any(_under(temp_parent, v) for v, _ in views)
            and not any(_under(temp_parent, g) for g in granted)):
        views.append((temp_parent, host_view))
    return views


def _coverable(path: str) -> bool:
    """Whether the directory holding heel's temporary directories may be
    covered by a view of the sandbox's own: not the root, nor a directory
    the runtime lives in or under."""
    path = path.rstrip("/")
    # Two levels down at least: /var/tmp, /home/user; never /var or /home whole.
    return path.count("/") >= 2 and not any(_under(r, path) or _under(path, r)
                                            for r in (*RUNTIME_DIRS, *SYSTEM_TREES))


def _check_reachable(paths: list[tuple[str, str]], sandbox_id: int, views: list[str], *,
                     workdir_is_heels: bool) -> None:
    """Refuse a granted path that the sandbox's unprivileged outside id
    could not reach: a directory above it that other users may not search
    (root's 0700 home, a private $TMPDIR).  The path itself is mounted
    idmapped when writable, but the directories that lead to it are seen
    as they are on disk.  Below a view (``views``: the private /tmp...) the
    way is rebuilt out of heel's own idmapped directories: only the
    directories above the view count."""
    for kind, path in paths:
        under = [v for v in views if _under(path, v)]
        start = max(under, key=len) if under else path
        parent = os.path.dirname(start.rstrip("/")) or "/"
        while True:
            try:
                mode = os.stat(parent).st_mode
            except OSError:
                mode = 0o777  # not there: the plan's own checks say so
            if not mode & stat.S_IXOTH:
                if kind == "workdir" and workdir_is_heels:
                    raise PolicyError(
                        f"heel's temporary directory is in {os.path.dirname(os.path.dirname(path))}, which the "
                        f"sandbox cannot reach: {parent} is not searchable by other users (mode "
                        f"{stat.S_IMODE(mode):04o}), and as root heel runs the sandbox as the unprivileged uid "
                        f"{sandbox_id}; set TMPDIR to a directory others can pass through, such as /tmp")
                raise PolicyError(
                    f"{kind} path {path} cannot be reached from the sandbox: {parent} is not searchable by "
                    f"other users (mode {stat.S_IMODE(mode):04o}), and as root heel runs the sandbox as the "
                    f"unprivileged uid {sandbox_id}; allow it (chmod o+x {parent}), choose a path elsewhere, "
                    "or use the PERMISSIVE level, which runs as root")
            if parent == "/":
                break
            parent = os.path.dirname(parent)


def _strict_covers(rules, mounts: list[MountOp], views: list[tuple[str, str]],
                   host_mask: str | None, host_mask_file: str | None, spelled: list[str]) -> list[MountOp]:
    """At STRICT, covers for the top-level entries of the host's root that
    hold nothing the sandbox is given.  Landlock keeps their contents from
    being opened, but not from stat(), readlink(), getxattr() or an inotify
    watch, which would name the files the host makes in them.  An entry that
    holds a grant, a mount or a mount's source stays as it is, as does one
    that holds a grant's name as the config gave it (``spelled``: through a
    link, as /var/run/docker.sock names /run/docker.sock).  /sys is such an
    entry where no GPU grants it (its names tell interfaces, block devices,
    loaded modules); /dev and /proc always hold something given, and are
    left to the rules.  Top-level links and other non-directories but files
    cannot be covered (see README)."""
    if not host_mask:
        return []
    kept = ([r.path for r in rules] + [m.path for m in mounts] + [m.source for m in mounts if m.source]
            + [p for view in views for p in view] + [host_mask] + ([host_mask_file] if host_mask_file else [])
            + spelled)
    covers = []
    try:
        entries = sorted(os.scandir("/"), key=lambda e: e.name)
    except OSError:
        return []
    for entry in entries:
        path = "/" + entry.name
        if path in RUNTIME_DIRS or path in ("/dev", "/proc", "/tmp") or any(_under(k, path) for k in kept):
            continue
        if entry.is_dir(follow_symlinks=False):
            covers.append(MountOp("readonly", path, source=host_mask))
        elif entry.is_file(follow_symlinks=False) and host_mask_file:
            covers.append(MountOp("readonly", path, source=host_mask_file))
    return covers


#: The process limit of a sandbox whose config sets none (ResourceLimits
#: processes=None): processes and threads of all its commands at once.
#: Enough for builds, browsers and thread pools; a fork bomb stops there
#: instead of at the host's pid_max (32768 on many machines), which would
#: leave the host unable to start anything.
DEFAULT_PROCESSES = 4096
#: The sandbox's share of its user's pending signals (the host's default is
#: some 96,000 on a machine of 24 GiB) and POSIX message queue bytes (819,200;
#: a queue with the default attributes takes some 82 KB of it).
SANDBOX_SIGPENDING = 4096
SANDBOX_MSGQUEUE = 256 * 1024


def build_plan(config: SandboxConfig, *, workdir: str, host_tmp: str, env: Environment,
               init_path: str, host_shm: str | None = None,
               host_mask: str | None = None, host_mask_file: str | None = None,
               host_view: str | None = None, proxy_port: int = 0,
               proxy_secret: str = "") -> SandboxPlan:
    """The plan for ``config`` on a machine that can enforce ``env``.

    ``proxy_port``: without namespaces, the port of the proxy's listener on
    the host's 127.0.0.1 (in a network namespace it is always
    PROXY_PORT_INSIDE).  ``proxy_secret``: the sandbox's proxy credential.

    ``host_tmp`` (and ``host_shm``) are the sandbox's private directories on
    the host; in a mount namespace they appear at /tmp and /dev/shm.
    ``host_mask`` is an empty directory that covers protected directories,
    ``host_mask_file`` an empty file that covers protected files where
    Landlock cannot keep them closed (under a view, see below).
    ``host_view``: an empty directory of the sandbox's own (see below) that
    covers the directory holding heel's temporary directories, when that is
    not /tmp (which the private /tmp covers already): other sandboxes' ones
    are there, and the same user could read them.
    """
    denied = protected_paths(config)
    _check_unchanged(config)
    python_env: dict[str, str] = {}
    if config.python is not None:
        config, python_env = _with_python(config, config.python, denied)
    level = config.level
    handled = ll.handled_fs(env.landlock_abi)

    # An explicit grant of a protected place is a contradiction, not a wish.
    explicit = [("workdir", workdir)] + [(kind, str(p)) for kind in ("readable", "writable", "executable")
                                         for p in getattr(config, kind)]
    shm = host_shm if env.namespaces and host_shm and os.path.isdir("/dev/shm") else None
    # Directories the sandbox sees one of its own at, (path, host source):
    # /tmp and /dev/shm, and the directory that holds heel's temporary
    # directories (the other sandboxes' ones) wherever $TMPDIR puts them.
    # (At PERMISSIVE, which writes everywhere, the place of heel's temporary
    # directories is not covered: a read-only cover there would be a surprise.)
    views = (_views(host_tmp, shm, host_view if level is not IsolationLevel.PERMISSIVE else None,
                    [p for _, p in explicit]) if env.namespaces else [])
    heels_workdir = os.path.dirname(workdir) == os.path.dirname(host_tmp)
    for kind, path in explicit:
        for d in denied:
            if not _under(path, d):
                continue
            if kind == "workdir" and heels_workdir:
                # heel's own, new and empty: no grant of anything of the
                # user's.  A protected place that a view hides (HOME=/tmp)
                # gets no cover, and the workdir is reached through the view.
                if any(_under(d, v) for v, _ in views):
                    continue
                raise PolicyError(
                    f"heel's temporary directory is in {os.path.dirname(os.path.dirname(path))} ($TMPDIR), "
                    f"inside the protected place {d}: set TMPDIR to a directory outside it, such as /tmp")
            raise PolicyError(
                f"{kind} path {path} is inside the protected place {d}; to grant it, turn the "
                "matching protection off (SecurityConfig(protect_user_home=False, ...); on the command "
                "line --no-protect-home, --no-protect-credentials or --no-protect-cloud)")

    # Root does not run sandboxes as root, except at PERMISSIVE, whose whole
    # point is to write everywhere (see README).
    sandbox_id = (ROOT_SANDBOX_ID if env.namespaces and env.euid == 0
                  and level is not IsolationLevel.PERMISSIVE else None)
    if sandbox_id is not None:
        _check_reachable(explicit, sandbox_id, [v for v, _ in views], workdir_is_heels=heels_workdir)

    grants: list[tuple[str, int]] = []
    runtime = [d for d in RUNTIME_DIRS if os.path.exists(d)]
    grants += [(d, ll.READ | ll.EXEC) for d in runtime]
    grants += [(d, ll.DEVICE) for d in _existing(DEVICE_NODES)]
    if env.namespaces:
        # The sandbox's own devpts (mounted below).  Without namespaces these
        # would be the host's, with every terminal of the user's in them.
        grants += [(d, ll.DEVICE | ll.READ_DIR) for d in _existing(TERMINAL_DEVICES)]
    grants += [("/proc", ll.READ)]
    grants.append((init_path, ll.READ_FILE | ll.EXECUTE))
    gpus = _existing(GPU_DEVICES) if config.security.allow_gpu else []
    if gpus:
        grants += [(d, ll.DEVICE | ll.READ_DIR) for d in gpus]
        grants += [(d, ll.READ) for d in _existing(GPU_DRIVER_INFO)]
        # Drivers find their devices in sysfs (PCI, DRM, KFD topology).  It
        # tells of the host's hardware too, so only where there is a GPU.
        grants += [("/sys", ll.READ)]
    # The sandbox's own /proc is read-only, except where a GPU driver runs:
    # CUDA names the threads it starts by writing /proc/self/task/TID/comm
    # from another thread (prctl names only the caller), and cuInit fails
    # with error 304 when it cannot.  Landlock cannot grant files that do
    # not exist yet, so the grant is the whole of the sandbox's own procfs
    # (mounted below, hidepid=ptraceable, in its pid namespace): its
    # processes' own files, never another command's (another Landlock
    # domain, so not even listed) nor the host's.  Files of the kernel's
    # own there (/proc/sys, /proc/sysrq-trigger) belong to the host's root,
    # so only an identity that is not the host's uid 0 gets it: not root's
    # sandboxes at PERMISSIVE, nor any sandbox without namespaces (whose
    # /proc is the host's).  See README, "GPUs".
    #
    # CUDA also listens on an abstract seqpacket unix socket of its own
    # ("cuda-uvmfd-...") and fails to start without it: there,
    # socket(AF_UNIX, SOCK_SEQPACKET) is allowed, in a network namespace of
    # the sandbox's own, which holds the names it binds (and keeps the
    # host's abstract sockets out of reach).  Stream and datagram unix
    # sockets stay refused.  Root's PERMISSIVE sandboxes, as the host's uid
    # 0, could connect to root's 0600 seqpacket listeners (udev's control
    # socket): they get neither grant, and CUDA does not start there.
    gpu_runtime = (any(map(is_nvidia, gpus)) and env.namespaces
                   and not (env.euid == 0 and sandbox_id is None))
    proc_access = ll.READ | (ll.WRITE_FILE | ll.TRUNCATE if gpu_runtime else 0)
    if shm:
        grants.append((shm, ll.READ | ll.WRITE))  # the sandbox's private /dev/shm
    if level is IsolationLevel.DEFAULT:
        grants += [("/", ll.READ | ll.EXEC), ("/sys", ll.READ)]
    elif level is IsolationLevel.PERMISSIVE:
        grants.append(("/", ll.READ | ll.EXEC | ll.WRITE))
        grants += [("/proc", ll.READ), ("/sys", ll.READ)]
    grants += [(str(p), ll.READ) for p in config.readable]
    grants += [(str(p), ll.READ | ll.EXEC) for p in config.executable]
    writable = [workdir, host_tmp] + [str(p) for p in config.writable]
    grants += [(p, ll.READ | ll.EXEC | ll.WRITE) for p in writable]

    rules: dict[Rule, None] = {}  # ordered, without repeats
    for path, access in grants:
        # The broad grants of a level never reach into the system trees:
        # those get exactly the nodes listed above.
        skip = [t for t in SYSTEM_TREES if path == "/"] + denied
        for rule in _rules_for(path, access, skip, handled):
            rules.setdefault(rule)

    mounts: list[MountOp] = []
    mountpoints: list[tuple[str, bool]] = []
    tmp_inside = host_tmp
    idmap = sandbox_id is not None
    if env.namespaces:
        readonly_root = level is not IsolationLevel.PERMISSIVE
        private_tmp = os.path.isdir("/tmp")

        def view_of(path: str):
            """The view that hides a host path, if one does (the innermost)."""
            return max((v for v in views if _under(path, v[0])), key=lambda v: len(v[0]), default=None)

        hidden = lambda p: view_of(p) is not None  # noqa: E731
        # Writable places come back writable over the read-only root, and
        # anything granted under a view is brought into it.
        rw_regions = [p for p in writable if p != host_tmp and (readonly_root or hidden(p))]
        ro_regions = [str(p) for p in (*config.readable, *config.executable) if hidden(str(p))]
        for kind, paths in (("readable", config.readable), ("executable", config.executable),
                            ("writable", config.writable), ("workdir", [workdir])):
            for p in map(str, paths):
                # A view of it would cover the private /tmp, or heel's
                # temporary directory that holds it and the workdir (and the
                # IPC client put in the private /tmp).
                view = view_of(p)
                if view and (p.rstrip("/") == view[0] or _under(host_tmp, p)):
                    raise PolicyError(f"{kind} path {p} would cover the sandbox's private {view[0]}; "
                                      "grant the files or directories under it that the command needs")
                # In the private /tmp or /dev/shm, whose Landlock rule (they
                # are the sandbox's, all of them) reaches everything mounted
                # below: protected places there could be renamed away, or
                # made and read, whatever covers them.
                if view and view[1] in (host_tmp, shm):
                    closed = next((d for d in denied if _under(d, p)), None)
                    if closed:
                        raise PolicyError(
                            f"{kind} path {p} holds the protected place {closed}, which heel cannot keep "
                            f"closed under {view[0]}: grant the directories in it that the command needs, "
                            "or turn that protection off")
        # A region inside a writable one comes with it (the clones are
        # recursive); mounting it again would resolve a path the sandbox
        # itself can rewrite.
        rw_regions = [p for p in rw_regions
                      if not any(q != p and _under(p, q) for q in rw_regions + [host_tmp])]
        ro_regions = [p for p in ro_regions if not any(_under(p, q) for q in rw_regions + [host_tmp])]
        if private_tmp:
            tmp_inside = "/tmp"
        for path, source in views:
            # The directory that holds heel's ones is read-only inside, like
            # the root it covers; idmapped, so that root's sandbox id may
            # pass through the mount points made in it.
            kind = "bind" if path in ("/tmp", "/dev/shm") else "readonly"
            mounts.append(MountOp(kind, path, source=source, idmap=idmap))
        # A mount point takes the kind of what is mounted on it: a file
        # granted under a view needs a file to be mounted over.
        for p in rw_regions + ro_regions:
            view = view_of(p)
            if view:
                mountpoints.append((os.path.join(view[1], os.path.relpath(p, view[0])), os.path.isfile(p)))
        mounts += [MountOp("keep_rw", p, idmap=idmap) for p in rw_regions]
        mounts += [MountOp("readonly", p) for p in ro_regions]
        covered = (_strict_covers(rules, mounts, views, host_mask, host_mask_file,
                                  [given for given, _ in getattr(config, "_spelled", ())])
                   if level is IsolationLevel.STRICT else [])
        mounts += covered
        # Protected directories are covered by an empty read-only directory:
        # Landlock lets the sandbox list the directories that lead to a
        # protected place, and this keeps the names inside unseen.  Protected
        # files inside writable regions become read-only (no chmod, no utime).
        regions = ["/"] if not readonly_root else writable
        masked: list[str] = []
        for d in sorted(denied, key=len):
            # A place named through a link (a $HOME of /home/user where /home
            # leads to /var/home) is covered by its real name, also in
            # `denied`: the child mounts on no path with a link in it.
            if (not os.path.lexists(d) or os.path.realpath(d) != d or any(_under(d, m) for m in masked)
                    or any(_under(d, c.path) for c in covered)):
                continue
            if hidden(d) and not any(_under(d, r) for r in rw_regions + ro_regions):
                # Under a view, and not brought into it: not there to cover
                # (a $HOME in /tmp, say).  One inside a grant brought into a
                # view is there, and is covered like any other.
                continue
            if os.path.isdir(d) and host_mask:
                masked.append(d)
                mounts.append(MountOp("readonly", d, source=host_mask))
            elif hidden(d) and host_mask_file and os.path.isfile(d):
                # In a grant brought into a view: Landlock's rule for the
                # view (the private /tmp is the sandbox's, all of it) reaches
                # everything mounted below it, so only a cover keeps it closed.
                mounts.append(MountOp("readonly", d, source=host_mask_file))
            elif any(_under(d, r) for r in regions):
                mounts.append(MountOp("readonly", d))
        mounts.append(MountOp("proc", "/proc", access=proc_access & handled))
        if gpu_runtime:
            # Landlock's grant is the whole procfs: the kernel's own entries
            # in it (PSI triggers in /proc/pressure, mode 0666; the sysctls
            # of the sandbox's own namespaces; whatever else a mode opens)
            # become read-only mounts, so that only the processes' own
            # files can be written.  The child lists them in the procfs it
            # has just mounted (spawn.c).
            mounts.append(MountOp("proc_kernel_ro", "/proc"))
        if os.path.isdir("/dev/pts"):
            # Its own ptys only: the host's terminals stay out of reach.
            mounts.append(MountOp("devpts", "/dev/pts", access=(ll.DEVICE | ll.READ_DIR) & handled))
        if not config.security.allow_gpu:
            # The fresh /proc has the driver's files again: cover them.
            mounts += [MountOp("tmpfs", p) for p in GPU_DRIVER_INFO if os.path.isdir(p)]
        # Parents before children; a view before anything under it.
        view_paths = {v for v, _ in views}
        mounts.sort(key=lambda m: (m.path.rstrip("/").count("/"), m.path not in view_paths))
    else:
        readonly_root = False

    variables = {"PATH": PATH, "HOME": workdir, "TMPDIR": tmp_inside}
    for name, value in os.environ.items():
        if name in PASSED_THROUGH or name.startswith("LC_"):
            variables[name] = value
    for name in config.env_passthrough:
        if name in os.environ:
            variables[name] = os.environ[name]
    if python_env:
        python_env["PATH"] = python_env["PATH"] + os.pathsep + variables["PATH"]
        variables.update(python_env)
    network = not config.network.denies_everything
    if network:
        if env.namespaces:
            proxy_port = PROXY_PORT_INSIDE
        elif not proxy_port:
            raise ValueError("build_plan: a network policy without namespaces needs the host's proxy_port")
        variables.update(proxy_environment(proxy_port, PROXY_USER, proxy_secret))
    else:
        proxy_port = 0
    variables.update(config.env)

    limits = config.limits
    rlimits = [(resource.RLIMIT_CORE, 0, 0)]
    if limits.memory:
        rlimits.append((resource.RLIMIT_DATA, limits.memory, limits.memory))
    if limits.cpu_time:
        seconds = max(1, int(-(-limits.cpu_time // 1)))
        rlimits.append((resource.RLIMIT_CPU, seconds, seconds + 1))
    if limits.file_size:
        rlimits.append((resource.RLIMIT_FSIZE, limits.file_size, limits.file_size))
    if limits.open_files:
        rlimits.append((resource.RLIMIT_NOFILE, limits.open_files, limits.open_files))
    # processes=None: heel's default, where the count is the sandbox's own
    # (its user namespace).  Without one RLIMIT_NPROC counts every process
    # of the user's, so only a limit the config asks for is set there.
    processes = limits.processes or (DEFAULT_PROCESSES if env.namespaces else None)
    if env.namespaces:
        # Pending signals (a queued real-time signal, a POSIX timer) and
        # POSIX message queue bytes are counted for the user at every level
        # of user namespaces up to the host's: unbounded, a sandbox took all
        # of its user's (root's, for root) and sigqueue() failed on the host.
        # Counted in the sandbox's namespace, these bound its share.  (inotify
        # and fanotify: the namespace's maxima, see csrc/spawn.c.)  Without
        # one they would count every process of the user's: not set there.
        for which, share in ((resource.RLIMIT_SIGPENDING, SANDBOX_SIGPENDING),
                             (resource.RLIMIT_MSGQUEUE, SANDBOX_MSGQUEUE)):
            hard = resource.getrlimit(which)[1]  # never above it: raising it would fail the command
            bound = share if hard == resource.RLIM_INFINITY else min(share, hard)
            rlimits.append((which, bound, bound))
    if processes:
        # Counted in the sandbox's user namespace: every command running at
        # the same time, heel-init and each command's init count (the +2 are
        # heel-init and this command's init).
        rlimits.append((resource.RLIMIT_NPROC, processes + 2, processes + 2))

    return SandboxPlan(
        level=level,
        workdir=workdir,
        host_tmp=host_tmp,
        tmp=tmp_inside,
        rules=tuple(rules),
        handled_fs=handled,
        handled_net=ll.handled_net(env.landlock_abi),
        scoped=ll.scopes(env.landlock_abi),
        namespaces=env.namespaces,
        # Abstract unix socket names belong to a network namespace: a
        # sandbox that may make unix sockets binds its names in its own.  At
        # STRICT one always: /proc/net and the interface ioctls (on any
        # socket, a socketpair too) would show the host's connections,
        # listening ports and addresses.
        network_namespace=env.namespaces and (
            level is IsolationLevel.STRICT or not config.network.denies_everything
            or config.security.allow_unix_sockets or gpu_runtime),
        mounts=tuple(mounts),
        readonly_root=readonly_root,
        env=variables,
        rlimits=tuple(rlimits),
        seccomp={
            "allow_unix_sockets": config.security.allow_unix_sockets,
            "allow_unix_seqpacket": gpu_runtime,
            "allow_inet_stream": not config.network.denies_everything,
            "allow_netlink_route": False,
        },
        protected=tuple(denied),
        mountpoints=tuple(mountpoints),
        sandbox_id=sandbox_id,
        proxy_port=proxy_port,
        proxy_secret=proxy_secret if network else "",
    )
