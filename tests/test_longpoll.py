"""The local long-polling shim (`local.longpoll`): the holds it asks for (a fake fetcher and clock), and against
the real local broker an idle consumer that stops spinning, records that still arrive, fetches cut at the limit.
Counts, not CPU shares or latencies: a box busy with other work only makes fewer fetches and slower round trips.
Other aiokafka releases: tests/test_pins.py."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from local import longpoll
from local.broker import run_sync
from local.worker import FAULT_VARIABLES, worker_command
from stream.settings import Settings

CAP_MS = 50.0


@pytest.fixture(autouse=True)
def restored() -> Iterator[None]:
    """Every test leaves aiokafka unpatched, whatever it did."""
    yield
    longpoll.uninstall()


def test_an_empty_fetch_is_held_for_the_rest_of_its_wait_doubling_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait starts at the cap, drops to MIN_WAIT_MS after a fetch with records and doubles with each empty one
    up to the cap; the hold is what is left of the wait after the round trip; each node keeps its own wait."""
    now, holds = [0.0], []
    fetches = iter([(1, False, 0.0), (1, False, 0.01), (1, True, 0.0), *[(1, False, 0.0)] * 5, (2, False, 0.07)])

    async def fetch(fetcher: Any, assignment: Any, node_id: int, request: Any) -> bool:
        node, got_records, took = next(fetches)
        assert node == node_id
        now[0] += took
        return got_records

    async def sleep(seconds: float) -> None:
        holds.append(round(seconds, 6))

    monkeypatch.setattr(longpoll, "_max_wait_s", CAP_MS / 1000)
    monkeypatch.setattr(longpoll, "time", SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(longpoll, "asyncio", SimpleNamespace(sleep=sleep, CancelledError=asyncio.CancelledError))
    fetcher = SimpleNamespace(_fetch_max_wait_ms=500, _max_partition_fetch_bytes=1024, _records={})
    longpoll._original = fetch  # what the shim wraps; aiokafka's Fetcher itself is never touched here
    try:
        got = [asyncio.run(longpoll._long_polled(fetcher, None, node, None)) for node in [1] * 8 + [2]]
    finally:
        longpoll._original = None
    assert got == [False, False, True, False, False, False, False, False, False]
    assert holds == [0.05, 0.04, 0.005, 0.01, 0.02, 0.04, 0.05], "node 2: its 70 ms round trip outlasted its wait"
    assert fetcher._longpoll_waits == {1: 0.05, 2: 0.05}


def count_fetches(monkeypatch: pytest.MonkeyPatch) -> Counter[int]:
    """aiokafka's fetch round trips per node, counted beneath the shim when it is installed after this."""
    from aiokafka.consumer.fetcher import Fetcher

    original, calls = Fetcher._proc_fetch_request, Counter[int]()

    async def counted(self: Any, assignment: Any, node_id: int, request: Any) -> bool:
        calls[node_id] += 1
        return await original(self, assignment, node_id, request)

    monkeypatch.setattr(Fetcher, "_proc_fetch_request", counted)
    return calls


async def _idle_fetches(settings: Settings, calls: Counter[int], seconds: float) -> tuple[int, float]:
    """(the most fetch round trips any node got, seconds it took) while a bare aiokafka group member waits on an
    empty topic."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        settings.topic_events, **settings.kafka_client_kwargs(), group_id=f"idle-{uuid.uuid4().hex[:8]}"
    )
    await consumer.start()
    try:
        await consumer.getmany(timeout_ms=1000)  # joined and assigned before counting starts
        calls.clear()
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            assert not await consumer.getmany(timeout_ms=500)
        return max(calls.values()), time.monotonic() - start
    finally:
        await consumer.stop()


def test_idle_consumer_stops_spinning(settings: Settings, broker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the shim each empty fetch holds its node for the cap, so a node gets at most elapsed/cap + 1 fetches
    (+1 for one in flight as counting starts): a slower box can only make fewer. Without it noida-db answers at
    once and the consumer fetches as fast as it can: well over that ceiling, however loaded the box."""
    calls = count_fetches(monkeypatch)
    try:
        assert longpoll.install(CAP_MS)
        with_shim, elapsed = run_sync(_idle_fetches(settings, calls, 3.0))
        ceiling = elapsed / (CAP_MS / 1000) + 2
        longpoll.uninstall()
        without, elapsed_without = run_sync(_idle_fetches(settings, calls, 3.0))
    finally:
        longpoll.uninstall()  # before monkeypatch puts aiokafka's own method back
    print(f"idle bare consumer: {with_shim} fetches in {elapsed:.1f} s with the shim (ceiling {ceiling:.0f}), "
          f"{without} in {elapsed_without:.1f} s without")  # fmt: skip
    assert 0 < with_shim <= ceiling
    if broker.pid is not None:  # noida-db: without the shim every empty fetch comes back at once
        assert without > elapsed_without / (CAP_MS / 1000) + 2


async def _latencies(settings: Settings, n: int, seed: int = 0) -> list[float]:
    """Send `n` records at random moments to an idle assigned consumer; seconds from send to receipt of each."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    rng = random.Random(seed)
    consumer = AIOKafkaConsumer(**settings.kafka_client_kwargs(), group_id=None, enable_auto_commit=False)
    producer = AIOKafkaProducer(**settings.kafka_client_kwargs(), acks="all", linger_ms=0)
    await consumer.start()
    await producer.start()
    try:
        parts = [TopicPartition(settings.topic_events, p) for p in range(settings.topic_partitions)]
        consumer.assign(parts)
        await consumer.seek_to_end(*parts)
        for tp in parts:
            await consumer.position(tp)
        out: list[float] = []
        for i in range(n):
            await asyncio.sleep(rng.uniform(0.02, 0.15))  # lands anywhere within a held (empty) fetch
            sent = time.monotonic()
            await producer.send_and_wait(settings.topic_events, key=str(i).encode(), value=b"x")
            got = await consumer.getmany(timeout_ms=5000)
            assert sum(len(b) for b in got.values()) == 1, f"record {i} did not arrive within 5 s"
            out.append(time.monotonic() - sent)
        return out
    finally:
        await consumer.stop()
        await producer.stop()


def test_records_sent_to_an_idle_consumer_arrive_through_the_shim(settings: Settings) -> None:
    """Each of 25 records, sent at a random moment of a held fetch, arrives (within getmany's generous 5 s); how
    long the shim holds a fetch is checked above without a clock, the latencies are printed for the record."""
    assert longpoll.install(CAP_MS)
    latencies = run_sync(_latencies(settings, 25))
    print(f"send->receive with the shim: max {max(latencies) * 1000:.0f} ms, median {sorted(latencies)[12] * 1000:.0f}")
    assert len(latencies) == 25


def test_install_is_idempotent_and_reversible() -> None:
    from aiokafka.consumer.fetcher import Fetcher

    original = Fetcher._proc_fetch_request
    assert longpoll.install(20) and longpoll.install(30)
    assert Fetcher._proc_fetch_request is not original and longpoll.installed()
    longpoll.uninstall()
    assert Fetcher._proc_fetch_request is original and not longpoll.installed()


def test_environment_switch() -> None:
    assert longpoll.max_wait_from_env({}) is None
    assert longpoll.max_wait_from_env({longpoll.ENV: "0"}) is None
    assert longpoll.max_wait_from_env({longpoll.ENV: "1"}) == longpoll.DEFAULT_MAX_WAIT_MS
    assert longpoll.max_wait_from_env(longpoll.env(20)) == 20
    assert longpoll.max_wait_from_env(longpoll.env(None)) is None
    with pytest.raises(ValueError):
        longpoll.max_wait_from_env({longpoll.ENV: "50"})
    with pytest.raises(ValueError):
        longpoll.max_wait_from_env({longpoll.ENV: "1", longpoll.ENV_MS: "-3"})
    # the worker runs behind the shim only when asked; a fault still runs the fault injector (which installs it)
    assert worker_command({})[-1] != "local.longpoll"
    assert worker_command(longpoll.env())[-2:] == ["-m", "local.longpoll"]
    for fault in FAULT_VARIABLES:
        assert worker_command({**longpoll.env(), fault: "x"})[-2:] == ["-m", "local.faults"], fault


async def _fetch_sizes(settings: Settings, total: int) -> tuple[list[int], list[int]]:
    """Fill partition 0 with `total` 150-byte records, then read them with a 16 KiB partition fetch limit:
    (records per getmany, offsets read in order)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    producer = AIOKafkaProducer(**settings.kafka_client_kwargs(), linger_ms=5)
    await producer.start()
    try:
        for i in range(total):
            await producer.send(settings.topic_events, b"x" * 150, key=b"k%d" % i, partition=0)
        await producer.flush()
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        **settings.kafka_client_kwargs(), enable_auto_commit=False, max_partition_fetch_bytes=16 * 1024
    )
    await consumer.start()
    sizes: list[int] = []
    offsets: list[int] = []
    try:
        tp = TopicPartition(settings.topic_events, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + 60
        while len(offsets) < total and time.monotonic() < deadline:
            got = (await consumer.getmany(timeout_ms=500, max_records=100_000)).get(tp, [])
            if got:
                sizes.append(len(got))
                offsets += [r.offset for r in got]
    finally:
        await consumer.stop()
    return sizes, offsets


def test_a_partition_fetch_is_cut_at_the_limit_and_loses_nothing(settings: Settings) -> None:
    """noida-db returns the whole backlog of a partition in one fetch whatever `max_partition_fetch_bytes` says;
    with the shim a fetch hands out about the limit (16 KiB of 150 B values: ~110 records), and every record
    still arrives once, in order."""
    longpoll.install(CAP_MS)
    sizes, offsets = run_sync(_fetch_sizes(settings, 3_000))
    assert offsets == list(range(3_000))
    assert max(sizes) <= 16 * 1024 // 140 + 1 and len(sizes) >= 3_000 // 120
