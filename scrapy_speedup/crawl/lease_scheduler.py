"""An engine process's scheduler: leased requests in; new requests, items,
releases and acknowledgements out.

- The coordinator's leases go into a local queue that the engine downloads
  from as fast as it can: the crawl's limits were applied in the coordinator.
- A request a callback makes (or a redirect, or a retry) goes to the
  coordinator's frontier, as ``Request.to_dict``. One that cannot (a lambda
  callback, meta that does not pickle) stays here, with a warning once per
  callback: it is downloaded by this engine, past the crawl's dupefilter and
  per-site limits, and the coordinator counts it as a lease until it is
  handled, so the crawl does not end before it.
- ``response_downloaded``, or a download error seen by
  :class:`ReleaseMiddleware`, releases a lease: its download has ended. The
  engine's ``_slot.remove_request`` (the engine is done with the request:
  callback, requests, items through the pipelines) acknowledges it.
  ``item_scraped`` forwards the item, tagged with its lease, to the
  coordinator.
- Everything goes out in one :class:`~.protocol.Report` per turn of the loop.

The engine is never idle by itself (``has_pending_requests`` stays True): it
closes when the coordinator says, so ``spider_idle`` runs once, in the
coordinator, when the whole crawl is idle.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from scrapy import Request, signals
from scrapy.core.scheduler import BaseScheduler
from scrapy.http import Response
from scrapy.utils.defer import _schedule_coro
from scrapy.utils.misc import build_from_crawler, load_object
from scrapy.utils.request import request_from_dict

from scrapy_speedup.crawl import engine_process
from scrapy_speedup.crawl.byte_frontier import slot_key
from scrapy_speedup.crawl.channel import Channel
from scrapy_speedup.crawl.protocol import Close, Lease, Message, Ready, Report
from scrapy_speedup.extension import SpeedupExtension

if TYPE_CHECKING:
    from typing import Self

    from scrapy import Spider
    from scrapy.crawler import Crawler

    from scrapy_speedup._bridge import Timer

__all__ = ["LeaseScheduler", "ReleaseMiddleware"]

logger = logging.getLogger(__name__)

_STAT = "speedup/crawl/"
# How often the engine's stats ride along with a report: the coordinator's
# CLOSESPIDER_PAGECOUNT / _ERRORCOUNT and LogStats read them.
_STATS_EVERY_S = 0.5
_LIMITS = ("response_received_count", "spider_exceptions/count")


class LeaseScheduler(BaseScheduler):
    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        self.link = engine_process.current()
        self.link.link = self
        self.queue: deque[Request] = deque()
        self.lease_of: dict[Request, int] = {}
        self._released: set[int] = set()
        self.report = Report()
        self.channel: Channel | None = None
        self.ready_sent = False
        self.closing = False
        self._flush_timer: Timer | None = None
        self._stats_sent_at = 0.0
        self._local_ids = 0
        self._warned: set[str] = set()
        # The requests this engine made (see enqueue_request); those it keeps
        # are checked against it alone: the crawl's is in the coordinator.
        self._dupefilter: Any = build_from_crawler(
            load_object(crawler.settings["DUPEFILTER_CLASS"]), crawler
        )

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    def open(self, spider: Spider) -> None:
        crawler = self.crawler
        bridge = SpeedupExtension.of(crawler).bridge
        self._bridge = bridge
        self.channel = Channel(
            self.link.conn.fileno(), bridge, self.link.spec.max_message_bytes,
            self._on_message, self._on_eof,
        )
        engine_slot = crawler.engine._slot
        assert engine_slot is not None
        original = engine_slot.remove_request

        def remove_request(request: Request) -> None:
            original(request)
            self._handled(request)

        engine_slot.remove_request = remove_request  # type: ignore[method-assign]
        self._share_cookies()
        crawler.signals.connect(self._response_downloaded, signals.response_downloaded)
        crawler.signals.connect(self._item_scraped, signals.item_scraped)
        crawler.signals.connect(self._spider_opened, signals.spider_opened)
        if hasattr(self._dupefilter, "open"):
            self._dupefilter.open()

    def _share_cookies(self) -> None:
        """Make the engine's cookie jars the crawl's: what its
        CookiesMiddleware puts in a jar (from a response's Set-Cookie or a
        request's ``cookies``) goes to the coordinator, which passes it on to
        every other engine (a login in one engine holds in all)."""
        from scrapy.downloadermiddlewares.cookies import CookiesMiddleware

        downloader: Any = self.crawler.engine.downloader
        found = [mw for mw in downloader.middleware.middlewares
                 if isinstance(mw, CookiesMiddleware)]
        if not found:
            return  # COOKIES_ENABLED = False
        middleware = found[0]
        original = getattr(middleware, "_process_cookies", None)
        if original is None:
            logger.warning(
                "scrapy-speedup: this Scrapy's CookiesMiddleware has no _process_cookies:"
                " cookies stay in the engine process that received them",
                extra={"crawler": self.crawler},
            )
            return
        self._cookies_middleware = middleware
        self._set_cookies = original

        def process_cookies(cookies: Any, *, jar: Any, request: Request) -> None:
            cookies = list(cookies)
            original(cookies, jar=jar, request=request)
            if cookies:
                key = next((k for k, j in middleware.jars.items() if j is jar), None)
                self.report.cookies.append((key, request.url, cookies))
                self._soon()

        setattr(middleware, "_process_cookies", process_cookies)  # noqa: B010 - a method

    def _apply_cookies(self, updates: list[Any]) -> None:
        middleware = getattr(self, "_cookies_middleware", None)
        if middleware is None:
            return
        for key, url, cookies in updates:
            self._set_cookies(cookies, jar=middleware.jars[key], request=Request(url))

    def _spider_opened(self, spider: Spider) -> None:
        assert self.channel is not None
        self.channel.send(Ready(os.getpid()))
        self.ready_sent = True

    def close(self, reason: str) -> None:
        # Leases not started: the coordinator puts them back in the frontier.
        returned = [self.lease_of.pop(r) for r in self.queue if r in self.lease_of]
        self.link.returned.extend(lease for lease in returned if lease > 0)
        lost = sum(1 for lease in returned if lease < 0)
        if lost:
            self.crawler.stats.inc_value(_STAT + "lost_count", lost)
            logger.warning("scrapy-speedup: %d requests kept in this engine (not serializable)"
                           " were not crawled before the close", lost,
                           extra={"crawler": self.crawler})
        self.report.acked.extend(lease for lease in returned if lease < 0)
        self.queue.clear()
        if hasattr(self._dupefilter, "close"):
            self._dupefilter.close(reason)
        self.flush()

    # -- the scheduler's interface ----------------------------------------------------

    def has_pending_requests(self) -> bool:
        # Never idle of its own accord: the coordinator closes it.
        return not self.closing or bool(self.queue)

    def next_request(self) -> Request | None:
        return self.queue.popleft() if self.queue else None

    def enqueue_request(self, request: Request) -> bool:
        spider = self.crawler.spider
        # A request this engine made before has been through the crawl's
        # dupefilter already, which would filter it again: filtered here, it
        # costs the coordinator nothing (on a site whose links are mostly to
        # pages seen, most of what callbacks make).
        if not request.dont_filter and self._dupefilter.request_seen(request):
            self._dupefilter.log(request, spider)
            return False
        try:
            blob = pickle.dumps(request.to_dict(spider=spider), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - pickling and user code raise anything
            return self._keep(request, exc)
        # Computed (and cached) by the dupefilter just now, for most.
        fingerprint = self.crawler.request_fingerprinter.fingerprint(request)
        self.report.requests.append(
            (fingerprint, request.dont_filter, slot_key(request), request.priority, blob)
        )
        self._soon()
        return True

    def __len__(self) -> int:
        return len(self.queue)

    def _keep(self, request: Request, exc: Exception) -> bool:
        """A request that cannot leave this process: downloaded here."""
        stats = self.crawler.stats
        stats.inc_value(_STAT + "unserializable_count")
        key = getattr(request.callback, "__qualname__", repr(request.callback))
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(
                "scrapy-speedup: %s (callback %s) cannot be sent to the crawl's frontier:"
                " %s. It is crawled by this engine process alone, outside the crawl's"
                " deduplication and per-site limits; use spider methods as callbacks and"
                " picklable meta and cb_kwargs. (Said once per callback.)",
                request, key, exc, extra={"crawler": self.crawler},
            )
        self._local_ids -= 1
        self.lease_of[request] = self._local_ids
        self.report.local.append(self._local_ids)
        self.queue.append(request)
        self._soon()
        return True

    # -- from the coordinator --------------------------------------------------------

    def _on_message(self, message: Message) -> None:
        if isinstance(message, Lease):
            self._on_lease(message)
        elif isinstance(message, Close):
            self.closing = True
            _schedule_coro(self.crawler.engine.close_spider_async(reason=message.reason))
        else:
            logger.error("scrapy-speedup: unexpected %s from the coordinator",
                         type(message).__name__, extra={"crawler": self.crawler})

    def _on_lease(self, message: Lease) -> None:
        spider = self.crawler.spider
        if message.cookies:
            self._apply_cookies(message.cookies)
        for lease_id, blob in message.entries:
            try:
                request = request_from_dict(pickle.loads(blob), spider=spider)
            except Exception:
                logger.exception("scrapy-speedup: a leased request could not be rebuilt",
                                 extra={"crawler": self.crawler})
                self.crawler.stats.inc_value(_STAT + "request_error_count")
                self.report.acked.append(lease_id)
                continue
            if self.closing:
                self.link.returned.append(lease_id)
                continue
            self.lease_of[request] = lease_id
            self.queue.append(request)
        self._soon()
        engine_slot = getattr(self.crawler.engine, "_slot", None)
        if engine_slot is not None:
            engine_slot.nextcall.schedule()

    def _on_eof(self, why: str) -> None:
        # The coordinator is gone without a word (killed): nobody is left to
        # take this engine's items; end now.
        logger.error("scrapy-speedup: the coordinator is gone (%s); this engine ends", why,
                     extra={"crawler": self.crawler})
        os._exit(1)

    # -- what goes back ----------------------------------------------------------------

    def _response_downloaded(self, response: Response, request: Request, spider: Spider) -> None:
        lease = self.lease_of.get(request)
        if lease is not None and lease > 0 and lease not in self._released:
            self._released.add(lease)
            self.report.released.append(
                (lease, response.status, request.meta.get("download_latency"), None)
            )
            self._soon()

    def download_failed(self, request: Request, exception: BaseException) -> None:
        lease = self.lease_of.get(request)
        if lease is not None and lease > 0 and lease not in self._released:
            self._released.add(lease)
            self.report.released.append((lease, None, None, type(exception).__name__))
            self._soon()

    def _item_scraped(self, item: Any, response: Any, spider: Spider) -> None:
        request = getattr(response, "request", None)
        lease = self.lease_of.get(request) if request is not None else None
        try:
            blob = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - pickling and user code raise anything
            self.crawler.stats.inc_value(_STAT + "item_unpicklable_count")
            logger.error(
                "scrapy-speedup: an item of type %s cannot be sent to the coordinator (%s);"
                " it does not reach the crawl's pipelines or feeds", type(item).__name__, exc,
                extra={"crawler": self.crawler},
            )
            return
        self.report.items.append((lease, blob))
        self._soon()

    def _handled(self, request: Request) -> None:
        lease = self.lease_of.pop(request, None)
        if lease is None:
            return
        self._released.discard(lease)
        self.report.acked.append(lease)
        self._soon()

    def _soon(self) -> None:
        if self._flush_timer is None and self.channel is not None:
            self._flush_timer = self._bridge.call_later(0, self._flush_now)

    def _flush_now(self) -> None:
        self._flush_timer = None
        self.flush()

    def flush(self) -> None:
        if self._flush_timer is not None:  # called directly while one is due
            self._flush_timer.cancel()
            self._flush_timer = None
        now = time.monotonic()
        stats = self.crawler.stats
        if now - self._stats_sent_at >= _STATS_EVERY_S:
            self._stats_sent_at = now
            self.report.stats = _numbers(stats.get_stats())
        elif self.report.acked:
            # What the crawl-wide limits count, with every report that has
            # pages in it: half a second of pages would overshoot them.
            self.report.stats = {key: stats.get_value(key, 0) for key in _LIMITS}
        if self.report and self.channel is not None:
            report, self.report = self.report, Report()
            self.channel.send(report)


def _numbers(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if isinstance(v, (int, float))}


class ReleaseMiddleware:
    """The innermost downloader middleware of an engine process: it tells the
    lease scheduler of each download that failed, and why (the coordinator's
    adaptive concurrency takes a timeout as overload)."""

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    def process_exception(self, request: Request, exception: BaseException) -> None:
        # A lease scheduler: of an engine process, or of the Redis frontier.
        failed = getattr(self.crawler.engine.scheduler, "download_failed", None)
        if failed is not None:
            failed(request, exception)
