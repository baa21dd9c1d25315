"""Explanations and scenario-aware interest end to end: events with a platform go through the real broker, the
worker (RocksDB) and tritonserver; the record and the HTTP view carry the explanation and the per-scenario interest,
equal to the exported graph's outputs."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from core.encoding import encode_batch, explain_sessions
from core.schema import Event, decode_record
from core.sessions import state_from_events
from local.process import free_port
from local.triton import LocalTriton
from stream.inference import EXPLAINED_SESSIONS, ModelBundle
from stream.settings import Settings
from tests.fixtures.worker import Worker, read_topic, wait_caught_up
from tests.test_pipeline import replay_events

pytestmark = [pytest.mark.broker, pytest.mark.triton]
T0 = 1_700_000_000_000
HOUR = 3_600_000


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def history(user: str) -> list[Event]:
    """Four sessions on alternating platforms (one without any), items from the tiny vocabulary."""
    out, platforms = [], ["app", "tv", None, "tv"]
    for s, platform in enumerate(platforms):
        for k in range(3 + s):
            ctx = {"platform": platform} if platform else None
            out.append(Event(user, f"item{(7 * s + 3 * k + len(user)) % 290}", "view", T0 + s * 5 * HOUR + k * 60_000,
                             context=ctx))  # fmt: skip
    return out


def test_records_and_the_http_view_carry_the_explanation_and_each_scenario(
    make_settings: Callable[..., Settings],
    start_worker: Callable[..., Worker],
    tiny_export: Any,
    triton_twin: LocalTriton,
) -> None:
    settings = make_settings(
        tables=("user_state",),
        triton_url=triton_twin.grpc_url,
        model_dir=tiny_export.twin / "interest_transformer",
        worker_web_port=free_port(),
    )
    users = ["ann", "bob"]
    events = [e for u in users for e in history(u)]
    worker = start_worker(settings)
    replay_events(settings, events, rate=None)
    wait_caught_up(settings, [worker], timeout_s=120)

    last = {}
    for r in read_topic(settings, settings.topic_output):
        rec = decode_record(r.value)
        last[rec.user_id] = rec
    bundle = ModelBundle.load(tiny_export.twin / "interest_transformer")
    assert bundle.encoder.scenarios == ("app", "tv")
    states = [state_from_events([e for e in events if e.user_id == u], settings.session_config()) for u in users]
    session = ort.InferenceSession(str(tiny_export.onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    want = dict(zip(names, session.run(names, encode_batch(states, bundle.vocab, bundle.encoder)), strict=True))
    web = f"http://127.0.0.1:{settings.worker_web_port}"
    for i, user in enumerate(users):
        rec = last[user]
        assert states[i].scenarios[:3] == ("app",) * 3 and "" in states[i].scenarios  # the fold kept the platform
        # The explanation: the heaviest sessions with their attention share, as the graph's event weights say.
        explained = explain_sessions(states[i], want["event_weights"][i], bundle.encoder, EXPLAINED_SESSIONS)
        assert len(rec.explanation) == 3 and [e.session_start_ms for e in rec.explanation] == [x[0] for x in explained]
        weights = [e.weight for e in rec.explanation]
        assert weights == sorted(weights, reverse=True) and 0 < sum(weights) <= 1.0 + 1e-3
        np.testing.assert_allclose(weights, [x[3] for x in explained], atol=1e-3)
        assert all(e.top_items and e.events >= 3 for e in rec.explanation)
        # Each scenario the model knows, in the record and through ?scenario=
        assert sorted(rec.scenarios) == ["app", "tv"]
        for s, name in enumerate(("app", "tv")):
            np.testing.assert_allclose(rec.scenarios[name].interest, want["scenario_interest"][i, s], atol=1e-4)
            top = [bundle.vocab.item(ix) for ix in want["scenario_top_items"][i, s]]
            assert [t.id for t in rec.scenarios[name].top_items][:3] == top[:3]
            status, body = get(f"{web}/users/{user}/interest?scenario={name}")
            assert status == 200 and body["user_id"] == user and list(body["scenarios"]) == [name]
            np.testing.assert_allclose(body["interest"], want["scenario_interest"][i, s], atol=1e-4)
        assert not np.allclose(rec.scenarios["app"].interest, rec.scenarios["tv"].interest)
        status, body = get(f"{web}/users/{user}/interest")
        assert status == 200 and len(body["explanation"]) == 3 and sorted(body["scenarios"]) == ["app", "tv"]
        status, body = get(f"{web}/users/{user}/interest?scenario=web")
        assert status == 404 and body["scenarios"] == ["app", "tv"], body
    assert not worker.crash_lines()
