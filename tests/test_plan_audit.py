"""Properties of the file system plan (heel/_plan.py) that a mutation audit
found no test for: each weakening of the plan that these tests catch left
the rest of the suite passing.

Every test attempts the forbidden thing for real in a real sandbox and
looks from the host, next to a control where the policy allows the same.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

import heel
from conftest import make_home
from helpers import READ_EACH, explain, make_home_with_secrets, py

DEFAULT = heel.IsolationLevel.DEFAULT
STRICT = heel.IsolationLevel.STRICT
PERMISSIVE = heel.IsolationLevel.PERMISSIVE


def _lines(out) -> list[str]:
    return out.stdout.decode().splitlines()


# ---- shell and REPL histories, keyrings: the README's words, written out ----

#: "shell and REPL histories, keyrings" (README): the places of the common
#: shells and REPLs, written out here rather than taken from heel's list,
#: so that one dropped from that list is missed.  path -> a file in it (a
#: directory) or None (the place is a file).
HISTORIES_AND_KEYRINGS = {
    ".bash_history": None, ".zsh_history": None, ".sh_history": None, ".history": None,
    ".python_history": None, ".node_repl_history": None, ".psql_history": None,
    ".mysql_history": None, ".local/share/fish/fish_history": None,
    ".local/share/keyrings": "login.keyring", ".gnome2/keyrings": "default.keyring",
}


@pytest.mark.parametrize("level", [DEFAULT, PERMISSIVE])
async def test_every_shell_history_and_keyring_is_unreadable(level, outside_dir, monkeypatch):
    home, secrets, ordinary = make_home_with_secrets(outside_dir, HISTORIES_AND_KEYRINGS)
    monkeypatch.setenv("HOME", home)
    security = heel.SecurityConfig(protect_user_home=False)
    async with heel.Sandbox(heel.SandboxConfig(level=level, security=security)) as sb:
        out = await py(sb, READ_EACH, *secrets, *ordinary)
    assert out.returncode == 0, explain(out)
    assert b"heel-secret" not in out.stdout, explain(out)
    for path in secrets:
        assert any(line.startswith(f"refused {path} ") for line in _lines(out)), (path, explain(out))
    for path in ordinary:  # the control: the file beside each place is read
        assert f"READ {path} {open(path).read()}" in _lines(out), (path, explain(out))


# ---- the system's credentials that this machine may not have -------------------

@pytest.fixture
def system_secrets(root_only):
    """An SSH host key in /etc/ssh and a private key in /etc/ssl/private,
    made for the test (this machine may have none) and removed after it;
    readable by everyone, so that only heel stands in the way.  Beside the
    host key, its public half: the control."""
    made, suffix = [], os.urandom(4).hex()
    if os.path.isdir("/etc/ssh"):
        made += [f"/etc/ssh/ssh_host_heeltest{suffix}_key", f"/etc/ssh/ssh_host_heeltest{suffix}_key.pub"]
    if os.path.isdir("/etc/ssl/private"):
        made.append(f"/etc/ssl/private/heel-test-{suffix}.key")
    if not made:
        pytest.skip("this system has neither /etc/ssh nor /etc/ssl/private")
    try:
        for path in made:
            with open(path, "w") as f:
                f.write(f"heel-{'public' if path.endswith('.pub') else 'secret'}-{os.path.basename(path)}")
            os.chmod(path, 0o644)
        yield [p for p in made if not p.endswith(".pub")], [p for p in made if p.endswith(".pub")]
    finally:
        for path in made:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


@pytest.mark.parametrize("level", [STRICT, DEFAULT, PERMISSIVE])
async def test_ssh_host_keys_and_ssl_private_keys_are_unreadable(level, system_secrets):
    """The README's "SSH host keys" (and /etc/ssl/private): root's sandbox
    reads none, at PERMISSIVE either (the real uid 0).  Control: the public
    half beside the host key, and /etc/passwd, are read.  At STRICT and
    DEFAULT /etc/ssl/private itself (0710 on Debian) may keep the sandbox's
    uid out: the key must be refused either way, it is never read."""
    secrets, public = system_secrets
    async with heel.Sandbox(heel.SandboxConfig(level=level)) as sb:
        out = await py(sb, READ_EACH, "/etc/passwd", *public, *secrets)
    assert out.returncode == 0, explain(out)
    lines = _lines(out)
    assert lines[0].startswith("READ /etc/passwd "), explain(out)
    for path in public:
        assert f"READ {path} heel-public-{os.path.basename(path)}" in lines, explain(out)
    assert b"heel-secret" not in out.stdout, explain(out)
    for path in secrets:
        assert any(line.startswith(f"refused {path} ") for line in lines), (path, explain(out))


# ---- a home reached through a symbolic link ------------------------------------

@pytest.mark.parametrize("level", [DEFAULT, PERMISSIVE])
async def test_credentials_of_a_home_named_through_a_link_are_unreadable(level, outside_dir, monkeypatch):
    """$HOME names the home through a symbolic link (/home -> /var/home on
    some systems): the credentials stay closed by the link's name and by the
    real one.  Control: an ordinary file of the home is read both ways."""
    real = make_home(outside_dir)
    link = os.path.join(outside_dir, "home-link")
    os.symlink(real, link)
    monkeypatch.setenv("HOME", link)
    names = [".netrc", ".ssh/id_rsa", ".bash_history", ".aws/credentials"]
    security = heel.SecurityConfig(protect_user_home=False)
    async with heel.Sandbox(heel.SandboxConfig(level=level, security=security)) as sb:
        out = await py(sb, READ_EACH, *(os.path.join(base, name) for base in (link, real)
                                         for name in [*names, "notes.txt"]))
    assert out.returncode == 0, explain(out)
    assert b"heel-secret" not in out.stdout, explain(out)
    lines = _lines(out)
    for base in (link, real):
        for name in names:
            path = os.path.join(base, name)
            assert any(line.startswith(f"refused {path} ") for line in lines), (path, explain(out))
        assert f"READ {os.path.join(base, 'notes.txt')} heel-ordinary-notes" in lines, explain(out)


# ---- two homes whose names share a prefix ---------------------------------------

@pytest.fixture
def home_beside_passwd_home(root_only, monkeypatch):
    """$HOME a sibling of the password database's home whose name begins
    with it (/root and /root-heel-test-..., like /home/al and /home/alice):
    both are protected places."""
    import pwd

    passwd_home = os.path.abspath(pwd.getpwuid(0).pw_dir)
    if passwd_home == "/" or not os.path.isdir(passwd_home):
        pytest.skip("root's home from the password database is no directory of its own")
    base = tempfile.mkdtemp(dir=os.path.dirname(passwd_home), prefix=os.path.basename(passwd_home) + "-heel-test-")
    try:
        os.chmod(base, 0o755)
        for name, content in ((".netrc", "machine x password heel-secret-netrc\n"), ("notes.txt", "notes\n")):
            with open(os.path.join(base, name), "w") as f:
                f.write(content)
        monkeypatch.setenv("HOME", base)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_a_home_whose_name_extends_another_homes_stays_unchangeable(home_beside_passwd_home, outside_dir):
    """At PERMISSIVE root's sandbox is the real uid 0 and Landlock does not
    mediate chmod: the protected home is covered in the mount namespace.
    A second home whose name merely begins with the first's (/root and
    /root-...) is a place of its own and is covered too.  Control: the same
    chmod on an ordinary file outside works at this level."""
    home = home_beside_passwd_home
    secret = os.path.join(home, ".netrc")
    ordinary = os.path.join(outside_dir, "ordinary")
    with open(ordinary, "w") as f:
        f.write("x")
    before = os.stat(secret)
    async with heel.Sandbox(heel.SandboxConfig(level=PERMISSIVE)) as sb:
        out = await py(sb, """
            import os, sys
            for path in sys.argv[1:]:
                try:
                    os.chmod(path, 0o600)
                    os.utime(path, (0, 0))
                    print('CHANGED', path, flush=True)
                except OSError as e:
                    print('refused', path, e.errno, flush=True)
            """, secret, ordinary)
    lines = _lines(out)
    assert f"CHANGED {ordinary}" in lines, explain(out)
    assert any(line.startswith(f"refused {secret} ") for line in lines), explain(out)
    after = os.stat(secret)
    assert (after.st_mode, after.st_mtime_ns, after.st_ctime_ns) == (before.st_mode, before.st_mtime_ns,
                                                                     before.st_ctime_ns)


# ---- a workdir swapped for a link after the config was made ---------------------

async def test_a_workdir_swapped_for_a_link_after_the_config_was_made_is_refused(outside_dir):
    """The config resolves its workdir when it is made; something that may
    write the directory above it can replace it with a link to elsewhere
    before the sandbox opens, which would then make the link's target
    writable.  Control: the same config opens and writes before the swap."""
    workdir = os.path.join(outside_dir, "work")
    elsewhere = os.path.join(outside_dir, "elsewhere")
    for path in (workdir, elsewhere):
        os.mkdir(path)
        os.chmod(path, 0o777)
    config = heel.SandboxConfig(level=DEFAULT, workdir=workdir)
    async with heel.Sandbox(config) as sb:
        out = await py(sb, "open('mine', 'w').write('x')")
    assert out.returncode == 0 and os.path.exists(os.path.join(workdir, "mine")), explain(out)
    os.rename(workdir, workdir + ".moved")
    os.symlink(elsewhere, workdir)
    try:
        async with heel.Sandbox(config) as sb:
            await py(sb, "open('planted', 'w').write('x')")
    except heel.PolicyError as exc:
        assert "now leads to" in str(exc)
    else:
        pytest.fail("the sandbox opened on a workdir swapped for a link")
    assert os.listdir(elsewhere) == []


# ---- a writable place in the private /tmp that holds a protected one -------------

async def test_a_writable_place_in_tmp_that_holds_a_home_cannot_plant_ssh_keys(monkeypatch):
    """A writable path under /tmp is brought into the sandbox's private /tmp,
    whose Landlock rule (it is the sandbox's, all of it) reaches everything
    mounted below: a home in it, without ~/.ssh, would get one planted.
    heel refuses the config.  Control: the same place without the home in
    it is granted and written."""
    base = tempfile.mkdtemp(dir="/tmp", prefix="heel-test-")
    try:
        os.chmod(base, 0o777)
        home = os.path.join(base, "home")
        os.mkdir(home)
        os.chmod(home, 0o777)
        ssh = os.path.join(home, ".ssh")
        security = heel.SecurityConfig(protect_user_home=False)
        plant = """
            import os, sys
            try:
                os.makedirs(sys.argv[1], exist_ok=True)
                open(os.path.join(sys.argv[1], 'authorized_keys'), 'w').write('ssh-ed25519 AAAA attacker')
                print('PLANTED')
            except OSError as e:
                print('refused', e.errno)
            """
        monkeypatch.setenv("HOME", home)
        config = heel.SandboxConfig(level=DEFAULT, security=security, writable=[base])
        opened = None
        try:
            async with heel.Sandbox(config) as sb:
                opened = await py(sb, plant, ssh)
        except heel.PolicyError as exc:
            assert "holds the protected place" in str(exc)
        assert not os.path.lexists(ssh), explain(opened) if opened else "planted"
        assert opened is None, "the sandbox opened with a writable place in /tmp that holds a home"

        # Control: with $HOME elsewhere the same grant works, writes land on the host.
        monkeypatch.setenv("HOME", "/nonexistent-heel-test-home")
        config = heel.SandboxConfig(level=DEFAULT, security=security, writable=[base])
        async with heel.Sandbox(config) as sb:
            out = await py(sb, plant, ssh)
        assert out.stdout.strip() == b"PLANTED", explain(out)
        assert os.path.exists(os.path.join(ssh, "authorized_keys"))
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---- a directory heel cannot list, on the way to a protected place ---------------

async def test_a_directory_heel_cannot_list_is_not_granted_whole(outside_dir, monkeypatch):
    """heel keeps a protected place out of a grant by granting the entries
    around it, one by one: where it cannot list a directory on the way (mode
    0311: searchable, not readable) it grants none of them, never the
    directory whole.  Root lists every directory, so this runs unprivileged
    (the CI's run as nobody).  Control: a file beside that directory is read."""
    if os.geteuid() == 0:
        pytest.skip("root lists every directory: heel's walk never fails there")
    locked = os.path.join(outside_dir, "locked")
    os.mkdir(locked)
    home = make_home(locked)
    os.chmod(locked, 0o311)
    beside = os.path.join(outside_dir, "beside.txt")
    with open(beside, "w") as f:
        f.write("heel-ordinary-beside")
    monkeypatch.setenv("HOME", home)
    security = heel.SecurityConfig(protect_user_home=False)
    try:
        async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT, security=security)) as sb:
            out = await py(sb, READ_EACH, beside, os.path.join(home, ".netrc"),
                           os.path.join(home, ".bash_history"))
    finally:
        os.chmod(locked, 0o755)
    assert f"READ {beside} heel-ordinary-beside" in _lines(out), explain(out)
    assert b"heel-secret" not in out.stdout, explain(out)


