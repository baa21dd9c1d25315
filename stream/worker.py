"""Run one worker process: check the served model, start metrics, run Faust until SIGTERM, exit for sure.

`interest-stream-worker` (the worker image's entry point) and `interest-stream worker` both end up in `run_worker`.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import faust
import typer

from stream import metrics, pins
from stream.app import create_app
from stream.inference import InterestModel
from stream.settings import Settings, UnknownSetting, check_environment

log = logging.getLogger(__name__)


async def check_inference(settings: Settings) -> None:
    """Refuse to start, with a clear message, if no served version matches what we encode (the same check as a
    version switch; the app resolves the version again at its first batch)."""
    model = InterestModel(settings)
    try:
        await model.start()
    finally:
        await model.close()


def run_worker(
    settings: Settings, *, hard_exit: bool = True, on_stage: Callable[[str, int], None] | None = None
) -> None:
    """Run one worker until SIGTERM/SIGINT; a clean stop leaves the consumer group at once.

    `hard_exit`: end the process with `os._exit` once Faust's shutdown is done (tables closed, producer flushed,
    group left). A worker in a benchmark stayed alive after Faust logged "Closing event loop", so the SIGTERM
    never finished; `Worker` also puts a deadline on the shutdown itself and dumps every thread's stack if it
    is missed, so the next such hang says where it is.
    """
    from prometheus_client import start_http_server

    # Refused before anything starts: a variable meant as a setting that is none (a typo the settings would
    # drop), or a Faust / aiokafka release the worker was not written for.
    check_environment(os.environ)
    pins.require()
    metrics.set_build_info(worker_version=_version())  # the model fields follow the version in use (versions.py)
    if settings.triton_url:
        asyncio.run(check_inference(settings))
    app = create_app(settings, on_stage=on_stage)
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    worker = Worker(app, loglevel=settings.worker_log_level.upper(), override_logging=True)
    worker.shutdown_deadline_s = settings.worker_shutdown_deadline_s
    if not hard_exit:
        worker.execute_from_commandline()  # ends in SystemExit
        return
    code = 0
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        log.exception("worker crashed")
        code = 1
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


class Worker(faust.Worker):
    """Faust's worker with a deadline on its shutdown (see `run_worker`). Named `Worker` because mode logs the
    class name and readiness checks look for "[^Worker]: Ready".

    The deadline starts when SIGTERM or SIGINT arrives, from a plain Python signal handler: that runs in the main
    thread even while the event loop is stuck (a batch awaiting forever, or blocked in a call), and asyncio's
    wakeup fd still hands the signal to mode's own handler for the clean stop. At the deadline a daemon thread
    dumps every thread's stack to file descriptor 2 (not `sys.stderr`: mode replaces it with a logging proxy
    that has no file number) and ends the process with `os._exit`; no step of that path can keep it from
    exiting (issue 24: a stuck worker ignored SIGTERM because the stack dump raised)."""

    shutdown_deadline_s = 30.0
    _deadline: threading.Thread | None = None

    def install_signal_handlers(self) -> None:
        super().install_signal_handlers()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._start_deadline_on_signal)

    def _start_deadline_on_signal(self, signum: int, frame: object) -> None:
        self.start_shutdown_deadline()

    def on_worker_shutdown(self) -> None:
        super().on_worker_shutdown()
        self.start_shutdown_deadline()

    def start_shutdown_deadline(self) -> None:
        if self._deadline is None:
            self._deadline = threading.Thread(target=self._exit_at_deadline, name="shutdown-deadline", daemon=True)
            self._deadline.start()

    def _exit_at_deadline(self) -> None:
        closed = False
        try:
            time.sleep(self.shutdown_deadline_s)
            closed = _loop_closed(self.loop)  # after "Closing event loop" every service has stopped cleanly
            os.write(2, f"worker shutdown still running after {self.shutdown_deadline_s:.0f} s (event loop closed: "
                        f"{closed}); thread stacks follow, then exit\n".encode())  # fmt: skip
            faulthandler.dump_traceback(file=2, all_threads=True)
        except BaseException:  # nothing may stop the exit below
            pass
        finally:
            os._exit(0 if closed else 1)


def _loop_closed(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return loop.is_closed()
    except Exception:
        return False


def _version() -> str:
    from importlib.metadata import version

    return version("interest-stream")


def worker(
    bootstrap: str | None = typer.Option(None, help="Kafka bootstrap servers (env KAFKA_BOOTSTRAP_SERVERS)"),
    partitions: int | None = typer.Option(None, help="Partitions of the topics and table (env TOPIC_PARTITIONS)"),
    state_dir: str | None = typer.Option(None, help="RocksDB directory (env STATE_DIR)"),
    web_port: int | None = typer.Option(None, help="Faust web server port, 0 = off (env WORKER_WEB_PORT)"),
    metrics_port: int | None = typer.Option(None, help="Prometheus port, 0 = off (env METRICS_PORT)"),
) -> None:
    """Run a Faust worker: events -> per-user session state (RocksDB + changelog) -> Triton -> interest topic."""
    overrides = {
        "kafka_bootstrap_servers": bootstrap,
        "topic_partitions": partitions,
        "state_dir": state_dir,
        "worker_web_port": web_port,
        "metrics_port": metrics_port,
    }
    try:
        run_worker(Settings(**{k: v for k, v in overrides.items() if v is not None}))
    except (UnknownSetting, pins.UnsupportedRelease) as exc:
        typer.echo(f"interest-stream-worker: refusing to start: {exc}", err=True)
        raise typer.Exit(2) from None


def main() -> None:
    """Console script `interest-stream-worker`."""
    typer.run(worker)
