"""Metrics that follow the worker's assignment: a revoked partition's series disappears."""

from __future__ import annotations

from prometheus_client import REGISTRY

from stream import metrics


def lag_series() -> dict[str, float]:
    return {
        s.labels["partition"]: s.value
        for family in REGISTRY.collect()
        if family.name == "interest_consumer_lag_messages"
        for s in family.samples
    }


def test_the_lag_of_revoked_partitions_is_removed_and_new_ones_appear() -> None:
    metrics.set_consumer_lag({0: 5, 1: 0, 2: 7})
    assert lag_series() == {"0": 5, "1": 0, "2": 7}
    metrics.set_consumer_lag({2: 3, 5: 1})  # a rebalance took 0 and 1 away and brought 5
    assert lag_series() == {"2": 3, "5": 1}
    metrics.set_consumer_lag({})
    assert lag_series() == {}
