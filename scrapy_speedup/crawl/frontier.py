"""The coordinator's scheduler: the crawl's one frontier.

It never gives the coordinator's engine a request to download: a dispatcher
lends each request to an engine process (:mod:`.coordinator`) when the
crawl's limits allow. Two frontiers stand behind it:

- with Scrapy's default scheduling (scheduler, dupefilter, memory queues, no
  ``JOBDIR``, AutoThrottle or adaptive concurrency), the byte frontier
  (:mod:`.byte_frontier`): Scrapy's algorithm over the requests' bytes, never
  rebuilding a request, about fifteen times cheaper a request;
- otherwise the project's own scheduler (``SCHEDULER``), wrapped, so its
  queues, priorities, ``DUPEFILTER_CLASS`` and ``JOBDIR`` keep working: the
  dispatcher takes requests from it in priority order into the coordinator's
  downloader, whose per-site slots (``CONCURRENT_REQUESTS*``,
  ``DOWNLOAD_DELAY``, AutoThrottle, adaptive concurrency) hold for the whole
  crawl, and which lends each request to an engine (:mod:`.downloader`).

The crawl is idle, and Scrapy's ``spider_idle`` is sent, only when the queues
are empty and every lease has been acknowledged. The coordinator's close
(any reason: finished, Ctrl-C, a CLOSESPIDER_* limit) first closes the engine
processes: the engine's close waits for them, then the crawl pipelines and
feeds close with every item in.
"""

from __future__ import annotations

import logging
import pickle
import time
from typing import TYPE_CHECKING, Any

from scrapy import Request, signals
from scrapy.core.scheduler import BaseScheduler
from scrapy.exceptions import CloseSpider
from scrapy.utils.defer import deferred_from_coro, maybe_deferred_to_future
from scrapy.utils.misc import build_from_crawler, load_object

from scrapy_speedup.config import SpeedupConfig
from scrapy_speedup.crawl.byte_frontier import ByteFrontier, Entry, slot_key, usable
from scrapy_speedup.crawl.coordinator import Coordinator
from scrapy_speedup.crawl.downloader import LeaseEnded
from scrapy_speedup.crawl.engine_process import spec_for
from scrapy_speedup.extension import SpeedupExtension

if TYPE_CHECKING:
    from typing import Self

    from scrapy import Spider
    from scrapy.crawler import Crawler
    from twisted.internet.defer import Deferred

    from scrapy_speedup._bridge import Timer

__all__ = ["INNER_SCHEDULER_SETTING", "FrontierScheduler"]

logger = logging.getLogger(__name__)

#: Where the add-on keeps the project's SCHEDULER, which the frontier wraps.
INNER_SCHEDULER_SETTING = "_SPEEDUP_FRONTIER_SCHEDULER"
# Items waiting for the crawl's pipelines at which no new request is leased:
# a slow crawl pipeline slows the crawl instead of filling memory.
_ITEMS_HIGH = 2000
_HELD_POLL_S = 0.05
# Beyond SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS, how long the reactor's shutdown
# waits for a spider closing while its engines started.
_CLOSE_MARGIN_S = 30.0


class _EnginesAtWork(Request):
    """Held in the coordinator engine's requests in progress while engine
    processes run: Scrapy's close waits for it (as for any request in
    progress) before it closes the downloader, pipelines and feeds."""


