"""Raw loaders for the shipped real data sets, as `core.schema.Event`s (torch-free).

The data lives outside the repository in `../shared/data/` (override with `INTEREST_DATA_DIR`); it is read
in place and never copied. Producers (`interest-stream replay`), training and the tests all read events
through these functions, so every consumer sees the same events with the same ids.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from core.schema import Event

_OTTO_TYPES = {"clicks": "click", "carts": "cart", "orders": "order"}


def data_dir() -> Path:
    env = os.environ.get("INTEREST_DATA_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[1]  # the checkout; data sits beside it
    for candidate in (here.parent / "shared" / "data", here / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("shared data not found: set INTEREST_DATA_DIR (holds movielens-latest-small/)")


def movielens_dir() -> Path:
    return data_dir() / "movielens-latest-small"


def movielens_events(path: Path | None = None) -> list[Event]:
    """All ratings as `rating` events (value = stars), sorted by event time then user (replay order).

    The event id `ml-<user>-<movie>` makes a replay idempotent: a user rates a movie once.
    """
    path = path or movielens_dir() / "ratings.csv"
    events = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            events.append(
                Event(
                    user_id=row["userId"],
                    item_id=row["movieId"],
                    event_type="rating",
                    timestamp=int(row["timestamp"]) * 1000,
                    event_id=f"ml-{row['userId']}-{row['movieId']}",
                    value=float(row["rating"]),
                )
            )
    events.sort(key=lambda e: (e.timestamp, int(e.user_id)))
    return events


@dataclass(frozen=True)
class Movie:
    item_id: str
    title: str
    genres: tuple[str, ...]


def movielens_movies(path: Path | None = None) -> dict[str, Movie]:
    path = path or movielens_dir() / "movies.csv"
    with open(path, newline="") as f:
        return {
            row["movieId"]: Movie(
                row["movieId"],
                row["title"],
                () if row["genres"] == "(no genres listed)" else tuple(row["genres"].split("|")),
            )
            for row in csv.DictReader(f)
        }


def otto_events(path: Path | None = None) -> list[Event]:
    """The OTTO sample's click/cart/order events, sorted by event time."""
    path = path or data_dir() / "otto-sample" / "train.jsonl"
    events = []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            user = f"otto-{record['session']}"
            for k, e in enumerate(record["events"]):
                events.append(
                    Event(
                        user_id=user,
                        item_id=str(e["aid"]),
                        event_type=_OTTO_TYPES[e["type"]],
                        timestamp=int(e["ts"]),
                        event_id=f"{user}-{k}",
                    )
                )
    events.sort(key=lambda e: (e.timestamp, e.user_id))
    return events


def by_user(events: list[Event]) -> Iterator[tuple[str, list[Event]]]:
    groups: dict[str, list[Event]] = {}
    for e in events:
        groups.setdefault(e.user_id, []).append(e)
    yield from groups.items()
