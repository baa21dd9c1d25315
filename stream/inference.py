"""Triton inference for the worker: user states in, interest records out.

One gRPC channel, timeouts, retries with back-off, a circuit breaker.

The worker never loses an update to a Triton outage: `InterestClient.infer` retries until it succeeds (with
exponential back-off, and no calls at all while the breaker is open), so the calling agent simply waits and
the events it holds stay unacknowledged. At start-up `check_model` compares the served model's metadata with
what the shared feature encoder produces and refuses to run on any mismatch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential
from tritonclient.grpc import aio as grpcclient
from tritonclient.utils import InferenceServerException

from core.encoding import INPUT_NAMES, EncoderConfig, Vocabulary, encode_batch, explain_sessions
from core.schema import InterestRecord, ModelRef, ScenarioInterest, Scored, SessionWeight, encode_record
from core.sessions import UserState
from stream import metrics
from stream.settings import Settings

log = logging.getLogger(__name__)

OUTPUT_NAMES = ("interest", "top_items", "top_scores", "category_scores", "event_weights")
#: Only from a model that knows scenarios (`EncoderConfig.scenarios`); models/export.py declares the same names.
SCENARIO_OUTPUTS = ("scenario_interest", "scenario_top_items", "scenario_top_scores")
TOP_CATEGORIES = 5
EXPLAINED_SESSIONS = 3  # the heaviest sessions a record lists
_NUMPY_TO_TRITON = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32"}


class ModelMismatch(RuntimeError):
    """The served model does not take what the encoder produces, or does not return what the worker reads."""


class TritonUnavailable(RuntimeError):
    """A request failed for a reason worth retrying (server down, overloaded, timed out)."""


@dataclass(frozen=True)
class ModelBundle:
    """What the worker needs beside the served model: the vocabulary, category names and the encoder config."""

    name: str
    version: str
    vocab: Vocabulary
    categories: list[str]
    encoder: EncoderConfig
    metadata: dict[str, Any]

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES + (SCENARIO_OUTPUTS if self.encoder.scenarios else ())

    @classmethod
    def load(cls, model_dir: Path) -> ModelBundle:
        """`model_dir` is an exported `interest_transformer/` directory (see deploy/triton/README.md)."""
        md = json.loads((model_dir / "metadata.json").read_text())
        return cls(
            name=md["model_name"],
            version=str(md["model_version"]),
            vocab=Vocabulary.from_json((model_dir / "vocab.json").read_text()),
            categories=list(json.loads((model_dir / "categories.json").read_text())),
            encoder=EncoderConfig.from_dict(md["encoder_config"]),
            metadata=md,
        )


class CircuitBreaker:
    """Opens after `failures` consecutive failures; after `reset_s` lets one trial call through (half-open).

    Hand-written (a dozen lines) rather than a dependency: the async breaker libraries on PyPI are small,
    little-maintained, and would still need the same wiring into tenacity and the metrics.
    """

    def __init__(self, failures: int, reset_s: float) -> None:
        self.threshold, self.reset_s = failures, reset_s
        self.consecutive = 0
        self.opened_at: float | None = None

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def wait_s(self) -> float:
        """Seconds until a call may be tried (0 when closed or half-open)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.reset_s - time.monotonic())

    def success(self) -> None:
        self.consecutive, self.opened_at = 0, None
        metrics.CIRCUIT_OPEN.set(0)

    def failure(self) -> None:
        self.consecutive += 1
        if self.consecutive >= self.threshold:
            if self.opened_at is None:
                log.warning("Triton circuit open after %d consecutive failures", self.consecutive)
            self.opened_at = time.monotonic()
            metrics.CIRCUIT_OPEN.set(1)


