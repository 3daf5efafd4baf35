"""The thread pool of one crawler, for blocking calls.

Its own threads, apart from the reactor's pool (which resolves DNS), sized by
``SPEEDUP_THREAD_WORKERS``. They are daemon threads on purpose: Twisted's
``ThreadPool.stop()`` and ``concurrent.futures``' exit hook both join every
thread without a timeout, so one call that never returns would hang the
crawl's exit forever. Here a call past its timeout fails for its caller at
once, its thread is counted as stuck and replaced so the pool keeps its
capacity, and shutdown waits for stuck threads at most
``SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS`` before the process exits without them.

Results come back through the bridge: an ``asyncio.Future`` or a
``Deferred``, completed on the reactor thread, on all three runtimes.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from scrapy_speedup.exceptions import PoolClosedError

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from scrapy.crawler import Crawler
    from twisted.internet.defer import Deferred

    from scrapy_speedup._bridge import Bridge
    from scrapy_speedup.config import SpeedupConfig

__all__ = ["ThreadPool"]

logger = logging.getLogger(__name__)



@dataclass(eq=False)
class _Call:
    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    name: str
    waiter: asyncio.Future[Any] | Deferred[Any]
    timeout: float | None
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None  # set by the thread that runs it
    timed_out: bool = False


class ThreadPool:
    """Daemon threads for blocking calls; owned by :class:`SpeedupExtension`."""

    def __init__(
        self,
        crawler: Crawler,
        config: SpeedupConfig,
        bridge: Bridge,
        stat_prefix: str | None = "speedup/thread/",
    ) -> None:
        """*stat_prefix* None keeps a private pool (a pipeline's writer thread)
        out of the crawl's thread stats."""
        self.crawler = crawler
        self.config = config
        self.bridge = bridge
        self._stats = crawler.stats if stat_prefix is not None else None
        self._prefix = stat_prefix or ""
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._threads: set[threading.Thread] = set()
        self._stuck: set[_Call] = set()
        self._running: set[_Call] = set()  # guarded by _lock
        self._check_every: float | None = None  # None: no timeout seen yet
        self._lock = threading.Lock()
        self._busy = 0
        self._busy_max = 0
        self._idle = 0  # threads waiting for a call; guarded by _lock
        self._spawned = 0
        self._closed = False

    def _stat(self, method: str, name: str, value: Any = 1) -> None:
        if self._stats is not None:
            getattr(self._stats, method)(self._prefix + name, value)

    def _spawn(self) -> None:
        """Start a thread; the caller has counted it idle already."""
        self._spawned += 1
        thread = threading.Thread(
            target=self._work, name=f"scrapy-speedup-thread-{self._spawned}", daemon=True
        )
        with self._lock:
            self._threads.add(thread)
        thread.start()

    async def run(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
    ) -> Any:
        self._stat("inc_value", "task_count")
        name = getattr(func, "__qualname__", repr(func))
        if self._closed:
            self._stat("inc_value", "error_count")
            raise PoolClosedError(f"{name}: the thread pool of this crawl is closed")
        call = _Call(func, args, kwargs, name, self.bridge.new_waiter(), timeout)
        if timeout is not None:
            self._watch_timeouts(timeout)
        self._calls.put(call)
        # Threads start as calls need them, as in Twisted's pool: a crawl that
        # needs 8 at once runs 8, not SPEEDUP_THREAD_WORKERS.
        with self._lock:
            needs_thread = self._idle == 0 and len(self._threads) - len(self._stuck) < (
                self.config.thread_workers
            )
            if needs_thread:
                self._idle += 1  # counted now, so the next call sees it
        if needs_thread:
            self._spawn()
        return await call.waiter

    def _work(self) -> None:
        """A pool thread: run calls until told to stop."""
        # The reactor doctor's SIGALRM is for the reactor thread: blocked
        # here, the kernel never picks this thread for it, so a blocking call
        # of a C library running here is never interrupted by it.
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        while True:
            call = self._calls.get()
            if call is None:
                break
            with self._lock:
                self._idle -= 1
                call.started_at = time.monotonic()
                self._running.add(call)
                self._busy += 1
                self._busy_max = max(self._busy_max, self._busy)
            try:
                result: Any = call.func(*call.args, **call.kwargs)
                error: BaseException | None = None
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                result, error = None, exc
            with self._lock:
                self._running.discard(call)
                self._busy -= 1
                self._idle += 1
            self.bridge.call_from_thread(self._on_done, call, result, error)
        with self._lock:
            self._idle -= 1
            self._threads.discard(threading.current_thread())

    def _on_done(self, call: _Call, result: Any, error: BaseException | None) -> None:
        assert call.started_at is not None
        self._stat(
            "max_value", "queue_wait_seconds_max", round(call.started_at - call.queued_at, 3)
        )
        self._stat("max_value", "busy_max", self._busy_max)
        if call.timed_out:
            # A stuck call came back: its replacement took its place, so a
            # thread retires if the pool is now above its size.
            self._stuck.discard(call)
            with self._lock:
                excess = len(self._threads) - len(self._stuck) > self.config.thread_workers
            logger.info(
                "%s returned after %.1f s, past its timeout", call.name,
                time.monotonic() - call.started_at, extra={"crawler": self.crawler},
            )
            if excess:
                self._calls.put(None)
            return
        if error is None:
            self._stat("inc_value", "succeeded_count")
            self.bridge.resolve(call.waiter, result)
        else:
            self._stat("inc_value", "error_count")
            self.bridge.fail(call.waiter, error)

    def _watch_timeouts(self, timeout: float) -> None:
        """Check running calls often enough to stop one within ~25% of the
        shortest timeout seen, at most once a second: a deadline counts from
        when the call starts, as waiting for a thread is backpressure, not a
        stuck call."""
        every = min(1.0, timeout / 4)
        first = self._check_every is None
        if first or every < self._check_every:  # type: ignore[operator]
            self._check_every = every
        if first:
            self.bridge.call_later(every, self._check_timeouts)

    def _check_timeouts(self) -> None:
        if self._closed:
            return
        now = time.monotonic()
        with self._lock:
            running = list(self._running)
        for call in running:
            assert call.started_at is not None
            if (
                call.timeout is not None
                and not call.timed_out
                and now - call.started_at > call.timeout
            ):
                self._on_timeout(call)
        assert self._check_every is not None
        self.bridge.call_later(self._check_every, self._check_timeouts)

    def _on_timeout(self, call: _Call) -> None:
        call.timed_out = True
        self._stat("inc_value", "timeout_count")
        self._stat("inc_value", "error_count")
        self._stat("inc_value", "stuck_count")
        self._stuck.add(call)
        self.bridge.fail(
            call.waiter,
            TimeoutError(f"{call.name} ran past its timeout of {call.timeout} s in a thread"),
        )
        logger.warning(
            "%s ran past its timeout of %s s; its thread is stuck, a new thread takes its"
            " place (%d stuck)",
            call.name, call.timeout, len(self._stuck), extra={"crawler": self.crawler},
        )
        if not self._closed:
            with self._lock:
                self._idle += 1
            self._spawn()

    async def close(self) -> None:
        """Stop the threads, waiting at most SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS."""
        if self._closed:
            return
        self._closed = True
        threads = list(self._threads)
        for _ in threads:
            self._calls.put(None)
        deadline = time.monotonic() + self.config.shutdown_timeout_seconds

        def join() -> list[str]:
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            return [t.name for t in threads if t.is_alive()]

        alive = await self.bridge.run_in_new_thread(join, "scrapy-speedup-thread-join")
        if alive:
            logger.warning(
                "%d threads still blocked after SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS (%s s):"
                " the crawl exits without them (stuck calls: %s)",
                len(alive), self.config.shutdown_timeout_seconds,
                [c.name for c in self._stuck] or "none timed out",
                extra={"crawler": self.crawler},
            )
