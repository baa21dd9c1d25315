"""`interest-stream bench model`: the previous served graph and the new one, side by side in one run.

Both sides are twin repositories written by `interest-stream export` (each `model.onnx` with its vocabulary and
metadata); the previous one is what is served today. Rounds alternate between the two graphs, so load from other
jobs on the machine hits both alike and the *ratio* is what a run measures; absolute CPU times move with the box.

* cost: CPU milliseconds per sequence, in-process onnxruntime (the twin's session options) at each thread count
  and batch size, and through the twin (tritonserver over gRPC, client + server CPU);
* agreement: the largest difference per shared output on the same random histories, over all rows and over the
  rows short enough that both graphs read all of them (where a serving length cap cannot matter);
* quality: next-item NDCG@10 of each *served* graph on the evaluation protocol's test users (models.data.split),
  from its top items with every item of the full history filtered, as `interest-stream eval` filters them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.encoding import INPUT_NAMES, PAD, EncoderConfig, Vocabulary, encode_batch, example_inputs
from local.bench.serving import MODEL_NAME, _measure, ort_session
from local.process import process_tree_cpu_s


@dataclass(frozen=True)
class Cost:
    where: str  # "onnxruntime" (in-process) or "twin" (tritonserver over gRPC: client + server CPU)
    threads: int  # intra-op threads (the twin: its config's)
    batch: int
    previous_ms: float  # CPU milliseconds per sequence, best of the rounds
    new_ms: float

    @property
    def speedup(self) -> float:
        return self.previous_ms / self.new_ms


@dataclass(frozen=True)
class Graph:
    """One exported twin model: its ONNX file and the bundle the worker reads next to it."""

    repo: Path
    meta: dict[str, Any]
    vocab: Vocabulary

    @classmethod
    def open(cls, repo: Path | str) -> Graph:
        d = Path(repo) / MODEL_NAME
        vocab = Vocabulary.from_json((d / "vocab.json").read_text())
        return cls(Path(repo), json.loads((d / "metadata.json").read_text()), vocab)

    @property
    def onnx(self) -> Path:
        return self.repo / MODEL_NAME / str(self.meta.get("triton_version", 1)) / "model.onnx"

    @property
    def outputs(self) -> list[str]:
        return [o["name"] for o in self.meta["outputs"]]

    @property
    def encoder(self) -> EncoderConfig:
        return EncoderConfig.from_dict(self.meta["encoder_config"])

    @property
    def serve_len(self) -> int:
        """How many of the newest events the Transformer reads (the input width when uncapped)."""
        return (self.meta.get("model_config") or {}).get("serve_len") or self.encoder.max_len


@dataclass
class ModelBench:
    costs: list[Cost]
    agreement: dict[str, float]  # output -> largest |previous - new| (top_items: share of rows that differ)
    agreement_short: dict[str, float]  # the same over histories no longer than both graphs' serve_len
    ndcg10: float | None
    ndcg10_previous: float | None
    onnx_mib: tuple[float, float]  # previous, new
    notes: list[str] = field(default_factory=list)

    def cost(self, where: str, threads: int, batch: int) -> Cost | None:
        return next((c for c in self.costs if (c.where, c.threads, c.batch) == (where, threads, batch)), None)


def _interleaved(
    calls: tuple[Callable[[], object], Callable[[], object]], batch: int, seconds: float, rounds: int, cpu
) -> tuple[float, float]:
    """CPU ms per sequence of (previous, new), best of `rounds` alternating rounds of seconds / rounds each."""
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, call in enumerate(calls):
            best[i] = min(best[i], _measure(call, batch, seconds / rounds, cpu)[1] / 1000)
    return best[0], best[1]


def in_process_costs(
    previous: Graph, new: Graph, threads: Sequence[int], batches: Sequence[int], seconds: float, rounds: int
) -> list[Cost]:
    costs = []
    for t in threads:
        sessions = ort_session(previous.onnx, t), ort_session(new.onnx, t)
        for b in batches:
            x = example_inputs(b, new.encoder.max_len, len(new.vocab), seed=b)
            calls = (lambda: sessions[0].run(None, x), lambda: sessions[1].run(None, x))  # noqa: B023 (called here)
            costs.append(Cost("onnxruntime", t, b, *_interleaved(calls, b, seconds, rounds, time.process_time)))
    return costs


def twin_costs(previous: Graph, new: Graph, batches: Sequence[int], seconds: float, rounds: int) -> list[Cost]:
    """Both twins served at once by two local tritonservers; one request in flight, alternating."""
    import tritonclient.grpc as grpcclient

    from local.bench.serving import _twin_threads
    from local.triton import LocalTriton

    servers = [LocalTriton(g.repo).start() for g in (previous, new)]
    try:
        clients = [grpcclient.InferenceServerClient(s.grpc_url) for s in servers]
        pids = [s.pid for s in servers]
        costs = []
        for b in batches:
            x = example_inputs(b, new.encoder.max_len, len(new.vocab), seed=b)
            calls = []
            for client, g in zip(clients, (previous, new), strict=True):
                inputs = [grpcclient.InferInput(n, list(x[n].shape), "INT64") for n in INPUT_NAMES]
                for t, n in zip(inputs, INPUT_NAMES, strict=True):
                    t.set_data_from_numpy(x[n])
                wanted = [grpcclient.InferRequestedOutput(n) for n in g.outputs]
                calls.append(lambda c=client, i=inputs, w=wanted: c.infer(MODEL_NAME, i, outputs=w))
            best = [float("inf"), float("inf")]
            for _ in range(rounds):
                for i, (call, pid) in enumerate(zip(calls, pids, strict=True)):
                    cpu = lambda p=pid: time.process_time() + process_tree_cpu_s(p)  # noqa: E731
                    best[i] = min(best[i], _measure(call, b, seconds / rounds, cpu)[1] / 1000)
            costs.append(Cost("twin", _twin_threads(new.repo / MODEL_NAME), b, best[0], best[1]))
        return costs
    finally:
        for s in servers:
            s.stop()


def agreement(previous: Graph, new: Graph, rows: int = 512) -> tuple[dict[str, float], dict[str, float]]:
    """Largest |previous - new| per shared output on random histories: all rows, and the rows whose history is
    no longer than either graph's serve_len (a length cap changes nothing there)."""
    x = example_inputs(rows, new.encoder.max_len, len(new.vocab), seed=7)
    names = [n for n in new.outputs if n in previous.outputs]
    got = [dict(zip(names, ort_session(g.onnx, 1).run(names, x), strict=True)) for g in (previous, new)]
    short = (x["item_ids"] != PAD).sum(1) <= min(previous.serve_len, new.serve_len)

    def diff(keep: np.ndarray) -> dict[str, float]:
        out = {}
        for n in names:
            a, b = got[0][n][keep], got[1][n][keep]
            out[n] = (
                float((a != b).any(axis=tuple(range(1, a.ndim))).mean())
                if "top_items" in n
                else float(np.abs(a - b).max(initial=0.0))
            )
        return out

    return diff(np.ones(rows, dtype=bool)), diff(short)


