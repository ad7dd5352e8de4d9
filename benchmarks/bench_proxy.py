"""The proxy: CONNECT tunnel throughput and the latency a tunnel adds.

    python benchmarks/bench_proxy.py [--size-mib 1024] [--streams 1 32] [--runs 3]
                                     [--connections 500]

Three paths to the same loopback servers, measured in the same run:
``direct`` (the client connects to the server), ``heel`` (heel.proxy.Proxy,
standalone in a child process running trio, policy AllowList(["127.0.0.1"]),
no credential required; after the CONNECT the C splice relay moves the bytes)
and ``tinyproxy`` (the Debian package, run in the foreground with a generated
config, when ``tinyproxy`` is on PATH; the script installs nothing).

Throughput: a sink process accepts N connections and reads each with
recv_into() into a 1 MiB buffer, one thread per connection, counting bytes;
a sender process opens N connections (through the proxy: CONNECT, then the
200 head is read), and once every tunnel is up, writes --size-mib MiB in
total (size/N each) with send() of 1 MiB memoryview slices, one thread per
connection.  Python does a system call per MiB on either side, so it is not
what limits; the direct row shows what sender and sink alone reach.  The
clock runs from the sender's first byte to the sink having counted every
byte (time.perf_counter is CLOCK_MONOTONIC, shared by the processes).
Each transfer gets fresh sender and sink processes.  Direct and heel
alternate over --runs rounds; then heel and tinyproxy alternate over as many
(a tinyproxy transfer keeps both cores at 100% for seconds and leaves the
machine in another state for whatever runs next, so it stays out of the
rounds that compare heel with direct).  The table shows medians, the ratios
being medians of the per-round ratios of each phase (this machine's speed
drifts); tinyproxy against direct goes through heel.  "CPU busy"
is the share of all cores' time not idle during the transfer (/proc/stat),
"proxy CPU s/GiB" the CPU time of the proxy process (all its threads) per
GiB carried: when direct already keeps every core busy, a proxy, which moves
each byte once more, cannot keep up with it.

Latency: --connections sequential tunnels per path, the paths alternating
connection by connection, from one client process against a one-thread
echo server (selectors).  Each sample is connect() + (CONNECT request +
200 head) + a 1-byte round trip through the connection, then close;
``added`` is the proxy's p50 minus the direct p50.  The "to 200" column is
connect() until the 200 head was read (direct: connect() alone).

Sender, sink, the proxy (its trio loop and its relay threads: heel's own
choice, or --relay-threads) and tinyproxy all share this machine's cores;
the output says how many.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

SINK = r"""
import socket, sys, threading, time
streams, total = int(sys.argv[1]), int(sys.argv[2])
share = total // streams
listener = socket.create_server(("127.0.0.1", 0), backlog=streams)
print(listener.getsockname()[1], flush=True)
conns = [listener.accept()[0] for _ in range(streams)]
counts = [0] * streams
ends = [0.0] * streams

def receive(i):
    view = memoryview(bytearray(1 << 20))
    n = 0
    while n < share:
        got = conns[i].recv_into(view)
        if not got:
            break
        n += got
    ends[i] = time.perf_counter()
    counts[i] = n

threads = [threading.Thread(target=receive, args=(i,)) for i in range(streams)]
for t in threads: t.start()
for t in threads: t.join()
print(max(ends), sum(counts), flush=True)
for c in conns: c.close()
"""

SENDER = r"""
import socket, sys, threading, time
streams, total, port, target = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
share = total // streams
chunk = memoryview(bytes(1 << 20))

def open_conn():
    if target == "direct":
        return socket.create_connection(("127.0.0.1", port))
    conn = socket.create_connection(("127.0.0.1", int(target)))
    conn.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (port, port))
    head = b""
    while b"\r\n\r\n" not in head:
        more = conn.recv(4096)
        if not more:
            raise SystemExit("proxy closed the connection")
        head += more
    if head.split(None, 2)[1] != b"200" or not head.endswith(b"\r\n\r\n"):
        raise SystemExit(f"proxy answered {head!r}")
    return conn

conns = [open_conn() for _ in range(streams)]
print("connected", flush=True)
sys.stdin.readline()

def send(conn):
    left = share
    while left:
        left -= conn.send(chunk[:min(len(chunk), left)])
    conn.close()

