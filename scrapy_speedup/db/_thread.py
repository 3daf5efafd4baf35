"""The writer thread of a database pipeline.

One thread, one call at a time, so that one connection is only ever used by
one thread and one transaction is open at a time: the crawl's shared thread
pool would hand a connection to whichever thread is free, and a call that it
gave up on (``SPEEDUP_THREAD_TIMEOUT_SECONDS``) would go on holding the
connection's transaction while the next batch ran on another thread.

A call that does not come back is not waited for forever: the pipeline may
:meth:`~WriterThread.give_up` on it, and the next call runs on a new thread.
The stuck thread is a daemon, left to its call, and its result, if it ever
comes, is dropped.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from twisted.internet.defer import Deferred

    from scrapy_speedup._bridge import Bridge

__all__ = ["Job", "WriterThread"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    func: Callable[..., Any]
    args: tuple[Any, ...]
    waiter: asyncio.Future[Any] | Deferred[Any]
    done: bool = False
    given_up: bool = False
    started_at: float = field(default_factory=time.monotonic)


class WriterThread:
    """A daemon thread that runs one call at a time; results come back on the
    reactor thread through the crawl's bridge."""

    def __init__(self, bridge: Bridge, name: str) -> None:
        self.bridge = bridge
        self.name = name
        self._calls: queue.SimpleQueue[Job | None] | None = None
        self._thread: threading.Thread | None = None
        self._started = 0
        #: Threads given up on, still in their call.
        self.stuck: list[threading.Thread] = []

    def submit(self, func: Callable[..., Any], *args: Any) -> Job:
        if self._calls is None:
            self._started += 1
            self._calls = queue.SimpleQueue()
            self._thread = threading.Thread(
                target=self._work, args=(self._calls,), daemon=True,
                name=f"{self.name}-{self._started}",
            )
            self._thread.start()
        job = Job(func, args, self.bridge.new_waiter())
        self._calls.put(job)
        return job

    def _work(self, calls: queue.SimpleQueue[Job | None]) -> None:
        # The reactor doctor's SIGALRM is for the reactor thread: blocked
        # here, it never interrupts a driver's system call on this thread.
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        while (job := calls.get()) is not None:
            try:
                result: Any = job.func(*job.args)
                error: BaseException | None = None
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                result, error = None, exc
            self.bridge.call_from_thread(self._on_done, job, result, error)

    def _on_done(self, job: Job, result: Any, error: BaseException | None) -> None:
        job.done = True
        if job.given_up:
            logger.debug("%s: a call given up on came back after %.1f s", self.name,
                         time.monotonic() - job.started_at)
            return
        if error is None:
            self.bridge.resolve(job.waiter, result)
        else:
            self.bridge.fail(job.waiter, error)

    def give_up(self, job: Job, error: BaseException) -> None:
        """Fail *job* now; its thread is left to it, and exits if it ever
        returns; the next call starts a new thread."""
        job.given_up = True
        if self._calls is not None:
            self._calls.put(None)
        if self._thread is not None:
            self.stuck.append(self._thread)
        self._calls, self._thread = None, None
        self.bridge.fail(job.waiter, error)

    async def close(self, timeout_s: float) -> bool:
        """Stop the thread, waiting at most *timeout_s*; True if it stopped."""
        thread, calls = self._thread, self._calls
        self._calls, self._thread = None, None
        if thread is None or calls is None:
            return True
        calls.put(None)

        def join() -> bool:
            thread.join(timeout_s)
            return not thread.is_alive()

        stopped: bool = await self.bridge.run_in_new_thread(join, f"{self.name}-join")
        return stopped
