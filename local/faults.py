"""Fault injection for the reliability tests, kept out of the production worker.

`python -m local.faults` runs the ordinary worker (settings from the environment) with the faults the
environment names:

* `FAULT_KILL_AT`: SIGKILL there once `FAULT_KILL_AFTER_OUTPUTS` records are out. `after_changelog`: the new
  values acknowledged by the changelog, not yet in RocksDB (stream/tables.py); `before_publish`: in RocksDB too,
  no record published; `after_publish`: published, input offsets not committed; `after_forget_tables`: a user's
  value deleted, the output tombstone not yet sent.
* `FAULT_STOP_AT`: SIGSTOP there (once) after `FAULT_KILL_AFTER_OUTPUTS` records: the worker freezes mid-batch,
  as in a long GC or a stalled VM, until someone sends SIGCONT (the fencing test). `before_changelog`: the
  batch inferred, nothing written yet.
* `FAULT_HANG` (`await`: the batch awaits forever, as on a Triton call without a timeout; `block`: the event loop
  is blocked in a call): the first batch never finishes.
* `FAULT_POISON_ITEM`: folding any event with that `item_id` raises, a bug that one message triggers.

`local.worker.spawn_worker` runs this module instead of the worker when the environment names a fault; it
installs `local.longpoll` first when the environment asks for it, as `python -m local.longpoll` would.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any

import stream.step
from local.longpoll import install_from_env
from stream.settings import Settings
from stream.worker import run_worker

POINTS = ("before_changelog", "after_changelog", "before_publish", "after_publish", "after_forget_tables")
HANGS = ("await", "block")
log = logging.getLogger(__name__)


def kill_at(point: str, after_outputs: int) -> Callable[[str, int], None]:
    if point not in POINTS:
        raise ValueError(f"FAULT_KILL_AT must be one of {POINTS}, not {point!r}")

    def on_stage(stage: str, published: int) -> None:
        if stage == point and published >= after_outputs:
            log.error("fault injection: SIGKILL %s after %d outputs", point, published)
            os.kill(os.getpid(), signal.SIGKILL)

    return on_stage


def stop_at(point: str, after_outputs: int) -> Callable[[str, int], None]:
    """SIGSTOP at `point`, once: the process freezes there until SIGCONT, then the batch goes on."""
    if point not in POINTS:
        raise ValueError(f"FAULT_STOP_AT must be one of {POINTS}, not {point!r}")
    stopped = False

    def on_stage(stage: str, published: int) -> None:
        nonlocal stopped
        if stage == point and published >= after_outputs and not stopped:
            stopped = True
            log.error("fault injection: SIGSTOP %s after %d outputs", point, published)
            os.kill(os.getpid(), signal.SIGSTOP)
            log.error("fault injection: SIGCONT received, the batch goes on")

    return on_stage


def hang_in_batch(how: str) -> None:
    """The batch step never returns: awaiting forever, or holding the event loop."""
    if how not in HANGS:
        raise ValueError(f"FAULT_HANG must be one of {HANGS}, not {how!r}")

    async def prepare(self: Any, batch: Any, *args: Any, **kwargs: Any) -> None:
        log.error("fault injection: this batch of %d messages hangs forever (%s)", len(batch), how)
        if how == "block":
            while True:
                time.sleep(3600)
        await asyncio.Event().wait()

    stream.step.BatchStep.prepare = prepare  # type: ignore[method-assign]  # the first stage of every path


def poison(item: str) -> None:
    """Folding an event of `item` raises: the step fails on that message and on no other."""
    fold = stream.step.apply_events

    def apply_events(state: Any, events: Iterable[Any], cfg: Any, offsets: Any = None) -> Any:
        events = list(events)
        if any(event.item_id == item for event in events):
            raise ValueError(f"fault injection: a bug that item {item!r} triggers")
        return fold(state, events, cfg, offsets)

    stream.step.apply_events = apply_events  # type: ignore[assignment]


def main() -> None:
    install_from_env()  # the local long-polling shim, when the environment asks for it
    on_stage = None
    after = int(os.environ.get("FAULT_KILL_AFTER_OUTPUTS", "0"))
    if point := os.environ.get("FAULT_KILL_AT"):
        on_stage = kill_at(point, after)
    elif point := os.environ.get("FAULT_STOP_AT"):
        on_stage = stop_at(point, after)
    if how := os.environ.get("FAULT_HANG"):
        hang_in_batch(how)
    if item := os.environ.get("FAULT_POISON_ITEM"):
        poison(item)
    run_worker(Settings(), on_stage=on_stage)


if __name__ == "__main__":
    main()
