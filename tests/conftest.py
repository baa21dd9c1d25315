"""Shared fixtures live in tests/fixtures/ (one module per server the tests start).

Hypothesis runs derandomized (the same examples on every run and every clone); counterexamples it found are
pinned with @example in the tests. `HYPOTHESIS_PROFILE=explore` searches with fresh random seeds instead.

Tiers: `make test-fast` deselects the markers broker, triton and slow. A test is marked broker or triton here by
the fixtures it uses (`SERVER_FIXTURES`, directly or through another fixture), and a test that starts a local
broker or tritonserver in-process without its marker fails, so no server can slip into the fast tier unnoticed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import settings

settings.register_profile("deterministic", derandomize=True, print_blob=True, database=None)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

pytest_plugins = ["tests.fixtures.broker", "tests.fixtures.triton", "tests.fixtures.worker"]

#: marker -> the fixtures that start (or need) its server: `make_settings`/`settings` request `broker`.
SERVER_FIXTURES = {"broker": frozenset({"broker", "start_worker"}), "triton": frozenset({"triton_twin", "ml_triton"})}


def pytest_collection_modifyitems(items: Iterable[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for marker, fixtures in SERVER_FIXTURES.items():
            if used & fixtures and item.get_closest_marker(marker) is None:
                item.add_marker(marker)


@pytest.fixture(autouse=True)
def _servers_only_under_their_marker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    from local.broker import LocalBroker
    from local.triton import LocalTriton

    for marker, server in (("broker", LocalBroker), ("triton", LocalTriton)):
        if request.node.get_closest_marker(marker) is None:
            monkeypatch.setattr(server, "start", _refuse(request.node.nodeid, server.__name__, marker))


def _refuse(test: str, server: str, marker: str) -> Any:
    def start(self: Any, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"{test} starts a {server} without @pytest.mark.{marker}: mark it (or use the fixture)")

    return start
