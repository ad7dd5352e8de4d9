"""Python environments: built on the host (the installer itself sandboxed),
used read-only inside a sandbox, pip inside through the proxy when allowed.

Offline: the packages are tiny wheels built here, installed from a
find_links directory or from a local index on the host's loopback.
Environments live under /var/tmp (inside a sandbox /tmp is private), made
from the system Python (a Python inside a protected home cannot be granted).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

import pytest
import trio

import heel
from helpers import explain, usable_uv
from pkgtools import SimpleIndex, shared_wheels

SYSTEM_PYTHON = "/usr/bin/python3"
pytestmark = pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason="needs /usr/bin/python3")


@pytest.fixture(scope="module")
def wheels():
    """A find_links directory with two tiny packages; readable by every uid."""
    with shared_wheels(("heelalpha", "1.0", "VALUE = 'alpha-1.0'\n"),
                       ("heelbeta", "2.0", "VALUE = 'beta-2.0'\n")) as directory:
        yield directory


@pytest.fixture(scope="module")
def alpha_venv(wheels):
    """One environment with heelalpha, shared by the tests that only read it."""
    base = tempfile.mkdtemp(prefix="heel-venv-shared-", dir="/var/tmp")
    try:
        os.chmod(base, 0o755)
        config = heel.VenvConfig(os.path.join(base, "env"), ["heelalpha"], python=SYSTEM_PYTHON,
                                 find_links=[wheels], no_index=True)
        trio.run(heel.VenvManager.create, config)
        yield config
    finally:  # also when the build itself failed
        shutil.rmtree(base, ignore_errors=True)


def record():
    events: list[heel.VenvProgress] = []
    return events, events.append


# ---- building ---------------------------------------------------------------------


async def test_create_reuse_and_extend(venv_dir, wheels):
    config = heel.VenvConfig(venv_dir, ["heelalpha"], python=SYSTEM_PYTHON, find_links=[wheels], no_index=True)
    events, on_progress = record()
    venv = await heel.VenvManager.create(config, on_progress=on_progress)
    assert venv.version == tuple(int(x) for x in os.popen(f"{SYSTEM_PYTHON} -c 'import sys; "
                                                         "print(*sys.version_info[:2])'").read().split())
    assert "heelalpha" in venv.packages
    assert [e.phase for e in events][0] == "create" and any(e.phase == "install" for e in events)
    marker = os.path.join(venv_dir, "pyvenv.cfg")
    made = os.stat(marker).st_mtime_ns

    # Again: reused as it is, nothing installed.
    events, on_progress = record()
    await heel.VenvManager.create(config, on_progress=on_progress)
    assert [e.phase for e in events] == ["done"], events
    assert os.stat(marker).st_mtime_ns == made

    # Extended: only the missing package is installed.
    events, on_progress = record()
    venv = await heel.VenvManager.create(config.replace(packages=("heelalpha", "heelbeta")),
                                         on_progress=on_progress)
    installs = [e.message for e in events if e.phase == "install"]
    assert installs[0] == "installing heelbeta", installs
    assert {"heelalpha", "heelbeta"} <= set(venv.packages)


async def test_installer_failure_carries_the_installers_message(venv_dir, wheels):
    config = heel.VenvConfig(venv_dir, ["heel-no-such-package"], python=SYSTEM_PYTHON, find_links=[wheels],
                             no_index=True)
    with pytest.raises(heel.InstallError, match="heel-no-such-package") as caught:
        await heel.VenvManager.create(config)
    # pip's words or uv's: either way the installer's own explanation.
    message = str(caught.value)
    assert "No matching distribution found for heel-no-such-package" in message or "unsatisfiable" in message, \
        message
    assert caught.value.output


async def test_missing_interpreter_is_a_clear_error(venv_dir):
    with pytest.raises(heel.InterpreterNotFound, match="no-such-python"):
        await heel.VenvManager.create(heel.VenvConfig(venv_dir, python="/usr/bin/no-such-python"))
    with pytest.raises(heel.InterpreterNotFound):
        await heel.VenvManager.create(heel.VenvConfig(venv_dir, python="no-such-python-anywhere"))
    assert not os.path.exists(venv_dir)


async def test_broken_environments_are_reported_never_reused(venv_dir, wheels):
    config = heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON)
    await heel.VenvManager.create(config)
    # Another Python's environment.
    cfg = os.path.join(venv_dir, "pyvenv.cfg")
    original = open(cfg).read()
    with open(cfg, "w") as f:
        f.write(original.replace("version = 3.", "version = 2.").replace("version_info = 3.", "version_info = 2."))
    with pytest.raises(heel.BrokenVenv, match="made with Python 2"):
        await heel.VenvManager.create(config)
    with open(cfg, "w") as f:
        f.write(original)
    # No interpreter.
    os.unlink(os.path.join(venv_dir, "bin", "python"))
    with pytest.raises(heel.BrokenVenv, match="no interpreter"):
        await heel.VenvManager.create(config)
    # Not a venv at all: left alone.
    other = os.path.join(os.path.dirname(venv_dir), "not-a-venv")
    os.mkdir(other)
    open(os.path.join(other, "precious.txt"), "w").close()
    with pytest.raises(heel.BrokenVenv, match="not a virtual environment"):
        await heel.VenvManager.create(heel.VenvConfig(other, python=SYSTEM_PYTHON))
    assert os.listdir(other) == ["precious.txt"]


@pytest.mark.parametrize("bad", [
    dict(packages=["--index-url=http://evil/"]), dict(packages=[""]), dict(index_url="ftp://x/"),
    dict(find_links=["/var/tmp/heel-does-not-exist"]), dict(no_index=True, index_url="http://a.test/"),
    dict(use_uv="yes"), dict(packages=None), dict(packages=5), dict(find_links=None), dict(find_links=[123]),
    dict(find_links=[""]), dict(index_url="http://[::1"), dict(index_url="https://h:99999/"),
    dict(index_url="https://h:abc/"),
])
def test_bad_venv_config_is_a_policy_error(bad):
    with pytest.raises(heel.PolicyError):
        heel.VenvConfig("/var/tmp/heel-x", **bad)


@pytest.mark.parametrize("bad", [dict(timeout="x"), dict(timeout=-1), dict(timeout=float("nan")),
                                 dict(on_progress=5)])
async def test_bad_create_arguments_fail_before_anything_is_made(venv_dir, bad):
    with pytest.raises(heel.PolicyError):
        await heel.VenvManager.create(heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON), **bad)
    assert os.listdir(os.path.dirname(venv_dir)) == []


@pytest.mark.parametrize("interpreter", [".", ".."])
def test_interpreter_must_name_a_program(interpreter):
    with pytest.raises(heel.PolicyError):
        heel.PythonConfig("/var/tmp/heel-x", interpreter=interpreter)


async def test_run_python_args_must_be_a_sequence():
    async with heel.Sandbox(heel.SandboxConfig()) as sb:
        with pytest.raises(heel.PolicyError):
            await sb.run_python("pass", args="abc")
        out = await sb.run_python("import sys; print(sys.argv[1:])", args=["abc"])  # the control
    assert out.stdout == b"['abc']\n", explain(out)


# ---- inside the sandbox -----------------------------------------------------------


async def test_package_importable_and_environment_read_only(alpha_venv):
    site = [p for p in os.listdir(os.path.join(alpha_venv.path, "lib"))][0]
    target = os.path.join(alpha_venv.path, "lib", site, "site-packages", "planted.py")
    config = heel.SandboxConfig(level="strict", python=heel.PythonConfig(alpha_venv))
    async with heel.Sandbox(config) as sb:
        out = await sb.run_python(f"""
