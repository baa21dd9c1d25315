"""A real Prometheus (Debian's package) scraping a running worker and the local Triton with the project's own
scrape config and rules: after a short replay, the series SREs rely on carry the right values.

Only the targets/ files (the documented templating point) and the scrape interval differ from production.
"""

from __future__ import annotations

import json
import shutil
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.schema import decode_record
from local.pipeline import LocalPipeline
from local.process import Supervised, free_port
from local.replay import replay
from tests.fixtures.worker import read_topic, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.triton]
PROM = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"


class Prometheus:
    """`prometheus` on a free 127.0.0.1 port with a copy of deploy/prometheus/, stopped by PID (SIGTERM)."""

    def __init__(self, root: Path, workers: list[str], triton: str) -> None:
        self.root, self.port = root, free_port()
        shutil.copytree(PROM / "rules", root / "rules")
        config = yaml.safe_load((PROM / "prometheus.yml").read_text())
        config["global"] |= {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
        for job in config["scrape_configs"]:
            for sd in job.get("file_sd_configs", ()):
                sd["refresh_interval"] = "1s"
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        (root / "targets").mkdir()
        (root / "targets" / "workers.yml").write_text(yaml.safe_dump([{"targets": workers}]))
        (root / "targets" / "triton.yml").write_text(yaml.safe_dump([{"targets": [triton]}]))
        self.process: Supervised | None = None

    def start(self) -> Prometheus:
        prometheus = shutil.which("prometheus")
        assert prometheus, "Debian's prometheus package is missing: `bash scripts/setup.sh` installs it"
        cmd = [prometheus, f"--config.file={self.root / 'prometheus.yml'}", f"--storage.tsdb.path={self.root / 'data'}",
               f"--web.listen-address=127.0.0.1:{self.port}"]  # fmt: skip
        self.process = Supervised("prometheus", cmd, self.root / "prometheus.log", cwd=self.root).start()
        self.process.wait_until(lambda: self._get("/-/ready") is not None, 60, "ready")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def _get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return response.read()
        except OSError:
            return None

    def query(self, promql: str) -> list[dict[str, Any]]:
        body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert body is not None, f"prometheus did not answer {promql!r}"
        data = json.loads(body)
        assert data["status"] == "success", data
        return data["data"]["result"]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None


@pytest.fixture
def pipeline(ml_export: Any, tmp_path: Path) -> Iterator[LocalPipeline]:
    with LocalPipeline(tmp_path / "pipeline", repo=ml_export.twin, partitions=4) as pipe:
        yield pipe


def test_real_prometheus_sees_what_the_worker_did(pipeline: LocalPipeline, tmp_path: Path) -> None:
    assert pipeline.triton is not None
    worker_target = f"127.0.0.1:{pipeline.settings.metrics_port}"
    triton_target = pipeline.triton.metrics_url.removeprefix("http://").removesuffix("/metrics")
    prom = Prometheus(tmp_path / "prometheus", [worker_target], triton_target).start()
    try:
        wait_for(lambda: prom.value('min(up{job=~"interest-stream-worker|triton"})') == 1, 60, "both targets up")
        sent = replay(pipeline.settings, "movielens", users=25, progress=False).sent
        outputs = wait_for(lambda: _outputs_when_done(pipeline, sent), 180, "the worker to publish every update")
        users = {decode_record(r.value).user_id for r in outputs}

        def scraped() -> bool:
            return prom.value("sum(interest_events_consumed_total)") == sent and prom.value(
                "sum(interest_outputs_published_total)"
            ) == len(outputs)

        wait_for(scraped, 60, "prometheus to scrape the final counters")
        assert prom.value('sum(interest_events_consumed_total{event_type="rating"})') == sent
        assert prom.value("sum(interest_outputs_published_total)") == len(outputs) >= len(users) == 25
        assert (prom.value("sum(interest_events_rejected_total)") or 0) == 0
        # Triton refreshes its own counters every --metrics-interval-ms, so wait for them rather than read once
        wait_for(
            lambda: (prom.value('sum(nv_inference_count{model="interest_transformer"})') or 0) >= len(outputs),
            60,
            "prometheus to scrape Triton's inference count",
        )
        assert prom.value("sum(interest_inference_batch_size_sum)") == len(outputs)
        assert prom.value("interest_triton_circuit_open") == 0
        info = prom.query("interest_worker_info")
        assert info and info[0]["metric"]["model_name"] == "interest_transformer"
        # the project's recording rules evaluate on the real series
        # (a series, not a positive rate: if the first scrape already saw the final count, the rate is 0)
        wait_for(lambda: prom.value("interest:events_consumed:rate5m") is not None, 60, "a recording rule")
        alerts = json.loads(prom._get("/api/v1/rules?type=alert") or b"{}")["data"]["groups"]
        assert sum(len(g["rules"]) for g in alerts) >= 10, "the alert rules are loaded"
    finally:
        prom.stop()


def _outputs_when_done(pipe: LocalPipeline, sent: int) -> list[Any] | None:
    """The output records once the worker has handled every event and nothing waits for inference."""
    from local.scrape import Snapshot

    snap = Snapshot.scrape(pipe.metrics_url)
    if snap.handled < sent or snap.pending:
        return None
    records = read_topic(pipe.settings, pipe.settings.topic_output)
    return records if len(records) == snap.outputs else None
