"""Python in a sandbox: run_python("pass") against the bare interpreter, and
building an environment with one local wheel, with pip and with uv.

    PATH=/path/to/uv/dir:$PATH python benchmarks/bench_python.py [--runs 50] [--builds 3]

1. Per snippet.  One environment is made from /usr/bin/python3 (no packages);
   inside one open sandbox whose PythonConfig is that environment,
   ``sb.run_python("pass")`` is timed ``--runs`` times after 5 warm-up calls.
   The baseline, in the same process and run: ``trio.run_process`` of that
   environment's bin/python with ``-c pass`` (the same interpreter, bare),
   and of /usr/bin/python3 ``-c pass``.  For comparison, run_python in a
   sandbox without a PythonConfig (it runs ``python3`` from the PATH) and
   the environment's interpreter run with ``sb.command(...)`` (no snippet
   file).  p50/p95 in ms, and the ratio to the bare environment interpreter.

2. Per environment.  ``VenvManager.create`` of a fresh directory with one
   local wheel (no_index, find_links), ``--builds`` times each, with pip
   (use_uv=False) and with uv (use_uv=True; skipped, with a line saying so,
   when uv is not on the PATH).  The median is broken down with the
   on_progress events: "make venv" is from the "create" event to the first
   "install" one (venv + ensurepip, or ``uv venv --seed``, on the host),
   "sandboxed install" from there to the end (opening the installer's sandbox,
   the installer, closing it), "other" the rest (the base interpreter's
   version check, reading the result).  The baseline does the same two steps
   bare on the host: the same commands heel runs (``venv``/``uv venv``, then
   the installer argv of heel.venv._installer_argv), with trio.run_process.

Everything is made under one directory in /var/tmp (a sandbox's /tmp is
private) and removed at the end, on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import zipfile

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


def build_wheel(directory: str, name: str, version: str, source: str) -> str:
    """A pure-Python wheel with one module (as tests/pkgtools.py makes them)."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": source,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: heel-bench\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n",
    }
    record = []
    for member, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{member},sha256={digest},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    path = os.path.join(directory, f"{name}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in files.items():
            wheel.writestr(member, text)
    return path


async def timed(fn, runs: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        await fn()
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - start) * 1000)
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

    rows = []
    rows.append(("bare: venv's bin/python -c pass", await timed(
        lambda: trio.run_process([python, "-c", "pass"]), runs)))
    rows.append((f"bare: {BASE_PYTHON} -c pass", await timed(
        lambda: trio.run_process([BASE_PYTHON, "-c", "pass"]), runs)))
    async with heel.Sandbox(heel.SandboxConfig(python=heel.PythonConfig(venv.path))) as sb:
        rows.append(("heel: sb.run_python('pass'), PythonConfig(venv)",
                     await timed(lambda: snippet(sb), runs)))

        async def command() -> None:
            checked(await sb.command(python).arg("-c").arg("pass").output())

        rows.append(("heel: sb.command(venv python -c pass), same sandbox",
                     await timed(command, runs)))
    async with heel.Sandbox() as sb:
        which = await sb.run_python("import sys; print(sys.executable)")
        checked(which)
        path_python = which.stdout.decode().strip()
        rows.append(("heel: sb.run_python('pass'), no PythonConfig",
                     await timed(lambda: snippet(sb), runs)))

    base = statistics.median(rows[0][1])
    print(f"run_python('pass'): {runs} runs each after 5 warm-up; environment from {BASE_PYTHON} "
          f"({venv.version[0]}.{venv.version[1]}); without PythonConfig the sandbox ran {path_python}")
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


async def build_bare(path: str, wheels: str, use_uv: bool) -> dict[str, float]:
    """The same two steps heel takes, run directly on the host."""
    uv = shutil.which("uv") if use_uv else None
    config = heel.VenvConfig(path, [WHEEL_NAME], python=BASE_PYTHON, find_links=[wheels],
                             no_index=True, use_uv=use_uv)
    env = dict(os.environ, PIP_NO_CACHE_DIR="1", PYTHONDONTWRITEBYTECODE="1", UV_NO_CACHE="1",
               UV_PYTHON_DOWNLOADS="never")
    if uv:
        make_argv = [uv, "venv", "--quiet", "--seed", "--python", BASE_PYTHON, path]
    else:
        make_argv = [BASE_PYTHON, "-I", "-m", "venv", path]
    install_argv = heel.venv._installer_argv(config, config.path, uv, [WHEEL_NAME])
    start = time.perf_counter()
    await trio.run_process(make_argv, capture_stdout=True, capture_stderr=True, env=env)
    middle = time.perf_counter()
    await trio.run_process(install_argv, capture_stdout=True, capture_stderr=True, env=env)
    end = time.perf_counter()
    return {"total": (end - start) * 1000, "make": (middle - start) * 1000,
            "install": (end - middle) * 1000, "other": 0.0}


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
    tools = [("pip", False)]
    if uv is None:
        print("uv is not on the PATH: skipping the uv rows (pip install uv, and put it on the PATH)")
    else:
        tools.append(("uv", True))
    rows = []
    notes = []
    counter = 0
    for tool, use_uv in tools:
        for label, build in ((f"bare on the host, {tool}", build_bare),
                             (f"heel: VenvManager.create, {tool}", build_with_heel)):
            samples = []
            for _ in range(builds):
                counter += 1
                path = os.path.join(work, f"env-{counter}")
                try:
                    samples.append(await build(path, wheels, use_uv))
                except heel.InstallError as exc:
                    notes.append(f"{label}: InstallError: {exc}\n--- installer output ---\n{exc.output}")
                    break
                except Exception as exc:  # a failed bare step: report it, keep going
                    detail = getattr(exc, "stderr", b"") or b""
                    notes.append(f"{label}: {type(exc).__name__}: {exc}\n"
                                 f"{detail.decode(errors='replace') if isinstance(detail, bytes) else detail}")
                    break
            rows.append((label, samples))
            if samples and build is build_with_heel:
                notes.append(f"{label}: in a sandbox the environment says: {await check_import(path)}")
    print()
    print(f"environment with one local wheel (no_index, find_links): median of {builds} fresh builds; "
          f"base {BASE_PYTHON}; uv: {uv or 'not found'}")
    print(f"{'what':40} {'total ms':>9} {'make venv':>10} {'install':>9} {'other':>7} {'min':>8} {'max':>8}")
    for name, samples in rows:
        if not samples:
            print(f"{name:40} {'failed (see below)':>9}")
            continue
        med = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
        totals = [s["total"] for s in samples]
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
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
