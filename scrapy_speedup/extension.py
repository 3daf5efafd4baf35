"""The extension that owns scrapy-speedup's pools for one crawler."""

from __future__ import annotations

import logging
import platform
import signal
import time
import weakref
from typing import TYPE_CHECKING, Any

import scrapy
import twisted
from scrapy import signals
from scrapy.exceptions import NotConfigured

from scrapy_speedup._bridge import Bridge, Timer
from scrapy_speedup._thread_pool import ThreadPool
from scrapy_speedup.config import SpeedupConfig
from scrapy_speedup.process.pool import ProcessPool
from scrapy_speedup.reactor_doctor import ReactorDoctor

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Self

    from scrapy import Spider
    from scrapy.crawler import Crawler

__all__ = ["SpeedupExtension"]

logger = logging.getLogger(__name__)

# Crawls of this process whose speedup is on, so that run_in_process() finds
# the pools without being passed the crawler when only one crawl runs. This
# is a lookup table: the pools themselves belong to each extension.
_running: weakref.WeakSet[SpeedupExtension] = weakref.WeakSet()
# How often the extension looks whether the crawl has begun to stop.
_STOP_POLL_S = 0.25
# How often a stop held for the spider's close looks whether it has ended.
_CLOSE_POLL_S = 0.05


def _forced_stop() -> bool:
    """Whether Scrapy has seen a second Ctrl-C (or SIGTERM): it then ignores
    both signals from on."""
    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN and \
        signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


def running_extensions() -> list[SpeedupExtension]:
    return list(_running)


