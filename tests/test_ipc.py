"""IPC end to end: host commands called from real sandboxes.

Every test opens a real sandbox with an IpcRouter and calls its commands
from sandboxed processes (heel.client.call, `heel ipc`, the wrappers); the
hostile ones talk to the transport directly, the way heel.client does
(a socketpair end passed over fd 3), and then check the host still serves.
"""

import random
import time
from typing import Any, Optional

import pytest
import socket
import typing

import trio

import heel
from helpers import IPC_RAW as RAW, explain, py, sh  # RAW: a raw connection, as heel.client opens one

INVALID_PARAMS = -32602
METHOD_NOT_FOUND = -32601
INTERNAL_ERROR = -32603



def basic_router() -> heel.IpcRouter:
    router = heel.IpcRouter()

    @router.command("add")
    async def add(a: int, b: int = 1) -> int:
        return a + b

    @router.command("echo")
    async def echo(value: Any) -> Any:
        return value

    return router


def ok(out, marker: bytes = b"OK") -> None:
    assert out.returncode == 0 and not out.timed_out, explain(out)
    assert marker in out.stdout, explain(out)
    assert b"Traceback" not in out.stderr, explain(out)


# ---- 1. values round trip -------------------------------------------------

async def test_round_trip_of_every_type():
    router = heel.IpcRouter()

    @router.command("echo")
    async def echo(value: Any) -> Any:
        return value

    seen = []

    @router.command("typed")
    async def typed(n: None, b: bool, i: int, f: float, s: str, by: bytes, l: list, d: dict) -> list:
        seen.append((n, b, i, f, s, by, l, d))
        return [n, b, i, f, s, by, l, d]

    async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
        out = await py(sb, """
            from heel.client import call
            values = [
                None, True, False, 0, -1, -2**63, 2**63 - 1, 2**64 - 1, 1.5, -0.25, float("inf"), 1e300,
                "", "héllo wörld ✓ 日本 🎉", "\\x00nul", b"", b"\\x00\\xff binary", [], [1, "a", None],
                {}, {"k": "v", "n": 2},
                {"nested": [{"a": [1, 2, {"b": b"x"}]}, [[[]]], {"deep": {"deeper": [True, 1.25]}}]},
                list(range(1000)), "x" * 100000,
            ]
            for v in values:
                got = call("echo", value=v)
                assert got == v and type(got) is type(v), (v, got)
            assert call("echo", value=(1, 2)) == [1, 2]      # tuples arrive as lists
            args = dict(n=None, b=True, i=-7, f=2.5, s="ß", by=b"\\x01", l=[1], d={"x": [None]})
            got = call("typed", **args)
            assert got == list(args.values()), got
            assert call("typed", **dict(args, f=3)) [3] == 3        # an int is a fine float
            print("OK", len(values))
        """)
        ok(out, b"OK 24")
    assert seen[0] == (None, True, -7, 2.5, "ß", b"\x01", [1], {"x": [None]})
    assert type(seen[0][1]) is bool


# ---- 2. parameter validation -----------------------------------------------

async def test_parameter_validation():
    router = basic_router()

    @router.command("opt")
    async def opt(x: int, y: str = "dflt", z: Optional[int] = None) -> list:
        return [x, y, z]

    async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
        out = await py(sb, """
            from heel.client import call, IpcError
            def refused(name, needle, **params):
                try:
                    call(name, **params)
                except IpcError as e:
                    assert e.code == -32602, (e.code, e.message)
                    assert needle in e.message, (needle, e.message)
                    return
                raise AssertionError(f"{name}{params} was accepted")
            refused("add", "'a'")                       # missing required
            refused("add", "'c'", a=1, c=2)             # unknown
            refused("add", "a", a="1")                  # wrong type
            refused("add", "a", a=1.0)                  # float is not an int
            refused("add", "b", a=1, b=True)            # bool is not an int
            refused("add", "a", a=None)
            refused("opt", "y", x=1, y=3)
            refused("opt", "z", x=1, z="3")
            assert call("add", a=1) == 2                # default used
            assert call("add", a=1, b=5) == 6
            assert call("opt", x=1) == [1, "dflt", None]
            assert call("opt", x=1, z=4) == [1, "dflt", 4]
            assert call("opt", x=1, z=None) == [1, "dflt", None]
            print("OK")
        """)
        ok(out)
        out = await sh(sb, "heel ipc add --c 1")
        assert out.returncode == 1, explain(out)
        assert out.stderr.startswith(b"heel ipc:") and b"'c'" in out.stderr, explain(out)
        assert out.stderr.count(b"\n") == 1, explain(out)


