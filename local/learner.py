"""`interest-stream learn`: the continuous trainer (issue 27). It reads the events topic in its own consumer group,
and every interval grows the vocabulary, refits EASE, fine-tunes and validates (`models.learn.learn_step`); a
candidate that is not worse than the served version is exported as version N+1 next to it (never over an existing
version directory), loaded into Triton, and the workers move to it by their own version tracking.

Why the events topic and not the workers' state: the trainer needs each user's time-ordered events, which is what
the topic holds, in the contract the producers keep (docs/events.md); the workers' changelog holds a bounded,
msgpack-encoded fold of the same events in a format owned by the worker, and reading it would tie the trainer to
the worker's internals and its transactional write order. Its own group also makes its lag a number Prometheus
already knows how to watch. At start it reads the topic from the beginning (the retention window) to rebuild the
histories, so a restart costs a re-read, never a skew. A `forget` message erases the user's history here too.

Bounded cost: `nice`, `threads` torch threads, at most `steps` fine-tuning steps and `cpu_budget_s` CPU seconds of
fine-tuning per interval. Metrics on `metrics_port` (docs/operations.md, "Continuous learning").
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from core.schema import Event, Forget, parse_message
from core.sessions import SessionConfig, UserState, apply_events

if TYPE_CHECKING:
    from models.checkpoint import Checkpoint
    from models.learn import Validation
    from stream.settings import Settings

log = logging.getLogger(__name__)
MODEL = "interest_transformer"

LAST_PROMOTION = Gauge("interest_learner_last_promotion_timestamp_seconds", "When a version was last promoted.")
PROMOTIONS = Counter("interest_learner_promotions_total", "Candidates promoted and exported as a new version.")
REFUSED = Counter("interest_learner_candidates_refused_total", "Candidates not promoted, by reason.", ["reason"])
VOCABULARY = Gauge("interest_learner_vocabulary_size", "Items in the vocabulary of the version being served.")
SERVED_VERSION = Gauge("interest_learner_served_version", "The Triton version the trainer last exported or found.")
EVENTS = Counter("interest_learner_events_total", "Events folded into the trainer's histories.")
STEP_CPU = Histogram(
    "interest_learner_step_cpu_seconds", "CPU seconds of one learning step.", buckets=(1, 5, 15, 30, 60, 120, 300, 600)
)


@dataclass
class LearnerConfig:
    checkpoint: Path = Path("artifacts/model")  # the checkpoint of the newest version in `repo` at first start
    repo: Path = Path("artifacts/model_repository")  # production repository (the twin beside it, `<repo>-twin`)
    state_dir: Path = Path("artifacts/learner")  # checkpoints of the versions this trainer promoted (v<N>/)
    interval_events: int = 5000  # a step after this many new events ...
    interval_s: float = 600.0  # ... or this long after the last step (with at least `min_events`); 0 = events only
    min_events: int = 50
    holdout: float = 0.2  # the interval's newest share: its older half refits the fusion, the newer validates
    steps: int = 100
    cpu_budget_s: float = 120.0  # fine-tuning stops when a step used this much CPU
    tolerance: float = 0.0  # a candidate this much worse (validation NDCG@10) is still promoted
    threads: int = 1  # torch threads (0: as they are)
    nice: int = 10  # nice increment (0: none)
    group_id: str = "interest-learner"
    triton_http: str = ""  # explicit model control: loaded here after export; "" = Triton polls the repository
    session: SessionConfig = field(default_factory=SessionConfig)  # the worker's bounds: 200 events, 20 sessions


class Learner:
    """The trainer's state and one step, without Kafka: `observe` events, ask `due`, call `step`."""

    def __init__(
        self,
        cfg: LearnerConfig,
        serving: Checkpoint,
        version: int,
        categories_of: Callable[[str], np.ndarray] | None = None,
        load: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg, self.serving, self.version = cfg, serving, version
        self.categories_of, self.load, self.clock = categories_of, load, clock
        self.histories: dict[str, UserState] = {}
        self.interval_ts: list[int] = []  # event times of this interval, sorted
        self.last_step = clock()
        VOCABULARY.set(len(serving.vocab) - 2)
        SERVED_VERSION.set(version)
        exported = cfg.repo / MODEL / str(version)
        if exported.is_dir():  # the served version's export time: a restart does not look like a fresh promotion
            LAST_PROMOTION.set(exported.stat().st_mtime)

    def observe(self, messages: Iterable[Event | Forget]) -> None:
        for m in messages:
            if isinstance(m, Forget):
                self.histories.pop(m.user_id, None)
                continue
            state = self.histories.get(m.user_id, UserState())
            self.histories[m.user_id] = apply_events(state, [m], self.cfg.session)[0]
            bisect.insort(self.interval_ts, m.timestamp)
            EVENTS.inc()

    def due(self) -> bool:
        n = len(self.interval_ts)
        timed = self.cfg.interval_s > 0 and self.clock() - self.last_step >= self.cfg.interval_s
        return n >= self.cfg.interval_events or (timed and n >= self.cfg.min_events)

    def step(self) -> Validation:
        """Learn on this interval; promote (export, load) if the candidate is not worse. Resets the interval."""
        from models.learn import LearnConfig, learn_step

        t0 = time.process_time()
        ts = self.interval_ts
        if not ts:
            raise ValueError("no event since the last step")
        hold_from = ts[min(len(ts) - 1, int(len(ts) * (1 - self.cfg.holdout)))]
        lcfg = LearnConfig(steps=self.cfg.steps, cpu_budget_s=self.cfg.cpu_budget_s, tolerance=self.cfg.tolerance)
        candidate, verdict, facts = learn_step(
            self.serving, list(self.histories.values()), ts[0], hold_from, lcfg, self.categories_of
        )
        self.interval_ts, self.last_step = [], self.clock()
        if verdict.promote:
            self.promote(candidate)
        else:
            REFUSED.labels(verdict.reason).inc()
        cpu = time.process_time() - t0
        STEP_CPU.observe(cpu)
        log.info("learning step: %s, %s new items, fusion %s, %.1f CPU s, version %s", verdict, facts.get("new_items"),
                 facts.get("fusion"), cpu, self.version)  # fmt: skip
        return verdict

    def promote(self, candidate: Checkpoint) -> None:
        """The checkpoint first, then the export, each complete or absent (written aside, then renamed): a trainer
        killed in between leaves a checkpoint that was never exported (replaced at the next promotion), never an
        exported version without the checkpoint to resume from."""
        from models.export import export_repository

        version = self.version + 1
        candidate.metadata["model_version"] = f"learned-v{version}"
        save_complete(candidate, self.cfg.state_dir / f"v{version}")
        export_repository(candidate, self.cfg.repo, version=version, overwrite=False, twin_threads=1)
        if self.load is not None:
            self.load(version)
        self.serving, self.version = candidate, version
        PROMOTIONS.inc()
        LAST_PROMOTION.set(time.time())
        VOCABULARY.set(len(candidate.vocab) - 2)
        SERVED_VERSION.set(version)


def newest_version(repo: Path) -> int:
    from models.export import version_dirs

    return max(version_dirs(repo / MODEL), default=0)


def save_complete(ckpt: Checkpoint, out: Path) -> None:
    """`models.checkpoint.save` into a directory beside `out`, renamed to `out` once written: `out` is complete
    or absent. An `out` already there was never exported (see `Learner.promote`) and is replaced."""
    import shutil

    from models.checkpoint import save

    partial = out.with_name(f".{out.name}-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    save(ckpt, partial, {"loss": [], "val_ndcg10": []})
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


def resume(cfg: LearnerConfig) -> tuple[Checkpoint, int]:
    """The checkpoint of the newest exported version: this trainer's own (state_dir/v<N>), else `cfg.checkpoint`
    (the trained model, exported as the first version, or a version an operator exported). The checkpoint must be
    the version's: a vocabulary other than the one the version serves is refused (ValueError), as resuming from
    it would take the items it learned away from the next version."""
    from core.encoding import Vocabulary
    from models.checkpoint import load_checkpoint

    version = newest_version(cfg.repo)
    if version == 0:
        raise FileNotFoundError(f"{cfg.repo / MODEL} has no version: export the trained model first")
    own = cfg.state_dir / f"v{version}"
    path = own if (own / "checkpoint.pt").exists() else cfg.checkpoint
    ckpt = load_checkpoint(path)
    served = Vocabulary.from_json((cfg.repo / MODEL / str(version) / "vocab.json").read_text()).items
    if ckpt.vocab.items != served:
        raise ValueError(
            f"{path} is not the checkpoint of version {version} in {cfg.repo / MODEL} (vocabularies of "
            f"{len(ckpt.vocab.items)} and {len(served)} items): point --checkpoint at that version's checkpoint"
        )
    return ckpt, version


def triton_loader(http_url: str) -> Callable[[int], None]:
    """Explicit model control: ask every Triton behind `http_url` to load the model again (it picks up the new
    version directory). The host may name several replicas (a headless Service): each address is asked."""

    def load(version: int) -> None:
        url = urllib.parse.urlsplit(http_url)
        port = url.port or 80
        addresses = sorted(
            {a[4][0] for a in socket.getaddrinfo(url.hostname, port, socket.AF_INET, socket.SOCK_STREAM)}
        )
        for address in addresses:
            req = urllib.request.Request(f"{url.scheme}://{address}:{port}/v2/repository/models/{MODEL}/load",
                                         data=b"", method="POST")  # fmt: skip
            with urllib.request.urlopen(req, timeout=120) as response:
                if response.status != 200:
                    raise RuntimeError(f"Triton {address} did not load {MODEL} version {version}: {response.status}")

    return load


def genres_of(ckpt: Checkpoint) -> Callable[[str], np.ndarray] | None:
    """A new item's multi-hot genres in the checkpoint's category order, from movies.csv (None without the data:
    a new item then starts with no genre)."""
    from models.datasets import movielens_movies

    try:
        movies = movielens_movies()
    except OSError:
        return None
    col = {g: k for k, g in enumerate(ckpt.categories)}

    def of(item: str) -> np.ndarray:
        out = np.zeros(len(col), np.float32)
        for g in movies[item].genres if item in movies else ():
            if g in col:
                out[col[g]] = 1.0
        return out

    return of


def bound_cost(cfg: LearnerConfig) -> None:
    """Lower this process's priority and torch's threads (0 leaves either as it is: a test runs in-process)."""
    import torch

    if cfg.nice:
        os.nice(cfg.nice)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)


async def run(settings: Settings, cfg: LearnerConfig, stop: threading.Event | None = None) -> Learner:
    """Consume the events topic from the beginning in the trainer's own group; step whenever an interval is due,
    until `stop` is set (from any thread). The step runs in a thread, so the consumer stays in its group."""
    from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener

    bound_cost(cfg)
    serving, version = resume(cfg)
    load = triton_loader(cfg.triton_http) if cfg.triton_http else None
    learner = Learner(cfg, serving, version, genres_of(serving), load)
    consumer = AIOKafkaConsumer(
        **settings.kafka_client_kwargs(), group_id=cfg.group_id, enable_auto_commit=False, auto_offset_reset="earliest"
    )

    class FromTheBeginning(ConsumerRebalanceListener):
        """Every assigned partition is read from its first retained offset: the histories live in memory only."""

        async def on_partitions_revoked(self, revoked) -> None:
            return None

        async def on_partitions_assigned(self, assigned) -> None:
            if assigned:
                await consumer.seek_to_beginning(*assigned)

    consumer.subscribe([settings.topic_events], listener=FromTheBeginning())
    await consumer.start()
    try:
        stop = stop or threading.Event()
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
            for records in batches.values():
                parts = [p.parsed for r in records for p in parse_message(r.value, r.key)]
                learner.observe(p for p in parts if isinstance(p, Event | Forget))
            if learner.due():
                await asyncio.to_thread(learner.step)
                await consumer.commit()
    finally:
        await consumer.stop()
    return learner
