"""Review r31 of the changes of 2026-11-28 (98adccb..): each test does the
thing for real, with a sandbox, and looks from the host, next to a control
that shows the observation can tell."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import trio

import heel

# ---- closing a sandbox from one of its IPC handlers ---------------------------------

#: The host, in a process of its own (a close that hangs is shielded: no
#: cancel scope of the test could end it).  The sandbox's command calls
#: "shutdown"; with argv[1] == "in_handler" the handler closes the sandbox
#: itself, else (the control) it tells the main task, which closes it.
CLOSE_FROM_HANDLER = textwrap.dedent(r"""
    import sys, time, trio, heel

    async def main(how):
        router = heel.IpcRouter()
        box = {}
        asked = trio.Event()

        @router.command("shutdown")
        async def shutdown() -> str:
            if how == "in_handler":
                await box["sb"].aclose()
            else:
                asked.set()
            return "ok"

        start = time.monotonic()
        async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
            box["sb"] = sb
            process = await sb.python().args(
                ["-c", "from heel.client import call; call('shutdown'); import time; time.sleep(60)"]).spawn()
            if how == "in_handler":
                await process.wait()
            else:
                await asked.wait()
                await sb.aclose()
        print("closed", round(time.monotonic() - start, 2), flush=True)

    trio.run(main, sys.argv[1])
""")


@pytest.mark.parametrize("how", ["in_handler", "control"])
def test_an_ipc_handler_can_close_its_own_sandbox(how):
    """d992e1f made aclose() wait, shielded (and through Ctrl-C, see
    finish_despite_ctrl_c), for the whole IPC task to end before the broker
    is closed.  That task is the nursery of every connection's handlers: a
    handler that closes its own sandbox (an IPC command "shutdown") waits in
    aclose() for the IPC task, which waits for the handler: the host hangs
    for good.  Before d992e1f the same close took some 0.2 s.  The control:
    the handler only tells the main task, which closes the sandbox."""
    try:
        result = subprocess.run([sys.executable, "-c", CLOSE_FROM_HANDLER, how],
                                capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("closing the sandbox from its IPC handler never finished (60 s)")
    assert result.returncode == 0 and result.stdout.startswith("closed"), result.stderr[-3000:]


# ---- a base Python named with a NUL in pyvenv.cfg ----------------------------------

SYSTEM_PYTHON = "/usr/bin/python3"

#: In an allow_pip_install sandbox: rewrite the environment's pyvenv.cfg so
#: that its `home` is argv[1] (with "<NUL>" made a NUL byte).
REWRITE_HOME = r"""
import os, sys
cfg = os.path.join(sys.prefix, "pyvenv.cfg")
lines = [l for l in open(cfg).read().splitlines() if not l.startswith("home")]
with open(cfg, "w") as f:
    f.write("\n".join(lines + ["home = " + sys.argv[1].replace("<NUL>", "\0")]) + "\n")
print("rewritten")
"""


@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason="needs /usr/bin/python3")
@pytest.mark.parametrize("home", ["/usr<NUL>x/bin", "/nonexistent/bin"], ids=["nul", "control"])
async def test_a_nul_in_pyvenv_cfgs_home_is_no_traceback(venv_dir, home):
    """07a8190 resolves pyvenv.cfg's `home` at once (os.path.realpath), at
    every level; before, the path was only resolved at STRICT, after
    os.path.isdir (which says False for a NUL).  pyvenv.cfg is the
    sandbox's to write (allow_pip_install), and os.path.realpath raises
    ValueError on a NUL byte: every later sandbox of the environment failed
    to open with a ValueError traceback instead of opening (as it did) or a
    HeelError.  The control: a `home` that names nothing."""
    venv = heel.VenvConfig(venv_dir, python=SYSTEM_PYTHON)
    with trio.fail_after(240):
        await heel.VenvManager.create(venv)
        async with heel.Sandbox(heel.SandboxConfig(python=heel.PythonConfig(venv, allow_pip_install=True))) as sb:
            out = await sb.python().args(["-c", REWRITE_HOME, home]).timeout(60).output()
            assert b"rewritten" in out.stdout, out
        with open(os.path.join(venv_dir, "pyvenv.cfg"), "rb") as f:
            assert home.replace("<NUL>", "\0").encode() in f.read()
        try:
            async with heel.Sandbox(heel.SandboxConfig(python=heel.PythonConfig(venv))) as sb:
                ran = await sb.command("true").timeout(30).output()
            assert ran.returncode == 0, ran
        except heel.HeelError:
            pass  # refused cleanly: fine too
