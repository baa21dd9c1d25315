"""Client-side long-polling for the local broker: local tooling only, never part of the production worker.

Why: Apache Kafka holds a fetch that finds no records for up to `fetch_max_wait_ms`, so an idle consumer sends
a few requests per second. noida-db (the local broker, 0.2.3) answers every fetch at once, so an idle aiokafka
consumer loops empty fetches as fast as it can: ~0.85 of a core per consumer, contending for the GIL with the
worker's agent and for the CPU with everything else on the box.

What: `install()` wraps aiokafka's `Fetcher._proc_fetch_request` (one fetch round trip to one node). When a fetch
brought no new records and came back sooner than the wait, the wrapper waits out the rest before the fetcher may
send the next one, as the broker would have. The wait is 5 ms after a fetch that brought records and doubles with
each empty one up to `min(fetch_max_wait_ms, max_wait_ms)` (default cap 100 ms; Faust asks for 1,500 ms). Unlike
a broker it cannot return early when records arrive during the wait, so it adds up to the current wait to the
first record after a quiet spell: little under traffic (the wait stays near 5 ms), at most the cap after idling.
The live benchmark (`interest-stream bench live`) runs with it on (`--no-longpoll` to compare).

Second gap, same place: noida-db also ignores `max_partition_fetch_bytes` and returns a partition's whole backlog
in one fetch, and aiokafka hands a FetchResult out in full before the next partition's (measured: 20,000 records
in one fetch with a 64 KiB limit). One user with a 100k-event backlog then holds every other partition of the
worker back until it is drained. The wrapper cuts each fetched partition at the consumer's
`max_partition_fetch_bytes`, as Kafka would; the fetcher then fetches the rest from the next offset.

Pinned: it patches a private method, so it installs only on the aiokafka release it was written and tested
against (stream/pins.py); on another release `install` raises instead of leaving consumers to spin unnoticed.

Switched on by the local pipeline (`local.pipeline.LocalPipeline`) and the test fixtures through the environment
variable `INTEREST_STREAM_LOCAL_LONGPOLL=1` (cap in `INTEREST_STREAM_LOCAL_LONGPOLL_MS`, default 100; `0` or unset =
off); `local.worker.worker_command` then runs the worker as `python -m local.longpoll`, which
installs the shim and calls the ordinary entry point `stream.worker.main`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from stream import pins

ENV = "INTEREST_STREAM_LOCAL_LONGPOLL"
ENV_MS = "INTEREST_STREAM_LOCAL_LONGPOLL_MS"
DEFAULT_MAX_WAIT_MS = 100.0
MIN_WAIT_MS = 5.0

_original: Callable[..., Awaitable[bool]] | None = None
_max_wait_s = DEFAULT_MAX_WAIT_MS / 1000


def installed() -> bool:
    return _original is not None


def install(max_wait_ms: float = DEFAULT_MAX_WAIT_MS) -> bool:
    """Patch aiokafka's fetcher (idempotent; a second call only changes the cap); True once installed.
    `pins.UnsupportedRelease` on an aiokafka other than the pinned one (stream/pins.py)."""
    global _original, _max_wait_s
    from aiokafka.consumer.fetcher import Fetcher

    if max_wait_ms <= 0:
        raise ValueError("max_wait_ms must be > 0")
    pins.require("aiokafka")
    _max_wait_s = max_wait_ms / 1000
    if _original is None:
        _original = Fetcher._proc_fetch_request
        Fetcher._proc_fetch_request = _long_polled  # type: ignore[method-assign]
    return True


def uninstall() -> None:
    """Restore aiokafka's own fetch (tests and the benchmark compare both in one process)."""
    global _original
    if _original is not None:
        from aiokafka.consumer.fetcher import Fetcher

        Fetcher._proc_fetch_request = _original  # type: ignore[method-assign]
        _original = None


async def _long_polled(self: Any, assignment: Any, node_id: int, request: Any) -> bool:
    """aiokafka's fetch round trip; after one that brought nothing, hold the node until the wait is over.

    The fetcher sends no new fetch to a node while this task runs (`Fetcher._in_flight`), exactly as while a
    broker holds a long poll. The wait starts at `MIN_WAIT_MS` after a fetch that brought records and doubles
    with every empty one up to the cap: a consumer under traffic keeps its added latency near the minimum, an
    idle one settles at the cap within a few fetches. Cancellation (close, lost assignment) ends the wait like
    aiokafka's own cancel path.
    """
    assert _original is not None
    started = time.monotonic()
    got_records = await _original(self, assignment, node_id, request)
    waits: dict[int, float] = self.__dict__.setdefault("_longpoll_waits", {})
    cap = min(self._fetch_max_wait_ms / 1000, _max_wait_s)
    if got_records:
        _cap_partitions(self)
        waits[node_id] = min(MIN_WAIT_MS / 1000, cap)
        return got_records
    wait = waits.get(node_id, cap)
    waits[node_id] = min(2 * wait, cap)
    rest = wait - (time.monotonic() - started)
    if rest > 0:
        try:
            await asyncio.sleep(rest)
        except asyncio.CancelledError:
            return False
    return got_records


def _cap_partitions(fetcher: Any) -> None:
    """Cut every newly fetched partition at `max_partition_fetch_bytes` of keys and values (at least one record)."""
    cap = fetcher._max_partition_fetch_bytes
    for result in fetcher._records.values():
        records = getattr(result, "_partition_records", None)
        if records is not None and records._records_iterator is not None and not getattr(records, "_capped", False):
            records._records_iterator = _capped(records._records_iterator, cap)
            records._capped = True


def _capped(records: Iterator[Any], cap: int) -> Iterator[Any]:
    """Stop after `cap` bytes. aiokafka has set `next_fetch_offset` past each record it yielded, so the position
    moves to the first record not taken and the next fetch starts there."""
    taken = 0
    for record in records:
        yield record
        taken += max(0, record.serialized_key_size) + max(0, record.serialized_value_size)
        if taken >= cap:
            return


def max_wait_from_env(environ: Mapping[str, str] | None = None) -> float | None:
    """The cap in ms the environment asks for (`ENV_MS`, default 100), or None when `ENV` is off."""
    environ = os.environ if environ is None else environ
    value = environ.get(ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return None
    if value not in ("1", "true", "yes", "on"):
        raise ValueError(f"{ENV} must be 0 or 1, not {value!r}")
    raw_ms = environ.get(ENV_MS, "").strip()
    try:
        ms = float(raw_ms) if raw_ms else DEFAULT_MAX_WAIT_MS
    except ValueError:
        raise ValueError(f"{ENV_MS} must be a wait in ms, not {raw_ms!r}") from None
    if ms <= 0:
        raise ValueError(f"{ENV_MS} must be > 0, not {raw_ms!r}")
    return ms


def install_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Install when the environment asks for it (see the module docstring); True when installed."""
    max_wait_ms = max_wait_from_env(environ)
    return install(max_wait_ms) if max_wait_ms is not None else False


def env(max_wait_ms: float | None = DEFAULT_MAX_WAIT_MS) -> dict[str, str]:
    """The environment that switches the shim on in a child with this cap (off for None)."""
    if max_wait_ms is None:
        return {ENV: "0"}
    return {ENV: "1", ENV_MS: f"{max_wait_ms:g}"}


def main() -> None:
    """`python -m local.longpoll`: the ordinary worker entry point with the shim installed first."""
    install_from_env()
    from stream.worker import main as worker_main

    worker_main()


if __name__ == "__main__":
    main()
