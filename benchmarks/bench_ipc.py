"""IPC: heel.client.call round trips from inside a sandbox.

    python benchmarks/bench_ipc.py [--calls 2000]

Prints p50/p95 of one call's round trip (measured inside the sandbox), the
first call on a fresh connection (which the host takes and sets up), the
calls per second of 8 concurrent callers, and `heel ipc` as a whole process
against `python3 -c pass`, both run inside the same sandbox.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import trio

import heel

LATENCY = """
import json, sys, time
from heel import client
from heel.client import call
n = int(sys.argv[1])
for _ in range(50):
    call("noop")
samples = []
for _ in range(n):
    t = time.perf_counter()
    call("noop")
    samples.append((time.perf_counter() - t) * 1e6)
samples.sort()
fresh = []
for _ in range(max(1, n // 4)):
    client._drop()  # the next call opens a new connection
    t = time.perf_counter()
    call("noop")
    fresh.append((time.perf_counter() - t) * 1e6)
fresh.sort()
print(json.dumps({"p50": samples[n // 2], "p95": samples[int(n * 0.95)], "fresh_p50": fresh[len(fresh) // 2],
                  "fresh_p95": fresh[int(len(fresh) * 0.95)]}))
"""

THROUGHPUT = """
import json, os, sys, time
from heel.client import call
n, workers = int(sys.argv[1]), 8
call("noop")
start = time.perf_counter()
pids = []
for _ in range(workers):
    pid = os.fork()
    if pid == 0:
        for _ in range(n):
            call("noop")
        os._exit(0)
    pids.append(pid)
for pid in pids:
    os.waitpid(pid, 0)
print(json.dumps({"per_second": n * workers / (time.perf_counter() - start)}))
"""

PROCESSES = """
import json, statistics, subprocess, sys, time
runs = int(sys.argv[1])
# The third is `heel ipc` as it was before heel._minipack: msgpack imported.
with_msgpack = ("import sys; from heel import _ipc_codec; _ipc_codec._msgpack(); "
                "from heel.client import main; sys.exit(main(['noop']))")
variants = {"python3 -c pass": ["python3", "-c", "pass"], "heel ipc noop": ["heel", "ipc", "noop"],
            "with msgpack": ["python3", "-S", "-c", with_msgpack]}
times = {name: [] for name in variants}
for _ in range(runs):
    for name, argv in variants.items():
        t = time.perf_counter()
        # pass_fds: Python's subprocess closes every other fd, the IPC socket included.
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, pass_fds=(3,))
        times[name].append((time.perf_counter() - t) * 1000)
print(json.dumps({name: statistics.median(v) for name, v in times.items()}))
"""


async def main(calls: int) -> None:
    router = heel.IpcRouter()

    @router.command("noop")
    async def noop() -> None:
        return None

    async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
        async def run(script: str, *args: str) -> dict:
            out = await sb.command("python3").arg("-c").arg(script).args(args).output()
            if out.returncode != 0:
                raise SystemExit(out.stderr.decode())
            return json.loads(out.stdout)

        latency = await run(LATENCY, str(calls))
        throughput = await run(THROUGHPUT, str(max(1, calls // 8)))
        processes = await run(PROCESSES, "30")

    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, Linux {platform.release()}, "
          f"host Python {platform.python_version()}")
    print(f"{'what':46} {'value':>12}")
    print(f"{'call() round trip p50 (us)':46} {latency['p50']:12.1f}")
    print(f"{'call() round trip p95 (us)':46} {latency['p95']:12.1f}")
    print(f"{'first call on a fresh connection p50 (us)':46} {latency['fresh_p50']:12.1f}")
    print(f"{'first call on a fresh connection p95 (us)':46} {latency['fresh_p95']:12.1f}")
    print(f"{'calls per second, 8 concurrent callers':46} {throughput['per_second']:12.0f}")
    base = processes["python3 -c pass"]
    print(f"{'python3 -c pass, whole process (ms)':46} {base:12.1f}")
    print(f"{'heel ipc noop, whole process (ms)':46} {processes['heel ipc noop']:12.1f}"
          f"   ({processes['heel ipc noop'] / base:.2f}x)")
    print(f"{'  the same, importing msgpack as before (ms)':46} {processes['with msgpack']:12.1f}"
          f"   ({processes['with msgpack'] / base:.2f}x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    trio.run(main, parser.parse_args().calls)
