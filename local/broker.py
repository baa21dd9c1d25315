"""The local Kafka-protocol broker (noida-db) for the demo and the tests, and explicit topic creation.

`LocalBroker` runs `noida-db start --only kafka` in the foreground as our own child, so we hold its PID and
stop exactly that process. The `noida-db` console script is a Python wrapper that forks the real binary and
does not forward signals (SIGTERM to the wrapper orphans the server), so we launch the packaged binary
directly, in its own process group.

`ensure_topics` works against any Kafka (Apache Kafka in production): it never relies on auto-creation,
which on noida-db makes 1 partition, and it refuses a topic whose partition count differs from the settings,
because keyed state would then be spread over the wrong partitions.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Coroutine, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from local.process import ProcessError, Supervised, free_port

if TYPE_CHECKING:
    from stream.settings import Settings

T = TypeVar("T")

#: Kafka error code for "topic already exists" (a concurrent creator won the race).
_TOPIC_ALREADY_EXISTS = 36


class BrokerError(RuntimeError):
    """The local broker did not start, or a topic does not match the settings."""


def _port_free(host: str, port: int) -> bool:
    """No one listens on the port. SO_REUSEADDR, as servers bind: a restarted broker's old connections linger
    in TIME_WAIT while clients that outlived it reconnect, and they do not stop a server from binding."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def noida_binary() -> str:
    """The real noida-db executable (not the Python wrapper, which would hide the server's PID)."""
    with contextlib.suppress(ModuleNotFoundError):
        path = files("noida_db").joinpath("noida-db")
        if path.is_file():
            return str(path)
    found = shutil.which("noida-db")
    if found is None:
        raise BrokerError("noida-db not found: install the `local` extra (pip install noida-db)")
    return found  # the wrapper: still stopped cleanly, as we signal its whole process group


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even when called inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def kafka_answers(bootstrap: str, timeout_s: float = 2.0, **client_kwargs: Any) -> bool:
    """True when a broker at `bootstrap` answers a real Kafka metadata request."""
    from aiokafka.admin import AIOKafkaAdminClient

    client_kwargs = {k: v for k, v in client_kwargs.items() if k != "bootstrap_servers"}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000), **client_kwargs)
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        await asyncio.wait_for(admin.describe_cluster(), timeout_s)
        return True
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


class LocalBroker:
    """One noida-db Kafka broker on a free (or given) port with its own data dir; stop() ends it by PID."""

    def __init__(self, data_dir: str | Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self._fixed_port = port
        self.port = port or 0
        self.process: Supervised | None = None

    @property
    def bootstrap(self) -> str:
        if self.process is None:
            raise BrokerError("the broker is not started")
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "noida.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout_s: float = 30.0) -> LocalBroker:
        """Start the broker and return once it answers a metadata request; raise BrokerError otherwise."""
        if self.process is not None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._fixed_port else 3  # a free port can be taken between the probe and the bind
        for attempt in range(attempts):
            self.port = self._fixed_port or free_port(self.host)
            if self._fixed_port and not _port_free(self.host, self.port):
                raise BrokerError(f"port {self.host}:{self.port} is already in use (leave `port` out to pick one)")
            cmd = [noida_binary(), "start", "--data-dir", str(self.data_dir), "--host", self.host,
                   "--only", "kafka", "--kafka-port", str(self.port)]  # fmt: skip
            # term_group: the console-script wrapper (when no packaged binary is found) does not forward signals.
            self.process = Supervised("noida-db", cmd, self.log_path, term_group=True).start()
            atexit.register(self.stop)  # a crashed test session or demo still stops its broker
            try:
                # Our server says it bound the port (so a foreign server on it cannot fool us), and it answers.
                self.process.wait_until(self._answers, timeout_s, f"answering on {self.bootstrap}")
                return self
            except ProcessError as exc:
                died = not self.process.alive
                self.stop()
                if not died or attempt == attempts - 1:
                    raise BrokerError(str(exc)) from exc
        raise AssertionError("unreachable")

    def _answers(self) -> bool:
        assert self.process is not None
        bound = re.search(rf"kafka\s+{re.escape(self.host)}:{self.port}\b", self.process.log_text(this_run=True))
        return bound is not None and run_sync(kafka_answers(self.bootstrap, timeout_s=1.0))

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM our broker's process group, wait, SIGKILL after `timeout_s`. Returns the exit code."""
        process, self.process = self.process, None
        atexit.unregister(self.stop)
        return process.stop(timeout_s) if process is not None else None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid} {self.host}:{self.port}" if self.process else "stopped"
        return f"LocalBroker({str(self.data_dir)!r}, {state})"


