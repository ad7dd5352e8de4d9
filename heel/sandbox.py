"""The trio API: ``Sandbox``, its ``Command`` builder and their results."""

from __future__ import annotations

import enum
import errno
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Iterable, Mapping, Sequence, TypeVar

import trio

from ._plan import SandboxPlan, proxy_environment
from ._spawn import Prepared, Session, needs_relay
from ._terminal import DRAIN_SECONDS, TerminalBridge
from ._sync import BACKGROUND_RECHECK, INIT_LOST, TreeStopper, give_back_unread, pipe_bytes, same_file, stop_with_command
from .config import SandboxConfig, check_env_item, check_limit
from .errors import CommandFailed, CommandTimeout, HeelError, PolicyError, SandboxClosed
from .policy import NetworkPolicy
from .process import Process, finish_despite_ctrl_c

if sys.version_info < (3, 11):  # trio brings the backport there
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from .config import PathLike
    from collections.abc import Callable

    from .proxy import NetworkEvent, Proxy, Resolver
    from .venv import VenvProgress

P = TypeVar("P", bound=NetworkPolicy)

__all__ = ["Sandbox", "Command", "Output", "ExitStatus", "Stdio"]


class Stdio(enum.Enum):
    """Where a standard stream of a command goes."""

    PIPE = "pipe"        #: a pipe to the host: captured by output(), a stream on Process
    INHERIT = "inherit"  #: the host process's own stream
    NULL = "null"        #: /dev/null


