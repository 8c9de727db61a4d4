"""A server process the kit starts and owns: free port, readiness, log, and a kill that leaves nothing.

Engine-independent: :class:`ManagedServer` runs a command line in its own process group with its output
in a log file, waits for a health URL, and on :meth:`~ManagedServer.stop` kills the whole group and
returns only once none of it runs. Server adapters (vLLM's, or another engine's) build on it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from conformance.engines.vllm_common import read_tail

REAP_TIMEOUT_S = 20.0
"""How long :meth:`ManagedServer.stop` waits for the killed process group to be gone."""
DEATH_GRACE_S = 3.0
"""Seconds a transport error waits for the server process to be reaped before it is called a transport error."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails (someone holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes in process group ``pgid``."""
    import psutil

    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return members


class ServerStartError(RuntimeError):
    """The server exited or was not healthy in time; ``exit_code`` is None for a timeout."""

    def __init__(self, message: str, exit_code: int | None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ManagedServer:
    """``command`` (a function of the port) run with ``env``, its output appended to ``log_path``."""

    def __init__(self, command: Callable[[int], Sequence[str]], env: Mapping[str, str], log_path: Path) -> None:
        self.command = command
        self.env = dict(env)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The leader of the server's process group, None when none is running."""
        return None if self.process is None else self.process.pid

    def log_tail(self, lines: int = 25) -> str:
        return read_tail(self.log_path, lines)

    def start(self, port: int, health_url: str, timeout_s: float) -> None:
        """Start on ``port`` and wait until ``health_url`` answers 200; :class:`ServerStartError` otherwise
        (the process group is stopped first)."""
        argv = list(self.command(port))
        with open(self.log_path, "ab") as log:
            log.write(("$ " + " ".join(argv) + "\n").encode())
            log.flush()
            self.process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                self.stop()
                raise ServerStartError(f"exited with code {code} before it was ready", code)
            if _healthy(health_url):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"was not ready within {timeout_s:.0f} s ({health_url})", None)
            time.sleep(0.5)

    def exit_code(self, grace_s: float = 0.0) -> int | None:
        """The server's exit code once it has exited (waiting up to ``grace_s``), None while it runs."""
        if self.process is None:
            return None
        if grace_s and self.process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=grace_s)
        return self.process.poll()

    def stop(self) -> None:
        """Kill the process group (TERM, then KILL after 15 s) and return once none of it runs."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=15)
        # The group may outlive its leader (an engine-core child): kill what is left, always, and return
        # only once none of it runs (SIGKILL is asynchronous: a big process takes a moment to go).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        deadline = time.monotonic() + REAP_TIMEOUT_S
        while group_members(process.pid) and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            time.sleep(0.2)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False