# ---- 3. unknown command ---------------------------------------------------

async def test_unknown_command():
    async with heel.Sandbox(heel.SandboxConfig(ipc=basic_router())) as sb:
        out = await py(sb, """
            from heel.client import call, IpcError
            for name in ["nope", "Add", "add_", "x" * 128]:
                try:
                    call(name)
                except IpcError as e:
                    assert e.code == -32601, (name, e.code, e.message)
                else:
                    raise AssertionError(name)
            # Names no command can have: refused before sending, or by the host.
            for name in ["1bad", "a b", "", "x" * 300]:
                try:
                    call(name)
                except IpcError as e:
                    assert e.code == -32601, (name, e.code, e.message)
                except ValueError:
                    pass
                else:
                    raise AssertionError(name)
            assert call("add", a=1) == 2
            print("OK")
        """)
        ok(out)
        # The host itself answers -32601 to a name no command can have.
        out = await py(sb, RAW + """
from heel import _ipc_codec as codec
s = connect()
s.sendall(frame(b"\\x94\\x00\\x05\\xa41bad\\x80"))
c = codec.Connection("client")
while True:
    event = c.next_event()
    if event is codec.NEED_DATA:
        c.receive_data(s.recv(65536))
        continue
    break
assert event.msgid == 5 and event.error[0] == -32601, event
print("OK")
""")
        ok(out)
        for args in ["nope --a 1", "1bad"]:
            out = await sh(sb, f"heel ipc {args}")
            assert out.returncode == 1, explain(out)
            assert out.stdout == b"", explain(out)
            lines = out.stderr.decode().splitlines()
            assert len(lines) == 1 and lines[0].startswith("heel ipc:"), explain(out)
            assert args.split()[0] in lines[0], explain(out)


# ---- 4. handler errors ------------------------------------------------------

async def test_handler_error_is_the_callers_answer_without_traceback():
    router = heel.IpcRouter()
    calls = []

    @router.command("boom")
    async def boom() -> None:
        calls.append("boom")
        raise RuntimeError("secret detail in message")

    @router.command("bare")
    async def bare() -> None:
        raise ValueError()

    @router.command("unsendable")
    async def unsendable() -> Any:
        return object()

    @router.command("ping")
    async def ping() -> str:
        return "pong"

    async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
        out = await py(sb, """
            from heel.client import call, IpcError
            for i in range(3):
                try:
                    call("boom")
                except IpcError as e:
                    assert e.code == -32603, e.code
                    assert e.message == "secret detail in message", e.message
                    print("MSG", repr(e.message))
                else:
                    raise AssertionError("no error")
                assert call("ping") == "pong"
            try:
                call("bare")
            except IpcError as e:
                assert e.code == -32603 and e.message, (e.code, e.message)
                print("MSG", repr(e.message))
            try:
                call("unsendable")
            except IpcError as e:
                assert e.code == -32603, (e.code, e.message)
                print("MSG", repr(e.message))
            assert call("ping") == "pong"
            print("OK")
        """)
        ok(out)
        assert b"Traceback" not in out.stdout and __file__.encode() not in out.stdout, explain(out)
        assert b"test_ipc" not in out.stdout, explain(out)
        out = await sh(sb, "heel ipc boom; echo rc=$?; heel ipc ping")
        assert out.stdout == b"rc=1\npong\n", explain(out)
        assert out.stderr == b"heel ipc: secret detail in message\n", explain(out)
    assert calls == ["boom"] * 4