# ---- protected places in a grant brought under the cover of $TMPDIR's place -------

async def test_credentials_in_a_grant_under_tmpdirs_cover_stay_closed(outside_dir, monkeypatch):
    """With $TMPDIR elsewhere than /tmp, heel covers it with an empty
    directory of the sandbox's own, and brings back the paths granted under
    it.  A home among them keeps its credentials.  (Two layers hold here:
    the plan's covers over the protected places, and Landlock, which walks
    the mount tree, so the cover's directory lends no right to what is
    mounted below it; taking away either alone leaves this passing.)
    Control: the home's ordinary file is read there."""
    tmpdir = os.path.join(outside_dir, "tmpdir")
    os.mkdir(tmpdir)
    os.chmod(tmpdir, 0o1777)
    proj = os.path.join(tmpdir, "proj")
    os.mkdir(proj)
    os.chmod(proj, 0o777)
    home = make_home(proj)
    monkeypatch.setenv("TMPDIR", tmpdir)
    monkeypatch.setenv("HOME", home)
    security = heel.SecurityConfig(protect_user_home=False)
    async with heel.Sandbox(heel.SandboxConfig(level=DEFAULT, security=security, readable=[proj])) as sb:
        assert os.path.dirname(os.path.dirname(str(sb.workdir))) == tmpdir
        out = await py(sb, READ_EACH, os.path.join(home, "notes.txt"),
                       *(os.path.join(home, name) for name in (".netrc", ".bash_history", ".ssh/id_rsa",
                                                               ".aws/credentials")))
    assert f"READ {os.path.join(home, 'notes.txt')} heel-ordinary-notes" in _lines(out), explain(out)
    assert b"heel-secret" not in out.stdout, explain(out)


