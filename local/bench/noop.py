"""The framework's own cost per event, and a worker's idle CPU, for `interest-stream bench live`.

`saturation_cost` fills a fresh topic with N synthetic events (one per message, or in batch envelopes of one
user's events) and reads it twice at saturation: with a no-op Faust agent (raw serializers, the worker's poll and
partition settings, nothing done per event) and with a real worker
(fresh group and state, the pipeline's Triton). Both figures are CPU seconds of the consumer's own process per
event, from its first event to its last: the box is shared (broker, Triton, whatever else runs), and CPU time
charges each process only its own work, where wall time would also count waiting for the CPU and, for the worker,
for Triton. Wall µs per event are reported next to them.

`idle_core` starts a worker with no traffic (own group and topics) and reads its CPU over a while, with or
without the local long-polling shim (`local.longpoll`).

`python -m local.bench.noop` is the no-op agent's process (configured from `NOOP_*` environment variables; it
writes its own timings as JSON to `NOOP_RESULT` once it has read `NOOP_EVENTS` events).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from local import longpoll
from stream.settings import Settings

TABLES = ("user_state",)


@dataclass(frozen=True)
class Cost:
    """CPU and wall µs per event of the no-op agent and of the worker over the same pre-filled topic."""

    events: int
    messages: int  # fewer than events when they come in batch envelopes
    noop_cpu_us: float
    noop_wall_us: float
    worker_cpu_us: float
    worker_wall_us: float

    @property
    def ratio(self) -> float:
        return self.worker_cpu_us / self.noop_cpu_us if self.noop_cpu_us else 0.0


def saturation_cost(
    base: Settings,
    work_dir: Path,
    *,
    events: int,
    users: int,
    seed: int,
    longpoll_ms: float | None,
    envelope: int = 1,
    log: Callable[[str], object] = print,
) -> Cost:
    from local.broker import ensure_topics, run_sync
    from local.replay import publish
    from local.synthetic import in_envelopes, synthetic_events

    tag = uuid.uuid4().hex[:8]
    settings = _fresh(base, work_dir, f"sat-{tag}")
    ensure_topics(settings, tables=TABLES)
    messages = in_envelopes(synthetic_events(users, events, seed=seed + 7), envelope)
    run_sync(publish(settings, messages, progress=False))
    noop_cpu, noop_wall = _noop(settings, len(messages), work_dir / f"noop-{tag}", longpoll_ms)
    log(f"no-op Faust agent: {noop_cpu * 1e6 / events:,.0f} µs CPU/event, {events / noop_wall:,.0f} ev/s")
    worker_cpu, worker_wall = _worker(settings, events, work_dir / f"sat-worker-{tag}.log", longpoll_ms)
    log(f"worker: {worker_cpu * 1e6 / events:,.0f} µs CPU/event, {events / worker_wall:,.0f} ev/s")
    return Cost(
        events=events,
        messages=len(messages),
        noop_cpu_us=noop_cpu * 1e6 / events,
        noop_wall_us=noop_wall * 1e6 / events,
        worker_cpu_us=worker_cpu * 1e6 / events,
        worker_wall_us=worker_wall * 1e6 / events,
    )


def idle_core(base: Settings, work_dir: Path, *, seconds: float, longpoll_ms: float | None) -> float:
    """Cores used by a ready worker (own group, empty topics) over `seconds` with no traffic."""
    from local.broker import ensure_topics
    from local.pipeline import WorkerProcess
    from local.process import free_port, process_tree_cpu_s
    from local.worker import settings_env

    settings = _fresh(base, work_dir, f"idle-{uuid.uuid4().hex[:8]}")
    settings = settings.model_copy(update={"worker_web_port": free_port(), "metrics_port": free_port()})
    ensure_topics(settings, tables=TABLES)
    worker = WorkerProcess(
        settings, settings_env(settings, longpoll.env(longpoll_ms)), work_dir / f"{settings.app_id}.log"
    )
    worker.start()
    try:
        _wait(worker.ready, 180, f"idle worker ready ({worker.log_path})")
        time.sleep(2.0)  # past the start-up's own work (recovery, first commits)
        cpu, start = process_tree_cpu_s(worker.pid), time.monotonic()
        time.sleep(seconds)
        return (process_tree_cpu_s(worker.pid) - cpu) / (time.monotonic() - start)
    finally:
        worker.stop()


def _fresh(base: Settings, work_dir: Path, app_id: str) -> Settings:
    """Own app id (group, table changelogs), topics and state dir on the pipeline's broker and Triton."""
    (work_dir / "state").mkdir(parents=True, exist_ok=True)  # Faust makes only the last level
    return base.model_copy(
        update={
            "app_id": app_id,
            "topic_events": f"{app_id}-events",
            "topic_output": f"{app_id}-out",
            "state_dir": work_dir / "state" / app_id,
        }
    )