@pytest.mark.parametrize("kind", [SystemExit, KeyboardInterrupt])
async def test_handler_raising_systemexit_or_keyboardinterrupt_comes_out_as_itself(kind):
    # A handler that calls sys.exit() (or is interrupted) ends the host's
    # `async with`, with that exception itself, not nested in nursery groups,
    # and the sandbox is closed behind it.
    router = heel.IpcRouter()

    @router.command("stop")
    async def stop() -> None:
        raise kind()

    workdir = None
    with pytest.raises(kind):
        with trio.fail_after(30):
            async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
                workdir = sb.workdir
                await sh(sb, "heel ipc stop; sleep 20")
    assert workdir is not None and not workdir.exists()


@pytest.mark.parametrize("kind", [SystemExit, KeyboardInterrupt])
async def test_handler_raising_systemexit_or_keyboardinterrupt_as_its_callers_scope_is_cancelled(kind):
    """The same, while the scope around the sandbox is being cancelled: the
    other tasks' Cancelled came out beside it, a group that `except
    KeyboardInterrupt` and the interpreter's exit missed (r33's note)."""
    router = heel.IpcRouter()
    scope = trio.CancelScope()

    @router.command("stop")
    async def stop() -> None:
        scope.cancel()
        raise kind()

    workdir = None
    with pytest.raises(kind):
        with trio.fail_after(30), scope:
            async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
                workdir = sb.workdir
                await sh(sb, "heel ipc stop; sleep 20")
    assert workdir is not None and not workdir.exists()


# ---- 5. concurrency ---------------------------------------------------------

async def test_concurrent_callers_get_their_own_replies():
    router = heel.IpcRouter()
    state = {"now": 0, "max": 0, "calls": 0}

    @router.command("ident")
    async def ident(who: str, i: int) -> list:
        state["now"] += 1
        state["calls"] += 1
        state["max"] = max(state["max"], state["now"])
        try:
            await trio.sleep(random.uniform(0, 0.005))
        finally:
            state["now"] -= 1
        return [who, i]

    worker = (
        "import sys\n"
        "from heel.client import call\n"
        "who = sys.argv[1]\n"
        "for i in range(25):\n"
        "    assert call('ident', who=who, i=i) == [who, i]\n"
        "print('done', who)\n"
    )
    threaded = (
        "import threading\n"
        "from heel.client import call\n"
        "bad = []\n"
        "def run(who):\n"
        "    for i in range(25):\n"
        "        r = call('ident', who=who, i=i)\n"
        "        if r != [who, i]: bad.append((who, i, r))\n"
        "ts = [threading.Thread(target=run, args=(f't{n}',)) for n in range(6)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "assert not bad, bad\n"
        "print('threads ok')\n"
    )
    async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
        script = "".join(f"python3 -c \"$W\" p{n} & " for n in range(8)) + "python3 -c \"$T\" & wait"
        out = await sb.command("sh").args(["-c", script]).envs({"W": worker, "T": threaded}) \
            .timeout(30).output()
        assert out.returncode == 0, explain(out)
        lines = sorted(out.stdout.decode().splitlines())
        assert lines == sorted([f"done p{n}" for n in range(8)] + ["threads ok"]), explain(out)
        assert out.stderr == b"", explain(out)
    assert state["calls"] == 8 * 25 + 6 * 25
    assert state["max"] > 1, state
    assert state["now"] == 0


# ---- 6. descendants -----------------------------------------------------------

async def test_grandchild_and_forked_child_can_call():
    async with heel.Sandbox(heel.SandboxConfig(ipc=basic_router())) as sb:
        out = await sh(sb, "sh -c 'sh -c \"heel ipc add --a 1\"'")
        assert out.returncode == 0 and out.stdout == b"2\n", explain(out)
        out = await py(sb, """
            import os
            from heel.client import call, _state
            assert call("add", a=10) == 11               # the parent's connection first
            parent_sock = _state["sock"]
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    got = call("add", a=20, b=2)
                    fresh = _state["sock"] is not parent_sock and _state["pid"] == os.getpid()
                    os.write(w, f"{got} {fresh}".encode())
                finally:
                    os._exit(0)
            os.close(w)
            child = os.read(r, 100).decode()
            os.waitpid(pid, 0)
            assert child == "22 True", child
            assert call("add", a=30) == 31               # the parent's still works
            print("OK")
        """)
        ok(out)


