"""The worker refuses to start on a variable named like a setting that is none (`WORKER_BACH_MAX=500` would be
dropped without a word), and never on the variables others put in its environment: the project's own tooling
(FAULT_*, the longpoll shim, the test fixtures), the deployment files, and the service links Kubernetes adds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from local import longpoll
from local.worker import FAULT_VARIABLES, settings_env
from stream.settings import ENV_PREFIXES, Settings, UnknownSetting, check_environment, unknown_variables
from tests.test_deploy import OVERLAYS, kustomize_build, worker_env_sources

ROOT = Path(__file__).parents[1]


def test_a_misspelled_variable_is_named_with_the_closest_setting() -> None:
    env = {"WORKER_BACH_MAX": "500", "KAFKA_BOOTSTRAP_SERVER": "k:9092", "metrics_prot": "9", "MODEL_XYZZY_QUUX": "1"}
    assert unknown_variables(env) == [
        "KAFKA_BOOTSTRAP_SERVER is not a setting (did you mean KAFKA_BOOTSTRAP_SERVERS?)",
        "MODEL_XYZZY_QUUX is not a setting",
        "WORKER_BACH_MAX is not a setting (did you mean WORKER_BATCH_MAX?)",
        "metrics_prot is not a setting (did you mean METRICS_PORT?)",  # read case-insensitively, so checked so
    ]
    with pytest.raises(UnknownSetting, match=r"^KAFKA_BOOTSTRAP_SERVER is not a setting .*stream/settings\.py"):
        check_environment(env)


def test_settings_and_the_variables_of_others_are_not_refused() -> None:
    settings = {name.upper(): "1" for name in Settings.model_fields} | {"worker_batch_max": "5"}
    tooling = {name: "1" for name in (*FAULT_VARIABLES, "FAULT_KILL_AFTER_OUTPUTS", longpoll.ENV, longpoll.ENV_MS)}
    others = {"PATH": "/bin", "APP_ENV": "prod", "TEST_KAFKA_BOOTSTRAP_SERVERS": "k:9092", "HYPOTHESIS_PROFILE": "x"}
    others |= {"INTEREST_DATA_DIR": "/data", "NOOP_EVENTS": "1", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert unknown_variables(settings | tooling | others) == []
    check_environment(settings | tooling | others)


def test_every_setting_but_app_id_has_a_checked_prefix() -> None:
    """A new group of settings needs its prefix in ENV_PREFIXES, or its typos would pass unnoticed."""
    assert [n for n in Settings.model_fields if not n.upper().startswith(ENV_PREFIXES)] == ["app_id"]


def service_links(service: dict[str, Any]) -> dict[str, str]:
    """The variables Kubernetes puts into every container of the namespace for one Service (enableServiceLinks)."""
    name = service["metadata"]["name"].upper().replace("-", "_")
    env = {f"{name}_SERVICE_HOST": "10.0.0.7"}
    for i, port in enumerate(service["spec"]["ports"]):
        number, proto = port["port"], port.get("protocol", "TCP")
        url = f"{proto.lower()}://10.0.0.7:{number}"
        env[f"{name}_SERVICE_PORT" + (f"_{port['name'].upper().replace('-', '_')}" if "name" in port else "")] = "1"
        env |= {f"{name}_PORT_{number}_{proto}": url, f"{name}_PORT_{number}_{proto}_PROTO": proto.lower()}
        env |= {f"{name}_PORT_{number}_{proto}_PORT": str(number), f"{name}_PORT_{number}_{proto}_ADDR": "10.0.0.7"}
        if i == 0:
            env[f"{name}_PORT"] = url
            env[f"{name}_SERVICE_PORT"] = str(number)
    return env


def test_the_deployments_give_the_worker_nothing_it_refuses() -> None:
    """Every worker environment of compose, the overlays and the Dockerfile, plus the service links of every Service
    an overlay deploys (the Service `triton` alone gives TRITON_PORT, TRITON_SERVICE_PORT_GRPC, ...)."""
    sources = worker_env_sources()
    for source, env in sources.items():
        assert unknown_variables(env) == [], source
    for overlay in OVERLAYS:
        services = [d for d in kustomize_build(overlay) if d["kind"] == "Service"]
        links = {k: v for s in services for k, v in service_links(s).items()}
        assert "TRITON_PORT_8001_TCP_ADDR" in links and "TRITON_SERVICE_PORT_GRPC" in links
        assert unknown_variables(sources[f"k8s/{overlay.name}"] | links) == [], overlay.name


def test_the_fixtures_leave_an_inherited_typo_behind_and_pass_one_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_BACH_MAX", "500")
    assert "WORKER_BACH_MAX" not in settings_env(Settings(_env_file=None))
    assert settings_env(Settings(_env_file=None), {"WORKER_BACH_MAX": "7"})["WORKER_BACH_MAX"] == "7"


def test_the_worker_refuses_to_start_naming_the_variable_and_the_setting(tmp_path: Path) -> None:
    """The console script exits with the message before it connects anywhere (the broker address is a closed
    port: without the check it would keep retrying it, and the generous timeout below would fail the test)."""
    env = settings_env(Settings(_env_file=None, kafka_bootstrap_servers="127.0.0.1:1", state_dir=tmp_path / "s"))
    env |= {"METRICS_PORT": "0", "WORKER_WEB_PORT": "0", "WORKER_BACH_MAX": "500", "PYTHONPATH": str(ROOT)}
    code = "from stream.worker import main; main()"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert "refusing to start: WORKER_BACH_MAX is not a setting (did you mean WORKER_BATCH_MAX?)" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "s").exists(), "nothing started"
    assert os.environ.get("WORKER_BACH_MAX") is None
