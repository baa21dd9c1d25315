"""The CPU twin served by the real tritonserver (nvidia-pytriton), and the server's lifecycle by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from core.encoding import example_inputs
from local.triton import LocalTriton
from models.export import OUTPUT_NAMES, SCENARIO_OUTPUTS
from tests.fixtures.triton import TINY_ITEMS

pytestmark = pytest.mark.triton

SERVED = (*OUTPUT_NAMES, *SCENARIO_OUTPUTS)  # the tiny model knows two scenarios


def infer(client: grpcclient.InferenceServerClient, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    inputs = []
    for name, value in x.items():
        t = grpcclient.InferInput(name, list(value.shape), "INT64")
        t.set_data_from_numpy(value)
        inputs.append(t)
    outputs = [grpcclient.InferRequestedOutput(n) for n in SERVED]
    result = client.infer("interest_transformer", inputs, outputs=outputs)
    return {n: result.as_numpy(n) for n in SERVED}


def test_twin_returns_what_onnxruntime_returns(triton_twin, tiny_export) -> None:
    session = ort.InferenceSession(str(tiny_export.onnx_path), providers=["CPUExecutionProvider"])
    client = grpcclient.InferenceServerClient(triton_twin.grpc_url)
    for batch in (1, 7, 256):
        x = example_inputs(batch, 200, TINY_ITEMS, seed=batch, n_scenarios=2)
        x["item_ids"][0] = 0  # an empty history too
        want = dict(zip(SERVED, session.run(list(SERVED), x), strict=True))
        got = infer(client, x)
        for name in SERVED:
            assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)


def test_concurrent_requests_are_batched_and_split_back_in_order(triton_twin, tiny_export) -> None:
    """Dynamic batching hands the python model several requests at once; each caller gets its own rows."""
    session = ort.InferenceSession(str(tiny_export.onnx_path), providers=["CPUExecutionProvider"])
    xs = [example_inputs(b, 200, TINY_ITEMS, 100 + i, n_scenarios=2) for i, b in enumerate((3, 1, 16, 5, 32, 2, 9, 4))]
    stats = grpcclient.InferenceServerClient(triton_twin.grpc_url)
    before = executions(stats)
    with ThreadPoolExecutor(len(xs)) as pool:
        clients = [grpcclient.InferenceServerClient(triton_twin.grpc_url) for _ in xs]
        results = list(pool.map(infer, clients, xs))
    deadline = time.monotonic() + 10  # Triton updates its statistics just after it answered
    while (delta := [a - b for a, b in zip(executions(stats), before, strict=True)])[0] < len(xs):
        assert time.monotonic() < deadline, f"statistics count {delta[0]} of {len(xs)} requests"
        time.sleep(0.05)
    requests, runs = delta
    assert requests == len(xs) and runs < requests, f"{requests} requests ran as {runs} executions: none batched"
    for x, got in zip(xs, results, strict=True):
        want = session.run(list(SERVED), x)
        for name, w in zip(SERVED, want, strict=True):
            np.testing.assert_allclose(got[name], w, atol=1e-6, err_msg=name)


def executions(client: grpcclient.InferenceServerClient) -> tuple[int, int]:
    """(successful requests, model executions) so far, from Triton's statistics: fewer executions than requests
    means the dynamic batcher put several requests into one execution."""
    stats = client.get_inference_statistics("interest_transformer", as_json=True)["model_stats"][0]
    return int(stats["inference_stats"]["success"].get("count", 0)), int(stats.get("execution_count", 0))


def test_model_metadata_over_grpc_matches_the_config(triton_twin) -> None:
    client = grpcclient.InferenceServerClient(triton_twin.grpc_url)
    meta = client.get_model_metadata("interest_transformer", as_json=True)
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        (n, "INT64", ["-1", "200"]) for n in ("item_ids", "event_types", "session_pos", "time_gaps", "scenarios")
    ]
    assert [o["name"] for o in meta["outputs"]] == list(SERVED)


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except OSError:
        return None


def test_lifecycle_start_ready_sigterm(tiny_export, tmp_path) -> None:
    server = LocalTriton(tiny_export.twin, log_file=tmp_path / "triton.log")
    with server:
        pid = server.pid
        assert server.is_alive() and pid
        assert _http_status(f"{server.http_url}/v2/models/interest_transformer/ready") == 200
        assert _http_status(server.metrics_url) == 200
        assert server.grpc_url.startswith("127.0.0.1:")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while server.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not server.is_alive(), "SIGTERM did not stop tritonserver"
        assert server.stop() == 0  # exited cleanly; stop() after exit is a no-op
    assert _http_status(f"{server.http_url}/v2/health/live") is None
    assert "Signal (15) received" in server.logs()


def test_a_model_that_fails_to_load_fails_start_with_the_log(tmp_path) -> None:
    bad = tmp_path / "repo" / "broken" / "1"
    bad.mkdir(parents=True)
    (bad.parent / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nmax_batch_size: 0\n')
    (bad / "model.py").write_text("raise ImportError('deliberately broken')\n")
    server = LocalTriton(tmp_path / "repo", log_file=tmp_path / "triton.log", ready_timeout_s=60)
    with pytest.raises(RuntimeError, match="deliberately broken"):
        server.start()
    assert not server.is_alive()


def test_cli_serves_until_sigterm(tiny_export) -> None:
    """`interest-stream triton --repo DIR` prints the endpoints, then stops the server on SIGTERM."""
    cmd = [sys.executable, "-c", "from local.cli import app; app()", "triton", "--repo", str(tiny_export.twin)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("grpc"):
                break
        grpc_url = lines[-1].split()[-1]
        assert grpcclient.InferenceServerClient(grpc_url).is_model_ready("interest_transformer"), lines
        pid_line = next(x for x in lines if x.startswith("pid"))
        server_pid = int(pid_line.split()[-1])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(server_pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serving_bench_returns_numbers(triton_twin, tiny_export) -> None:
    from local.bench.serving import bench_serving, format_table

    results = bench_serving(tiny_export.twin, (1, 8), seconds=0.2, rounds=1, grpc_url=triton_twin.grpc_url)
    assert [r.batch for r in results] == [1, 8]
    assert all(r.onnxruntime_seq_s > 0 and r.triton_seq_s > 0 and r.ratio > 0 for r in results)
    assert "| 8 |" in format_table(results)
