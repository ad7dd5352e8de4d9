"""File-system attacks, each tried for real in a sandbox and checked from the host.

Every attack sits next to a control: the same operation where the policy
allows it (inside the workdir, on an ordinary file, at a laxer level) works,
so a refusal is heel's doing and not a broken test.
"""

from __future__ import annotations

import errno
import os

import pytest

import heel
from conftest import CREDENTIALS, ORDINARY_IN_HOME
from helpers import READ_EACH, explain, make_home_with_secrets, py, snapshot

DEFAULT = heel.IsolationLevel.DEFAULT
STRICT = heel.IsolationLevel.STRICT
PERMISSIVE = heel.IsolationLevel.PERMISSIVE

#: One file operation each: `p` is the target file.  Exit 3 means refused.
FILE_OPS = {
    "write": "open(p, 'w').write('pwned')",
    "append": "open(p, 'a').write('pwned')",
    "create_beside": "open(p + '.new', 'x').write('pwned')",
    "delete": "os.unlink(p)",
    "rename": "os.rename(p, p + '.moved')",
    "rename_into_workdir": "os.rename(p, os.path.join(os.getcwd(), 'stolen'))",
    "truncate": "os.truncate(p, 0)",
    "chmod": "os.chmod(p, 0o600)",
    # To the owner it already has: allowed by the file's owner rights alone.
    "chown": "os.chown(p, os.getuid(), os.getgid())",
    "utime": "os.utime(p, (0, 0))",
    "setxattr": "os.setxattr(p, 'user.heel', b'pwned')",
}

OP_SCRIPT = """
import os, sys
p = sys.argv[1]
try:
    {op}
except OSError as e:
    print('refused', e.errno, e)
    sys.exit(3)
print('done')
"""


def make_target(directory: str) -> str:
    """A file outside the sandbox's reach that its mode would let anyone change."""
    path = os.path.join(directory, "target.txt")
    with open(path, "w") as f:
        f.write("original content\n")
    os.chmod(path, 0o666)
    return path


async def make_own_target(sb) -> str:
    """The control's file: made by the sandbox itself in its workdir, so it is its own."""
    out = await py(sb, "open('target.txt', 'w').write('original content\\n')")
    assert out.returncode == 0, explain(out)
    return os.path.join(sb.workdir, "target.txt")


def observe(directory: str, path: str):
    """The host's view of the target and of its directory."""
    return snapshot(path), sorted(os.listdir(directory))


async def refused_outside_done_inside(sb, script: str, outside_dir: str, outside: str, inside: str) -> None:
    """Run an OP_SCRIPT on the host's file (it must fail, the file and its
    directory unchanged, as the host sees) and, the control, on the
    sandbox's own (it must work and change it)."""
    before = observe(outside_dir, outside)
    attack = await py(sb, script, outside)
    assert attack.returncode == 3, explain(attack)
    assert observe(outside_dir, outside) == before, "the host file or its directory changed"
    before_inside = observe(str(sb.workdir), inside)
    control = await py(sb, script, inside)
    assert control.returncode == 0 and control.stdout.strip() == b"done", explain(control)
    assert observe(str(sb.workdir), inside) != before_inside


def xattrs_supported(directory: str) -> bool:
    probe = os.path.join(directory, ".xattr-probe")
    open(probe, "w").close()
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        os.unlink(probe)


@pytest.mark.parametrize("op", sorted(FILE_OPS))
async def test_file_operation_outside_workdir_is_refused(op, outside_dir):
    if op == "setxattr" and not xattrs_supported(outside_dir):
        pytest.skip("the file system under /var/tmp has no user xattrs")
    script = OP_SCRIPT.format(op=FILE_OPS[op])
    outside = make_target(outside_dir)
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        inside = await make_own_target(sb)
        if op == "setxattr" and not xattrs_supported(str(sb.workdir)):
            pytest.skip("the workdir's file system has no user xattrs")

        await refused_outside_done_inside(sb, script, outside_dir, outside, inside)


@pytest.mark.parametrize("target", ["outside", "workdir"])
async def test_write_through_symlink(target, outside_dir):
    outside = make_target(outside_dir)
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        inside = await make_own_target(sb)
        path = outside if target == "outside" else inside
        before = snapshot(path)
        out = await py(sb, """
            import os, sys
            os.symlink(sys.argv[1], 'link')
            try:
                open('link', 'w').write('pwned')
            except OSError as e:
                print('refused', e.errno, e)
                sys.exit(3)
            """, path)
        if target == "outside":
            assert out.returncode == 3, explain(out)
            assert snapshot(path) == before
        else:
            assert out.returncode == 0, explain(out)
            assert open(path).read() == "pwned"


@pytest.mark.parametrize("target", ["outside", "workdir"])
async def test_create_through_symlinked_directory(target, outside_dir):
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        directory = outside_dir if target == "outside" else os.path.join(sb.workdir, "sub")
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, 0o777)
        before = sorted(os.listdir(directory))
        out = await py(sb, """
            import os, sys
            os.symlink(sys.argv[1], 'dirlink')
            try:
                open('dirlink/planted', 'x').write('pwned')
            except OSError as e:
                print('refused', e.errno, e)
                sys.exit(3)
            """, directory)
        if target == "outside":
            assert out.returncode == 3, explain(out)
            assert sorted(os.listdir(directory)) == before
        else:
            assert out.returncode == 0, explain(out)
            assert open(os.path.join(directory, "planted")).read() == "pwned"


@pytest.mark.parametrize("target", ["outside", "workdir"])
async def test_hardlink_into_workdir(target, outside_dir):
    outside = make_target(outside_dir)
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        inside = await make_own_target(sb)
        path = outside if target == "outside" else inside
        out = await py(sb, """
            import os, sys
            try:
                os.link(sys.argv[1], 'hardlink')
            except OSError as e:
                print('refused', e.errno, e)
                sys.exit(e.errno)
            """, path)
        if target == "outside":
            assert out.returncode in (errno.EXDEV, errno.EACCES, errno.EPERM), explain(out)
            assert os.stat(outside).st_nlink == 1
            assert not os.path.lexists(os.path.join(sb.workdir, "hardlink"))
        else:
            assert out.returncode == 0, explain(out)
            assert os.stat(inside).st_nlink == 2


