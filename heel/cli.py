"""heel's command line: ``heel run``, ``heel shell`` and ``heel doctor``.

``run`` and ``shell`` take a fast path: their options are parsed by
:mod:`heel._cliargs` (argparse only for --help and mistakes) and the command
runs through the synchronous runner, so that ``heel run -- true`` imports neither typer nor trio (each costs
more than the sandboxed command itself).  Everything else goes to a typer app,
imported only then.

Exit status of ``run`` and ``shell``: the command's own; 128+N when a signal N
killed it; 124 when the timeout killed it; 127 when the program does not exist
in the sandbox; 125 when heel itself failed (bad option or config, a
protection this machine cannot enforce, a setup step that failed); 130 after
Ctrl-C.  Every failure of heel's is one line on stderr, starting ``heel:``.
"""

# No `from __future__ import annotations`: typer reads the annotations of the
# commands defined in _make_app, and a string "typer.Context" would be looked
# up in this module's globals, where typer is deliberately not imported.
import os
import sys

TYPE_CHECKING = False  # not typing's: importing typing costs `heel run` ~7 ms
if TYPE_CHECKING:
    import signal
else:
    # The signal module's C core: the same functions and numbers, without the
    # three enums that `import signal` builds (some 1.5 ms of `heel run`).
    import _signal as signal

from .config import SandboxConfig
from .errors import CommandNotFound, HeelError, SandboxUnavailable, SpawnError

__all__ = ["main", "console", "run_command", "default_shell"]

EXIT_TIMEOUT = 124  # as coreutils' timeout(1)
EXIT_HEEL_FAILED = 125  # as timeout(1), env(1): the wrapper, not the command, failed
EXIT_CANNOT_EXECUTE = 126  # as a shell
EXIT_NOT_FOUND = 127  # as a shell
EXIT_INTERRUPTED = 128 + signal.SIGINT

#: Shells that `heel shell` takes from $SHELL.
SHELLS = ("bash", "sh", "zsh")


def main(argv: list[str] | None = None) -> int:
    """The ``heel`` console script: returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if args[:1] in (["run"], ["shell"], ["python"]):
            # Before anything is opened: a closed stdin, stdout or stderr
            # becomes /dev/null for the command (and for heel).
            from ._spawn import guard_standard_fds

            guard_standard_fds()
            return run_command(args[0], args[1:])
        if args[:1] == ["ipc"]:
            _say("`heel ipc` is for commands inside a sandbox, to call the IPC commands its host offers "
                 "(see heel.IpcRouter); outside one there is nothing to call")
            return 2  # a usage error, as typer's
        return _typer_main(args)
    except ImportError as exc:
        # heel's compiled module is missing: most often `python -m heel`
        # run in heel's source tree, whose ./heel shadows the installed one.
        if "compiled module" not in str(exc):
            raise
        _say(f"{exc}; in heel's source tree, `python -m heel` finds ./heel first: run it elsewhere")
        return EXIT_HEEL_FAILED


def console() -> None:
    """The ``heel`` console script and ``python -m heel``: main(), then exit.

    After ``run``, ``shell`` and ``python`` the sandbox is closed and heel's
    lines are written, so the process ends with os._exit: the interpreter's
    teardown (freeing every module) would add about 5 ms to a start-up that
    is about 60.  Everything else exits the usual way.
    """
    global _ENDS_AFTER
    if sys.argv[1:2] in (["run"], ["shell"], ["python"]):
        _ENDS_AFTER = True
        code = main()  # (heel's lines never raise: see _say)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)  # a stdout or stderr that cannot be written does not change the status
    try:
        code = main()
        sys.stdout.flush()  # here, not in the interpreter's exit, where a failure would print and exit 120
    except OSError as exc:
        # `heel doctor >/dev/full`, `heel --version | true`: heel's own
        # output cannot be written.  No traceback: one line, when stderr
        # takes it; a closed pipe ends heel quietly, as SIGPIPE would.
        if not isinstance(exc, BrokenPipeError):
            _say(f"cannot write to stdout: {exc.strerror or exc}")
        os._exit(128 + signal.SIGPIPE if isinstance(exc, BrokenPipeError) else EXIT_HEEL_FAILED)
    raise SystemExit(code)


def _say(message: str) -> None:
    """One line on stderr from heel itself (never mixed into the command's
    stdout).  Never raises: a stderr that cannot be written (a closed pipe,
    a full disk) loses the line, but must not change heel's exit status."""
    from ._terminal import line_end

    try:
        sys.stderr.write(f"heel: {_shown(message)}{line_end()}")
        sys.stderr.flush()
    except (OSError, ValueError):  # ValueError: stderr closed
        _drop_stderr_buffer()


