"""The fast tier stays free of servers: tests/conftest.py marks tests by the server fixtures they use and refuses
a server started by a test without its marker."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from local.broker import LocalBroker
from local.triton import LocalTriton
from tests.conftest import pytest_collection_modifyitems


class Item(SimpleNamespace):
    def get_closest_marker(self, name: str) -> str | None:
        return name if name in self.markers else None

    def add_marker(self, name: str) -> None:
        self.markers.append(name)


def test_a_test_is_marked_by_the_server_fixtures_it_uses() -> None:
    items = [
        Item(fixturenames=["tmp_path", "make_settings", "broker"], markers=[]),
        Item(fixturenames=["tiny_export", "triton_twin", "start_worker"], markers=["broker"]),
        Item(fixturenames=["tiny_export", "tiny_checkpoint"], markers=[]),
    ]
    pytest_collection_modifyitems(items)  # type: ignore[arg-type]
    assert [i.markers for i in items] == [["broker"], ["broker", "triton"], []]


def test_an_unmarked_test_cannot_start_a_server(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"starts a LocalBroker without @pytest\.mark\.broker"):
        LocalBroker(tmp_path / "broker").start()
    (tmp_path / "repo").mkdir()
    with pytest.raises(RuntimeError, match=r"starts a LocalTriton without @pytest\.mark\.triton"):
        LocalTriton(tmp_path / "repo", log_file=tmp_path / "triton.log").start()
