"""The history of changes that watches are served from, so that any `resourceVersion` can be resumed."""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import AsyncIterator
from typing import Any

import attrs
import kmock


@attrs.frozen
class WatchEvent:
    resource_version: int
    resource: kmock.resource
    type: str  # ADDED, MODIFIED, DELETED
    object: dict[str, Any]  # a snapshot: later writes do not alter it


@attrs.define
class EventLog:
    """Every change since the start, like etcd's history without compaction: a watch never gets 410 Gone.

    Appending is synchronous, so a write and its event are one step for the event loop; followers are woken
    through an `asyncio.Event` that is replaced after each append.
    """

    _events: list[WatchEvent] = attrs.field(factory=list)
    _appended: asyncio.Event = attrs.field(factory=asyncio.Event)
    _closed: bool = False

    def append(self, event: WatchEvent) -> None:
        self._events.append(event)
        self._wake()

    def close(self) -> None:
        """End all follows, so that open watch responses finish and the server can shut down promptly."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        self._appended.set()
        self._appended = asyncio.Event()

    async def follow(self, since: int, timeout: float | None) -> AsyncIterator[WatchEvent]:
        """Events newer than `since`, then new ones as they come, until `timeout` seconds pass or `close`."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        index = bisect.bisect_right(self._events, since, key=lambda event: event.resource_version)
        while not self._closed:
            if index < len(self._events):
                index += 1
                yield self._events[index - 1]
                continue
            appended = self._appended
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return
            try:
                await asyncio.wait_for(appended.wait(), remaining)
            except TimeoutError:
                return
