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
from helpers import explain, py

DEFAULT = heel.IsolationLevel.DEFAULT
STRICT = heel.IsolationLevel.STRICT
PERMISSIVE = heel.IsolationLevel.PERMISSIVE

READ_EACH = """
import os, sys
for path in sys.argv[1:]:
    try:
        print('READ', path, open(path).read(), flush=True)
    except OSError as e:
        print('refused', path, e.errno, flush=True)
"""


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
    home = os.path.join(outside_dir, "home")
    secrets, ordinary = {}, []
    for n, (rel, inner) in enumerate(sorted(HISTORIES_AND_KEYRINGS.items())):
        secret = os.path.join(home, rel, inner) if inner else os.path.join(home, rel)
        os.makedirs(os.path.dirname(secret), exist_ok=True)
        with open(secret, "w") as f:
            f.write(f"heel-secret-{n}")
        secrets[secret] = f"heel-secret-{n}"
        beside = os.path.join(os.path.dirname(os.path.join(home, rel)), f"heel-ordinary-{n}")
        with open(beside, "w") as f:
            f.write(f"heel-ordinary-{n}")
        ordinary.append(beside)
    for root, _, files in os.walk(home):  # open to every uid: only heel stands in the way
        os.chmod(root, 0o777)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666)
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
        try:
            async with heel.Sandbox(config) as sb:
                await py(sb, plant, ssh)
        except heel.PolicyError as exc:
            assert "holds the protected place" in str(exc)
        else:
            pytest.fail("the sandbox opened with a writable place in /tmp that holds a home")
        assert not os.path.lexists(ssh)

        # Control: with $HOME elsewhere the same grant works, writes land on the host.
        monkeypatch.setenv("HOME", "/nonexistent-heel-test-home")
        config = heel.SandboxConfig(level=DEFAULT, security=security, writable=[base])
        async with heel.Sandbox(config) as sb:
            out = await py(sb, plant, ssh)
        assert out.stdout.strip() == b"PLANTED", explain(out)
        assert os.path.exists(os.path.join(ssh, "authorized_keys"))
    finally:
        shutil.rmtree(base, ignore_errors=True)
