"""Shared fixtures live in tests/fixtures/ (one module per server the tests start)."""

pytest_plugins = ["tests.fixtures.broker", "tests.fixtures.triton", "tests.fixtures.worker"]
