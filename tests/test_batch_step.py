"""The agent's batch step without a broker: plain dicts as tables, fake topics and a fake model."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from unittest.mock import AsyncMock, patch

import pytest

from core.schema import Event, Forget, encode_event
from core.sessions import UserState, decode_state, encode_state
from stream.inference import TritonUnavailable
from stream.settings import Settings
from stream.step import BatchStep
from stream.tables import UserValue, Write

T0 = 1_700_000_000_000
WRITES: list[tuple[str, bytes]] = []  # every table write and topic send of the fakes, in order


@dataclass
class Message:
    key: bytes
    value: bytes | None
    topic: str = "events"
    partition: int = 0
    offset: int = 0
    timestamp: float = 0.0


@dataclass
class FakeEvent:
    message: Message


@dataclass
class FakeTopic:
    sent: list[tuple[bytes, bytes | None, dict[str, bytes]]] = field(default_factory=list)

    async def send(self, *, key: bytes, value: bytes | None, headers: Any = None) -> asyncio.Future[None]:
        self.sent.append((key, value, dict(headers or [])))
        WRITES.append(("topic", key))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


@dataclass
class DictTables:
    """The user table as a dict; `states` and `records` are views of it for the assertions."""

    values: dict[bytes, UserValue] = field(default_factory=dict)
    deleted: list[bytes] = field(default_factory=list)
    partitions: dict[bytes, int] = field(default_factory=dict)  # the partition each key was written in

    def get(self, partition: int, key: bytes) -> UserValue | None:
        assert self.partitions.get(key, partition) == partition, f"{key!r} read from another partition"
        return self.values.get(key)

    async def write(self, writes: Sequence[Write]) -> None:
        for w in writes:
            WRITES.append(("table", w.key))
            self.partitions[w.key] = w.partition
            if w.value is None:
                self.deleted.append(w.key)
                self.values.pop(w.key, None)
            else:
                self.values[w.key] = w.value

    @property
    def states(self) -> dict[bytes, bytes]:
        return {k: v.state for k, v in self.values.items()}

    @property
    def records(self) -> dict[bytes, bytes]:
        return {k: v.record for k, v in self.values.items() if v.record is not None}


@dataclass
class FakeModel:
    """Records are JSON of what the model saw; `fail` failures come first."""

    fail: int = 0
    calls: list[list[str]] = field(default_factory=list)
    breaker_open: bool = False
    problem: str = ""

    async def records(self, users: list[str], states: list[UserState]) -> list[bytes]:
        self.calls.append(users)
        if self.fail:
            self.fail -= 1
            raise TritonUnavailable("UNAVAILABLE: Triton down")
        rows = zip(users, states, strict=True)
        return [json.dumps({"user": u, "seq": s.seq, "events": s.events_seen}).encode() for u, s in rows]


def message(user: str, i: int, offset: int, **kw: Any) -> FakeEvent:
    event = Event(user_id=user, item_id=f"i{i}", event_type="view", timestamp=T0 + i * 1000, event_id=f"{user}-{i}")
    return FakeEvent(Message(user.encode(), encode_event(event), offset=offset, **kw))


def forget(user: str, offset: int, key: str | None = None) -> FakeEvent:
    value = encode_event(Forget(user_id=user, event_type="forget", timestamp=T0))
    return FakeEvent(Message((key or user).encode(), value, offset=offset))


def make_step(model: FakeModel | None, **settings: Any) -> tuple[BatchStep, DictTables, FakeTopic, FakeTopic]:
    tables, dlq, output = DictTables(), FakeTopic(), FakeTopic()
    step = BatchStep(Settings(_env_file=None, **settings), tables, dlq, output, model)  # type: ignore[arg-type]
    return step, tables, dlq, output


def test_batch_infers_once_then_stores_then_publishes() -> None:
    """One inference for the batch; every value written (changelog acknowledged, then RocksDB) before any of its
    records reaches the output topic: `WRITES` is the ordered log of both."""
    model = FakeModel()
    step, tables, dlq, output = make_step(model)
    WRITES.clear()
    batch = [message("a", 1, 0), message("b", 1, 1), message("a", 2, 2)]
    asyncio.run(step.process(batch))
    assert model.calls == [["a", "b"]], "one inference request for every changed user of the batch"
    assert WRITES == [("table", b"a"), ("table", b"b"), ("topic", b"a"), ("topic", b"b")], "stored, then published"
    assert [json.loads(v) for _, v, _ in output.sent] == [
        {"user": "a", "seq": 1, "events": 2},
        {"user": "b", "seq": 1, "events": 1},
    ]
    assert decode_state(tables.states[b"a"]).seq == 1 and not decode_state(tables.states[b"a"]).dirty
    assert tables.records[b"b"] == output.sent[1][1]
    assert dlq.sent == []


def test_bad_input_goes_to_the_dlq_and_the_rest_is_applied() -> None:
    step, tables, dlq, output = make_step(FakeModel())
    batch = [message("a", 1, 0), FakeEvent(Message(b"a", b"{not json", offset=7)), message("b", 1, 8)]
    asyncio.run(step.process(batch))
    ((key, value, headers),) = dlq.sent
    assert (key, value, headers["dlq.reason"], headers["dlq.offset"]) == (b"a", b"{not json", b"invalid_json", b"7")
    assert len(output.sent) == 2 and set(tables.states) == {b"a", b"b"}


def test_an_oversized_message_is_dead_lettered_truncated_with_its_identity() -> None:
    step, _, dlq, _ = make_step(FakeModel(), dlq_max_value_bytes=4096)
    big = b"x" * 2_000_000
    asyncio.run(step.process([FakeEvent(Message(b"a", big, partition=3, offset=11))]))
    ((_, value, headers),) = dlq.sent
    assert value == big[:4096] and headers["dlq.truncated"] == b"1" and headers["dlq.reason"] == b"too_large"
    assert headers["dlq.original_bytes"] == b"2000000" and headers["dlq.partition"] == b"3"
    assert headers["dlq.sha256"] == hashlib.sha256(big).hexdigest().encode()


def test_a_retried_batch_dead_letters_each_message_once() -> None:
    model = FakeModel(fail=2)
    step, _, dlq, output = make_step(model)
    batch = [FakeEvent(Message(b"a", b"garbage", offset=0)), message("a", 1, 1)]
    step.sleep = AsyncMock()
    asyncio.run(step.process_until_done(batch))
    assert len(model.calls) == 3 and len(output.sent) == 1
    assert [h["dlq.offset"] for _, _, h in dlq.sent] == [b"0"], "three attempts, one DLQ record"


def test_a_replay_republishes_the_stored_record_once_byte_for_byte() -> None:
    """A crash after the state was stored but before (or after) the publish: the same input comes again. The
    stored record goes out again once per process, however many batches the re-read input spans."""
    model = FakeModel()
    step, tables, _, output = make_step(model)
    batch = [message("a", 1, 0), message("a", 2, 1)]
    asyncio.run(step.process(batch))
    stored = dict(tables.states)
    asyncio.run(step.process(batch))  # the replay
    assert tables.states == stored and len(model.calls) == 1, "a replay neither folds nor infers again"
    assert [v for _, v, _ in output.sent] == [tables.records[b"a"]] * 2
    asyncio.run(step.process([*batch, message("a", 3, 2)]))  # replayed again, plus one new event: only seq 2
    assert [json.loads(v)["seq"] for _, v, _ in output.sent] == [1, 1, 2], "no seq skipped, none reordered"
    assert json.loads(output.sent[-1][1]) == {"user": "a", "seq": 2, "events": 3}
    restarted = BatchStep(Settings(_env_file=None), tables, FakeTopic(), output, model)  # type: ignore[arg-type]
    for _ in range(3):  # a new process reads the input again: one more copy of the latest record, not three
        asyncio.run(restarted.process([*batch, message("a", 3, 2)]))
    assert [json.loads(v)["seq"] for _, v, _ in output.sent] == [1, 1, 2, 2]
    assert output.sent[-1][1] == output.sent[-2][1] == tables.records[b"a"], "byte for byte"


def test_a_partition_that_comes_back_republishes_a_newer_stored_record_it_had_republished_an_older_one_of() -> None:
    """Worker 1 republished user a's seq 1; a's partition moved to worker 2, which stored seq 2 and was killed
    before publishing it; the partition comes back to worker 1 and the input is read again: seq 2 goes out (it
    was never published; a once-per-user rule kept it back: the seq gap of scale-out test b)."""
    model = FakeModel()
    w1, tables, _, output = make_step(model)
    first = [message("a", 1, 0)]
    asyncio.run(w1.process(first))
    asyncio.run(w1.process(first))  # a replay: seq 1 republished
    killed_before_publish = FakeTopic()
    w2 = BatchStep(Settings(_env_file=None), tables, FakeTopic(), killed_before_publish, model)  # type: ignore[arg-type]
    asyncio.run(w2.process([*first, message("a", 2, 1)]))
    asyncio.run(w1.process([*first, message("a", 2, 1)]))  # back on worker 1: all replays
    assert [json.loads(v)["seq"] for _, v, _ in output.sent] == [1, 1, 2]
    assert output.sent[-1][1] == tables.records[b"a"]


def test_health_degrades_while_a_batch_fails_or_stalls() -> None:
    model = FakeModel(fail=1)
    step, *_ = make_step(model, health_stall_s=0.05)
    assert step.health()["status"] == "ok"
    seen: list[dict[str, Any]] = []

    async def run() -> None:
        retry_waits, release = asyncio.Event(), asyncio.Event()

        async def back_off(seconds: float) -> None:  # the retry's back-off, held until the health was read
            retry_waits.set()
            await release.wait()

        step.sleep = back_off
        task = asyncio.create_task(step.process_until_done([message("a", 1, 0)]))
        await retry_waits.wait()  # the first attempt failed
        await asyncio.sleep(0.06)  # in flight longer than HEALTH_STALL_S (a loaded box only waits longer)
        seen.append(step.health())
        release.set()
        await task
        seen.append(step.health())

    asyncio.run(run())
    assert seen[0]["status"] == "degraded" and any("failing" in p for p in seen[0]["problems"])
    assert any("in flight" in p for p in seen[0]["problems"])
    assert seen[1]["status"] == "ok"


def test_a_failed_inference_stores_nothing_and_is_retried() -> None:
    model = FakeModel(fail=1)
    step, tables, _, output = make_step(model)
    batch = [message("a", 1, 0)]
    with pytest.raises(TritonUnavailable):
        asyncio.run(step.process(batch))
    assert tables.states == {} and output.sent == [], "no state moves forward without its record"
    asyncio.run(step.process_until_done(batch))  # the retry loop: the second attempt succeeds
    assert len(model.calls) == 2 and decode_state(tables.states[b"a"]).seq == 1 and len(output.sent) == 1


def test_ingest_only_stores_state_without_publishing() -> None:
    step, tables, _, output = make_step(None)
    asyncio.run(step.process([message("a", 1, 0), message("a", 2, 1)]))
    state = decode_state(tables.states[b"a"])
    assert (state.events_seen, state.seq, state.dirty) == (2, 0, True)  # dirty: published once inference is on
    assert output.sent == [] and tables.records == {}


def log_stages(step: BatchStep) -> None:
    """Fault points go into `WRITES` too: the test sees which writes a kill at each point would come after."""
    step.on_stage = lambda point, published: WRITES.append(("stage", f"{point} {published}".encode()))
    WRITES.clear()


def test_stages_are_reported_between_the_writes_they_name() -> None:
    """A kill (or freeze) at `before_changelog` must find nothing written; at `before_publish`, every value stored
    and nothing published; at `after_publish`, every record sent (local/faults.py acts there): the stages are
    checked in the ordered log of the writes."""
    step, *_ = make_step(FakeModel())
    log_stages(step)
    asyncio.run(step.process([message("a", 1, 0), message("b", 1, 1)]))
    assert WRITES == [
        ("stage", b"before_changelog 0"),
        ("table", b"a"),
        ("table", b"b"),
        ("stage", b"before_publish 0"),
        ("topic", b"a"),
        ("topic", b"b"),
        ("stage", b"after_publish 2"),
    ]


def test_a_forget_erases_the_user_and_later_events_start_a_fresh_history() -> None:
    """[e1, e2, forget, e3] of one user in one batch: e1 and e2 are never folded (erased anyway), the tables are
    deleted, the output gets a tombstone and then e3's record, which starts again at seq 1 with one event."""
    model = FakeModel()
    step, tables, dlq, output = make_step(model)
    asyncio.run(step.process([message("a", 0, 0), message("b", 0, 1)]))
    batch = [message("a", 1, 2), message("a", 2, 3), forget("a", 4), message("b", 1, 5), message("a", 3, 6)]
    asyncio.run(step.process(batch))
    assert tables.deleted == [b"a"] and dlq.sent == []
    assert [(k, v and json.loads(v)) for k, v, _ in output.sent[2:]] == [
        (b"a", None),  # the tombstone first, then the fresh history
        (b"a", {"user": "a", "seq": 1, "events": 1}),
        (b"b", {"user": "b", "seq": 2, "events": 2}),
    ]
    fresh = decode_state(tables.states[b"a"])
    assert (fresh.seq, fresh.events_seen, fresh.items, fresh.input_offset) == (1, 1, ("i3",), 6)
    assert json.loads(tables.records[b"a"]) == {"user": "a", "seq": 1, "events": 1}
    assert decode_state(tables.states[b"b"]).events_seen == 2, "other users are untouched"

    stored, records, sent = dict(tables.states), dict(tables.records), len(output.sent)
    asyncio.run(step.process(batch))  # the same input after a crash: the forget is a replay
    assert tables.deleted == [b"a"], "a replayed forget must not erase the fresh history after it"
    assert tables.states == stored and tables.records == records
    assert [v for _, v, _ in output.sent[sent:]] == [records[b"a"], records[b"b"]], "stored records republished"


