"""The whole local pipeline in one context manager: broker, topics, Triton on the CPU twin, worker processes.

Used by `interest-stream demo` and by the benchmarks, so they start and stop the servers one way:

    with LocalPipeline(".local/demo", repo="artifacts/model_repository-twin") as pipe:
        publish(pipe.settings, ...)            # pipe.settings: bootstrap, TRITON_URL, MODEL_DIR, ports
        pipe.web_url, pipe.metrics_url         # the first worker's HTTP view and Prometheus metrics

Every server is our own child, in its own session, stopped by PID in reverse start order (worker: SIGTERM so it
leaves the group cleanly, as noida-db never evicts a killed member; then Triton, then the broker; SIGKILL only
after a timeout). The stop runs on a normal exit, an exception, Ctrl-C and SIGTERM (turned into SystemExit while
the pipeline runs in the main thread), and a second Ctrl-C cannot interrupt it. If the Python process is killed
outright, the worker and Triton get SIGTERM from the kernel (PDEATHSIG) and the broker from its atexit hook where
one runs.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Literal

from local import longpoll
from local.broker import LocalBroker, ensure_topics
from local.process import ProcessError, Supervised, free_port
from local.triton import LocalTriton
from local.worker import settings_env, spawn_worker
from stream.settings import Settings

TABLES = ("user_state",)
READY_LINE = "[^Worker]: Ready"


class PipelineError(RuntimeError):
    """A server of the local pipeline did not start; the message carries the end of its log."""


@dataclass
class WorkerProcess:
    """One worker child with its own state dir, ports and log file."""

    settings: Settings
    env: dict[str, str]
    log_path: Path
    process: Supervised | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.worker_web_port}/health"

    def start(self) -> None:
        self.process = spawn_worker(self.env, self.log_path, name=self.log_path.stem, die_with_parent=True)

    def log_tail(self, lines: int = 30) -> str:
        return self.process.log_tail(lines) if self.process else "(no log)"

    def ready(self) -> bool:
        """Faust logged Ready (group joined, tables recovered) and /health answers "ok"."""
        if self.process is None:
            return False
        try:
            self.process.check_alive()
        except ProcessError as exc:
            raise PipelineError(str(exc)) from exc
        if READY_LINE not in self.process.log_text(this_run=True):  # a restart appends to the same log file
            return False
        return http_json(self.health_url).get("status") == "ok"

    def stop(self, timeout_s: float = 60.0) -> int | None:
        process, self.process = self.process, None
        return process.stop(timeout_s) if process is not None else None


def http_get(url: str, timeout_s: float = 2.0) -> tuple[int | None, dict[str, Any]]:
    """GET a JSON object: (HTTP status, body). Status None when nothing answers; body {} when it is not JSON."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:  # an answer all the same (404 ...): its status and body count
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None, {}
    try:
        body = json.loads(raw)
    except json.JSONDecodeError:
        return status, {}
    return status, body if isinstance(body, dict) else {}


def http_json(url: str, timeout_s: float = 2.0) -> dict[str, Any]:
    """GET a JSON object; {} when nothing (or an error status) answers."""
    status, body = http_get(url, timeout_s)
    return body if status == 200 else {}