# ---- the host's terminals -----------------------------------------------------------

@pytest.mark.parametrize("level", [STRICT, DEFAULT, PERMISSIVE])
async def test_the_hosts_terminals_are_out_of_reach(level):
    """/dev/pts inside is a devpts of the sandbox's own: a terminal of the
    host's, opened to everyone by its mode, can neither be written (output
    injected where the user reads) nor read (keystrokes taken).  Control: the
    sandbox makes and uses a pty of its own."""
    master, slave = os.openpty()
    try:
        name = os.ttyname(slave)
        os.chmod(name, 0o666)
        os.set_blocking(master, False)
        async with heel.Sandbox(heel.SandboxConfig(level=level)) as sb:
            out = await py(sb, """
                import os, sys
                try:
                    fd = os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
                    os.write(fd, b'heel-injected')
                    print('OPENED', flush=True)
                except OSError as e:
                    print('refused', e.errno, flush=True)
                m, s = os.openpty()
                os.write(s, b'own-pty')
                print('OWN', os.read(m, 100).decode(), flush=True)
                """, name)
        try:
            seen = os.read(master, 1000)
        except BlockingIOError:
            seen = b""
        assert b"heel-injected" not in seen, explain(out)
        assert out.stdout.startswith(b"refused "), explain(out)
        assert b"OWN own-pty" in out.stdout, explain(out)
    finally:
        os.close(master)
        os.close(slave)


