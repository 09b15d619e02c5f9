"""In-process wake-ups so schedulers and watchers react at once instead of waiting for their poll."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Notifier:
    """`notify()` wakes every waiter; `notify(*keys)` wakes only the waiters on one of those keys.

    A job's new metric points and log lines concern only that job's watchers (key: the job id); waking every
    scheduler loop and every other job's watcher for each of them filled the jobs service's connection pool with
    reads that found nothing new under load (50 agents reporting, tests/reliability/load.py), so heartbeats
    waited past their lease.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._keyed: dict[str, asyncio.Event] = {}
        self._listeners: list[Callable[[tuple[str, ...]], None]] = []

    def listen(self, callback: Callable[[tuple[str, ...]], None]) -> None:
        """Call `callback(keys)` on every notify (keys empty for notify() without keys): the WatchJob feed marks
        the jobs to read again without holding a ticket per job."""
        self._listeners.append(callback)

    def notify(self, *keys: str) -> None:
        for callback in self._listeners:
            callback(keys)
        if keys:
            for key in keys:
                if (event := self._keyed.pop(key, None)) is not None:
                    event.set()
            return
        self._event.set()
        self._event = asyncio.Event()
        for event in self._keyed.values():
            event.set()
        self._keyed.clear()

    def ticket(self, key: str | None = None) -> asyncio.Event:
        """Set by the next notify() (or notify(key) when a key is given). Taken before reading, then waited on
        after, it misses no change that commits while the reader reads or sends."""
        return self._event if key is None else self._keyed.setdefault(key, asyncio.Event())

    async def wait(self, seconds: float, key: str | None = None, ticket: asyncio.Event | None = None) -> None:
        """Until the next notify() (or notify(key) when a key is given, or the ticket's), or `seconds` at most."""
        event = ticket or self.ticket(key)
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except TimeoutError:
            pass
