"""Live benchmark: the latency a downstream consumer sees at fixed offered rates, and the live capacity.

`interest-stream bench live` starts the local pipeline (broker, Triton twin, one worker; all workers behind the
local long-polling shim, `local.longpoll`) and, in one run:

1. **idle**: the CPU of a worker with no traffic, with the shim and without it (`local.bench.noop.idle_core`);
2. **sweep**: for each offered rate, live synthetic events (Zipf users and items) for a fixed time from a paced
   producer. Open loop: event i is due at start + i / rate and carries that time as its `timestamp`, so a
   producer that falls behind shows as latency instead of slowing the offer. A consumer of the output topic
   takes each record's `last_event_ms` (the newest event folded in) as the send time of that event; latency =
   receipt at that consumer - send time. Per rate: p50/p95/p99 per record, p99 per event (events coalesced into
   a later record count from their own send time; unserved ones count as infinitely late), share served, and
   the CPU of worker, Triton and broker. A rate whose oldest unserved event is older than `give_up_s` stops at
   once and ends the sweep (higher rates would only do worse), so a run stays bounded;
3. **framework cost**: a no-op Faust agent and a worker over the same pre-filled topic (`saturation_cost`).

The live capacity is the highest rate whose p99 per record is within the SLO (250 ms) with ≥ 99 % served.
The reader runs behind the shim too (10 ms cap, so its own spin does not eat the worker's core); that adds up to
10 ms to the latencies it sees. Every figure comes from this run, on this machine.

    interest-stream bench live --rates 100,250,500,1000,2000 --seconds 20
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from local import longpoll
from local.bench.noop import Cost, idle_core, saturation_cost
from local.pipeline import LocalPipeline
from local.process import process_tree_cpu_s
from local.scrape import Snapshot
from stream.settings import Settings

DEFAULT_RATES = (100.0, 250.0, 500.0, 1000.0, 2000.0)
READER_LONGPOLL_MS = 10.0
EVENT_TYPES = (("view", 0.70), ("click", 0.20), ("cart", 0.07), ("purchase", 0.03))


class _Seen(msgspec.Struct):
    """The two fields of an interest record (core.schema.InterestRecord) the reader needs; the rest is skipped."""

    user_id: str
    last_event_ms: int


@dataclass(frozen=True)
class RateResult:
    rate: float
    seconds: float  # sending time actually spent (shorter when stopped early)
    sent: int
    served: int
    records: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    p99_event_ms: float
    worker_core: float
    triton_core: float
    broker_core: float
    stopped_early: bool
    fence_ms: float = math.nan  # mean wall time of one ownership check (interest_fence_check_seconds)
    fence_share: float = math.nan  # the worker's wall time spent in them (2 per batch, in the batch's path)

    @property
    def served_share(self) -> float:
        return self.served / self.sent if self.sent else 0.0

    def meets(self, slo_ms: float) -> bool:
        return not self.stopped_early and self.served_share >= 0.99 and self.p99_ms <= slo_ms


@dataclass(frozen=True)
class LiveResult:
    rates: list[RateResult]
    slo_ms: float
    cost: Cost
    idle_core: float
    idle_core_no_longpoll: float
    longpoll_ms: float | None
    users: int
    plot: Path | None
    envelope: int = 1  # events per message (batch envelopes of one user's events; 1: plain events)
    in_flight: int = 0  # WORKER_BATCHES_IN_FLIGHT (0: the worker's default)

    @property
    def capacity(self) -> RateResult | None:
        return max((r for r in self.rates if r.meets(self.slo_ms)), key=lambda r: r.rate, default=None)

    def result_line(self) -> str:
        cap = self.capacity
        return (
            f"RESULT live_capacity_eps={cap.rate if cap else 0:.0f} "
            f"p99_ms_at_capacity={cap.p99_ms if cap else math.nan:.1f} worker_vs_faust_noop={self.cost.ratio:.2f} "
            f"idle_worker_core={self.idle_core:.3f} idle_worker_core_no_longpoll={self.idle_core_no_longpoll:.3f} "
            f"longpoll_ms={self.longpoll_ms or 0:g} "
            f"fence_ms_at_capacity={cap.fence_ms if cap else math.nan:.2f} "
            f"fence_share_at_capacity={cap.fence_share if cap else math.nan:.3f}"
            + (f" envelope={self.envelope}" if self.envelope > 1 else "")
            + (f" in_flight={self.in_flight}" if self.in_flight else "")
        )


class Traffic:
    """Zipf-distributed users and items (model vocabulary ids when there is one) for the paced producer."""

    def __init__(self, users: int, items: Sequence[str], *, zipf_a: float, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.users = [f"live-{i}" for i in range(users)]
        self.items = list(items) or [f"i{i}" for i in range(1000)]
        self.user_p = _zipf(len(self.users), zipf_a)
        self.item_p = _zipf(len(self.items), 1.1)
        self.type_p = np.array([p for _, p in EVENT_TYPES]) / sum(p for _, p in EVENT_TYPES)
        self.n = 0

    def draw(self, count: int) -> list[tuple[str, str, str]]:
        """`count` (user, item, event type) triples."""
        u = self.rng.choice(len(self.users), count, p=self.user_p)
        it = self.rng.choice(len(self.items), count, p=self.item_p)
        et = self.rng.choice(len(EVENT_TYPES), count, p=self.type_p)
        return [(self.users[a], self.items[b], EVENT_TYPES[c][0]) for a, b, c in zip(u, it, et, strict=True)]


def _zipf(n: int, a: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** a
    return w / w.sum()


@dataclass
class Ledger:
    """The events of one rate by user (send times, ms) and what the reader has seen of them."""

    window_start_ms: int
    pending: dict[str, deque[int]] = field(default_factory=dict)
    order: deque[tuple[int, str]] = field(default_factory=deque)  # (send ms, user) in send order
    served_upto: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    served: int = 0
    record_ms: list[float] = field(default_factory=list)
    event_ms: list[float] = field(default_factory=list)

    def on_send(self, user: str, ts_ms: int) -> None:
        self.pending.setdefault(user, deque()).append(ts_ms)
        self.order.append((ts_ms, user))
        self.sent += 1

    def on_record(self, user: str, last_event_ms: int, received_ms: float) -> None:
        if last_event_ms < self.window_start_ms or user not in self.pending:
            return  # an earlier rate's (or the warm-up's) record
        self.record_ms.append(received_ms - last_event_ms)
        self.served_upto[user] = max(self.served_upto.get(user, 0), last_event_ms)
        queue = self.pending[user]
        while queue and queue[0] <= last_event_ms:
            self.event_ms.append(received_ms - queue.popleft())
            self.served += 1

    def oldest_pending_ms(self) -> int | None:
        while self.order and self.order[0][0] <= self.served_upto.get(self.order[0][1], -1):
            self.order.popleft()
        return self.order[0][0] if self.order else None


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


class Sweep:
    """The paced producer and the downstream reader on one event loop."""

    def __init__(
        self,
        settings: Settings,
        traffic: Traffic,
        pids: dict[str, int],
        *,
        give_up_s: float,
        envelope: int = 1,
        metrics_url: str | None = None,
    ) -> None:
        self.settings, self.traffic, self.pids, self.give_up_s = settings, traffic, pids, give_up_s
        self.metrics_url = metrics_url  # the worker's: the fence's cost per rate
        self.envelope = max(1, envelope)
        self.ledger = Ledger(window_start_ms=0)
        self._stop_reader = asyncio.Event()

    async def run(
        self, rates: Sequence[float], seconds: float, drain_s: float, warmup_s: float, log: Callable[[str], object]
    ) -> list[RateResult]:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

        kw = self.settings.kafka_client_kwargs()
        self.producer = AIOKafkaProducer(**kw, acks="all", linger_ms=1)
        consumer = AIOKafkaConsumer(**kw, group_id=None, enable_auto_commit=False)
        await self.producer.start()
        await consumer.start()
        try:
            parts = [TopicPartition(self.settings.topic_output, p) for p in range(self.settings.topic_partitions)]
            consumer.assign(parts)
            await consumer.seek_to_end(*parts)
            for tp in parts:  # resolve the end offsets now: only records of this run's events are read
                await consumer.position(tp)
            reader = asyncio.create_task(self._read(consumer))
            if warmup_s > 0:
                log(f"warm-up: {rates[0]:g} ev/s for {warmup_s:g} s (not counted)")
                await self._rate(rates[0], warmup_s, drain_s)
            out: list[RateResult] = []
            for rate in rates:
                result = await self._rate(rate, seconds, drain_s)
                out.append(result)
                early = " (stopped early)" if result.stopped_early else ""
                log(f"{rate:>7,.0f} ev/s: p50 {result.p50_ms:,.0f} ms, p99 {result.p99_ms:,.0f} ms, "
                    f"served {result.served_share:.1%}{early}")  # fmt: skip
                if result.stopped_early or result.served < result.sent:
                    log("backlog not worked off: higher rates skipped")
                    break
            self._stop_reader.set()
            await reader
            return out
        finally:
            await consumer.stop()
            await self.producer.stop()

    async def _read(self, consumer: Any) -> None:
        decode = msgspec.json.Decoder(_Seen).decode
        while not self._stop_reader.is_set():
            batches = await consumer.getmany(timeout_ms=100)
            now_ms = time.time() * 1000
            for records in batches.values():
                for r in records:
                    seen = decode(r.value)
                    self.ledger.on_record(seen.user_id, seen.last_event_ms, now_ms)

    def _late(self) -> bool:
        oldest = self.ledger.oldest_pending_ms()
        return oldest is not None and time.time() * 1000 - oldest > self.give_up_s * 1000

    async def _rate(self, rate: float, seconds: float, drain_s: float) -> RateResult:
        from core.schema import Event, encode_envelope, encode_event

        topic, total, size = self.settings.topic_events, max(1, round(rate * seconds)), self.envelope
        draws = self.traffic.draw(total)
        snap0 = await self._scrape()
        cpu0 = {name: process_tree_cpu_s(pid) for name, pid in self.pids.items()}
        start_wall, start = time.time(), time.monotonic()
        ledger = self.ledger = Ledger(window_start_ms=int(start_wall * 1000))
        sends, i, stopped, next_check = [], 0, False, start + 0.5
        while i < total:
            now = time.monotonic()
            due = min(total, int((now - start) * rate) + 1)
            # One message per `size` events, sent when its last event is due (an SDK flushing every `size`
            # events); all of a message's events are its first draw's user's, each with its own due time.
            while i < total and min(total, i + size) <= due:
                group, user = draws[i : i + size], draws[i][0]
                events = []
                for k, (_, item, etype) in enumerate(group):
                    ts = int((start_wall + (i + k) / rate) * 1000)  # the event's due time: open loop
                    events.append(Event(user, item, etype, ts, event_id=f"{user}-{self.traffic.n}"))
                    self.traffic.n += 1
                    ledger.on_send(user, ts)
                value = encode_event(events[0]) if size == 1 else encode_envelope(events)
                sends.append(await self.producer.send(topic, key=user.encode(), value=value))
                i += len(group)
            if now >= next_check:
                next_check = now + 0.5
                if self._late():
                    stopped = True
                    break
            await asyncio.sleep(max(0.001, start + (min(total, i + size) - 1) / rate - time.monotonic()))
        sent_s = time.monotonic() - start
        cpu1 = {name: process_tree_cpu_s(pid) for name, pid in self.pids.items()}
        await asyncio.gather(*sends)
        deadline = time.monotonic() + drain_s
        while not stopped and ledger.served < ledger.sent and time.monotonic() < deadline and not self._late():
            await asyncio.sleep(0.05)
        snap1 = await self._scrape()
        events = sorted(ledger.event_ms) + [math.inf] * (ledger.sent - ledger.served)
        core = {name: (cpu1[name] - cpu0[name]) / sent_s for name in self.pids}
        fence_s, checks = snap1.fence_seconds - snap0.fence_seconds, snap1.fence_checks - snap0.fence_checks
        return RateResult(
            rate=rate, seconds=sent_s, sent=ledger.sent, served=ledger.served, records=len(ledger.record_ms),
            p50_ms=_pct(ledger.record_ms, 50), p95_ms=_pct(ledger.record_ms, 95), p99_ms=_pct(ledger.record_ms, 99),
            p99_event_ms=events[min(len(events) - 1, int(0.99 * len(events)))] if events else math.nan,
            worker_core=core.get("worker0", 0.0), triton_core=core.get("triton", 0.0),
            broker_core=core.get("broker", 0.0), stopped_early=stopped,
            fence_ms=1000 * fence_s / checks if checks else math.nan,
            fence_share=fence_s / (snap1.at - snap0.at) if self.metrics_url else math.nan,
        )  # fmt: skip

    async def _scrape(self) -> Snapshot:
        """The worker's counters now (an empty snapshot without a metrics URL); off the event loop."""
        if self.metrics_url is None:
            return Snapshot(at=time.monotonic())
        return await asyncio.to_thread(Snapshot.scrape, self.metrics_url)