@pytest.mark.parametrize("level", [STRICT, DEFAULT, PERMISSIVE])
async def test_moves_between_directories_of_writable_places(level, outside_dir):
    """Writing a temporary file and moving it into place (pip, uv, editors)
    works across directories of the workdir and /tmp; moving a file in from
    a read-only place does not."""
    outside = make_target(outside_dir)
    async with heel.Sandbox(heel.SandboxConfig(level=level)) as sb:
        out = await py(sb, """
            import os, sys
            os.makedirs("a/b"); os.makedirs("/tmp/t/u")
            open("a/f", "w").write("x"); open("/tmp/t/g", "w").write("y")
            os.rename("a/f", "a/b/f"); os.rename("/tmp/t/g", "/tmp/t/u/g")
            os.link("a/b/f", "linked")
            print("moved")
            try:
                os.rename(sys.argv[1], "a/stolen")
                print("STOLEN")
            except OSError as e:
                print("refused", e.errno)
            """, outside)
    assert out.stdout.decode().split()[0] == "moved", explain(out)
    if level is PERMISSIVE:
        return  # everything is writable there: the move out is allowed
    assert "STOLEN" not in out.stdout.decode(), explain(out)
    assert os.path.exists(outside)


# ---- credentials and the home directory -------------------------------------

READ_ATTEMPTS = """
import os, sys
home = os.environ['HEEL_FAKE_HOME']
for rel in sys.argv[1:]:
    path = os.path.join(home, rel)
    variants = {
        'direct': path,
        'via /proc/self/root': '/proc/self/root' + path,
        'via dotdot': os.path.join(home, '.config', '..', rel),
    }
    try:
        os.symlink(path, 'sym-' + rel.replace('/', '_'))
        variants['via symlink'] = 'sym-' + rel.replace('/', '_')
    except OSError:
        pass
    for how, candidate in variants.items():
        try:
            data = open(candidate).read()
            print('LEAKED', rel, how, data)
        except OSError as e:
            print('refused', rel, how, e.errno)
    try:
        os.link(path, 'hard-' + rel.replace('/', '_'))
        print('LEAKED', rel, 'hardlink', open('hard-' + rel.replace('/', '_')).read())
    except OSError as e:
        print('refused', rel, 'hardlink', e.errno)
"""


@pytest.mark.parametrize("level", [DEFAULT, PERMISSIVE])
async def test_credentials_are_unreadable(level, fake_home):
    security = heel.SecurityConfig(protect_user_home=False)
    config = heel.SandboxConfig(level=level, security=security, env={"HEEL_FAKE_HOME": fake_home})
    async with heel.Sandbox(config) as sb:
        out = await py(sb, READ_ATTEMPTS, *CREDENTIALS)
        assert out.returncode == 0, explain(out)
        assert b"LEAKED" not in out.stdout and b"heel-secret" not in out.stdout + out.stderr, explain(out)
        for rel in CREDENTIALS:
            assert f"refused {rel} direct".encode() in out.stdout, explain(out)

        # Control: the home itself is readable, only the credentials are closed.
        control = await py(sb, READ_ATTEMPTS, *ORDINARY_IN_HOME)
        assert f"LEAKED notes.txt direct {ORDINARY_IN_HOME['notes.txt']}".encode() in control.stdout, \
            explain(control)


CHANGE_EACH = """
import os, sys
for p in sys.argv[1:]:
    try:
        {op}
        print('CHANGED', p)
    except OSError as e:
        print('refused', p, e.errno)
"""


LIST_DIR = """
import os, sys
try:
    print(sorted(os.listdir(sys.argv[1])))
except OSError as e:
    print('refused', e.errno)
    sys.exit(3)
"""


@pytest.mark.parametrize("protected, security", [
    (".ssh", heel.SecurityConfig(protect_user_home=False)),
    (".aws", heel.SecurityConfig(protect_user_home=False)),
    ("", heel.SecurityConfig()),
])
async def test_protected_directories_cannot_be_listed(protected, security, fake_home):
    """A closed place does not tell the names of what it holds either: listing
    it is refused, or (covered by an empty directory in the mount namespace)
    shows nothing."""
    directory = os.path.join(fake_home, protected)
    assert os.listdir(directory)  # there are names to hide
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT, security=security)) as sb:
        out = await py(sb, LIST_DIR, directory)
        assert out.returncode == 3 or out.stdout == b"[]\n", explain(out)
        for name in os.listdir(directory):
            assert name.encode() not in out.stdout, explain(out)
        # Control: a directory next to it, not protected, lists.
        out = await py(sb, LIST_DIR, os.path.dirname(fake_home))
        assert out.returncode == 0 and b"home" in out.stdout, explain(out)


async def test_credentials_cannot_be_changed_at_permissive(fake_home):
    security = heel.SecurityConfig(protect_user_home=False)
    config = heel.SandboxConfig(level=PERMISSIVE, security=security)
    async with heel.Sandbox(config) as sb:
        paths = [os.path.join(fake_home, rel) for rel in CREDENTIALS]
        before = {p: snapshot(p) for p in paths}
        for op in ("chmod", "write", "truncate", "delete", "utime", "rename", "setxattr"):
            out = await py(sb, CHANGE_EACH.format(op=FILE_OPS[op]), *paths)
            assert out.returncode == 0 and b"CHANGED" not in out.stdout, f"{op}: " + explain(out)
            assert out.stdout.count(b"refused") == len(paths), f"{op}: " + explain(out)
        assert {p: snapshot(p) for p in paths} == before

        # Moving the whole directory aside (then reading it) is no way around.
        ssh = os.path.join(fake_home, ".ssh")
        out = await py(sb, "import os, sys; os.rename(sys.argv[1], sys.argv[1] + '-moved')", ssh)
        assert out.returncode != 0, explain(out)
        assert os.path.isdir(ssh) and not os.path.exists(ssh + "-moved")

        # Control: an ordinary file of the same home is writable at PERMISSIVE.
        notes = os.path.join(fake_home, "notes.txt")
        out = await py(sb, "import sys; open(sys.argv[1], 'w').write('changed')", notes)
        assert out.returncode == 0, explain(out)
        assert open(notes).read() == "changed"