# ---- 7. the `heel ipc` command line ---------------------------------------------

async def test_heel_ipc_argument_forms_and_output():
    router = heel.IpcRouter()
    got = []

    @router.command("show")
    async def show(query: Any = None, n: Any = None, flag: Any = None, my_key: Any = None) -> Any:
        got.append({"query": query, "n": n, "flag": flag, "my_key": my_key})
        return query

    @router.command("ls")
    async def ls() -> str:
        return "IPC-LS"

    @router.command("text")
    async def text() -> str:
        return "plain text"

    @router.command("structured")
    async def structured() -> dict:
        return {"a": [1, "x", None, True]}

    @router.command("raw")
    async def raw() -> bytes:
        return b"\x00\x01raw"

    async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
        out = await sh(sb, "heel ipc show --query trio --n 3 --flag true --my-key '[1, 2]'")
        assert out.returncode == 0 and out.stdout == b"trio\n", explain(out)
        assert got[-1] == {"query": "trio", "n": 3, "flag": True, "my_key": [1, 2]}
        out = await sh(sb, "heel ipc show --query '\"3\"'")     # JSON string: "3", not 3
        assert out.stdout == b"3\n" and got[-1]["query"] == "3", explain(out)
        out = await sh(sb, "heel ipc show --query '{\"a\": [1]}'")
        assert out.stdout == b'{"a": [1]}\n' and got[-1]["query"] == {"a": [1]}, explain(out)
        out = await sh(sb, "heel ipc show --json '{\"query\": 3, \"n\": \"s\"}'")
        assert out.returncode == 0 and out.stdout == b"3\n", explain(out)
        assert got[-1]["query"] == 3 and got[-1]["n"] == "s"
        out = await sb.command("heel").args(["ipc", "show", "-"]) \
            .stdin(b'{"query": ["from", "stdin"], "flag": null}').timeout(30).output()
        assert out.returncode == 0 and out.stdout == b'["from", "stdin"]\n', explain(out)
        assert got[-1]["query"] == ["from", "stdin"]
        out = await sh(sb, "heel ipc text; heel ipc structured; show --query wrapped; heel ipc raw")
        assert out.stdout == b'plain text\n{"a": [1, "x", null, true]}\nwrapped\n\x00\x01raw', explain(out)
        # A command named like a system program does not shadow it...
        out = await sh(sb, "ls -d /; command -v ls")
        assert out.returncode == 0 and b"IPC-LS" not in out.stdout, explain(out)
        assert out.stdout.splitlines()[0] == b"/" and b".heel" not in out.stdout, explain(out)
        # ...but `heel ipc ls` reaches it.
        out = await sh(sb, "heel ipc ls")
        assert out.stdout == b"IPC-LS\n", explain(out)
        # Bad command lines: exit 1, one line on stderr, nothing sent.
        calls = len(got)
        for args in ["show --query", "show query trio", "show --json '[1]'", "show --json", "--query x",
                     "show --json '{bad'", "show --n 99999999999999999999999999"]:  # past msgpack's 64 bits
            out = await sh(sb, f"heel ipc {args}")
            assert out.returncode == 1, (args, explain(out))
            assert out.stderr.startswith(b"heel ipc:") and out.stderr.count(b"\n") == 1, (args, explain(out))
        assert len(got) == calls


async def test_heel_ipc_runs_without_msgpack_and_call_with_it():
    """`heel ipc` (one call per process) packs with heel._minipack and never
    imports msgpack, whose import cost it more than the call; call() in a
    program uses msgpack itself.  Both get the same answers."""
    async with heel.Sandbox(heel.SandboxConfig(ipc=basic_router())) as sb:
        out = await py(sb, """
            import sys
            from heel.client import main
            code = main(["echo", "--value", '{"k": [1, -2, 3.5, null, true, "s"]}'])
            print(any("msgpack" in name for name in sys.modules), code)
        """)
        assert out.returncode == 0 and out.stdout == b'{"k": [1, -2, 3.5, null, true, "s"]}\nFalse 0\n', explain(out)
        out = await py(sb, """
            import sys
            from heel.client import call
            result = call("echo", value={"k": [1, -2, 3.5, None, True, "s", b"b"]})
            print(result, any("msgpack" in name for name in sys.modules))  # msgpack, or heel's copy of it
        """)
        assert out.returncode == 0, explain(out)
        assert out.stdout == b"{'k': [1, -2, 3.5, None, True, 's', b'b']} True\n", explain(out)


