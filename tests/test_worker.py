"""The Faust worker end to end: real `interest-stream worker` processes against the real local broker.

What the issue's item 7 asks, each against the offline sessionization (`state_from_events`, the same pure
function training uses): (a) all MovieLens ratings, (b) restarts with and without the RocksDB files plus an
idempotent replay, (c) two workers in one group, (d) malformed input to the DLQ, (e) changelog partitions.
Only (a) replays the full data set; the others use small synthetic sets to keep the suite fast.
"""

from __future__ import annotations

import random
import shutil
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import msgspec
import pytest
from aiokafka.partitioner import murmur2

from core.schema import Event, encode_event
from core.sessions import UserState, state_from_events
from local.broker import changelog_topic, ensure_topics, run_sync
from local.process import free_port
from local.replay import publish
from local.synthetic import (
    MALFORMED_KINDS,
    in_envelopes,
    malformed_record,
    marker_of,
    mix_malformed,
    synthetic_events,
)
from local.worker import settings_env
from stream.settings import Settings
from tests.fixtures.worker import (
    TABLE,
    Changelog,
    Worker,
    end_offsets,
    merge_partitions,
    read_changelog,
    read_rocksdb,
    read_topic,
    state_of,
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
    """Every user's decoded state equals the expected one, field for field (the input offset aside: the offline
    fold has none); a readable message otherwise."""
    missing, extra = expected.keys() - actual.keys(), actual.keys() - expected.keys()
    assert not missing and not extra, f"{where}: {len(missing)} users missing {sorted(missing)[:5]}, extra {extra}"
    decoded = {k: replace(state_of(actual[k]), input_offset=-1) for k in expected}
    wrong = [k for k in expected if decoded[k] != expected[k]]
    if wrong:
        k = wrong[0]
        raise AssertionError(
            f"{where}: {len(wrong)} of {len(expected)} users differ; e.g. {k!r}:\n"
            f"actual   {decoded[k]}\nexpected {expected[k]}"
        )


def changelog_complete(settings: Settings, expected: Mapping[bytes, UserState]) -> Callable[[], Changelog | None]:
    """A poll for `wait_for`: the changelog once it holds every expected user at its final `events_seen`."""

    def poll() -> Changelog | None:
        log = read_changelog(settings)
        seen = {k: state_of(v).events_seen for k, v in log.values().items()}
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

    root = tmp_path_factory.mktemp("movielens")
    settings = new_settings(broker.bootstrap, root)
    events = movielens_events()
    assert len(events) == 100_836
    expected = expected_states(events, settings)
    port = free_port()
    worker = Worker(
        "movielens", settings, root / "movielens.log", settings_env(settings, {"METRICS_PORT": str(port)}), port
    )
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


# --- (b) restarts and an idempotent replay ----------------------------------------------------------------------


def test_b_restart_with_and_without_rocksdb_and_replay_are_idempotent(
    make_settings: Callable[..., Settings], start_worker: Callable[..., Worker]
) -> None:
    settings = make_settings(tables=(TABLE,), topic_partitions=4)
    valid = synthetic_events(300, 3_000, seed=21)
    messages = mix_malformed(valid)
    expected = expected_states(valid, settings)
    # every event stays retained (nothing evicted), so every replayed one must be recognised as a duplicate
    assert all(s.sessions_evicted == 0 and s.events_seen == len(s) for s in expected.values())

    first = start_worker(settings, name="first")
    run_sync(publish(settings, messages, progress=False))
    process_all(settings, [first], expected)
    assert_healthy(first)
    stop_cleanly(first)
    stored = read_rocksdb(settings.state_dir)
    assert_states(merge_partitions(stored), expected, "RocksDB after the first run")

    kept = start_worker(settings, name="kept")  # RocksDB files kept: reads the changelog from its stored offset
    stop_cleanly(kept)
    assert read_rocksdb(settings.state_dir) == stored

    shutil.rmtree(settings.state_dir)  # RocksDB files gone: the whole state comes back from the changelog
    restored = start_worker(settings, name="restored")
    assert "Restore complete" in restored.log_text()
    stop_cleanly(restored)
    assert read_rocksdb(settings.state_dir) == stored

    replayed = start_worker(settings, name="replayed")
    changelog_before = end_offsets(settings, changelog_topic(settings.app_id, TABLE))
    run_sync(publish(settings, messages, progress=False))
    wait_caught_up(settings, [replayed], timeout_s=300)
    duplicates = wait_for(
        lambda: replayed.metric("interest_duplicates_ignored_total") >= len(valid) and replayed,
        60,
        "the duplicate counter",
    ).metric("interest_duplicates_ignored_total")
    assert duplicates == len(valid)
    assert replayed.metric("interest_events_consumed_total") == 0
    assert replayed.metric("interest_events_rejected_total") == 0
    assert end_offsets(settings, changelog_topic(settings.app_id, TABLE)) == changelog_before  # no state written
    assert_healthy(replayed)
    stop_cleanly(replayed)
    assert read_rocksdb(settings.state_dir) == stored


# --- (c) two workers in one group ---------------------------------------------------------------------------------


def test_c_two_workers_split_the_partitions_and_hold_every_user_once(
    make_settings: Callable[..., Settings], start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    settings = make_settings(tables=(TABLE,))
    n, topic = settings.topic_partitions, settings.topic_events
    valid = synthetic_events(400, 4_000, seed=31)
    expected = expected_states(valid, settings)
    w1 = start_worker(settings.model_copy(update={"state_dir": tmp_path / "w1"}), name="w1")
    w2 = start_worker(settings.model_copy(update={"state_dir": tmp_path / "w2"}), name="w2")

    def settled() -> tuple[set[int], set[int]] | None:
        a1, a2 = w1.assignments(topic), w2.assignments(topic)
        if a1 and a2 and a1[-1] and a2[-1] and not a1[-1] & a2[-1] and a1[-1] | a2[-1] == set(range(n)):
            return a1[-1], a2[-1]
        return None

    own1, own2 = wait_for(settled, 120, "the group to split the input partitions between the two workers")
    run_sync(publish(settings, mix_malformed(valid), progress=False))
    process_all(settings, [w1, w2], expected)
    for worker in (w1, w2):
        assert_healthy(worker)
    assert (w1.assignments(topic)[-1], w2.assignments(topic)[-1]) == (own1, own2)  # no rebalance during the run
    stop_cleanly(w1, w2)

    files1, files2 = read_rocksdb(tmp_path / "w1"), read_rocksdb(tmp_path / "w2")
    active1 = merge_partitions({p: files1.get(p, {}) for p in own1})
    active2 = merge_partitions({p: files2.get(p, {}) for p in own2})
    assert active1 and active2, "each worker must hold some users"
    assert not active1.keys() & active2.keys(), "a user is active on both workers"
    assert_states({**active1, **active2}, expected, "the two workers' RocksDB files")
    # Any other file content is a standby copy (table_standby_replicas): still only keys of that partition.
    for files in (files1, files2):
        for p, values in files.items():
            assert all(key_partition(k, n) == p for k in values), f"a key outside its partition in {p}"


def test_a_backlog_longer_than_the_poll_interval_keeps_the_worker_in_its_group(
    make_settings: Callable[..., Settings], start_worker: Callable[..., Worker]
) -> None:
    """Regression: with Faust's unbounded max_poll_records, one poll handed the worker the whole prefetched
    backlog; working through it took longer than max_poll_interval, aiokafka left the group and the worker
    stalled for good (the 1M-event benchmark stopped after 1000 s). A 5 s interval makes it show in seconds."""
    settings = make_settings(tables=(TABLE,), worker_max_poll_interval_s=5.0)
    valid = synthetic_events(1_000, 120_000, seed=41)  # 15-40 s of work at 3-7k ev/s: well past 5 s
    expected = expected_states(valid, settings)
    run_sync(publish(settings, mix_malformed(valid), progress=False))  # the backlog is there before the worker
    worker = start_worker(settings, name="backlog")
    process_all(settings, [worker], expected)
    assert_healthy(worker)
    assert "LeaveGroup" not in worker.log_text(), "the worker left its group while working through the backlog"
    assert len(worker.assignments(settings.topic_events)) == 1, "the group rebalanced during the run"
    stop_cleanly(worker)


# --- (d) malformed messages -----------------------------------------------------------------------------------


def test_d_malformed_messages_go_to_the_dlq_and_leave_the_state_alone(
    make_settings: Callable[..., Settings], start_worker: Callable[..., Worker]
) -> None:
    settings = make_settings(tables=(TABLE,), topic_partitions=4)
    valid = synthetic_events(200, 3_000, seed=41)
    messages = mix_malformed(valid, count=1_000, seed=42)
    assert messages.malformed == 1_000 and set(messages.kinds) - {None} == set(MALFORMED_KINDS)
    expected = expected_states(valid, settings)

    worker = start_worker(settings)
    run_sync(publish(settings, messages, progress=False))
    changelog = process_all(settings, [worker], expected)
    assert_states(changelog.values(), expected, "changelog")

    sent = {marker_of(r.value): r for r in read_topic(settings, settings.topic_events) if marker_of(r.value)}
    assert len(sent) == 1_000
    dlq = wait_for(
        lambda: (records := read_topic(settings, settings.topic_dlq)) and len(records) >= 1_000 and records,
        60,
        "1,000 DLQ records",
    )
    assert len(dlq) == 1_000  # no valid event was dead-lettered
    reasons: dict[str, int] = defaultdict(int)
    for record in dlq:
        headers = {k: v.decode() for k, v in record.headers}
        marker = marker_of(record.value)
        assert marker in sent, f"DLQ record without a known marker: {record.value[:120]!r}"
        source, kind = sent.pop(marker), marker[len("bad-") :].rsplit("-", 1)[0]
        assert headers["dlq.reason"] == MALFORMED_KINDS[kind], (marker, headers)
        assert (record.key, record.value) == (source.key, source.value)  # original bytes, byte for byte
        assert headers["dlq.topic"] == settings.topic_events
        assert (headers["dlq.partition"], headers["dlq.offset"]) == (str(source.partition), str(source.offset))
        assert headers["dlq.detail"] and int(headers["dlq.time_ms"]) > 0
        reasons[headers["dlq.reason"]] += 1
    assert sent == {}  # every malformed message is in the DLQ exactly once

    assert {r: worker.metric("interest_events_rejected_total", reason=r) for r in reasons} == reasons
    assert worker.metric("interest_events_consumed_total") == len(valid)
    assert worker.metric("interest_messages_read_total") == len(messages)
    assert_healthy(worker)  # alive, and no agent crash or restart in its log
    stop_cleanly(worker)
    assert_states(merge_partitions(read_rocksdb(settings.state_dir)), expected, "RocksDB after stop")


def test_g_batch_envelopes_apply_like_single_events_and_dead_letter_each_bad_event_alone(
    make_settings: Callable[..., Settings], start_worker: Callable[..., Worker]
) -> None:
    """One user's events sent in batch envelopes of 1-8 (JSON arrays, as SDKs send them), with malformed events
    inside: the states equal the offline fold of the valid events, each bad event is in the DLQ once with its own
    bytes and its index, and an envelope that is not JSON at all is dead-lettered whole."""
    settings = make_settings(tables=(TABLE,), topic_partitions=4)
    valid = synthetic_events(100, 2_000, seed=61)
    expected = expected_states(valid, settings)
    rng = random.Random(62)
    kinds = [k for k in MALFORMED_KINDS if k not in ("invalid_json", "too_deep")]  # these break the envelope
    messages: list[tuple[bytes, bytes]] = []
    bad: dict[str, tuple[str, bytes, int]] = {}  # marker -> (reason, own bytes, index in its envelope)
    pending: dict[str, list[bytes]] = {}
    for n, event in enumerate(valid):
        events = pending.setdefault(event.user_id, [])
        if rng.random() < 0.1:
            kind = rng.choice(kinds)
            if kind == "key_mismatch":  # inside an envelope: an event of another user than the message key
                other = msgspec.structs.replace(event, user_id=f"not-{event.user_id}", event_id=f"bad-{kind}-{n}")
                raw = encode_event(other)
            else:
                raw = malformed_record(event, kind, n)[1]
            bad[marker_of(raw) or ""] = (MALFORMED_KINDS[kind], raw, len(events))
            events.append(raw)
        events.append(encode_event(event))
        if len(events) >= rng.randint(1, 8):
            messages.append((event.user_id.encode(), b"[" + b",".join(pending.pop(event.user_id)) + b"]"))
    messages += [(user.encode(), b"[" + b",".join(events) + b"]") for user, events in pending.items()]
    broken = b'[{"user_id":"u0001","event_id":"bad-broken-0",'
    messages.insert(len(messages) // 2, (b"u0001", broken))
    assert len(bad) >= 150 and len(messages) < len(valid) / 2

    worker = start_worker(settings)
    run_sync(publish(settings, messages, progress=False))
    changelog = process_all(settings, [worker], expected)
    assert_states(changelog.values(), expected, "changelog")
    dlq = wait_for(
        lambda: (records := read_topic(settings, settings.topic_dlq)) and len(records) >= len(bad) + 1 and records,
        60,
        "the DLQ records",
    )
    assert len(dlq) == len(bad) + 1, "each bad event once, and the broken envelope once"
    for record in dlq:
        headers = {k: v.decode() for k, v in record.headers}
        if record.value == broken:
            assert headers["dlq.reason"] == "invalid_json" and "dlq.index" not in headers
            continue
        reason, raw, index = bad.pop(marker_of(record.value) or "")
        assert (record.value, headers["dlq.reason"], headers["dlq.index"]) == (raw, reason, str(index))
    assert bad == {}
    assert worker.metric("interest_events_consumed_total") == len(valid)
    assert worker.metric("interest_messages_read_total") == len(messages), "an envelope is one message"
    assert_healthy(worker)
    stop_cleanly(worker)


async def _send_large(settings: Settings, messages: list[tuple[bytes, bytes]]) -> None:
    """Publish gzip-compressed (a 2 MB value fits the broker's limit only so) with ~4 MB requests allowed."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        **settings.kafka_client_kwargs(), acks="all", max_request_size=4 << 20, compression_type="gzip"
    )
    await producer.start()
    try:
        for key, value in messages:
            await producer.send_and_wait(settings.topic_events, value, key=key)
    finally:
        await producer.stop()


def test_f_oversized_messages_are_dead_lettered_once_and_block_no_partition(
    make_settings: Callable[..., Settings], start_worker: Callable[..., Worker]
) -> None:
    """A 2 MB message and a 1,040,000 B one (just under the broker's default limit) cannot be forwarded whole:
    each becomes one truncated DLQ record with its size, sha256, partition and offset; a garbage message in the
    same batches is dead-lettered once too; every valid event is applied and the group's lag returns to 0."""
    import hashlib

    settings = make_settings(tables=(TABLE,), topic_partitions=4)
    valid = synthetic_events(60, 1_200, seed=51)
    expected = expected_states(valid, settings)
    pad = b'{"user_id":"u0001","item_id":"1","event_type":"view","timestamp":1,"context":{"pad":"%s"}}'
    big = {b"2MB": pad % (b"x" * 2_000_000), b"1040000B": pad % (b"y" * (1_040_000 - len(pad % b"")))}
    assert len(big[b"1040000B"]) == 1_040_000
    messages = [(e.user_id.encode(), encode_event(e)) for e in valid]
    messages[300:300] = [(b"u0001", big[b"2MB"]), (b"u0002", b"not json")]
    messages[900:900] = [(b"u0003", big[b"1040000B"])]
    worker = start_worker(settings)
    run_sync(_send_large(settings, messages))
    changelog = process_all(settings, [worker], expected)
    assert_states(changelog.values(), expected, "changelog")
    wait_caught_up(settings, [worker], timeout_s=120)

    dlq = read_topic(settings, settings.topic_dlq)
    sent = {r.offset: r for r in read_topic(settings, settings.topic_events) if r.key in (b"u0001", b"u0002", b"u0003")}
    by_size = {}
    for record in dlq:
        headers = {k: v.decode() for k, v in record.headers}
        source = sent[int(headers["dlq.offset"])]
        assert str(source.partition) == headers["dlq.partition"]
        assert headers["dlq.original_bytes"] == str(len(source.value))
        assert headers["dlq.sha256"] == hashlib.sha256(source.value).hexdigest()
        assert source.value.startswith(record.value) and len(record.value) <= settings.dlq_max_value_bytes
        by_size[len(source.value)] = headers
    assert len(dlq) == 3, "each rejected message exactly once"
    assert by_size[2_000_000 + len(pad % b"")]["dlq.reason"] == "too_large"
    assert by_size[1_040_000]["dlq.reason"] == "too_large" and by_size[1_040_000]["dlq.truncated"] == "1"
    assert by_size[len(b"not json")]["dlq.reason"] == "invalid_json" and "dlq.truncated" not in by_size[8]
    assert worker.metric("interest_events_consumed_total") == len(valid)
    assert_healthy(worker)
    stop_cleanly(worker)


# --- (h) + (i): a message that fails the step by itself; a stop with a batch stuck forever (issue 24) ----------


def test_h_a_message_that_fails_the_step_alone_is_dead_lettered_once_and_the_rest_applied(
    make_settings: Callable[..., Settings], start_worker: Callable[..., Worker]
) -> None:
    """A fault injected for one message (local/faults.py `FAULT_POISON_ITEM`: folding it raises): that message
    goes to the DLQ once with reason `internal` and the exception, every other user's state is exact, and the
    group commits the whole input (lag 0)."""
    settings = make_settings(tables=(TABLE,), topic_partitions=4)
    valid = synthetic_events(100, 1_500, seed=71)
    victim = valid[700]
    poison = msgspec.structs.replace(victim, item_id="poison-item", event_id="poison-0")
    messages = [(e.user_id.encode(), encode_event(e)) for e in valid]
    messages.insert(701, (poison.user_id.encode(), encode_event(poison)))
    expected = expected_states(valid, settings)

    worker = start_worker(settings, env={"FAULT_POISON_ITEM": "poison-item"})
    run_sync(publish(settings, messages, progress=False))
    changelog = process_all(settings, [worker], expected)  # lag 0: every offset committed
    assert_states(changelog.values(), expected, "changelog")
    dlq = wait_for(lambda: read_topic(settings, settings.topic_dlq), 60, "the DLQ record")
    ((record),) = dlq
    headers = {k: v.decode() for k, v in record.headers}
    assert (record.key, record.value) == (poison.user_id.encode(), encode_event(poison))
    assert headers["dlq.reason"] == "internal" and "fault injection" in headers["dlq.exception"]
    assert worker.metric("interest_messages_isolated_total") == 1
    assert worker.metric("interest_events_rejected_total", reason="internal") == 1
    worker.check_alive()
    stop_cleanly(worker)


@pytest.mark.parametrize("hang", ["await", "block"])
def test_i_sigterm_ends_a_worker_whose_batch_never_finishes_within_its_deadline(
    hang: str, make_settings: Callable[..., Settings], start_worker: Callable[..., Worker]
) -> None:
    """`FAULT_HANG`: the first batch awaits forever (`await`) or holds the event loop (`block`). SIGTERM still
    ends the process by the shutdown deadline: exit code 1 (not a clean stop), every thread's stack in its log,
    and no SIGKILL needed."""
    deadline_s = 5
    settings = make_settings(tables=(TABLE,), topic_partitions=2, worker_shutdown_deadline_s=deadline_s)
    worker = start_worker(settings, env={"FAULT_HANG": hang})
    run_sync(publish(settings, [(b"u1", encode_event(synthetic_events(1, 1, seed=3)[0]))], progress=False))
    wait_for(lambda: "hangs forever" in worker.log_text(), 60, "the batch to hang")
    code = worker.stop(timeout_s=deadline_s + 25)  # SIGTERM; SIGKILL only if the deadline did not end it
    assert not worker.killed and code == 1, f"exit code {code}:\n{worker.log_tail()}"
    log = worker.log_text()
    assert f"worker shutdown still running after {deadline_s} s" in log
    assert "Thread 0x" in log and "File " in log, "faulthandler's stack dump"


# --- (j) the input topic recreated under kept changelogs (issue 25, item 3) ----------------------------------------


def test_j_a_recreated_input_topic_is_detected_and_its_new_events_applied(
    make_settings: Callable[..., Settings], start_worker: Callable[..., Worker]
) -> None:
    """Ops recreate the events topic (or mirror it to a new cluster) while the workers' changelogs and the group's
    committed offsets stay: offsets restart at 0, below every state's replay witness. The new events are newer than
    anything folded and were never seen, so they are applied, not swallowed as replays, and the worker says so."""
    settings = make_settings(tables=(TABLE,), topic_partitions=2)
    before, after = events_around_a_recreation(seed=41)
    recreate_between_runs(settings, start_worker, before, after)
    a_new_worker_applies_the_new_events(settings, start_worker, before, after)


def test_k_a_topic_recreated_under_a_running_worker_restarts_it_and_loses_nothing(
    make_settings: Callable[..., Settings], start_worker: Callable[..., Worker]
) -> None:
    """The same recreation while the worker runs. aiokafka finds its position out of range and resets it to the
    start; Faust alone then dropped every new event below the old read offset, saying nothing (the changelog
    never got them). The worker now sees the log go back, commits the partition at 0 and stops with an error;
    started again, as its supervisor does, it applies the new events (stream/consumer.py)."""
    settings = make_settings(tables=(TABLE,), topic_partitions=2)
    before, after = events_around_a_recreation(seed=43)
    first = start_worker(settings, name="first")
    run_sync(publish(settings, in_envelopes(before, 1), progress=False))
    process_all(settings, [first], expected_states(before, settings))
    run_sync(recreate_topic(settings))
    run_sync(publish(settings, in_envelopes(after, 1), progress=False))
    wait_for(lambda: not first.alive, 300, "the worker to stop on seeing its events log go back")
    assert "fetched after offset" in first.log_text(), first.log_tail()
    assert first.process is not None and first.process.returncode != 0, "it stops as a crash, for its supervisor"
    a_new_worker_applies_the_new_events(settings, start_worker, before, after)


def test_l_a_recreated_topic_longer_than_the_old_offsets_is_read_from_its_start(
    make_settings: Callable[..., Settings], start_worker: Callable[..., Worker]
) -> None:
    """The recreated topic already holds more records than the group's old committed offsets when a worker starts:
    nothing looks out of range. Apache Kafka's group coordinator deletes a deleted topic's committed offsets
    (`GroupCoordinator.onPartitionsDeleted`, called from the broker's metadata publisher), so the group has nothing
    committed for the new topic and the worker reads it from its start (auto_offset_reset=earliest); noida-db keeps
    the old offsets, so the test deletes them as Kafka would (commits 0). Every new event is applied."""
    settings = make_settings(tables=(TABLE,), topic_partitions=2)
    before, after = events_around_a_recreation(seed=47, later=1200)
    recreate_between_runs(settings, start_worker, before, after)
    ends = end_offsets(settings, settings.topic_events)
    committed = run_sync(forget_committed_offsets(settings))
    assert all(ends[p] > committed[p] > 0 for p in committed), (ends, committed)  # the case: longer than the old
    a_new_worker_applies_the_new_events(settings, start_worker, before, after)


def recreate_between_runs(
    settings: Settings, start_worker: Callable[..., Worker], before: list[Event], after: list[Event]
) -> None:
    """A worker folds `before` and stops cleanly; then the events topic is recreated and `after` published to it."""
    first = start_worker(settings, name="first")
    run_sync(publish(settings, in_envelopes(before, 1), progress=False))
    process_all(settings, [first], expected_states(before, settings))
    stop_cleanly(first)
    run_sync(recreate_topic(settings))
    run_sync(publish(settings, in_envelopes(after, 1), progress=False))


async def forget_committed_offsets(settings: Settings) -> dict[int, int]:
    """What Apache Kafka does to a deleted topic's committed offsets (noida-db keeps them): the group's offsets of
    the events partitions are set to 0, the start of a log that never lost its head. Returns the old ones."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(**settings.kafka_client_kwargs(), group_id=settings.app_id, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(settings.topic_events, p) for p in range(settings.topic_partitions)]
        consumer.assign(tps)
        old = {tp.partition: await consumer.committed(tp) for tp in tps}
        await consumer.commit(dict.fromkeys(tps, 0))
        return old
    finally:
        await consumer.stop()


async def recreate_topic(settings: Settings) -> None:
    """Delete the events topic and create it again with the same partitions (its offsets start at 0)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(**settings.kafka_client_kwargs())
    await admin.start()
    try:
        await admin.delete_topics([settings.topic_events])
        await admin.create_topics([NewTopic(settings.topic_events, settings.topic_partitions, 1)])
    finally:
        await admin.close()


def events_around_a_recreation(seed: int, later: int = 200) -> tuple[list[Event], list[Event]]:
    """600 events, then `later` a day later with ids of their own (the new topic's). 200: fewer, so that every
    partition's new offsets end below its old ones."""
    before = synthetic_events(50, 600, seed=seed)
    events = synthetic_events(50, later, seed=seed + 1, start_ms=max(e.timestamp for e in before) + 86_400_000)
    return before, [msgspec.structs.replace(e, event_id=f"{e.event_id}-new") for e in events]


def a_new_worker_applies_the_new_events(
    settings: Settings, start_worker: Callable[..., Worker], before: list[Event], after: list[Event]
) -> None:
    """A worker started after the recreation ends with every event of both topics applied, says the offsets
    restarted, and dead-letters nothing."""
    expected = expected_states([*before, *after], settings)
    second = start_worker(settings, name="second")
    wait_for(changelog_complete(settings, expected), 300, "the changelog to hold the new events", 1.0)
    restarted = second.metric("interest_input_offsets_restarted_total")
    assert_healthy(second)
    stop_cleanly(second)
    assert_states(merge_partitions(read_rocksdb(settings.state_dir)), expected, "RocksDB after the recreation")
    assert restarted > 0, "the restart of the offsets is reported (interest_input_offsets_restarted_total)"
    assert read_topic(settings, settings.topic_dlq) == [], "no valid event dead-lettered"