async def test_missing_ssh_dir_cannot_be_created(fake_home_without_ssh):
    home = fake_home_without_ssh
    ssh = os.path.join(home, ".ssh")
    security = heel.SecurityConfig(protect_user_home=False)
    async with heel.Sandbox(heel.SandboxConfig(level=PERMISSIVE, security=security)) as sb:
        out = await py(sb, """
            import os, sys
            ssh = sys.argv[1]
            for attempt in ('mkdir', 'symlink'):
                try:
                    if attempt == 'mkdir':
                        os.makedirs(ssh, exist_ok=True)
                    else:
                        os.symlink(os.getcwd(), ssh)
                    open(os.path.join(ssh, 'authorized_keys'), 'w').write('ssh-ed25519 AAAA attacker')
                    print('PLANTED', attempt)
                except OSError as e:
                    print('refused', attempt, e.errno)
            """, ssh)
        assert out.returncode == 0 and b"PLANTED" not in out.stdout, explain(out)
        assert not os.path.lexists(ssh)
        assert not os.path.exists(os.path.join(sb.workdir, "authorized_keys"))

        # Control: the same home's ordinary file is writable at this level.
        notes = os.path.join(home, "notes.txt")
        out = await py(sb, "import sys; open(sys.argv[1], 'a').write('more')", notes)
        assert out.returncode == 0, explain(out)
        assert open(notes).read().endswith("more")


@pytest.mark.parametrize("protect_user_home", [True, False])
async def test_protect_user_home(protect_user_home, fake_home):
    security = heel.SecurityConfig(protect_user_home=protect_user_home)
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT, security=security)) as sb:
        out = await py(sb, """
            import os, sys
            try:
                print(open(os.path.join(sys.argv[1], 'notes.txt')).read())
                print(sorted(os.listdir(sys.argv[1])))
            except OSError as e:
                print('refused', e.errno)
                sys.exit(3)
            """, fake_home)
        if protect_user_home:
            assert out.returncode == 3 and b"heel-ordinary" not in out.stdout, explain(out)
        else:
            assert out.returncode == 0 and b"heel-ordinary-notes" in out.stdout, explain(out)


METADATA_SCRIPT = """
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def attempt(f):
    try:
        return ['ok', f()]
    except OSError as e:
        return ['refused', e.errno]
def watch(d):
    fd = libc.inotify_init1(0)
    wd = libc.inotify_add_watch(fd, d.encode(), 0x100)  # IN_CREATE: would name new files
    err = ctypes.get_errno()
    os.close(fd)
    if wd < 0:
        raise OSError(err, os.strerror(err))
    return wd
d = sys.argv[1]
print(json.dumps({
    'stat': attempt(lambda: os.stat(d).st_mode & 0),
    'readlink': attempt(lambda: os.readlink(os.path.join(d, 'link'))),
    'xattr': attempt(lambda: os.getxattr(os.path.join(d, 'file.txt'), 'user.heel').decode()),
    'inotify': attempt(lambda: watch(d) * 0),
}))
"""


@pytest.fixture
def top_level_dir():
    """A directory whose top-level directory holds nothing a sandbox is
    given: a new one in / as root, else one under /var/tmp (skipped where
    heel itself or its temporary directories live under /var)."""
    import sys
    import tempfile

    if os.geteuid() == 0:
        path = tempfile.mkdtemp(dir="/", prefix="heel-test-")
    else:
        heels = [os.path.realpath(p) for p in (heel.__file__, sys.prefix, sys.base_prefix, tempfile.gettempdir())]
        if any(p.startswith("/var/") for p in heels):
            pytest.skip("heel or its temporary directories are under /var, which a STRICT sandbox is given")
        path = tempfile.mkdtemp(dir="/var/tmp", prefix="heel-test-")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        import shutil

        shutil.rmtree(path)


def _metadata_fixture(directory: str) -> bool:
    """A file with an xattr (where the file system takes them) and a link."""
    with open(os.path.join(directory, "file.txt"), "w") as f:
        f.write("x")
    os.symlink("heel-link-target", os.path.join(directory, "link"))
    try:
        os.setxattr(os.path.join(directory, "file.txt"), "user.heel", b"heel-xattr-value")
        return True
    except OSError:
        return False


SYS_NAMES = """
import os
for path in ("/sys/class/net/lo", "/sys/module", "/sys/block"):
    try:
        os.lstat(path)
        print(path, "seen", os.readlink(path) if os.path.islink(path) else "")
    except OSError as e:
        print(path, "refused", e.errno)
"""


@pytest.mark.parametrize("level", [STRICT, DEFAULT])
async def test_strict_shows_no_names_in_sys(level):
    """/sys holds nothing a STRICT sandbox is given (without a GPU): its
    names (network interfaces and their PCI paths, block devices, loaded
    modules) are covered like any such top-level directory's.  Control: at
    DEFAULT, which may read /sys, they are seen."""
    if not os.path.exists("/sys/class/net/lo"):
        pytest.skip("no /sys/class/net/lo here")
    config = heel.SandboxConfig(level=level, security=heel.SecurityConfig(allow_gpu=False))
    async with heel.Sandbox(config) as sb:
        out = await py(sb, SYS_NAMES)
    assert out.returncode == 0, explain(out)
    lines = out.stdout.decode().splitlines()
    if level is STRICT:
        assert all(line.split()[1] == "refused" for line in lines), lines
    else:
        assert lines[0].split()[1] == "seen" and "devices/virtual/net/lo" in lines[0], lines