def _shown(text: str) -> str:
    """``text`` for heel's lines on the user's terminal: a message may carry
    what a sandbox wrote (an installer's output, which code planted in an
    environment writes too), so control characters other than newlines and
    tabs (escape sequences: a title, a cursor move, a screen cleared) are
    shown as escapes, never sent."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def _drop_stderr_buffer() -> None:
    """What a failed write left in stderr's buffer would be tried again (and
    fail again) at the next flush: let it go."""
    try:
        sys.stderr = open(os.devnull, "w")
    except OSError:
        pass


class _Terminated(BaseException):
    """heel got SIGTERM or SIGHUP: unwind, so that the sandboxed tree is killed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


#: Signals whose default action ends heel: each unwinds instead, so that
#: the sandboxed tree is killed and the user's terminal restored.
_ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)
#: Set by console(): the process ends once main() returns (see _terminate_on_signals).
_ENDS_AFTER = False
#: Held (blocked) while a sandbox's session is built.
_HELD_SIGNALS = (signal.SIGINT, *_ENDING_SIGNALS)


class _terminate_on_signals:
    """Turn SIGINT, SIGTERM, SIGHUP and the other _ENDING_SIGNALS into an
    exception while a command runs (KeyboardInterrupt for SIGINT, else
    _Terminated).

    The command runs in its own session, so a closed terminal's SIGHUP or a
    SIGTERM reaches heel only; unwinding lets the runner kill the whole tree
    (the default action would leave that to PDEATHSIG, which reaches heel-init
    only, not its descendants when there is no pid namespace).

    Only the first signal raises: the cleanup it starts (killing the tree,
    removing the temporary directory with the command's files) must not be
    cut short by the next one, which an impatient user or a supervisor sends
    at once.  Later signals are ignored, and the first one decides the exit
    status.  Likewise once :meth:`closing` has been called (the command ended
    and the sandbox is being closed): a signal then is only recorded, and
    raised when the ``with`` block ends, after the cleanup.
    """

    def __init__(self) -> None:
        self.signum = 0  # the first signal that came
        self._closing = False
        self._previous: dict = {}

    def _handler(self, signum: int, frame: object) -> None:
        if self.signum or self._closing:
            self.signum = self.signum or signum
            return
        self.signum = signum
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise _Terminated(signum)

    def closing(self) -> None:
        """The cleanup begins: from now on a signal waits for its end."""
        self._closing = True

    def __enter__(self) -> "_terminate_on_signals":
        for sig in (signal.SIGINT, *_ENDING_SIGNALS):
            if signal.getsignal(sig) == signal.SIG_IGN:
                # Ignored by whoever started heel: SIGHUP under nohup, SIGINT
                # in a background job of a non-interactive shell.  Not for it.
                continue
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for sig, action in self._previous.items():
            # Once one came and the process ends after this command (the
            # console script), the next ones, which would end it with
            # another status (killed by the signal), are ignored until then.
            # A caller of run_command that goes on gets its handlers back.
            signal.signal(sig, signal.SIG_IGN if self.signum and _ENDS_AFTER else action)
        self._previous = {}
        if exc_type is None and self.signum:  # came while closing: now it ends heel
            if self.signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise _Terminated(self.signum)


def default_shell() -> str:
    """The shell for ``heel shell``: $SHELL when it is bash, sh or zsh and
    exists, else /bin/bash, else /bin/sh."""
    shell = os.environ.get("SHELL", "")
    if os.path.basename(shell) in SHELLS and os.path.isabs(shell) and os.access(shell, os.X_OK):
        return shell
    return "/bin/bash" if os.access("/bin/bash", os.X_OK) else "/bin/sh"


