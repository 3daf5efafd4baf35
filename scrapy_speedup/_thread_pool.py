"""The thread pool of one crawler, for blocking calls.

Its own threads, apart from the reactor's pool (which resolves DNS), sized by
``SPEEDUP_THREAD_WORKERS``. They are daemon threads on purpose: Twisted's
``ThreadPool.stop()`` and ``concurrent.futures``' exit hook both join every
thread without a timeout, so one call that never returns would hang the
crawl's exit forever.

A call past its timeout fails for its caller at once; its thread is counted
as stuck and, while there are at most ``SPEEDUP_THREAD_MAX_STUCK`` stuck
threads, a new thread takes its place so that the pool keeps its capacity.
Past that ceiling the pool shrinks instead of growing without bound (a
service that never answers would otherwise cost a thread per call); when
every thread it may have is stuck, calls fail at once with
:exc:`~scrapy_speedup.exceptions.ThreadPoolExhaustedError` rather than wait
forever. A stuck thread whose call returns late is usable again. Shutdown
waits at most ``SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS`` for the threads whose calls
still have a caller, and not at all for those stuck in calls given up.

Results come back through the bridge: an ``asyncio.Future`` or a
``Deferred``, completed on the reactor thread, on all three runtimes.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from scrapy_speedup.exceptions import PoolClosedError, ThreadPoolExhaustedError

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from scrapy.crawler import Crawler
    from twisted.internet.defer import Deferred

    from scrapy_speedup._bridge import Bridge
    from scrapy_speedup.config import SpeedupConfig

__all__ = ["ThreadPool"]

logger = logging.getLogger(__name__)

# A timeout longer than this is a typo (and Python's waits overflow past
# ~292 years); the same bound as the *_SECONDS settings.
_MAX_TIMEOUT_S = 7 * 24 * 3600.0
# Timeouts are checked at most this often, however short.
_MIN_CHECK_S = 0.01


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
    thread: threading.Thread | None = None  # the one that runs it
    # Its caller was answered without its result (timeout, abandoned): a
    # late result is dropped.
    given_up: bool = False


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
        self.bridge = bridge
        self.workers = config.thread_workers
        self.max_stuck = config.thread_max_stuck
        self.shutdown_timeout_s = config.shutdown_timeout_seconds
        self._stats = crawler.stats if stat_prefix is not None else None
        self._prefix = stat_prefix or ""
        # Shared with the pool's threads, under _lock:
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._pending: deque[_Call] = deque()
        self._threads: set[threading.Thread] = set()
        self._idle = 0  # threads waiting for a call
        self._running: set[_Call] = set()
        self._retire = 0  # threads asked to exit after their call
        self._closed = False
        self._busy = 0
        self._busy_max = 0
        # Reactor thread only:
        self._stuck: set[_Call] = set()
        self._check_every: float | None = None  # None: no timeout seen yet
        self._spawned = 0
        self._start_error: str | None = None

    def _stat(self, method: str, name: str, value: Any = 1) -> None:
        if self._stats is not None:
            getattr(self._stats, method)(self._prefix + name, value)

    # -- capacity (reactor thread) ----------------------------------------------

    def _usable(self) -> int:
        """Threads alive and not stuck in a call that timed out."""
        with self._lock:
            return len(self._threads) - self._retire - len(self._stuck)

    def _allowed(self) -> int:
        """How many usable threads the pool may have now: its size, less the
        stuck threads past the ceiling."""
        return max(0, min(self.workers, self.workers + self.max_stuck - len(self._stuck)))

    def _ensure_threads(self) -> None:
        """Start threads while calls wait for one and the pool may grow;
        threads start as calls need them, as in Twisted's pool."""
        while True:
            with self._lock:
                wanted = len(self._pending) > self._idle
            if not wanted or self._usable() >= self._allowed():
                break
            if not self._spawn():
                break
        if self._usable() == 0:
            self._fail_pending(self._exhausted_error())

    def _spawn(self) -> bool:
        self._spawned += 1
        thread = threading.Thread(
            target=self._work, name=f"scrapy-speedup-thread-{self._spawned}", daemon=True
        )
        with self._lock:
            self._threads.add(thread)
        try:
            thread.start()
        except RuntimeError as exc:  # "can't start new thread": out of memory or a ulimit
            with self._lock:
                self._threads.discard(thread)
            self._stat("inc_value", "start_error_count")
            if self._start_error is None:
                logger.error(
                    "scrapy-speedup could not start a thread for blocking calls (%s);"
                    " calls wait for the %d threads it has", exc, self._usable(),
                    extra={"crawler": self.crawler},
                )
            self._start_error = str(exc)
            return False
        return True

    def _exhausted_error(self) -> ThreadPoolExhaustedError:
        stuck = sorted({c.name for c in self._stuck})
        if self._start_error is not None and len(self._stuck) < self.workers + self.max_stuck:
            why = f"no thread could be started ({self._start_error})"
        else:
            why = (
                f"all {len(self._stuck)} threads it may have are stuck in calls that ran"
                f" past their timeout ({', '.join(stuck)}); SPEEDUP_THREAD_WORKERS is"
                f" {self.workers} and SPEEDUP_THREAD_MAX_STUCK {self.max_stuck}"
            )
        return ThreadPoolExhaustedError(f"the crawl's thread pool cannot run a call: {why}")

    def _fail_pending(self, error: BaseException, outcome: str = "error") -> None:
        with self._lock:
            calls, self._pending = list(self._pending), deque()
        for call in calls:
            self._stat("inc_value", f"{outcome}_count")
            self.bridge.fail(call.waiter, error)

    # -- calls ------------------------------------------------------------------

    async def run(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
    ) -> Any:
        self._stat("inc_value", "task_count")
        name = getattr(func, "__qualname__", repr(func))
        if timeout is not None and not (
                isinstance(timeout, (int, float)) and 0 < timeout <= _MAX_TIMEOUT_S):
            self._stat("inc_value", "error_count")
            raise ValueError(
                f"the timeout of {name} ({timeout!r}) must be None or a number of seconds"
                f" more than 0 and at most {_MAX_TIMEOUT_S:g}"
            )
        if self._closed:
            self._stat("inc_value", "error_count")
            raise PoolClosedError(f"{name}: the thread pool of this crawl is closed")
        call = _Call(func, args, kwargs, name, self.bridge.new_waiter(), timeout)
        if timeout is not None:
            self._watch_timeouts(timeout)
        with self._lock:
            self._pending.append(call)
            self._wakeup.notify()
        self._ensure_threads()
        return await call.waiter

    def _work(self) -> None:
        """A pool thread: run calls until told to stop."""
        # The reactor doctor's SIGALRM is for the reactor thread: blocked
        # here, the kernel never picks this thread for it, so a blocking call
        # of a C library running here is never interrupted by it.
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        me = threading.current_thread()
        while True:
            with self._lock:
                self._idle += 1
                while not self._pending and not self._closed and not self._retire:
                    self._wakeup.wait()
                self._idle -= 1
                if self._retire or (self._closed and not self._pending):
                    if self._retire:
                        self._retire -= 1
                    self._threads.discard(me)
                    return
                call = self._pending.popleft()
                call.started_at = time.monotonic()
                call.thread = me
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
            self.bridge.call_from_thread(self._on_done, call, result, error)

    def _on_done(self, call: _Call, result: Any, error: BaseException | None) -> None:
        assert call.started_at is not None
        self._stat(
            "max_value", "queue_wait_seconds_max", round(call.started_at - call.queued_at, 3)
        )
        self._stat("max_value", "busy_max", self._busy_max)
        if call.given_up:
            if call in self._stuck:
                # A stuck call came back: its thread is usable again, and
                # retires if the pool is now above its size.
                self._stuck.discard(call)
                logger.info(
                    "%s returned after %.1f s, past its timeout", call.name,
                    time.monotonic() - call.started_at, extra={"crawler": self.crawler},
                )
                with self._lock:
                    if len(self._threads) - self._retire - len(self._stuck) > self.workers:
                        self._retire += 1
                        self._wakeup.notify_all()
            return
        if error is None:
            self._stat("inc_value", "succeeded_count")
            self.bridge.resolve(call.waiter, result)
        else:
            self._stat("inc_value", "error_count")
            self.bridge.fail(call.waiter, error)

    # -- timeouts (reactor thread) ----------------------------------------------

    def _watch_timeouts(self, timeout: float) -> None:
        """Check running calls often enough to stop one within ~25% of the
        shortest timeout seen, at most once a second: a deadline counts from
        when the call starts, as waiting for a thread is backpressure, not a
        stuck call."""
        every = max(_MIN_CHECK_S, min(1.0, timeout / 4))
        first = self._check_every is None
        if first or every < self._check_every:  # type: ignore[operator]
            self._check_every = every
        if first:
            self.bridge.call_later(every, self._check_timeouts)

    def _check_timeouts(self) -> None:
        if self._closed:
            return
        try:
            now = time.monotonic()
            with self._lock:
                running = list(self._running)
            for call in running:
                assert call.started_at is not None
                if (
                    call.timeout is not None
                    and not call.given_up
                    and now - call.started_at > call.timeout
                ):
                    self._on_timeout(call)
            self._stat("max_value", "busy_max", self._busy_max)
        finally:
            # Whatever happened above, timeouts keep being watched.
            assert self._check_every is not None
            self.bridge.call_later(self._check_every, self._check_timeouts)

    def _on_timeout(self, call: _Call) -> None:
        call.given_up = True
        self._stuck.add(call)
        self._stat("inc_value", "timeout_count")
        self._stat("inc_value", "error_count")
        self._stat("max_value", "stuck_max", len(self._stuck))
        self._stat("inc_value", "stuck_count")
        self.bridge.fail(
            call.waiter,
            TimeoutError(f"{call.name} ran past its timeout of {call.timeout} s in a thread"),
        )
        replaced = len(self._stuck) <= self.max_stuck
        logger.warning(
            "%s ran past its timeout of %s s; its thread is stuck (%d stuck); %s",
            call.name, call.timeout, len(self._stuck),
            "a new thread takes its place" if replaced else
            f"past SPEEDUP_THREAD_MAX_STUCK ({self.max_stuck}) it is not replaced:"
            f" {self._allowed()} threads left for blocking calls",
            extra={"crawler": self.crawler},
        )
        self._ensure_threads()

    # -- stopping (reactor thread) ----------------------------------------------

    def abandon(self, why: str) -> None:
        """Give up the calls waiting and running now (the crawl is stopping
        and SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS passed): their callers get a
        PoolClosedError, counted as abandoned; later calls fail at once."""
        self._closed = True
        with self._lock:
            running = [c for c in self._running if not c.given_up]
            waiting = len(self._pending)
            self._wakeup.notify_all()
        if running or waiting:
            logger.warning(
                "%d blocking calls still waiting or running %s s after the crawl began to"
                " stop (SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS); abandoning them (%s): %s",
                len(running) + waiting, self.shutdown_timeout_s, why,
                sorted({c.name for c in running}), extra={"crawler": self.crawler},
            )
        error = PoolClosedError(
            f"abandoned: the crawl stopped and the call had not finished within"
            f" SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS ({self.shutdown_timeout_s} s)"
        )
        self._fail_pending(error, "abandoned")
        for call in running:
            call.given_up = True
            self._stat("inc_value", "abandoned_count")
            self.bridge.fail(call.waiter, error)

    async def close(self) -> None:
        """Stop the threads, waiting at most SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS
        for those whose calls someone still waits for."""
        with self._lock:
            already = self._closed and not self._threads
            self._closed = True
            self._wakeup.notify_all()
            # A call that timed out or was abandoned has had its answer: its
            # thread (a daemon) ends with the process, and waiting for it
            # would only delay every crawl that had one.
            given_up = {c.thread: c.name for c in self._running if c.given_up}
            threads = [t for t in self._threads if t not in given_up]
        self._stat("max_value", "busy_max", self._busy_max)
        if given_up:
            logger.info(
                "%d threads are still in calls given up (%s); the crawl does not wait"
                " for them", len(given_up), sorted(set(given_up.values())),
                extra={"crawler": self.crawler},
            )
        if already or not threads:
            return
        deadline = time.monotonic() + self.shutdown_timeout_s

        def join() -> list[str]:
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            return [t.name for t in threads if t.is_alive()]

        alive = await self.bridge.run_in_new_thread(join, "scrapy-speedup-thread-join")
        if alive:
            logger.warning(
                "%d threads still blocked after SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS (%s s):"
                " the crawl exits without them",
                len(alive), self.shutdown_timeout_s, extra={"crawler": self.crawler},
            )
