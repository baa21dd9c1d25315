"""The agent's batch step without a broker: plain dicts as tables, fake topics and a fake model."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from core.schema import Event, encode_event
from core.sessions import UserState, decode_state
from stream.app import BatchStep
from stream.settings import Settings

T0 = 1_700_000_000_000


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
    sent: list[tuple[bytes, bytes, dict[str, bytes]]] = field(default_factory=list)

    async def send(self, *, key: bytes, value: bytes, headers: Any = None) -> asyncio.Future[None]:
        self.sent.append((key, value, dict(headers or [])))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


@dataclass
class FakeModel:
    """Records are JSON of what the model saw; `fail` failures come first."""

    fail: int = 0
    calls: list[list[str]] = field(default_factory=list)
    breaker_open: bool = False

    async def records(self, users: list[str], states: list[UserState]) -> list[bytes]:
        self.calls.append(users)
        if self.fail:
            self.fail -= 1
            raise RuntimeError("Triton down")
        rows = zip(users, states, strict=True)
        return [json.dumps({"user": u, "seq": s.seq, "events": s.events_seen}).encode() for u, s in rows]


def message(user: str, i: int, offset: int, **kw: Any) -> FakeEvent:
    event = Event(user_id=user, item_id=f"i{i}", event_type="view", timestamp=T0 + i * 1000, event_id=f"{user}-{i}")
    return FakeEvent(Message(user.encode(), encode_event(event), offset=offset, **kw))


def make_step(
    model: FakeModel | None,
) -> tuple[BatchStep, dict[bytes, bytes], dict[bytes, bytes], FakeTopic, FakeTopic]:
    states, interests, dlq, output = {}, {}, FakeTopic(), FakeTopic()
    step = BatchStep(Settings(_env_file=None), states, interests, dlq, output, model)  # type: ignore[arg-type]
    return step, states, interests, dlq, output


def test_batch_infers_once_publishes_then_stores() -> None:
    model = FakeModel()
    step, states, interests, dlq, output = make_step(model)
    batch = [message("a", 1, 0), message("b", 1, 1), message("a", 2, 2)]
    asyncio.run(step.process(batch))
    assert model.calls == [["a", "b"]], "one inference request for every changed user of the batch"
    assert [json.loads(v) for _, v, _ in output.sent] == [
        {"user": "a", "seq": 1, "events": 2},
        {"user": "b", "seq": 1, "events": 1},
    ]
    assert decode_state(states[b"a"]).seq == 1 and not decode_state(states[b"a"]).dirty
    assert interests[b"b"] == output.sent[1][1]
    assert dlq.sent == []


def test_bad_input_goes_to_the_dlq_and_the_rest_is_applied() -> None:
    step, states, _, dlq, output = make_step(FakeModel())
    batch = [message("a", 1, 0), FakeEvent(Message(b"a", b"{not json", offset=7)), message("b", 1, 8)]
    asyncio.run(step.process(batch))
    ((key, value, headers),) = dlq.sent
    assert (key, value, headers["dlq.reason"], headers["dlq.offset"]) == (b"a", b"{not json", b"invalid_json", b"7")
    assert len(output.sent) == 2 and set(states) == {b"a", b"b"}


def test_a_failed_inference_stores_nothing_and_is_retried() -> None:
    model = FakeModel(fail=1)
    step, states, _, _, output = make_step(model)
    batch = [message("a", 1, 0)]
    with pytest.raises(RuntimeError):
        asyncio.run(step.process(batch))
    assert states == {} and output.sent == [], "no state moves forward without its published record"
    asyncio.run(step.process_until_done(batch))  # the retry loop: the second attempt succeeds
    assert len(model.calls) == 2 and decode_state(states[b"a"]).seq == 1 and len(output.sent) == 1


def test_ingest_only_stores_state_without_publishing() -> None:
    step, states, interests, _, output = make_step(None)
    asyncio.run(step.process([message("a", 1, 0), message("a", 2, 1)]))
    state = decode_state(states[b"a"])
    assert (state.events_seen, state.seq, state.dirty) == (2, 0, True)  # dirty: published once inference is on
    assert output.sent == [] and interests == {}


def test_stages_are_reported_for_fault_injection() -> None:
    seen: list[tuple[str, int]] = []
    step, *_ = make_step(FakeModel())
    step.on_stage = lambda point, published: seen.append((point, published))
    asyncio.run(step.process([message("a", 1, 0), message("b", 1, 1)]))
    assert seen == [("before_publish", 0), ("after_publish", 2)]
