"""The coordinator's side of engine processes: starts them, hands them leases,
tracks each lease until its engine acknowledges it, and brings the engines'
items, requests and stats back into the crawl.

A lease is one request lent to one engine process. It has two ends:

- its *release*, when the engine's download of it has ended (the site's
  slot, held for the whole crawl in the coordinator's downloader, is then
  free for the next request);
- its *acknowledgement*, when the engine has handled the response: callback,
  the requests it made and the engine's pipelines. The items it produced are
  held here until then and committed (crawl pipelines, feeds) on the
  acknowledgement, so an engine that dies mid-page has its page crawled
  again without an item in the output twice.

An engine that dies hands its leases back: those not yet downloaded go to
another engine at once, those downloaded but not handled go back to the
frontier (past the dupefilter). A replacement is started.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import pickle
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

from scrapy.exceptions import CloseSpider
from scrapy.utils.request import request_from_dict

from scrapy_speedup.crawl import engine_process
from scrapy_speedup.crawl.byte_frontier import ByteFrontier, Entry
from scrapy_speedup.crawl.channel import Channel
from scrapy_speedup.crawl.protocol import (
    Close,
    Closed,
    CookieUpdate,
    Lease,
    Message,
    NewRequest,
    Ready,
    Report,
    StartFailed,
)
from scrapy_speedup.crawl.stats import crawl_totals
from scrapy_speedup.exceptions import EngineProcessError

if TYPE_CHECKING:
    from collections.abc import Callable
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

    from scrapy import Request
    from scrapy.crawler import Crawler

    from scrapy_speedup._bridge import Bridge, Timer
    from scrapy_speedup.config import SpeedupConfig

__all__ = ["HANDLED", "RETURNED", "Coordinator", "LeaseOutcome"]

logger = logging.getLogger(__name__)

_STAT = "speedup/crawl/"
# A crash loop (a callback that kills its process on some page) must end the
# crawl, not restart engines for ever.
_RESTARTS_PER_ENGINE = 3
# A suspect (a page that was being handled when its engine died) that is
# handled alone, and whose engine dies again, this many times in all, is taken
# to be what kills them: a callback that kills its process on some page would
# otherwise kill every engine in turn.
_POISON_DEATHS = 2
# Leases one engine may hold at most, as a multiple of its share of
# CONCURRENT_REQUESTS: room for its downloads and a backlog of responses to
# parse, while an engine that parses slowly does not take every request.
_LEASES_PER_SHARE = 2
_MIN_LEASES_PER_ENGINE = 16
_STOP_POLL_S = 0.1
# How long engines have to close after SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS (their
# own offloaded work has that long) before they are killed.
_CLOSE_MARGIN_S = 15.0

# Coordinators with engine processes alive: killed at exit after a forced stop.
_live: weakref.WeakSet[Coordinator] = weakref.WeakSet()


class LeaseOutcome(NamedTuple):
    """How a lease's download ended: its HTTP status and latency, or an error
    (the download failed, or the lease was handed back)."""

    status: int | None
    latency: float | None
    error: str | None


#: The lease came back undownloaded (its engine died or the crawl is closing).
RETURNED = LeaseOutcome(None, None, "returned")
#: The engine handled the lease without downloading it: a cache hit, or a
#: downloader middleware answered or ignored it.
HANDLED = LeaseOutcome(None, None, "handled without a download")


@dataclass(eq=False)
class _Lease:
    id: int
    #: The request lent (Scrapy's frontier), or None: an entry of the byte
    #: frontier, or a request the engine keeps (it could not be serialized).
    request: Request | None
    engine: _Engine
    #: Resolved with a LeaseOutcome when the download ends; None after.
    waiter: Any = None
    #: Items of the response, pickled, committed on the acknowledgement.
    items: list[bytes] = field(default_factory=list)
    #: The byte frontier's entry lent; until *released* (its download ended)
    #: it holds a place of its site's slot.
    entry: Entry | None = None
    released: bool = False


@dataclass(eq=False)
class _Engine:
    index: int
    process: BaseProcess
    conn: Connection
    channel: Channel | None = None
    ready: bool = False
    closed: bool = False  # sent Closed
    gone: bool = False
    restarts: int = 0
    leases: dict[int, _Lease] = field(default_factory=dict)
    outbox: list[tuple[int, bytes]] = field(default_factory=list)
    cookie_outbox: list[CookieUpdate] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return self.ready and not self.closed and not self.gone


class Coordinator:
    def __init__(
        self, crawler: Crawler, config: SpeedupConfig, bridge: Bridge, *,
        enqueue: Callable[[Request], None], requeue: Callable[[Request], None],
        seen: Callable[[bytes], bool],
        wake: Callable[[], None], on_closed: Callable[[], None],
        handled: Callable[[Request], None] | None = None,
    ) -> None:
        self.crawler = crawler
        self.config = config
        self.bridge = bridge
        self._enqueue = enqueue
        # Told when a lent request is done with: handled, its items through
        # the crawl's pipelines (or dropped as poison).
        self._handled = handled
        self._seen = seen
        self._requeue = requeue
        self._wake = wake
        self._on_closed = on_closed
        self.stats = crawler.stats
        self.n = config.crawl_processes
        total = max(1, crawler.settings.getint("CONCURRENT_REQUESTS"))
        self._cap = max(_MIN_LEASES_PER_ENGINE, _LEASES_PER_SHARE * -(-total // self.n))
        self._ctx: Any = multiprocessing.get_context(config.process_start_method)
        self._spec: bytes = b""
        self._engines: list[_Engine | None] = [None] * self.n
        # The last stats of engines that died and were replaced.
        self._retired: list[tuple[int, dict[str, Any]]] = []
        # Suspects (see _POISON_DEATHS): deaths of engines each was being
        # handled in alone (0: it was there with others), by fingerprint;
        # the one suspect lease out, and suspects waiting for their turn.
        self._deaths: dict[bytes, int] = {}
        self._suspect_out: _Lease | None = None
        self._suspect_waiters: list[Any] = []
        # The crawl's cookies, latest of each (see _share_cookies).
        self._cookies: dict[tuple[Any, str, str, str], tuple[str, Any]] = {}
        self._next_id = 0
        self._turn = 0
        self._room_waiters: list[Any] = []
        self._ready_waiter: Any = None
        self._stop_watch: Timer | None = None
        self._stopped_while_starting = False
        self._start_error: str | None = None
        self._flush_timer: Timer | None = None
        self._close_timer: Timer | None = None
        self.closing = False
        self.close_reason: str | None = None
        self._closed_called = False
        self._limit_reason: str | None = None
        self._pagecount = crawler.settings.getint("CLOSESPIDER_PAGECOUNT")
        self._errorcount = crawler.settings.getint("CLOSESPIDER_ERRORCOUNT")
        self._max_message_bytes = int(config.process_max_message_mb * 2**20)
        #: The byte frontier, when the crawl's scheduling allows it: requests
        #: from engines go there as they came, and it lends them (lend_entry).
        self.frontier: ByteFrontier | None = None
        # Suspects of the byte frontier waiting for the one out.
        self._suspect_entries: list[Entry] = []

    # -- start ------------------------------------------------------------------

    async def start(self, spec: engine_process.EngineSpec) -> None:
        """Start the engine processes and wait until each has opened its
        spider; :exc:`EngineProcessError` with the engine's own error if one
        cannot."""
        self._spec = pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)
        self._ready_waiter = self.bridge.new_waiter()
        timer = self.bridge.call_later(
            self.config.crawl_start_timeout_seconds, self._start_timed_out
        )
        _live.add(self)
        for index in range(self.n):
            self._spawn(index)
        self._stop_watch = self.bridge.call_later(_STOP_POLL_S, self._watch_stop_while_starting)
        try:
            await self._ready_waiter
        finally:
            timer.cancel()
            if self._stop_watch is not None:
                self._stop_watch.cancel()
        if self._stopped_while_starting:
            # Ctrl-C before the engines were up: the crawl closes as any
            # stopped crawl does (Scrapy closes a spider that raises
            # CloseSpider while it opens), with its stats.
            self.kill_all()
            raise CloseSpider("shutdown")
        if self._start_error is not None:
            self.kill_all()
            raise EngineProcessError(self._start_error)
        self.stats.set_value(_STAT + "processes", self.n)
        logger.info(
            "scrapy-speedup: %d engine processes crawl for this one (pids %s); up to %d"
            " requests leased to each", self.n,
            ", ".join(str(e.process.pid) for e in self._engines if e is not None), self._cap,
            extra={"crawler": self.crawler},
        )

    def _watch_stop_while_starting(self) -> None:
        """Scrapy's graceful stop (Ctrl-C) does nothing to a crawler that is
        still opening, which engines starting make a matter of seconds: it
        is noticed here, and start() ends."""
        self._stop_watch = None
        if self._ready_waiter is None or not self.bridge.is_pending(self._ready_waiter):
            return
        if not self.crawler.crawling:
            self._stopped_while_starting = True
            self.bridge.resolve(self._ready_waiter, None)
            return
        self._stop_watch = self.bridge.call_later(_STOP_POLL_S,
                                                  self._watch_stop_while_starting)

    def _start_timed_out(self) -> None:
        slow = [i for i, e in enumerate(self._engines) if e is None or not e.ready]
        self._fail_start(
            f"engine processes {slow} did not open the spider within"
            f" {self.config.crawl_start_timeout_seconds:g} s"
            " (SPEEDUP_CRAWL_START_TIMEOUT_SECONDS)"
        )

    @property
    def _starting(self) -> bool:
        """Whether start() still waits for the engines to open."""
        return self._ready_waiter is not None and self.bridge.is_pending(self._ready_waiter)

    def _fail_start(self, why: str) -> None:
        if self._start_error is None:
            self._start_error = why
        if self._ready_waiter is not None:
            self.bridge.resolve(self._ready_waiter, None)

    def _spawn(self, index: int, restarts: int = 0) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=engine_process.main, args=(child, self._spec, index),
            name=f"scrapy-speedup-engine-{index}",
        )
        engine = _Engine(index, process, parent, restarts=restarts)
        self._engines[index] = engine
        # Process.start() waits for the fork server (its first start imports
        # Scrapy), and the reactor must not wait with it.
        self.bridge.call_in_new_thread(
            process.start, f"scrapy-speedup-start-engine-{index}",
            partial(self._on_spawned, engine, child),
        )

    def _on_spawned(
        self, engine: _Engine, child: Connection, _: object, error: BaseException | None,
    ) -> None:
        child.close()  # the engine's end: its EOF must mean the engine is gone
        if error is not None:
            engine.gone = True
            engine.conn.close()
            why = f"engine process {engine.index} could not be started: {error!r}"
            starting = self._starting
            self._fail_start(why)
            if not starting:
                # A replacement: the crawl goes on with the others, if any.
                logger.error("scrapy-speedup: %s", why, extra={"crawler": self.crawler})
                if not any(e is not None and not e.gone for e in self._engines):
                    self._close_crawl("engine_error")
                self._check_all_closed()
            return
        engine.channel = Channel(
            engine.conn.fileno(), self.bridge, self._max_message_bytes,
            partial(self._on_message, engine), partial(self._on_channel_end, engine),
        )
        self.bridge.watch(engine.process.sentinel, on_read=partial(self._on_exit, engine))
        if self.closing:
            engine.process.kill()

    # -- leases -----------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        return sum(len(e.leases) for e in self._engines if e is not None)

    @property
    def accepting(self) -> bool:
        """Whether an engine has room for a lease now."""
        return not self.closing and self._free_engine() is not None

    def _free_engine(self) -> _Engine | None:
        """The engine with the fewest leases and room for one more; among
        equals, the next one round the circle, so that a slow crawl (a
        delay, one request at a time) is spread over every engine too."""
        best: _Engine | None = None
        n = len(self._engines)
        for step in range(n):
            engine = self._engines[(self._turn + step) % n]
            if engine is not None and engine.usable and len(engine.leases) < self._cap \
                    and (best is None or len(engine.leases) < len(best.leases)):
                best = engine
        return best

    async def lease(self, request: Request) -> LeaseOutcome:
        """Lend *request* to the engine with the fewest leases, and return once
        its download has ended there. A lease handed back by a dying engine
        goes to another; one handed back while the crawl closes goes back to
        the frontier (JOBDIR keeps it)."""
        spider = self.crawler.spider
        try:
            blob = pickle.dumps(request.to_dict(spider=spider), protocol=pickle.HIGHEST_PROTOCOL)
        # Checked on the way in; this is a request changed since.
        except Exception as exc:  # noqa: BLE001 - pickling and user code raise anything
            logger.error("scrapy-speedup: %s cannot be sent to an engine process (%s);"
                         " it is not crawled", request, exc, extra={"crawler": self.crawler})
            self.stats.inc_value(_STAT + "unserializable_count")
            return LeaseOutcome(None, None, "unserializable")
        suspect = self._deaths and \
            self.crawler.request_fingerprinter.fingerprint(request) in self._deaths
        while True:
            if suspect and self._suspect_out is not None and not self.closing:
                waiter = self.bridge.new_waiter()
                self._suspect_waiters.append(waiter)
                await waiter
                continue
            engine = self._free_engine()
            if engine is None:
                if self.closing:
                    self._requeue(request)
                    return RETURNED
                waiter = self.bridge.new_waiter()
                self._room_waiters.append(waiter)
                await waiter
                continue
            self._next_id += 1
            self._turn = engine.index + 1
            lease = _Lease(self._next_id, request, engine, self.bridge.new_waiter())
            engine.leases[lease.id] = lease
            engine.outbox.append((lease.id, blob))
            if suspect:
                self._suspect_out = lease
            self._flush_soon()
            outcome: LeaseOutcome = await lease.waiter
            if outcome is not RETURNED:
                return outcome
            if self.closing:
                self._requeue(request)
                return RETURNED
            self.stats.inc_value(_STAT + "lease_reassigned_count")

    def lend_entry(self, entry: Entry) -> bool:
        """Lend the byte frontier's *entry* to the engine with the fewest
        leases; False when none has room now."""
        if self.closing:
            return False
        suspect = bool(self._deaths) and entry.fingerprint in self._deaths
        if suspect and self._suspect_out is not None:
            # Handled alone (see _POISON_DEATHS): it waits, holding its
            # site's place, for the suspect out to be done with.
            self._suspect_entries.append(entry)
            return True
        engine = self._free_engine()
        if engine is None:
            return False
        self._next_id += 1
        self._turn = engine.index + 1
        lease = _Lease(self._next_id, None, engine, entry=entry)
        engine.leases[lease.id] = lease
        engine.outbox.append((lease.id, entry.blob))
        if suspect:
            self._suspect_out = lease
        self._flush_soon()
        return True

    def _entry_released(self, lease: _Lease, *, downloaded: bool) -> bool:
        """Free the place of *lease*'s site; whether it held one."""
        if lease.entry is None or lease.released or self.frontier is None:
            return False
        lease.released = True
        self.frontier.released(lease.entry, downloaded=downloaded)
        return True

    def _flush_soon(self) -> None:
        if self._flush_timer is None:
            self._flush_timer = self.bridge.call_later(0, self._flush)

    def _flush(self) -> None:
        """Send each engine its new leases, one message per engine per turn
        of the loop."""
        self._flush_timer = None
        for engine in self._engines:
            if engine is None or not (engine.outbox or engine.cookie_outbox):
                continue
            entries, engine.outbox = engine.outbox, []
            cookies, engine.cookie_outbox = engine.cookie_outbox, []
            if engine.channel is not None and engine.usable:
                engine.channel.send(Lease(entries, cookies))
                self.stats.inc_value(_STAT + "lease_count", len(entries))
                self.stats.inc_value(_STAT + "lease_message_count")
                continue
            for lease_id, _ in entries:  # it died or closed meanwhile
                lease = engine.leases.pop(lease_id, None)
                if lease is not None and lease.waiter is not None:
                    self.bridge.resolve(lease.waiter, RETURNED)
                elif lease is not None and lease.entry is not None:
                    self._entry_returned(lease.entry)  # lent this turn: not released

    def _wake_room(self) -> None:
        waiters, self._room_waiters = self._room_waiters, []
        for waiter in waiters:
            self.bridge.resolve(waiter, None)

    # -- messages ---------------------------------------------------------------

    def _on_message(self, engine: _Engine, message: Message) -> None:
        try:
            if isinstance(message, Report):
                self._on_report(engine, message)
            elif isinstance(message, Ready):
                engine.ready = True
                # A replacement gets the crawl's cookies before any lease.
                engine.cookie_outbox = [(key, url, [cookie]) for (key, *_), (url, cookie)
                                        in self._cookies.items()]
                self._flush_soon()
                if all(e is not None and e.ready for e in self._engines) and \
                        self._ready_waiter is not None:
                    self.bridge.resolve(self._ready_waiter, None)
                self._wake_room()
                self._wake()  # a replacement: requests put back wait for it
            elif isinstance(message, StartFailed):
                why = f"engine process {engine.index} failed to start the spider:\n{message.error}"
                starting = self._starting
                self._fail_start(why)
                if not starting:
                    # A replacement that failed: the crawl cannot go on as asked.
                    logger.error("scrapy-speedup: %s", why, extra={"crawler": self.crawler})
                    self._close_crawl("engine_error")
            elif isinstance(message, Closed):
                self._on_engine_closed(engine, message)
            else:
                raise TypeError(f"unexpected {type(message).__name__} from an engine")
        except Exception:
            logger.exception("scrapy-speedup: could not handle a message of engine %d",
                             engine.index, extra={"crawler": self.crawler})

    def _on_report(self, engine: _Engine, report: Report) -> None:
        if report.cookies:
            self._share_cookies(engine, report.cookies)
        # The byte frontier lends again when requests come or a download
        # ends, as Scrapy's frontier does on each enqueue and each download
        # that ends: the page may be long in its callback and pipelines.
        pump = False
        if self.frontier is not None:
            pump = self.frontier.push_many(report.requests) > 0
        else:
            self._rebuild_requests(engine, report.requests)
        for lease_id, blob in report.items:
            held = engine.leases.get(lease_id) if lease_id is not None else None
            if held is not None:
                held.items.append(blob)
            else:
                self._commit(blob)
        for lease_id, status, latency, error in report.released:
            held = engine.leases.get(lease_id)
            if held is not None and held.waiter is not None:
                self.bridge.resolve(held.waiter, LeaseOutcome(status, latency, error))
                held.waiter = None
            elif held is not None and self._entry_released(held, downloaded=True):
                pump = True
        for lease_id in report.local:
            engine.leases[lease_id] = _Lease(lease_id, None, engine)
            self.stats.inc_value(_STAT + "kept_in_engine_count")
        for lease_id in report.acked:
            held = engine.leases.pop(lease_id, None)
            if held is None:
                continue
            if held is self._suspect_out:
                self._next_suspect()
            if held.waiter is not None:
                self.bridge.resolve(held.waiter, HANDLED)
            else:
                self._entry_released(held, downloaded=False)
            done = partial(self._handled, held.request) \
                if self._handled is not None and held.request is not None else None
            self._commit_all(held.items, done)
        if report.stats is not None:
            engine.stats.update(report.stats)
            self._engine_stats_changed()
        if report.acked:
            self._wake_room()
        if report.acked or pump:
            self._wake()

    def _rebuild_requests(self, engine: _Engine, requests: list[NewRequest]) -> None:
        """Scrapy's frontier: each new request rebuilt, for the project's
        scheduler (a duplicate by fingerprint is dropped before)."""
        spider = self.crawler.spider
        for fingerprint, dont_filter, _, _, blob in requests:
            if not dont_filter and self._seen(fingerprint):
                continue
            try:
                request = request_from_dict(pickle.loads(blob), spider=spider)
            except Exception as exc:  # noqa: BLE001 - pickling and user code raise anything
                self.stats.inc_value(_STAT + "request_error_count")
                logger.error("scrapy-speedup: a request from engine %d could not be rebuilt"
                             " (%r); it is not crawled", engine.index, exc,
                             extra={"crawler": self.crawler})
                continue
            self._enqueue(request)

    def _share_cookies(self, source: _Engine, updates: list[CookieUpdate]) -> None:
        """Pass cookies one engine set on to the others, in their next lease
        message (before the leases in it), and keep the latest of each for
        engines started later."""
        for key, url, cookies in updates:
            for cookie in cookies:
                self._cookies[(key, cookie.domain, cookie.path, cookie.name)] = (url, cookie)
        for engine in self._engines:
            if engine is not None and engine is not source and engine.usable:
                engine.cookie_outbox.extend(updates)
        self._flush_soon()

    def _commit_all(self, blobs: list[bytes], done: Callable[[], None] | None) -> None:
        """Commit a lease's items; ``done()`` once every one has left the
        crawl's pipelines."""
        if done is None or not blobs:
            for blob in blobs:
                self._commit(blob)
            if done is not None:
                done()
            return
        left = len(blobs)

        def one_done() -> None:
            nonlocal left
            left -= 1
            if not left:
                done()

        for blob in blobs:
            self._commit(blob, one_done)

    def _commit(self, blob: bytes, done: Callable[[], None] | None = None) -> None:
        """Send an item from an engine through the crawl's pipelines (and so
        to the feeds). The scraper counts it at once, so that the crawl is
        not idle and its close waits for it."""
        try:
            item = pickle.loads(blob)
        except Exception as exc:  # noqa: BLE001 - pickling and user code raise anything
            self.stats.inc_value(_STAT + "item_error_count")
            logger.error("scrapy-speedup: an item from an engine process could not be"
                         " unpickled (%r); it is lost", exc, extra={"crawler": self.crawler})
            if done is not None:
                done()
            return
        from scrapy.utils.defer import _schedule_coro

        scraper = self.crawler.engine.scraper
        assert scraper.slot is not None
        scraper.slot.itemproc_size += 1
        _schedule_coro(self._process_item(item, done))

    async def _process_item(self, item: Any, done: Callable[[], None] | None) -> None:
        scraper = self.crawler.engine.scraper
        assert scraper.slot is not None
        scraper.slot.itemproc_size -= 1  # start_itemproc_async counts it from here
        try:
            await scraper.start_itemproc_async(item, response=None)
        finally:
            if done is not None:
                done()
            self._wake()

    def _engine_stats_changed(self) -> None:
        """Keep the crawl-wide counts that the coordinator's own components
        read while the crawl runs (LogStats, the page and error limits)."""
        every = [s for _, s in self._retired] + [e.stats for e in self._engines if e]
        pages = sum(int(s.get("response_received_count", 0)) for s in every)
        self.stats.set_value("response_received_count", pages)
        errors = sum(int(s.get("spider_exceptions/count", 0)) for s in every)
        if errors:
            # Also what a frontier on Redis adds to the crawl's counts, where
            # CLOSESPIDER_ERRORCOUNT of all machines is checked.
            self.stats.set_value("spider_exceptions/count", errors)
        if self._limit_reason is not None or self.closing:
            return
        if self._pagecount and pages >= self._pagecount:
            self._limit_reason = "closespider_pagecount"
        if self._errorcount and errors >= self._errorcount:
            self._limit_reason = "closespider_errorcount"
        if self._limit_reason is not None:
            self._close_crawl(self._limit_reason)

    def _close_crawl(self, reason: str) -> None:
        from scrapy.utils.defer import _schedule_coro

        engine = self.crawler.engine
        if engine is not None and engine.spider is not None:
            _schedule_coro(engine.close_spider_async(reason=reason))

    # -- engines that end ---------------------------------------------------------

    def _on_engine_closed(self, engine: _Engine, message: Closed) -> None:
        engine.closed = True
        engine.stats = message.stats
        for lease_id in message.returned:
            held = engine.leases.pop(lease_id, None)
            if held is None:
                continue
            if held.waiter is not None:
                self.bridge.resolve(held.waiter, RETURNED)
            elif held.entry is not None and not held.released:
                self._entry_returned(held.entry)
            elif held.entry is not None:
                self._requeue_entry(held.entry)
            elif held.request is not None:
                self._requeue(held.request)
        if not self.closing:
            # The engine closed of its own accord (a callback raised
            # CloseSpider): as in one process, the crawl closes with it.
            reason = str(message.stats.get("finish_reason") or "cancelled")
            self._close_crawl(reason)
        self._check_all_closed()

    def _on_channel_end(self, engine: _Engine, why: str) -> None:
        """The engine's socket ended: it is exiting (its exit, watched, says
        how), or it broke the protocol and cannot be trusted on."""
        if engine.gone:
            return
        if engine.process.exitcode is not None:
            self._on_gone(engine, _describe_exit(engine.process.exitcode))
            return
        broken = why.startswith("a ")  # "a message / a frame that is not valid"
        if broken:
            self.stats.inc_value(_STAT + "protocol_error_count")
            logger.error("scrapy-speedup: engine process %d sent %s; it is ended",
                         engine.index, why, extra={"crawler": self.crawler})
        # An engine whose socket ended is exiting, and its exit comes at
        # once; one that broke the protocol is ended now.
        self.bridge.call_later(0 if broken else 2.0, self._kill_if_alive, engine)

    @staticmethod
    def _kill_if_alive(engine: _Engine) -> None:
        if not engine.gone and engine.process.exitcode is None:
            engine.process.kill()

    def _on_exit(self, engine: _Engine) -> None:
        self.bridge.watch(engine.process.sentinel)
        engine.process.join(0)
        self._on_gone(engine, _describe_exit(engine.process.exitcode))

    def _on_gone(self, engine: _Engine, why: str) -> None:
        if engine.gone:
            return
        engine.gone = True
        if engine.channel is not None:
            engine.channel.close()
        engine.conn.close()
        if engine.process.exitcode is None and not engine.closed:
            engine.process.kill()  # a broken channel: it cannot be trusted on
        crashed = not engine.closed
        starting = self._starting
        if crashed and not engine.ready and not self.closing:
            if starting:
                self._fail_start(f"engine process {engine.index} ended before it opened the"
                                 f" spider ({why})")
            else:  # a replacement
                logger.error("scrapy-speedup: engine process %d ended before it opened the"
                             " spider (%s)", engine.index, why, extra={"crawler": self.crawler})
                self._replace(engine)
        requeued, lost = self._hand_back(engine, crashed)
        if crashed and engine.ready:
            self.stats.inc_value(_STAT + "process_crash_count")
            logger.error(
                "scrapy-speedup: engine process %d (pid %s) ended during the crawl (%s);"
                " its %d leased requests go back to the frontier%s", engine.index,
                engine.process.pid, why, requeued,
                f", and {lost} requests it kept (not serializable) are lost" if lost else "",
                extra={"crawler": self.crawler},
            )
            if lost:
                self.stats.inc_value(_STAT + "lost_count", lost)
            if not self.closing:
                self._replace(engine)
        self._wake_room()
        self._wake()
        self._check_all_closed()

    def _hand_back(self, engine: _Engine, crashed: bool) -> tuple[int, int]:
        """The leases of an engine that is gone: those not downloaded go to
        another engine, the others back to the frontier (or are dropped as
        poison). How many went back, and how many were lost (kept there)."""
        lost = poisoned = 0
        for held in engine.leases.values():
            alone = held is self._suspect_out
            if alone:
                self._next_suspect()
            if held.waiter is not None:
                self.bridge.resolve(held.waiter, RETURNED)  # not downloaded yet
            elif held.entry is not None and not held.released:
                self._entry_returned(held.entry)  # not downloaded yet
            elif held.entry is not None:
                if crashed and self._poison_entry(held.entry, alone):
                    poisoned += 1
                else:
                    self._requeue_entry(held.entry)
            elif held.request is None:  # kept in the engine: nothing to crawl again
                lost += 1
            elif crashed and self._poison(held.request, alone):
                poisoned += 1
                if self._handled is not None:
                    self._handled(held.request)  # done with: not crawled again
            else:
                self._requeue(held.request)
        requeued = len(engine.leases) - lost - poisoned
        engine.leases.clear()
        engine.outbox.clear()
        return requeued, lost

    def _entry_returned(self, entry: Entry) -> None:
        """An entry lent and not downloaded: to another engine, or, while the
        crawl closes, nowhere (the byte frontier runs without JOBDIR)."""
        if self.frontier is not None:
            if not self.closing:
                self.stats.inc_value(_STAT + "lease_reassigned_count")
            self.frontier.returned(entry)

    def _requeue_entry(self, entry: Entry) -> None:
        self.stats.inc_value(_STAT + "requeued_count")
        if self.frontier is not None:
            self.frontier.requeue(entry)
        self._wake()

    def _poison_entry(self, entry: Entry, alone: bool) -> bool:
        return self._poison_fingerprint(entry.fingerprint, entry.describe(), alone)

    def _poison(self, request: Request, alone: bool) -> bool:
        fingerprint = self.crawler.request_fingerprinter.fingerprint(request)
        return self._poison_fingerprint(fingerprint, request, alone)

    def _poison_fingerprint(self, fingerprint: bytes, request: object, alone: bool) -> bool:
        """Count a death against *request*, which was being handled in an
        engine that died: with others (it becomes a suspect, handled alone
        from now on), or alone (a suspect whose engine died again). Whether
        it is now taken to be what kills them: then it is dropped."""
        deaths = self._deaths.get(fingerprint, 0) + (1 if alone else 0)
        self._deaths[fingerprint] = deaths
        if deaths < _POISON_DEATHS:
            return False
        self.stats.inc_value(_STAT + "poison_count")
        logger.error(
            "scrapy-speedup: %s was being handled, alone, each time an engine process"
            " died (%d times): it is taken to kill them, and not crawled again", request,
            deaths, extra={"crawler": self.crawler},
        )
        return True

    def _next_suspect(self) -> None:
        self._suspect_out = None
        waiters, self._suspect_waiters = self._suspect_waiters, []
        for waiter in waiters:
            self.bridge.resolve(waiter, None)
        entries, self._suspect_entries = self._suspect_entries, []
        for entry in entries:  # they hold their sites' places: lent again
            if self.frontier is not None:
                self.frontier.returned(entry)

    def _replace(self, engine: _Engine) -> None:
        if engine.restarts >= _RESTARTS_PER_ENGINE:
            logger.error(
                "scrapy-speedup: engine process %d ended %d times; it is not started"
                " again", engine.index, engine.restarts + 1, extra={"crawler": self.crawler},
            )
            if not any(e is not None and not e.gone for e in self._engines):
                self._close_crawl("engine_error")
            return
        self.stats.inc_value(_STAT + "process_restart_count")
        self._retired.append((engine.index, engine.stats))
        self._spawn(engine.index, engine.restarts + 1)

    # -- close ------------------------------------------------------------------

    def begin_close(self, reason: str) -> None:
        """Ask every engine to close with *reason*: they finish what is in
        flight and send their items, then their stats. on_closed is called
        once all have closed, or after a deadline, killed."""
        if self.closing:
            return
        self.closing = True
        self.close_reason = reason
        self._flush()  # leases chosen this turn still go out; Close follows them
        for engine in self._engines:
            if engine is None or engine.gone:
                continue
            if engine.usable and engine.channel is not None:
                engine.channel.send(Close(reason))
            elif not engine.closed and engine.process.pid is not None:
                engine.process.kill()  # not open yet: nothing to finish
            # (one still being started is killed once it is: _on_spawned)
        self._wake_room()
        self._next_suspect()
        deadline = self.config.shutdown_timeout_seconds + _CLOSE_MARGIN_S
        self._close_timer = self.bridge.call_later(deadline, self._close_timed_out, deadline)
        self._check_all_closed()

    def _close_timed_out(self, deadline: float) -> None:
        self._close_timer = None
        late = [e for e in self._engines if e is not None and not e.closed and not e.gone]
        if late:
            logger.error(
                "scrapy-speedup: engine processes %s had not closed %g s after the crawl"
                " began to close; they are killed", [e.index for e in late], deadline,
                extra={"crawler": self.crawler},
            )
            for engine in late:
                engine.process.kill()

    def _check_all_closed(self) -> None:
        if not self.closing or self._closed_called:
            return
        if any(e is not None and not e.closed and not e.gone for e in self._engines):
            return
        self._closed_called = True
        if self._close_timer is not None:
            self._close_timer.cancel()
        _live.discard(self)
        self._on_closed()

    def kill_all(self) -> None:
        for engine in self._engines:
            if engine is not None and engine.process.pid is not None and \
                    engine.process.exitcode is None:
                engine.process.kill()

    def crawl_totals(self, own: dict[str, Any]) -> dict[str, Any]:
        engines = [(e.index, e.stats) for e in self._engines if e is not None]
        return crawl_totals(own, self._retired + engines)

    def leases_by_engine(self) -> dict[int, int]:
        return {e.index: len(e.leases) for e in self._engines if e is not None}


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "its socket closed"
    if exitcode < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


def _kill_live() -> None:
    for coordinator in list(_live):
        coordinator.kill_all()


# After a forced stop (Ctrl-C twice) the reactor stops without closing the
# spider: the engines must not outlive the crawl (they also watch its pid).
atexit.register(_kill_live)
