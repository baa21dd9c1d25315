"""The user table's write order without a broker: changelog acknowledged first, then RocksDB with its offset."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import rocksdict

from core.sessions import UserState, encode_state
from stream.tables import UserTable, UserValue, Write, decode_value, encode_value

OFFSET_KEY = b"__faust\x00offset__"


@dataclass
class FakeChangelog:
    """Sends resolve only when the test says so (`ack`), or fail (`fail`)."""

    sent: list[tuple[bytes, bytes | None, int]] = field(default_factory=list)
    futures: list[asyncio.Future[Any]] = field(default_factory=list)

    async def send(self, *, key: bytes, value: bytes | None, partition: int, **_: Any) -> asyncio.Future[Any]:
        self.sent.append((key, value, partition))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        return future

    def ack(self, first_offset: int = 100) -> None:
        for n, (future, (_, _, partition)) in enumerate(zip(self.futures, self.sent, strict=True)):
            future.set_result(SimpleNamespace(partition=partition, offset=first_offset + n))

    def get_topic_name(self) -> str:
        return "app-user_state-changelog"


def make_table(tmp_path: Path) -> tuple[UserTable, FakeChangelog, dict[int, Any], list[str]]:
    dbs: dict[int, Any] = {}

    def db_for(partition: int) -> Any:
        if partition not in dbs:
            dbs[partition] = rocksdict.Rdict(str(tmp_path / f"p{partition}"), options=rocksdict.Options(raw_mode=True))
        return dbs[partition]

    changelog = FakeChangelog()
    stages: list[str] = []
    faust_table = SimpleNamespace(
        changelog_topic=changelog, data=SimpleNamespace(_db_for_partition=db_for, offset_key=OFFSET_KEY)
    )
    return UserTable(faust_table, changelog, on_stage=stages.append), changelog, dbs, stages  # type: ignore[arg-type]


def value(events: int, record: bytes | None = b'{"seq":1}') -> UserValue:
    return UserValue(encode_state(UserState(events_seen=events)), record)


def test_rocksdb_is_written_only_after_every_changelog_ack_with_the_offsets(tmp_path: Path) -> None:
    table, changelog, dbs, stages = make_table(tmp_path)

    async def run() -> None:
        writes = [Write(0, b"a", value(1)), Write(3, b"b", value(2)), Write(0, b"c", value(3))]
        task = asyncio.create_task(table.write(writes))
        await asyncio.sleep(0.01)
        assert [(k, p) for k, _, p in changelog.sent] == [(b"a", 0), (b"b", 3), (b"c", 0)]
        assert table.get(0, b"a") is None and stages == [], "nothing local before the acks"
        changelog.ack(first_offset=100)
        await task

    asyncio.run(run())
    assert stages == ["after_changelog"]
    assert table.get(0, b"a") == value(1) and table.get(3, b"b") == value(2) and table.get(0, b"c") == value(3)
    assert table.get(3, b"a") is None, "a key lives in the partition it was written to"
    assert dbs[0].get(OFFSET_KEY) == b"102" and dbs[3].get(OFFSET_KEY) == b"101", "the changelog offset, atomically"
    assert [decode_value(v) for _, v, _ in changelog.sent] == [value(1), value(2), value(3)], "one message per user"


def test_a_failed_changelog_send_writes_nothing_locally(tmp_path: Path) -> None:
    table, changelog, dbs, stages = make_table(tmp_path)

    async def run() -> None:
        task = asyncio.create_task(table.write([Write(1, b"a", value(1)), Write(1, b"b", value(1))]))
        await asyncio.sleep(0.01)
        changelog.futures[0].set_result(SimpleNamespace(partition=1, offset=7))
        changelog.futures[1].set_exception(ConnectionError("broker gone"))
        with pytest.raises(ConnectionError):
            await task

    asyncio.run(run())
    assert stages == [] and table.get(1, b"a") is None and dbs[1].get(OFFSET_KEY) is None


def test_an_erasure_is_a_changelog_tombstone_then_a_local_delete(tmp_path: Path) -> None:
    table, changelog, _, _ = make_table(tmp_path)

    async def write(writes: list[Write]) -> None:
        task = asyncio.create_task(table.write(writes))
        await asyncio.sleep(0.01)
        changelog.ack()
        changelog.futures.clear(), changelog.sent.clear()
        await task

    asyncio.run(write([Write(2, b"a", value(1))]))
    asyncio.run(write([Write(2, b"a", None)]))
    assert table.get(2, b"a") is None


def test_values_round_trip_and_a_state_of_the_old_layout_reads_as_a_state_without_record() -> None:
    v = value(3)
    assert decode_value(encode_value(v)) == v and decode_value(None) is None
    old = encode_state(UserState(events_seen=4))  # format 1: the bare state, before records joined it
    assert decode_value(old) == UserValue(old, None)