# ---- 8. isolation levels ---------------------------------------------------------

@pytest.mark.parametrize("level", ["strict", "default", "permissive"])
async def test_works_at_every_level_without_network(level):
    config = heel.SandboxConfig(ipc=basic_router(), level=level)
    assert config.network == heel.DenyAll()
    async with heel.Sandbox(config) as sb:
        out = await sh(sb, "heel ipc add --a 2 --b 40; add --a 1; "
                           "python3 -c 'from heel.client import call; print(call(\"add\", a=5))'")
        assert out.returncode == 0 and out.stdout == b"42\n2\n6\n", explain(out)
        out = await py(sb, """
            import socket
            try:
                socket.create_connection(("127.0.0.1", 9), timeout=2)
            except OSError as e:
                print("NONET", type(e).__name__)
        """)
        assert b"NONET" in out.stdout, explain(out)


# ---- 9. isolation between sandboxes ---------------------------------------------

async def test_sandboxes_reach_only_their_own_router():
    first = heel.IpcRouter()
    second = heel.IpcRouter()
    hits = []

    @first.command("only_first")
    async def only_first() -> str:
        hits.append("first")
        return "first"

    @second.command("only_second")
    async def only_second() -> str:
        hits.append("second")
        return "second"

    async with heel.Sandbox(heel.SandboxConfig(ipc=first)) as a, \
            heel.Sandbox(heel.SandboxConfig(ipc=second)) as b:
        code = """
            import sys
            from heel.client import call, IpcError
            mine, theirs = sys.argv[1:]
            assert call(mine) == mine.split("_")[1]
            try:
                call(theirs)
            except IpcError as e:
                assert e.code == -32601, e.code
                print("OK")
        """
        ok(await py(a, code, "only_first", "only_second"))
        ok(await py(b, code, "only_second", "only_first"))
        out = await sh(b, "only_first")      # no wrapper for the other router's command
        assert out.returncode == 127, explain(out)
    assert hits == ["first", "second"]


async def test_sandbox_without_ipc_has_no_channel():
    async with heel.Sandbox(heel.SandboxConfig()) as sb:
        out = await sh(sb, "heel ipc add --a 1")
        assert out.returncode in (1, 127), explain(out)
        assert b"Traceback" not in out.stderr, explain(out)
        out = await py(sb, """
            import os, socket, stat
            for fd in os.listdir("/proc/self/fd"):
                try:
                    mode = os.fstat(int(fd)).st_mode
                except OSError:
                    continue
                assert not stat.S_ISSOCK(mode), ("a socket is open", fd, os.readlink(f"/proc/self/fd/{fd}"))
            assert "HEEL_IPC_FD" not in os.environ
            try:
                import heel.client
            except ImportError:
                print("NO CLIENT")
        """)
        ok(out, b"NO CLIENT")


# ---- 10. hostile input -----------------------------------------------------------------