# ---- the rights of a grant: read is not execute, and not write ----------------------

async def test_a_readable_program_does_not_run_at_strict(outside_dir):
    """`readable` gives read, `executable` read and execute.  At STRICT (the
    only level that does not execute the rest of the file system) a program
    in a readable directory is read but does not run.  Control: the same
    program in an executable directory runs."""
    program = shutil.which("true") or "/bin/true"
    dirs = {}
    for kind in ("readable", "executable"):
        dirs[kind] = os.path.join(outside_dir, kind)
        os.mkdir(dirs[kind])
        shutil.copy(program, os.path.join(dirs[kind], "prog"))
        os.chmod(dirs[kind], 0o755)
        os.chmod(os.path.join(dirs[kind], "prog"), 0o755)
    config = heel.SandboxConfig(level=STRICT, readable=[dirs["readable"]], executable=[dirs["executable"]])
    async with heel.Sandbox(config) as sb:
        out = await py(sb, """
            import os, subprocess, sys
            for d in sys.argv[1:]:
                prog = os.path.join(d, 'prog')
                size = len(open(prog, 'rb').read())
                try:
                    print('RAN', d, subprocess.run([prog]).returncode, size > 0, flush=True)
                except OSError as e:
                    print('refused', d, e.errno, size > 0, flush=True)
            """, dirs["readable"], dirs["executable"])
    lines = _lines(out)
    assert f"RAN {dirs['executable']} 0 True" in lines, explain(out)
    assert f"refused {dirs['readable']} 13 True" in lines, explain(out)


