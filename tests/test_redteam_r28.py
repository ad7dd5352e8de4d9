"""Red-team review r28: attacks from a sandbox (or a file heel reads) on the
host's memory and on heel's clean errors, each next to its allowed
neighbour.  Every attack is done for real and observed from the host."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import tracemalloc

import pytest
import trio

import heel
from helpers import explain
from pkgtools import shared_wheels

SYSTEM_PYTHON = "/usr/bin/python3"

#: What the planted code writes: far more than the host should ever hold of
#: an installer's output.
FLOOD = 24 * 1024 * 1024
#: The most the host may hold of it, at its peak (Python's allocations).
HOST_BOUND = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def wheels():
    with shared_wheels(("heelalpha", "1.0", "VALUE = 'alpha-1.0'\n")) as directory:
        yield directory


# A .pth file that floods the interpreter's stdout and stderr, without a
# newline, every time the environment's Python starts (pip's, in the
# installer's sandbox).
PLANT = r"""
import os, sys
site = [p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix)][0]
flood = "import os; [os.write(fd, b'A' * 65536) for fd in (1, 2) for _ in range(int(os.environ.get('HEEL_R28_FLOOD', %d)) // 65536)]\n"
with open(os.path.join(site, "zz_flood.pth"), "w") as f:
    f.write(flood)
print("planted")
"""


@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason="needs /usr/bin/python3")
@pytest.mark.parametrize("flood", [0, FLOOD], ids=["control", "flood"])
async def test_a_planted_pth_cannot_make_the_host_hold_the_installers_output(venv_dir, wheels, flood):
    """A sandbox with allow_pip_install plants a .pth file in its
    environment; the next VenvManager.create that installs a missing
    package runs the environment's Python (pip) in the installer's sandbox,
    and the .pth floods its stdout and stderr with one endless line.  The
    host must not keep all of it (it kept every byte, for as long as the
    installer's 900 s allow, and split the growing line again for each
    64 KiB chunk): memory and CPU of the host process, with no limit of the
    user's to set.  Control: the same install without a flood."""
    config = heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON, find_links=[wheels], no_index=True, use_uv=False)
    with trio.fail_after(240):
        await heel.VenvManager.create(config)
        sandbox = heel.SandboxConfig(python=heel.PythonConfig(config, allow_pip_install=True))
        async with heel.Sandbox(sandbox) as sb:
            out = await sb.python().args(["-c", PLANT % flood]).timeout(60).output()
            assert out.returncode == 0 and b"planted" in out.stdout, explain(out)
        messages: list[str] = []
        tracemalloc.start()
        try:
            venv = await heel.VenvManager.create(config.replace(packages=("heelalpha",)),
                                                 on_progress=lambda p: messages.append(p.message))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert "heelalpha" in venv.packages  # the install itself went through
    longest = max(len(m) for m in messages)
    assert peak < HOST_BOUND and longest < HOST_BOUND, \
        f"the host held {peak} bytes at its peak, and a {longest}-character progress message, of a flood of " \
        f"{2 * flood} bytes a run"


# ---- a config file heel reads -------------------------------------------------------


@pytest.mark.parametrize("line", ["readable = " + "[" * 3000 + "]" * 3000,
                                  "readable = " + "{x=" * 3000 + "1" + "}" * 3000,
                                  "readable." + ".".join(["x"] * 20000) + " = 1",
                                  "readable = [1]"],
                         ids=["nested-arrays", "nested-tables", "dotted-keys", "control"])
