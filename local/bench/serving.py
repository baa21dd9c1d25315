"""Throughput of the exported model: in-process onnxruntime vs the twin served by the local tritonserver.

Both sides run the
same `model.onnx` with the same intra-op thread count, on pre-batched requests, one request in flight (the worker
sends one batch per partition at a time), so the ratio is Triton's per-request overhead (gRPC, shared memory to
the python stub, the python backend) at each batch size.

    .venv/bin/python -m local.bench.serving --repo artifacts/model_repository-twin
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from core.encoding import INPUT_NAMES, example_inputs
from local.process import process_tree_cpu_s

MODEL_NAME = "interest_transformer"


@dataclass(frozen=True)
class Throughput:
    batch: int
    onnxruntime_seq_s: float  # in-process, same model.onnx and thread count
    triton_seq_s: float  # twin over gRPC, one request in flight
    triton_ms_per_request: float
    # CPU time per sequence (all processes involved: the client, and tritonserver with its python stub). Less
    # sensitive than wall time to other jobs sharing the cores; None when the server is not ours to inspect.
    onnxruntime_cpu_us_per_seq: float
    triton_cpu_us_per_seq: float | None

    @property
    def ratio(self) -> float:
        """How many times slower Triton is than in-process onnxruntime (1.0 = no overhead)."""
        return self.onnxruntime_seq_s / self.triton_seq_s

    @property
    def cpu_ratio(self) -> float | None:
        return self.triton_cpu_us_per_seq / self.onnxruntime_cpu_us_per_seq if self.triton_cpu_us_per_seq else None


def _measure(call: Callable[[], object], batch: int, seconds: float, cpu: Callable[[], float]) -> tuple[float, float]:
    """(sequences/s, CPU microseconds per sequence) of calling `call` for about `seconds`."""
    for _ in range(2):
        call()
    n, t0, c0 = 0, time.perf_counter(), cpu()
    while (elapsed := time.perf_counter() - t0) < seconds or n < 2:
        call()
        n += 1
    return n * batch / elapsed, 1e6 * (cpu() - c0) / (n * batch)


def ort_session(onnx_path: Path | str, threads: int):
    """The session the twin builds (models/triton_twin.py), so in-process numbers compare like with like."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def bench_serving(
    twin_repo: Path | str,
    batch_sizes: Sequence[int] = (1, 32, 256),
    seconds: float = 3.0,
    rounds: int = 3,
    grpc_url: str | None = None,
    intra_op_threads: int | None = None,
) -> list[Throughput]:
    """Sequences/s per batch size, best of `rounds` alternating rounds (`seconds` per side in all).

    Starts (and stops) a LocalTriton on `twin_repo` unless `grpc_url` points at a running server.
    """
    import tritonclient.grpc as grpcclient

    from local.triton import LocalTriton

    model_dir = Path(twin_repo) / MODEL_NAME
    meta = json.loads((model_dir / "metadata.json").read_text())
    max_len, n_items = meta["encoder_config"]["max_len"], meta["n_items"]
    outputs = [o["name"] for o in meta["outputs"]]
    session = ort_session(model_dir / "1" / "model.onnx", intra_op_threads or _twin_threads(model_dir))

    server = None if grpc_url else LocalTriton(twin_repo).start()
    pid = server.pid if server else None
    server_cpu = (lambda: time.process_time() + process_tree_cpu_s(pid)) if pid else time.process_time  # type: ignore[arg-type]
    try:
        client = grpcclient.InferenceServerClient(grpc_url or server.grpc_url)  # type: ignore[union-attr]
        results = []
        for batch in batch_sizes:
            x = example_inputs(batch, max_len, n_items, seed=batch)
            inputs = []
            for name in INPUT_NAMES:
                t = grpcclient.InferInput(name, list(x[name].shape), "INT64")
                t.set_data_from_numpy(x[name])
                inputs.append(t)
            requested = [grpcclient.InferRequestedOutput(n) for n in outputs]
            local, served, local_cpu, served_cpu = 0.0, 0.0, float("inf"), float("inf")
            for _ in range(rounds):  # alternate, keep the best: other jobs on the machine only ever slow a round
                rate, cpu = _measure(lambda x=x: session.run(outputs, x), batch, seconds / rounds, time.process_time)
                local, local_cpu = max(local, rate), min(local_cpu, cpu)
                call = lambda i=inputs, r=requested: client.infer(MODEL_NAME, i, outputs=r)  # noqa: E731
                rate, cpu = _measure(call, batch, seconds / rounds, server_cpu)
                served, served_cpu = max(served, rate), min(served_cpu, cpu)
            results.append(
                Throughput(batch, local, served, 1000 * batch / served, local_cpu, served_cpu if pid else None)
            )
        return results
    finally:
        if server is not None:
            server.stop()


def _twin_threads(model_dir: Path) -> int:
    """The twin's own rule (models/triton_twin.py): the config parameter, 0 = min(4, cores)."""
    text = (model_dir / "config.pbtxt").read_text()
    key = text.find('key: "intra_op_threads"')
    value = text[key:].split('string_value: "', 1)[1].split('"', 1)[0] if key >= 0 else "0"
    return int(value) or min(4, os.cpu_count() or 1)


def format_table(results: Sequence[Throughput]) -> str:
    rows = [
        "| batch | onnxruntime in-process (seq/s) | Triton twin over gRPC (seq/s) | wall slowdown "
        "| CPU µs/seq in-process | CPU µs/seq Triton (client+server) | CPU ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        served_cpu = f"{r.triton_cpu_us_per_seq:,.0f}" if r.triton_cpu_us_per_seq else "-"
        cpu_ratio = f"{r.cpu_ratio:.2f}x" if r.cpu_ratio else "-"
        rows.append(
            f"| {r.batch} | {r.onnxruntime_seq_s:,.0f} | {r.triton_seq_s:,.0f} | {r.ratio:.2f}x "
            f"| {r.onnxruntime_cpu_us_per_seq:,.0f} | {served_cpu} | {cpu_ratio} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("artifacts/model_repository-twin"))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--seconds", type=float, default=6.0, help="per side and batch size, over all rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = parser.parse_args()
    results = bench_serving(args.repo, args.batch, args.seconds, args.rounds)
    print(
        json.dumps([asdict(r) | {"ratio": r.ratio, "cpu_ratio": r.cpu_ratio} for r in results])
        if args.json
        else format_table(results)
    )


if __name__ == "__main__":
    main()