def frozen(pid: int) -> bool:
    """The process is stopped by a signal (state `T` in /proc/<pid>/stat); False when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "T"


def restart_quietly(broker: LocalBroker, client_pids: Iterable[int], timeout_s: float = 30.0) -> LocalBroker:
    """Stop `broker` cleanly and start it again on its port with its data, its clients frozen (SIGSTOP) meanwhile.

    The failover tests and benchmark restart noida-db because it never evicts a killed or frozen group member.
    It can lose a write it acknowledged in the instant it stops: a worker's RocksDB then holds a changelog offset
    the topic no longer has, and Faust's recovery stops with a ConsistencyError (seen once in the fencing test).
    With every client frozen, and one more round trip answered, nothing should be in flight when it stops. The
    clients are resumed once it answers again.
    """
    pids = list(client_pids)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout_s
    while not all(frozen(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise BrokerError(f"clients {pids} did not freeze within {timeout_s:.0f} s")
        time.sleep(0.05)
    run_sync(kafka_answers(broker.bootstrap))  # one more round trip: time to answer what they had sent
    port = broker.port
    broker.stop()
    try:
        return LocalBroker(broker.data_dir, port=port, host=broker.host).start()
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def changelog_topic(app_id: str, table: str) -> str:
    """The changelog topic Faust uses for `app.Table(table)` (its `<app id>-<table>-changelog` convention)."""
    return f"{app_id}-{table}-changelog"


def default_topics(settings: Settings, tables: tuple[str, ...] = ()) -> dict[str, int]:
    """Input, its DLQ, output, and the changelogs of the given Faust tables, each with the configured partitions."""
    names = [settings.topic_events, settings.topic_dlq, settings.topic_output]
    names += [changelog_topic(settings.app_id, t) for t in tables]
    return dict.fromkeys(names, settings.topic_partitions)


async def ensure_topics_async(
    settings: Settings,
    topics: Mapping[str, int] | None = None,
    *,
    tables: tuple[str, ...] = (),
    timeout_s: float = 30.0,
) -> dict[str, int]:
    """Create missing topics with their partition counts; existing ones must already have that count.

    `topics` maps name -> partitions (default: `default_topics(settings, tables)`). Changelog topics of
    `tables` are created compacted. Idempotent, and safe against a concurrent creator. Returns what exists.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    wanted = dict(topics) if topics is not None else default_topics(settings, tables)
    compacted = {changelog_topic(settings.app_id, t) for t in tables}
    admin = AIOKafkaAdminClient(**settings.kafka_client_kwargs(), request_timeout_ms=int(timeout_s * 1000))
    await admin.start()
    try:
        existing = await _partition_counts(admin)  # all topics: a metadata request naming one may auto-create it
        missing = [name for name in wanted if name not in existing]
        if missing:
            new = [
                NewTopic(
                    name,
                    wanted[name],
                    settings.topic_replication_factor,
                    topic_configs={"cleanup.policy": "compact"} if name in compacted else {},
                )
                for name in missing
            ]
            response = await admin.create_topics(new, timeout_ms=int(timeout_s * 1000))
            for name, code, *rest in response.topic_errors:
                if code not in (0, _TOPIC_ALREADY_EXISTS):
                    message = rest[0] if rest else ""
                    raise BrokerError(f"creating topic {name!r} failed: Kafka error {code} {message}".strip())
            existing = await _wait_visible(admin, missing, timeout_s)
        wrong = {n: existing[n] for n in wanted if existing[n] != wanted[n]}
        if wrong:
            detail = ", ".join(f"{n!r} has {have} (settings want {wanted[n]})" for n, have in wrong.items())
            raise BrokerError(
                f"topic partition count mismatch: {detail}. Keys would map to other partitions than the state "
                "was built with; delete the topics or set TOPIC_PARTITIONS to match."
            )
        return {n: existing[n] for n in wanted}
    finally:
        await admin.close()


async def _partition_counts(admin: Any) -> dict[str, int]:
    return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics() if t["error_code"] == 0}


async def _wait_visible(admin: Any, names: list[str], timeout_s: float) -> dict[str, int]:
    """Creation is asynchronous on a real cluster: wait until metadata lists every new topic."""
    deadline = time.monotonic() + timeout_s
    while True:
        existing = await _partition_counts(admin)
        absent = [n for n in names if n not in existing]
        if not absent:
            return existing
        if time.monotonic() > deadline:
            raise BrokerError(f"topics not visible {timeout_s:.0f} s after creation: {absent}")
        await asyncio.sleep(0.1)


def ensure_topics(
    settings: Settings,
    topics: Mapping[str, int] | None = None,
    *,
    tables: tuple[str, ...] = (),
    timeout_s: float = 30.0,
) -> dict[str, int]:
    """Sync wrapper of `ensure_topics_async` (for fixtures, the CLI and scripts)."""
    return run_sync(ensure_topics_async(settings, topics, tables=tables, timeout_s=timeout_s))
