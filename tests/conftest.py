"""Shared fixtures live in tests/fixtures/ (one module per server the tests start).

Hypothesis runs derandomized (the same examples on every run and every clone); counterexamples it found are
pinned with @example in the tests. `HYPOTHESIS_PROFILE=explore` searches with fresh random seeds instead.
"""

import os

from hypothesis import settings

settings.register_profile("deterministic", derandomize=True, print_blob=True, database=None)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

pytest_plugins = ["tests.fixtures.broker", "tests.fixtures.triton", "tests.fixtures.worker"]
