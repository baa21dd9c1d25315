"""The README's run command end to end: `interest-stream demo` as a user runs it (a subprocess), on a cached
tiny model, then Ctrl-C; every server it started must be gone afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from local.pipeline import http_get, http_json
from local.scrape import histogram_quantile

pytestmark = [pytest.mark.broker, pytest.mark.triton]


def _children(pid: int) -> list[int]:
    """PIDs of the live direct children of `pid` (the servers the demo started, each in its own session)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,stat="], capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines()]
    return [int(p) for p, pp, stat in rows if int(pp) == pid and not stat.startswith("Z")]


def test_demo_runs_end_to_end_and_stops_everything_on_ctrl_c(ml_export: Any, tmp_path: Path) -> None:
    artifacts = ml_export.production.parent  # <tmp>/artifacts with model_repository(-twin): the cached model
    work = tmp_path / "demo"
    cmd = [sys.executable, "-c", "from local.cli import app; app()", "demo", "--artifacts", str(artifacts),
           "--work-dir", str(work), "--users", "40", "--keep-running"]  # fmt: skip
    env = os.environ | {"COLUMNS": "160", "TERM": "dumb"}
    # A shell's background job ignores SIGINT and Python keeps an inherited SIG_IGN: give the demo a terminal's
    # default Ctrl-C whatever runs the tests (`make test &` hung here before).
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 300
        assert proc.stdout is not None
        while not any("running until Ctrl-C" in line for line in lines):
            assert time.monotonic() < deadline, "".join(lines)
            line = proc.stdout.readline()
            assert line, f"demo exited early ({proc.poll()}):\n" + "".join(lines)
            lines.append(line)
        text = "".join(lines)
        assert "training" not in text and "exporting" not in text, "a cached model is reused"
        assert "interest updates" in text and text.count("top genres:") == 3 and "top movies:" in text
        assert text.count("driven by sessions:") == 3 and "ratings, " in text.split("driven by sessions:")[1]
        web = next(line.split()[1] for line in lines if line.startswith("http "))
        web = web.removesuffix("/users/<user_id>/interest")
        assert http_json(f"{web}/health")["status"] == "ok"
        user = next(line.split()[1] for line in lines if line.startswith("user "))
        assert http_json(f"{web}/users/{user}/interest")["user_id"] == user
        status, body = http_get(f"{web}/users/no-such-user/interest")
        assert status == 404 and body == {"error": "unknown user 'no-such-user'"}
        servers = _children(proc.pid)
        assert len(servers) == 3, "broker, Triton and the worker run as the demo's children"
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, rest
        assert "stopped." in rest
    finally:
        if proc.poll() is None:
            proc.kill()
    alive = [pid for pid in servers if Path(f"/proc/{pid}").exists()]
    assert not alive, f"every server the demo started is stopped: {alive} still run"


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = ((0.01, 50.0), (0.1, 90.0), (1.0, 100.0), (float("inf"), 100.0))
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.01 + 0.09 * 0.5)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.1 + 0.9 * 0.9)
    assert histogram_quantile(0.5, ()) is None