class InterestClient:
    def __init__(self, settings: Settings, bundle: ModelBundle) -> None:
        self.settings, self.bundle = settings, bundle
        self.breaker = CircuitBreaker(settings.triton_circuit_failures, settings.triton_circuit_reset_s)
        self.max_batch_size = int(bundle.metadata.get("max_batch_size") or 1024)
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        self._client = grpcclient.InferenceServerClient(
            settings.triton_url,
            ssl=settings.triton_ssl,
            root_certificates=read(settings.triton_ssl_root_certificates),
            private_key=read(settings.triton_ssl_private_key),
            certificate_chain=read(settings.triton_ssl_certificate_chain),
        )

    async def close(self) -> None:
        await self._client.close()

    async def check_model(self, wait_s: float = 60.0) -> None:
        """Wait for the model to be ready, then refuse to run unless its interface is what we produce."""
        name, version = self.settings.triton_model, self.settings.triton_model_version
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if await self._client.is_model_ready(name, version, client_timeout=self.settings.triton_timeout_s):
                    break
            except InferenceServerException as exc:
                log.info("waiting for Triton model %s: %s", name, exc.message())
            if time.monotonic() > deadline:
                raise TritonUnavailable(f"model {name!r} not ready at {self.settings.triton_url} after {wait_s:.0f} s")
            await asyncio.sleep(1.0)
        md = await self._client.get_model_metadata(name, version, as_json=True)
        cfg = (await self._client.get_model_config(name, version, as_json=True))["config"]
        self.max_batch_size = int(cfg.get("max_batch_size") or self.max_batch_size)
        problems = interface_problems(md, self.bundle)
        if problems:
            raise ModelMismatch(f"Triton model {name!r} does not match the feature encoder: " + "; ".join(problems))

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs for a batch of any size (split at the model's max_batch_size); retries until it succeeds."""
        n = len(inputs[INPUT_NAMES[0]])
        parts = []
        for lo in range(0, n, self.max_batch_size):
            chunk = {k: v[lo : lo + self.max_batch_size] for k, v in inputs.items()}
            parts.append(await self._infer_retrying(chunk))
        names = self.bundle.output_names
        return {k: np.concatenate([p[k] for p in parts]) for k in names} if len(parts) > 1 else parts[0]

    async def _infer_retrying(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TritonUnavailable),
            wait=wait_exponential(multiplier=0.05, max=self.settings.triton_retry_max_s),
            before_sleep=lambda _: metrics.TRITON_RETRIES.inc(),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if (pause := self.breaker.wait_s()) > 0:
                    await asyncio.sleep(pause)
                return await self._infer_once(inputs)
        raise AssertionError("unreachable")

    async def _infer_once(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = []
        for name in INPUT_NAMES:
            arr = np.ascontiguousarray(inputs[name])
            item = grpcclient.InferInput(name, list(arr.shape), _NUMPY_TO_TRITON[arr.dtype])
            item.set_data_from_numpy(arr)
            request.append(item)
        wanted = [grpcclient.InferRequestedOutput(n) for n in self.bundle.output_names]
        started = time.perf_counter()
        try:
            result = await self._client.infer(
                self.settings.triton_model,
                request,
                model_version=self.settings.triton_model_version,
                outputs=wanted,
                client_timeout=self.settings.triton_timeout_s,
            )
        except InferenceServerException as exc:
            code = exc.status() or "unknown"
            metrics.TRITON_ERRORS.labels(code.removeprefix("StatusCode.")).inc()
            self.breaker.failure()
            if code in ("StatusCode.INVALID_ARGUMENT", "400"):
                raise  # our request is wrong: retrying soon cannot help (the agent logs it and backs off)
            # NOT_FOUND too: a model being unloaded or (re)loaded (Triton stopping, a roll-out) comes back.
            raise TritonUnavailable(f"{code}: {exc.message()}") from exc
        metrics.INFERENCE_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(inputs[INPUT_NAMES[0]]))
        self.breaker.success()
        return {n: result.as_numpy(n) for n in self.bundle.output_names}


def interface_problems(model_metadata: dict[str, Any], bundle: ModelBundle) -> list[str]:
    """Differences between the served model's inputs/outputs and what the encoder and the worker use."""
    problems = []
    served_in = {t["name"]: t for t in model_metadata.get("inputs", [])}
    served_out = {t["name"]: t for t in model_metadata.get("outputs", [])}
    if set(served_in) != set(INPUT_NAMES):
        problems.append(f"inputs {sorted(served_in)} != encoder's {sorted(INPUT_NAMES)}")
    for name in INPUT_NAMES:
        t = served_in.get(name)
        if t and (t["datatype"] != "INT64" or [int(d) for d in t["shape"]][1:] != [bundle.encoder.max_len]):
            problems.append(f"input {name}: {t['datatype']}{t['shape']} != INT64[-1, {bundle.encoder.max_len}]")
    expected_out = {o["name"]: o for o in bundle.metadata.get("outputs", [])}
    for name in bundle.output_names:
        t, want = served_out.get(name), expected_out.get(name)
        if t is None:
            problems.append(f"output {name} missing")
        elif want and (
            t["datatype"] != want["datatype"].removeprefix("TYPE_").replace("FP32", "FP32")
            or [int(d) for d in t["shape"]][1:] != list(want["dims"])
        ):
            problems.append(f"output {name}: {t['datatype']}{t['shape']} != {want['datatype']}[-1, {want['dims']}]")
    return problems


class InterestModel:
    """The model as the batch step sees it: user states in, encoded interest records out.

    The Triton client is created on first use, so on the worker's own event loop."""

    def __init__(self, settings: Settings, bundle: ModelBundle) -> None:
        self.settings, self.bundle = settings, bundle
        self.client: InterestClient | None = None

    @classmethod
    def load(cls, settings: Settings) -> InterestModel:
        return cls(settings, ModelBundle.load(settings.model_dir))

    @property
    def breaker_open(self) -> bool:
        return self.client is not None and self.client.breaker.is_open

    async def records(self, users: list[str], states: list[UserState]) -> list[bytes]:
        if self.client is None:
            self.client = InterestClient(self.settings, self.bundle)
        outputs = await self.client.infer(encode_batch(states, self.bundle.vocab, self.bundle.encoder))
        return [encode_record(r) for r in build_records(users, states, outputs, self.bundle)]


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
    weights = outputs["event_weights"]
    scenarios = _scenario_interests(outputs, bundle)
    records = []
    for i, (user, state) in enumerate(zip(users, states, strict=True)):
        explained = explain_sessions(state, weights[i], bundle.encoder, EXPLAINED_SESSIONS)
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
                explanation=[SessionWeight(a, b, n, round(w, 4), items) for a, b, n, w, items in explained],
                scenarios=scenarios[i],
            )
        )
    return records


def _scenario_interests(outputs: dict[str, np.ndarray], bundle: ModelBundle) -> list[dict[str, ScenarioInterest]]:
    """Per row, the interest and top items asked about each scenario the model knows ({} when it knows none)."""
    names = bundle.encoder.scenarios
    if not names:
        return [{} for _ in range(len(outputs["interest"]))]
    vectors = outputs["scenario_interest"].astype(np.float32).tolist()
    items, scores = outputs["scenario_top_items"].tolist(), outputs["scenario_top_scores"].astype(np.float32).tolist()

    def top(i: int, s: int) -> list[Scored]:
        return [Scored(bundle.vocab.item(x) or "", v) for x, v in zip(items[i][s], scores[i][s], strict=True)]

    rows = range(len(vectors))
    return [{name: ScenarioInterest(vectors[i][s], top(i, s)) for s, name in enumerate(names)} for i in rows]