@pytest.mark.parametrize("level", [STRICT, DEFAULT])
async def test_a_readable_place_stays_unwritable_without_namespaces(no_namespaces, level, outside_dir):
    """Without the read-only mount view, Landlock alone keeps a `readable`
    place from being written: no file written, made (a file, a directory,
    a FIFO, a link) or removed there.  Control: a `writable` one beside it
    takes each."""
    dirs = {}
    for kind in ("readable", "writable"):
        dirs[kind] = os.path.join(outside_dir, kind)
        os.mkdir(dirs[kind])
        os.chmod(dirs[kind], 0o777)
        with open(os.path.join(dirs[kind], "file"), "w") as f:
            f.write("original")
        os.chmod(os.path.join(dirs[kind], "file"), 0o666)
    config = heel.SandboxConfig(level=level, best_effort=True, readable=[dirs["readable"]],
                                writable=[dirs["writable"]])
    async with heel.Sandbox(config) as sb:
        out = await py(sb, """
            import os, sys
            for d in sys.argv[1:]:
                for what, attempt in (('write', lambda: open(os.path.join(d, 'file'), 'w').write('pwned')),
                                      ('create', lambda: open(os.path.join(d, 'new'), 'x').write('pwned')),
                                      ('mkdir', lambda: os.mkdir(os.path.join(d, 'dir'))),
                                      ('mkfifo', lambda: os.mkfifo(os.path.join(d, 'fifo'))),
                                      ('symlink', lambda: os.symlink('/', os.path.join(d, 'link'))),
                                      ('unlink', lambda: os.unlink(os.path.join(d, 'file')))):
                    try:
                        attempt()
                        print('DONE', what, d, flush=True)
                    except OSError as e:
                        print('refused', what, d, e.errno, flush=True)
            """, dirs["readable"], dirs["writable"])
    lines = _lines(out)
    for what in ("write", "create", "mkdir", "mkfifo", "symlink", "unlink"):
        assert f"DONE {what} {dirs['writable']}" in lines, explain(out)
        assert f"refused {what} {dirs['readable']} 13" in lines, explain(out)
    assert open(os.path.join(dirs["readable"], "file")).read() == "original"
    assert sorted(os.listdir(dirs["readable"])) == ["file"]


