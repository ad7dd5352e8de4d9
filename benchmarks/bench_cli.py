"""CLI start-up: `python -m heel run -- true` against `python -c pass`.

    python benchmarks/bench_cli.py [--runs 40]

Both are run as whole processes, alternately, with the same interpreter, and
the table gives p50/p95 in milliseconds and the ratio of the medians.  They
run from / so that the heel measured is the installed one: from a source
tree, `-m heel` would import the tree's modules, which may have no bytecode
(PYTHONDONTWRITEBYTECODE), and compiling them every time doubles the figure.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

VARIANTS = [
    ("python -c pass", [sys.executable, "-c", "pass"]),
    ("python -m heel run -- true", [sys.executable, "-m", "heel", "run", "--", "true"]),
    ("python -m heel run --level strict -- true",
     [sys.executable, "-m", "heel", "run", "--level", "strict", "--", "true"]),
]


def main(runs: int) -> None:
    samples: dict[str, list[float]] = {name: [] for name, _ in VARIANTS}
    for _ in range(3):  # warm the page cache
        for _, argv in VARIANTS:
            subprocess.run(argv, check=True, cwd="/")
    for _ in range(runs):
        for name, argv in VARIANTS:
            start = time.perf_counter()
            subprocess.run(argv, check=True, cwd="/")
            samples[name].append((time.perf_counter() - start) * 1000)
    base = statistics.median(samples[VARIANTS[0][0]])
    where = subprocess.run([sys.executable, "-c", "import heel; print(heel.__file__)"],
                           check=True, cwd="/", capture_output=True, text=True).stdout.strip()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, Linux {platform.release()}, "
          f"Python {platform.python_version()} ({sys.executable}), {runs} runs each")
    print(f"heel: {where}")
    print(f"{'what':44} {'p50 ms':>8} {'p95 ms':>8} {'x base':>7}")
    for name, values in samples.items():
        ordered = sorted(values)
        p50 = statistics.median(values)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        print(f"{name:44} {p50:8.1f} {p95:8.1f} {p50 / base:7.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    main(parser.parse_args().runs)