def run_command(command: str, args: list[str]) -> int:
    """``heel run ARGS`` (command="run") or ``heel shell ARGS``: the exit status."""
    from . import _cliargs

    try:
        namespace = _cliargs.parse(command, args)
        config = _cliargs.build_config(namespace)
        if command == "python":
            return _python(namespace, config)
        argv = namespace.command if command == "run" else [default_shell()]
        if not config.network.denies_everything:
            return _execute_with_proxy(config, argv)
        with _terminate_on_signals() as signals:
            return _execute(config, argv, signals)
    except CommandNotFound as exc:
        _say(f"{exc.program}: command not found in the sandbox")
        return EXIT_NOT_FOUND
    except SpawnError as exc:
        _say(str(exc))
        # exec: found but not executable (a directory, no x bit, no #! line)
        return EXIT_CANNOT_EXECUTE if exc.stage == "exec" else EXIT_HEEL_FAILED
    except SandboxUnavailable as exc:
        # The exception's hint speaks to Python callers (best_effort=True).
        _say(f"{exc.protection} cannot be enforced: {exc.reason} "
             "(see `heel doctor`; --best-effort runs anyway)")
        return EXIT_HEEL_FAILED
    except (HeelError, OSError) as exc:
        if isinstance(exc, FileNotFoundError) and not isinstance(exc, HeelError) and _cwd_gone():
            _say("the current directory no longer exists (it was removed): run heel from one that does, "
                 "or give absolute paths")
        else:
            _say(str(exc))
        return EXIT_HEEL_FAILED
    except KeyboardInterrupt:
        # The runner has killed the sandboxed tree while unwinding.
        return EXIT_INTERRUPTED
    except _Terminated as exc:
        return 128 + exc.signum


def _cwd_gone() -> bool:
    try:
        os.getcwd()
    except FileNotFoundError:
        return True
    return False


def _execute(config: SandboxConfig, argv: list[str], signals: "_terminate_on_signals | None" = None) -> int:
    """Run argv in a sandbox for config, on heel's own stdin, stdout and stderr.
    ``signals``: told when the cleanup begins, which no signal may cut short."""
    from ._probe import assumed_environment, namespaces_missing
    from ._spawn import Session
    from ._sync import run

    timeout = config.limits.timeout
    # One command: skip the probe's trial run and assume namespaces work.  If
    # they do not, building the sandbox fails before anything ran, so the
    # real probe decides and the sandbox is built as that allows (or refused).
    # Signals wait while the session is built: one that came in the middle
    # of making its temporary directory would leave that behind.  Once the
    # session is there, they are let through inside the try that closes it.
    # (The mask is not inherited by the sandbox: heel's spawn clears it.)
    held = None if signals is None else signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
    try:
        try:
            session = Session(config, assumed_environment())
        except SpawnError as exc:
            if not namespaces_missing(exc):
                raise
            session = Session(config)
    except BaseException:
        if held is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise
    output_errors: list = []
    try:
        if held is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # one that came meanwhile raises here
        _say_degraded(session.degraded)
        code, timed_out = run(session.prepared, argv, env=session.plan.env,
                              cwd=session.plan.workdir, stdio=(0, 1, 2), timeout=timeout, interactive=True,
                              output_errors=output_errors)
    finally:
        try:
            if signals is not None:
                signals.closing()
        finally:
            session.close()
            _say_output_errors(output_errors)
    return _exit_status(argv[0], timeout, code, timed_out)


def _say_output_errors(errors) -> None:
    """The host file behind stdout or stderr refused the command's output
    (a full disk): from then on the command got EPIPE.  Or heel's stdin
    could not be read (opened for writing only): the command got end of
    file.  Or the command's init was killed from outside.  Said once each."""
    for name, exc in errors:
        if name == "init":  # heel._sync.INIT_LOST, not imported for this
            _say("the command's init in the sandbox was killed from outside heel (SIGKILL), and the command "
                 "with it: its own exit status is unknown")
        elif name == "stdin":
            _say(f"stdin could not be read ({exc.strerror or exc}): the command got end of file")
        else:
            _say(f"the command's {name} could not be written, the rest of it is lost: {exc.strerror or exc}")


