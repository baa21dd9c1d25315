"""Helpers for tests/test_deploy.py: a PromQL metric-name extractor, the
worker's exported metric names, and JSON schemas for the CRDs that kubernetes-validate has no schema for.

Kept dependency-free (PyYAML and jsonschema come with kubernetes-validate) so the deployment checks run
offline on a clean clone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

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


def default_series() -> set[str]:
    """Series prometheus-client's default registry exports in every process that serves it (the worker's and the
    trainer's `start_http_server`): process_* and python_*, read off the registry, not listed by hand."""
    from prometheus_client import REGISTRY

    return {
        s.name for family in REGISTRY.collect() for s in family.samples if s.name.startswith(("process_", "python_"))
    }


def worker_metrics(module_name: str = "stream.metrics") -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every metric declared in stream/metrics.py (or another module: the trainer's, local.learner): exposed family
    name -> (type, label names). The exposed name is what a scrape shows: counters get `_total`, info `_info`.
    """
    import importlib

    from prometheus_client.metrics import MetricWrapperBase

    module = importlib.import_module(module_name)

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
    return series_names("stream.metrics")


def series_names(module_name: str) -> set[str]:
    """Names of the series a module's metrics export (histograms as _bucket/_sum/_count, counters as _total)."""
    names: set[str] = set()
    for name, (kind, _labels) in worker_metrics(module_name).items():
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
