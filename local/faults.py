"""Fault injection for the no-lost-update tests, kept out of the production worker.

`python -m local.faults` runs the ordinary worker (settings from the environment) and SIGKILLs it at
`FAULT_KILL_AT` (`before_publish`, `after_publish`, or `after_forget_tables`: a user's state and record deleted,
the output tombstone not yet sent) once it has published `FAULT_KILL_AFTER_OUTPUTS` records.
`local.worker.spawn_worker` runs this module instead of the worker when the environment names a fault; it
installs `local.longpoll` first when the environment asks for it, as `python -m local.longpoll` would.
"""

from __future__ import annotations

import logging
import os
import signal

from local.longpoll import install_from_env
from stream.settings import Settings
from stream.worker import run_worker

POINTS = ("before_publish", "after_publish", "after_forget_tables")
log = logging.getLogger(__name__)


def kill_at(point: str, after_outputs: int):
    if point not in POINTS:
        raise ValueError(f"FAULT_KILL_AT must be one of {POINTS}, not {point!r}")

    def on_stage(stage: str, published: int) -> None:
        if stage == point and published >= after_outputs:
            log.error("fault injection: SIGKILL %s after %d outputs", point, published)
            os.kill(os.getpid(), signal.SIGKILL)

    return on_stage


def main() -> None:
    install_from_env()  # the local long-polling shim, when the environment asks for it
    on_stage = kill_at(os.environ["FAULT_KILL_AT"], int(os.environ.get("FAULT_KILL_AFTER_OUTPUTS", "0")))
    run_worker(Settings(), on_stage=on_stage)


if __name__ == "__main__":
    main()