threads = [threading.Thread(target=send, args=(c,)) for c in conns]
start = time.perf_counter()
for t in threads: t.start()
for t in threads: t.join()
print(start, flush=True)
"""

ECHO = r"""
import selectors, socket
sel = selectors.DefaultSelector()
listener = socket.create_server(("127.0.0.1", 0), backlog=128)
listener.setblocking(False)
sel.register(listener, selectors.EVENT_READ)
print(listener.getsockname()[1], flush=True)
while True:
    for key, _ in sel.select():
        sock = key.fileobj
        if sock is listener:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setblocking(False)
            sel.register(conn, selectors.EVENT_READ)
            continue
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            data = b""
        if data:
            sock.sendall(data)   # a byte or two: fits the send buffer
        else:
            sel.unregister(sock)
            sock.close()
"""

LATENCY = r"""
import json, socket, sys, time
n, echo_port = int(sys.argv[1]), int(sys.argv[2])
paths = [(name, int(port)) for name, port in (arg.split("=") for arg in sys.argv[3:])]
request = b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (echo_port, echo_port)

def once(proxy_port):
    t0 = time.perf_counter()
    conn = socket.create_connection(("127.0.0.1", proxy_port or echo_port))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if proxy_port:
        conn.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            more = conn.recv(4096)
            if not more:
                raise SystemExit("proxy closed the connection")
            head += more
        if head.split(None, 2)[1] != b"200":
            raise SystemExit(f"proxy answered {head!r}")
    t1 = time.perf_counter()
    conn.sendall(b"x")
    if conn.recv(1) != b"x":
        raise SystemExit("no echo")
    t2 = time.perf_counter()
    conn.close()
    return (t2 - t0) * 1e6, (t1 - t0) * 1e6

for _ in range(20):   # warm up
    for _, port in paths:
        once(port)
total = {name: [] for name, _ in paths}
to_200 = {name: [] for name, _ in paths}
for _ in range(n):
    for name, port in paths:
        a, b = once(port)
        total[name].append(a)
        to_200[name].append(b)
print(json.dumps({"total": total, "to_200": to_200}))
"""

HEEL_PROXY = r"""
import socket, sys, trio, heel, heel.proxy, heel._relay

threads = int(sys.argv[1])
if threads:
    heel._relay._restart_pool(threads)
print(len(heel._relay._get_pool()), flush=True)   # the threads that started