def run(
    repo: Path,
    work_dir: Path,
    *,
    rates: Sequence[float] = DEFAULT_RATES,
    seconds: float = 20.0,
    users: int = 10_000,
    zipf_a: float = 1.0,
    slo_ms: float = 250.0,
    drain_s: float = 5.0,
    give_up_s: float = 10.0,
    warmup_s: float = 5.0,
    idle_s: float = 10.0,
    cost_events: int = 20_000,
    longpoll_ms: float | None = longpoll.DEFAULT_MAX_WAIT_MS,
    batch_max: int | None = None,
    batch_wait_s: float | None = None,
    plot: Path | None = None,
    seed: int = 0,
    envelope: int = 1,
    in_flight: int | None = None,
    log: Callable[[str], object] = print,
) -> LiveResult:
    from local.broker import run_sync
    from stream.inference import ModelBundle

    work_dir = Path(work_dir).absolute()
    with LocalPipeline(
        work_dir, repo=repo, workers=1, batch_max=batch_max, batch_wait_s=batch_wait_s, longpoll_ms=longpoll_ms,
        start_workers=False, overrides={"worker_batches_in_flight": in_flight} if in_flight else None,
    ) as pipe:  # fmt: skip
        base = pipe.settings
        log("idle worker without the long-polling shim ...")
        idle_off = idle_core(base, work_dir, seconds=idle_s, longpoll_ms=None)
        pipe.start_workers()
        log(f"idle worker: {idle_off:.3f} cores without the shim; now the pipeline's worker, {_shim(longpoll_ms)}")
        time.sleep(2.0)
        cpu, t0 = process_tree_cpu_s(pipe.pids["worker0"]), time.monotonic()
        time.sleep(idle_s)
        idle_on = (process_tree_cpu_s(pipe.pids["worker0"]) - cpu) / (time.monotonic() - t0)
        log(f"idle worker: {idle_on:.3f} cores, {_shim(longpoll_ms)}")
        items = ModelBundle.load(pipe.settings.model_dir).vocab.items
        traffic = Traffic(users, items, zipf_a=zipf_a, seed=seed)
        pids = {k: v for k, v in pipe.pids.items() if k in ("broker", "triton", "worker0")}
        reader_shim = not longpoll.installed() and longpoll.install(READER_LONGPOLL_MS)
        try:
            sweep = Sweep(
                pipe.settings, traffic, pids, give_up_s=give_up_s, envelope=envelope, metrics_url=pipe.metrics_url
            )
            results = run_sync(sweep.run(list(rates), seconds, drain_s, warmup_s, log))
            # With envelopes the pre-filled topic has fewer users, so that most messages hold `envelope` events (at
            # 10,000 users a 20,000-event topic would give each user two events: envelopes of two).
            cost_users = users if envelope == 1 else max(1, cost_events // (4 * envelope))
            cost = saturation_cost(
                base, work_dir, events=cost_events, users=cost_users, seed=seed, longpoll_ms=longpoll_ms,
                envelope=envelope, log=log,
            )  # fmt: skip
        finally:
            if reader_shim:
                longpoll.uninstall()
    result = LiveResult(results, slo_ms, cost, idle_on, idle_off, longpoll_ms, users, None, envelope, in_flight or 0)
    plot = plot or work_dir / "live-capacity.png"
    return LiveResult(**{**result.__dict__, "plot": write_plot(result, plot)})


def _shim(longpoll_ms: float | None) -> str:
    return f"long-polling shim capped at {longpoll_ms:g} ms" if longpoll_ms else "no long-polling shim"


def write_plot(result: LiveResult, path: Path) -> Path | None:
    """Offered rate vs p99 (per record and per event) with the SLO; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    rates = [r.rate for r in result.rates]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(rates, [r.p99_ms for r in result.rates], "o-", label="p99 per record")
    ax.plot(rates, [min(r.p99_event_ms, 1e6) for r in result.rates], "s--", label="p99 per event")
    ax.axhline(result.slo_ms, color="red", linewidth=1, label=f"SLO {result.slo_ms:g} ms")
    ax.set(xscale="log", yscale="log", xlabel="offered rate (events/s)", ylabel="latency at the consumer (ms)")
    ax.set_xticks(rates, [f"{r:,.0f}" for r in rates])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title(f"live capacity: {result.capacity.rate if result.capacity else 0:,.0f} ev/s ({result.users:,} users)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_result(result: LiveResult) -> None:
    from rich.console import Console
    from rich.table import Table

    sent_as = f"batch envelopes of {result.envelope} events" if result.envelope > 1 else "one event per message"
    table = Table(
        title=f"live: {result.users:,} users, {sent_as}, SLO p99 ≤ {result.slo_ms:g} ms, {_shim(result.longpoll_ms)}"
    )
    columns = ("offered ev/s", "p50 ms", "p95 ms", "p99 ms", "p99/event ms", "served", "cores worker/Triton/broker",
               "fence ms (share)")  # fmt: skip
    for name in columns:
        table.add_column(name, justify="right")
    for r in result.rates:
        served = f"{r.served_share:.1%}" + (" stopped" if r.stopped_early else "")
        cores = f"{r.worker_core:.2f} / {r.triton_core:.2f} / {r.broker_core:.2f}"
        row = (f"{r.rate:,.0f}", f"{r.p50_ms:,.0f}", f"{r.p95_ms:,.0f}", f"{r.p99_ms:,.0f}", f"{r.p99_event_ms:,.0f}")
        table.add_row(*row, served, cores, f"{r.fence_ms:.2f} ({r.fence_share:.1%})")
    console = Console()
    console.print(table)
    c = result.cost
    console.print(f"per event at saturation ({c.events:,} events in {c.messages:,} messages): "
                  f"worker {c.worker_cpu_us:,.0f} µs CPU "
                  f"({c.worker_wall_us:,.0f} µs wall), no-op Faust agent {c.noop_cpu_us:,.0f} µs CPU "
                  f"({c.noop_wall_us:,.0f} µs wall)")  # fmt: skip
    console.print(
        f"idle worker: {result.idle_core:.3f} cores ({_shim(result.longpoll_ms)}), "
        f"{result.idle_core_no_longpoll:.3f} without the shim"
    )
    if result.plot:
        console.print(f"plot: {result.plot}")
    print(result.result_line(), flush=True)
