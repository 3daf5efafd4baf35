"""A Scrapy scheduler whose queue is the crawl's frontier in Redis
(``SPEEDUP_FRONTIER_URL``): every ``scrapy crawl`` started with the same URL
and spider, on any machine, takes part in one crawl.

- ``enqueue_request`` sends the request (``Request.to_dict``, pickled) with its
  fingerprint, priority and download slot to Redis, which drops the ones the
  crawl has seen.
- Requests come back leased, a batch at a time, prefetched while this machine
  has room: Redis hands out only what each site's limits allow for the whole
  crawl (:mod:`.store`). The download's end releases the site's place; the
  response handled (callback done, its requests sent) acknowledges the lease.
  Leases held here are renewed; a machine that dies stops renewing them, and
  after ``SPEEDUP_FRONTIER_VISIBILITY_TIMEOUT_SECONDS`` any machine puts them
  back in the frontier.
- Start URLs pushed to ``<crawl>:start_urls`` (scrapy-redis's key, a list,
  a set or a sorted set) are moved into the frontier by the job that pops
  them, leased like requests, made into requests here, and acknowledged
  once those are pushed (:mod:`.start_urls`, :mod:`.store`).
- The crawl ends when no request is queued, none is leased, no start URL
  waits in its key, and no machine is still in its spider's ``start()``,
  seen twice a second apart (or, with
  ``SPEEDUP_FRONTIER_WAIT_FOR_START_URLS_SECONDS``, that long).

Every Redis call runs on the Redis thread (:mod:`.link`), one job at a time;
the reactor only reads what the last job found.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scrapy import Request, signals
from scrapy.core.scheduler import BaseScheduler
from scrapy.utils.defer import _schedule_coro, deferred_from_coro
from scrapy.utils.request import request_from_dict

from scrapy_speedup.config import SpeedupConfig
from scrapy_speedup.extension import SpeedupExtension
from scrapy_speedup.redis_frontier.crawl_state import (
    Limits,
    SharedCounts,
    forget_finished_crawl,
)
from scrapy_speedup.redis_frontier.feed_flush import FeedFlusher
from scrapy_speedup.redis_frontier.link import RedisLink
from scrapy_speedup.redis_frontier.start_urls import BadStartUrlError, describe, requests_from_entry
from scrapy_speedup.redis_frontier.store import (
    PRIORITY_BOUND,
    START_MARK,
    Entry,
    FrontierStore,
    Job,
    JobResult,
    Leased,
    StartKey,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Self

    from scrapy import Spider
    from scrapy.crawler import Crawler
    from scrapy.http import Response
    from twisted.internet.defer import Deferred

    from scrapy_speedup._bridge import Timer

__all__ = ["RedisScheduler"]

logger = logging.getLogger(__name__)

_STAT = "speedup/frontier/"
# How often the scheduler talks to Redis while it has nothing to send: to
# prefetch as room frees up, and to see the crawl's state.
_TICK_S = 0.02
_IDLE_TICK_S = 0.05
# While the crawl waits for start URLs (SPEEDUP_FRONTIER_WAIT_FOR_START_URLS_SECONDS):
# a URL pushed is taken within this, and idle machines cost Redis little.
_WAITING_TICK_S = 0.5
# The crawl is over when it looks over this long (two looks at least).
_END_GRACE_S = 1.0
_MACHINE_TTL_S = 30
# How often a machine adds its stats to the crawl's and reads the totals,
# unless the crawl has CLOSESPIDER_* limits (then every tick): the whole
# stats hash each time is most of the bytes a tick would carry.
_STATS_EVERY_S = 1.0
# The fingerprints this machine sent, remembered up to this many (~25 MB),
# then forgotten all at once: only a cache of Redis's dupefilter.
_SENT_MAX = 250_000
# While Redis cannot be reached, the scheduler tries again this often.
_RETRY_S = 1.0
#: Where the add-on keeps the crawl's CLOSESPIDER_* limits, which the
#: machines apply together (each machine's own CloseSpider gets 0).
LIMITS_SETTING = "_SPEEDUP_FRONTIER_LIMITS"

# Joining: the first machine of a run starts its counts, start time and
# closing reason afresh (a crawl resumed after a limit or Ctrl-C closes
# again only when the new run reaches its limits). Machines of a past run
# that died without leaving (kill -9, Ctrl-C twice) are forgotten first, as
# a tick would: they do not make this run a continuation of theirs.
_JOIN = """
local machines = redis.call('HGETALL', KEYS[1])
for j = 1, #machines, 2 do
  local value = machines[j + 1]
  local sep = string.find(value, '|', 1, true)
  if sep and tonumber(string.sub(value, sep + 1)) < tonumber(ARGV[3]) then
    redis.call('HDEL', KEYS[1], machines[j])
    redis.call('HDEL', KEYS[5], machines[j], machines[j] .. '|counts')
  end