async def main():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    proxy = heel.proxy.Proxy(heel.AllowList(["127.0.0.1"]), listener, secret="x",
                             require_secret=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        print(listener.getsockname()[1], flush=True)
        # Serve until the parent closes our stdin (or kills us).
        while await trio.to_thread.run_sync(sys.stdin.buffer.read, 1, abandon_on_cancel=True):
            pass
        nursery.cancel_scope.cancel()

trio.run(main)
"""


class Children:
    """Every process this script starts, stopped (TERM, then KILL) on close."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def python(self, script: str, *args: object, stdin: bool = False) -> subprocess.Popen:
        return self.start([sys.executable, "-c", script, *map(str, args)], stdin=stdin)

    def start(self, argv: list[str], *, stdin: bool = False, **kw) -> subprocess.Popen:
        proc = subprocess.Popen(argv, text=True, stdout=subprocess.PIPE,
                                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)


def read_line(proc: subprocess.Popen, what: str) -> str:
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise SystemExit(f"{what} exited ({proc.returncode}) before answering")
    return line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited ({proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} is not listening on {port}")


def start_tinyproxy(children: Children, tmp: str) -> tuple[int, str, int] | None:
    binary = shutil.which("tinyproxy")
    if binary is None:
        return None
    port = free_port()
    conf = os.path.join(tmp, "tinyproxy.conf")
    log = os.path.join(tmp, "tinyproxy.log")
    # No ConnectPort line: CONNECT to any port.  No Upstream, no filters.
    with open(conf, "w") as f:
        f.write(f"Port {port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 1024\n"
                f"Allow 127.0.0.1\nLogLevel Critical\nLogFile \"{log}\"\n")
    proc = children.start([binary, "-d", "-c", conf], stderr=subprocess.DEVNULL)
    wait_listening(port, proc, "tinyproxy")
    version = subprocess.run([binary, "-v"], capture_output=True, text=True).stdout.strip()
    return port, version or "tinyproxy", proc.pid


def machine_cpu() -> tuple[int, int]:
    """(busy, total) clock ticks of all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sample(NamedTuple):
    gib_s: float
    busy: float          # fraction of all cores' time that was busy
    proxy_cpu: float     # proxy process CPU seconds per GiB (0 for direct)


def transfer(children: Children, streams: int, total: int, target: str,
             proxy_pid: int | None) -> Sample:
    """One transfer over ``target`` ("direct" or a proxy's port)."""
    sink = children.python(SINK, streams, total)
    sink_port = int(read_line(sink, "sink"))
    sender = children.python(SENDER, streams, total, sink_port, target, stdin=True)
    read_line(sender, "sender")
    if target != "direct":
        time.sleep(0.05)   # the proxy hands each tunnel to its relay after the 200
    busy0, all0 = machine_cpu()
    proxy0 = process_cpu(proxy_pid) if proxy_pid else 0.0
    sender.stdin.write("go\n")
    sender.stdin.flush()
    start = float(read_line(sender, "sender"))
    end, received = read_line(sink, "sink").split()
    busy1, all1 = machine_cpu()
    proxy1 = process_cpu(proxy_pid) if proxy_pid else 0.0
    sender.wait()
    sink.wait()
    children.stop(sender)
    children.stop(sink)
    if int(received) != total:
        raise SystemExit(f"{target}: the sink counted {received} bytes of {total}")
    gib = total / (1 << 30)
    return Sample(gib / (float(end) - start), (busy1 - busy0) / max(1, all1 - all0),
                  (proxy1 - proxy0) / gib)


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main(size_mib: int, streams_list: list[int], runs: int, connections: int,
         relay_threads: int) -> None:
    total = size_mib << 20
    for streams in streams_list:
        if total % streams:
            raise SystemExit(f"--size-mib {size_mib} does not split into {streams} equal streams")
    children = Children()
    tmp = tempfile.mkdtemp(prefix="bench_proxy.")
    try:
        heel_proxy = children.python(HEEL_PROXY, relay_threads, stdin=True)
        threads = int(read_line(heel_proxy, "heel proxy"))
        heel_port = int(read_line(heel_proxy, "heel proxy"))
        tiny = start_tinyproxy(children, tmp)
        paths: list[tuple[str, str]] = [("direct", "direct"), ("heel", str(heel_port))]
        pids = {"direct": None, "heel": heel_proxy.pid}
        if tiny:
            paths.append(("tinyproxy", str(tiny[0])))
            pids["tinyproxy"] = tiny[2]

        print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {platform.machine()}, "
              f"Linux {platform.release()}, Python {platform.python_version()}")
        busy0, all0 = machine_cpu()
        time.sleep(1)
        busy1, all1 = machine_cpu()
        background = (busy1 - busy0) / max(1, all1 - all0)
        print(f"sender, sink, heel's proxy (trio loop + {threads} relay thread{'s' * (threads > 1)}"
              f"{'' if relay_threads else ', its default here'}) and tinyproxy share "
              f"{os.cpu_count()} cores")
        print(f"before the run: {background * 100:.0f}% of the cores busy with other work (1 s), "
              f"load average {load_average()}; other work skews every number below")
        print(f"tinyproxy: {tiny[1]}" if tiny else
              "tinyproxy: not installed (no tinyproxy on PATH); its row and ratios are left out")
        print()

        # ---- throughput ----
        print(f"CONNECT tunnel throughput: {size_mib} MiB in total per transfer, "
              f"median of {runs} interleaved runs")
        header = f"{'streams':>7}  {'path':10} {'GiB/s':>7} {'vs direct':>10}"
        if tiny:
            header += f" {'vs tinyproxy':>13}"
        header += f" {'CPU busy':>9} {'proxy CPU s/GiB':>16}"
        print(header)
        summary: dict[int, dict[str, float]] = {}
        for streams in streams_list:
            # Two phases: direct and heel alternate, then heel and tinyproxy.
            # A tinyproxy transfer (seconds of both cores at 100%) leaves the
            # machine in another state for whatever runs next, so it is kept
            # out of the rounds that compare heel with direct.
            samples: dict[str, list[Sample]] = {name: [] for name, _ in paths}
            against_tiny: list[Sample] = []
            by_name = dict(paths)
            for _ in range(runs):
                for name in ("direct", "heel"):
                    samples[name].append(transfer(children, streams, total, by_name[name], pids[name]))
            if tiny:
                for _ in range(runs):
                    against_tiny.append(transfer(children, streams, total, by_name["heel"], pids["heel"]))
                    samples["tinyproxy"].append(
                        transfer(children, streams, total, by_name["tinyproxy"], pids["tinyproxy"]))
            rates = {name: [x.gib_s for x in v] for name, v in samples.items()}
            heel_near_tiny = [x.gib_s for x in against_tiny]

            def ratio(a: str, b: str) -> float:
                if "tinyproxy" in (a, b) and a != b and "direct" not in (a, b):
                    # heel against tinyproxy: the pairs of the second phase
                    pairs = zip(heel_near_tiny, rates["tinyproxy"])
                    return statistics.median(h / t for h, t in pairs) ** (1 if a == "heel" else -1)
                if a == b:
                    return 1.0
                if "tinyproxy" in (a, b):  # tinyproxy against direct: through heel's two phases
                    return ratio("tinyproxy", "heel") * ratio("heel", "direct") if a == "tinyproxy" \
                        else 1 / (ratio("tinyproxy", "heel") * ratio("heel", "direct"))
                return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

            summary[streams] = {"direct": ratio("heel", "direct")}
            if tiny:
                summary[streams]["tinyproxy"] = ratio("heel", "tinyproxy")
            for name, _ in paths:
                line = f"{streams:7}  {name:10} {statistics.median(rates[name]):7.2f}"
                line += f" {ratio(name, 'direct'):9.2f}x"
                if tiny:
                    line += f" {ratio(name, 'tinyproxy'):12.2f}x"
                line += f" {statistics.median(x.busy for x in samples[name]) * 100:8.0f}%"
                if name != "direct":
                    line += f" {statistics.median(x.proxy_cpu for x in samples[name]):16.2f}"
                print(line)
        print()

        # ---- latency ----
        echo = children.python(ECHO)
        echo_port = int(read_line(echo, "echo server"))
        args = [f"{name}={0 if target == 'direct' else target}" for name, target in paths]
        client = children.python(LATENCY, connections, echo_port, *args)
        result = json.loads(read_line(client, "latency client"))
        client.wait()
        children.stop(client)
        children.stop(echo)
        print(f"tunnel establishment: {connections} sequential connections per path, interleaved; "
              "connect + CONNECT/200 + 1-byte echo round trip (us)")
        print(f"{'path':10} {'p50':>8} {'p90':>8} {'added p50':>10} {'to 200 p50':>11}"
              f"  (direct: connect() only)")
        base = percentile(result["total"]["direct"], 0.5)
        added: dict[str, float] = {}
        for name, _ in paths:
            p50 = percentile(result["total"][name], 0.5)
            p90 = percentile(result["total"][name], 0.9)
            added[name] = p50 - base
            to_200 = f"{percentile(result['to_200'][name], 0.5):11.1f}"
            extra = "" if name == "direct" else f"{added[name]:10.1f}"
            print(f"{name:10} {p50:8.1f} {p90:8.1f} {extra:>10} {to_200:>11}")
        print()

        # ---- targets (reported, not asserted) ----
        print("targets (from the issue):")
        for streams in streams_list:
            r = summary[streams]["direct"]
            print(f"  {streams:2} stream(s): heel >= 0.75x direct: {r:.2f}x, {verdict(r >= 0.75)}")
            if tiny:
                r = summary[streams]["tinyproxy"]
                print(f"  {streams:2} stream(s): heel >= 3x tinyproxy: {r:.2f}x, {verdict(r >= 3)}")
        print(f"  added p50 < 1 ms: {added['heel']:.0f} us, {verdict(added['heel'] < 1000)}")
    finally:
        children.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024,
                        help="MiB per throughput transfer, over all its streams (default 1024)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=500,
                        help="sequential tunnels per path for the latency (default 500)")
    parser.add_argument("--relay-threads", type=int, default=0,
                        help="relay threads of heel's proxy (default 0: heel's default, "
                             "one per 4 CPUs, 1 to 8)")
    args = parser.parse_args()
    # SIGTERM as well as Ctrl-C runs the cleanup in main's finally.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main(args.size_mib, args.streams, args.runs, args.connections, args.relay_threads)