# ---- /proc without namespaces ---------------------------------------------------------

@pytest.mark.parametrize("level", [DEFAULT, PERMISSIVE])
async def test_proc_stays_read_only_without_namespaces(no_namespaces, level):
    """Without namespaces the sandbox's /proc is the host's: it reads there,
    writes nothing (not even its own process's name; /proc/sys and the
    other processes' files are among what a write right would open).
    Control: the host's Python writes its own name, and the sandbox reads it."""
    from helpers import host_py

    write_comm = """
        import os
        try:
            fd = os.open('/proc/self/comm', os.O_WRONLY)  # no O_TRUNC: the write right alone
            os.write(fd, b'heel-renamed')
            print('WROTE', open('/proc/self/comm').read().strip())
        except OSError as e:
            print('refused', e.errno, open('/proc/self/comm').read().strip())
        """
    host = host_py(write_comm)
    assert host.stdout.strip() == b"WROTE heel-renamed", host
    async with heel.Sandbox(heel.SandboxConfig(level=level, best_effort=True)) as sb:
        out = await py(sb, write_comm)
    assert out.stdout.strip().startswith(b"refused 13 "), explain(out)
    assert b"heel-renamed" not in out.stdout, explain(out)


# ---- /dev beyond the documented nodes -----------------------------------------------

#: The README's /dev nodes (and the terminals): everything else in /dev can
#: be listed, not opened.
DOCUMENTED_DEVICES = {"null", "zero", "full", "random", "urandom", "tty", "ptmx"}


@pytest.mark.parametrize("level", [STRICT, DEFAULT, PERMISSIVE])
async def test_device_nodes_beyond_the_list_are_not_opened(level):
    """Each character device directly in /dev that its mode opens to
    everyone, but which is not among the README's nodes (here /dev/kmsg,
    the kernel's log, and the like), is refused by Landlock (EACCES) before
    its driver is asked.  Control: /dev/null and /dev/urandom open."""
    import stat

    others = []
    for name in sorted(os.listdir("/dev")):
        path = os.path.join("/dev", name)
        st = os.lstat(path)
        if stat.S_ISCHR(st.st_mode) and name not in DOCUMENTED_DEVICES and st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
            others.append((path, "r" if st.st_mode & stat.S_IROTH else "w"))
    if not others:
        pytest.skip("no character device in /dev beyond the documented ones is open to everyone here")
    async with heel.Sandbox(heel.SandboxConfig(level=level)) as sb:
        out = await py(sb, """
            import os, sys
            for arg in sys.argv[1:]:
                path, mode = arg[:-2], arg[-1]
                try:
                    os.close(os.open(path, (os.O_RDONLY if mode == 'r' else os.O_WRONLY) | os.O_NONBLOCK))
                    print('OPENED', path, flush=True)
                except OSError as e:
                    print('refused', path, e.errno, flush=True)
            """, "/dev/null:r", "/dev/urandom:r", *(f"{path}:{mode}" for path, mode in others))
    lines = _lines(out)
    assert lines[:2] == ["OPENED /dev/null", "OPENED /dev/urandom"], explain(out)
    for path, _ in others:
        assert f"refused {path} 13" in lines, (path, explain(out))