def _say_degraded(missing: list[str]) -> None:
    """--best-effort ran without some protections: say which, once."""
    if missing:
        _say(f"running without {', '.join(missing)} (--best-effort; see `heel doctor`)")


def _exit_status(program: str, timeout: float | None, code: int, timed_out: bool) -> int:
    """heel's exit status for the command's end (see the module docstring)."""
    if timed_out:
        _say(f"{program}: timed out after {timeout:g} seconds and was killed")
        return EXIT_TIMEOUT
    return 128 - code if code < 0 else code


def _python(namespace, config: SandboxConfig) -> int:
    """``heel python``: build the environment (if one is asked for), then run
    the interpreter in the sandbox."""
    from .errors import PolicyError
    from ._spawn import make_owned_temp_dir, release_owned_temp_dir, sweep_orphaned_temp_dirs
    from .venv import PythonConfig, VenvConfig

    script = list(namespace.script)
    if namespace.venv == "":  # not the absence of --venv: the current directory, or a mistake
        raise PolicyError("--venv: '' is not a valid path")
    venv_options = (namespace.packages or namespace.venv or namespace.index_url or namespace.find_links
                    or namespace.no_index or namespace.system_site_packages or namespace.allow_pip_install
                    or namespace.use_uv is not None)
    temporary = None
    lock = -1
    try:
        python = None
        if venv_options:
            path = namespace.venv
            if path is None:
                # Owner-locked like heel's other temporary directories: one
                # left by a heel that was killed is removed here, next time.
                sweep_orphaned_temp_dirs("/var/tmp", "heel-venv-")
                # Searchable by the sandbox's uid, which is not root's when
                # root runs heel (the environment itself stays root's): 0711,
                # set through the directory's fd, never its name in /var/tmp.
                temporary, lock = make_owned_temp_dir("heel-venv-", root="/var/tmp", searchable=True)
                path = os.path.join(temporary, "env")
            venv = VenvConfig(path, namespace.packages, python=namespace.python,
                              system_site_packages=namespace.system_site_packages, use_uv=namespace.use_uv,
                              index_url=namespace.index_url, find_links=namespace.find_links,
                              no_index=namespace.no_index)
            python = PythonConfig(venv, allow_pip_install=namespace.allow_pip_install)
            interpreter = str(python.executable)
            config = config.replace(python=python)
        else:
            interpreter = namespace.python or "python3"
        argv = [interpreter]
        if namespace.code is not None:
            argv += ["-c", namespace.code] + script
        elif script and script[0] == "-":
            argv += script  # the program on stdin, as python - reads it
        elif script:
            # The script is read where the host sees it; inside, the command
            # starts in the sandbox's workdir.
            path = os.path.abspath(script[0])
            if not os.path.isfile(path):
                raise PolicyError(f"python: {script[0]}: no such script")
            from ._plan import _under, protected_paths

            for place in protected_paths(config):
                if _under(path, place):
                    raise PolicyError(f"python: the script {path} is inside the protected place {place}: "
                                      "copy it elsewhere, or run with --no-protect-home (or "
                                      "--no-protect-credentials, --no-protect-cloud)")
            # Granted by the name it was given: not through a link, which a
            # sandbox that wrote the script's directory (a kept workdir)
            # could have swapped in, to a file it may not read itself.
            granted = config.replace(readable=(*config.readable, path))
            if str(granted.readable[-1]) != path:
                raise PolicyError(f"python: the script {path} leads through a symbolic link (to "
                                  f"{granted.readable[-1]}); name the file itself")
            config = granted
            argv += [path] + script[1:]
        if python is None and config.network.denies_everything:
            with _terminate_on_signals() as signals:
                return _execute(config, argv, signals)
        return _execute_with_proxy(config, argv)
    finally:
        if temporary is not None:
            release_owned_temp_dir(temporary, lock)


def _show_progress(event) -> None:
    """The environment's build, as a one-line bar on stderr."""
    if event.phase == "install" and event.total:
        width = 20
        filled = width * event.done // event.total
        bar = "=" * filled + " " * (width - filled)
        line = f"heel: installing [{bar}] {event.done}/{event.total} {_shown(event.message[:60])}"
        if sys.stderr.isatty():
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
    elif event.phase == "create":
        sys.stderr.write(f"heel: {_shown(event.message)}\n")
    elif event.phase == "done" and event.total and sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    sys.stderr.flush()