def test_a_forget_runs_again_when_no_newer_state_exists_and_without_events_after_it() -> None:
    """A crash between the deletion and the output tombstone leaves no state: the forget read again runs again, so
    the tombstone is published (again). A user with no state at all is forgotten as a no-op plus a tombstone."""
    step, tables, _, output = make_step(FakeModel())
    asyncio.run(step.process([message("a", 1, 0)]))
    asyncio.run(step.process([message("a", 2, 1), forget("a", 2)]))
    asyncio.run(step.process([message("a", 2, 1), forget("a", 2)]))  # the replay: nothing newer stored
    asyncio.run(step.process([forget("nobody", 3)]))
    assert tables.states == {} and tables.records == {}
    assert [(k, v) for k, v, _ in output.sent[1:]] == [(b"a", None), (b"a", None), (b"nobody", None)]
    assert tables.deleted == [b"a", b"a", b"nobody"]


def test_a_retried_batch_executes_its_forget_once_and_a_forget_with_another_key_is_dead_lettered() -> None:
    model = FakeModel(fail=1)
    step, tables, dlq, output = make_step(model)
    batch = [forget("a", 0), message("a", 1, 1), forget("b", 2, key="c")]
    step.sleep = AsyncMock()
    asyncio.run(step.process_until_done(batch))  # inference fails once, after the forget was executed
    assert tables.deleted == [b"a"] and [(k, v is None) for k, v, _ in output.sent] == [(b"a", True), (b"a", False)]
    assert [h["dlq.reason"] for _, _, h in dlq.sent] == [b"key_mismatch"]