@pytest.mark.parametrize("level", [STRICT, DEFAULT])
async def test_strict_shows_no_metadata_outside_its_view(level, top_level_dir):
    """Landlock mediates opening, not stat(), readlink(), getxattr() or an
    inotify watch (which names the files the host makes in a directory).  At
    STRICT a top-level directory that holds nothing the sandbox is given is
    covered, so none of them reach it.  Controls: the same calls work on the
    same layout in the workdir, and on the directory itself at DEFAULT."""
    import json

    outside = os.path.join(top_level_dir, "inner")  # (the top-level one is the cover's mount point)
    os.mkdir(outside)
    xattrs = _metadata_fixture(outside)
    async with heel.Sandbox(heel.SandboxConfig(level=level)) as sb:
        own = os.path.join(sb.workdir, "own")
        os.mkdir(own)
        own_xattrs = _metadata_fixture(own)
        out = await py(sb, METADATA_SCRIPT, outside)
        assert out.returncode == 0, explain(out)
        seen = json.loads(out.stdout)
        control = await py(sb, METADATA_SCRIPT, own)
        assert control.returncode == 0, explain(control)
        mine = json.loads(control.stdout)
    assert mine["stat"] == ["ok", 0] and mine["readlink"] == ["ok", "heel-link-target"], mine
    assert mine["inotify"] == ["ok", 0], mine
    if own_xattrs:
        assert mine["xattr"] == ["ok", "heel-xattr-value"], mine
    if level is STRICT:
        assert all(result[0] == "refused" for result in seen.values()), seen
    else:
        assert seen["stat"] == ["ok", 0] and seen["readlink"] == ["ok", "heel-link-target"], seen
        assert seen["inotify"] == ["ok", 0], seen
        if xattrs:
            assert seen["xattr"] == ["ok", "heel-xattr-value"], seen


TOP_FILE_SCRIPT = """
import json, os, sys
p = sys.argv[1]
def attempt(f):
    try:
        return ['ok', f()]
    except OSError as e:
        return ['refused', e.errno]
st = os.stat(p)
print(json.dumps({
    'stat': [st.st_size, st.st_ino, int(st.st_mtime)],
    'read': attempt(lambda: open(p, 'rb').read().decode(errors='replace')),
    'xattr': attempt(lambda: os.getxattr(p, 'user.heel').decode()),
}))
"""


@pytest.fixture
def top_level_file():
    """A regular file directly in /: a new one (with content, an xattr where
    the file system takes them, and an old mtime) as root; as another user,
    one that is there already."""
    if os.geteuid() != 0:
        found = [e.path for e in sorted(os.scandir("/"), key=lambda e: e.name)
                 if e.is_file(follow_symlinks=False) and os.stat(e.path).st_size > 0
                 and os.access(e.path, os.R_OK)]
        if not found:
            pytest.skip("no regular file in / to look at, and only root can make one there")
        yield found[0]
        return
    import tempfile

    fd, path = tempfile.mkstemp(dir="/", prefix="heel-test-", suffix=".txt")
    try:
        os.write(fd, b"heel-top-level-content")
        os.close(fd)
        os.chmod(path, 0o644)
        os.utime(path, (1_000_000_000, 1_000_000_000))
        try:
            os.setxattr(path, "user.heel", b"heel-xattr-value")
        except OSError:
            pass
        yield path
    finally:
        os.unlink(path)


@pytest.mark.parametrize("level", [STRICT, DEFAULT])
async def test_strict_covers_the_top_level_files_it_is_not_given(level, top_level_file):
    """Landlock keeps a file from being opened, not from stat() or
    getxattr(): at STRICT a regular file directly in / (the host's own,
    /.dockerenv, a root-made note) is covered by heel's empty read-only
    file, so its size, inode, times and xattrs stay unseen, as for the
    top-level directories.  Control: at DEFAULT, which reads the rest of the
    file system, the same stat() shows the host's size, inode and mtime (and
    the file can be read)."""
    import json

    st = os.stat(top_level_file)
    host = [st.st_size, st.st_ino, int(st.st_mtime)]
    async with heel.Sandbox(heel.SandboxConfig(level=level)) as sb:
        out = await py(sb, TOP_FILE_SCRIPT, top_level_file)
    assert out.returncode == 0, explain(out)
    seen = json.loads(out.stdout)
    if level is STRICT:
        assert seen["stat"][0] == 0 and seen["stat"] != host, (seen, host)
        assert seen["read"][1] in ("", errno.EACCES), seen  # the empty cover, or Landlock
        assert seen["xattr"][0] == "refused", seen
    else:
        assert seen["stat"] == host, (seen, host)
        assert seen["read"][0] == "ok" and len(seen["read"][1]) > 0, seen


@pytest.mark.parametrize("level", [STRICT, DEFAULT])
async def test_strict_sees_only_the_runtime(level, outside_dir):
    secret = os.path.join(outside_dir, "data.txt")
    with open(secret, "w") as f:
        f.write("heel-outside-data")
    os.chmod(secret, 0o644)
    async with heel.Sandbox(heel.SandboxConfig(level=level)) as sb:
        out = await py(sb, """
            import sys
            try:
                print(open(sys.argv[1]).read())
            except OSError as e:
                print('refused', e.errno)
                sys.exit(3)
            """, secret)
        if level is STRICT:
            assert out.returncode == 3 and b"heel-outside-data" not in out.stdout, explain(out)
        else:
            assert out.returncode == 0 and b"heel-outside-data" in out.stdout, explain(out)

        # The system runtime stays usable at every level.
        runtime = "/etc/hostname" if os.path.exists("/etc/hostname") else "/etc/passwd"
        out = await py(sb, "import sys; sys.stdout.write(open(sys.argv[1]).read())", runtime)
        assert out.returncode == 0 and out.stdout == open(runtime, "rb").read(), explain(out)
        out = await sb.command("/usr/bin/env").timeout(20).output()
        assert out.returncode == 0 and b"PATH=" in out.stdout, explain(out)


async def test_writable_grants_one_directory(outside_dir):
    granted = os.path.join(outside_dir, "granted")
    os.mkdir(granted)
    os.chmod(granted, 0o777)
    sibling = make_target(outside_dir)
    before = snapshot(sibling)
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT, writable=[granted])) as sb:
        out = await py(sb, "import sys; open(sys.argv[1], 'w').write('made inside')",
                       os.path.join(granted, "new.txt"))
        assert out.returncode == 0, explain(out)
        assert open(os.path.join(granted, "new.txt")).read() == "made inside"

        out = await py(sb, OP_SCRIPT.format(op=FILE_OPS["write"]), sibling)
        assert out.returncode == 3, explain(out)
        assert snapshot(sibling) == before


