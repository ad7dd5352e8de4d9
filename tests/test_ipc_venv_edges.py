"""IPC and Python environments at their edges (found by an exploratory
review): pipelined and concurrent calls, the fd limit, interrupted and
forked clients, message sizes, odd handler errors, concurrent builds of one
venv, odd venv paths.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile

import pytest
import trio

import heel
from helpers import IPC_RAW as RAW, explain, py, sh, usable_uv  # RAW: a raw connection, as heel.client opens one
from pkgtools import shared_wheels

SYSTEM_PYTHON = "/usr/bin/python3"



def _add_router(**kwargs) -> heel.IpcRouter:
    router = heel.IpcRouter(**kwargs)

    @router.command("add")
    async def add(a: int, b: int = 1) -> int:
        return a + b

    return router


def _uv_on_path(monkeypatch) -> None:
    """uv, found next to the test's interpreter when not on the PATH; skip without it."""
    if shutil.which("uv") is None:
        here = os.path.dirname(sys.executable)
        if os.access(os.path.join(here, "uv"), os.X_OK):
            monkeypatch.setenv("PATH", here + os.pathsep + os.environ.get("PATH", ""))
    if usable_uv() is None:
        pytest.skip("needs uv outside the home directory (the installer's sandbox keeps the home closed)")


# ---- IPC: the host --------------------------------------------------------------------------


async def test_pipelined_requests_on_one_connection_are_bounded():
    # docs/ipc.md: "what the host holds per connection stays within max_frame
    # plus one read".  A sandboxed process that pipelines requests without
    # waiting for answers makes the host start a handler (holding its params)
    # for every one of them: 2000 requests of 1 MB held 2 GB of the host.
    router = heel.IpcRouter(max_message_size=64 * 1024)
    held = {"now": 0, "peak": 0}

    @router.command("hold")
    async def hold(pad: bytes) -> int:
        held["now"] += len(pad)
        held["peak"] = max(held["peak"], held["now"])
        try:
            await trio.sleep_forever()
        finally:
            held["now"] -= len(pad)

    with trio.fail_after(60):
        async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
            out = await py(sb, RAW + """
s = connect()
s.settimeout(5)
pad = b"x" * 60000
data = b"".join(frame(msgpack.packb([0, i, "hold", {"pad": pad}], use_bin_type=True)) for i in range(600))
try:
    s.sendall(data)
    print("SENT ALL")
except socket.timeout:
    print("HOST STOPPED READING")
time.sleep(1)
""", timeout=30)
            assert out.returncode == 0, explain(out)
    limit = 64 * router.max_message_size
    assert held["peak"] <= limit, (f"one connection made the host hold {held['peak']} bytes of parameters "
                                   f"in running handlers (36 MB sent; bound {limit})")


async def test_handler_exception_that_cannot_be_printed_does_not_crash_the_sandbox():
    # "A handler that raises answers with its message": when str(exc) itself
    # raises, the error escapes the connection's task and the whole sandbox
    # (the user's `async with`) dies with an ExceptionGroup.
    router = _add_router()

    class Odd(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text")

    @router.command("odd")
    async def odd() -> int:
        raise Odd()

    with trio.fail_after(30):
        async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
            out = await sh(sb, "heel ipc odd; echo status=$?")
            assert b"status=1" in out.stdout, explain(out)
            out = await sh(sb, "heel ipc add --a 1")
            assert out.stdout == b"2\n", explain(out)


@pytest.mark.parametrize("host_fds", [0, 300])
async def test_ipc_connections_leave_the_host_file_descriptors(host_fds):
    # max_connections (256) is granted whatever the host's RLIMIT_NOFILE: with
    # a soft limit of a few hundred (1024 is common; heel's proxy sizes its own
    # budget from it), one sandbox takes every fd the host has, and the host's
    # next command fails with a bare OSError(EMFILE).  host_fds: the host
    # holds that many files of its own besides, so that the connection
    # budget, sized from the limit alone, would leave it none: the last fds
    # below the limit are never given to connections.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip("needs a hard fd limit of 1024 or more")
    held = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(host_fds)]
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 150, hard))
    try:
        with trio.fail_after(60):
            async with heel.Sandbox(heel.SandboxConfig(ipc=_add_router())) as sb:
                holder = await sb.command("python3").args(["-c", RAW + """
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
socks = [connect() for _ in range(256)]
print("OPEN", flush=True)
time.sleep(30)
"""]).stdout(heel.Stdio.PIPE).spawn()
                try:
                    assert b"OPEN" in await holder.stdout.receive_some()
                    await trio.sleep(0.5)
                    out = await sb.command("true").output()   # the host still has fds to start a command
                    assert out.returncode == 0, explain(out)
                finally:
                    holder.kill()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for fd in held:
            os.close(fd)


