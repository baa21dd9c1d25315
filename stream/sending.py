"""Records sent straight through the app's producer, not through Faust's `Topic.send`.

Why: `Topic.send` wraps every record in a FutureMessage, looks up serializers, calls the sensors and adds a
done-callback before aiokafka's own `send`. For the worker's two records per updated user (changelog and output)
that was ~11 % of its Python CPU at 1,000 events/s (py-spy, docs/benchmarks.md "Live"). Our keys and values are
bytes already and the step awaits every delivery itself, so none of that buys anything on the hot path.

The topic is declared once before its first record, as `Topic.send` would do. The dead-letter topic keeps Faust's
`Topic.send`: it is off the hot path.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import faust


class DirectTopic:
    """`send(key=, value=, partition=, headers=)` of one topic, through the app's (started) producer. The future
    it returns resolves to aiokafka's RecordMetadata once the broker acknowledged the record (acks as configured)."""

    def __init__(self, topic: faust.TopicT) -> None:
        self.topic = topic
        self.name = topic.get_topic_name()
        self._producer: Any = None

    async def send(
        self, *, key: bytes | None, value: bytes | None, partition: int | None = None, headers: Any = None
    ) -> Awaitable[Any]:
        producer = self._producer or await self._start()
        return await producer.send(self.name, key, value, partition, None, headers)

    async def _start(self) -> Any:
        await self.topic.maybe_declare()
        self._producer = await self.topic.app.maybe_start_producer()
        return self._producer