@pytest.mark.parametrize("level", [DEFAULT, PERMISSIVE])
async def test_permissive_writes_outside_workdir(level, outside_dir):
    path = os.path.join(outside_dir, "written.txt")
    async with heel.Sandbox(heel.SandboxConfig(level=level)) as sb:
        out = await py(sb, OP_SCRIPT.format(op="open(p, 'w').write('from the sandbox')"), path)
    if level is PERMISSIVE:
        assert out.returncode == 0, explain(out)
        assert open(path).read() == "from the sandbox"
    else:
        assert out.returncode == 3, explain(out)
        assert not os.path.exists(path)


@pytest.mark.parametrize("writable, security", [
    (".ssh", heel.SecurityConfig(protect_user_home=False)),
    (".aws", heel.SecurityConfig(protect_user_home=False)),
    ("", heel.SecurityConfig()),
    (".config/gh", heel.SecurityConfig()),
])
async def test_writable_inside_protected_place_is_a_policy_error(writable, security, fake_home):
    path = os.path.join(fake_home, writable)
    with pytest.raises(heel.PolicyError):
        async with heel.Sandbox(heel.SandboxConfig(writable=[path], security=security)):
            pass


async def test_writable_protected_place_with_protection_off(fake_home):
    """Control for the PolicyError: turning the protections off grants the place."""
    ssh = os.path.join(fake_home, ".ssh")
    security = heel.SecurityConfig(protect_user_home=False, protect_credentials=False)
    async with heel.Sandbox(heel.SandboxConfig(writable=[ssh], security=security)) as sb:
        out = await py(sb, "import sys; open(sys.argv[1], 'w').write('ssh-ed25519 AAAA mine')",
                       os.path.join(ssh, "authorized_keys"))
        assert out.returncode == 0, explain(out)
    assert open(os.path.join(ssh, "authorized_keys")).read() == "ssh-ed25519 AAAA mine"


# ---- /proc of host processes -------------------------------------------------

async def test_proc_of_host_process_is_unreachable(host_sleeper):
    pid = host_sleeper.pid
    # Control on the host: this process's environ does hold the secret.
    assert b"heel-secret-environ" in open(f"/proc/{pid}/environ", "rb").read()
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        out = await py(sb, """
            import os, sys
            pid = sys.argv[1]
            for path, mode in ((f'/proc/{pid}/root/etc/hostname', os.O_RDONLY),
                               (f'/proc/{pid}/mem', os.O_RDWR),
                               (f'/proc/{pid}/mem', os.O_RDONLY),
                               (f'/proc/{pid}/environ', os.O_RDONLY),
                               (f'/proc/{pid}/cwd', os.O_RDONLY | os.O_DIRECTORY)):
                try:
                    fd = os.open(path, mode)
                    print('OPENED', path, os.read(fd, 4096))
                except OSError as e:
                    print('refused', path, e.errno)
            print(open('/proc/self/status').read())
            """, str(pid))
        assert out.returncode == 0, explain(out)
        assert b"OPENED" not in out.stdout and b"heel-secret" not in out.stdout, explain(out)
        # Control: the sandbox reads its own /proc.
        assert b"NoNewPrivs:" in out.stdout, explain(out)
    assert host_sleeper.poll() is None


# ---- identity when heel runs as root -------------------------------------------

@pytest.mark.parametrize("level", [STRICT, DEFAULT])
async def test_root_has_no_owner_rights_over_host_files(root_only, level, outside_dir):
    """Started as root, the sandbox has no capabilities *and* no owner rights:
    a root-owned 0600 file that the level (or a `readable` grant) shows is
    still unreadable, while its 0644 neighbour reads."""
    private = os.path.join(outside_dir, "root-private.txt")
    public = os.path.join(outside_dir, "root-public.txt")
    for path, mode in ((private, 0o600), (public, 0o644)):
        with open(path, "w") as f:
            f.write(f"heel-{os.path.basename(path)}")
        os.chmod(path, mode)
    config = heel.SandboxConfig(level=level, readable=[outside_dir] if level is STRICT else [])
    read = OP_SCRIPT.format(op="print(open(p).read())")
    async with heel.Sandbox(config) as sb:
        out = await py(sb, read, private)
        assert out.returncode == 3 and b"heel-root-private" not in out.stdout, explain(out)
        assert out.stdout.startswith(f"refused {errno.EACCES}".encode()), explain(out)
        # Control: the file next to it, readable by its mode, reads.
        out = await py(sb, read, public)
        assert out.returncode == 0 and b"heel-root-public.txt" in out.stdout, explain(out)


async def test_root_keeps_owner_rights_at_permissive(root_only, outside_dir):
    """PERMISSIVE means writing everywhere: started by root it runs as root
    (still without capabilities), so root's own files are its own there."""
    private = os.path.join(outside_dir, "root-private.txt")
    with open(private, "w") as f:
        f.write("heel-root-private")
    os.chmod(private, 0o600)
    async with heel.Sandbox(heel.SandboxConfig(level=PERMISSIVE)) as sb:
        out = await py(sb, OP_SCRIPT.format(op="print(open(p).read()); os.chmod(p, 0o640)"), private)
    assert out.returncode == 0 and b"heel-root-private" in out.stdout, explain(out)
    assert os.stat(private).st_mode & 0o777 == 0o640


# ---- standard streams that are host files ---------------------------------

TAMPER_STDOUT = ("chmod 777 /proc/self/fd/1; "
                 "python3 -c 'import os; os.ftruncate(1, 0); os.utime(\"/proc/self/fd/1\", (0, 0))'; "
                 "echo after")

SANDBOX_TO_FILE = """
import sys, trio, heel
async def main():
    async with heel.Sandbox() as sb:
        status = await sb.command("sh").args(["-c", sys.argv[1]]).status()
        print("status", status.returncode, file=sys.stderr)
trio.run(main)
"""