# ---- IPC: the client inside -------------------------------------------------------------------


async def test_a_parameter_called_name_can_be_passed():
    # heel.client.call(name, **params): a command with a parameter `name`
    # cannot be called, neither from Python nor with `heel ipc` or the wrapper.
    router = heel.IpcRouter()

    @router.command("greet")
    async def greet(name: str) -> str:
        return "hi " + name

    with trio.fail_after(30):
        async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
            out = await sh(sb, "heel ipc greet --name bob; greet --name eve")
            assert out.stdout == b"hi bob\nhi eve\n", explain(out)
            out = await py(sb, "from heel.client import call; print(call('greet', name='ann'))")
            assert out.stdout == b"hi ann\n", explain(out)


async def test_an_interrupted_call_does_not_shift_every_later_answer():
    # A call left by an exception other than OSError (KeyboardInterrupt, a
    # signal handler's timeout) keeps the connection: its late answer is read
    # by the next call, which fails with "a reply to 1 came for 2", and so on
    # for every call the process makes.
    router = _add_router()

    @router.command("slow")
    async def slow() -> int:
        await trio.sleep(1)
        return 0

    with trio.fail_after(30):
        async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
            out = await py(sb, """
import signal, time
from heel.client import call
class Alarm(Exception):
    pass
def on_alarm(*_):
    raise Alarm()
signal.signal(signal.SIGALRM, on_alarm)
signal.setitimer(signal.ITIMER_REAL, 0.2)
try:
    call("slow")
except Alarm:
    print("interrupted")
time.sleep(1.5)  # the interrupted call's answer has come by now
print(call("add", a=1), call("add", a=2))
""")
            assert out.stdout == b"interrupted\n2 3\n", explain(out)


async def test_a_child_forked_during_another_threads_call_can_call():
    # client._lock is held across a call; a child forked meanwhile (e.g.
    # multiprocessing's fork start method) inherits it held and hangs forever
    # on its first call.
    router = _add_router()

    @router.command("slow")
    async def slow() -> int:
        await trio.sleep(2)
        return 0

    with trio.fail_after(30):
        async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
            out = await py(sb, """
import os, signal, threading, time
from heel.client import call
worker = threading.Thread(target=call, args=("slow",))
worker.start()
time.sleep(0.5)
pid = os.fork()
if pid == 0:
    signal.alarm(5)
    print("child", call("add", a=1), flush=True)
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("status", status)
worker.join()
""")
            assert b"child 2\nstatus 0\n" in out.stdout, explain(out)


async def test_the_routers_message_size_is_the_clients_too():
    # IpcRouter(max_message_size=16 MiB) is the host's limit only: the client
    # inside keeps the 4 MiB default both ways, so a 6 MB argument or result
    # fails in the sandbox (a ProtocolError traceback, or "a frame of ...
    # more than the limit of 4194304").
    router = heel.IpcRouter(max_message_size=16 * 2**20)

    @router.command("size")
    async def size(data: bytes) -> int:
        return len(data)

    @router.command("blob")
    async def blob(n: int) -> bytes:
        return b"x" * n

    with trio.fail_after(30):
        async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
            out = await py(sb, """
from heel.client import call
print(call("size", data=b"y" * 6000000), len(call("blob", n=6000000)))
""")
            assert out.stdout == b"6000000 6000000\n", explain(out)
            out = await sh(sb, "heel ipc blob --n 6000000 | wc -c")
            assert out.stdout.strip() == b"6000000", explain(out)


