"""The third-party releases whose private code the project copies, subclasses or patches, and the check that
refuses any other release.

Why: stream/batching.py is a copy of Faust's `Stream.take_events`, stream/consumer.py subclasses Faust's aiokafka
driver to work around aiokafka's `seek_to_committed`, and local/longpoll.py patches aiokafka's fetcher. Such code
is right for the release it was read against and may be silently wrong on the next one, so on any other release
the worker refuses to start (and the shim to install) instead of running with a behaviour nobody checked. To move
a pin: re-read the code named below against the new release, then change the version here, in pyproject.toml,
and in the lock (`make lock`); tests/test_pins.py checks that all of them agree.
"""

from __future__ import annotations

import importlib
from typing import Final, NamedTuple


class Pin(NamedTuple):
    distribution: str  # the name on PyPI and in the lock
    version: str
    users: str  # the code written against exactly this release


#: By import name.
PINS: Final = {
    "faust": Pin("faust-streaming", "0.15.3", "stream/batching.py (take_events), stream/consumer.py (driver)"),
    "aiokafka": Pin("aiokafka", "0.14.0", "stream/consumer.py (seek_to_committed), local/longpoll.py (fetcher)"),
}


class UnsupportedRelease(RuntimeError):
    """An installed release differs from the one the code was written against."""


def installed(module: str) -> str:
    return str(importlib.import_module(module).__version__)


def problems(*modules: str) -> list[str]:
    """One line per pinned module (all by default) whose installed release is not the pinned one."""
    found = []
    for module in modules or tuple(PINS):
        pin, version = PINS[module], installed(module)
        if version != pin.version:
            found.append(
                f"{pin.distribution} {version} is installed, but {pin.users} is written for {pin.version}: "
                "install from the lock (requirements/), or re-read that code and move the pin (stream/pins.py)"
            )
    return found


def require(*modules: str) -> None:
    """Raise `UnsupportedRelease` naming every pinned module (all by default) installed at another release."""
    if found := problems(*modules):
        raise UnsupportedRelease("; ".join(found))