import os, sys, heelalpha
print(heelalpha.VALUE, sys.prefix == os.environ["VIRTUAL_ENV"])
try:
    open({target!r}, "w").write("import os")
    print("WROTE")
except OSError as e:
    print("refused", e.errno)
""")
        which = await sb.command("sh").args(["-c", "for p in python python3 pip; do command -v $p; done"]).output()
    assert out.stdout.decode().splitlines()[0] == "alpha-1.0 True", explain(out)
    assert "WROTE" not in out.stdout.decode(), explain(out)
    assert not os.path.exists(target)
    bin_dir = os.path.join(alpha_venv.path, "bin")
    assert which.stdout.decode().split() == [f"{bin_dir}/python", f"{bin_dir}/python3", f"{bin_dir}/pip"]


async def test_allow_pip_install_from_find_links(venv_dir, wheels):
    config = heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON)
    python = heel.PythonConfig(config, allow_pip_install=True)
    async with heel.Sandbox(heel.SandboxConfig(python=python)) as sb:
        out = await sb.command("pip").args(["install", "--no-index", "--find-links", wheels, "heelbeta"]) \
            .timeout(120).output()
        imported = await sb.run_python("import heelbeta; print(heelbeta.VALUE)")
    assert out.returncode == 0, explain(out)
    assert imported.stdout == b"beta-2.0\n", explain(imported)
    assert "heelbeta" in heel.venv.installed_distributions(python.path)


async def test_pip_inside_reaches_a_local_index_only_through_an_allowing_proxy(venv_dir, wheels):
    index = SimpleIndex(wheels)
    try:
        url = f"http://index.test:{index.port}/simple"

        async def resolve(host, port):
            if host != "index.test":
                raise OSError("unknown test host")
            return ["127.0.0.1"]

        python = heel.PythonConfig(heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON), allow_pip_install=True)
        pip = ["pip", "install", "--retries", "0", "--timeout", "5", "--index-url", url,
               "--trusted-host", "index.test", "heelalpha"]
        # Denied: no network at all, then a policy that does not name the index.
        for policy in (heel.DenyAll(), heel.AllowList(["elsewhere.test"])):
            async with heel.Sandbox(heel.SandboxConfig(python=python, network=policy), resolver=resolve) as sb:
                out = await sb.command(pip[0]).args(pip[1:]).timeout(120).output()
                events = sb.network_events()
            assert out.returncode != 0, explain(out)
            assert b"No matching distribution found for heelalpha" in out.stderr, explain(out)
            # pip says only that; the host's events say why (none under DenyAll: no proxy at all).
            if policy != heel.DenyAll():
                assert events and all(not e.allowed and e.host == "index.test" for e in events), events
                assert "allow-list" in events[0].reason
        assert index.requests == []
        # Allowed.
        config = heel.SandboxConfig(python=python, network=heel.AllowList(["index.test"]))
        async with heel.Sandbox(config, resolver=resolve) as sb:
            out = await sb.command(pip[0]).args(pip[1:]).timeout(120).output()
            imported = await sb.run_python("import heelalpha; print(heelalpha.VALUE)")
        assert out.returncode == 0, explain(out)
        assert imported.stdout == b"alpha-1.0\n"
        assert any(path.startswith("/simple/heelalpha") for path in index.requests), index.requests
    finally:
        index.close()


async def test_venv_manager_uses_a_local_index_through_the_proxy(venv_dir, wheels):
    index = SimpleIndex(wheels)
    try:
        async def resolve(host, port):
            return ["127.0.0.1"]

        config = heel.VenvConfig(venv_dir, ["heelbeta==2.0"], python=SYSTEM_PYTHON,
                                 index_url=f"http://index.test:{index.port}/simple")
        venv = await heel.VenvManager.create(config, resolver=resolve)
        assert venv.packages and "heelbeta" in venv.packages
        assert any("heelbeta" in path for path in index.requests)
    finally:
        index.close()


# ---- run_python ---------------------------------------------------------------------


async def test_run_python_output_exit_codes_exceptions_and_timeouts(alpha_venv):
    async with heel.Sandbox(heel.SandboxConfig(python=heel.PythonConfig(alpha_venv))) as sb:
        ok = await sb.run_python("import sys; print('args', sys.argv[1:]); print(sys.stdin.read().upper())",
                                 args=["a", "b c"], input=b"fed in")
        exit_code = await sb.run_python("import sys; sys.exit(3)")
        failed = await sb.run_python("def f():\n    raise ValueError('boom')\n\nf()\n")
        with trio.fail_after(30):
            slow = await sb.run_python("while True: pass", timeout=1)
        plain = await sb.python().args(["-c", "import heelalpha; print(heelalpha.VALUE)"]).output()
    assert ok.stdout.decode().splitlines() == ["args ['a', 'b c']", "FED IN"], explain(ok)
    assert exit_code.returncode == 3
    trace = failed.stderr.decode()
    assert failed.returncode == 1 and "ValueError: boom" in trace
    assert re.search(r'File "/tmp/heel_python_3_[0-9a-f]{8}\.py", line 2, in f', trace), trace
    assert "raise ValueError('boom')" in trace, trace
    assert slow.timed_out
    assert plain.stdout == b"alpha-1.0\n"


async def test_run_python_without_a_venv_uses_the_systems_python3():
    async with heel.Sandbox() as sb:
        out = await sb.run_python("import sys; print(sys.version_info[0])")
    assert out.stdout == b"3\n", explain(out)


async def test_a_venv_whose_python_lives_in_a_protected_home_is_refused(tmp_path):
    import sys

    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    homes = heel._plan.home_directories()
    if not any(base.startswith(h + os.sep) for h in homes):
        pytest.skip("this Python does not live in a home directory")
    directory = tempfile.mkdtemp(prefix="heel-venv-home-", dir="/var/tmp")
    env = os.path.join(directory, "env")
    try:
        # Refused before anything is built...
        with pytest.raises(heel.PolicyError, match="protected place"):
            await heel.VenvManager.create(heel.VenvConfig(env, python=base))
        assert not os.path.exists(env)
        # ...and an environment made from it elsewhere is refused when a sandbox would use it.
        subprocess.run([base, "-m", "venv", "--without-pip", env], check=True)
        with pytest.raises(heel.PolicyError, match="protected place"):
            async with heel.Sandbox(heel.SandboxConfig(python=heel.PythonConfig(env))):
                pass
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_uv_builds_the_same_environment(venv_dir, wheels):
    if not usable_uv():
        with pytest.raises(heel.InstallError, match="uv is not installed|which the installer's sandbox keeps closed"):
            await heel.VenvManager.create(heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON, use_uv=True))
        pytest.skip("uv is not installed, or lives in the home directory: checked that use_uv=True says so")
    config = heel.VenvConfig(venv_dir, ["heelalpha"], python=SYSTEM_PYTHON, use_uv=True, find_links=[wheels],
                             no_index=True)
    venv = await heel.VenvManager.create(config)
    assert "heelalpha" in venv.packages
    async with heel.Sandbox(heel.SandboxConfig(python=heel.PythonConfig(config))) as sb:
        out = await sb.run_python("import heelalpha; print(heelalpha.VALUE)")
        pip = await sb.command("pip").arg("--version").output()
    assert out.stdout == b"alpha-1.0\n", explain(out)
    assert pip.returncode == 0 and pip.stdout.startswith(b"pip "), explain(pip)  # seeded offline


async def test_a_rewritten_pyvenv_cfg_grants_nothing_at_strict(venv_dir, outside_dir):
    """pyvenv.cfg is writable inside with allow_pip_install: a `home` that
    points elsewhere must not open that place to a later STRICT sandbox."""
    await heel.VenvManager.create(heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON))
    secret_dir = os.path.join(outside_dir, "app")
    os.makedirs(os.path.join(secret_dir, "bin"))
    with open(os.path.join(secret_dir, "data.txt"), "w") as f:
        f.write("outside data\n")
    cfg = os.path.join(venv_dir, "pyvenv.cfg")
    lines = [line for line in open(cfg) if not line.startswith("home")]
    with open(cfg, "w") as f:
        f.write(f"home = {secret_dir}/bin\n" + "".join(lines))
    with pytest.raises(heel.PolicyError, match="did not make it from"):
        async with heel.Sandbox(heel.SandboxConfig(level="strict", python=heel.PythonConfig(venv_dir))):
            pass
    # Control: the untouched home of a venv heel knows the base of is granted.
    with open(cfg, "w") as f:
        f.write("home = /usr/bin\n" + "".join(lines))
    async with heel.Sandbox(heel.SandboxConfig(level="strict", python=heel.PythonConfig(venv_dir))) as sb:
        out = await sb.run_python("print('ok')")
    assert out.stdout == b"ok\n", explain(out)


# ---- what a sandbox that could write the environment leaves for the host -------------


@pytest.mark.parametrize("replacement", ["symlink to /dev/zero", "fifo"])
async def test_a_replaced_pyvenv_cfg_is_refused_at_once(venv_dir, replacement):
    config = heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON)
    await heel.VenvManager.create(config)
    cfg = os.path.join(venv_dir, "pyvenv.cfg")
    os.unlink(cfg)
    if replacement == "fifo":
        os.mkfifo(cfg)
    else:
        os.symlink("/dev/zero", cfg)
    with trio.fail_after(10):  # neither a hang nor an endless read
        with pytest.raises(heel.BrokenVenv, match="pyvenv.cfg"):
            await heel.VenvManager.create(config)
        with pytest.raises(heel.BrokenVenv, match="pyvenv.cfg"):
            async with heel.Sandbox(heel.SandboxConfig(python=heel.PythonConfig(venv_dir))):
                pass


async def test_a_parent_swapped_for_a_link_is_refused(venv_dir):
    config = heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON)
    await heel.VenvManager.create(config)
    base = os.path.dirname(venv_dir)
    elsewhere = base + "-elsewhere"
    os.rename(base, elsewhere)
    try:
        os.symlink(elsewhere, base)
        with pytest.raises(heel.BrokenVenv, match="symbolic link"):
            await heel.VenvManager.create(config)
    finally:
        os.unlink(base)
        os.rename(elsewhere, base)


async def test_a_parent_swapped_for_a_link_builds_nothing_there(venv_dir):
    """A sandbox that may write the place above an environment (its
    workdir, say) swaps it for a link: heel must refuse before it makes
    anything (the lock, the environment) where the link points."""
    config = heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON)
    base = os.path.dirname(venv_dir)
    target = tempfile.mkdtemp(prefix="heel-venv-target-", dir="/var/tmp")
    os.mkdir(os.path.join(target, "env"))  # an empty directory of the name: heel would build in it
    os.rmdir(base)
    # What stays the same only if nothing was made (or made and removed) there:
    before = os.stat(target).st_mtime_ns, os.stat(os.path.join(target, "env")).st_ino
    try:
        os.symlink(target, base)
        with trio.fail_after(60), pytest.raises(heel.BrokenVenv, match="symbolic link"):
            await heel.VenvManager.create(config)
        assert sorted(os.listdir(target)) == ["env"] and os.listdir(os.path.join(target, "env")) == []
        assert (os.stat(target).st_mtime_ns, os.stat(os.path.join(target, "env")).st_ino) == before
    finally:
        os.unlink(base)
        os.mkdir(base)
        shutil.rmtree(target)
    # The control: the same config builds where there is no link.
    with trio.fail_after(120):
        await heel.VenvManager.create(config)
    assert os.path.isfile(os.path.join(venv_dir, "pyvenv.cfg"))


async def test_a_parent_swapped_for_a_link_while_the_environment_is_made_redirects_nothing(
        venv_dir, monkeypatch):
    """The worst moment for the swap: after heel made the empty directory,
    before the build's sandbox is given it.  That grant must not follow the
    new link to another project's environment (which it would rewrite)."""
    from heel import venv as venv_module

    base = os.path.dirname(venv_dir)
    os.mkdir(os.path.join(base, "a"))
    path = os.path.join(base, "a", "sub", "env")
    other = os.path.join(base, "projB")
    os.makedirs(os.path.join(other, "env"))
    with open(os.path.join(other, "env", "pyvenv.cfg"), "w") as f:
        f.write("home = /opt/projB-python\n")
    def state() -> dict[str, int]:
        return {name: os.stat(os.path.join(other, "env", name)).st_mtime_ns
                for name in os.listdir(os.path.join(other, "env"))}

    before = state()
    made = venv_module.make_path_nofollow

    def then_swap(target: str, is_file: bool = False) -> None:
        made(target, is_file)
        if target == path:  # what a sandbox that may write a/ would do now
            os.rename(os.path.join(base, "a", "sub"), os.path.join(base, "a", "sub-was"))
            os.symlink(other, os.path.join(base, "a", "sub"))

    monkeypatch.setattr(venv_module, "make_path_nofollow", then_swap)
    with trio.fail_after(120), pytest.raises(heel.BrokenVenv, match="symbolic link"):
        await heel.VenvManager.create(heel.VenvConfig(path, python=SYSTEM_PYTHON))
    assert state() == before  # nothing made or changed in the other environment
    with open(os.path.join(other, "env", "pyvenv.cfg")) as f:
        assert f.read() == "home = /opt/projB-python\n"