def test_the_erasure_stage_is_reported_after_the_deletion_and_before_the_tombstone() -> None:
    step, *_ = make_step(FakeModel())
    log_stages(step)
    asyncio.run(step.process([message("a", 1, 0), forget("a", 1), message("a", 2, 2)]))
    assert WRITES == [
        ("table", b"a"),  # the deletion
        ("stage", b"after_forget_tables 0"),
        ("topic", b"a"),  # the tombstone
        ("stage", b"before_changelog 0"),
        ("table", b"a"),  # the fresh history after the forget
        ("stage", b"before_publish 0"),
        ("topic", b"a"),
        ("stage", b"after_publish 1"),
    ]


def envelope(user: str, raws: list[bytes], offset: int) -> FakeEvent:
    return FakeEvent(Message(user.encode(), b"[" + b",".join(raws) + b"]", partition=2, offset=offset))


def raw_event(user: str, i: int, *, t: int | None = None) -> bytes:
    ts = T0 + i * 1000 if t is None else t
    return encode_event(Event(user_id=user, item_id=f"i{i}", event_type="view", timestamp=ts, event_id=f"{user}-{i}"))


def test_an_envelope_folds_like_its_events_sent_one_by_one_and_dead_letters_a_bad_event_alone() -> None:
    bad = b'{"user_id":"a","item_id":"i9","event_type":"view","timestamp":"soon"}'
    step, tables, dlq, output = make_step(FakeModel())
    asyncio.run(step.process([envelope("a", [raw_event("a", 1), bad, raw_event("a", 2)], 5), message("b", 1, 6)]))
    alone, single_tables, _, _ = make_step(FakeModel())
    asyncio.run(alone.process([message("a", 1, 3), message("a", 2, 5), message("b", 1, 6)]))
    assert tables.states == single_tables.states, "same state (offset 5 held) as the two valid events alone"
    ((key, value, headers),) = dlq.sent
    assert (key, value, headers["dlq.reason"]) == (b"a", bad, b"schema"), "the bad event's own bytes"
    assert (headers["dlq.offset"], headers["dlq.index"], headers["dlq.partition"]) == (b"5", b"1", b"2")
    assert headers["dlq.sha256"] == hashlib.sha256(bad).hexdigest().encode()
    assert [json.loads(v)["events"] for _, v, _ in output.sent] == [2, 1], "one record per user, both events in"