def _wait(ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not {what} within {timeout_s:.0f} s")
        time.sleep(0.1)


def _noop(settings: Settings, events: int, work_dir: Path, longpoll_ms: float | None) -> tuple[float, float]:
    """Run the no-op agent over the topic; (CPU s, wall s) from its first event to its `events`-th."""
    from local.process import Supervised

    work_dir.mkdir(parents=True, exist_ok=True)
    result = work_dir / "result.json"
    env = {
        **os.environ,
        **longpoll.env(longpoll_ms),
        "NOOP_BOOTSTRAP": settings.kafka_bootstrap_servers,
        "NOOP_TOPIC": settings.topic_events,
        "NOOP_PARTITIONS": str(settings.topic_partitions),
        "NOOP_MAX_POLL_RECORDS": str(settings.worker_max_poll_records),
        "NOOP_EVENTS": str(events),
        "NOOP_RESULT": str(result),
        "NOOP_DATADIR": str(work_dir / "data"),
    }
    proc = Supervised("noop", [sys.executable, "-m", "local.bench.noop"], work_dir / "noop.log", env=env, cwd=work_dir)
    proc.start()
    try:
        proc.wait_until(result.exists, timeout_s=600, what=f"done with {events} events")
        time.sleep(0.05)  # the file is written in one call; let it land
        data = json.loads(result.read_text())
    finally:
        proc.stop(30)
    return data["cpu_s"], data["wall_s"]


def _worker(settings: Settings, events: int, log_path: Path, longpoll_ms: float | None) -> tuple[float, float]:
    """A fresh worker over the topic; (CPU s of its process tree, wall s) from its first handled event to the last."""
    from local.pipeline import WorkerProcess
    from local.process import free_port, process_tree_cpu_s
    from local.scrape import Snapshot
    from local.worker import settings_env

    settings = settings.model_copy(update={"worker_web_port": free_port(), "metrics_port": free_port()})
    worker = WorkerProcess(settings, settings_env(settings, longpoll.env(longpoll_ms)), log_path)
    url = f"http://127.0.0.1:{settings.metrics_port}/metrics"
    worker.start()
    try:
        deadline = time.monotonic() + 900
        idle_at, idle_cpu, first = time.monotonic(), 0.0, None
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker did not handle {events} events in 900 s ({log_path})")
            assert worker.process is not None
            worker.process.check_alive()
            snap = Snapshot.scrape(url)
            if snap.handled == 0:  # the clock starts at the last poll that saw nothing handled (50 ms resolution)
                idle_at, idle_cpu = snap.at, process_tree_cpu_s(worker.pid)
            elif first is None:
                first = (idle_at, idle_cpu)
            if snap.handled >= events and snap.pending == 0:
                return process_tree_cpu_s(worker.pid) - first[1], snap.at - first[0]
            # Once it runs, scrape rarely: a scrape costs the worker ~3 ms of CPU, ~9 % of its CPU at 20 Hz (py-spy)
            time.sleep(0.05 if first is None else 0.5)
    finally:
        worker.stop()


def main() -> None:
    """The no-op agent: Faust reads raw events and does nothing with them; it times itself (all threads' CPU)."""
    longpoll.install_from_env()
    import faust

    env = os.environ
    total, result = int(env["NOOP_EVENTS"]), Path(env["NOOP_RESULT"])
    app = faust.App(
        f"noop-{uuid.uuid4().hex[:8]}",
        broker=f"kafka://{env['NOOP_BOOTSTRAP']}",
        datadir=env["NOOP_DATADIR"],
        topic_partitions=int(env["NOOP_PARTITIONS"]),
        consumer_auto_offset_reset="earliest",
        broker_max_poll_records=int(env["NOOP_MAX_POLL_RECORDS"]),
        web_enabled=False,
    )
    topic = app.topic(env["NOOP_TOPIC"], key_serializer="raw", value_serializer="raw")
    state = {"seen": 0, "cpu": 0.0, "wall": 0.0}

    @app.agent(topic)
    async def noop(stream: faust.StreamT) -> None:
        async for _ in stream:
            if state["seen"] == 0:
                state["cpu"], state["wall"] = time.process_time(), time.monotonic()
            state["seen"] += 1
            if state["seen"] == total:
                cpu, wall = time.process_time() - state["cpu"], time.monotonic() - state["wall"]
                result.write_text(json.dumps({"cpu_s": cpu, "wall_s": wall, "events": total}))

    faust.Worker(app, loglevel="WARNING").execute_from_commandline()


if __name__ == "__main__":
    main()