#: Sandbox A empties the environment it may write, then plants a .pth file
#: in every site-packages that appears while the host rebuilds it.  The .pth
#: writes a marker where it runs: in the environment (which the build may
#: write) and in a host directory that only the host may write.
PLANTER = r"""
P=$1; OUT=$2
rm -rf "$P"/* "$P"/.[!.]* 2>/dev/null
echo EMPTIED
while :; do
  for d in "$P"/lib/python3.*/site-packages; do
    [ -d "$d" ] && [ ! -e "$d/zzz_planted.pth" ] &&
      echo "import os; [open(os.path.join(p, 'planted-ran'), 'w').close() for p in ('$P', '$OUT') if os.access(p, os.W_OK)]" > "$d/zzz_planted.pth"
  done
done
"""


@pytest.mark.parametrize("use_uv", [False, True])
async def test_code_planted_while_the_environment_is_built_never_runs_on_the_host(
        venv_dir, outside_dir, use_uv):
    """A sandbox with allow_pip_install may write the environment while the
    host (re)builds it.  The tools that make it run the new interpreter,
    which runs the .pth files it finds: they run in the build's sandbox,
    never on the host.  Seen from the host: the planted code ran (its marker
    in the environment), and it could not write the host directory that the
    host itself could."""
    if use_uv and not usable_uv():
        pytest.skip("uv is not installed outside the home directory")
    config = heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON, use_uv=use_uv)
    with trio.fail_after(240):
        await heel.VenvManager.create(config)
        sandbox = heel.SandboxConfig(python=heel.PythonConfig(venv_dir, allow_pip_install=True))
        async with heel.Sandbox(sandbox) as sb:
            for _ in range(3):  # a race: the planter may miss the moment, though it rarely does
                planter = await (sb.command("sh").args(["-c", PLANTER, "sh", venv_dir, outside_dir])
                                 .stdout(heel.Stdio.PIPE).spawn())
                async with planter:
                    assert planter.stdout is not None
                    seen = b""
                    while b"EMPTIED" not in seen:
                        chunk = await planter.stdout.receive_some()
                        assert chunk, "the planter ended"
                        seen += chunk
                    await heel.VenvManager.create(config)  # the host rebuilds the emptied environment
                    planter.kill()
                assert not os.path.exists(os.path.join(outside_dir, "planted-ran")), "the planted code ran on the host"
                if os.path.exists(os.path.join(venv_dir, "planted-ran")):
                    break
    assert os.path.exists(os.path.join(venv_dir, "planted-ran")), "the planted code never ran: the race was lost"


