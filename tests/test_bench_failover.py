"""`interest-stream bench failover` end to end on a tiny model and a few hundred users (the figure itself is in
docs/benchmarks.md; this shows the benchmark runs and measures what it says)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from local.bench.failover import assigned, print_result, run

pytestmark = [pytest.mark.broker, pytest.mark.triton, pytest.mark.slow]


def test_assigned_reads_the_last_assignment_faust_logged() -> None:
    log = (
        "Setting newly assigned partitions \n| events | {0-3} |\n for group g\n"
        "Setting newly assigned partitions \n+---+\n| events | {1, 4-5} |\n| events-changelog | {0-7} |\n"
    )
    assert assigned(log, "events") == {1, 4, 5} and assigned("", "events") == set()


def test_the_benchmark_kills_a_worker_and_times_the_takeover(
    tiny_export: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run(tiny_export.twin, tmp_path / "work", users=300, workers=2, partitions=4, rate=50.0, settle_s=1.0)
    assert [r.standby for r in result.runs] == [1, 0]
    for r in result.runs:
        assert r.moved and set(r.per_partition_s) == set(r.moved), "every moved partition published again"
        assert all(s > 0 for s in r.per_partition_s.values()) and r.takeover_s == max(r.per_partition_s.values())
    assert result.restore_users == 300 and result.restore_users_per_s > 0
    print_result(result)
    assert capsys.readouterr().out.splitlines()[-1].startswith("RESULT takeover_s_standby=")
