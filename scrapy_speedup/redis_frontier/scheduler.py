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
- The crawl ends when no request is queued, none is leased, and no machine
  is still in its spider's ``start()``, seen twice a second apart.

Every Redis call runs on the Redis thread (:mod:`.link`), one job at a time;
the reactor only reads what the last job found.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any

from scrapy import Request, signals
from scrapy.core.scheduler import BaseScheduler
from scrapy.utils.request import request_from_dict

from scrapy_speedup.config import SpeedupConfig
from scrapy_speedup.extension import SpeedupExtension
from scrapy_speedup.redis_frontier.link import RedisLink
from scrapy_speedup.redis_frontier.store import Entry, FrontierStore, Leased

if TYPE_CHECKING:
    from typing import Self

    from scrapy import Spider
    from scrapy.crawler import Crawler
    from scrapy.http import Response

    from scrapy_speedup._bridge import Timer

__all__ = ["RedisScheduler"]

logger = logging.getLogger(__name__)

_STAT = "speedup/frontier/"
# How often the scheduler talks to Redis while it has nothing to send: to
# prefetch as room frees up, and to see the crawl's state.
_TICK_S = 0.02
_IDLE_TICK_S = 0.05
# The crawl is over when it looks over this long (two looks at least).
_END_GRACE_S = 1.0
_MACHINE_TTL_S = 30