@pytest.mark.parametrize("via", ["cli", "api"])
def test_inherited_file_stdout_cannot_be_tampered_with(outside_dir, via):
    """A host file given as stdout reaches the command only through a pipe:
    through /proc/self/fd/1 the command cannot chmod, truncate or utime it.
    Control: what it writes still lands in the file."""
    import subprocess
    import sys

    log = os.path.join(outside_dir, "log.txt")
    with open(log, "w") as f:
        f.write("kept line\n")
    os.chmod(log, 0o600)
    before = os.stat(log)
    argv = ([sys.executable, "-m", "heel", "run", "--", "sh", "-c", TAMPER_STDOUT] if via == "cli"
            else [sys.executable, "-c", SANDBOX_TO_FILE, TAMPER_STDOUT])
    with open(log, "a") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, timeout=60)
    after = os.stat(log)
    with open(log) as f:
        content = f.read()
    assert content == "kept line\nafter\n", (content, done.stderr)
    assert after.st_mode == before.st_mode and after.st_mtime >= before.st_mtime, done.stderr


@pytest.mark.parametrize("level", [DEFAULT, PERMISSIVE])
async def test_a_spawn_error_tells_nothing_of_a_protected_file(level, fake_home):
    """heel explains an ENOENT from execve() by reading the program's #!
    line on the host.  For a program the sandbox cannot see (in a protected
    place), that would show its first line, and tell whether a host path
    exists: the command line may be a model's.  Control: a script in the
    workdir with the same #! line is explained."""
    secret = os.path.join(fake_home, ".ssh", "heel-script")
    with open(secret, "w") as f:
        f.write("#!/heel-secret-first-line\necho hi\n")
    os.chmod(secret, 0o755)
    async with heel.Sandbox(heel.SandboxConfig(level=level)) as sb:
        with pytest.raises(heel.SpawnError) as hidden:
            await sb.command(secret).output()
        # The same through a link the sandbox makes in its workdir: a name
        # under the workdir, which the host would have followed.
        out = await sb.command("ln").args(["-s", os.path.dirname(secret), "l"]).output()
        assert out.returncode == 0, explain(out)
        with pytest.raises(heel.SpawnError) as linked:
            await sb.command(os.path.join(sb.workdir, "l", "heel-script")).output()
        own = os.path.join(sb.workdir, "script")
        with open(own, "w") as f:
            f.write("#!/heel-secret-first-line\necho hi\n")
        os.chmod(own, 0o755)
        with pytest.raises(heel.SpawnError) as seen:
            await sb.command(own).output()
    for error in (hidden.value, linked.value):
        assert "heel-secret-first-line" not in str(error), error
        assert isinstance(error, heel.CommandNotFound)  # what the sandbox sees: nothing there
    assert "its interpreter '/heel-secret-first-line' does not exist" in str(seen.value), seen.value


async def test_strict_keeps_the_way_a_grant_was_named_through_a_link(root_only):
    """A grant named through a link in another top-level directory
    (/var/run/docker.sock, which is /run/docker.sock) is resolved, and STRICT
    covered the directory that holds the link: the name the command uses was
    gone.  Control: a directory of the same kind that no grant names is
    covered (nothing in it can be seen)."""
    import shutil
    import tempfile

    named = tempfile.mkdtemp(dir="/", prefix="heel-test-named-")
    data = tempfile.mkdtemp(dir="/", prefix="heel-test-data-")
    other = tempfile.mkdtemp(dir="/", prefix="heel-test-other-")
    try:
        for d in (named, data, other):
            os.chmod(d, 0o755)
        with open(os.path.join(data, "f"), "w") as f:
            f.write("heel-through-a-link\n")
        os.chmod(os.path.join(data, "f"), 0o644)
        os.symlink(data, os.path.join(named, "link"))
        os.symlink(data, os.path.join(other, "link"))
        config = heel.SandboxConfig(level=STRICT, readable=[os.path.join(named, "link")])
        async with heel.Sandbox(config) as sb:
            out = await py(sb, "import sys; print(open(sys.argv[1]).read(), end='')", os.path.join(named, "link", "f"))
            covered = await py(sb, "import os, sys; print(os.path.lexists(sys.argv[1]))", os.path.join(other, "link"))
        assert out.returncode == 0 and out.stdout == b"heel-through-a-link\n", explain(out)
        assert covered.stdout == b"False\n", explain(covered)
    finally:
        for d in (named, data, other):
            shutil.rmtree(d)


def test_the_hosts_look_at_a_shebang_follows_no_link_on_the_way(outside_dir):
    """heel reads a program's #! line on the host to explain an ENOENT.
    The caller checks that the path has no link in it, but a command could
    swap a directory on the way for a link between that check and the read:
    the read itself goes from / without following one.  Control: the real
    path is read."""
    from heel import errors

    real = os.path.join(outside_dir, "real")
    os.mkdir(real)
    with open(os.path.join(real, "tool"), "w") as f:
        f.write("#!/heel-no-such-dir/interp\n")
    os.symlink(real, os.path.join(outside_dir, "link"))
    assert errors._shebang(os.path.join(real, "tool")) == "/heel-no-such-dir/interp"
    assert errors._shebang(os.path.join(outside_dir, "link", "tool")) is None
    assert errors._exists_nofollow(os.path.join(outside_dir, "link", "tool"))  # not said to be missing
    assert not errors._exists_nofollow(os.path.join(real, "missing"))
    assert not errors._exists_nofollow("/heel-no-such-dir/interp")


# ---- every protected place, home and system ------------------------------------------------

