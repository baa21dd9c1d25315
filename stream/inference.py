"""Triton inference for the worker: user states in, interest records out.

One gRPC channel, timeouts, retries with back-off, a circuit breaker.

The worker never loses an update to a Triton outage: `InterestClient.infer` retries until it succeeds (with
exponential back-off, and no calls at all while the breaker is open), so the calling agent simply waits and
the events it holds stay unacknowledged. Every request names one served version, pinned per batch by
`stream.versions.VersionTracker`, which only uses a version whose Triton metadata matches what the shared
feature encoder produces and what the worker reads (`interface_problems`); at start-up the worker refuses to run
when no served version does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential
from tritonclient.grpc import aio as grpcclient
from tritonclient.utils import InferenceServerException

from core.bundle import bundle_hash
from core.encoding import INPUT_NAMES, EncoderConfig, Vocabulary, encode_batch, explain_sessions
from core.schema import InterestRecord, ModelRef, ScenarioInterest, Scored, SessionWeight, encode_record
from core.sessions import UserState
from stream import metrics
from stream.breaker import CircuitBreaker
from stream.settings import Settings
from stream.versions import STALL_RETRY_S, Pinned, VersionTracker

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


class VersionGone(RuntimeError):
    """The version a batch is pinned to is no longer served (Triton unloaded it): redo the batch on another."""


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

    @cached_property
    def _item_names(self) -> np.ndarray:
        """Index -> item id: "" for padding, OOV and (the trailing entry) any index past the vocabulary."""
        return np.array(["", "", *self.vocab.items, ""], dtype=object)

    def item_ids(self, indices: np.ndarray) -> list[Any]:
        """The item ids of an array of model indices, as nested lists of the same shape."""
        names = self._item_names
        return names[np.clip(indices, 0, len(names) - 1)].tolist()  # type: ignore[no-any-return]

    @cached_property
    def category_names(self) -> np.ndarray:
        return np.array(self.categories, dtype=object)

    @classmethod
    def load(cls, model_dir: Path, version: str | None = None) -> ModelBundle:
        """`model_dir` is an exported `interest_transformer/` directory (see deploy/triton/README.md); a version's
        bundle is read from `model_dir/<version>/`, or from `model_dir/` when the version has none of its own."""
        where = bundle_dir(model_dir, version)
        md = json.loads((where / "metadata.json").read_text())
        written_for = md.get("triton_version")
        if version is not None and written_for is not None and str(written_for) != version:
            raise ValueError(f"{where / 'metadata.json'} was written for version {written_for}, not {version}")
        vocab, categories = (where / "vocab.json").read_bytes(), (where / "categories.json").read_bytes()
        if "bundle_sha256" in md and bundle_hash(vocab, categories, md["onnx_sha256"]) != md["bundle_sha256"]:
            raise ValueError(f"{where}: vocab.json / categories.json do not match the bundle_sha256 of metadata.json")
        return cls(
            name=md["model_name"],
            version=str(md["model_version"]),
            vocab=Vocabulary.from_json(vocab),
            categories=list(json.loads(categories)),
            encoder=EncoderConfig.from_dict(md["encoder_config"]),
            metadata=md,
        )


def bundle_dir(model_dir: Path, version: str | None) -> Path:
    """Where a version's bundle lives: its own directory when it has a metadata.json, else the model directory."""
    own = model_dir / version if version else None
    return own if own is not None and (own / "metadata.json").exists() else model_dir