def test_a_late_event_in_an_envelope_is_dead_lettered_alone_once_across_retries_and_replays() -> None:
    late = raw_event("a", 3, t=T0 - 5 * 3_600_000)  # 5 h before the user's latest: beyond the lateness
    model = FakeModel(fail=1)
    step, tables, dlq, output = make_step(model)
    batch = [envelope("a", [raw_event("a", 1), late, raw_event("a", 2)], 0)]
    step.sleep = AsyncMock()
    asyncio.run(step.process_until_done(batch))  # the first attempt fails at inference and is retried
    ((_, value, headers),) = dlq.sent
    assert (value, headers["dlq.reason"], headers["dlq.index"]) == (late, b"late", b"1")
    stored = dict(tables.states)
    asyncio.run(step.process(batch))  # read again after a crash: every event of the envelope is a replay
    assert tables.states == stored and len(dlq.sent) == 1 and len(model.calls) == 2
    assert decode_state(stored[b"a"]).events_seen == 2 and len(output.sent) == 2, "published, then republished"


# --- No message can fail its batch (issue 24): an outage is retried, a message that fails alone is isolated.


def poisoned(item: str, error: type[Exception] = ValueError) -> Any:
    """`apply_events` that raises for any event of `item`: a bug only one message triggers (injected here, in the
    test; production code has no such hook)."""
    from core.sessions import apply_events

    def fold(state: UserState, events: Any, cfg: Any, offsets: Any = None) -> Any:
        events = list(events)
        if any(e.item_id == item for e in events):
            raise error(f"injected fault for {item}")
        return apply_events(state, events, cfg, offsets)

    return patch("stream.step.apply_events", fold)


