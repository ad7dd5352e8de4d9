"""Red-team review r28: attacks from a sandbox (or a file heel reads) on the
host's memory and on heel's clean errors, each next to its allowed
neighbour.  Every attack is done for real and observed from the host."""

from __future__ import annotations

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


@pytest.fixture
def venv_dir():
    base = tempfile.mkdtemp(prefix="heel-venv-r28-", dir="/var/tmp")
    os.chmod(base, 0o755)
    yield os.path.join(base, "env")
    shutil.rmtree(base, ignore_errors=True)


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