def served_ndcg10(graph: Graph, dataset: str = "movielens", batch: int = 128) -> float:
    """Next-item NDCG@10 of the served graph on the protocol's test users: its top items, best first, with the
    items of the full history removed (the graph sees only the encoded window; k >= 10 + what it leaves in)."""
    from models.data import load, split
    from models.ranking import next_item_metrics, seen_mask

    ds = load(dataset)
    sp = split(ds)
    targets = graph.vocab.indices(ds.vocab.item(int(t)) or "" for t in sp.test_targets)  # unknown: OOV, a miss
    x = encode_batch(sp.test_inputs, graph.vocab, graph.encoder)
    session = ort_session(graph.onnx, 1)
    chunks = range(0, len(sp.test_targets), batch)
    top = np.concatenate([session.run(["top_items"], {n: v[a : a + batch] for n, v in x.items()})[0] for a in chunks])
    seen = seen_mask(sp.test_inputs, graph.vocab)
    scores = np.full(seen.shape, -np.inf, dtype=np.float32)
    rank_score = np.arange(top.shape[1], 0, -1, dtype=np.float32)
    np.put_along_axis(scores, top, rank_score[None, :], axis=1)
    scores[seen] = -np.inf
    return next_item_metrics(scores, targets, 10)["ndcg10"]


def run(
    repo: Path | str,
    previous: Path | str,
    *,
    threads: Sequence[int] = (1, 2),
    batches: Sequence[int] = (1, 8, 32, 128),
    twin_batches: Sequence[int] = (32, 128),
    seconds: float = 3.0,
    rounds: int = 3,
    dataset: str | None = "movielens",
    log: Callable[[str], object] = print,
) -> ModelBench:
    prev, new = Graph.open(previous), Graph.open(repo)
    if prev.encoder.max_len != new.encoder.max_len or prev.vocab.items != new.vocab.items:
        raise ValueError("the two graphs must take the same inputs (max_len, vocabulary)")
    log(f"previous {prev.onnx} ({prev.onnx.stat().st_size / 2**20:.1f} MiB), new {new.onnx}")
    full, short = agreement(prev, new)
    log(f"agreement: {full}; histories <= {min(prev.serve_len, new.serve_len)} events: {short}")
    costs = in_process_costs(prev, new, threads, batches, seconds, rounds)
    for c in costs:
        log(f"onnxruntime threads {c.threads} batch {c.batch}: {c.previous_ms:.3f} -> {c.new_ms:.3f} ms/seq")
    if twin_batches:
        costs += twin_costs(prev, new, twin_batches, seconds, rounds)
    ndcg = (served_ndcg10(new, dataset), served_ndcg10(prev, dataset)) if dataset else (None, None)
    mib = (prev.onnx.stat().st_size / 2**20, new.onnx.stat().st_size / 2**20)
    return ModelBench(costs, full, short, ndcg[0], ndcg[1], mib)


def format_table(r: ModelBench) -> str:
    rows = ["| where | threads | batch | previous CPU ms/seq | new CPU ms/seq | speed-up |"]
    rows.append("|---|---:|---:|---:|---:|---:|")
    rows += [
        f"| {c.where} | {c.threads} | {c.batch} | {c.previous_ms:.3f} | {c.new_ms:.3f} | {c.speedup:.2f}x |"
        for c in r.costs
    ]
    return "\n".join(rows)


def result_line(r: ModelBench) -> str:
    c = r.cost("onnxruntime", 1, 32)
    parts = [f"cpu_ms_per_seq_batch32={c.new_ms:.3f}", f"speedup_vs_previous={c.speedup:.2f}"] if c else []
    if r.ndcg10 is not None:
        parts += [f"ndcg10={r.ndcg10:.4f}", f"ndcg10_previous={r.ndcg10_previous:.4f}"]
    if t := next((c for c in r.costs if c.where == "twin" and c.batch == 32), None):
        parts.append(f"twin_speedup_batch32={t.speedup:.2f}")
    parts.append(f"onnx_mib={r.onnx_mib[1]:.1f}")
    return "RESULT " + " ".join(parts)


def print_result(r: ModelBench) -> None:
    print(format_table(r))
    print(result_line(r))