def test_a_message_that_fails_the_step_by_itself_is_dead_lettered_once_and_the_rest_is_applied() -> None:
    step, tables, dlq, output = make_step(FakeModel())
    step.sleep = AsyncMock()
    bad = Event(user_id="c", item_id="poison", event_type="view", timestamp=T0)
    poison = FakeEvent(Message(b"c", encode_event(bad), offset=2))
    batch = [message("a", 1, 0), message("b", 1, 1), poison, message("a", 2, 3), message("d", 1, 4)]
    with poisoned("poison"):
        asyncio.run(step.process_until_done(batch))
    ((key, value, headers),) = dlq.sent
    assert (key, value, headers["dlq.reason"], headers["dlq.offset"]) == (b"c", poison.message.value, b"internal", b"2")
    assert b"ValueError: injected fault for poison" in headers["dlq.exception"]
    assert b"injected fault" in headers["dlq.detail"]
    assert {k: decode_state(v).events_seen for k, v in tables.states.items()} == {b"a": 2, b"b": 1, b"d": 1}
    published = [(k, json.loads(v)["seq"]) for k, v, _ in output.sent]
    assert sorted(published) == [(b"a", 1), (b"a", 2), (b"b", 1), (b"d", 1)], "each user's seqs once, in order"
    assert step.health()["status"] == "ok"