class FrontierScheduler(BaseScheduler):
    def __init__(self, crawler: Crawler, inner: BaseScheduler) -> None:
        self.crawler = crawler
        self.inner = inner
        self.config = SpeedupConfig.of(crawler)
        self.coordinator: Coordinator | None = None
        self._pump_timer: Timer | None = None
        self._sentinel = _EnginesAtWork("data:,")
        self._warned_callbacks: set[str] = set()
        self._closing = False
        self._fingerprints: set[bytes] | None = None
        self.frontier: ByteFrontier | None = None

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        path = crawler.settings.get(INNER_SCHEDULER_SETTING) or "scrapy.core.scheduler.Scheduler"
        inner = build_from_crawler(load_object(path), crawler)
        return cls(crawler, inner)

    # -- life cycle -------------------------------------------------------------

    def open(self, spider: Spider) -> Deferred[None]:
        return deferred_from_coro(self._open(spider))

    async def _open(self, spider: Spider) -> None:
        result = self.inner.open(spider) if hasattr(self.inner, "open") else None
        if result is not None:
            await maybe_deferred_to_future(result)
        engine = self.crawler.engine
        bridge = SpeedupExtension.of(self.crawler).bridge
        # A scheduler that leases from a frontier of its own (the Redis
        # frontier's) is told when each request is done with, and wakes the
        # dispatcher when leases arrive.
        handled = getattr(self.inner, "request_handled", None)
        if hasattr(self.inner, "on_leased"):
            self.inner.on_leased = self.pump_soon
        self.coordinator = Coordinator(
            self.crawler, self.config, bridge, enqueue=self._enqueue, requeue=self.requeue,
            seen=self._seen, wake=self._wake_engine, on_closed=self._engines_closed,
            handled=handled,
        )
        # Every way the crawl closes goes through the engine's
        # close_spider_async: the engines are asked to close at once (no
        # signal marks the start of a close; spider_closed comes too late).
        original = engine.close_spider_async

        async def close_spider_async(*, reason: str = "cancelled") -> None:
            if not self._closing:
                self._closing = True
                if self.coordinator is not None:
                    self.coordinator.begin_close(reason)
                self._return_waiting()
            await original(reason=reason)

        engine.close_spider_async = close_spider_async  # type: ignore[method-assign]
        assert engine._slot is not None
        engine._slot.add_request(self._sentinel)
        self._fingerprints = self._seen_fingerprints()
        self._choose_frontier(bridge)
        self.crawler.signals.connect(self._spider_opened, signals.spider_opened)
        self._hold_reactor_until_closed()
        try:
            await self.coordinator.start(spec_for(self.crawler))
        except CloseSpider:
            # Stopped while the engines started: Scrapy closes the spider at
            # once, and its close needs the scraper open, which an exception
            # here would skip.
            await engine.scraper.open_spider_async()
            raise

    def _choose_frontier(self, bridge: Any) -> None:
        assert self.coordinator is not None
        why_not = usable(self.crawler, self.inner)
        if why_not is None:
            assert self._fingerprints is not None  # Scrapy's RFPDupeFilter: see usable()
            self.frontier = ByteFrontier(self.crawler, bridge, fingerprints=self._fingerprints,
                                         lend=self.coordinator.lend_entry)
            self.coordinator.frontier = self.frontier
            logger.info("scrapy-speedup: the crawl's frontier keeps requests as bytes"
                        " (Scrapy's default scheduling)", extra={"crawler": self.crawler})
        else:
            logger.info("scrapy-speedup: the crawl's frontier is Scrapy's scheduler and"
                        " downloader slots, in this process: %s", why_not,
                        extra={"crawler": self.crawler})

    def _hold_reactor_until_closed(self) -> None:
        """Scrapy's graceful stop (Ctrl-C) of a crawler still opening stops
        the Twisted reactor at once, and engine processes take seconds to
        open: the reactor's shutdown waits here until the spider has closed
        (at once on a second Ctrl-C, in bounded time in any case). In
        reactorless mode Scrapy waits for the crawl by itself."""
        from scrapy.utils.reactorless import is_reactorless

        if is_reactorless():
            return
        from twisted.internet import reactor as _reactor

        reactor: Any = _reactor  # the installed reactor; the stubs cannot know it
        reactor.addSystemEventTrigger("before", "shutdown", self._until_closed)

    def _until_closed(self) -> Deferred[None] | None:
        from twisted.internet.defer import Deferred

        from scrapy_speedup.extension import _forced_stop

        if self.crawler.engine is None or self.crawler.engine.spider is None:
            return None
        done: Deferred[None] = Deferred()
        until = time.monotonic() + self.config.shutdown_timeout_seconds + _CLOSE_MARGIN_S
        bridge = SpeedupExtension.of(self.crawler).bridge

        def check() -> None:
            engine = self.crawler.engine
            if engine is None or engine.spider is None or _forced_stop() or \
                    time.monotonic() > until:
                done.callback(None)
            else:
                bridge.call_later(_HELD_POLL_S, check)

        check()
        return done

    def _spider_opened(self, spider: Spider) -> None:
        # The engines are ready, and the crawl pipelines open: leases may go
        # out (JOBDIR may have queued requests from before).
        self.pump_soon()

    def close(self, reason: str) -> Deferred[None] | None:
        # The engines have closed (the engine's close waited for them).
        own = self.crawler.stats.get_stats()
        if self.coordinator is not None:
            totals = self.coordinator.crawl_totals(own)
            for key, value in totals.items():
                self.crawler.stats.set_value(key, value)
            self._log_summary(totals)
        if hasattr(self.inner, "close"):
            return self.inner.close(reason)
        return None

    def _log_summary(self, totals: dict[str, Any]) -> None:
        assert self.coordinator is not None
        n = self.coordinator.n
        pages = [totals.get(f"speedup/crawl/engine/{i}/response_received_count", 0)
                 for i in range(n)]

        def count(name: str) -> int:
            return int(totals.get(f"speedup/crawl/{name}", 0))

        logger.info(
            "scrapy-speedup engine processes: %d engines crawled %d pages (%s); %d leases"
            " in %d messages, %d reassigned, %d requeued; %d crashes, %d restarts; %d requests"
            " kept in an engine (not serializable); reactor blocks over the warning in all"
            " processes: %d, lag max %s ms",
            n, sum(pages), ", ".join(f"engine {i}: {p}" for i, p in enumerate(pages)),
            count("lease_count"), count("lease_message_count"), count("lease_reassigned_count"),
            count("requeued_count"), count("process_crash_count"),
            count("process_restart_count"), count("kept_in_engine_count"),
            int(totals.get("speedup/reactor/block_count", 0)),
            totals.get("speedup/reactor/lag_max_ms", "-"),
            extra={"crawler": self.crawler},
        )

    def _return_waiting(self) -> None:
        """Put back in the queues the requests that wait in the downloader
        for their site's turn: they were never lent, and the downloader's
        close would drop them (JOBDIR keeps them this way)."""
        if self.frontier is not None:
            self.frontier.close()  # no JOBDIR: what waits is dropped, as Scrapy's memory
            return
        downloader = self.crawler.engine.downloader
        for slot in list(downloader.slots.values()):
            while slot.queue:
                request, deferred = slot.queue.popleft()
                self.requeue(request)
                deferred.errback(LeaseEnded("the crawl is closing"))

    def _engines_closed(self) -> None:
        engine = self.crawler.engine
        slot = getattr(engine, "_slot", None)
        if slot is not None and self._sentinel in slot.inprogress:
            slot.remove_request(self._sentinel)

    # -- the scheduler's interface ------------------------------------------------

    def has_pending_requests(self) -> bool:
        return self.inner.has_pending_requests() or (
            self.frontier is not None and self.frontier.pending
        ) or (self.coordinator is not None and self.coordinator.outstanding > 0)

    def enqueue_request(self, request: Request) -> bool:
        """A request made in this process (start(), a spider_idle handler):
        refused, with an error, if it cannot be sent to an engine process."""
        try:
            blob = pickle.dumps(request.to_dict(spider=self.crawler.spider),
                                protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - pickling and user code raise anything
            self.crawler.stats.inc_value("speedup/crawl/unserializable_count")
            key = repr(getattr(request.callback, "__qualname__", request.callback))
            if key not in self._warned_callbacks:
                self._warned_callbacks.add(key)
                logger.error(
                    "scrapy-speedup: %s (callback %s) was made in the coordinator and cannot"
                    " be sent to an engine process: %s. Requests of the spider's start()"
                    " must use spider methods as callbacks and picklable meta and"
                    " cb_kwargs; it is dropped", request, key, exc,
                    extra={"crawler": self.crawler},
                )
            return False
        if self.frontier is not None:
            fingerprint = self.crawler.request_fingerprinter.fingerprint(request)
            added = self.frontier.push(Entry(
                fingerprint, request.dont_filter, slot_key(request), request.priority, blob,
                start=bool(request.meta.get("is_start_request")),
            ))
            if added:
                self.pump_soon()
            return added
        return self._enqueue_known(request)

    def next_request(self) -> Request | None:
        # The coordinator downloads nothing itself: see pump().
        return None

    def __len__(self) -> int:
        if self.frontier is not None:
            return len(self.frontier)
        return len(self.inner) if hasattr(self.inner, "__len__") else 0  # type: ignore[arg-type]

    # -- requests from engines ------------------------------------------------------

    def _enqueue(self, request: Request) -> None:
        if not self._enqueue_known(request):
            self.crawler.signals.send_catch_log(
                signals.request_dropped, request=request, spider=self.crawler.spider
            )

    def _enqueue_known(self, request: Request) -> bool:
        added = bool(self.inner.enqueue_request(request))
        if added:
            self.pump_soon()
        return added

    def _seen_fingerprints(self) -> set[bytes] | None:
        """The fingerprints the crawl's dupefilter has seen, when it is
        Scrapy's own and nobody listens to request_dropped: a request from
        an engine whose fingerprint is there is a duplicate, filtered without
        rebuilding it (a request costs ~0.4 ms to rebuild and fingerprint,
        and with N engines most of what they send are duplicates)."""
        from pydispatch import dispatcher
        from scrapy.dupefilters import RFPDupeFilter

        dupefilter = getattr(self.inner, "df", None)
        if type(dupefilter) is not RFPDupeFilter or dupefilter.debug \
                or dupefilter._legacy_fingerprint:
            return None
        if list(dispatcher.getAllReceivers(self.crawler.signals.sender,
                                           signals.request_dropped)):
            return None
        fingerprints: set[bytes] = dupefilter._fingerprints
        return fingerprints

    def _seen(self, fingerprint: bytes) -> bool:
        """Whether the request of *fingerprint* is a duplicate, known without
        the request (then counted as filtered, as the dupefilter would)."""
        fingerprints = self._fingerprints
        if fingerprints is None or fingerprint not in fingerprints:
            return False
        dupefilter: Any = getattr(self.inner, "df", None)
        if dupefilter is not None and dupefilter.logdupes:
            return False  # the first duplicate is logged, with its request
        self.crawler.stats.inc_value("dupefilter/filtered")
        return True

    def requeue(self, request: Request) -> None:
        """Put back a request that was leased and not handled: past the
        dupefilter, which has seen it."""
        self.crawler.stats.inc_value("speedup/crawl/requeued_count")
        requeue_leased = getattr(self.inner, "requeue_leased", None)
        if requeue_leased is None or not requeue_leased(request):
            self.inner.enqueue_request(request.replace(dont_filter=True)
                                       if not request.dont_filter else request)
        self.pump_soon()

    # -- the dispatcher ------------------------------------------------------------

    def pump_soon(self, delay: float = 0.0) -> None:
        if self._pump_timer is None and self.coordinator is not None:
            self._pump_timer = self.coordinator.bridge.call_later(delay, self.pump)

    def pump(self) -> None:
        """Move requests from the queues into the downloader while the crawl
        has room: CONCURRENT_REQUESTS in flight in all, an engine with room
        for a lease, the crawl pipelines keeping up."""
        self._pump_timer = None
        coordinator = self.coordinator
        engine = self.crawler.engine
        if coordinator is None or self._closing or engine is None or engine.spider is None:
            return
        downloader = engine.downloader
        scraper_slot: Any = engine.scraper.slot
        if scraper_slot is None:
            return  # the crawl pipelines are not open yet: spider_opened pumps
        if self.frontier is not None:
            items_high = scraper_slot.itemproc_size >= _ITEMS_HIGH
            self.frontier.pump(held=getattr(downloader, "held", False) or items_high)
            if items_high:
                self.pump_soon(_HELD_POLL_S)
            return
        while not downloader.needs_backout():
            if scraper_slot.itemproc_size >= _ITEMS_HIGH:
                self.pump_soon(_HELD_POLL_S)
                return
            if not coordinator.accepting:
                return  # an acknowledgement or a new engine pumps again
            request = self.inner.next_request()
            if request is None:
                return
            deferred = downloader.fetch(request)
            deferred.addBoth(self._fetched)

    def _fetched(self, _: Any) -> None:
        # Whatever the outcome, the engine that had the lease has dealt with
        # it (its errback ran there); the downloader has a place free.
        self.pump_soon()

    def _wake_engine(self) -> None:
        """Have the coordinator's engine look at once whether the crawl is
        idle (it would otherwise wait for its 5-second heartbeat)."""
        self.pump_soon()
        engine = self.crawler.engine
        if getattr(engine.scraper, "slot", None) is None:
            return  # still opening: the engine looks once it runs
        nextcall = getattr(getattr(engine, "_slot", None), "nextcall", None)
        if nextcall is not None:
            nextcall.schedule()
