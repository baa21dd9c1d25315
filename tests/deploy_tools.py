"""Helpers for tests/test_deploy.py: a PromQL metric-name extractor, a tiny kustomize renderer, the
worker's exported metric names, and JSON schemas for the CRDs that kubernetes-validate has no schema for.

Kept dependency-free (PyYAML and jsonschema come with kubernetes-validate) so the deployment checks run
offline on a clean clone.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------
# Metric names that exist without being declared in stream/metrics.py.

#: Triton's own metrics (metrics port 8002) for Triton 2.51 (NGC 24.10). The nv_inference_*, nv_cpu_* and
#: nv_pinned_* names were read off the local tritonserver 2.51 (nvidia-pytriton) serving a python-backend
#: model; nv_gpu_* / nv_energy_* need a GPU and come from the "Metrics" page of the Triton user guide.
#: Only names listed here may appear in the dashboard and the rules.
TRITON_METRICS = frozenset(
    {
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_pending_request_count",
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_input_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us",
        "nv_gpu_utilization",
        "nv_gpu_memory_total_bytes",
        "nv_gpu_memory_used_bytes",
        "nv_gpu_power_usage",
        "nv_gpu_power_limit",
        "nv_energy_consumption",
        "nv_cpu_utilization",
        "nv_cpu_memory_total_bytes",
        "nv_cpu_memory_used_bytes",
        "nv_pinned_memory_pool_total_bytes",
        "nv_pinned_memory_pool_used_bytes",
    }
)

#: Series Prometheus makes itself for every target.
PROMETHEUS_SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS"})


def worker_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every metric declared in stream/metrics.py: exposed family name -> (type, label names).

    The exposed name is what a scrape shows: counters get `_total`, info metrics `_info`.
    """
    from prometheus_client.metrics import MetricWrapperBase

    import stream.metrics as module

    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for value in vars(module).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        (family,) = value.describe()
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        found[family.name + suffix] = (family.type, tuple(value._labelnames))
    return found


def worker_series_names() -> set[str]:
    """Names of the series the worker exports (histograms as _bucket/_sum/_count, counters as _total)."""
    names: set[str] = set()
    for name, (kind, _labels) in worker_metrics().items():
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


# ---------------------------------------------------------------------------------------------------------
# PromQL: the metric names an expression selects.

_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = _GROUPING | {"bool", "and", "or", "unless", "offset", "inf", "nan", "atan2"}
_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
#: Grafana's interval variables, replaced by a duration before parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def _skip_string(expr: str, i: int) -> int:
    quote = expr[i]
    i += 1
    while i < len(expr) and expr[i] != quote:
        i += 2 if expr[i] == "\\" and quote != "`" else 1
    if i >= len(expr):
        raise ValueError(f"unterminated string in {expr!r}")
    return i + 1


def _skip_to(expr: str, i: int, close: str) -> int:
    """From an opening bracket at i, return the index after its closing `close` (strings skipped)."""
    i += 1
    while i < len(expr) and expr[i] != close:
        i = _skip_string(expr, i) if expr[i] in "\"'`" else i + 1
    if i >= len(expr):
        raise ValueError(f"unbalanced {close!r} in {expr!r}")
    return i + 1


def label_matchers(expr: str) -> list[str]:
    """The raw `{...}` label-matcher blocks of an expression."""
    return re.findall(r"\{[^{}]*\}", expr)