async def test_the_installer_sees_no_more_than_a_strict_sandbox(venv_dir, wheels, outside_dir):
    """A .pth file planted in the environment runs in the installer: it must
    not read what a STRICT sandbox cannot."""
    secret = os.path.join(outside_dir, "secret.txt")
    with open(secret, "w") as f:
        f.write("heel-installer-secret\n")
    os.chmod(secret, 0o644)
    # pip: it runs the environment's interpreter, which runs the .pth.
    config = heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON, find_links=[wheels], no_index=True, use_uv=False)
    await heel.VenvManager.create(config)
    (site,) = heel.venv.site_packages(config.path)
    probe = (f"try:\n    sys.stdout.write('PROBE ' + open({secret!r}).read())\n"
             "except OSError as e:\n    sys.stdout.write('PROBE refused %d\\n' % e.errno)\n")
    with open(site / "zz_probe.pth", "w") as f:
        f.write(f"import sys; exec({probe!r})\n")
    events, on_progress = record()
    try:
        await heel.VenvManager.create(config.replace(packages=("heelalpha",)), on_progress=on_progress)
        said = " ".join(e.message for e in events)
    except heel.InstallError as exc:
        said = str(exc) + exc.output
    assert "heel-installer-secret" not in said, said
    assert "PROBE refused" in said, said  # the probe did run, and was refused