def _progress(event) -> None:
    """_show_progress, which must not fail the build when stderr cannot be written."""
    try:
        _show_progress(event)
    except (OSError, ValueError):
        _drop_stderr_buffer()


def _execute_with_proxy(config: SandboxConfig, argv: list[str]) -> int:
    """_execute under trio: for a sandbox with a network (the proxy runs
    under trio) or a Python environment to build.  Each denial is one line
    on stderr."""
    import contextlib

    import trio

    from .sandbox import Sandbox, Stdio

    def report(event) -> None:
        if not event.allowed:
            _say(event.describe())

    config = config.replace(on_network_event=report)
    signum = 0

    async def work():
        sandbox = Sandbox(config, on_venv_progress=_progress)
        try:
            async with sandbox:
                _say_degraded(sandbox.degraded)
                command = sandbox.command(argv[0]).args(argv[1:])
                command.stdin(Stdio.INHERIT).stdout(Stdio.INHERIT).stderr(Stdio.INHERIT)
                command._interactive_terminal = True
                return await command.status()
        finally:
            _say_output_errors(sandbox._output_errors)

    # Ctrl-C, SIGTERM or a closed terminal: unwind, and the sandbox's close
    # kills the whole tree.  Received by a trio signal receiver, not raised
    # as KeyboardInterrupt somewhere inside trio.  A signal ignored when heel
    # started (SIGHUP under nohup, SIGINT for a job a shell started in the
    # background) stays ignored, as on the plain path.  As there too, only
    # the first signal counts: the receiver stays open until the sandbox is
    # closed, and the signals it holds unread then are redelivered to
    # SIG_IGN, the handlers it saved.  (Closed after the first one, it put
    # back the default actions, and a second signal, a supervisor's SIGTERM
    # after its SIGINT, ended heel in the middle of the cleanup and left the
    # sandbox's temporary directory behind.)  They stay blocked until the
    # receiver is open: one that comes before unwinds too, and is not lost.
    wanted = [s for s in (signal.SIGINT, *_ENDING_SIGNALS) if signal.getsignal(s) != signal.SIG_IGN]
    held = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in wanted}

    async def main():  # -> ExitStatus | None (None: a signal ended it)
        status = None
        try:
            with trio.open_signal_receiver(*wanted) if wanted else contextlib.nullcontext() as signals:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
                async with trio.open_nursery() as nursery:
                    async def on_signal() -> None:
                        nonlocal signum
                        async for signum in signals:
                            nursery.cancel_scope.cancel()
                            return

                    # Before the sandbox opens: a signal while it does (the
                    # probe, a venv build) unwinds too, and leaves nothing.
                    if wanted:
                        nursery.start_soon(on_signal)
                    status = await work()
                    nursery.cancel_scope.cancel()
        except BaseException as exc:
            # The nursery wraps what work() raised in a group: the CLI
            # reports the error itself (HeelError -> one line, 125).
            inner = getattr(exc, "exceptions", None)
            if inner is not None and len(inner) == 1:
                raise inner[0] from None
            raise
        return status

    try:
        status = trio.run(main)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # if main never ran
        # Once one came and the process ends after this command (the console
        # script), the next ones stay ignored until then, as on the plain path.
        if not (signum and _ENDS_AFTER):
            for sig, action in previous.items():
                signal.signal(sig, action)
    if signum or status is None:
        return 128 + signum
    return _exit_status(argv[0], config.limits.timeout, status.returncode, status.timed_out)


def _typer_main(args: list[str]) -> int:
    """Everything but run and shell: the typer app, with its usage errors
    reported like run's (one line, exit status 125)."""
    from typer.exceptions import TyperException

    app = _make_app()
    try:
        # A bare `heel` shows the help rather than an error.
        code = app(args=args or ["--help"], prog_name="heel", standalone_mode=False)
    except TyperException as exc:
        _say(f"{exc.format_message().rstrip('.')} (see `heel --help`)")
        return EXIT_HEEL_FAILED
    return code if isinstance(code, int) else 0