class InterestClient:
    """Triton's gRPC API as the worker uses it: the ready versions, one version's interface, and inference."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.breaker = CircuitBreaker(settings.triton_circuit_failures, settings.triton_circuit_reset_s)
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

    async def ready_versions(self) -> list[str]:
        """The versions of the model Triton serves now ([] when it serves none); raises while it cannot say."""
        name, timeout = self.settings.triton_model, self.settings.triton_timeout_s
        try:
            md = await self._client.get_model_metadata(name, as_json=True, client_timeout=timeout)
        except InferenceServerException as exc:
            if exc.status() == "StatusCode.NOT_FOUND":  # the server answers: no version of the model is loaded
                return []
            code = exc.status() or "unknown"
            metrics.TRITON_ERRORS.labels(code.removeprefix("StatusCode.")).inc()
            self.breaker.failure()  # a worker waiting for a version during an outage still opens the circuit
            raise TritonUnavailable(f"{code}: {exc.message()}") from exc
        return [str(v) for v in md.get("versions", [])]  # Triton lists the versions that are READY

    async def interface(self, version: str) -> tuple[dict[str, Any], int]:
        """One version's metadata (inputs, outputs) and max_batch_size, as Triton serves them."""
        name, timeout = self.settings.triton_model, self.settings.triton_timeout_s
        md = await self._client.get_model_metadata(name, version, as_json=True, client_timeout=timeout)
        cfg = (await self._client.get_model_config(name, version, as_json=True, client_timeout=timeout))["config"]
        return md, int(cfg.get("max_batch_size") or 0)

    async def infer(self, inputs: dict[str, np.ndarray], pinned: Pinned) -> dict[str, np.ndarray]:
        """Outputs for a batch of any size, every request on `pinned.version` (split at its max_batch_size);
        retries until it succeeds, or raises VersionGone when that version is no longer served."""
        n, size = len(inputs[INPUT_NAMES[0]]), pinned.max_batch_size
        parts = []
        for lo in range(0, n, size):
            chunk = {k: v[lo : lo + size] for k, v in inputs.items()}
            parts.append(await self._infer_retrying(chunk, pinned))
        names = pinned.bundle.output_names
        return {k: np.concatenate([p[k] for p in parts]) for k in names} if len(parts) > 1 else parts[0]

    async def _infer_retrying(self, inputs: dict[str, np.ndarray], pinned: Pinned) -> dict[str, np.ndarray]:
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
                return await self._infer_once(inputs, pinned)
        raise AssertionError("unreachable")

    async def _infer_once(self, inputs: dict[str, np.ndarray], pinned: Pinned) -> dict[str, np.ndarray]:
        version, names = pinned.version, pinned.bundle.output_names
        request = []
        for name in INPUT_NAMES:
            arr = np.ascontiguousarray(inputs[name])
            item = grpcclient.InferInput(name, list(arr.shape), _NUMPY_TO_TRITON[arr.dtype])
            item.set_data_from_numpy(arr)
            request.append(item)
        wanted = [grpcclient.InferRequestedOutput(n) for n in names]
        started = time.perf_counter()
        try:
            result = await self._client.infer(
                self.settings.triton_model,
                request,
                model_version=version,
                outputs=wanted,
                client_timeout=self.settings.triton_timeout_s,
            )
        except InferenceServerException as exc:
            code = exc.status() or "unknown"
            metrics.TRITON_ERRORS.labels(code.removeprefix("StatusCode.")).inc()
            if code in ("StatusCode.NOT_FOUND", "StatusCode.UNAVAILABLE") and await self._version_gone(version):
                raise VersionGone(f"version {version}: {exc.message()}") from exc  # a roll-out, not a failure
            self.breaker.failure()
            if code in ("StatusCode.INVALID_ARGUMENT", "400"):
                raise  # our request is wrong: retrying soon cannot help (the agent logs it and backs off)
            raise TritonUnavailable(f"{code}: {exc.message()}") from exc
        served = result.get_response().model_version
        if served != version:  # Triton answers with the version that computed the outputs
            raise ModelMismatch(f"asked {self.settings.triton_model} version {version}, Triton answered {served}")
        metrics.INFERENCE_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(inputs[INPUT_NAMES[0]]))
        self.breaker.success()
        return {n: result.as_numpy(n) for n in names}

    async def _version_gone(self, version: str) -> bool:
        """True when Triton answers and says `version` is not ready (unloaded), False when it cannot answer."""
        try:
            ready = await self._client.is_model_ready(
                self.settings.triton_model, version, client_timeout=self.settings.triton_timeout_s
            )
        except InferenceServerException:
            return False  # Triton itself is down or restarting: an outage, retried as such
        return not ready


def interface_problems(model_metadata: dict[str, Any], bundle: ModelBundle) -> list[str]:
    """Differences between the served model's inputs/outputs and what the encoder and the worker use."""
    problems = []
    served_in = {t["name"]: t for t in model_metadata.get("inputs", [])}
    served_out = {t["name"]: t for t in model_metadata.get("outputs", [])}
    if set(served_in) != set(INPUT_NAMES):
        problems.append(f"inputs {sorted(served_in)} != encoder's {sorted(INPUT_NAMES)}")
    for name in INPUT_NAMES:
        t = served_in.get(name)
        if t and (t["datatype"] != "INT64" or _dims(t)[1:] != [bundle.encoder.max_len]):
            problems.append(f"input {name}: {t['datatype']}{_dims(t)} != INT64[-1, {bundle.encoder.max_len}]")
    expected_out = {o["name"]: o for o in bundle.metadata.get("outputs", [])}
    for name in bundle.output_names:
        t, want = served_out.get(name), expected_out.get(name)
        if t is None:
            problems.append(f"output {name} missing")
        elif want and (
            t["datatype"] != want["datatype"].removeprefix("TYPE_").replace("FP32", "FP32")
            or _dims(t)[1:] != list(want["dims"])
        ):
            wanted = f"{want['datatype'].removeprefix('TYPE_')}{[-1, *want['dims']]}"
            problems.append(f"output {name}: {t['datatype']}{_dims(t)} != {wanted}")
    return problems


def _dims(tensor: dict[str, Any]) -> list[int]:
    return [int(d) for d in tensor["shape"]]  # Triton's JSON metadata gives the dims as strings