# ---- Landlock's rights where it is the only layer ---------------------------------

@pytest.mark.parametrize("level", [DEFAULT, PERMISSIVE])
async def test_device_ioctl_outside_dev_is_refused(root_only, level, outside_dir):
    """A device node outside /dev (one the host made, mode 0666) falls under
    the level's grant of the file system: it may open, but its driver's
    ioctls stay refused (Landlock's IOCTL_DEV, ABI 5), where /dev/null's,
    a granted node, reach the driver (which answers ENOTTY: it has none)."""
    import stat

    if heel.probe().landlock_abi < 5:
        pytest.skip("needs Landlock ABI 5 (device ioctl)")
    node = os.path.join(outside_dir, "null")
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(node, 0o666)
    async with heel.Sandbox(heel.SandboxConfig(level=level)) as sb:
        out = await py(sb, """
            import fcntl, os, sys, termios
            for path in sys.argv[1:]:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as e:
                    print('open-refused', path, e.errno, flush=True)
                    continue
                try:
                    fcntl.ioctl(fd, termios.TCGETS, bytes(64))
                    print('IOCTL', path, flush=True)
                except OSError as e:
                    print('ioctl', path, e.errno, flush=True)
            """, "/dev/null", node)
    lines = _lines(out)
    if any(line.startswith(f"open-refused {node} ") for line in lines):
        pytest.skip(f"a device outside /dev does not open in the sandbox here: {lines}")
    assert "ioctl /dev/null 25" in lines, explain(out)  # ENOTTY: the driver was asked
    assert f"ioctl {node} 13" in lines, explain(out)  # EACCES: Landlock refused first


async def test_signals_do_not_reach_host_processes_without_namespaces(no_namespaces, host_sleeper):
    """Without a pid namespace the host's processes of the same uid are in
    reach of kill(): Landlock's signal scope (ABI 6) is what refuses it.
    Control: the sandbox signals a child of its own."""
    if heel.probe().landlock_abi < 6:
        pytest.skip("needs Landlock ABI 6 (scoping)")
    async with heel.Sandbox(heel.SandboxConfig(level=PERMISSIVE, best_effort=True)) as sb:
        out = await py(sb, """
            import os, signal, subprocess, sys
            try:
                os.kill(int(sys.argv[1]), signal.SIGSTOP)
                print('SIGNALLED')
            except OSError as e:
                print('refused', e.errno)
            child = subprocess.Popen(['sleep', '30'])
            os.kill(child.pid, signal.SIGTERM)
            print('own child', child.wait())
            """, str(host_sleeper.pid))
    with open(f"/proc/{host_sleeper.pid}/stat") as f:
        state = f.read().rpartition(") ")[2][0]
    os.kill(host_sleeper.pid, 18)  # SIGCONT, whatever happened
    assert state in "SR", explain(out)
    assert _lines(out) == ["refused 1", "own child -15"], explain(out)


async def test_abstract_host_socket_unreachable_without_namespaces(no_namespaces):
    """Without a network namespace the host's abstract unix socket names are
    the sandbox's too: Landlock's abstract-socket scope (ABI 6) keeps it from
    connecting to them.  Control: a listener the sandbox makes itself takes
    its own connection, and the host's listener takes the host's."""
    import secrets
    import select
    import socket

    if heel.probe().landlock_abi < 6:
        pytest.skip("needs Landlock ABI 6 (scoping)")
    name = b"\0heel-test-" + secrets.token_hex(8).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(name)
        server.listen(8)
        security = heel.SecurityConfig(allow_unix_sockets=True)
        async with heel.Sandbox(heel.SandboxConfig(best_effort=True, security=security)) as sb:
            out = await py(sb, """
                import os, socket, sys
                name = b'\\0' + sys.argv[1].encode()
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(name)
                    s.sendall(b'leak')
                    print('CONNECTED')
                except OSError as e:
                    print('refused', e.errno)
                own = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                own.bind(name + b'-own')
                own.listen(1)
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.connect(name + b'-own')
                print('own', own.accept()[0] is not None)
                """, name[1:].decode())
        assert not select.select([server], [], [], 0.3)[0], explain(out)
        assert _lines(out) == ["refused 1", "own True"], explain(out)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:  # the host's control
            client.connect(name)
            assert select.select([server], [], [], 5)[0]


