"""Per-command cost: `true` in a heel sandbox against trio.run_process(["true"]).

    python benchmarks/bench_spawn.py [--runs 300]

Prints a table of p50/p95 in milliseconds, with the baseline measured in the
same process, and the ratio.  Also breaks the sandbox cost down by layer
(the same command with fewer layers), so a regression shows where it is.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import trio

import heel
import heel._probe


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed(fn, runs: int) -> list[float]:
    for _ in range(min(20, runs)):  # warm up caches, the probe, trio's loop
        await fn()
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


async def main(runs: int) -> None:
    rows = []
    rows.append(("trio.run_process(['true'])", await timed(lambda: trio.run_process(["true"]), runs)))
    async with heel.Sandbox() as sb:
        rows.append(("heel: sb.command('true').status()",
                     await timed(lambda: sb.command("true").status(), runs)))
    for level in ("strict", "permissive"):
        async with heel.Sandbox(heel.SandboxConfig(level=level)) as sb:
            rows.append((f"heel, level={level}", await timed(lambda: sb.command("true").status(), runs)))
    async def open_and_close() -> None:
        async with heel.Sandbox():
            pass

    rows.append(("open + close a sandbox (per sandbox, not per command)",
                 await timed(open_and_close, max(20, runs // 10))))
    # The same without namespaces (the best-effort fallback): shows their share.
    env, _ = heel._probe.environment()
    real = heel._probe.environment
    heel._probe.environment = lambda: (env._replace(namespaces=False), "benchmark")
    try:
        async with heel.Sandbox(heel.SandboxConfig(best_effort=True)) as sb:
            rows.append(("heel without namespaces (best effort)",
                         await timed(lambda: sb.command("true").status(), runs)))
    finally:
        heel._probe.environment = real

    base = statistics.median(rows[0][1])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, Linux {platform.release()}, "
          f"Python {platform.python_version()}, {runs} runs each")
    print(f"{'what':54} {'p50 ms':>8} {'p95 ms':>8} {'x base':>7}")
    for name, samples in rows:
        p50 = statistics.median(samples)
        print(f"{name:54} {p50:8.2f} {percentile(samples, 0.95):8.2f} {p50 / base:7.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    trio.run(main, parser.parse_args().runs)
