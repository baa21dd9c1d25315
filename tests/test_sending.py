"""DirectTopic: records go straight to the app's producer, the topic declared once first."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from core.encoding import EncoderConfig, Vocabulary
from stream.inference import ModelBundle
from stream.sending import DirectTopic


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    async def send(self, *args: Any) -> asyncio.Future[str]:
        self.sent.append(args)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        future.set_result(f"acked {len(self.sent)}")
        return future


class FakeApp:
    def __init__(self) -> None:
        self.producer, self.starts = FakeProducer(), 0

    async def maybe_start_producer(self) -> FakeProducer:
        self.starts += 1
        return self.producer


class FakeTopic:
    def __init__(self) -> None:
        self.app, self.declared = FakeApp(), 0

    def get_topic_name(self) -> str:
        return "interests"

    async def maybe_declare(self) -> None:
        self.declared += 1


def test_direct_topic_declares_once_and_sends_bytes_as_they_are() -> None:
    async def run() -> list[str]:
        topic = FakeTopic()
        direct = DirectTopic(topic)  # type: ignore[arg-type]
        acks = [await direct.send(key=b"u1", value=b"{}"), await direct.send(key=b"u2", value=None, partition=3)]
        assert (topic.declared, topic.app.starts) == (1, 1)
        assert topic.app.producer.sent == [("interests", b"u1", b"{}", None, None, None),
                                           ("interests", b"u2", None, 3, None, None)]  # fmt: skip
        return list(await asyncio.gather(*acks))

    assert asyncio.run(run()) == ["acked 1", "acked 2"]


def test_item_ids_map_padding_oov_and_unknown_indices_to_empty() -> None:
    bundle = ModelBundle("m", "1", Vocabulary(["a", "b"]), ["c1"], EncoderConfig(max_len=4), {})
    assert bundle.item_ids(np.array([[2, 3, 0, 1, 4, 99, -1]])) == [["a", "b", "", "", "", "", ""]]