# ---- the home of the password database, whatever $HOME says ----------------------

async def test_the_password_databases_home_stays_closed_when_home_is_elsewhere(root_only, fake_home, outside_dir):
    """heel protects both the home $HOME names and the one the password
    database gives the user: with $HOME elsewhere, root's own home (/root)
    stays closed to root's PERMISSIVE sandbox (the real uid 0, whom its
    mode lets in).  Control: a file outside any home is read."""
    import pwd

    home = os.path.abspath(pwd.getpwuid(0).pw_dir)
    if home == "/" or not os.path.isdir(home) or os.path.realpath(fake_home).startswith(home + "/"):
        pytest.skip("root's home from the password database is no directory of its own here")
    fd, secret = tempfile.mkstemp(dir=home, prefix="heel-test-")
    try:
        os.write(fd, b"heel-secret-passwd-home")
        os.close(fd)
        ordinary = os.path.join(outside_dir, "ordinary")
        with open(ordinary, "w") as f:
            f.write("heel-ordinary")
        async with heel.Sandbox(heel.SandboxConfig(level=PERMISSIVE)) as sb:
            out = await py(sb, READ_EACH, ordinary, secret)
    finally:
        os.unlink(secret)
    lines = _lines(out)
    assert f"READ {ordinary} heel-ordinary" in lines, explain(out)
    assert b"heel-secret" not in out.stdout, explain(out)
    assert any(line.startswith(f"refused {secret} ") for line in lines), explain(out)


# ---- protected files inside a writable place ------------------------------------------

@pytest.mark.parametrize("level", [STRICT, DEFAULT])
async def test_protected_files_in_a_writable_place_keep_their_mode_and_times(level, outside_dir, monkeypatch):
    """A writable place that holds a home: Landlock keeps the credentials
    from being read or written, but it does not mediate chmod, utime or
    xattrs, which the sandbox's ownership of the files would allow there;
    heel makes the protected files read-only mounts.  Control: the same
    changes to the home's ordinary file work."""
    from helpers import snapshot

    proj = os.path.join(outside_dir, "proj")
    os.mkdir(proj)
    os.chmod(proj, 0o777)
    home = make_home(proj)
    monkeypatch.setenv("HOME", home)
    secrets = [os.path.join(home, name) for name in (".netrc", ".bash_history")]
    notes = os.path.join(home, "notes.txt")
    before = {p: snapshot(p) for p in secrets}
    security = heel.SecurityConfig(protect_user_home=False)
    async with heel.Sandbox(heel.SandboxConfig(level=level, security=security, writable=[proj])) as sb:
        out = await py(sb, """
            import os, sys
            for path in sys.argv[1:]:
                for what, attempt in (('chmod', lambda: os.chmod(path, 0o600)),
                                      ('utime', lambda: os.utime(path, (0, 0)))):
                    try:
                        attempt()
                        print('CHANGED', what, path, flush=True)
                    except OSError as e:
                        print('refused', what, path, e.errno, flush=True)
            """, notes, *secrets)
    lines = _lines(out)
    assert f"CHANGED chmod {notes}" in lines and f"CHANGED utime {notes}" in lines, explain(out)
    assert not any(line.startswith("CHANGED") and notes not in line for line in lines), explain(out)
    assert {p: snapshot(p) for p in secrets} == before
