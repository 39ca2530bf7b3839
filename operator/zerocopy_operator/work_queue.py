"""Level-triggered work from watch events: handlers enqueue a key, one worker reconciles it.

An event (a RayService changed, a model or cluster deleted) says only *which*
resource to look at again. Its handler adds that resource's key here and
returns; the worker later reads the world as it is then and reconciles once,
however many events arrived meanwhile (a burst of RayService status updates is
one reconcile). A transient failure (the API server unreachable, a 5xx, a
conflict) puts the key back with a back-off; nothing is lost and nothing is
pinned, whatever the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = ["Key", "WorkQueue"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class Key:
    """What to reconcile: a standalone model (its RayService mirrored into its status), a cluster (its
    RayService and every member's status), or a namespace's refused models (checked again)."""

    kind: Literal["model", "cluster", "refused"]
    namespace: str
    name: str = ""


class WorkQueue:
    """Keys due at a time, each at most once; `run` works them off in kopf's event loop, one at a time.

    `work(key)` is blocking (API calls): it runs in a thread. It raises for a failure worth retrying
    (`retryable(exc)`); anything else is logged and dropped, the next event of that resource tries again.
    """

    def __init__(
        self,
        work: Callable[[Key], None],
        retryable: Callable[[BaseException], bool],
        retry_s: float = 10.0,
    ) -> None:
        self._work, self._retryable, self.retry_s = work, retryable, retry_s
        self._due: dict[Key, float] = {}
        self._lock = threading.Lock()  # kopf runs sync handlers in threads
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, key: Key, delay: float = 0.0) -> None:
        """Reconcile `key` after `delay` seconds; a key already waiting keeps the earlier time."""
        due = time.monotonic() + delay
        with self._lock:
            self._due[key] = min(due, self._due.get(key, due))
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def pending(self) -> list[Key]:
        with self._lock:
            return sorted(self._due)

    def run_due(self) -> int:
        """Work every key that is due now, in this thread; how many were worked (what the worker does, and
        what a unit test calls instead of running an event loop)."""
        worked = 0
        while (key := self._take()) is not None:
            self._run(key)
            worked += 1
        return worked

    async def run(self) -> None:
        """Work keys as they fall due, until cancelled (kopf's cleanup)."""
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        while True:
            key = self._take()
            if key is not None:
                await asyncio.to_thread(self._run, key)
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._next_in())

    def _take(self) -> Key | None:
        now = time.monotonic()
        with self._lock:
            due = [key for key, at in self._due.items() if at <= now]
            if not due:
                return None
            key = min(due, key=self._due.__getitem__)
            del self._due[key]
            return key

    def _next_in(self) -> float | None:
        with self._lock:
            return max(0.0, min(self._due.values()) - time.monotonic()) if self._due else None

    def _run(self, key: Key) -> None:
        try:
            self._work(key)
        except Exception as exc:
            if self._retryable(exc):
                logger.warning("Reconciling %s failed (%s); retrying in %.0f s", _named(key), exc, self.retry_s)
                self.add(key, self.retry_s)
            else:
                logger.warning("Not reconciling %s: %s", _named(key), exc)


def _named(key: Key) -> str:
    if key.kind == "refused":
        return f"the refused models of namespace {key.namespace}"
    return f"{'ZeroCopyModel' if key.kind == 'model' else 'ZeroCopyCluster'} {key.namespace}/{key.name}"
