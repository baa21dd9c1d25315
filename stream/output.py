"""The interest record published to the output topic (schema version 1, documented in docs/output.md).

One record per user per update, keyed by `user_id`. `seq` grows by one with every update of that user, so a
consumer keeps the record with the highest `seq` and drops stale or repeated ones (after a crash the worker
may publish the same `seq` again, with the same content).
"""

from __future__ import annotations

import time

import msgspec
import numpy as np

from stream.inference import ModelBundle
from stream.sessions import UserState

OUTPUT_SCHEMA_VERSION = 1
TOP_CATEGORIES = 5


class Scored(msgspec.Struct, array_like=False):
    id: str
    score: float


class ModelRef(msgspec.Struct):
    name: str
    version: str


class InterestRecord(msgspec.Struct, omit_defaults=False):
    user_id: str
    seq: int
    interest: list[float]  # L2-normalized, dimension d
    top_categories: list[Scored]  # best first; scores are independent probabilities
    top_items: list[Scored]  # best first; scores are the model's item logits
    sessions: int  # retained sessions
    sessions_seen: int  # sessions ever seen, evicted ones included
    events_seen: int  # applied events ever
    last_event_ms: int  # event time of the newest event
    model: ModelRef
    computed_at_ms: int
    version: int = OUTPUT_SCHEMA_VERSION


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(InterestRecord)


def build_records(
    users: list[str], states: list[UserState], outputs: dict[str, np.ndarray], bundle: ModelBundle
) -> list[InterestRecord]:
    """One record per user from a batch of model outputs; `states` already carry the new `seq`."""
    now = int(time.time() * 1000)
    model = ModelRef(bundle.name, bundle.version)
    interest = outputs["interest"].astype(np.float32).tolist()
    items, item_scores = outputs["top_items"].tolist(), outputs["top_scores"].astype(np.float32).tolist()
    cat_scores = outputs["category_scores"].astype(np.float32)
    top_cats = np.argsort(-cat_scores, axis=1, kind="stable")[:, :TOP_CATEGORIES].tolist()
    names, vocab = bundle.categories, bundle.vocab
    records = []
    for i, (user, state) in enumerate(zip(users, states, strict=True)):
        records.append(
            InterestRecord(
                user_id=user,
                seq=state.seq,
                interest=interest[i],
                top_categories=[Scored(names[c], float(cat_scores[i, c])) for c in top_cats[i]],
                top_items=[Scored(vocab.item(ix) or "", s) for ix, s in zip(items[i], item_scores[i], strict=True)],
                sessions=len(state.starts),
                sessions_seen=state.sessions_seen,
                events_seen=state.events_seen,
                last_event_ms=state.ts[-1] if state.ts else 0,
                model=model,
                computed_at_ms=now,
            )
        )
    return records


def encode_record(record: InterestRecord) -> bytes:
    return _encoder.encode(record)


def decode_record(data: bytes) -> InterestRecord:
    return _decoder.decode(data)