def promql_metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression.

    A small tokenizer, not a parser: strings, `{...}` matchers, `[...]` ranges and numbers/durations are
    skipped; an identifier followed by `(` is a function or aggregation; `by (...)`-style label lists are
    skipped; keywords are dropped. What is left are metric names (bare or before `{`).
    """
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    if "$" in _STRINGS.sub("", expr):
        raise ValueError(f"unknown variable in {expr!r}")
    names: set[str] = set()
    i = 0
    while i < len(expr):
        ch = expr[i]
        if ch in "\"'`":
            i = _skip_string(expr, i)
        elif ch == "{":
            i = _skip_to(expr, i, "}")
        elif ch == "[":
            i = _skip_to(expr, i, "]")
        elif ch.isdigit() or (ch == "." and i + 1 < len(expr) and expr[i + 1].isdigit()):
            match = re.compile(r"[0-9.]+(?:[eE][+-]?[0-9]+)?[A-Za-z0-9_]*").match(expr, i)
            assert match
            i = match.end()
        elif match := _IDENT.match(expr, i):
            word = match.group()
            i = match.end()
            rest = expr[i:].lstrip()
            if word.lower() in _GROUPING:
                if rest.startswith("("):
                    i = _skip_to(expr, len(expr) - len(rest), ")")
            elif word.lower() in _KEYWORDS or rest.startswith("(") or re.match(r"(?i)(by|without)\b", rest):
                continue  # a keyword, a function, or an aggregation written `sum by (x) (...)`
            else:
                names.add(word)
        else:
            i += 1
    return names


# ---------------------------------------------------------------------------------------------------------
# A tiny kustomize: the subset of kustomization.yaml that deploy/k8s uses, rendered in Python so the
# overlays can be schema-checked without kubectl. Anything outside the subset is an error, not ignored.

KUSTOMIZE_KEYS = {"apiVersion", "kind", "namespace", "resources", "images", "replicas", "patches"}
#: Strategic-merge keys of the list fields the patches touch (from the Kubernetes API's patchMergeKey).
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "StorageClass"}


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _merge_list(field: str, base: list[Any], patch: list[Any]) -> list[Any]:
    key = _MERGE_KEYS.get(field)
    if field == "ports" and all(isinstance(p, dict) for p in base + patch):
        key = "containerPort" if any("containerPort" in p for p in base + patch) else "port"
    if key is None:
        return copy.deepcopy(patch)  # lists without a merge key are replaced, as in kustomize
    # Same order as kustomize: the patch's items (merged into their base item where one exists), then the
    # base items the patch does not mention.
    by_key = {item.get(key): item for item in base}
    patch_keys = {item.get(key) for item in patch}
    merged = [strategic_merge(by_key[i.get(key)], i) if i.get(key) in by_key else copy.deepcopy(i) for i in patch]
    return merged + [copy.deepcopy(item) for item in base if item.get(key) not in patch_keys]


def strategic_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if key.startswith("$patch") or key.startswith("$setElementOrder"):
            raise ValueError(f"patch directive {key} is not supported by tests/deploy_tools.py")
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = strategic_merge(out[key], value)
        elif isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = _merge_list(key, out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    return doc.get("spec", {}).get("template", {}).get("spec") if isinstance(doc.get("spec"), dict) else None


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    """Render a kustomization directory (resources, patches, namespace, images, replicas)."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - KUSTOMIZE_KEYS
    if unknown:
        raise ValueError(f"{directory}: kustomization keys {sorted(unknown)} are not supported by the test renderer")
    docs: list[dict[str, Any]] = []
    for ref in kust.get("resources", []):
        path = directory / ref
        docs += kustomize_build(path) if path.is_dir() else load_yaml_documents(path)
    for entry in kust.get("patches", []):
        if set(entry) != {"path"}:
            raise ValueError(f"{directory}: only `patches: - path: FILE` is supported, got {entry}")
        for patch in load_yaml_documents(directory / entry["path"]):
            targets = [
                i
                for i, d in enumerate(docs)
                if d["kind"] == patch["kind"] and d["metadata"]["name"] == patch["metadata"]["name"]
            ]
            if len(targets) != 1:
                raise ValueError(
                    f"{directory}: patch {patch['kind']}/{patch['metadata']['name']} matches {len(targets)}"
                )
            docs[targets[0]] = strategic_merge(docs[targets[0]], patch)
    for image in kust.get("images", []):
        for doc in docs:
            pod = _pod_spec(doc)
            for container in (pod or {}).get("containers", []) + (pod or {}).get("initContainers", []):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    for rep in kust.get("replicas", []):
        matched = [
            d for d in docs if d["metadata"]["name"] == rep["name"] and d["kind"] in {"Deployment", "StatefulSet"}
        ]
        if not matched:
            raise ValueError(f"{directory}: replicas entry {rep['name']} matches nothing")
        for doc in matched:
            doc["spec"]["replicas"] = rep["count"]
    if "namespace" in kust:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = kust["namespace"]
    return docs