def _make_app():
    """The typer app.  Built on demand, because importing typer is slow."""
    import typer

    from . import _cliargs
    from ._version import __version__

    app = typer.Typer(name="heel", no_args_is_help=True, add_completion=False,
                      help="Run untrusted code in the operating system's native sandbox "
                           "(Landlock + seccomp + namespaces).")

    def show_version(value: bool) -> None:
        if value:
            typer.echo(f"heel {__version__}")
            raise typer.Exit()

    @app.callback()
    def top(version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True,
                                         help="Print heel's version and exit.")) -> None:
        """Run untrusted code in the operating system's native sandbox."""

    # run, shell and python are parsed by heel._cliargs (see main); these entries list them
    # in `heel --help` and hand their arguments over unparsed.
    passthrough = {"allow_extra_args": True, "ignore_unknown_options": True}

    @app.command("run", help=_cliargs.RUN_HELP + " See `heel run --help`.",
                 context_settings=passthrough, add_help_option=False)
    def run_entry(ctx: typer.Context) -> None:
        raise typer.Exit(run_command("run", ctx.args))

    @app.command("shell", help=_cliargs.SHELL_HELP + " See `heel shell --help`.",
                 context_settings=passthrough, add_help_option=False)
    def shell_entry(ctx: typer.Context) -> None:
        raise typer.Exit(run_command("shell", ctx.args))

    @app.command("python", help=_cliargs.PYTHON_HELP + " See `heel python --help`.",
                 context_settings=passthrough, add_help_option=False)
    def python_entry(ctx: typer.Context) -> None:
        raise typer.Exit(run_command("python", ctx.args))

    @app.command("doctor")
    def doctor_entry() -> None:
        """Show what this machine enforces, protection by protection."""
        raise typer.Exit(doctor())

    return app


def _gpu_line(report) -> str:
    """What allow_gpu grants here, and where CUDA cannot start (README, GPUs)."""
    from ._plan import GPU_DEVICES, _existing, is_nvidia

    nodes = list(dict.fromkeys(_existing(GPU_DEVICES)))  # /dev/nvidia* holds /dev/nvidia-caps too
    if not nodes:
        return "no GPU device nodes (" + ", ".join(GPU_DEVICES) + ")"
    if not any(map(is_nvidia, nodes)):
        return ", ".join(nodes) + " granted with allow_gpu (no NVIDIA node: no more than that)"
    if not report.user_namespaces:
        cuda = "CUDA cannot start without user namespaces (its /proc stays the host's, read-only)"
    elif report.euid == 0:
        cuda = ("CUDA starts at STRICT and DEFAULT; root's PERMISSIVE sandboxes (the host's uid 0) get "
                "neither grant, and CUDA does not start there")
    else:
        cuda = "CUDA starts at every level"
    return (", ".join(nodes) + " granted with allow_gpu, with the sandbox's own /proc writable and "
            "seqpacket unix sockets, which CUDA needs; " + cuda)


def doctor() -> int:
    """Print the probe as a table; 0 when heel's default sandbox runs here,
    else 1 (125: the probe itself could not run, $TMPDIR unusable, say)."""
    from ._probe import environment, probe, require

    try:
        report = probe()
    except (HeelError, OSError) as exc:
        _say(f"cannot probe this machine: {exc}")
        return EXIT_HEEL_FAILED
    uname = os.uname()
    print(f"kernel       {uname.sysname} {uname.release} ({uname.machine})")
    print(f"landlock ABI {report.landlock_abi or 'none'}")
    print(f"euid         {report.euid}{' (root: capabilities are dropped inside)' if report.euid == 0 else ''}")
    print(f"gpu          {_gpu_line(report)}")
    print()
    rows = [("protection", "status", "detail")] + [(p.name, p.status, p.detail) for p in report.protections]
    name_width = max(len(row[0]) for row in rows)
    status_width = max(len(row[1]) for row in rows)
    for name, status, detail in rows:
        print(f"{name:<{name_width}}  {status:<{status_width}}  {detail}".rstrip())
    print()
    env, why = environment()
    try:
        require(env, SandboxConfig(), why)
    except SandboxUnavailable as exc:
        print(f"not ready: {exc.protection} cannot be enforced: {exc.reason}")
        return 1
    print("ready: every protection heel requires is enforced")
    return 0