def test_an_outage_is_retried_as_it_is_and_never_isolates_a_message() -> None:
    model = FakeModel(fail=7)  # TritonUnavailable seven times: more than the two tries before isolating
    step, tables, dlq, output = make_step(model)
    step.sleep = AsyncMock()
    asyncio.run(step.process_until_done([message("a", 1, 0), message("b", 1, 1)]))
    assert dlq.sent == [] and len(model.calls) == 8 and all(call == ["a", "b"] for call in model.calls)
    assert len(output.sent) == 2 and set(tables.states) == {b"a", b"b"}


def test_when_every_message_fails_alone_none_is_dead_lettered_and_the_batch_is_retried() -> None:
    """The model breaking for everyone (not an outage type) must not empty the batch into the DLQ."""
    model = FakeModel()
    step, tables, dlq, output = make_step(model)
    rounds = {"left": 9}  # fails nine calls, whatever the users: several isolation rounds, then healthy
    records = model.records

    async def flaky(users: list[str], states: list[UserState]) -> list[bytes]:
        if rounds["left"]:
            rounds["left"] -= 1
            raise ValueError("the model returned nothing usable")
        return await records(users, states)

    model.records = flaky  # type: ignore[method-assign]
    step.sleep = AsyncMock()
    asyncio.run(step.process_until_done([message("a", 1, 0), message("b", 1, 1)]))
    assert dlq.sent == [] and set(tables.states) == {b"a", b"b"} and len(output.sent) == 2


def test_a_state_this_process_wrote_is_not_decoded_again_unless_its_stored_bytes_changed() -> None:
    step, tables, _, _ = make_step(FakeModel())
    asyncio.run(step.process([message("a", 1, 0)]))
    with patch("stream.step.decode_state", side_effect=decode_state) as decode:
        asyncio.run(step.process([message("a", 2, 1)]))
        assert decode.call_count == 0, "the bytes it wrote for a: the state it encoded them from"
        stored = tables.values[b"a"]  # another writer (a restore, another owner) left other bytes for a
        other = UserValue(encode_state(replace(decode_state(stored.state), events_seen=41)), stored.record)
        tables.values[b"a"] = other
        asyncio.run(step.process([message("a", 3, 2)]))
        assert decode.call_count == 1 and decode_state(tables.states[b"a"]).events_seen == 42