# ---------------------------------------------------------------------------------------------------------
# Minimal JSON schemas for the custom resources (kubernetes-validate ships only built-in kinds). Written from
# the CRDs' documented fields: Strimzi 0.4x kafka.strimzi.io/v1beta2 and prometheus-operator
# monitoring.coreos.com/v1. Closed objects (additionalProperties: false) so a misspelled field fails.

_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
        "namespace": {"type": "string"},
        "labels": _LABELS,
        "annotations": _LABELS,
    },
    "additionalProperties": False,
}
_STRIMZI_METADATA = {
    **_METADATA,
    "required": ["name", "labels"],
    "properties": {
        **_METADATA["properties"],
        "labels": {**_LABELS, "required": ["strimzi.io/cluster"]},
    },
}
_LABEL_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": _LABELS, "matchExpressions": {"type": "array"}},
    "additionalProperties": False,
    "minProperties": 1,
}


def _resource(api_version: str, kind: str, metadata: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": metadata,
            "spec": spec,
        },
        "additionalProperties": False,
    }


CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"): _resource(
        "kafka.strimzi.io/v1beta2",
        "KafkaTopic",
        _STRIMZI_METADATA,
        {
            "type": "object",
            "required": ["partitions", "replicas"],
            "properties": {
                "topicName": {"type": "string", "pattern": r"^[a-zA-Z0-9._-]{1,249}$"},
                "partitions": {"type": "integer", "minimum": 1},
                "replicas": {"type": "integer", "minimum": 1, "maximum": 32767},
                "config": {
                    "type": "object",
                    "additionalProperties": {"type": ["string", "integer", "number", "boolean"]},
                },
            },
            "additionalProperties": False,
        },
    ),
    ("kafka.strimzi.io/v1beta2", "KafkaUser"): _resource(
        "kafka.strimzi.io/v1beta2",
        "KafkaUser",
        _STRIMZI_METADATA,
        {
            "type": "object",
            "properties": {
                "authentication": {
                    "type": "object",
                    "required": ["type"],
                    "properties": {"type": {"enum": ["tls", "tls-external", "scram-sha-512"]}},
                    "additionalProperties": False,
                },
                "authorization": {
                    "type": "object",
                    "required": ["type", "acls"],
                    "properties": {
                        "type": {"const": "simple"},
                        "acls": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["resource", "operations"],
                                "properties": {
                                    "resource": {
                                        "type": "object",
                                        "required": ["type"],
                                        "properties": {
                                            "type": {"enum": ["topic", "group", "cluster", "transactionalId"]},
                                            "name": {"type": "string"},
                                            "patternType": {"enum": ["literal", "prefix"]},
                                        },
                                        "additionalProperties": False,
                                    },
                                    "operations": {
                                        "type": "array",
                                        "minItems": 1,
                                        "items": {
                                            "enum": [
                                                "Read",
                                                "Write",
                                                "Create",
                                                "Delete",
                                                "Alter",
                                                "Describe",
                                                "ClusterAction",
                                                "AlterConfigs",
                                                "DescribeConfigs",
                                                "IdempotentWrite",
                                                "All",
                                            ]
                                        },
                                    },
                                    "host": {"type": "string"},
                                    "type": {"enum": ["allow", "deny"]},
                                },
                                "additionalProperties": False,
                            },
                        },
                    },
                    "additionalProperties": False,
                },
                "quotas": {"type": "object"},
            },
            "additionalProperties": False,
        },
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _resource(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        _METADATA,
        {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                            "tlsConfig": {"type": "object"},
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                        },
                        "additionalProperties": False,
                    },
                },
            },
            "additionalProperties": False,
        },
    ),
}