async def test_uv_ignores_config_files_where_it_runs(venv_dir, wheels, monkeypatch, tmp_path):
    if not usable_uv():
        pytest.skip("uv is not installed outside the home directory")
    # uv reads uv.toml from its working directory: one that does not parse
    # would stop it, if heel let it look.
    (tmp_path / "uv.toml").write_text("this is [not toml\n")
    monkeypatch.chdir(tmp_path)
    venv = await heel.VenvManager.create(heel.VenvConfig(venv_dir, ["heelalpha"], python=SYSTEM_PYTHON,
                                                         use_uv=True, find_links=[wheels], no_index=True))
    assert "heelalpha" in venv.packages


def test_tilde_in_an_environment_path_is_never_the_root(monkeypatch):
    """With HOME set but empty, os.path.expanduser made "~/v" into "/v"."""
    import pwd

    monkeypatch.setenv("HOME", "")
    home = pwd.getpwuid(os.geteuid()).pw_dir
    if os.path.normpath(home) == "/":
        with pytest.raises(heel.PolicyError):
            heel.VenvConfig("~/v")
    else:
        assert str(heel.VenvConfig("~/v").path) == os.path.join(os.path.realpath(home), "v")
        assert str(heel.PythonConfig("~/v").venv) == os.path.join(os.path.realpath(home), "v")