async def test_hostile_connections_do_not_hurt_the_host():
    async with heel.Sandbox(heel.SandboxConfig(ipc=basic_router())) as sb:
        out = await py(sb, RAW + """
results = {}
# garbage: not a frame of msgpack
s = connect(); s.sendall(b"\\xc1\\xc1\\xc1\\xc1 this is not msgpack at all"); results["garbage"] = closed_by_host(s)
# a header announcing 2**31 bytes
s = connect(); s.sendall(struct.pack(">I", 2**31) + b"abc"); results["huge"] = closed_by_host(s)
# a truncated frame, then close
s = connect(); s.sendall(struct.pack(">I", 100) + b"\\x94\\x00"); s.close()
# a valid frame whose msgpack is not a request: a bare int
s = connect(); s.sendall(frame(b"\\x2a")); results["bare_int"] = closed_by_host(s)
# an empty body
s = connect(); s.sendall(frame(b"")); results["empty_body"] = closed_by_host(s)
# a request that answers with an error but keeps the connection: params as an array
s = connect(); s.sendall(frame(b"\\x94\\x00\\x07\\xa3add\\x91\\x01") + frame(b"\\x94\\x00\\x08\\xa3add\\x81\\xa1a\\x05"))
from heel import _ipc_codec as codec
c, replies = codec.Connection("client"), []
while len(replies) < 2:
    event = c.next_event()
    if event is codec.NEED_DATA:
        chunk = s.recv(65536)
        assert chunk, replies
        c.receive_data(chunk)
    else:
        replies.append(event)
results["array_params_reply"] = (replies[0].msgid == 7 and replies[0].error[0] == -32602
                                 and replies[1].msgid == 8 and replies[1].result == 6)
s.close()
# a pipe end instead of a socket: the host closes its copy
r, w = os.pipe()
broker = socket.socket(fileno=os.dup(3))
socket.send_fds(broker, [b"c"], [r])
os.close(r)
deadline = time.time() + 10
os.set_blocking(w, False)
while True:
    try:
        os.write(w, b"x")
    except BrokenPipeError:
        results["pipe_closed"] = True
        break
    if time.time() > deadline:
        results["pipe_closed"] = False
        break
    time.sleep(0.01)
# messages with no fd, several fds, and a plain byte on the broker
socket.send_fds(broker, [b"no fds"], [])
a1, a2 = socket.socketpair(); b1, b2 = socket.socketpair()
socket.send_fds(broker, [b"two"], [a2.fileno(), b2.fileno()])
a2.close(); b2.close()
broker.send(b"x" * 1000)
broker.close()
print(results)
assert all(results.values()), results
print("OK")
""")
        ok(out)
        # The host goes on serving, other processes and this channel alike.
        out = await sh(sb, "heel ipc add --a 41")
        assert out.returncode == 0 and out.stdout == b"42\n", explain(out)


async def test_empty_message_on_the_broker_does_not_stop_the_server():
    # A zero-length SOCK_SEQPACKET message reads like the end of the stream.
    async with heel.Sandbox(heel.SandboxConfig(ipc=basic_router())) as sb:
        out = await py(sb, """
            import os, socket
            broker = socket.socket(fileno=os.dup(3))
            broker.send(b"")
            print("SENT")
        """)
        ok(out, b"SENT")
        out = await sh(sb, "heel ipc add --a 41", timeout=10)
        assert not out.timed_out, "the host stopped serving after an empty message: " + explain(out)
        assert out.returncode == 0 and out.stdout == b"42\n", explain(out)


async def test_random_bytes_on_many_connections():
    rng = random.Random(20240607)
    prefixes = [b"", b"\x00\x00\x00\x04\x94", b"\x00\x00\x00\x05\x94\x00", b"\x00\x00\x00\x10\x94\x00\x01",
                b"\x00\x00\x00\x06\x94\x00\x01\xa3add", b"\xff\xff\xff\xff", b"\x00\x00\x00\x01"]
    blobs = []
    for _ in range(30):
        body = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 3, 7, 40, 300, 5000])))
        blobs.append(rng.choice(prefixes) + body)
    async with heel.Sandbox(heel.SandboxConfig(ipc=basic_router())) as sb:
        (sb.workdir / "blobs").write_bytes(b"".join(len(b).to_bytes(4, "big") + b for b in blobs))
        out = await py(sb, RAW + """
blobs, data = [], open("blobs", "rb").read()
while data:
    n = int.from_bytes(data[:4], "big"); blobs.append(data[4:4 + n]); data = data[4 + n:]
assert len(blobs) == 30
socks = []
for blob in blobs:
    s = connect()
    try:
        s.sendall(blob)
    except OSError:
        pass
    s.shutdown(socket.SHUT_WR)
    socks.append(s)
for s in socks:             # each is answered or dropped: none hangs
    assert closed_by_host(s)
    s.close()
from heel.client import call
assert call("add", a=1) == 2
print("OK")
""", timeout=60)
        ok(out)
        out = await sh(sb, "heel ipc add --a 2")
        assert out.stdout == b"3\n", explain(out)