end
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return redis.call('HLEN', KEYS[1])
"""


@dataclass
class _Batch:
    """What one tick sends."""

    job: Job
    #: This machine's stats changes since the last exchange; None: no
    #: exchange this tick.
    changes: dict[str, int] | None = None


@dataclass
class _Outcome:
    """What one tick found."""

    result: JobResult
    closing: str | None = None
    #: The crawl's stats, when this tick exchanged them.
    totals: dict[str, int] | None = None


class RedisScheduler(BaseScheduler):
    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        self.config = SpeedupConfig.of(crawler)
        frontier = self.config.frontier
        assert frontier is not None
        self.url = frontier.url
        self.visibility_s = frontier.visibility_timeout_seconds
        # Also the feeds' %(speedup_machine)s: a file name.
        self.machine = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.prefix = frontier.name or ""
        self.max_outage_s = frontier.max_outage_seconds
        self.start_key_setting = frontier.start_urls_key
        self.start_key = ""  # known in open(), with the spider's name
        self.wait_s = frontier.wait_for_start_urls_seconds
        self._start_key_refused = False
        self._priority_warned = False
        limits = crawler.settings.getdict(LIMITS_SETTING)
        self.limits = Limits(**limits)
        self.counts: SharedCounts | None = None
        self._failing_since: float | None = None
        self._closing_reason: str | None = None
        #: The crawl's counts as the last stats exchange found them.
        self._totals: dict[str, int] = {}
        self.queue: deque[tuple[bytes, bytes]] = deque()
        self.lease_of: dict[Request, bytes] = {}
        self._released: set[bytes] = set()
        self._push: list[Entry] = []
        self._sent: set[bytes] = set()
        self._release: list[bytes] = []
        self._ack: list[bytes] = []
        #: The tick that failed, sent again as it was (see store._TICK).
        self._resend: _Batch | None = None
        self._busy = False
        #: Resolved when the tick in flight has come back (see _close).
        self._tick_back: Any = None
        self._closed = False
        self._timer: Timer | None = None
        self._renewed_at = self._reaped_at = self._exchanged_at = 0.0
        self._global: tuple[int, int, int] = (0, 0, 1)  # queued, leased, machines starting
        self._idle_since: float | None = None
        self._looks_done = 0
        self.link: RedisLink | None = None
        self.store: FrontierStore | None = None
        self.feeds = FeedFlusher(crawler)
        #: Called when leases arrive. Under engine processes, the
        #: coordinator's dispatcher sets it; else the engine looks.
        self.on_leased: Callable[[], None] | None = None

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    # -- life cycle -----------------------------------------------------------------

    def open(self, spider: Spider) -> None:
        self.prefix = self.prefix or spider.name
        # scrapy-redis's REDIS_START_URLS_KEY: %(name)s is the spider's name.
        self.start_key = self.start_key_setting % {"name": spider.name} \
            if self.start_key_setting else f"{self.prefix}:start_urls"
        bridge = SpeedupExtension.of(self.crawler).bridge
        self.bridge = bridge
        self.link = RedisLink(self.url, bridge)
        assert self.link.redis is not None
        self.store = FrontierStore(self.link.redis, self.prefix)
        engine_slot = self.crawler.engine._slot
        assert engine_slot is not None
        original = engine_slot.remove_request

        def remove_request(request: Request) -> None:
            original(request)
            self.request_handled(request)

        engine_slot.remove_request = remove_request  # type: ignore[method-assign]
        self.crawler.signals.connect(self._response_downloaded, signals.response_downloaded)
        self.crawler.stats.set_value(_STAT + "machine", self.machine)
        spider.speedup_machine = self.machine  # type: ignore[attr-defined]
        self.counts = SharedCounts(self.prefix, self.limits, self.machine)
        if self.limits.itemcount or self.limits.pagecount:
            # Checked at each item and page, as Scrapy's CloseSpider does:
            # the crawl's total from the last exchange, plus what this
            # machine did since (waiting for the next exchange let every
            # machine run on for a tick or more past the limit).
            self.crawler.signals.connect(self._check_limits, signals.item_scraped)
            self.crawler.signals.connect(self._check_limits, signals.response_received)
        logger.info("scrapy-speedup: frontier on Redis at %s, crawl %r, this machine %s,"
                    " start URLs from %r", _safe_url(self.url), self.prefix, self.machine,
                    self.start_key, extra={"crawler": self.crawler})
        store, prefix, machine = self.store, self.prefix, self.machine

        async def join() -> int:
            keys = [f"{prefix}:{name}"
                    for name in ("machines", "stats", "started", "closing", "ticked")]
            now = time.time()
            state = f"starting|{now + _MACHINE_TTL_S}"
            return int(await store.redis.eval(_JOIN, len(keys), *keys, machine, state, now))

        def joined(machines: int | None, error: BaseException | None) -> None:
            if error is not None:
                self._failed(error)
                return
            logger.info("scrapy-speedup: joined crawl %r with %d machines in it", prefix,
                        machines, extra={"crawler": self.crawler})
            self._tick()

        self.link.submit(join, joined)

    def close(self, reason: str) -> Deferred[None]:
        return deferred_from_coro(self._close(reason))

    async def _close(self, reason: str) -> None:
        """Send what is left, hand back the leases not started, leave the
        crawl (deleting it if it finished); at most SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._busy:
            # A tick on its way back: what it leased goes back below, and
            # what it failed to send is sent again, instead of waiting for
            # the visibility timeout.
            self._tick_back = self.bridge.new_waiter()
            timer = self.bridge.call_later(self.config.shutdown_timeout_seconds,
                                           self.bridge.resolve, self._tick_back, None)
            await self._tick_back
            timer.cancel()
        # Leases not started go back at once, for the other machines.
        returned = [lease for lease, _ in self.queue] + list(self.lease_of.values())
        self.queue.clear()
        store, link, prefix, machine = self.store, self.link, self.prefix, self.machine
        if link is None or store is None:
            return
        ended = self.bridge.new_waiter()
        pushes, releases, acks = self._push, self._release, self._ack
        resend = self._resend.job if self._resend is not None else None
        if acks:
            self.feeds.flush()

        counts = self.counts
        changes = counts.changes(self.crawler.stats) if counts is not None else {}

        async def last_job() -> tuple[dict[str, int], bool]:
            now = time.time()
            if resend is not None:
                result = await store.tick(resend, now)
                returned.extend(item.id for item in result.leased)
            await store.push(pushes, now)
            await store.release(releases, now)
            await store.ack(acks, now)
            # Handed back: due now, reaped by whoever looks next.
            await store.renew(returned, now - 1)
            await store.reap(now)
            totals: dict[str, int] = {}
            if counts is not None:
                _, totals = await counts.exchange(store.redis, changes, uuid.uuid4().hex)
            await store.redis.hdel(f"{prefix}:machines", machine)
            await store.redis.hdel(f"{prefix}:ticked", machine, f"{machine}|counts")
            forgotten = reason == "finished" and await forget_finished_crawl(store.redis, prefix)
            return totals, forgotten

        def done(result: Any, error: BaseException | None) -> None:
            if self.bridge.is_pending(ended):
                self.bridge.resolve(ended, None)
            if error is not None:
                _log_error(self.crawler, "the close", error)
                return
            totals, forgotten = result
            logger.info(
                "scrapy-speedup: crawl %r: this machine %d pages, %d items; the crawl so far"
                " %d pages, %d items%s", prefix,
                self.crawler.stats.get_value("response_received_count", 0),
                self.crawler.stats.get_value("item_scraped_count", 0),
                totals.get("response_received_count", 0), totals.get("item_scraped_count", 0),
                "; it has finished, and its keys are deleted" if forgotten else "",
                extra={"crawler": self.crawler})

        link.submit(last_job, done)
        timeout = self.config.shutdown_timeout_seconds
        timer = self.bridge.call_later(timeout, done, None, TimeoutError(
            f"Redis did not answer within {timeout} s (SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS)"))
        await ended
        timer.cancel()
        self.bridge.run_in_new_thread(link.close, "scrapy-speedup-redis-close")

    # -- the scheduler's interface ------------------------------------------------------

    def has_pending_requests(self) -> bool:
        return not self._crawl_over()

    def _locally_idle(self) -> bool:
        return not (self.queue or self.lease_of or self._push or self._release or self._ack
                    or self._resend)

    def _crawl_over(self) -> bool:
        """Whether the whole crawl has looked over (nothing queued, nothing
        leased, no start URL in its key, no machine in its start()) for
        _END_GRACE_S, twice, and for the wait for start URLs if longer."""
        return self._idle_since is not None and self._looks_done >= 2 and \
            time.monotonic() - self._idle_since >= max(_END_GRACE_S, self.wait_s) and \
            self._locally_idle()

    def _waiting(self) -> bool:
        """Whether the crawl is idle past its grace, waiting for start URLs."""
        return self._idle_since is not None and self._looks_done >= 2 and \
            time.monotonic() - self._idle_since >= _END_GRACE_S

    def _look(self, state: tuple[int, int, int]) -> None:
        self._global = state
        if state != (0, 0, 0) or not self._locally_idle():
            self._idle_since, self._looks_done = None, 0
            return
        if self._idle_since is None:
            self._idle_since = time.monotonic()
            if self.wait_s:
                logger.info("scrapy-speedup: nothing to crawl; waiting for start URLs in %r"
                            " (SPEEDUP_FRONTIER_WAIT_FOR_START_URLS_SECONDS: %s)",
                            self.start_key, "forever" if math.isinf(self.wait_s)
                            else f"{self.wait_s:g} s", extra={"crawler": self.crawler})
        self._looks_done += 1
        if self._crawl_over():
            # The engine looks at its next heartbeat otherwise (5 s).
            engine_slot = getattr(self.crawler.engine, "_slot", None)
            if engine_slot is not None:
                engine_slot.nextcall.schedule()

    def enqueue_request(self, request: Request) -> bool:
        spider = self.crawler.spider
        fingerprint = None if request.dont_filter else \
            self.crawler.request_fingerprinter.fingerprint(request)
        if fingerprint is not None:
            # Redis's dupefilter decides; this machine's own repeats (most
            # links of a site are) need not travel there to be dropped.
            if fingerprint in self._sent:
                self.crawler.stats.inc_value("dupefilter/filtered")
                return False
        try:
            blob = pickle.dumps(request.to_dict(spider=spider), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - pickling and user code raise anything
            self.crawler.stats.inc_value(_STAT + "unserializable_count")
            logger.error("scrapy-speedup: %s cannot be sent to the frontier (%s); it is"
                         " dropped: use spider methods as callbacks and picklable meta",
                         request, exc, extra={"crawler": self.crawler})
            return False
        downloader: Any = self.crawler.engine.downloader
        key = downloader.get_slot_key(request)
        limits = downloader.per_slot_settings.get(key, {})
        concurrency = int(limits.get("concurrency", downloader.ip_concurrency
                                     or downloader.domain_concurrency))
        delay = float(limits.get("delay", downloader._delay))
        if fingerprint is not None:
            if len(self._sent) >= _SENT_MAX:
                self._sent.clear()
            self._sent.add(fingerprint)
        priority = max(-PRIORITY_BOUND, min(PRIORITY_BOUND, request.priority))
        if priority != request.priority:
            self._clamped(request)
        self._push.append(Entry(fingerprint, key, concurrency, delay, priority, blob))
        self.crawler.stats.inc_value(_STAT + "pushed_count")
        self._soon()
        return True

    def _clamped(self, request: Request) -> None:
        self.crawler.stats.inc_value(_STAT + "priority_clamped_count")
        if not self._priority_warned:
            self._priority_warned = True
            logger.warning("scrapy-speedup: %s has priority %d, past the +-%d that the Redis"
                           " frontier orders: it is queued as %+d (the request keeps its"
                           " priority; this is said once)", request, request.priority,
                           PRIORITY_BOUND, PRIORITY_BOUND if request.priority > 0
                           else -PRIORITY_BOUND, extra={"crawler": self.crawler})

    def next_request(self) -> Request | None:
        spider = self.crawler.spider
        while self.queue:
            lease, blob = self.queue.popleft()
            try:
                request = request_from_dict(pickle.loads(blob), spider=spider)
            except Exception:
                logger.exception("scrapy-speedup: a request from the frontier could not be"
                                 " rebuilt; it is dropped", extra={"crawler": self.crawler})
                self.crawler.stats.inc_value(_STAT + "request_error_count")
                self._ack.append(lease)
                continue
            self.lease_of[request] = lease
            return request
        self._soon()
        return None

    def __len__(self) -> int:
        return len(self.queue)

    # -- releases and acknowledgements --------------------------------------------------

    def _response_downloaded(self, response: Response, request: Request, spider: Spider) -> None:
        self._release_lease(request)

    def download_failed(self, request: Request, exception: BaseException) -> None:
        self._release_lease(request)

    def _release_lease(self, request: Request) -> None:
        lease = self.lease_of.get(request)
        if lease is not None and lease not in self._released:
            self._released.add(lease)
            self._release.append(lease)
            self._soon()

    def request_handled(self, request: Request) -> None:
        """Its response handled, its items through the pipelines: the lease
        ends (the engine's own request removal says so in one process; the
        coordinator of engine processes calls it)."""
        lease = self.lease_of.pop(request, None)
        if lease is not None:
            self._released.discard(lease)
            self._ack.append(lease)
            self._soon()

    def requeue_leased(self, request: Request) -> bool:
        """An engine process died with *request* downloaded but not handled:
        it is crawled again here, under the lease this machine holds (no
        other machine may take it meanwhile). Whether it was leased here."""
        lease = self.lease_of.pop(request, None)
        if lease is None:
            return False
        blob = pickle.dumps(request.to_dict(spider=self.crawler.spider),
                            protocol=pickle.HIGHEST_PROTOCOL)
        self.queue.appendleft((lease, blob))
        return True

    # -- the job --------------------------------------------------------------------------

    def _soon(self) -> None:
        if self._timer is None and not self._closed and not self._busy:
            self._timer = self.bridge.call_later(0, self._tick)

    def _room(self) -> int:
        """How many requests to lease now: enough to keep this machine's
        downloads busy and a batch waiting, no more (a lease waiting here
        holds its site's place for the whole crawl)."""
        engine_slot = getattr(self.crawler.engine, "_slot", None)
        if self._closing_reason is not None or \
                (engine_slot is not None and engine_slot.closing is not None):
            # Closing: it would only hand back what it leased, after holding
            # those sites' places from the other machines for the close.
            return 0
        total = self.crawler.settings.getint("CONCURRENT_REQUESTS") or 16
        # Taken from here and not yet handled: the crawl's requests in progress.
        return max(0, 2 * total - len(self.lease_of) - len(self.queue))

    def _tick(self) -> None:
        """Send what this machine has for the frontier, and lease what it has
        room for, in one job on the Redis thread (one round trip)."""
        self._timer = None
        if self._closed or self._busy or self.store is None or self.link is None:
            return
        self._busy = True
        now = time.time()
        starting = self.crawler.engine._start is not None
        state = f"{'starting' if starting else 'running'}|{now + _MACHINE_TTL_S}"
        if self._resend is not None:
            batch, self._resend = self._resend, None
            batch.job.state = state
            self._submit(batch)
            return
        job = Job(self.machine, state, push=self._push, release=self._release, ack=self._ack,
                  want=self._room(), visibility_s=self.visibility_s, start_key=self.start_key)
        self._push, self._release, self._ack = [], [], []
        if job.ack:
            self.feeds.flush()  # their items, before their pages count as done
        if now - self._renewed_at > self.visibility_s / 3:
            self._renewed_at = now
            job.renew = [lease for lease, _ in self.queue] + list(self.lease_of.values())
            job.renew_deadline = now + self.visibility_s
        if now - self._reaped_at > 1.0:
            self._reaped_at = now
            job.reap = True
        batch = _Batch(job)
        if self.counts is not None and (self.limits.any()
                                        or now - self._exchanged_at >= _STATS_EVERY_S):
            self._exchanged_at = now
            batch.changes = self.counts.changes(self.crawler.stats)
        self._submit(batch)

    def _submit(self, batch: _Batch) -> None:
        store, link = self.store, self.link
        assert store is not None and link is not None
        link.submit(lambda: self._run(store, batch),
                    lambda result, error: self._ran(batch, result, error))

    async def _run(self, store: FrontierStore, batch: _Batch) -> _Outcome:
        """On the Redis thread: the tick's job, then the stats exchange if due."""
        outcome = _Outcome(await store.tick(batch.job, time.time()))
        if batch.changes is not None and self.counts is not None:
            # The job's token: a batch sent again adds its counts once.
            outcome.closing, outcome.totals = await self.counts.exchange(
                store.redis, batch.changes, batch.job.token)
        return outcome

    def _ran(self, batch: _Batch, outcome: _Outcome | None,
             error: BaseException | None) -> None:
        try:
            self._take_outcome(batch, outcome, error)
        finally:
            if self._tick_back is not None:
                self.bridge.resolve(self._tick_back, None)

    def _take_outcome(self, batch: _Batch, outcome: _Outcome | None,
                      error: BaseException | None) -> None:
        self._busy = False
        job = batch.job
        if error is not None or outcome is None:
            # Redis may have done the job and its reply been lost: the same
            # job goes again, which Redis does once (its token).
            self._resend = batch
            self._failed(error or RuntimeError("no outcome"))
            return
        stats = self.crawler.stats
        stats.inc_value(_STAT + "round_trip_count", 1 if batch.changes is None else 2)
        if self.counts is not None and batch.changes is not None:
            self.counts.sent(batch.changes)
        self._recovered()
        if outcome.totals is not None:
            self._totals = outcome.totals
        if outcome.closing is not None:
            self._close_crawl(outcome.closing)
        result = outcome.result
        if job.push:
            filtered = len(job.push) - result.added
            if filtered:
                stats.inc_value("dupefilter/filtered", filtered)
            stats.inc_value(_STAT + "queued_count", result.added)
        if result.reaped:
            stats.inc_value(_STAT + "lease_expired_count", len(result.reaped))
            logger.warning("scrapy-speedup: %d leases of the crawl outlived"
                           " SPEEDUP_FRONTIER_VISIBILITY_TIMEOUT_SECONDS (a machine died"
                           " or hung); they are back in the frontier", len(result.reaped),
                           extra={"crawler": self.crawler})
        self._saw_start_key(result.starts)
        leased = [item for item in result.leased if not item.blob.startswith(START_MARK)]
        if len(leased) < len(result.leased):
            self._make_start_requests([item for item in result.leased
                                       if item.blob.startswith(START_MARK)])
        self.queue.extend((item.id, item.blob) for item in leased)
        if result.leased:
            stats.inc_value(_STAT + "leased_count", len(result.leased))
            stats.inc_value(_STAT + "lease_message_count")
        queued, out, starting = result.state
        if result.starts.kind in ("list", "set", "zset"):
            queued += result.starts.left  # they keep the crawl going
        self._look((queued, out, starting))
        engine_slot = getattr(self.crawler.engine, "_slot", None)
        if result.leased and self.on_leased is not None:
            self.on_leased()
        elif result.leased and engine_slot is not None:
            engine_slot.nextcall.schedule()
        busy = self._push or self._release or self._ack or result.leased
        if not self._closed:
            wait = _TICK_S if busy else _WAITING_TICK_S if self._waiting() else _IDLE_TICK_S
            self._timer = self.bridge.call_later(wait, self._tick)

    # -- start URLs ----------------------------------------------------------------------

    def _saw_start_key(self, starts: StartKey) -> None:
        if starts.kind not in ("none", "list", "set", "zset") and not self._start_key_refused:
            self._start_key_refused = True
            logger.error("scrapy-speedup: the start URLs key %r is a %s; it is not read: start"
                         " URLs are a list (lpush/rpush), a set (sadd) or a sorted set (zadd)."
                         " Delete the key, or name another with"
                         " SPEEDUP_FRONTIER_START_URLS_KEY", self.start_key, starts.kind,
                         extra={"crawler": self.crawler})

    def _make_start_requests(self, entries: list[Leased]) -> None:
        """Make the requests of leased start URL entries, and send them: the
        entries are acknowledged by the job that pushes their requests (the
        next, which _ran() schedules)."""
        engine, spider, stats = self.crawler.engine, self.crawler.spider, self.crawler.stats
        assert spider is not None
        max_url_length = self.crawler.settings.getint("URLLENGTH_LIMIT")
        for entry in entries:
            data = entry.blob[len(START_MARK):]
            try:
                requests = requests_from_entry(data, spider, max_url_length)
                for request in requests:
                    engine.crawl(request)
            except Exception as exc:  # noqa: BLE001 - one entry must not stop the crawl
                stats.inc_value(_STAT + "start_url_error_count")
                why = str(exc) if isinstance(exc, BadStartUrlError) else \
                    f"{type(exc).__name__}: {exc}"
                logger.error("scrapy-speedup: start URL entry %s from %r refused: %s",
                             describe(data), self.start_key, why,
                             extra={"crawler": self.crawler})
            else:
                stats.inc_value(_STAT + "start_url_count")
            self._ack.append(entry.id)


    # -- the crawl's end and Redis outages -----------------------------------------------

    def _check_limits(self) -> None:
        counts = self.counts
        if counts is None or self._closing_reason is not None:
            return
        stats = self.crawler.stats
        for key, limit, reason in (
                ("item_scraped_count", self.limits.itemcount, "closespider_itemcount"),
                ("response_received_count", self.limits.pagecount, "closespider_pagecount")):
            if not limit:
                continue
            unsent = stats.get_value(key, 0) - counts.sent_count(key)
            if self._totals.get(key, 0) + unsent >= limit:
                # The other machines learn it from the stats this machine
                # sends next, at once (or at its close): they reach the
                # limit too.
                self._close_crawl(reason)
                self._soon()
                return

    def _close_crawl(self, reason: str) -> None:
        """Another machine, or this one, saw a CLOSESPIDER_* limit of the
        crawl reached (or Redis stayed away too long): close with its reason."""
        if self._closing_reason is not None:
            return
        self._closing_reason = reason
        logger.info("scrapy-speedup: the crawl %r closes (%s); so do its machines",
                    self.prefix, reason, extra={"crawler": self.crawler})
        _schedule_coro(self.crawler.engine.close_spider_async(reason=reason))

    def _failed(self, error: BaseException) -> None:
        """A job could not reach Redis (the client retried each command for
        a while already): wait and try again, up to
        SPEEDUP_FRONTIER_MAX_OUTAGE_SECONDS, then close the crawl."""
        from redis.exceptions import AuthenticationError, ReadOnlyError, ResponseError

        now = time.monotonic()
        stats = self.crawler.stats
        stats.inc_value(_STAT + "error_count")
        if isinstance(error, AuthenticationError):
            # redis-py's AuthenticationError is a ConnectionError, but no
            # wait brings the right password. (Said once: the jobs in flight
            # fail the same way.)
            if self._closing_reason is None:
                logger.error(
                    "scrapy-speedup: Redis at %s refused this machine (%s: %s); it stops. Put"
                    " the password in SPEEDUP_FRONTIER_URL: redis://:PASSWORD@host:6379/0 (or"
                    " redis://USER:PASSWORD@… with ACL users)", _safe_url(self.url),
                    type(error).__name__, error, extra={"crawler": self.crawler})
            self._close_crawl("frontier_error")
            return
        if isinstance(error, ResponseError) and not isinstance(error, ReadOnlyError):
            # Redis answered, with a refusal that waiting does not cure (a key
            # of the crawl's that holds another type, a script Redis cannot
            # run, maxmemory reached). A read-only replica is a fail-over:
            # that one is waited for.
            if self._closing_reason is None:
                logger.error(
                    "scrapy-speedup: Redis at %s refused the frontier's commands (%s: %s);"
                    " this machine stops. The crawl's keys start with %r: another program's"
                    " keys there, or a Redis older than 6.2, cause this", _safe_url(self.url),
                    type(error).__name__, error, self.prefix + ":",
                    extra={"crawler": self.crawler})
            self._close_crawl("frontier_error")
            return
        if self._failing_since is None:
            self._failing_since = now
            logger.warning(
                "scrapy-speedup: Redis at %s cannot be reached (%s: %s); the crawl waits for"
                " it, up to %s s (SPEEDUP_FRONTIER_MAX_OUTAGE_SECONDS)", _safe_url(self.url),
                type(error).__name__, error, self.max_outage_s,
                extra={"crawler": self.crawler})
        elif now - self._failing_since > self.max_outage_s:
            logger.error(
                "scrapy-speedup: Redis at %s has been unreachable for %.0f s; this machine"
                " stops (its leases go back to the crawl after the visibility timeout)",
                _safe_url(self.url), now - self._failing_since,
                extra={"crawler": self.crawler})
            self._close_crawl("frontier_unavailable")
        if not self._closed:
            self._timer = self.bridge.call_later(_RETRY_S, self._tick)

    def _recovered(self) -> None:
        if self._failing_since is not None:
            away = time.monotonic() - self._failing_since
            self._failing_since = None
            self.crawler.stats.max_value(_STAT + "outage_seconds_max", round(away, 3))
            logger.warning("scrapy-speedup: Redis is back after %.1f s; the crawl goes on",
                           away, extra={"crawler": self.crawler})


def _safe_url(url: str) -> str:
    """The URL without its password, for the log."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


def _log_error(crawler: Crawler, what: str, error: BaseException | None) -> None:
    if error is not None:
        crawler.stats.inc_value(_STAT + "error_count")
        logger.error("scrapy-speedup: %s to Redis failed: %s: %s", what,
                     type(error).__name__, error, extra={"crawler": crawler})