#: The places the README promises to keep closed, written out here (not taken
#: from heel._plan, whose lists a test cannot check by iterating over them):
#: path -> a file in it (a directory) or None (the place is a file).
REQUIRED_IN_HOME = {
    ".ssh": "id_ed25519", ".gnupg": "private-keys-v1.d/k.key", ".netrc": None,
    ".git-credentials": None, ".pypirc": None, ".npmrc": None, ".docker/config.json": None,
    ".cargo/credentials": None, ".cargo/credentials.toml": None, ".config/gh": "hosts.yml",
    ".bash_history": None, ".zsh_history": None, ".python_history": None,
    ".local/share/keyrings": "login.keyring",
    ".aws": "credentials", ".azure": "accessTokens.json", ".config/gcloud": "credentials.db",
    ".kube": "config", ".oci": "oci_api_key.pem",
}
#: heel's own lists may hold more: each is tried as well, as a directory when
#: its name says so, else as a file.
_DIRECTORY_PLACES = {
    ".password-store", ".gnome2/keyrings", ".config/doctl", ".mongosh", ".git-credential-cache",
    ".config/op", ".local/share/python_keyring", ".mozilla", ".thunderbird",
    ".config/google-chrome", ".config/chromium", ".config/BraveSoftware", ".config/rclone",
    ".config/openstack", ".config/hcloud", ".aliyun", ".bluemix", ".config/scw", ".fly",
}


def _protected_in_home() -> dict[str, str | None]:
    from heel._plan import CLOUD_IN_HOME, CREDENTIALS_IN_HOME

    places = dict(REQUIRED_IN_HOME)
    for rel in (*CREDENTIALS_IN_HOME, *CLOUD_IN_HOME):
        places.setdefault(rel, "secret" if rel in _DIRECTORY_PLACES else None)
    return places


@pytest.mark.parametrize("level", [DEFAULT, PERMISSIVE])
async def test_every_protected_place_in_home_is_unreadable(level, outside_dir, monkeypatch):
    """Every credential and cloud configuration place heel keeps closed in
    the home (the README's list, and whatever else heel's own lists hold),
    with the home itself open (protect_user_home=False): reading the secret
    in each is refused.  Control: a file next to each place is read."""
    home, secrets, ordinary = make_home_with_secrets(outside_dir, _protected_in_home())
    monkeypatch.setenv("HOME", home)
    security = heel.SecurityConfig(protect_user_home=False)
    async with heel.Sandbox(heel.SandboxConfig(level=level, security=security)) as sb:
        out = await py(sb, READ_EACH, *secrets, *ordinary)
    assert out.returncode == 0, explain(out)
    lines = out.stdout.decode().splitlines()
    leaked = [rel for rel, content in ((os.path.relpath(p, home), c) for p, c in secrets.items())
              if content.encode() in out.stdout]
    assert leaked == [], f"read inside the sandbox: {leaked}\n" + explain(out)
    for path in secrets:
        assert any(line.startswith(f"refused {path} ") for line in lines), (path, explain(out))
    # Control: the ordinary file beside each place is read, whole.
    for path in ordinary:
        content = open(path).read()
        assert f"READ {path} {content}" in lines, (path, explain(out))


#: Places the user's environment moves out of the home: variable -> (value
#: relative to the test's directory, the secret's path relative to it).
MOVED = {
    "GNUPGHOME": ("gpg", "private-keys-v1.d/k.key"),
    "DOCKER_CONFIG": ("docker", "config.json"),
    "CARGO_HOME": ("cargo", "credentials.toml"),
    "AWS_SHARED_CREDENTIALS_FILE": ("aws-credentials", ""),
    "CLOUDSDK_CONFIG": ("gcloud", "credentials.db"),
    "XDG_CONFIG_HOME": ("xdg-config", "gh/hosts.yml"),
    "XDG_DATA_HOME": ("xdg-data", "keyrings/login.keyring"),
    "XDG_RUNTIME_DIR": ("run-user", "containers/auth.json"),
}


@pytest.mark.parametrize("level", [DEFAULT, PERMISSIVE])
async def test_places_the_environment_moves_are_closed_too(level, outside_dir, monkeypatch):
    """GNUPGHOME, DOCKER_CONFIG, XDG_CONFIG_HOME and the like move a tool's
    secrets out of the home: there too the sandbox reads none of them.  Each
    secret lies under /var/tmp, which the level opens; controls: a file
    beside each moved place is read, and with the protections off the
    secrets are too (it is the protection that closes them)."""
    secrets, ordinary = {}, []
    for n, (variable, (value, inner)) in enumerate(sorted(MOVED.items())):
        place = os.path.join(outside_dir, "moved", value)
        secret = os.path.join(place, inner) if inner else place
        os.makedirs(os.path.dirname(secret), exist_ok=True)
        with open(secret, "w") as f:
            f.write(f"heel-moved-{n}")
        secrets[secret] = f"heel-moved-{n}"
        beside = os.path.join(outside_dir, "moved", f"beside-{n}")
        with open(beside, "w") as f:
            f.write(f"heel-beside-{n}")
        ordinary.append(beside)
        monkeypatch.setenv(variable, place)
    # KUBECONFIG is a list: its second file counts as much as its first.
    kube = [os.path.join(outside_dir, "moved", name) for name in ("kube-a", "kube-b")]
    for n, path in enumerate(kube):
        with open(path, "w") as f:
            f.write(f"heel-kube-{n}")
        secrets[path] = f"heel-kube-{n}"
    monkeypatch.setenv("KUBECONFIG", ":".join(kube))
    for root, _, files in os.walk(outside_dir):
        os.chmod(root, 0o777)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666)

    for protect in (True, False):
        security = heel.SecurityConfig(protect_user_home=False, protect_credentials=protect,
                                       protect_cloud_config=protect)
        async with heel.Sandbox(heel.SandboxConfig(level=level, security=security)) as sb:
            out = await py(sb, READ_EACH, *secrets, *ordinary)
        assert out.returncode == 0, explain(out)
        lines = out.stdout.decode().splitlines()
        for path, content in secrets.items():
            if protect:
                assert content.encode() not in out.stdout, (path, explain(out))
                assert any(line.startswith(f"refused {path} ") for line in lines), (path, explain(out))
            else:
                assert f"READ {path} {content}" in lines, (path, explain(out))
        for path in ordinary:
            assert f"READ {path} {open(path).read()}" in lines, (path, explain(out))