async def test_a_site_packages_with_too_many_names_is_refused_not_listed(venv_dir, monkeypatch):
    """A sandbox that may write an environment could fill its site-packages
    (or lib) with millions of names, which the host listed, on trio's
    thread and all in memory, each time the environment was opened.  Past
    heel.venv.MAX_LISTED names (100,000; 50 here) the environment is
    refused.  Control: at the bound every name is read."""
    import heel.venv

    monkeypatch.setattr(heel.venv, "MAX_LISTED", 50)
    config = heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON)
    made = await heel.VenvManager.create(config)
    site, = heel.venv.site_packages(made.path)
    for name in os.listdir(site):
        shutil.rmtree(os.path.join(site, name))
    for i in range(50):
        os.mkdir(os.path.join(site, f"planted{i}-1.0.dist-info"))
    assert len((await heel.VenvManager.create(config)).packages) == 50  # the control
    open(os.path.join(site, "one-more"), "w").close()
    with pytest.raises(heel.BrokenVenv, match="more than 50 names"):
        await heel.VenvManager.create(config)
    lib = os.path.join(venv_dir, "lib")
    shutil.rmtree(site)
    for i in range(51):
        open(os.path.join(lib, f"x{i}"), "w").close()
    with pytest.raises(heel.BrokenVenv, match="more than 50 names"):
        await heel.VenvManager.create(config)


def test_installed_packages_are_read_without_following_links(venv_dir, tmp_path):
    """A sandbox that may write the environment pointed site-packages (or
    lib) at a host directory: heel listed the *.dist-info names there (a
    leak, and a wrong list).  Control: the environment's own site-packages
    is read."""
    from pathlib import Path

    from heel.venv import installed_distributions

    site = os.path.join(venv_dir, "lib", "python3.11", "site-packages")
    os.makedirs(os.path.join(site, "mine-1.0.dist-info"))
    assert installed_distributions(Path(venv_dir)) == {"mine": "1.0"}
    elsewhere = tmp_path / "protected"
    (elsewhere / "python3.11" / "site-packages" / "secret_token-9.9.dist-info").mkdir(parents=True)
    shutil.rmtree(site)
    os.symlink(elsewhere / "python3.11" / "site-packages", site)
    assert installed_distributions(Path(venv_dir)) == {}
    shutil.rmtree(os.path.join(venv_dir, "lib"))
    os.symlink(elsewhere, os.path.join(venv_dir, "lib"))
    assert installed_distributions(Path(venv_dir)) == {}