async def test_heel_ipc_works_in_a_venv_that_has_heel_installed():
    # The `heel` launcher is at the end of the PATH.  A real heel earlier on
    # it (installed in the sandbox's venv, or system-wide in /usr/local/bin
    # with `pip install heel`) answers instead, and its `from heel.cli import
    # main` finds the in-sandbox copy of heel on PYTHONPATH, which has no cli:
    # `heel ipc add` dies with ModuleNotFoundError.
    base = tempfile.mkdtemp(prefix="heel-review-venv-", dir="/var/tmp")
    try:
        os.chmod(base, 0o755)
        config = heel.VenvConfig(os.path.join(base, "env"), python=SYSTEM_PYTHON)
        with trio.fail_after(120):
            venv = await heel.VenvManager.create(config)
        # What pip writes for heel's console script: [project.scripts] heel =
        # heel.cli:console, and heel.cli:main in earlier heels.
        script = venv.path / "bin" / "heel"
        sandbox_config = heel.SandboxConfig(ipc=_add_router(), python=heel.PythonConfig(config))
        with trio.fail_after(30):
            async with heel.Sandbox(sandbox_config) as sb:
                for entry in ("console", "main"):
                    script.write_text(f"#!{venv.python}\nimport sys\nfrom heel.cli import {entry}\n"
                                      f"if __name__ == '__main__':\n    sys.exit({entry}())\n")
                    script.chmod(0o755)
                    out = await sh(sb, "heel ipc add --a 1")
                    assert out.returncode == 0 and out.stdout == b"2\n", (entry, explain(out))
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---- Python environments ---------------------------------------------------------------------


async def test_concurrent_builds_of_one_new_venv(monkeypatch):
    # Sandboxes that share one VenvConfig and open at the same time build it
    # at the same time: with uv they tear down each other's half-built
    # environment (remove_tree on failure), and all or most of them fail
    # with InstallError or BrokenVenv ("no pyvenv.cfg; heel leaves it alone"),
    # sometimes leaving no environment at all.  Two at once rarely lose.
    _uv_on_path(monkeypatch)
    with shared_wheels(("heelalpha", "1.0", "VALUE = 'alpha-1.0'\n")) as wheels:
        base = tempfile.mkdtemp(prefix="heel-review-conc-", dir="/var/tmp")
        try:
            os.chmod(base, 0o755)
            for round in range(5):  # a race (most rounds of six lose it): a few fresh tries
                config = heel.VenvConfig(os.path.join(base, f"env{round}"), ["heelalpha"], python=SYSTEM_PYTHON,
                                         find_links=[wheels], no_index=True, use_uv=True)
                failures = []

                async def build() -> None:
                    try:
                        await heel.VenvManager.create(config)
                    except heel.HeelError as exc:
                        failures.append(exc)

                with trio.fail_after(120):
                    async with trio.open_nursery() as nursery:
                        for _ in range(6):
                            nursery.start_soon(build)
                assert failures == [], f"round {round}"
                assert "heelalpha" in heel.venv.installed_distributions(config.path)
        finally:
            shutil.rmtree(base, ignore_errors=True)


async def test_a_venv_path_with_the_path_separator(monkeypatch):
    # venv refuses a path with ":" (it would split the PATH); uv builds it,
    # and inside the sandbox the PATH entry for its bin/ is cut in two:
    # `python`, `python3` and `pip` are not the environment's (README: "Inside,
    # it is python, python3 and pip on the PATH").  Refuse it up front, or
    # make it work.
    _uv_on_path(monkeypatch)
    base = tempfile.mkdtemp(prefix="heel-review-sep-", dir="/var/tmp")
    try:
        os.chmod(base, 0o755)
        try:
            # Refused when the config is built (PolicyError), or when it is built on the host.
            config = heel.VenvConfig(os.path.join(base, "a:b", "env"), python=SYSTEM_PYTHON, use_uv=True)
            with trio.fail_after(120):
                await heel.VenvManager.create(config)
        except heel.HeelError:
            return  # refused with a typed error: fine
        with trio.fail_after(30):
            async with heel.Sandbox(heel.SandboxConfig(python=heel.PythonConfig(config))) as sb:
                out = await sh(sb, "command -v python")
        assert out.stdout.decode().strip() == f"{config.path}/bin/python", explain(out)
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_unusable_venv_paths_raise_heel_errors():
    # A path the host cannot even stat (a name too long here; a directory the
    # user cannot search, as nobody) escapes as a bare OSError from
    # VenvManager.create and from opening a Sandbox with PythonConfig(path).
    long = "/var/tmp/" + "x" * 300
    with pytest.raises(heel.HeelError):
        await heel.VenvManager.create(heel.VenvConfig(long + "/env", python=SYSTEM_PYTHON))
    with pytest.raises(heel.HeelError):
        async with heel.Sandbox(heel.SandboxConfig(python=heel.PythonConfig(long))):
            pass