async def test_connection_limit_and_slots_come_back():
    router = heel.IpcRouter(max_connections=3)

    @router.command("add")
    async def add(a: int) -> int:
        return a + 1

    async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
        out = await py(sb, RAW + """
held = [connect() for _ in range(3)]
extra = connect()
assert closed_by_host(extra), "a 4th connection was kept"
for s in held:
    s.close()
from heel.client import call
deadline = time.time() + 10
while True:             # the host frees the slots as it sees the ends close
    try:
        assert call("add", a=1) == 2
        break
    except ConnectionError:
        assert time.time() < deadline, "the slots never came back"
        time.sleep(0.05)
print("OK")
""")
        ok(out)
        for _ in range(5):     # every finished process gives its slot back
            out = await sh(sb, "heel ipc add --a 1")
            assert out.stdout == b"2\n", explain(out)


# ---- 11. closing while a call is in flight ------------------------------------------------

def _slow_router():
    """A router whose one command, "slow", sleeps a minute and records
    whether it was cancelled; `started` is set once it runs."""
    router = heel.IpcRouter()
    started = trio.Event()
    record = {"cancelled": False, "finished": False}

    @router.command("slow")
    async def slow() -> str:
        started.set()
        try:
            await trio.sleep(60)
        except trio.Cancelled:
            record["cancelled"] = True
            raise
        record["finished"] = True
        return "late"

    return router, started, record


async def test_closing_cancels_running_handlers():
    router, started, record = _slow_router()
    t0 = time.monotonic()
    with trio.fail_after(10):
        async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
            process = await sb.command("heel").args(["ipc", "slow"]).spawn()
            await started.wait()
            assert process.poll() is None
    assert time.monotonic() - t0 < 10
    assert record == {"cancelled": True, "finished": False}


async def test_handler_of_a_vanished_caller_is_not_left_running():
    # docs/ipc.md: the host does not keep a task alive for a connection it dropped.
    router, started, record = _slow_router()
    async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
        process = await sb.command("heel").args(["ipc", "slow"]).spawn()
        with trio.fail_after(10):
            await started.wait()
        process.kill()
        await process.wait()
        with trio.move_on_after(5):
            while not record["cancelled"]:
                await trio.sleep(0.05)
        assert record["cancelled"], "the handler still runs for a caller that is gone"


# ---- 12. registration ----------------------------------------------------------------------

class Custom:
    pass


def test_registration_errors():
    router = heel.IpcRouter()

    async def f(a: int) -> int:
        return a

    for bad in ["1abc", "a b", "", "x" * 200, "a/b", "-x", "a.b", "é"]:
        if bad:     # "" through the decorator: test_empty_name_is_refused_by_the_decorator
            with pytest.raises(heel.PolicyError):
                router.command(bad)(f)

        class C(heel.IpcCommand):
            name = bad
            parameters = {"a": int}

            async def handle(self, **params):
                return 1

        with pytest.raises(heel.PolicyError):
            router.register(C())
    assert router.names == []

    router.command("x" * 128)(f)           # the longest name allowed
    router.command("good")(f)
    with pytest.raises(heel.PolicyError):
        router.command("good")(f)

    def sync(a: int) -> int:
        return a

    with pytest.raises(heel.PolicyError):
        router.command("sync")(sync)

    async def custom(a: Custom) -> None:
        pass

    with pytest.raises(heel.PolicyError):
        router.command("custom")(custom)

    async def optional_custom(a: Optional[Custom] = None) -> None:
        pass

    with pytest.raises(heel.PolicyError):
        router.command("optional_custom")(optional_custom)

    # Optional[Any] and Any | None are Any (they were refused as a type msgpack does not carry)
    async def optional_any(a: Optional[Any] = None, b: "Any | None" = None) -> None:
        pass

    anything = heel.IpcRouter()
    anything.command("optional_any")(optional_any)
    assert anything.get("optional_any").parameters == {"a": Any, "b": Any}

    async def star(*args: int) -> None:
        pass

    with pytest.raises(heel.PolicyError):
        router.command("star")(star)

    async def kw(**kwargs: int) -> None:
        pass

    with pytest.raises(heel.PolicyError):
        router.command("kw")(kw)

    async def posonly(a: int, /) -> None:
        pass

    with pytest.raises(heel.PolicyError):
        router.command("posonly")(posonly)

    class BadTypes(heel.IpcCommand):
        name = "badtypes"
        parameters = {"a": Custom}

        async def handle(self, **params):
            return 1

    with pytest.raises(heel.PolicyError):
        router.register(BadTypes())
    with pytest.raises(heel.PolicyError):
        router.register(f)
    for kwargs in [{"max_message_size": 10}, {"max_message_size": 2**40}, {"max_connections": 0},
                   {"max_connections": True}]:
        with pytest.raises(heel.PolicyError):
            heel.IpcRouter(**kwargs)
    assert router.names == ["good", "x" * 128]

    @router.command()
    async def named_after_itself() -> None:
        pass

    assert "named_after_itself" in router.names