def test_a_deeply_nested_config_file_is_a_usage_error_not_a_traceback(tmp_path, line):
    """`heel run --config FILE`: a file within the size limit whose values
    nest thousands deep made tomllib recurse past Python's limit (arrays,
    inline tables), or the repr of the value in heel's own message (dotted
    keys, which tomllib reads without recursing), and heel died with a
    RecursionError traceback (thousands of lines) instead of its usage
    error.  Control: a shallow value of the wrong kind is a usage error
    naming the file."""
    path = tmp_path / "heel.toml"
    path.write_text(line + "\n")
    result = subprocess.run([sys.executable, "-m", "heel", "run", "--config", str(path), "--", "true"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 125, explain(result)  # heel's usage error
    assert "Traceback" not in result.stderr and "RecursionError" not in result.stderr, result.stderr[-2000:]
    assert f"config {path}" in result.stderr, result.stderr[-2000:]


# ---- a venv's base Python, named by a pyvenv.cfg the sandbox wrote -------------------


# Run in a sandbox that may write the environment (allow_pip_install): its
# pyvenv.cfg names <env>/link/bin as the base Python, and <env>/link is
# flipped, atomically and without end, between the real base's prefix and
# a host directory a STRICT sandbox may not read.
FLIPPER = r"""
import os, sys
env, base, target = sys.argv[1:4]
link = os.path.join(env, "link")
with open(os.path.join(env, "pyvenv.cfg")) as f:
    lines = [l for l in f.read().splitlines() if not l.startswith("home")]
with open(os.path.join(env, "pyvenv.cfg"), "w") as f:
    f.write("\n".join(lines + ["home = " + link + "/bin"]) + "\n")
print("flipping", flush=True)
while True:
    for where in (base, target):
        try:
            os.unlink(link + ".new")
        except FileNotFoundError:
            pass
        os.symlink(where, link + ".new")
        os.rename(link + ".new", link)
"""


@pytest.mark.skipif(not os.path.isfile("/usr/bin/python3"), reason="needs /usr/bin/python3")
async def test_a_base_python_link_flipped_while_a_strict_sandbox_opens_grants_nothing_else(outside_dir):
    """At STRICT, heel grants the directory that a venv's pyvenv.cfg names
    as its base (`home`) only when it resolves to a Python heel knows (the
    VenvConfig's base, or its own).  That check resolved the path, and the
    grant resolved it again: a sandbox that may write the environment
    (allow_pip_install), running while another sandbox of the same
    environment opens, flips a link in `home` between the two, and the
    STRICT sandbox is granted (read and execute) any host directory: here,
    one with a secret in it (a few opens in forty won the race).  Control:
    the opens that do succeed run the environment's Python, from the base
    that heel knows."""
    base = tempfile.mkdtemp(prefix="heel-r28-base-", dir="/var/tmp")
    try:
        os.chmod(base, 0o755)
        # A base Python outside the system's runtime directories (as /opt/python3.12
        # or a conda's would be): a copy of the system's interpreter, whose prefix
        # is then granted at STRICT.
        prefix = os.path.join(base, "py")
        os.makedirs(os.path.join(prefix, "bin"))
        os.chmod(prefix, 0o755)
        os.chmod(os.path.join(prefix, "bin"), 0o755)
        shutil.copy2(os.path.realpath("/usr/bin/python3"), os.path.join(prefix, "bin", "python3"))
        secret = os.path.join(outside_dir, "secret.txt")
        with open(secret, "w") as f:
            f.write("heel-r28-secret\n")
        os.chmod(secret, 0o644)
        env = os.path.join(base, "env")
        venv = heel.VenvConfig(env, python=os.path.join(prefix, "bin", "python3"))
        strict = heel.SandboxConfig(level=heel.IsolationLevel.STRICT, python=heel.PythonConfig(venv))
        wins = ran = 0
        with trio.fail_after(240):
            await heel.VenvManager.create(venv)
            writer = heel.SandboxConfig(python=heel.PythonConfig(venv, allow_pip_install=True))
            async with heel.Sandbox(writer) as attacker:
                flipper = await (attacker.command("python3").args(["-c", FLIPPER, env, prefix, outside_dir])
                                 .stdout(heel.Stdio.PIPE).spawn())
                async with flipper:
                    assert flipper.stdout is not None
                    assert b"flipping" in await flipper.stdout.receive_some()
                    for _ in range(80):
                        try:
                            async with heel.Sandbox(strict) as sb:
                                out = await sb.command("cat").arg(secret).timeout(20).output()
                                if b"heel-r28-secret" in out.stdout:
                                    wins += 1
                                    break
                                python = await sb.python().args(["-c", "print('ran')"]).timeout(20).output()
                                ran += python.stdout == b"ran\n"
                        except heel.PolicyError:
                            continue  # the link pointed elsewhere when heel looked: refused
                    flipper.kill()
        assert wins == 0, "a STRICT sandbox read a host directory through its venv's base Python grant"
        assert ran, "no STRICT sandbox of the environment opened and ran its Python"
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---- what a planted file writes, shown on the user's terminal by heel ----------------

# Writes, only in the installer (its sandbox sets PIP_NO_CACHE_DIR), an
# escape sequence that would set the terminal's title and clear its screen.
ESCAPES = ("import os, sys; os.environ.get('PIP_NO_CACHE_DIR') and "
           "[sys.stdout.write('\\x1b]0;heel-r28\\x07\\x1b[2Jplanted\\n'), sys.stdout.flush(), "
           "sys.stderr.write('\\x1b]0;heel-r28\\x07\\x1b[2Jplanted\\n'), sys.stderr.flush()]\n")


@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason="needs /usr/bin/python3")
async def test_heel_python_shows_no_escape_sequence_a_planted_file_writes(venv_dir, wheels):
    """`heel python` shows the installer's lines as progress on stderr, and
    the installer's output in its error: code planted in the environment (a
    .pth file an allow_pip_install sandbox wrote) runs in the installer, so
    what it writes reached the user's terminal as it was, escape sequences
    too (a title, a cleared screen, a cursor moved over heel's own lines).
    heel shows them escaped.  Control: the lines are shown, and the
    command's own output still passes through as it is."""
    config = heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON, find_links=[wheels], no_index=True, use_uv=False)
    with trio.fail_after(120):
        await heel.VenvManager.create(config)
    site = glob.glob(os.path.join(venv_dir, "lib", "python3*", "site-packages"))
    with open(os.path.join(site[0], "zz_escapes.pth"), "w") as f:
        f.write(ESCAPES)
    # pip, not uv: the planted line would break uv's query of the interpreter
    # (where uv is installed), which reads its stdout as JSON.
    common = ["python", "--venv", venv_dir, "--python", SYSTEM_PYTHON, "--no-index", "--find-links", wheels,
              "--no-use-uv"]
    installed = subprocess.run([sys.executable, "-m", "heel", *common, "-p", "heelalpha", "-c",
                                "import sys; sys.stderr.write('\\x1b[0mown\\n')"],
                               capture_output=True, timeout=180)
    failed = subprocess.run([sys.executable, "-m", "heel", *common, "-p", "heel-not-there", "-c", "pass"],
                            capture_output=True, timeout=180)
    assert installed.returncode == 0, explain(installed)
    assert failed.returncode == 125 and b"heel-not-there" in failed.stderr, explain(failed)
    for result in (installed, failed):
        assert b"\\x1b]0;heel-r28\\x07\\x1b[2Jplanted" in result.stderr, result.stderr[-3000:]  # shown, escaped
        assert b"\x1b]0;heel-r28" not in result.stderr, result.stderr[-3000:]  # never sent
    assert installed.stderr.endswith(b"\x1b[0mown\n"), installed.stderr[-300:]  # the command's own, as it is


def test_the_installers_output_is_cut_into_bounded_lines():
    """heel.venv._LineCutter, which the host reads the installer's output
    with: lines end at a newline or a carriage return (a progress bar's
    redraw), a line longer than _MAX_LINE is cut and its rest dropped as it
    comes, a character split between chunks is kept whole, and the last
    line without a newline comes at the end."""
    from heel.venv import _MAX_LINE, _LineCutter

    cutter = _LineCutter()
    assert cutter.feed(b"Collecting a\r\nb\rc\n") == ["Collecting a", "b", "c"]
    assert cutter.feed("é".encode()[:1]) == []
    assert cutter.feed("é".encode()[1:] + b"\n") == ["é"]
    long_line = cutter.feed(b"x" * (_MAX_LINE + 10)) + cutter.feed(b"y" * 100_000 + b"\nafter\n")
    assert long_line == ["x" * _MAX_LINE, "after"]
    assert cutter.feed(b"last") == [] and cutter.end() == ["last"]
