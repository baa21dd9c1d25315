"""Forgetting a user (issue 13, right to erasure) end to end: real broker, RocksDB and tritonserver.

A `forget` message on the events topic (sent with `interest-stream forget`) must remove the user from both tables'
RocksDB files and changelogs, put a tombstone on the output topic after their records, make the web view answer
404 and leave other users alone; later events start a fresh history. It must survive a SIGKILL followed by a
restore from the changelogs, and a SIGKILL between the table deletion and the output tombstone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from core.schema import Event, InterestRecord, decode_record, encode_event
from local.broker import run_sync
from local.process import free_port
from local.replay import publish
from local.triton import LocalTriton
from stream.settings import Settings
from tests.fixtures.worker import (
    Worker,
    merge_partitions,
    read_changelog,
    read_rocksdb,
    read_topic,
    wait_caught_up,
    wait_for,
)
from tests.test_pipeline import TABLES, KillRig, assert_one_content_per_seq

pytestmark = [pytest.mark.broker, pytest.mark.triton]
NOW_MS = int(time.time() * 1000)


def events(user: str, n: int, start: int = 0) -> list[Event]:
    """`n` views of tiny-vocabulary items, a minute apart, in the last hours (never late, never in the future)."""
    return [
        Event(user_id=user, item_id=f"item{i}", event_type="view", timestamp=NOW_MS - 3_600_000 + i * 60_000)
        for i in range(start, start + n)
    ]


def send(settings: Settings, evs: list[Event]) -> None:
    run_sync(publish(settings, [(e.user_id.encode(), encode_event(e)) for e in evs], progress=False))


def forget(settings: Settings, user: str) -> None:
    """As an operator would: `interest-stream forget USER_ID`."""
    from local.cli import app

    args = ["forget", user, "--bootstrap", settings.kafka_bootstrap_servers, "--topic", settings.topic_events]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"forget {user!r} sent to {settings.topic_events}" in result.output


def outputs(settings: Settings) -> dict[bytes, list[InterestRecord | None]]:
    """Per key, the output topic in offset order; a tombstone (null value) is None."""
    out: dict[bytes, list[InterestRecord | None]] = defaultdict(list)
    for r in read_topic(settings, settings.topic_output):
        out[r.key].append(None if r.value is None else decode_record(r.value))
    return out


def interest(settings: Settings, user: str) -> tuple[int, dict[str, Any] | None]:
    """`GET /users/{user}/interest`: (status, JSON body of a 200)."""
    url = f"http://127.0.0.1:{settings.worker_web_port}/users/{user}/interest"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def assert_gone_from_changelogs(settings: Settings, user: bytes, kept: bytes) -> None:
    for table in TABLES:
        log = read_changelog(settings, table)
        assert user not in log.latest and kept in log.latest, table
        assert [value for _, _, key, value in log.records if key == user][-1] is None, f"{table}: no tombstone"


def assert_gone_from_rocksdb(state_dir: Path, user: bytes, kept: bytes) -> dict[str, bytes]:
    """The user is in neither table's RocksDB files (worker stopped); returns `kept`'s value per table."""
    values = {}
    for table in TABLES:
        files = merge_partitions(read_rocksdb(state_dir, table))
        assert user not in files and kept in files, table
        values[table] = files[kept]
    return values


def test_a_forgotten_user_is_gone_everywhere_and_later_events_start_a_fresh_history(
    make_settings: Callable[..., Settings], start_worker: Callable[..., Worker], tiny_export: Any, triton_twin: Any
) -> None:
    settings = make_settings(
        tables=TABLES,
        triton_url=triton_twin.grpc_url,
        model_dir=tiny_export.twin / "interest_transformer",
        worker_web_port=free_port(),
    )
    worker = start_worker(settings)
    send(settings, events("alice", 3) + events("bob", 2))
    wait_caught_up(settings, [worker], timeout_s=60)
    assert interest(settings, "alice")[0] == 200
    bob = interest(settings, "bob")

    forget(settings, "alice")
    wait_caught_up(settings, [worker], timeout_s=60)
    assert interest(settings, "alice")[0] == 404 and interest(settings, "bob") == bob
    assert worker.metric("interest_users_forgotten_total") == 1
    published = outputs(settings)
    assert published[b"alice"][-1] is None and None not in published[b"alice"][:-1], "records, then the tombstone"
    assert None not in published[b"bob"]
    assert_gone_from_changelogs(settings, b"alice", kept=b"bob")
    worker.stop()
    assert_gone_from_rocksdb(settings.state_dir, b"alice", kept=b"bob")
    assert not worker.crash_lines()

    again = start_worker(settings, name="again")  # RocksDB kept
    send(settings, events("alice", 1, start=10))
    wait_caught_up(settings, [again], timeout_s=60)
    status, body = interest(settings, "alice")
    assert status == 200 and body is not None and (body["seq"], body["events_seen"]) == (1, 1), body
    last = outputs(settings)[b"alice"][-1]
    assert last is not None and (last.seq, last.events_seen, last.sessions_seen) == (1, 1, 1), "a fresh history"
    assert again.metric("interest_users_forgotten_total") == 0
    assert not again.crash_lines()


def kill(worker: Worker) -> None:
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGKILL)
    wait_for(lambda: not worker.alive, 10, f"{worker.name} to die")
    worker.killed = True


def test_an_erasure_survives_a_sigkill_and_a_restore_from_the_changelogs(
    start_worker: Callable[..., Worker], tiny_export: Any, triton_twin: LocalTriton, tmp_path: Path
) -> None:
    """Erase, SIGKILL, delete the RocksDB files, restart: the tables come back from the changelogs without the
    user (their tombstones are applied as deletions), nothing of theirs is published again, and bob is intact."""
    rig = KillRig(tmp_path, triton_twin, tiny_export)
    rig.settings = rig.settings.model_copy(update={"worker_web_port": free_port()})
    settings = rig.settings
    try:
        send(settings, events("alice", 3) + events("bob", 2))
        worker = start_worker(settings, name="first")
        wait_caught_up(settings, [worker], timeout_s=60)
        forget(settings, "alice")
        wait_caught_up(settings, [worker], timeout_s=60)  # committed: the restart will not read the forget again
        assert_gone_from_changelogs(settings, b"alice", kept=b"bob")
        bob = {table: read_changelog(settings, table).values()[b"bob"] for table in TABLES}
        published = read_topic(settings, settings.topic_output)
        kill(worker)
        rig.restart_broker()

        shutil.rmtree(settings.state_dir)
        restored = start_worker(settings, name="restored")
        assert "Restore complete" in restored.log_text()
        assert interest(settings, "alice")[0] == 404 and interest(settings, "bob")[0] == 200
        assert restored.metric("interest_users_forgotten_total") == 0
        assert len(read_topic(settings, settings.topic_output)) == len(published), "nothing published again"
        restored.stop()
        assert assert_gone_from_rocksdb(settings.state_dir, b"alice", kept=b"bob") == bob
        assert not restored.crash_lines()
    finally:
        rig.broker.stop()


def test_a_sigkill_between_the_table_deletion_and_the_output_tombstone_still_publishes_the_tombstone(
    start_worker: Callable[..., Worker], tiny_export: Any, triton_twin: LocalTriton, tmp_path: Path
) -> None:
    rig = KillRig(tmp_path, triton_twin, tiny_export)
    settings = rig.settings
    try:
        send(settings, events("alice", 3) + events("bob", 2))
        first = start_worker(settings, name="first")
        wait_caught_up(settings, [first], timeout_s=60)
        first.stop()
        forget(settings, "alice")
        assert rig.crash(start_worker, "faulty", "after_forget_tables", 0), "killed after deleting alice's tables"
        assert_gone_from_changelogs(settings, b"alice", kept=b"bob")
        before = outputs(settings)
        assert before[b"alice"][-1] is not None, "killed before the output tombstone"

        worker = start_worker(settings, name="restarted")
        wait_caught_up(settings, [worker], timeout_s=60)  # the forget is read again: no newer state, so it runs
        after = outputs(settings)
        assert after[b"alice"] == [*before[b"alice"], None] and after[b"bob"] == before[b"bob"]
        assert assert_one_content_per_seq(settings)  # a reader that skips the tombstone
        assert worker.metric("interest_users_forgotten_total") == 1
        assert_gone_from_changelogs(settings, b"alice", kept=b"bob")
        worker.stop()
        assert_gone_from_rocksdb(settings.state_dir, b"alice", kept=b"bob")
        assert not worker.crash_lines()
    finally:
        rig.broker.stop()