class RedisScheduler(BaseScheduler):
    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        self.config = SpeedupConfig.of(crawler)
        frontier = self.config.frontier
        assert frontier is not None
        self.url = frontier.url
        self.visibility_s = frontier.visibility_timeout_seconds
        self.machine = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.prefix = frontier.name or ""
        self.queue: deque[tuple[bytes, bytes]] = deque()
        self.lease_of: dict[Request, bytes] = {}
        self._released: set[bytes] = set()
        self._push: list[Entry] = []
        self._release: list[bytes] = []
        self._ack: list[bytes] = []
        self._busy = False
        self._closed = False
        self._timer: Timer | None = None
        self._renewed_at = self._reaped_at = 0.0
        self._global: tuple[int, int, int] = (0, 0, 1)  # queued, leased, machines starting
        self._idle_since: float | None = None
        self._looks_done = 0
        self.link: RedisLink | None = None
        self.store: FrontierStore | None = None

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    # -- life cycle -----------------------------------------------------------------

    def open(self, spider: Spider) -> None:
        self.prefix = self.prefix or spider.name
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
            self._handled(request)

        engine_slot.remove_request = remove_request  # type: ignore[method-assign]
        self.crawler.signals.connect(self._response_downloaded, signals.response_downloaded)
        self.crawler.stats.set_value(_STAT + "machine", self.machine)
        logger.info("scrapy-speedup: frontier on Redis at %s, crawl %r, this machine %s",
                    _safe_url(self.url), self.prefix, self.machine,
                    extra={"crawler": self.crawler})
        self._tick()

    def close(self, reason: str) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        # Leases not started go back at once, for the other machines.
        returned = [lease for lease, _ in self.queue] + list(self.lease_of.values())
        self.queue.clear()
        store, link, prefix, machine = self.store, self.link, self.prefix, self.machine
        if link is None or store is None:
            return
        pushes, releases, acks = self._push, self._release, self._ack

        async def last_job() -> None:
            now = time.time()
            await store.push(pushes, now)
            await store.release(releases, now)
            await store.ack(acks, now)
            # Handed back: due now, reaped by whoever looks next.
            await store.renew(returned, now - 1)
            await store.reap(now)
            await store.redis.hdel(f"{prefix}:machines", machine)

        link.submit(last_job, lambda _, error: _log_error(self.crawler, "close", error))
        self.bridge.run_in_new_thread(link.close, "scrapy-speedup-redis-close")

    # -- the scheduler's interface ------------------------------------------------------

    def has_pending_requests(self) -> bool:
        return not self._crawl_over()

    def _locally_idle(self) -> bool:
        return not (self.queue or self.lease_of or self._push or self._release or self._ack)

    def _crawl_over(self) -> bool:
        """Whether the whole crawl has looked over (nothing queued, nothing
        leased, no machine in its start()) for _END_GRACE_S, twice."""
        return self._idle_since is not None and self._looks_done >= 2 and \
            time.monotonic() - self._idle_since >= _END_GRACE_S and self._locally_idle()

    def _look(self, state: tuple[int, int, int]) -> None:
        self._global = state
        if state != (0, 0, 0) or not self._locally_idle():
            self._idle_since, self._looks_done = None, 0
            return
        if self._idle_since is None:
            self._idle_since = time.monotonic()
        self._looks_done += 1
        if self._crawl_over():
            # The engine looks at its next heartbeat otherwise (5 s).
            engine_slot = getattr(self.crawler.engine, "_slot", None)
            if engine_slot is not None:
                engine_slot.nextcall.schedule()

    def enqueue_request(self, request: Request) -> bool:
        spider = self.crawler.spider
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
        fingerprint = None if request.dont_filter else \
            self.crawler.request_fingerprinter.fingerprint(request)
        self._push.append(Entry(fingerprint, key, concurrency, delay, request.priority, blob))
        self.crawler.stats.inc_value(_STAT + "pushed_count")
        self._soon()
        return True

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

    def _handled(self, request: Request) -> None:
        lease = self.lease_of.pop(request, None)
        if lease is not None:
            self._released.discard(lease)
            self._ack.append(lease)
            self._soon()

    # -- the job --------------------------------------------------------------------------

    def _soon(self) -> None:
        if self._timer is None and not self._closed and not self._busy:
            self._timer = self.bridge.call_later(0, self._tick)

    def _room(self) -> int:
        """How many requests to lease now: enough to keep this machine's
        downloads busy and a batch waiting, no more (a lease waiting here
        holds its site's place for the whole crawl)."""
        engine = self.crawler.engine
        total = self.crawler.settings.getint("CONCURRENT_REQUESTS") or 16
        in_progress = len(engine._slot.inprogress) if engine._slot is not None else 0
        return max(0, 2 * total - in_progress - len(self.queue))

    def _tick(self) -> None:
        self._timer = None
        if self._closed or self._busy or self.store is None or self.link is None:
            return
        self._busy = True
        store, now_wall = self.store, time.time()
        pushes, self._push = self._push, []
        releases, self._release = self._release, []
        acks, self._ack = self._ack, []
        held = [lease for lease, _ in self.queue] + list(self.lease_of.values())
        renew = held if now_wall - self._renewed_at > self.visibility_s / 3 else []
        if renew:
            self._renewed_at = now_wall
        reap = now_wall - self._reaped_at > 1.0
        if reap:
            self._reaped_at = now_wall
        want = self._room()
        starting = self.crawler.engine._start is not None
        prefix, machine, visibility = self.prefix, self.machine, self.visibility_s

        async def job() -> tuple[int, list[bytes], list[Leased], tuple[int, int, int]]:
            now = time.time()
            redis = store.redis
            added = await store.push(pushes, now)
            await store.release(releases, now)
            await store.ack(acks, now)
            if renew:
                await store.renew(renew, now + visibility)
            reaped = await store.reap(now) if reap else []
            leased = await store.lease(machine, want, visibility, now) if want else []
            pipe = redis.pipeline(transaction=False)
            pipe.hset(f"{prefix}:machines", machine, f"{'starting' if starting else 'running'}"
                                                      f"|{now + _MACHINE_TTL_S}")
            pipe.hgetall(f"{prefix}:machines")
            _, machines = await pipe.execute()
            queued, out = await store.counts()
            starting_count = 0
            for name, state in machines.items():
                what, _, until = state.decode().partition("|")
                if float(until) < now:  # its machine died while starting
                    await redis.hdel(f"{prefix}:machines", name)
                elif what == "starting":
                    starting_count += 1
            return added, reaped, leased, (queued, out, starting_count)

        def done(result: Any, error: BaseException | None) -> None:
            self._busy = False
            if error is not None:
                _log_error(self.crawler, "a frontier call", error)
                # Put back what was not sent: the next job tries again.
                self._push[:0] = pushes
                self._release[:0] = releases
                self._ack[:0] = acks
                self._timer = self.bridge.call_later(_IDLE_TICK_S, self._tick)
                return
            added, reaped, leased, state = result
            stats = self.crawler.stats
            if pushes:
                filtered = len(pushes) - added
                if filtered:
                    stats.inc_value("dupefilter/filtered", filtered)
                stats.inc_value(_STAT + "queued_count", added)
            if reaped:
                stats.inc_value(_STAT + "lease_expired_count", len(reaped))
                logger.warning("scrapy-speedup: %d leases of the crawl outlived"
                               " SPEEDUP_FRONTIER_VISIBILITY_TIMEOUT_SECONDS (a machine died"
                               " or hung); they are back in the frontier", len(reaped),
                               extra={"crawler": self.crawler})
            self.queue.extend((item.id, item.blob) for item in leased)
            if leased:
                stats.inc_value(_STAT + "leased_count", len(leased))
                stats.inc_value(_STAT + "lease_message_count")
            self._look(state)
            engine_slot = getattr(self.crawler.engine, "_slot", None)
            if leased and engine_slot is not None:
                engine_slot.nextcall.schedule()
            busy = self._push or self._release or self._ack or leased
            self._timer = self.bridge.call_later(_TICK_S if busy else _IDLE_TICK_S, self._tick)

        self.link.submit(job, done)


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
