"""Which version of the served model the worker uses: one at a time, switched only between batches.

A new model version is rolled out by loading it into the running Triton next to the one being served
(docs/operations.md). The worker notices it by polling the model's ready versions (every MODEL_POLL_S, and before
a batch when that much time has passed) and moves to the newest ready version that passes its checks: the
version's bundle (vocabulary, categories, encoder config) loads, and Triton's metadata for that version declares
the inputs the encoder produces and the outputs the worker reads. A version that fails them is refused (ERROR log,
`interest_model_versions_refused_total`) and the worker keeps the version it has.

Every request of a batch names the version pinned when the batch started, so no record is computed by a mix of
versions; when the pinned version vanishes mid-batch (Triton unloaded it), the batch is redone on the new one.
With no usable version at all the worker waits (and /health says why) rather than publish wrong records.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stream import metrics

if TYPE_CHECKING:
    from stream.inference import ModelBundle

log = logging.getLogger(__name__)

STALL_RETRY_S = 1.0  # while no version is usable, look again this often


@dataclass(frozen=True)
class Pinned:
    """A served version the worker checked and uses: Triton's version number, its bundle and batch limit."""

    version: str
    bundle: ModelBundle
    max_batch_size: int


Validate = Callable[[str], Awaitable["Pinned | list[str]"]]  # a version -> Pinned, or why it is refused


def newest_first(versions: Iterable[str], only: str = "") -> list[str]:
    """Triton's version names (positive integers) newest first; `only` (TRITON_MODEL_VERSION) keeps that one."""
    numbered = sorted({v for v in versions if v.isdigit()}, key=int, reverse=True)
    return [v for v in numbered if v == only] if only else numbered


class VersionTracker:
    """Picks the version to use: the newest ready one that `validate` accepts; keeps it until a newer one is
    accepted or it is no longer ready. `current` is None while no ready version is usable (`problem` says why).

    `ready` lists the ready versions (raises while Triton cannot say); `validate` checks one version. Both are
    given by `stream.inference.InterestModel`, so this logic runs on fakes in unit tests.
    """

    def __init__(
        self,
        name: str,
        ready: Callable[[], Awaitable[list[str]]],
        validate: Validate,
        *,
        poll_s: float,
        only: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name, self._ready, self._validate = name, ready, validate
        self.poll_s, self.only, self._clock = poll_s, only, clock
        self.current: Pinned | None = None
        self.problem = ""  # why `current` is None, once a poll found no usable version
        self.refusals: dict[str, str] = {}  # version -> the reasons it was last refused for
        self.ready: list[str] = []  # the ready versions at the last successful poll, newest first
        self._last: Pinned | None = None  # the version used before, for the log
        self._checked_at: float | None = None
        self._lock = asyncio.Lock()

    async def for_batch(self) -> Pinned:
        """The version a batch must use from start to end; waits while none is usable (never a wrong one)."""
        await self.refresh()
        while self.current is None:
            await asyncio.sleep(min(STALL_RETRY_S, self.poll_s))
            await self.refresh(force=True)
        return self.current

    def drop(self, version: str) -> None:
        """The pinned `version` is gone from Triton: the next `for_batch` resolves again at once."""
        if self.current is not None and self.current.version == version:
            log.warning("%s version %s is no longer served; resolving the version again", self.name, version)
            metrics.MODEL_VERSION.clear()
            self.current, self.problem = None, f"version {version} is no longer served"
        self._checked_at = None

    async def refresh(self, *, force: bool = False) -> Pinned | None:
        """Poll Triton's ready versions (at most once per `poll_s` unless forced) and switch if one should."""
        async with self._lock:
            now = self._clock()
            if not force and self._checked_at is not None and now - self._checked_at < self.poll_s:
                return self.current
            self._checked_at = now
            try:
                self.ready = ready = newest_first(await self._ready(), self.only)
            except Exception as exc:  # Triton down or restarting: keep what we have, the infer path retries
                log.warning("cannot list the ready versions of %s: %s", self.name, exc)
                if self.current is None:
                    self._use(None, f"cannot list the ready versions of {self.name}: {exc}", logging.WARNING)
                return self.current
            chosen, refused = None, []
            for version in ready:
                try:
                    result = await self._validate(version)
                except Exception as exc:  # e.g. unloaded between the listing and the check: not a refusal
                    log.warning("cannot check %s version %s: %s", self.name, version, exc)
                    continue
                if isinstance(result, Pinned):
                    chosen = result
                    break
                self._refuse(version, result)
                refused.append(version)
            for version in set(self.refusals) - set(ready):
                del self.refusals[version]  # unloaded: a version loaded again under that number is checked anew
            if chosen is not None:
                self._use(chosen, "")
            elif refused:  # an operator's mistake to fix: ERROR
                self._use(None, f"every served version of {self.name} is refused ({', '.join(refused)})")
            else:  # nothing loaded (Triton starting, stopping, or the pinned version absent)
                wanted = f"version {self.only} of {self.name}" if self.only else f"any version of {self.name}"
                self._use(None, f"Triton does not serve {wanted}", logging.WARNING)
            return self.current

    def _refuse(self, version: str, problems: list[str]) -> None:
        reasons = "; ".join(problems)
        if self.refusals.get(version) == reasons:
            return  # logged and counted already; it stays refused while it stays the same
        self.refusals[version] = reasons
        metrics.MODEL_VERSIONS_REFUSED.labels(version).inc()
        keeping = f"keeping version {self.current.version}" if self.current else "no version in use"
        log.error("refusing %s version %s: %s (%s)", self.name, version, reasons, keeping)

    def _use(self, pinned: Pinned | None, problem: str, level: int = logging.ERROR) -> None:
        old, old_problem = self.current, self.problem
        self.current, self.problem = pinned, problem
        if pinned is None:
            metrics.MODEL_VERSION.clear()
            if problem != old_problem:
                log.log(level, "%s: inference waits until a usable version is served", problem)
            return
        if old is not None and (old.version, old.bundle.metadata) == (pinned.version, pinned.bundle.metadata):
            return  # the same version and bundle (its files may have been read again)
        metrics.MODEL_VERSION.clear()  # one version in use at a time
        metrics.MODEL_VERSION.labels(pinned.version, pinned.bundle.version).set(1)
        metrics.set_build_info(model_name=pinned.bundle.name, model_version=pinned.bundle.version)
        last, self._last = self._last, pinned
        was = f"version {last.version} ({last.bundle.version})" if last else "none"
        log.info("using %s version %s (%s), was %s", self.name, pinned.version, pinned.bundle.version, was)
