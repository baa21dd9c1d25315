"""`interest-stream bench live` end to end with tiny settings: its own broker, Triton twin (tiny model) and worker,
one short rate; the RESULT line parses and its numbers are sane. Not a timing test: the figures are not judged."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from local import longpoll

pytestmark = [pytest.mark.broker, pytest.mark.triton]


def parse_result(output: str) -> dict[str, float]:
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line in:\n{output[-3000:]}"
    return {k: float(v) for k, v in re.findall(r"(\w+)=(\S+)", lines[-1])}


@pytest.mark.parametrize("envelope", [1, 5])
def test_bench_live_tiny_run(tiny_export: Any, tmp_path: Path, envelope: int) -> None:
    """Plain events, and batch envelopes of 5 events of one user (the same offered event rate)."""
    work = tmp_path / "live"
    cmd = [sys.executable, "-c", "from local.cli import app; app()", "bench", "live",
           "--repo", str(tiny_export.twin), "--work-dir", str(work), "--rates", "30", "--seconds", "3",
           "--users", "200", "--warmup-s", "1", "--idle-s", "2", "--cost-events", "1000",
           "--slo-ms", "1000", "--envelope", str(envelope)]  # fmt: skip
    env = os.environ | {"COLUMNS": "160", "TERM": "dumb"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    result = parse_result(output)
    assert set(result) >= {"live_capacity_eps", "p99_ms_at_capacity", "worker_vs_faust_noop", "idle_worker_core"}
    # 30 ev/s of a tiny model is far below what the box does: served in full, well within a generous 1 s SLO
    assert result["live_capacity_eps"] == 30, output[-3000:]
    assert 0 < result["p99_ms_at_capacity"] <= 1000
    assert math.isfinite(result["worker_vs_faust_noop"]) and result["worker_vs_faust_noop"] > 0.5
    assert 0 <= result["idle_worker_core"] < 0.2  # behind the shim (0.03 measured); without it ~0.7
    assert result["idle_worker_core_no_longpoll"] > result["idle_worker_core"]
    assert result["longpoll_ms"] == longpoll.DEFAULT_MAX_WAIT_MS
    # the fence's cost, from the worker's own histogram: two coordinator round trips per batch, a part of its time
    assert result["fence_ms_at_capacity"] > 0 and 0 < result["fence_share_at_capacity"] < 1
    assert "100.0%" in output  # the per-rate table: everything served
    assert (work / "live-capacity.png").stat().st_size > 0
    assert result.get("envelope", 1) == envelope
    messages = int(re.search(r"1,000 events in ([\d,]+) messages", output).group(1).replace(",", ""))  # type: ignore[union-attr]
    assert messages == 1000 if envelope == 1 else 200 <= messages < 1000
