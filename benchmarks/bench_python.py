"""Python in a sandbox: run_python("pass") against the bare interpreter, and
building an environment with one local wheel, with pip and with uv.

    PATH=/path/to/uv/dir:$PATH python benchmarks/bench_python.py [--runs 50] [--builds 3]

1. Per snippet.  One environment is made from /usr/bin/python3 (no packages);
   inside one open sandbox whose PythonConfig is that environment,
   ``sb.run_python("pass")`` is timed ``--runs`` times after 5 warm-up calls.
   The baseline, in the same process and run: ``trio.run_process`` of that
   environment's bin/python with ``-c pass`` (the same interpreter, bare;
   also with both streams captured, as run_python does), and of
   /usr/bin/python3 ``-c pass``.  For comparison, run_python in a sandbox
   without a PythonConfig (it runs ``python3`` from the PATH) and the
   environment's interpreter run with ``sb.command(...)`` (no snippet file).
   The variants take turns, one run each per round, so that drift on a
   small machine hits them alike.  p50/p95 in ms, and the ratio to the bare
   environment interpreter.

2. Per environment.  ``VenvManager.create`` of a fresh directory with one
   local wheel (no_index, find_links), ``--builds`` times each, with pip
   (use_uv=False) and with uv (use_uv=True; skipped, with a line saying so,
   when uv is not on the PATH).  The median is broken down with the
   on_progress events: "make venv" is from the "create" event to the first
   "install" one (on the host: with pip, the standard library's venv with
   ensurepip; with uv, ``uv venv`` and the base Python's own pip wheel
   installed by uv, offline), "install" (sandboxed) from there to the end
   (opening the installer's sandbox, the installer, closing it), "other" the
   rest (the base interpreter's version check, reading the result).  The
   baseline does the same steps bare on the host: the same commands heel
   runs (then the installer argv of heel.venv._installer_argv), with
   trio.run_process; and, for reference, what uv alone takes (``uv venv``,
   which puts no pip in the environment, then ``uv pip install``).  Bare and
   heel builds alternate.

Everything is made under one directory in /var/tmp (a sandbox's /tmp is
private) and removed at the end, on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time

import trio

import heel
import heel.venv

BASE_PYTHON = "/usr/bin/python3"
WHEEL_NAME = "heelbench"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# The tests' tiny-wheel builder, rather than a copy of it.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
from pkgtools import build_wheel  # noqa: E402


async def timed_round_robin(variants: dict, runs: int, warmup: int = 5) -> dict[str, list[float]]:
    """Each variant ``warmup`` times, then one run of each in turn, ``runs``
    rounds: on a small, noisy machine drift then hits every variant alike."""
    for fn in variants.values():
        for _ in range(warmup):
            await fn()
    out: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, fn in variants.items():
            start = time.perf_counter()
            await fn()
            out[name].append((time.perf_counter() - start) * 1000)
    return out


def checked(output: heel.Output) -> None:
    if not output.success:
        raise SystemExit(f"exit {output.returncode}: {output.stderr.decode(errors='replace')}")


async def per_snippet(work: str, runs: int) -> None:
    venv = await heel.VenvManager.create(
        heel.VenvConfig(os.path.join(work, "base"), python=BASE_PYTHON, use_uv=False))
    python = os.fspath(venv.python)

    async def snippet(sb: heel.Sandbox) -> None:
        checked(await sb.run_python("pass"))

    async def command(sb: heel.Sandbox) -> None:
        checked(await sb.command(python).arg("-c").arg("pass").output())

    with_venv = heel.SandboxConfig(python=heel.PythonConfig(venv.path))
    async with heel.Sandbox(with_venv) as sb, heel.Sandbox() as plain:
        which = await plain.run_python("import sys; print(sys.executable)")
        checked(which)
        path_python = which.stdout.decode().strip()
        variants = {
            "bare: venv's bin/python -c pass": lambda: trio.run_process([python, "-c", "pass"]),
            f"bare: {BASE_PYTHON} -c pass": lambda: trio.run_process([BASE_PYTHON, "-c", "pass"]),
            # run_python captures both streams: the same, bare.
            "bare: venv's python -c pass, output captured": lambda: trio.run_process(
                [python, "-c", "pass"], capture_stdout=True, capture_stderr=True),
            "heel: sb.run_python('pass'), PythonConfig(venv)": lambda: snippet(sb),
            "heel: sb.command(venv python -c pass), same sandbox": lambda: command(sb),
            "heel: sb.run_python('pass'), no PythonConfig": lambda: snippet(plain),
        }
        rows = list((await timed_round_robin(variants, runs)).items())

    base = statistics.median(rows[0][1])
    print(f"run_python('pass'): {runs} rounds (variants alternate) after 5 warm-up runs of each; "
          f"environment from {BASE_PYTHON} ({venv.version[0]}.{venv.version[1]}); "
          f"without PythonConfig the sandbox ran {path_python}")
    print(f"{'what':54} {'p50 ms':>8} {'p95 ms':>8} {'x base':>7}")
    for name, samples in rows:
        p50 = statistics.median(samples)
        print(f"{name:54} {p50:8.2f} {percentile(samples, 0.95):8.2f} {p50 / base:7.2f}")


async def build_with_heel(path: str, wheels: str, use_uv: bool) -> dict[str, float]:
    events: list[tuple[float, heel.VenvProgress]] = []
    config = heel.VenvConfig(path, [WHEEL_NAME], python=BASE_PYTHON, find_links=[wheels],
                             no_index=True, use_uv=use_uv)
    start = time.perf_counter()
    await heel.VenvManager.create(config, on_progress=lambda p: events.append((time.perf_counter(), p)))
    end = time.perf_counter()
    created = next(t for t, p in events if p.phase == "create")
    install = next(t for t, p in events if p.phase == "install")
    total = end - start
    make = install - created
    rest = end - install
    return {"total": total * 1000, "make": make * 1000, "install": rest * 1000,
            "other": (total - make - rest) * 1000}


async def run_group(argv: list[str], env: dict[str, str]) -> None:
    """trio.run_process in a session of its own, whose every process is
    killed when cancelled (ensurepip's child too)."""
    async def kill_group(process: trio.Process) -> None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    await trio.run_process(argv, capture_stdout=True, capture_stderr=True, env=env,
                           start_new_session=True, deliver_cancel=kill_group)


async def build_bare(path: str, wheels: str, use_uv: bool, uv_venv: bool = False) -> dict[str, float]:
    """The same two steps heel takes, run directly on the host; uv_venv:
    make the environment with ``uv venv`` (no pip in it) instead."""
    uv = shutil.which("uv") if use_uv else None
    config = heel.VenvConfig(path, [WHEEL_NAME], python=BASE_PYTHON, find_links=[wheels],
                             no_index=True, use_uv=use_uv)
    env = dict(os.environ, PIP_NO_CACHE_DIR="1", PYTHONDONTWRITEBYTECODE="1", UV_NO_CACHE="1",
               UV_PYTHON_DOWNLOADS="never")
    make_argvs = []
    if uv:  # as heel.venv._make_venv does with uv: uv venv, then the base's own pip wheel
        make_argvs.append([uv, "venv", "--quiet", "--python", BASE_PYTHON, path])
        wheel = heel.venv._bundled_pip_wheel(Path(BASE_PYTHON))
        if not uv_venv and wheel is not None:
            make_argvs.append([uv, "pip", "install", "--quiet", "--offline", "--no-index",
                               "--python", os.path.join(path, "bin", "python"), str(wheel)])
    else:  # without uv, as heel does: venv without pip, then pip from the base's wheel installs itself
        wheel = heel.venv._bundled_pip_wheel(Path(BASE_PYTHON))
        make_argvs.append([BASE_PYTHON, "-I", "-m", "venv", "--without-pip", path])
        make_argvs.append([os.path.join(path, "bin", "python"), "-I", "-c", heel.venv._PIP_FROM_WHEEL, str(wheel),
                           "install", "--quiet", "--no-cache-dir", "--no-index", "--disable-pip-version-check",
                           str(wheel)])
    install_argv = heel.venv._installer_argv(config, config.path, uv, [WHEEL_NAME])
    start = time.perf_counter()
    for argv in make_argvs:
        await run_group(argv, env)
    middle = time.perf_counter()
    await run_group(install_argv, env)
    end = time.perf_counter()
    return {"total": (end - start) * 1000, "make": (middle - start) * 1000,
            "install": (end - middle) * 1000, "other": 0.0}


async def build_uv_only(path: str, wheels: str, use_uv: bool) -> dict[str, float]:
    return await build_bare(path, wheels, use_uv, uv_venv=True)


async def check_import(path: str) -> str:
    """What the built environment says inside a sandbox (a check, not timed)."""
    config = heel.SandboxConfig(python=heel.PythonConfig(path))
    async with heel.Sandbox(config) as sb:
        out = await sb.run_python(f"import {WHEEL_NAME}, sys; print({WHEEL_NAME}.VALUE, sys.prefix)")
    if not out.success:
        return f"FAILED (exit {out.returncode}): {out.stderr.decode(errors='replace').strip()}"
    return out.stdout.decode().strip()


async def per_environment(work: str, builds: int) -> None:
    wheels = os.path.join(work, "wheels")
    os.mkdir(wheels, 0o755)
    build_wheel(wheels, WHEEL_NAME, "1.0", "VALUE = 42\n")
    uv = shutil.which("uv")
    tools = ["pip"]
    if uv is None:
        print("uv is not on the PATH: skipping the uv rows (pip install uv, and put it on the PATH)")
    else:
        tools.append("uv")
    labels = {}
    for tool in tools:
        labels[(tool, build_bare)] = f"bare on the host, {tool}"
        labels[(tool, build_with_heel)] = f"heel: VenvManager.create, {tool}"
    if "uv" in tools:
        labels[("uv", build_uv_only)] = "bare: uv venv + uv pip (no pip in env)"
    samples: dict[str, list[dict[str, float]]] = {label: [] for label in labels.values()}
    last_built: dict[str, str] = {}
    failed: set[str] = set()
    notes = []
    counter = 0
    # Bare and heel builds alternate, so that drift on the machine hits both.
    for _ in range(builds):
        for (tool, build), label in labels.items():
            if label in failed:
                continue
            counter += 1
            path = os.path.join(work, f"env-{counter}")
            try:
                samples[label].append(await build(path, wheels, tool == "uv"))
                last_built[label] = path
            except heel.InstallError as exc:
                failed.add(label)
                notes.append(f"{label}: InstallError: {exc}\n--- installer output ---\n{exc.output}")
            except Exception as exc:  # report it and keep going with the other rows
                failed.add(label)
                detail = getattr(exc, "stderr", None)
                detail = detail.decode(errors="replace") if isinstance(detail, bytes) else ""
                notes.append(f"{label}: {type(exc).__module__}.{type(exc).__name__}: {exc}"
                             + (f"\n{detail.strip()}" if detail.strip() else ""))
    for (tool, build), label in labels.items():
        if build is build_with_heel and label not in failed:
            notes.append(f"{label}: in a sandbox, the environment prints: "
                         f"{await check_import(last_built[label])}")
    rows = [(label, [] if label in failed else samples[label]) for label in labels.values()]
    print()
    print(f"environment with one local wheel (no_index, find_links): median of {builds} fresh builds; "
          f"base {BASE_PYTHON}; uv: {uv or 'not found'}")
    print(f"{'what':40} {'total ms':>9} {'make venv':>10} {'install':>9} {'other':>7} {'min':>8} {'max':>8}")
    for name, runs in rows:
        if not runs:
            print(f"{name:40} {'failed (see below)':>9}")
            continue
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        totals = [r["total"] for r in runs]
        print(f"{name:40} {med['total']:9.0f} {med['make']:10.0f} {med['install']:9.0f} {med['other']:7.0f} "
              f"{min(totals):8.0f} {max(totals):8.0f}")
    for note in notes:
        print(note)


async def main(work: str, runs: int, builds: int) -> None:
    uv = shutil.which("uv")
    uv_version = ""
    if uv:
        uv_version = (await trio.run_process([uv, "--version"], capture_stdout=True)).stdout.decode().strip()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus ({cpu_model()}), Linux {platform.release()}, "
          f"host Python {platform.python_version()}, euid {os.geteuid()}"
          + (f", {uv_version}" if uv_version else ""))
    await per_snippet(work, runs)
    await per_environment(work, builds)


def interrupted(exc: BaseException) -> bool:
    """Ctrl-C, possibly inside trio's exception groups."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    inner = getattr(exc, "exceptions", None)
    return bool(inner) and all(interrupted(e) for e in inner)


def remove(workdir: str) -> None:
    # After Ctrl-C, the ensurepip child of a `python -m venv` that heel was
    # running lives on for a few seconds and makes its directories again:
    # remove until the directory has stayed gone for two seconds.
    gone_since = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if os.path.lexists(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
            gone_since = None
        elif gone_since is None:
            gone_since = time.monotonic()
        elif time.monotonic() - gone_since > 2:
            return
        time.sleep(0.25)
    print(f"could not remove {workdir}", file=sys.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--builds", type=int, default=3)
    options = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="heel-bench-python-", dir="/var/tmp")
    try:
        # Run as root, the sandbox's uid is not root: it must be able to enter.
        os.chmod(workdir, 0o755)
        trio.run(main, workdir, options.runs, options.builds)
    except BaseException as exc:
        if not interrupted(exc):
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        remove(workdir)
