"""A circuit breaker for the Triton client: after repeated failures, stop calling for a while.

Hand-written (a dozen lines) rather than a dependency: the async breaker libraries on PyPI are small,
little-maintained, and would still need the same wiring into tenacity and the metrics.
"""

from __future__ import annotations

import logging
import time

from stream import metrics

log = logging.getLogger(__name__)


class CircuitBreaker:
    """Opens after `failures` consecutive failures; after `reset_s` lets one trial call through (half-open)."""

    def __init__(self, failures: int, reset_s: float) -> None:
        self.threshold, self.reset_s = failures, reset_s
        self.consecutive = 0
        self.opened_at: float | None = None

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def wait_s(self) -> float:
        """Seconds until a call may be tried (0 when closed or half-open)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.reset_s - time.monotonic())

    def success(self) -> None:
        self.consecutive, self.opened_at = 0, None
        metrics.CIRCUIT_OPEN.set(0)

    def failure(self) -> None:
        self.consecutive += 1
        if self.consecutive >= self.threshold:
            if self.opened_at is None:
                log.warning("Triton circuit open after %d consecutive failures", self.consecutive)
            self.opened_at = time.monotonic()
            metrics.CIRCUIT_OPEN.set(1)
