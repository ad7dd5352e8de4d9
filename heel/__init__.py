"""heel: run code written by a language model inside the operating system's
native sandbox (Landlock + seccomp + namespaces on Linux).

    import trio, heel

    async def main():
        async with heel.Sandbox(heel.SandboxConfig()) as sb:
            out = await sb.command("python3").arg("-c").arg("print(6 * 7)").output()
            print(out.stdout.decode(), out.returncode)

    trio.run(main)

The trio-based parts (Sandbox, Process) are imported on first use, so that
``python -m heel run`` starts without importing trio.
"""

from __future__ import annotations

# Not typing.TYPE_CHECKING: importing typing costs `heel run` ~7 ms; type
# checkers treat this name the same way.
TYPE_CHECKING = False

from ._version import __version__
from .config import IsolationLevel, ResourceLimits, SandboxConfig, SecurityConfig
from .errors import (
    BrokenVenv,
    CommandNotFound,
    CommandTimeout,
    HeelError,
    InstallError,
    InterpreterNotFound,
    PolicyError,
    SandboxClosed,
    SandboxUnavailable,
    SpawnError,
    VenvError,
)
from .policy import AllowAll, AllowList, CustomPolicy, Decision, DenyAll, NetworkPolicy, NetworkRequest

if TYPE_CHECKING:
    from .errors import CommandFailed
    from .ipc import IpcCommand, IpcRouter
    from ._probe import ProbeReport, probe
    from .process import Process
    from .proxy import NetworkEvent
    from .sandbox import Command, ExitStatus, Output, Sandbox, Stdio
    from .venv import PythonConfig, Venv, VenvConfig, VenvManager, VenvProgress

_LAZY = {
    "Sandbox": "sandbox",
    "Command": "sandbox",
    "Output": "sandbox",
    "ExitStatus": "sandbox",
    "Stdio": "sandbox",
    "Process": "process",
    "probe": "_probe",
    "ProbeReport": "_probe",
    "CommandFailed": "errors",
    "IpcCommand": "ipc",
    "IpcRouter": "ipc",
    "NetworkEvent": "proxy",
    "VenvConfig": "venv",
    "VenvManager": "venv",
    "Venv": "venv",
    "VenvProgress": "venv",
    "PythonConfig": "venv",
}

__all__ = [
    "__version__", "Sandbox", "Command", "Output", "ExitStatus", "Stdio", "Process",
    "SandboxConfig", "SecurityConfig", "ResourceLimits", "IsolationLevel",
    "NetworkPolicy", "DenyAll", "AllowAll", "AllowList", "CustomPolicy", "NetworkRequest", "Decision",
    "NetworkEvent", "probe", "ProbeReport", "IpcCommand", "IpcRouter",
    "HeelError", "PolicyError", "SandboxUnavailable", "SandboxClosed", "SpawnError",
    "CommandNotFound", "CommandFailed", "CommandTimeout",
    "VenvConfig", "VenvManager", "Venv", "VenvProgress", "PythonConfig",
    "VenvError", "InterpreterNotFound", "BrokenVenv", "InstallError",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'heel' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
