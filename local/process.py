"""One way to run the local servers (broker, tritonserver, workers): a child we start, watch and stop by PID.

Every child runs in its own session (a Ctrl-C meant for us reaches it only through our own clean stop, and its
group id is its PID, so a group signal hits nothing else), appends its output to a log file, and can be tied to
the thread that started it (Linux PDEATHSIG: no orphaned servers when a test run is killed).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil


class ProcessError(RuntimeError):
    """A child did not become ready, or died; the message carries the end of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now (another process may still take it before the child binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the thread that started it dies."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Supervised:
    """One child process. `term_group`: SIGTERM the whole group (a wrapper that does not forward signals) or the
    child alone (a server that stops its own helpers cleanly); the SIGKILL fallback always takes the group."""

    name: str
    command: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    die_with_parent: bool = False
    term_group: bool = False
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    log_offset: int = 0  # size of the log when this run started

    def start(self) -> Supervised:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.log_offset = log.tell()
            self.proc = subprocess.Popen(
                list(self.command),
                env=dict(self.env) if self.env is not None else None,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def log_text(self, this_run: bool = False) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self.log_offset if this_run else 0)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(no log)"

    def check_alive(self) -> None:
        if not self.alive:
            raise ProcessError(f"{self.name} is not running (exit code {self.returncode}); log {self.log_path}:\n"
                               f"{self.log_tail()}")  # fmt: skip

    def wait_until(self, ready: Callable[[], object], timeout_s: float, what: str = "ready") -> None:
        """Poll `ready()` until truthy; ProcessError (with the log) if the child dies or time runs out."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            if ready():
                return
            if time.monotonic() > deadline:
                raise ProcessError(f"{self.name} (pid {self.pid}) not {what} within {timeout_s:.0f} s; "
                                   f"log {self.log_path}:\n{self.log_tail()}")  # fmt: skip
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the whole group now (crash tests)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait up to `timeout_s`, then SIGKILL the group. Returns the exit code (None if never started)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if self.term_group:
                    os.killpg(proc.pid, signal.SIGTERM)
                else:
                    proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return proc.returncode


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def process_tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (0 when it is gone)."""
    total = 0.0
    with contextlib.suppress(psutil.NoSuchProcess):
        for p in _tree(pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
    return total


def process_tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and its live descendants, MiB (0 when it is gone)."""
    total = 0
    with contextlib.suppress(psutil.NoSuchProcess):
        for p in _tree(pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
    return total / 2**20