@pytest.mark.parametrize("value", ["/", "/usr", "/usr/lib", "/dev/null"])
async def test_a_moved_place_that_holds_the_system_is_not_closed(value, monkeypatch):
    """GNUPGHOME=/ would close the whole system: such a value is ignored, as
    a home there is, as is one in the programs' part of the system, and
    commands still run."""
    monkeypatch.setenv("GNUPGHOME", value)
    monkeypatch.setenv("XDG_CONFIG_HOME", value)
    monkeypatch.setenv("HISTFILE", value)  # HISTFILE=/dev/null is a common idiom
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT)) as sb:
        out = await py(sb, "import os; print(sorted(os.listdir('/usr'))[:1]); open('/dev/null', 'w').write('x')")
    assert out.returncode == 0, explain(out)


def test_moved_places_follow_the_protections(monkeypatch):
    """Which protection each moved place belongs to, and what is ignored
    (relative values, empty list elements)."""
    from heel._plan import _moved_places

    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("GNUPGHOME", "/srv/gpg")
    monkeypatch.setenv("KUBECONFIG", "/srv/k1::relative/k:/srv/k2")
    monkeypatch.setenv("XDG_CONFIG_HOME", "/srv/cfg")
    both = _moved_places(heel.SecurityConfig())
    assert {"/srv/gpg", "/srv/k1", "/srv/k2", "/srv/cfg/gh", "/srv/cfg/gcloud"} <= set(both)
    assert not [p for p in both if not os.path.isabs(p)]
    credentials = _moved_places(heel.SecurityConfig(protect_cloud_config=False))
    assert "/srv/gpg" in credentials and "/srv/cfg/gh" in credentials
    assert "/srv/k1" not in credentials and "/srv/cfg/gcloud" not in credentials
    cloud = _moved_places(heel.SecurityConfig(protect_credentials=False))
    assert "/srv/k1" in cloud and "/srv/cfg/gcloud" in cloud and "/srv/gpg" not in cloud
    assert _moved_places(heel.SecurityConfig(protect_credentials=False, protect_cloud_config=False)) == []
    # In /etc, where an administrator's kubeconfig lives, a place counts;
    # in the programs' part of the system, or holding the system, it does not.
    from heel._plan import MOVED_BY_ENVIRONMENT

    for variable, _, _ in MOVED_BY_ENVIRONMENT:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("KUBECONFIG", "/etc/kubernetes/admin.conf:/usr/lib/k:/:/etc:/srv/..:/bin")
    assert _moved_places(heel.SecurityConfig()) == ["/etc/kubernetes/admin.conf"]


def _system_credentials() -> list[str]:
    """The system's credential files present here: the README's, and those
    of heel's own list (its globs expanded); a directory's files too."""
    from heel._plan import SYSTEM_CREDENTIALS, _existing

    found = []
    for path in sorted({"/etc/shadow", "/etc/gshadow", "/etc/sudoers", *_existing(SYSTEM_CREDENTIALS)}):
        if os.path.isdir(path):
            found += [os.path.join(path, name) for name in sorted(os.listdir(path))
                      if os.path.isfile(os.path.join(path, name))]
        elif os.path.isfile(path):
            found.append(path)
    return found


@pytest.mark.parametrize("level", [STRICT, DEFAULT, PERMISSIVE])
async def test_the_systems_credentials_are_unreadable_by_roots_sandbox(root_only, level):
    """/etc/shadow and its kind, which root reads on the host: root's sandbox
    (at PERMISSIVE the real uid 0, which owns them) reads none.  Control:
    /etc/passwd, beside them, is read."""
    paths = _system_credentials()
    if "/etc/shadow" not in paths:
        pytest.skip("this system has no /etc/shadow")
    for path in paths:  # the host's control: root reads each one
        open(path, "rb").close()
    async with heel.Sandbox(heel.SandboxConfig(level=level)) as sb:
        out = await py(sb, """
            import sys
            for path in sys.argv[1:]:
                try:
                    data = open(path, 'rb').read()
                    print('READ', path, len(data), flush=True)
                except OSError as e:
                    print('refused', path, e.errno, flush=True)
            """, "/etc/passwd", *paths)
    assert out.returncode == 0, explain(out)
    lines = out.stdout.decode().splitlines()
    assert lines[0] == f"READ /etc/passwd {os.path.getsize('/etc/passwd')}", explain(out)
    assert [line.split()[1] for line in lines[1:] if not line.startswith("refused ")] == [], explain(out)
    assert len(lines) == 1 + len(paths), explain(out)


def test_protected_places_resolve_as_realpath_does(tmp_path):
    """protected_paths resolves each place with heel._plan._realpath, which
    keeps the parents it resolved: it must give what os.path.realpath gives,
    through links absolute and relative, chained, dangling, looping and
    through files, for every path of a tree made of them."""
    from heel._plan import _realpath

    root = tmp_path / "t"
    (root / "home" / ".config" / "gh").mkdir(parents=True)
    (root / "elsewhere" / "cfg").mkdir(parents=True)
    (root / "home" / "file").write_text("x")
    links = {
        "home/.aws": "../elsewhere",                     # relative
        "home/.kube": str(root / "elsewhere" / "cfg"),   # absolute
        "home/.chain": ".aws",                           # a link to a link
        "home/.dangling": "no-such-place",
        "home/.loop": ".loop2", "home/.loop2": ".loop",
        "home/.config/git": "../../elsewhere/cfg/..",    # up again after a link
        "elsewhere/cfg/up": "../../home",                # back into the home
        "home/.through-file": "file/inside",
    }
    for link, target in links.items():
        os.symlink(target, root / link)
    names = ["", "x", "gh", "git", "credentials", "cfg", "up", ".aws", "inside", ".config"]
    starts = [root / "home" / p for p in (".aws", ".kube", ".chain", ".dangling", ".loop", ".config",
                                          ".config/git", ".config/gh", "file", ".through-file", "missing")]
    starts += [root / "elsewhere" / "cfg" / "up"]
    paths = {os.path.normpath(os.path.join(str(start), a, b)) for start in starts for a in names for b in names}
    resolved: dict[str, str] = {}
    differ = [(p, _realpath(p, resolved), os.path.realpath(p)) for p in sorted(paths)
              if _realpath(p, resolved) != os.path.realpath(p)]
    assert differ == []
    assert len(paths) > 500