def test_empty_name_is_refused_by_the_decorator():
    # command("") is an explicit, invalid name, not "use the function's name".
    router = heel.IpcRouter()

    async def f(a: int) -> int:
        return a

    with pytest.raises(heel.PolicyError):
        router.command("")(f)
    assert router.names == []


def test_unresolvable_type_hint_is_a_policy_error():
    router = heel.IpcRouter()

    async def unresolved(a: "NoSuchType") -> None:  # noqa: F821
        pass

    with pytest.raises(heel.PolicyError):
        router.command("unresolved")(unresolved)
    assert router.names == []


# ---- the server itself, fuzzed without a sandbox ---------------------------

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heel import _ipc_codec
from heel.ipc import _ByteBudget, _serve_connection

_FUZZ_ROUTER = heel.IpcRouter(max_message_size=4096)


@_FUZZ_ROUTER.command("echo")
async def _fuzz_echo(value: typing.Any = None):
    return value


_frames = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda body: len(body).to_bytes(4, "big") + body, st.binary(max_size=64)),
    st.builds(lambda n: n.to_bytes(4, "big"), st.integers(0, 2**32 - 1)),
    st.builds(lambda v: _ipc_codec.Connection("client").send(_ipc_codec.Request(1, "echo", {"value": v})),
              st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.text(max_size=20),
                        st.binary(max_size=20))),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(_frames, max_size=6), unsafe=st.sampled_from([0, 7, None]))
def test_server_survives_arbitrary_bytes(chunks, unsafe):
    """Whatever arrives on a connection, the server answers or drops it: it
    never raises into the sandbox's nursery and never hangs, whether its
    first bytes, or all, are read in a worker thread (see ipc.serve)."""

    async def scenario():
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        connections = [1]
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_serve_connection, _FUZZ_ROUTER, theirs.detach(), connections,
                                   trio.Semaphore(8), _ByteBudget(1 << 20), unsafe, trio.CapacityLimiter(1))
                peer = trio.socket.from_stdlib_socket(ours)
                for chunk in chunks:
                    try:
                        await peer.send(chunk)
                    except OSError:
                        break  # the server dropped us: allowed
                try:
                    peer.shutdown(socket.SHUT_WR)
                    while await peer.recv(65536):
                        pass  # replies, until the server closes its end
                except OSError:
                    pass  # dropped with our bytes unread: a reset, allowed
                peer.close()
        assert connections == [0]  # the slot came back

    trio.run(scenario)


async def test_client_is_importable_from_a_venv_inside():
    """heel.client needs nothing installed: a fresh venv's Python (made inside
    the sandbox, without pip) imports it and calls the host."""
    router = heel.IpcRouter()

    @router.command("add")
    async def add(a: int, b: int = 1) -> int:
        return a + b

    async with heel.Sandbox(heel.SandboxConfig(ipc=router)) as sb:
        out = await sh(sb, "python3 -m venv --without-pip venv && "
                           "venv/bin/python -c 'import sys; from heel.client import call; "
                           "print(sys.prefix != sys.base_prefix, call(\"add\", a=41))'", timeout=60)
    assert out.returncode == 0 and out.stdout == b"True 42\n", explain(out)