async def test_run_python_with_code_that_is_not_utf8_is_a_heel_error():
    # A str with a lone surrogate (from os.fsdecode, say) raises a bare
    # UnicodeEncodeError, after leaving an empty file in the sandbox's tmp.
    async with heel.Sandbox(heel.SandboxConfig()) as sb:
        with pytest.raises(heel.HeelError):
            await sb.run_python("print('\udcff')")


async def test_calls_over_many_connections_are_bounded_for_the_whole_sandbox():
    # Per connection the calls are bounded; over many connections (each
    # calling process opens one, up to max_connections) the sandbox's total
    # is bounded too: max_calls running at once, however many connections.
    router = heel.IpcRouter(max_calls_per_connection=8, max_calls=16)
    running = {"now": 0, "peak": 0}

    @router.command("hold")
    async def hold() -> int:
        running["now"] += 1
        running["peak"] = max(running["peak"], running["now"])
        try:
            await trio.sleep_forever()
        finally:
            running["now"] -= 1

    with trio.fail_after(60):
        async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
            out = await py(sb, RAW + """
conns = [connect() for _ in range(6)]
for s in conns:
    s.sendall(b"".join(frame(msgpack.packb([0, i, "hold", {}], use_bin_type=True)) for i in range(10)))
time.sleep(2)
print("OK")
""", timeout=30)
            assert b"OK" in out.stdout, explain(out)
    # The control: more than one connection's worth ran (the sandbox's
    # bound, not the connection's, is what stopped them).
    assert running["peak"] == 16, running


async def test_a_command_whose_own_check_raises_answers_with_an_error():
    # An IpcCommand subclass may check parameters itself; when its check()
    # raises, the caller gets an error and the sandbox lives on.
    class Picky(heel.IpcCommand):
        name = "picky"
        parameters = {"n": int}

        def check(self, params):
            raise LookupError("check failed")

        async def handle(self, **params):
            return 1

    router = _add_router()
    router.register(Picky())
    with trio.fail_after(30):
        async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
            out = await sh(sb, "heel ipc picky --n 1; echo status=$?; heel ipc add --a 1")
            assert b"status=1" in out.stdout and out.stdout.endswith(b"2\n"), explain(out)
            assert b"check failed" in out.stderr, explain(out)


async def test_decoded_requests_are_bounded_by_their_size_not_only_their_count():
    # A msgpack message decodes to objects tens of times its size (4 MiB of
    # empty arrays is some 260 MiB of lists).  The count of calls did not
    # bound that, and a request was decoded before it waited for a slot.
    # Now the requests a sandbox has decoded at once amount to at most two
    # messages of the router's largest size on the wire.
    router = heel.IpcRouter(max_message_size=64 * 1024)
    running: list[int] = []

    @router.command("hold")
    async def hold(x: list) -> int:
        running.append(len(x))
        await trio.sleep_forever()

    script = RAW + """
big = msgpack.packb([0, 0, "hold", {"x": [[]] * 60000}], use_bin_type=True)
small = msgpack.packb([0, 1, "hold", {"x": [1]}], use_bin_type=True)
conns = [connect() for _ in range(6)]
for s in conns:
    s.sendall(frame(big))
time.sleep(1.5)
extra = connect()
extra.sendall(frame(small))
time.sleep(4)
print("OK")
"""
    outputs = []
    with trio.fail_after(60):
        async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
            async with trio.open_nursery() as nursery:
                async def caller() -> None:
                    outputs.append(await py(sb, script, timeout=30))

                nursery.start_soon(caller)
                await trio.sleep(3.5)  # while the caller's connections are open
                seen = sorted(running)
    assert outputs and b"OK" in outputs[0].stdout, explain(outputs[0])
    # Two 60 KB messages fit the 128 KiB budget; the four others wait, not
    # decoded.  The control: a small call still fits beside them, and runs.
    assert seen == [1, 60000, 60000], seen