@dataclass(frozen=True)
class Output:
    """What ``Command.output()`` returns."""

    stdout: bytes
    stderr: bytes
    returncode: int
    timed_out: bool = False
    #: output_bytes was reached: the command was killed and the rest dropped
    truncated: bool = False

    @property
    def success(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@dataclass(frozen=True)
class ExitStatus:
    """What ``Command.status()`` returns."""

    returncode: int
    timed_out: bool = False

    @property
    def success(self) -> bool:
        return self.returncode == 0 and not self.timed_out


_CLOSE_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("heel_close_limiter")


def _close_limiter() -> trio.CapacityLimiter:
    """The threads that finish closing sandboxes: heel's own, without a
    bound (each is one sandbox's close), per trio run."""
    try:
        return _CLOSE_LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(math.inf)
        _CLOSE_LIMITER.set(limiter)
        return limiter


class Sandbox(Generic[P]):
    """A sandbox: a workdir, a plan and the commands run in it.

    ``async with Sandbox(config) as sb:`` prepares the Landlock ruleset and
    seccomp program once; every command then runs under them.  Closing the
    sandbox kills every process still running in it (with all their
    descendants) and removes the temporary workdir.

    With a network policy other than DenyAll the sandbox gets heel's proxy
    (heel.proxy), which runs in the sandbox's nursery; ``resolver`` replaces
    the host's name resolution for it (an async callable (host, port) ->
    addresses), for tests that map names to local servers.  When the
    config's PythonConfig names a VenvConfig, the environment is built (or
    extended) as the sandbox opens; ``on_venv_progress`` gets its
    VenvProgress events.
    """

    def __init__(self, config: SandboxConfig[P] | None = None, *,
                 resolver: Resolver | None = None,
                 on_venv_progress: Callable[[VenvProgress], object] | None = None) -> None:
        if config is None:
            config = SandboxConfig()
        if not isinstance(config, SandboxConfig):
            raise PolicyError(f"Sandbox needs a SandboxConfig, got {config!r}")
        if resolver is not None and not callable(resolver):
            raise PolicyError(f"resolver must be an async callable (host, port) -> addresses, got {resolver!r}")
        if on_venv_progress is not None and not callable(on_venv_progress):
            raise PolicyError(f"on_venv_progress must be callable, got {on_venv_progress!r}")
        self.config = config
        self._resolver = resolver
        self._on_venv_progress = on_venv_progress
        self._proxy: Proxy | None = None
        self._proxy_scope: trio.CancelScope | None = None
        self._proxy_done: trio.Event | None = None
        self._ipc_done: trio.Event | None = None  # set when the IPC task has ended
        self._commands_started = 0
        self._snippets = 0
        self._session: Session | None = None
        self._nursery: trio.Nursery | None = None
        self._relays: set[trio.Event] = set()  # of the copies still running
        #: (stream name, OSError) for each inherited host file that refused a command's output
        self._output_errors: list[tuple[str, OSError | None]] = []  # and INIT_LOST, for the CLI
        self._background: set[trio.CancelScope] = set()
        self._processes: set[Process] = set()
        self._closed = False
        self._close_done: trio.Event | None = None  # set once aclose() has finished
        self.degraded: list[str] = []

    # KI-protected: a Ctrl-C arrives at an await (where the cleanup below
    # sees it), never between opening the session and being ready to close it.
    @trio.lowlevel.enable_ki_protection
    async def __aenter__(self) -> "Sandbox[P]":
        if self._session is not None or self._closed:
            raise SandboxClosed("a Sandbox can be opened once")
        python = self.config.python
        if python is not None:
            from .venv import VenvConfig, VenvManager

            if isinstance(python.venv, VenvConfig):
                # Built (or extended) before the sandbox opens: the plan
                # grants what is there.
                await VenvManager.create(python.venv, resolver=self._resolver,
                                         on_progress=self._on_venv_progress)
        self._session = Session(self.config)
        self.degraded = self._session.degraded
        # Background work of the sandbox (the proxy, IPC, copying stdio that
        # must not be passed as it is) runs in a nursery that lives as long
        # as it does.  Entered here, it encloses the body of `async with`:
        # so aclose() never cancels the nursery itself, only the scope each
        # background task runs in (_start_background), and an early
        # aclose() leaves the body running.
        entered = False
        try:
            self._nursery_manager = trio.open_nursery()
            self._nursery = await self._nursery_manager.__aenter__()
            entered = True
            if self.config.ipc is not None and self._session.ipc is not None:  # (the socket comes with the router)
                from .ipc import serve

                # Set when serve() no longer uses the broker, or the task ended.
                self._ipc_done = trio.Event()
                self._start_background(serve, self.config.ipc, self._session.ipc, self._ipc_done,
                                       run_if_closed=False, done=self._ipc_done)
            if self._session.proxy_listener is not None:
                from .proxy import Proxy

                self._proxy = Proxy(self.config.network, self._session.proxy_listener,
                                    secret=self._session.plan.proxy_secret,
                                    require_secret=self._session.proxy_requires_secret,
                                    resolver=self._resolver, on_event=self.config.on_network_event)
                await self._nursery.start(self._run_proxy, self._proxy)
        except BaseException as exc:
            # Cancelled (or failed) half open: close what is open, and leave
            # the nursery as if its body had ended (outside the shield: the
            # scopes must close in the order they opened), before the
            # exception goes on to the caller's scopes.
            with trio.CancelScope(shield=True):
                await self.aclose()
            manager = self.__dict__.pop("_nursery_manager", None)
            if entered:
                await _exit_nursery(manager, body_raised=True)
            if isinstance(exc, BaseExceptionGroup):
                # nursery.start() of a caller cancelled before the proxy
                # started raises a group of the proxy task's Cancelled.
                raise_bare_cancelled(exc)
            raise
        return self

    def _start_background(self, function, *args, run_if_closed: bool = True,
                          done: trio.Event | None = None) -> trio.Event:
        """Run ``function(*args)`` in the sandbox's nursery, in a cancel
        scope of its own that aclose() cancels.  If the sandbox closed
        before the task began, it runs cancelled (a relay closes its ends
        and sets its event), or not at all when ``run_if_closed`` is false
        (IPC, whose socket is closed with the sandbox).  Returns an event
        set once the task has ended (or found it had nothing to do):
        ``done`` when given (the task may set it earlier)."""
        assert self._nursery is not None
        done = trio.Event() if done is None else done

        async def run() -> None:
            try:
                if self._closed and not run_if_closed:
                    return
                with trio.CancelScope() as scope:
                    if self._closed:  # it ends at its first checkpoint
                        scope.cancel()
                    self._background.add(scope)
                    try:
                        await function(*args)
                    finally:
                        self._background.discard(scope)
            finally:
                done.set()

        self._nursery.start_soon(run)
        return done

    async def _run_proxy(self, proxy: Proxy, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._proxy_done = trio.Event()
        try:
            with trio.CancelScope() as self._proxy_scope:
                await proxy.serve(task_status=task_status)
        finally:
            self._proxy_done.set()

    def network_events(self) -> list[NetworkEvent]:
        """What the proxy decided so far, oldest first (see heel.NetworkEvent).
        Empty under DenyAll: there is no proxy, and no network to ask for.

        The list is bounded: it keeps the latest 10,000 allowed events and,
        apart from them, the latest 10,000 others (denied, failed), so a
        flood of denials never pushes out an allowed one.
        ``network_events_dropped`` counts what is no longer listed;
        the config's ``on_network_event`` sees every event."""
        return list(self._proxy.events) if self._proxy is not None else []

    @property
    def network_events_dropped(self) -> int:
        """How many events network_events() no longer lists (see there)."""
        return self._proxy.events_dropped if self._proxy is not None else 0

    @trio.lowlevel.enable_ki_protection  # a Ctrl-C here would leave the sandbox half closed
    async def __aexit__(self, *exc) -> None:
        manager = getattr(self, "_nursery_manager", None)
        if manager is None:  # never entered, or left already
            raise SandboxClosed("the sandbox is not open: use `async with Sandbox(config) as sb:`")
        del self._nursery_manager
        try:
            await self.aclose()
        finally:
            # The nursery's tasks never raise (but Cancelled, see
            # _exit_nursery), and the body's exception is not the nursery's:
            # it goes on as it is, not wrapped in a group.
            await _exit_nursery(manager, body_raised=len(exc) > 1 and exc[1] is not None)

    @trio.lowlevel.enable_ki_protection
    async def aclose(self) -> None:
        """Kill every process of the sandbox and remove its temporary files.

        ``async with`` calls this; call it yourself only to close early: the
        body goes on, and what it asks of the sandbox then raises
        SandboxClosed."""
        if self._closed:
            # Another task closes it: return once that is done (the workdir
            # removed), as `async with` promises.
            if self._close_done is not None:
                with trio.CancelScope(shield=True):
                    await self._close_done.wait()
            return
        self._closed = True
        self._close_done = trio.Event()
        try:
            await self._close()
        finally:
            self._close_done.set()

    async def _close(self) -> None:
        interrupted: list[KeyboardInterrupt] = []
        with trio.CancelScope(shield=True):
            for process in list(self._processes):
                process.kill()
            for process in list(self._processes):
                await finish_despite_ctrl_c(process.aclose, interrupted)
            self._processes.clear()
            # The relays end at the end of their pipes, now that every
            # process is gone; give them a moment to copy what is left.
            with trio.move_on_after(2):
                for done in list(self._relays):
                    await finish_despite_ctrl_c(done.wait, interrupted)
            # The proxy stops before its listener is closed with the session.
            if self._proxy_scope is not None and self._proxy_done is not None:  # set together
                self._proxy_scope.cancel()
                await finish_despite_ctrl_c(self._proxy_done.wait, interrupted)
            for scope in list(self._background):
                scope.cancel()
            # The IPC task leaves the broker before it is closed: its worker
            # thread, which no cancel stops, may be reading the broker (or
            # closing what the sandbox handed over: bounded by the sandbox's
            # memory), and an fd number closed under it could be another's.
            # Not the whole task: its handlers may still run, and one of
            # them may be this close (an IPC command that closes its own
            # sandbox), which the task would wait for.
            if self._ipc_done is not None:
                await finish_despite_ctrl_c(self._ipc_done.wait, interrupted)
            if self._session is not None:
                # The sockets here, where trio watches them; the kill, the
                # reaping and the removal of the workdir (a tree of
                # thousands, a workdir of a million files: seconds) in a
                # thread, so that the other sandboxes of this process go on.
                self._session.close_channels()
                # heel's own limiter: not queued behind the application's
                # threads (trio's default limiter), which no cancel could end.
                await finish_despite_ctrl_c(partial(trio.to_thread.run_sync, self._session.finish,
                                                    limiter=_close_limiter()), interrupted)
                # A Ctrl-C that came while the thread ran is raised here,
                # with the others, rather than at the caller's next await.
                await finish_despite_ctrl_c(trio.lowlevel.checkpoint, interrupted)
        if interrupted:
            raise interrupted[0]

    @property
    def plan(self) -> SandboxPlan:
        """The plan this sandbox enforces (paths, rules, mounts, environment)."""
        if self._session is None:
            raise SandboxClosed("the sandbox is not open: use `async with Sandbox(config) as sb:`")
        return self._session.plan

    @property
    def workdir(self) -> Path:
        return Path(self.plan.workdir)

    def _live(self) -> Prepared:
        if self._closed:
            raise SandboxClosed("the sandbox is closed")
        if self._session is None:
            raise SandboxClosed("the sandbox is not open: use `async with Sandbox(config) as sb:`")
        return self._session.prepared

    def command(self, program: PathLike) -> "Command":
        """A builder for one command: ``sb.command("ls").arg("-l").output()``."""
        return Command(self, program)

    def python(self) -> "Command":
        """A builder for the sandbox's Python: the interpreter of its
        PythonConfig, or ``python3`` from the PATH."""
        python = self.config.python
        return self.command(python.executable if python is not None else "python3")

    async def run_python(self, code: str, *, args: Sequence[str] = (), input: bytes | None = None,
                         timeout: float | None = None) -> Output:
        """Run Python source in the sandbox; returns its Output.

        The code is written to a file in the sandbox's private tmp and run
        from there, so a traceback names ``/tmp/heel_python_N_XXXXXXXX.py``
        with its lines, and ``sys.argv[1:]`` is ``args``."""
        if not isinstance(code, str):
            raise PolicyError(f"run_python needs source code as a str, got {type(code).__name__}")
        try:
            source = code.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PolicyError(f"run_python: the code cannot be written as UTF-8 ({exc.reason} at "
                              f"position {exc.start})") from None
        if isinstance(args, (str, bytes)):  # each character would be an argument
            raise PolicyError(f"run_python: args must be a sequence of arguments, not one {type(args).__name__}")
        if not isinstance(args, Iterable):
            raise PolicyError(f"run_python: args must be a sequence of arguments, got {type(args).__name__}")
        argv = [_arg(a, "args") for a in args]
        import secrets

        plan = self._live().plan
        self._snippets += 1
        # The private tmp is the sandbox's to write: a fresh random name,
        # never a file it planted (O_EXCL, O_NOFOLLOW).
        for _ in range(8):
            name = f"heel_python_{self._snippets}_{secrets.token_hex(4)}.py"
            try:
                fd = os.open(os.path.join(plan.host_tmp, name),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                break
            except FileExistsError:
                continue
        else:
            raise OSError(errno.EEXIST, "run_python: no free file name in the sandbox's tmp")
        path = os.path.join(plan.host_tmp, name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(source)
            command = self.python().arg(os.path.join(plan.tmp, name)).args(argv)
            command.stdin(input if input is not None else Stdio.NULL)
            if timeout is not None:
                command.timeout(timeout)
            return await command.output()
        finally:
            # Python has read it by the time the command ends; removing it
            # keeps a long-lived sandbox's tmp from filling with snippets.
            try:
                os.unlink(path)
            except OSError:
                pass

    async def run(self, command: Sequence[PathLike] | str, *, input: bytes | None = None,
                  capture_stdout: bool = False, capture_stderr: bool = False, check: bool = True,
                  cwd: PathLike | None = None, env: Mapping[str, str] | None = None,
                  timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run a command to completion, shaped like ``trio.run_process``.

        A string is a shell command (``sh -c``).  Output that is not captured
        goes to the host's stdout/stderr.  With ``check`` (the default) a
        non-zero exit raises CommandFailed and a timeout CommandTimeout.
        """
        if isinstance(command, str):
            argv = ["sh", "-c", command]
        elif isinstance(command, (bytes, bytearray, memoryview)) or not isinstance(command, Iterable):
            raise PolicyError(f"run() takes a list of arguments or a shell command as a str, "
                              f"got {type(command).__name__}")
        else:
            argv = list(command)
        if not argv:
            raise PolicyError("run() needs a command")
        cmd = self.command(argv[0]).args(argv[1:])
        cmd.stdin(input if input is not None else Stdio.NULL)
        cmd.stdout(Stdio.PIPE if capture_stdout else Stdio.INHERIT)
        cmd.stderr(Stdio.PIPE if capture_stderr else Stdio.INHERIT)
        if cwd is not None:
            cmd.current_dir(cwd)
        if env is not None:
            cmd.envs(env)
        if timeout is not None:
            cmd.timeout(timeout)
        out = await cmd.output()
        stdout = out.stdout if capture_stdout else None
        stderr = out.stderr if capture_stderr else None
        if check and out.timed_out:
            timeout = cmd.effective_timeout()
            assert timeout is not None  # only a command with a timeout times out
            raise CommandTimeout(argv, timeout, stdout, stderr)
        if check and out.returncode != 0:
            raise CommandFailed(out.returncode, argv, stdout, stderr)
        return subprocess.CompletedProcess(argv, out.returncode, stdout, stderr)

    async def _spawn(self, cmd: "Command", stdin, stdout, stderr) -> Process:
        prepared = self._live()
        # A standard stream this process started without (Python then has
        # sys.__stdout__ None) is not inherited: whatever took its fd number
        # since (trio's wakeup socket, say) is not the command's to have.
        stdin, stdout, stderr = (Stdio.NULL if spec is Stdio.INHERIT and stream is None else spec
                                 for spec, stream in zip((stdin, stdout, stderr),
                                                         (sys.__stdin__, sys.__stdout__, sys.__stderr__)))
        plan = prepared.plan
        env = dict(plan.env)
        if self._proxy is not None:
            # A proxy user name of its own, so that the proxy can tell which
            # command asked (NetworkRequest.command).
            self._commands_started += 1
            user = f"cmd{self._commands_started}"
            # Kept after the command ends (what it left running may still ask),
            # but not without end: the oldest names go first.
            if len(self._proxy.commands) >= 4096:
                del self._proxy.commands[next(iter(self._proxy.commands))]
            self._proxy.commands[user] = os.path.basename(os.fspath(cmd._argv[0]))
            env.update(proxy_environment(plan.proxy_port, user, plan.proxy_secret))
            env.update(self.config.env)  # the config's own values win, as in the plan
        for key in cmd._env_remove:
            env.pop(key, None)
        env.update(cmd._env)
        cwd = plan.workdir if cmd._cwd is None else cmd._cwd
        host_fds: list[int] = []  # the child's ends: closed here once it has them
        child_fds: list[int] = []
        streams: list = []
        relays: list = []  # (coroutine function, args) started once the command runs
        # Host terminals among the inherited streams: a pty of heel's own instead.
        specs = (stdin, stdout, stderr)
        bridge = TerminalBridge((0 if stdin is Stdio.INHERIT else -1, 1 if stdout is Stdio.INHERIT else -1,
                                 2 if stderr is Stdio.INHERIT else -1), cmd._interactive_terminal,
                                prepared.ptmx)
        relayed_stdout = -1  # the pipe an inherited stdout file gets, which stderr may share
        names = {1: "stdout", 2: "stderr"}  # of the relayed streams, for a refused write's report
        try:
            for index, spec in enumerate(specs):
                if spec is Stdio.INHERIT and bridge.child_fds[index] != index:
                    child_fds.append(bridge.child_fds[index])
                    streams.append(None)
                elif spec is Stdio.INHERIT and not needs_relay(index):
                    child_fds.append(index)
                    streams.append(None)
                elif index == 2 and spec is Stdio.INHERIT and relayed_stdout >= 0 and same_file(1, 2):
                    # `> log 2>&1`: one pipe for both keeps the order written.
                    child_fds.append(relayed_stdout)
                    names[1] = "stdout and stderr"
                    streams.append(None)
                elif spec is Stdio.NULL:
                    fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                    host_fds.append(fd)
                    child_fds.append(fd)
                    streams.append(None)
                else:
                    r, w = os.pipe2(os.O_CLOEXEC)
                    ours, theirs = (w, r) if index == 0 else (r, w)
                    host_fds.append(theirs)
                    child_fds.append(theirs)
                    stream = trio.lowlevel.FdStream(ours)
                    if spec is Stdio.INHERIT:  # a host file: copied, never handed over
                        if index == 0:
                            # A read end of our own tells, once the command
                            # is gone, what it left unread (give_back_unread).
                            reader = os.dup(r)
                            os.set_inheritable(reader, False)
                            relays.append((_relay_in, stream, index, reader))
                        else:
                            relays.append((_relay_out, stream, index, self._output_errors))
                            if index == 1:
                                relayed_stdout = theirs
                        streams.append(None)
                    else:
                        streams.append(stream)
            fd0, fd1, fd2 = child_fds
            pidfd, ctl = await prepared.launch_async(cmd._argv, env, cwd, (fd0, fd1, fd2),
                                                     ctty=bridge.interactive)
        except BaseException:
            bridge.close()
            # Closed at once, without a checkpoint: for a cancelled caller
            # (cancelled here at launch_async's lock) the first stream's
            # aclose() raised Cancelled again, and the rest were skipped:
            # the other streams were left to the garbage collector, and a
            # relayed stdin's read end (a host file as stdin) stayed open
            # for good, one fd per cancelled command.  Nothing waits on
            # these fds yet.
            for stream in streams + [relay[1] for relay in relays]:
                if stream is not None:
                    stream.close()
            for relay in relays:
                if relay[0] is _relay_in:
                    os.close(relay[3])
            raise
        finally:
            for fd in host_fds:
                os.close(fd)
        process = Process(pidfd=pidfd, ctl=ctl, args=list(cmd._argv),
                          stdin=streams[0], stdout=streams[1],
                          stderr=streams[2], on_reaped=self._reaped, plan=self._live().plan)
        relay_done = []
        for function, stream, host_fd, extra in relays:
            if function is _relay_in:
                relay_done.append(self._start_relay(function, stream, host_fd, extra, process._exited))
            else:
                relay_done.append(self._start_relay(function, stream, host_fd, extra, names[host_fd]))
        if bridge.master >= 0:
            bridge.started()
            relay_done.append(self._start_relay(_relay_terminal, bridge, process))
        if cmd._interactive_terminal:
            relay_done.append(self._start_relay(_job_control, bridge, process))
        process._relays = relay_done
        self._processes.add(process)
        try:
            await process._started()
        except BaseException as exc:
            await process.aclose()
            # The sandbox closed while it started (its aclose() closed the
            # process's socket under it, or heel-init went with it).
            if self._closed and isinstance(exc, (HeelError, OSError, trio.ClosedResourceError)):
                raise SandboxClosed("the sandbox is closed") from exc
            raise
        return process

    def _reaped(self, process: Process) -> None:
        self._processes.discard(process)
        if process._lost:  # said by the CLI, with the output errors
            self._output_errors.append((INIT_LOST, None))

    def _start_relay(self, function, *args) -> trio.Event:
        """A copy of a command's stdio in the background: ``function(*args,
        done)``; the event is set when it ends."""
        done = trio.Event()
        self._relays.add(done)

        async def relay() -> None:
            try:
                await function(*args, done)
            finally:
                done.set()
                self._relays.discard(done)

        self._start_background(relay)
        return done


async def _exit_nursery(manager, *, body_raised: bool = False) -> None:
    """Leave the sandbox's nursery.  Its tasks catch their errors, but a
    KeyboardInterrupt or SystemExit raised in one (an IPC handler, a
    network policy or an event callback that calls sys.exit()) comes out as
    itself, not nested in one group per nursery it crossed, so that
    ``except KeyboardInterrupt`` and the interpreter's exit still see it.

    A cancel of the caller's scope reaches the background tasks too (the
    nursery lies inside that scope, and their own scopes do not catch a
    cancel of an outer one): the group of Cancelled they raised came out of
    ``async with Sandbox``, nested once per nursery (the proxy's and IPC's
    have their own), where callers expect trio.Cancelled; and it took the
    place of the body's exception, which the caller's scope then swallowed
    with the group (a body that failed as its scope was cancelled: the
    error lost).  Now the body's exception goes on when it raised one (the
    cancel stays pending, for the caller's next checkpoint), else one bare
    Cancelled."""
    try:
        await manager.__aexit__(None, None, None)
    except BaseExceptionGroup as group:
        raise_bare_interrupt(group)
        if body_raised and _only_cancelled(group):
            return
        raise_bare_cancelled(group)
        raise


def raise_bare_interrupt(group: BaseExceptionGroup) -> None:
    """Raise the KeyboardInterrupt (else the SystemExit) of a group that
    holds nothing else, however deeply nested, as itself; else return.
    trio.Cancelled beside it is dropped: a cancel of a scope around the
    sandbox (the caller's, or trio's own as it unwinds) that reached other
    tasks meanwhile, which the interrupt, going past that scope, ends
    anyway."""
    leaves = list(_leaves(group))
    for kind in (KeyboardInterrupt, SystemExit):
        first = next((leaf for leaf in leaves if isinstance(leaf, kind)), None)
        if first is not None and all(isinstance(leaf, (KeyboardInterrupt, SystemExit, trio.Cancelled))
                                     for leaf in leaves):
            raise first from None


def _only_cancelled(group: BaseExceptionGroup) -> bool:
    leaves = list(_leaves(group))
    return bool(leaves) and all(isinstance(leaf, trio.Cancelled) for leaf in leaves)


def raise_bare_cancelled(group: BaseExceptionGroup) -> None:
    """Raise a group that holds nothing but trio.Cancelled, however deeply
    nested, as one bare Cancelled; else return.  All of them are one
    cancel, of a scope around the nursery they left (a cancel of a scope
    inside it is caught there), so one stands for all; without the
    traceback of the task that raised it, deep in heel."""
    if _only_cancelled(group):
        first = next(_leaves(group))
        raise first.with_traceback(None) from None


def _leaves(error: BaseException):
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


class Command:
    """One command to run in a sandbox; every setter returns the builder."""

    def __init__(self, sandbox: Sandbox, program: PathLike) -> None:
        self._sandbox = sandbox
        self._argv = [_arg(program, "program")]
        if not self._argv[0]:
            raise PolicyError("the program name is empty")
        self._env: dict[str, str] = {}
        self._env_remove: set[str] = set()
        self._cwd: str | None = None
        self._stdin: Stdio | bytes | None = None
        self._stdout: Stdio | None = None
        self._stderr: Stdio | None = None
        self._timeout: float | None = None
        #: The CLI's own command: an inherited terminal goes raw, and the
        #: command's pty is its controlling terminal (heel._terminal).
        self._interactive_terminal = False

    def __repr__(self) -> str:
        return f"<heel.Command {self._argv!r}>"

    def arg(self, value: PathLike) -> "Command":
        self._argv.append(_arg(value, "argument"))
        return self

    def args(self, values: Iterable[PathLike]) -> "Command":
        if isinstance(values, (str, bytes)):
            raise PolicyError("args() takes a list of arguments; use arg() for one")
        if not isinstance(values, Iterable):
            raise PolicyError(f"args() takes a list of arguments, got {type(values).__name__}")
        for value in values:
            self.arg(value)
        return self

    def env(self, key: str, value: str) -> "Command":
        check_env_item(key, value)
        self._env[key] = value
        self._env_remove.discard(key)
        return self

    def envs(self, values: Mapping[str, str]) -> "Command":
        if not isinstance(values, Mapping):
            raise PolicyError(f"envs() takes a mapping of names to strings, got {type(values).__name__}")
        for key, value in values.items():
            self.env(key, value)
        return self

    def env_remove(self, key: str) -> "Command":
        self._env.pop(key, None)
        self._env_remove.add(key)
        return self

    def current_dir(self, path: PathLike) -> "Command":
        text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
        if not isinstance(text, str) or "\0" in text:
            raise PolicyError(f"current_dir: {path!r} is not a valid path")
        if not os.path.isabs(text):
            text = os.path.join(self._sandbox.plan.workdir, text)
        self._cwd = text
        return self

    def stdin(self, value: Stdio | bytes) -> "Command":
        if not isinstance(value, (Stdio, bytes, bytearray, memoryview)):
            raise PolicyError(f"stdin takes a Stdio or bytes, got {type(value).__name__}")
        self._stdin = value if isinstance(value, Stdio) else bytes(value)
        return self

    def stdout(self, value: Stdio) -> "Command":
        if not isinstance(value, Stdio):
            raise PolicyError(f"stdout takes a Stdio, got {value!r}")
        self._stdout = value
        return self

    def stderr(self, value: Stdio) -> "Command":
        if not isinstance(value, Stdio):
            raise PolicyError(f"stderr takes a Stdio, got {value!r}")
        self._stderr = value
        return self

    def timeout(self, seconds: float) -> "Command":
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
                or (isinstance(seconds, float) and not math.isfinite(seconds)) or seconds <= 0:
            raise PolicyError(f"timeout must be a positive number of seconds, got {seconds!r}")
        check_limit("timeout", seconds, "timeout")
        self._timeout = seconds
        return self

    def effective_timeout(self) -> float | None:
        return self._timeout if self._timeout is not None else self._sandbox.config.limits.timeout

    async def spawn(self) -> Process:
        """Start the command; streams default to stdin=NULL, stdout/stderr=INHERIT.

        A Process from spawn() is not bound by the timeout: the caller owns
        it (``async with await cmd.spawn() as p:`` kills it on exit).  Bytes
        as stdin are for output() and status(): here write them to
        ``process.stdin`` (.stdin(Stdio.PIPE))."""
        if isinstance(self._stdin, bytes):
            raise PolicyError("spawn() does not feed stdin bytes (output() and status() do): "
                              "use .stdin(Stdio.PIPE) and write them to process.stdin")
        stdin = self._stdin or Stdio.NULL
        return await self._sandbox._spawn(self, stdin, self._stdout or Stdio.INHERIT,
                                          self._stderr or Stdio.INHERIT)

    async def status(self) -> ExitStatus:
        """Run to completion with stdout/stderr inherited (unless set)."""
        out = await self._run(self._stdout or Stdio.INHERIT, self._stderr or Stdio.INHERIT)
        return ExitStatus(out.returncode, out.timed_out)

    async def output(self) -> Output:
        """Run to completion and capture stdout and stderr (unless set)."""
        return await self._run(self._stdout or Stdio.PIPE, self._stderr or Stdio.PIPE)

    async def _run(self, stdout: Stdio, stderr: Stdio) -> Output:
        data = self._stdin if isinstance(self._stdin, bytes) else None
        stdin = Stdio.PIPE if data is not None else (self._stdin or Stdio.NULL)
        limit = self._sandbox.config.limits.output_bytes
        captured = {"stdout": bytearray(), "stderr": bytearray()}
        state = {"truncated": False}
        timeout = self.effective_timeout()
        process: Process | None = None

        async def feed(stdin: trio.abc.SendStream) -> None:
            try:
                if data:
                    await stdin.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the command stopped reading: not our failure
            finally:
                await stdin.aclose()

        async def drain(process: Process, name: str, stream) -> None:
            buf = captured[name]
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.ClosedResourceError:
                    return  # the sandbox closed and took the stream: what came is kept
                if not chunk:
                    return
                if limit is not None and len(captured["stdout"]) + len(captured["stderr"]) + len(chunk) > limit:
                    room = limit - len(captured["stdout"]) - len(captured["stderr"])
                    buf += chunk[:max(0, room)]
                    state["truncated"] = True
                    process.kill()
                    return
                buf += chunk

        # The timeout counts from here, but the start itself is not cut
        # short (it takes a millisecond or two): a command whose time is up
        # by then is started and killed, and reported as timed out like any.
        deadline = trio.current_time() + (math.inf if timeout is None else timeout)
        try:
            process = await self._sandbox._spawn(self, stdin, stdout, stderr)
            with trio.move_on_at(deadline) as scope:
                try:
                    async with trio.open_nursery() as nursery:
                        if process.stdin is not None:
                            nursery.start_soon(feed, process.stdin)
                        if process.stdout is not None:
                            nursery.start_soon(drain, process, "stdout", process.stdout)
                        if process.stderr is not None:
                            nursery.start_soon(drain, process, "stderr", process.stderr)
                        await process.wait()
                except BaseExceptionGroup as group:
                    # A Ctrl-C while output() waits comes out as itself,
                    # not in a group that `except KeyboardInterrupt` misses;
                    # so does a cancel of the caller's scope, which the
                    # feeding and draining tasks raised too (a group of
                    # Cancelled came out of output(), status() and run()).
                    raise_bare_interrupt(group)
                    raise_bare_cancelled(group)
                    raise
            timed_out = scope.cancelled_caught
            if timed_out:
                process.kill()
        finally:
            if process is not None:
                await process.aclose()
        # What the command wrote to inherited host files is all copied.
        for done in process._relays:
            await done.wait()
        returncode = process.returncode
        assert returncode is not None  # aclose() reaped it
        return Output(bytes(captured["stdout"]), bytes(captured["stderr"]), returncode,
                      timed_out=timed_out, truncated=state["truncated"])


async def _relay_out(stream: trio.lowlevel.FdStream, host_fd: int, errors: list, name: str,
                     done: trio.Event) -> None:
    """Copy a command's output into a host file (see heel._spawn.needs_relay).
    A file that refuses it (a full disk) ends the copy: the command gets
    EPIPE, and ``errors`` (the sandbox's) gets (stream name, OSError)."""
    try:
        async with stream:
            while chunk := await stream.receive_some(65536):
                view = memoryview(chunk)
                try:
                    while view:
                        view = view[os.write(host_fd, view):]
                except OSError as exc:
                    errors.append((name, exc))
                    return
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the pipe went away with the sandbox
    finally:
        done.set()


#: How often typed input waiting for room in a pty nothing holds is tried
#: again (see _relay_terminal).
UNHELD_RECHECK = 0.1


async def _relay_terminal(bridge: TerminalBridge, process: Process, done: trio.Event) -> None:
    """Copy between a host terminal and the command's pty (heel._terminal)
    until the command has ended; then pass on what it left there, restore
    the host terminal and close the pty.  The pty stays open while the
    command runs, even after it closed its stdio: closing it would hang up
    the command's session."""

    def hung_up() -> None:
        if bridge.host_gone:  # the user's terminal went away: so does the command
            process.kill()

    unheld = []  # set once no fd holds the pty's end (the command closed its stdio)

    async def output() -> None:
        while True:
            if bridge.output_waiting:
                await trio.lowlevel.wait_writable(bridge.out_fd)
                bridge.flush_output()
            else:
                await trio.lowlevel.wait_readable(bridge.master)
                if not bridge.copy_output():
                    unheld.append(True)
                    return
            hung_up()

    async def typed() -> None:
        while bridge.host_in >= 0:
            if bridge.input_waiting and unheld:
                # epoll reports the master HUP, so "writable", for ever once
                # nothing holds the pty's end: a wait for room returned at
                # once and the write failed with EAGAIN, at 100% of a core
                # while the pty's input stayed full.  Look again in a while.
                await trio.sleep(UNHELD_RECHECK)
            elif bridge.input_waiting:
                await trio.lowlevel.wait_writable(bridge.master)
            elif bridge.may_read():
                await trio.lowlevel.wait_readable(bridge.host_in)
            else:  # in the background: look again in a while
                await trio.sleep(BACKGROUND_RECHECK)
                continue
            bridge.copy_input()
        hung_up()

    async def all_output(ended: trio.Event) -> None:
        await output()
        ended.set()

    try:
        async with trio.open_nursery() as nursery:
            output_ended = trio.Event()
            nursery.start_soon(typed)
            nursery.start_soon(all_output, output_ended)
            await process._exited.wait()
            # What the command left in the pty goes on to the terminal for as
            # long as it takes it, given up after DRAIN_SECONDS without progress
            # (a terminal held with ^S, or gone).
            bridge.progress_at = time.monotonic()
            while not output_ended.is_set():
                left = bridge.progress_at + DRAIN_SECONDS - time.monotonic()
                if left <= 0:
                    break
                with trio.move_on_after(left):
                    await output_ended.wait()
            nursery.cancel_scope.cancel()
    finally:
        for fd in (bridge.master, bridge.out_fd, bridge.host_in):  # heel's own: about to be closed
            if fd >= 0:
                trio.lowlevel.notify_closing(fd)
        bridge.close()
        done.set()


async def _job_control(bridge: TerminalBridge, process: Process, done: trio.Event) -> None:
    """The CLI's one command (signal receivers of several commands would
    take each other's handlers), until it ends: SIGWINCH, the new size to
    its pty; SIGTSTP (^Z at a terminal heel does not hold raw, `kill -TSTP`;
    at one it holds raw ^Z itself goes to the command), the command's
    processes are stopped, the shell gets its terminal settings back and
    heel stops; SIGCONT (`fg`, `bg`), the command goes on too, and its pty
    is raw again in the foreground.  A SIGTSTP ignored when heel started
    stays ignored.  A library command's pty keeps the size it started with."""
    wanted = [signal.SIGWINCH, signal.SIGCONT]
    if signal.getsignal(signal.SIGTSTP) != signal.SIG_IGN:
        wanted.append(signal.SIGTSTP)
    async def receive() -> None:
        try:
            with trio.open_signal_receiver(*wanted) as received:
                async for signum in received:
                    if signum == signal.SIGWINCH:
                        bridge.resize()
                    elif signum == signal.SIGTSTP:
                        tree = TreeStopper()
                        tree.pidfd = process._pidfd
                        stop_with_command(tree, bridge)
                    else:
                        bridge.resume()
        except RuntimeError:  # not trio's main thread: no job control
            pass

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await process._exited.wait()
            nursery.cancel_scope.cancel()
    finally:
        done.set()


async def _relay_in(stream: trio.lowlevel.FdStream, host_fd: int, reader: int, exited: trio.Event,
                    done: trio.Event) -> None:
    """Copy a host file into a command's stdin, until the file ends or the
    command does; then what the command left unread goes back to the file
    (its offset moves back), for the next reader, as if it had read the
    file itself.  ``reader``: a read end of the pipe, of heel's own."""
    unsent = memoryview(b"")
    read = 0  # from the host's file: the most that can go back (see give_back_unread)
    try:
        async with stream:
            fd = stream.fileno()
            async with trio.open_nursery() as nursery:
                async def command_ended() -> None:
                    await exited.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(command_ended)
                try:
                    while True:
                        if not unsent:
                            try:
                                unsent = memoryview(os.read(host_fd, 65536))
                            except OSError:  # not readable (opened for writing only): no input
                                break
                            read += len(unsent)
                            if not unsent:
                                break  # the file's end: the stream's end (closed below)
                        try:
                            unsent = unsent[os.write(fd, unsent):]
                        except BlockingIOError:
                            await trio.lowlevel.wait_writable(fd)
                finally:
                    nursery.cancel_scope.cancel()
            if exited.is_set():
                give_back_unread(host_fd, len(unsent) + pipe_bytes(reader), read)
            else:
                # The file's end came first: wait for the command, and then
                # give back what is still in the pipe.
                await stream.aclose()
                await exited.wait()
                give_back_unread(host_fd, pipe_bytes(reader), read)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the sandbox closed
    finally:
        os.close(reader)
        done.set()


def _arg(value, what: str) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if not isinstance(value, str):
        raise PolicyError(f"{what} must be a string or path, got {type(value).__name__}")
    if "\0" in value:
        raise PolicyError(f"{what} {value!r} contains a NUL byte")
    return value