class InterestModel:
    """The model as the batch step sees it: user states in, encoded interest records out.

    One served version per batch (`stream.versions`); the Triton client is created on first use, so on the
    worker's own event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client: InterestClient | None = None
        self.versions = VersionTracker(
            settings.triton_model,
            lambda: self._connected().ready_versions(),
            self.check_version,
            poll_s=settings.model_poll_s,
            only=settings.triton_model_version,
        )
        self._bundles: dict[str, tuple[tuple[object, ...], ModelBundle]] = {}  # version -> (files' stamp, bundle)

    @property
    def breaker_open(self) -> bool:
        return self.client is not None and self.client.breaker.is_open

    @property
    def problem(self) -> str:
        """Why no version is in use ("" while one is): /health reports it."""
        return "" if self.versions.current is not None else self.versions.problem

    def _connected(self) -> InterestClient:
        if self.client is None:
            self.client = InterestClient(self.settings)
        return self.client

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def start(self, wait_s: float = 60.0) -> Pinned:
        """Wait for a ready version, then refuse to run unless one matches what we encode (the same resolution
        as every batch's)."""
        deadline = time.monotonic() + wait_s
        while (pinned := await self.versions.refresh(force=True)) is None:
            ready = self.versions.ready
            if ready and all(v in self.versions.refusals for v in ready):
                raise ModelMismatch(
                    f"Triton model {self.settings.triton_model!r} does not match the feature encoder: "
                    + "; ".join(f"version {v}: {self.versions.refusals[v]}" for v in ready)
                )
            if time.monotonic() > deadline:
                raise TritonUnavailable(
                    f"model {self.settings.triton_model!r} not ready at {self.settings.triton_url} after "
                    f"{wait_s:.0f} s: {self.versions.problem}"
                )
            await asyncio.sleep(1.0)
        return pinned

    async def check_version(self, version: str) -> Pinned | list[str]:
        """A served version the worker can use, or why not: its bundle loads, and Triton's inputs/outputs for it
        are what the encoder produces (with the bundle's max_len) and what the worker reads."""
        served, max_batch_size = await self._connected().interface(version)
        try:
            bundle = self._bundle(version)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return [f"its bundle in {bundle_dir(self.settings.model_dir, version)} does not load: {exc}"]
        problems = interface_problems(served, bundle)
        if problems:
            return problems
        return Pinned(version, bundle, max_batch_size or int(bundle.metadata.get("max_batch_size") or 1024))

    def _bundle(self, version: str) -> ModelBundle:
        """The version's bundle, read again only when its files changed (a refused one is checked every poll)."""
        where = bundle_dir(self.settings.model_dir, version)
        stamp = (str(where), *(_stat(where / f) for f in ("metadata.json", "vocab.json", "categories.json")))
        cached = self._bundles.get(version)
        if cached is None or cached[0] != stamp:
            self._bundles[version] = (stamp, ModelBundle.load(self.settings.model_dir, version))
        return self._bundles[version][1]

    async def records(self, users: list[str], states: list[UserState]) -> list[bytes]:
        """One record per user, all computed by one version: if it vanishes mid-batch, the whole batch is
        redone on the version used next (never a mix of two)."""
        client, gone = self._connected(), ""
        while True:
            pinned = await self.versions.for_batch()
            if pinned.version == gone:  # Triton still lists the version it just refused: do not spin
                await asyncio.sleep(STALL_RETRY_S)
            bundle = pinned.bundle
            try:
                outputs = await client.infer(encode_batch(states, bundle.vocab, bundle.encoder), pinned)
            except VersionGone as exc:
                log.warning("%s; redoing the batch of %d users", exc, len(users))
                self.versions.drop(gone := pinned.version)
                continue
            return [encode_record(r) for r in build_records(users, states, outputs, bundle, pinned.version)]


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return (-1, -1)
    return (st.st_mtime_ns, st.st_size)


def build_records(
    users: list[str],
    states: list[UserState],
    outputs: dict[str, np.ndarray],
    bundle: ModelBundle,
    triton_version: str = "",
) -> list[InterestRecord]:
    """One record per user from a batch of model outputs (computed by `triton_version`, whose bundle `bundle`
    is); `states` already carry the new `seq`."""
    now = int(time.time() * 1000)
    model = ModelRef(bundle.name, bundle.version, triton_version)
    # Whole-batch array operations, then one pass per user: the per-user cost is what limits a worker.
    interest = outputs["interest"].astype(np.float32).tolist()
    item_ids = bundle.item_ids(outputs["top_items"])
    item_scores = outputs["top_scores"].astype(np.float32).tolist()
    cat_scores = outputs["category_scores"].astype(np.float32)
    top_cats = np.argsort(-cat_scores, axis=1, kind="stable")[:, :TOP_CATEGORIES]
    cat_names = bundle.category_names[top_cats].tolist()
    cat_top_scores = np.take_along_axis(cat_scores, top_cats, axis=1).tolist()
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
                top_categories=list(map(Scored, cat_names[i], cat_top_scores[i])),
                top_items=list(map(Scored, item_ids[i], item_scores[i])),
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
    items = bundle.item_ids(outputs["scenario_top_items"])
    scores = outputs["scenario_top_scores"].astype(np.float32).tolist()

    def top(i: int, s: int) -> list[Scored]:
        return list(map(Scored, items[i][s], scores[i][s]))

    rows = range(len(vectors))
    return [{name: ScenarioInterest(vectors[i][s], top(i, s)) for s, name in enumerate(names)} for i in rows]