class LocalPipeline:
    """Broker + topics + local Triton serving `repo` (the CPU twin) + `workers` worker processes in `work_dir`.

    `fresh` (default) deletes the broker's data and the workers' state first, so every run starts from empty
    topics. `repo=None` runs the workers ingest-only (TRITON_URL empty). `batch_max` / `batch_wait_s` set
    WORKER_BATCH_MAX / WORKER_BATCH_WAIT_S; `overrides` are further Settings fields; `extra_env` is added to the
    workers' environment last (e.g. fault injection or log level). `longpoll_ms` runs the workers behind the
    local long-polling shim with that cap (`local.longpoll`: noida-db answers empty fetches at once, so an idle
    worker would spin a core); None runs them without it. `start_workers=False` brings up the broker
    and Triton only, so a benchmark can fill the input topic first and then call `start_workers()`.
    """

    def __init__(
        self,
        work_dir: str | Path = ".local/demo",
        *,
        repo: str | Path | None = "artifacts/model_repository-twin",
        partitions: int = 8,
        workers: int = 1,
        batch_max: int | None = None,
        batch_wait_s: float | None = None,
        overrides: Mapping[str, Any] | None = None,
        extra_env: Mapping[str, str] | None = None,
        longpoll_ms: float | None = longpoll.DEFAULT_MAX_WAIT_MS,
        fresh: bool = True,
        ready_timeout_s: float = 180.0,
        start_workers: bool = True,
        model_control: Literal["none", "explicit"] = "none",
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.work_dir = Path(work_dir).absolute()
        self.repo = Path(repo).absolute() if repo is not None else None
        self.partitions = partitions
        self.n_workers = workers
        self.batch = {"worker_batch_max": batch_max, "worker_batch_wait_s": batch_wait_s}
        self.overrides = dict(overrides or {})
        self.extra_env = {**longpoll.env(longpoll_ms), **(extra_env or {})}
        self.fresh = fresh
        self.ready_timeout_s = ready_timeout_s
        self.start_workers_at_start = start_workers
        self.model_control = model_control  # "explicit": new versions are served once loaded (demo --learn)
        self.broker: LocalBroker | None = None
        self.triton: LocalTriton | None = None
        self.workers: list[WorkerProcess] = []
        self._settings: Settings | None = None
        self._previous_sigterm: Any = None

    # --- what callers use
    @property
    def settings(self) -> Settings:
        """The first worker's settings: bootstrap, topics, TRITON_URL, MODEL_DIR, web and metrics ports."""
        if self._settings is None:
            raise PipelineError("the pipeline is not started")
        return self._settings

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.worker_web_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.metrics_port}/metrics"

    @property
    def pids(self) -> dict[str, int]:
        """PID of every server we started and still hold (broker, triton, worker0, ...)."""
        out = {"broker": self.broker.pid if self.broker else None, "triton": self.triton.pid if self.triton else None}
        out |= {f"worker{i}": w.pid for i, w in enumerate(self.workers)}
        return {name: pid for name, pid in out.items() if pid is not None}

    # --- lifecycle
    def start(self) -> LocalPipeline:
        """Bring everything up and return once every worker is ready; on any failure stop what was started."""
        self._catch_sigterm()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if self.fresh:
            for sub in ("broker", "state"):
                shutil.rmtree(self.work_dir / sub, ignore_errors=True)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.broker = LocalBroker(self.work_dir / "broker").start()
        fields: dict[str, Any] = {
            "kafka_bootstrap_servers": self.broker.bootstrap,
            "topic_partitions": self.partitions,
            "worker_web_host": "127.0.0.1",
            **{k: v for k, v in self.batch.items() if v is not None},
            **self.overrides,
        }
        if self.repo is not None:
            self.triton = LocalTriton(
                self.repo,
                log_file=self.work_dir / "tritonserver.log",
                model_control=self.model_control,
            ).start()
            fields |= {"triton_url": self.triton.grpc_url, "model_dir": self.repo / "interest_transformer"}
        else:
            fields["triton_url"] = ""
        self._base = Settings(_env_file=None, **fields)
        ensure_topics(self._base, tables=TABLES)
        self._settings = self._base.model_copy(update={"state_dir": self.work_dir / "state" / "worker0"})
        if self.start_workers_at_start:
            self.start_workers()

    def start_workers(self) -> None:
        """Start the worker processes and wait until every one is ready (group joined, tables recovered)."""
        for i in range(self.n_workers):
            ports = {"worker_web_port": free_port(), "metrics_port": free_port()}
            settings = self._base.model_copy(update={"state_dir": self.work_dir / "state" / f"worker{i}", **ports})
            worker = WorkerProcess(settings, settings_env(settings, self.extra_env), self.work_dir / f"worker{i}.log")
            self.workers.append(worker)
            settings.state_dir.parent.mkdir(parents=True, exist_ok=True)  # Faust makes only the last level
            worker.start()
        self._settings = self.workers[0].settings
        deadline = time.monotonic() + self.ready_timeout_s
        while not all(w.ready() for w in self.workers):
            if time.monotonic() > deadline:
                tails = "\n".join(f"{w.log_path}:\n{w.log_tail()}" for w in self.workers)
                raise PipelineError(f"workers not ready within {self.ready_timeout_s:.0f} s\n{tails}")
            time.sleep(0.25)

    def stop(self) -> None:
        """Stop workers, then Triton, then the broker (reverse start order). Idempotent; Ctrl-C cannot cut it."""
        with _signals_ignored():
            for worker in reversed(self.workers):
                worker.stop()
            if self.triton is not None:
                self.triton.stop()
            if self.broker is not None:
                self.broker.stop()
        self._restore_sigterm()

    def __enter__(self) -> LocalPipeline:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- signals: SIGTERM to the caller must run the same clean stop as Ctrl-C
    def _catch_sigterm(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_exit)

    def _restore_sigterm(self) -> None:
        if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _signals_ignored():
    """While the servers stop, a second Ctrl-C or SIGTERM must not abandon them half-stopped (stops are bounded)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