class SpeedupExtension:
    """Owns the process and thread pools of one crawler: starts them once the
    reactor runs, drains and shuts them down when the spider closes, logs and
    counts. Runs the reactor doctor while the spider is open.

    Reach it from a component with ``SpeedupExtension.of(crawler)``.
    """

    def __init__(self, crawler: Crawler, config: SpeedupConfig) -> None:
        self.crawler = crawler
        self.config = config
        self._bridge: Bridge | None = None
        self._pool: ProcessPool | None = None
        self._threads: ThreadPool | None = None
        #: Measures reactor lag and names what blocks the reactor (None when
        #: SPEEDUP_DOCTOR_ENABLED is False or before the spider opens).
        self.doctor: ReactorDoctor | None = None
        self._stop_watch: Timer | None = None
        self._stop_deadline: Timer | None = None
        self._giving_up: list[Callable[[str], None]] = []

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        config = SpeedupConfig.of(crawler)
        if not config.enabled:
            raise NotConfigured
        ext = cls(crawler, config)
        crawler.signals.connect(ext.spider_opened, signal=signals.spider_opened)
        crawler.signals.connect(ext.spider_closed, signal=signals.spider_closed)
        crawler.signals.connect(ext.engine_stopped, signal=signals.engine_stopped)
        return ext

    @classmethod
    def of(cls, crawler: Crawler) -> Self:
        """The extension of *crawler*; raises if scrapy-speedup is not enabled."""
        ext = crawler.get_extension(cls)
        if ext is None:
            raise RuntimeError(
                "scrapy-speedup is not enabled for this crawler: add"
                ' ADDONS = {"scrapy_speedup.Addon": 500} to its settings'
                " (and leave SPEEDUP_ENABLED unset or True)"
            )
        return ext

    @property
    def bridge(self) -> Bridge:
        """The crawl's one bridge to the reactor thread, created on first use
        (on the reactor thread, once the reactor or loop runs)."""
        if self._bridge is None:
            self._bridge = Bridge()
        return self._bridge

    @property
    def pool(self) -> ProcessPool:
        """The crawl's process pool, created on first use (the reactor runs by then)."""
        if self._pool is None:
            if self.config.process_executor == "dask":
                from scrapy_speedup.process.dask_pool import DaskPool

                self._pool = DaskPool(self.crawler, self.config, self.bridge)
            else:
                self._pool = ProcessPool(self.crawler, self.config, self.bridge)
        return self._pool

    @property
    def pool_if_started(self) -> ProcessPool | None:
        """The process pool if something has used it, else None."""
        return self._pool

    @property
    def thread_pool(self) -> ThreadPool:
        """The crawl's thread pool for blocking calls, created on first use."""
        if self._threads is None:
            self._threads = ThreadPool(self.crawler, self.config, self.bridge)
        return self._threads

    async def run_in_thread(
        self,
        func: Callable[..., Any],
        /,
        *args: Any,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the blocking ``func(*args, **kwargs)`` in this crawl's thread pool.

        *timeout* (seconds) defaults to ``SPEEDUP_THREAD_TIMEOUT_SECONDS``.
        """
        if not self.config.thread_enabled:
            from scrapy.utils.asyncio import run_in_thread

            return await run_in_thread(func, *args, **kwargs)
        if timeout is None:
            timeout = self.config.thread_timeout_seconds
        return await self.thread_pool.run(func, args, kwargs, timeout)

    async def run_in_process(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``func(*args, **kwargs)`` in this crawl's process pool."""
        if not self.config.process_enabled:
            return getattr(func, "__speedup_wrapped__", func)(*args, **kwargs)
        return await self.pool.run(func, args, kwargs)

    def spider_opened(self, spider: Spider) -> None:
        from scrapy_speedup import __version__

        config = self.config
        # Running from now on: run_in_process() without a crawler finds it.
        _running.add(self)
        if config.doctor_enabled:
            self.doctor = ReactorDoctor(self.crawler, config, self.bridge)
            self.doctor.start()
        self._watch_for_stop()
        # Workers and threads start on first use (process workers now, for
        # the pipelines that run in them, whose open_spider waits for them): a
        # crawl that never offloads, or whose calls are all cheap, pays nothing.
        if config.coordinates:
            # The crawl's work, pipelines in workers included, is the engine
            # processes'; each logs its own pools.
            pools = (
                f"coordinator of {config.crawl_processes} engine processes (they run the"
                " callbacks and ITEM_PIPELINES, and their own pools; a pool of this"
                " process starts only if something here uses it)"
            )
        elif config.process_enabled and config.dask is not None:
            pools = (
                f"process pool on the Dask cluster at {config.dask.address},"
                f" {config.process_max_in_flight} tasks in flight at most, pipelines on its"
                f" workers: {list(config.process_pipelines) or 'none'}"
            )
        elif config.process_enabled:
            pools = (
                f"process pool of {config.process_workers} workers"
                f" ({config.process_start_method}), {config.process_max_in_flight}"
                f" tasks in flight at most, pipelines in workers:"
                f" {list(config.process_pipelines) or 'none'}"
            )
        else:
            pools = "process pool off (SPEEDUP_PROCESS_ENABLED=False)"
        if config.thread_enabled:
            timeout = config.thread_timeout_seconds
            pools += (
                f"; thread pool of {config.thread_workers} threads"
                f" (timeout: {f'{timeout} s' if timeout else 'none'})"
            )
        if self.doctor is not None:
            pools += f"; reactor doctor warns of blocks over {config.lag_warn_ms:g} ms"
            if self.doctor.no_sampling_reason:
                pools += f" (cannot name what blocks: {self.doctor.no_sampling_reason})"
        logger.info(
            "scrapy-speedup %s (Scrapy %s, Twisted %s, Python %s) on the %s: %s",
            __version__,
            scrapy.__version__,
            twisted.__version__,
            platform.python_version(),
            self.bridge.runtime,
            pools,
            extra={"crawler": self.crawler},
        )

    # -- a bounded stop ---------------------------------------------------------

    def _watch_for_stop(self) -> None:
        """Notice when the crawl begins to stop (Ctrl-C, CloseSpider, the
        engine closing the spider) and give offloaded work at most
        SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS from then.

        Scrapy closes the spider only once every response in progress is
        handled, and a response whose item waits for a task that never ends
        is never handled: a drain that starts at spider_closed would never
        start. No signal marks the start of a stop, hence a light poll.
        """
        self._stop_watch = None
        if self._stop_deadline is not None:
            return
        if self._stopping():
            timeout = self.config.shutdown_timeout_seconds
            if self._pool is not None or self._threads is not None:
                logger.info(
                    "scrapy-speedup: the crawl is stopping; offloaded work has %s s to"
                    " finish (SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS)", timeout,
                    extra={"crawler": self.crawler},
                )
            self._stop_deadline = self.bridge.call_later(timeout, self._give_up)
            self._nudge_scraper_close()
            return
        self._stop_watch = self.bridge.call_later(_STOP_POLL_S, self._watch_for_stop)

    def _nudge_scraper_close(self) -> None:
        """While the crawl stops, let Scrapy's scraper see that it is idle.

        Scrapy 2.19's scraper checks whether it may close only when a
        response is done, not when an item sent by the spider's ``start()``
        leaves the pipelines: a stop that begins while such items are in a
        pipeline that takes time (a database writer, a pipeline in the
        workers, any asynchronous one; vanilla Scrapy too) waits for ever on
        an idle scraper. Its own check is called here until the spider
        closes."""
        self._stop_watch = None
        engine = self.crawler.engine
        scraper = getattr(engine, "scraper", None)
        slot = getattr(scraper, "slot", None)
        if scraper is None or slot is None or engine is None or engine.spider is None:
            return  # closed
        closing = getattr(slot, "closing", None)
        if closing is not None and not closing.called and slot.is_idle():
            scraper._check_if_closing()
        self._stop_watch = self.bridge.call_later(_STOP_POLL_S, self._nudge_scraper_close)

    def _stopping(self) -> bool:
        if not self.crawler.crawling:
            return True
        engine = self.crawler.engine
        slot = getattr(engine, "_slot", None)
        return slot is not None and getattr(slot, "closing", None) is not None

    def when_giving_up(self, callback: Callable[[str], None]) -> None:
        """Have ``callback(why)`` called when the crawl gives up its offloaded
        work: it is stopping and SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS passed, or
        it was forced to stop (the database pipelines stop retrying)."""
        self._giving_up.append(callback)

    def _give_up(self, why: str = "the crawl is stopping") -> None:
        for callback in self._giving_up:
            try:
                callback(why)
            except Exception:
                logger.exception("scrapy-speedup: %r failed", callback,
                                 extra={"crawler": self.crawler})
        if self._pool is not None:
            self._pool.abandon(why)
        if self._threads is not None:
            self._threads.abandon(why)

    async def spider_closed(self, spider: Spider, reason: str) -> None:
        _running.discard(self)
        if self._stop_watch is not None:
            self._stop_watch.cancel()
        if self._stop_deadline is not None:
            self._stop_deadline.cancel()
        if self.doctor is not None:
            self.doctor.stop()
        if self._pool is not None:
            await self._pool.close(reason)
        if self._threads is not None:
            await self._threads.close()
        self._log_summary()

    # -- a stop that begins while the spider closes ------------------------------

    async def engine_stopped(self) -> None:
        """Hold the end of the crawl until the spider's close has ended.

        A graceful stop that begins while the spider is already closing
        (Ctrl-C after "Closing spider (finished)") does not wait for that close
        in Scrapy 2.19: the engine's second close returns as soon as the first
        has begun, ``engine_stopped`` is sent, and the reactor (or the loop)
        stops in the middle of the first close. With the pipelines inline that
        is rarely seen, as a blocking ``close_spider`` delays the signal; with
        them in the workers, their ``close_spider`` (a buffer flushed to a
        database) was killed half done, and the stats were never dumped.
        Scrapy waits for this handler; it returns once the engine has closed
        the spider, at once on a forced stop (Ctrl-C twice), and in bounded
        time in any case."""
        if self._spider_close_ended() or (self._pool is None and self._threads is None):
            return  # nothing of scrapy-speedup's is closing: Scrapy's own behaviour
        # The pool's close waits at most the timeout for its tasks and again
        # for its workers; the thread pool's once more.
        bound_s = 3 * self.config.shutdown_timeout_seconds + 5
        logger.info(
            "scrapy-speedup: waiting for the spider's close to end (offloaded work"
            " closing; at most %d s, Ctrl-C again to force)", bound_s,
            extra={"crawler": self.crawler},
        )
        until = time.monotonic() + bound_s
        while not self._spider_close_ended() and time.monotonic() < until:
            if _forced_stop():
                self._give_up("the crawl was forced to stop")
                return
            waiter = self.bridge.new_waiter()
            self.bridge.call_later(_CLOSE_POLL_S, self.bridge.resolve, waiter, None)
            await waiter
        if not self._spider_close_ended():
            logger.warning(
                "scrapy-speedup: the spider's close had not ended after %d s; the crawl"
                " stops without it", bound_s, extra={"crawler": self.crawler},
            )

    def _spider_close_ended(self) -> bool:
        engine = self.crawler.engine
        return engine is None or engine.spider is None

    def _log_summary(self) -> None:
        stats = self.crawler.stats
        abandoned = sum(int(stats.get_value(f"speedup/{pool}/abandoned_count", 0))
                        for pool in ("process", "thread"))
        if abandoned and self.crawler.settings.get("JOBDIR"):
            logger.warning(
                "scrapy-speedup: %d offloaded tasks were abandoned at the stop deadline"
                " (SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS = %s s); their requests are done for"
                " JOBDIR, so a resumed crawl will not fetch those pages again: give slow"
                " work a deadline it can meet", abandoned,
                self.config.shutdown_timeout_seconds, extra={"crawler": self.crawler},
            )
        if self.doctor is not None:
            self.doctor.log_summary()
        if self._threads is not None:

            def thread_count(name: str) -> int:
                return int(stats.get_value(f"speedup/thread/{name}", 0))

            logger.info(
                "scrapy-speedup thread pool: %d calls: %d succeeded, %d errored"
                " (%d timed out, %d left threads stuck), %d abandoned; %d threads busy"
                " at most",
                thread_count("task_count"),
                thread_count("succeeded_count"),
                thread_count("error_count"),
                thread_count("timeout_count"),
                thread_count("stuck_count"),
                thread_count("abandoned_count"),
                thread_count("busy_max"),
                extra={"crawler": self.crawler},
            )
        if self._pool is None:
            return

        def count(name: str) -> int:
            return int(stats.get_value(f"speedup/process/{name}", 0))

        logger.info(
            "scrapy-speedup process pool: %d tasks: %d succeeded, %d dropped,"
            " %d errored, %d abandoned, %d cancelled (%d ran inline); %d retries,"
            " %d worker crashes, %d timeouts",
            count("task_count"),
            count("succeeded_count"),
            count("dropped_count"),
            count("error_count"),
            count("abandoned_count"),
            count("cancelled_count"),
            count("inline_count"),
            count("retry_count"),
            count("worker_crash_count"),
            count("timeout_count"),
            extra={"crawler": self.crawler},
        )