async def test_small_calls_never_wait_behind_large_ones():
    # Two large calls that wait for a small one (a put waiting for its get)
    # held the whole byte budget, and the small call waited for them: for
    # ever.  Small requests are counted by the slots only.
    router = heel.IpcRouter(max_message_size=64 * 1024)
    queue: list[bytes] = []
    taken = trio.Event()

    @router.command("put")
    async def put(data: bytes) -> int:
        queue.append(data)
        await taken.wait()
        return len(data)

    @router.command("get")
    async def get() -> int:
        taken.set()
        return len(queue)

    with trio.fail_after(60):
        async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
            out = await py(sb, RAW + """
def call(sock, msgid, method, params):
    sock.sendall(frame(msgpack.packb([0, msgid, method, params], use_bin_type=True)))
def answer(sock):
    head = b""
    while len(head) < 4:
        head += sock.recv(4 - len(head))
    size = struct.unpack(">I", head)[0]
    body = b""
    while len(body) < size:
        body += sock.recv(size - len(body))
    return msgpack.unpackb(body, raw=False)
def largest(msgid):  # a put whose message is max_message_size exactly: two fill the budget
    n = 65000
    while len(msgpack.packb([0, msgid, "put", {"data": b"x" * n}], use_bin_type=True)) < 65536:
        n += 1
    return b"x" * n
a, b, c = connect(), connect(), connect()
call(a, 1, "put", {"data": largest(1)})
call(b, 2, "put", {"data": largest(2)})
time.sleep(1)
call(c, 3, "get", {})
print("get", answer(c)[3])
print("puts", answer(a)[3], answer(b)[3])
""", timeout=30)
            assert out.stdout.startswith(b"get 2\nputs 655"), explain(out)


async def test_large_frames_take_the_byte_budget_while_they_arrive():
    """Each connection could hold a large frame partly received, raw,
    outside the byte budget: 256 connections x 4 MiB with the defaults
    (found by review).  A large frame now takes its room as soon as its
    header is read; past the budget the host reads no further.  Eight
    connections each announce a 1 MiB frame and send all but its last byte:
    two fit the 2 MiB budget, the others stall.  The control: a small call
    still runs beside them."""
    router = heel.IpcRouter(max_message_size=1024 * 1024)

    @router.command("add")
    async def add(a: int, b: int = 1) -> int:
        return a + b

    with trio.fail_after(60):
        async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
            out = await py(sb, RAW + """
size = 1024 * 1024 - 16
socks = [connect() for _ in range(8)]
sent = [0] * len(socks)
for s in socks:
    s.setblocking(False)
    s.send(struct.pack(">I", size))
body = b"\\0" * 65536
deadline = time.monotonic() + 4
while time.monotonic() < deadline and min(sent) < size - 1:
    moved = False
    for i, s in enumerate(socks):
        want = min(len(body), size - 1 - sent[i])
        if want <= 0:
            continue
        try:
            sent[i] += s.send(body[:want])
            moved = True
        except BlockingIOError:
            pass
    if not moved:
        time.sleep(0.05)
print("whole", sum(n == size - 1 for n in sent))
small = connect()
small.sendall(frame(msgpack.packb([0, 7, "add", {"a": 1}], use_bin_type=True)))
head = small.recv(4)
print("small", msgpack.unpackb(small.recv(struct.unpack(">I", head)[0]), raw=False)[3])
""", timeout=30)
    lines = out.stdout.decode().split()
    assert lines[:2] == ["whole", "2"] and lines[2:] == ["small", "2"], explain(out)


def test_the_ipc_client_files_are_never_written_through_a_link(tmp_path):
    """heel writes the IPC client into the sandbox's private tmp, which a
    sandbox (or, where $TMPDIR's place is not covered, a PERMISSIVE one of
    the same user) may write: a link swapped in for .heel/bin had the host
    overwrite and chmod 0755 the files where it pointed (a protected
    ~/bin).  Nothing is followed, nothing there already is written into."""
    from heel._spawn import _write_files

    target = tmp_path / "protected"
    target.mkdir()
    (target / "heel").write_text("ORIGINAL\n")
    os.chmod(target / "heel", 0o600)
    tmp = tmp_path / "tmp"
    (tmp / ".heel").mkdir(parents=True)
    os.symlink(target, tmp / ".heel" / "bin")
    with pytest.raises(OSError):
        _write_files(str(tmp / ".heel" / "bin"), [("heel", b"#!/bin/sh\n", 0o755)])
    assert (target / "heel").read_text() == "ORIGINAL\n" and os.stat(target / "heel").st_mode & 0o777 == 0o600
    os.unlink(tmp / ".heel" / "bin")
    (tmp / ".heel" / "bin").mkdir()
    (tmp / ".heel" / "bin" / "heel").write_text("planted\n")  # a file put there first is not written into
    with pytest.raises(FileExistsError):
        _write_files(str(tmp / ".heel" / "bin"), [("heel", b"#!/bin/sh\n", 0o755)])
    _write_files(str(tmp / ".heel" / "lib"), [("x", b"data", 0o644)])  # the control
    assert (tmp / ".heel" / "lib" / "x").read_bytes() == b"data"
