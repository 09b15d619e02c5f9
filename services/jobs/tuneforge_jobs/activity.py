"""A job's activity newest first: its state transitions and its steps (each step all its metric points), in the
order of ActivityCursor in jobs.proto, which is the order of the OpenAI-compatible API's fine-tuning job events.

The activity runs by the whole second of each item's time (a step's: the latest of its points'), the latest second
first; within one second the transitions come first, by ascending seq, then the steps, by ascending step. So a job
that ends within the second of its last step lists its end first, as clients polling the newest event expect.
Each list (transitions, steps) is read from a place in it, (second, key): what follows is the items of earlier
seconds and those of `second` whose key (seq or step) is above `key`.

`collect` reads at most `limit` items after a place with two queries a list provides, so that only about `limit`
items leave the database: the items of one second above a key (by key), and the items of the seconds before a
bound, latest first. The items of the last second it reaches are read in full (up to the limit) to order them by
key; so are those of the place's own second.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
ONE_SECOND = dt.timedelta(seconds=1)
# Keys below or above any seq or step: after (second, FIRST_KEY) comes all of `second`, after (second, LAST_KEY)
# none of it.
FIRST_KEY = -(2**63)
LAST_KEY = 2**63 - 1

Place = tuple[int, int]  # (whole second since the epoch, seq or step)


@dataclass(frozen=True)
class Item:
    second: int
    key: int
    row: Any = None

    @property
    def place(self) -> Place:
        return self.second, self.key


def second_of(time: dt.datetime) -> int:
    """The whole second a time falls in (a Timestamp's seconds)."""
    return (time - EPOCH) // ONE_SECOND


def start_of(second: int) -> dt.datetime:
    return EPOCH + second * ONE_SECOND


# (second, above key, limit) -> at most `limit` items of that second whose key is above, by ascending key.
InSecond = Callable[[int, int, int], Awaitable[list[Item]]]
# (bound, limit) -> at most `limit` items of the seconds before `bound` (None: all), the latest first.
Before = Callable[[int | None, int], Awaitable[list[Item]]]


async def collect(in_second: InSecond, before: Before, after: Place | None, limit: int) -> list[Item]:
    """The first `limit` items after the place (None: from the latest), in the list's order."""
    found: list[Item] = []
    bound: int | None = None
    if after is not None:
        second, key = after
        if key != LAST_KEY:
            found = await in_second(second, key, limit)
        bound = second
    if len(found) < limit:
        latest = await before(bound, limit - len(found))
        if latest:
            # Every item of the seconds above the last one reached came before it; that second may hold more than
            # were reached, with lower keys: it is read in full, up to the limit.
            last = latest[-1].second
            found += sorted((i for i in latest if i.second > last), key=lambda i: (-i.second, i.key))
            found += await in_second(last, FIRST_KEY, limit - len(found))
    return found
