"""The Faust worker end to end: real `interest-stream worker` processes against the real local broker.

What the issue's item 7 asks, each against the offline sessionization (`state_from_events`, the same pure
function training uses): (a) all MovieLens ratings, (b) restarts with and without the RocksDB files plus an
idempotent replay, (c) two workers in one group, (d) malformed input to the DLQ, (e) changelog partitions.
Only (a) replays the full data set; the others use small synthetic sets to keep the suite fast.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka.partitioner import murmur2

from stream.events import Event
from stream.local.broker import ensure_topics, run_sync
from stream.replay import publish
from stream.sessions import UserState, decode_state, state_from_events
from stream.settings import Settings
from stream.synthetic import mix_malformed
from tests.fixtures.worker import (
    TABLE,
    Changelog,
    Worker,
    merge_partitions,
    read_changelog,
    read_rocksdb,
    read_topic,
    wait_caught_up,
    wait_for,
)

pytestmark = pytest.mark.broker


def new_settings(bootstrap: str, state_root: Path, **overrides: object) -> Settings:
    """Fresh app id, topics (created, changelog compacted) and state dir: no test shares a group or offsets."""
    tag = uuid.uuid4().hex[:10]
    fields: dict[str, object] = {
        "kafka_bootstrap_servers": bootstrap,
        "app_id": f"test-{tag}",
        "topic_events": f"events-{tag}",
        "topic_output": f"interests-{tag}",
        "state_dir": state_root / f"state-{tag}",
        "worker_web_port": 0,
        "metrics_port": 0,
        **overrides,
    }
    settings = Settings(_env_file=None, **fields)
    ensure_topics(settings, tables=(TABLE,))
    return settings


def key_partition(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner (murmur2), as used by the replay producer, Faust and the Java client."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def expected_states(events: Iterable[Event], settings: Settings) -> dict[bytes, UserState]:
    by_user: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        by_user[event.user_id].append(event)
    cfg = settings.session_config()
    return {user.encode(): state_from_events(evs, cfg) for user, evs in by_user.items()}


def assert_states(actual: Mapping[bytes, bytes], expected: Mapping[bytes, UserState], where: str) -> None:
    """Every user's decoded state equals the expected one, field for field; a readable message otherwise."""
    missing, extra = expected.keys() - actual.keys(), actual.keys() - expected.keys()
    assert not missing and not extra, f"{where}: {len(missing)} users missing {sorted(missing)[:5]}, extra {extra}"
    wrong = [k for k in expected if decode_state(actual[k]) != expected[k]]
    if wrong:
        k = wrong[0]
        raise AssertionError(
            f"{where}: {len(wrong)} of {len(expected)} users differ; e.g. {k!r}:\n"
            f"actual   {decode_state(actual[k])}\nexpected {expected[k]}"
        )


def changelog_complete(settings: Settings, expected: Mapping[bytes, UserState]) -> Callable[[], Changelog | None]:
    """A poll for `wait_for`: the changelog once it holds every expected user at its final `events_seen`."""

    def poll() -> Changelog | None:
        log = read_changelog(settings)
        seen = {k: decode_state(v).events_seen for k, v in log.values().items()}
        return log if all(seen.get(k) == s.events_seen for k, s in expected.items()) else None

    return poll


def process_all(settings: Settings, workers: list[Worker], expected: Mapping[bytes, UserState]) -> Changelog:
    """Wait until the workers committed the whole input and the changelog holds every final state."""
    wait_caught_up(settings, workers, timeout_s=600)
    return wait_for(changelog_complete(settings, expected), 120, "the changelog to hold every final state", 1.0)


def assert_healthy(worker: Worker) -> None:
    assert worker.alive, f"{worker.name} died:\n{worker.log_tail()}"
    assert worker.crash_lines() == [], f"{worker.name} logged crashes/restarts:\n" + "\n".join(worker.crash_lines())


def stop_cleanly(*workers: Worker) -> None:
    for worker in workers:
        assert worker.stop() == 0, f"{worker.name} did not stop cleanly:\n{worker.log_tail()}"
        assert not worker.killed


# --- (a) + (e): all MovieLens ratings through one worker -----------------------------------------------------


@dataclass
class MovieLensRun:
    settings: Settings
    expected: dict[bytes, UserState]
    changelog: Changelog
    rocksdb: dict[int, dict[bytes, bytes]]
    worker: Worker


@pytest.fixture(scope="module")
def movielens_run(broker, tmp_path_factory: pytest.TempPathFactory) -> MovieLensRun:
    """Replay all 100,836 ratings once through one worker; (a) and (e) both check the result."""
    from models.datasets import movielens_events
    from stream.local.broker import free_port
    from tests.fixtures.worker import Worker as _Worker
    from tests.fixtures.worker import settings_env

    root = tmp_path_factory.mktemp("movielens")
    settings = new_settings(broker.bootstrap, root)
    events = movielens_events()
    assert len(events) == 100_836
    expected = expected_states(events, settings)
    port = free_port()
    worker = _Worker("ml", settings, root / "ml.log", settings_env(settings, {"METRICS_PORT": str(port)}), port)
    try:
        worker.start()
        run_sync(publish(settings, mix_malformed(events), progress=False))
        changelog = process_all(settings, [worker], expected)
        assert_healthy(worker)
    finally:
        stop_cleanly(worker)
    return MovieLensRun(settings, expected, changelog, read_rocksdb(settings.state_dir), worker)


def test_a_movielens_state_equals_offline_sessionization(movielens_run: MovieLensRun) -> None:
    run = movielens_run
    assert len(run.expected) == 610
    assert_states(run.changelog.values(), run.expected, "changelog")
    assert_states(merge_partitions(run.rocksdb), run.expected, "RocksDB after stop")
    assert sum(s.events_seen for s in run.expected.values()) == 100_836


def test_e_every_state_is_in_its_own_keys_changelog_partition(movielens_run: MovieLensRun) -> None:
    run = movielens_run
    n = run.settings.topic_partitions
    wrong = [(p, off, k) for p, off, k, _ in run.changelog.records if p != key_partition(k, n)]
    assert wrong == [], f"{len(wrong)} changelog records outside their key's partition, e.g. {wrong[:5]}"
    assert {p for p, *_ in run.changelog.records} == set(range(n))  # the keys spread over every partition

    # ... which is the partition the user's events were in, and the RocksDB partition that holds the state
    event_partitions: dict[bytes, set[int]] = defaultdict(set)
    for r in read_topic(run.settings, run.settings.topic_events):
        event_partitions[r.key].add(r.partition)
    assert {k: {p} for k, (p, _) in run.changelog.latest.items()} == dict(event_partitions)
    in_rocksdb = {k: p for p, values in run.rocksdb.items() for k in values}
    assert in_rocksdb == {k: p for k, (p, _) in run.changelog.latest.items()}
