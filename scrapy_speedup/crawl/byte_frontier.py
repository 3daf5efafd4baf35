"""The crawl's frontier as bytes: what the coordinator runs when the crawl's
scheduling is Scrapy's default.

A request from an engine arrives as the bytes of its ``Request.to_dict``, with
its fingerprint, its site's slot and its priority beside them (the engine
computed them with the crawl's own fingerprinter and slot rules). The
coordinator never rebuilds it: it filters it by fingerprint, queues the bytes
by priority, holds each site's slot here, and lends the same bytes on. This is
Scrapy's own algorithm, without a ``Request``, a download coroutine or a
Deferred per request:

- the queue is Scrapy's ``SCHEDULER_PRIORITY_QUEUE``: highest priority first,
  each priority in the order of ``SCHEDULER_MEMORY_QUEUE`` (LIFO by default,
  or FIFO), the spider's start requests at a priority after the others
  (``SCHEDULER_START_MEMORY_QUEUE``); with ``DownloaderAwarePriorityQueue``
  (Scrapy's default) one such queue per site, the next request taken from
  the site with the fewest requests in its slot;
- the dupefilter is ``RFPDupeFilter``'s own fingerprint set, shared with the
  coordinator's scheduler (the spider's ``start()`` goes through it too);
- requests move from the queue to their site's slot while fewer than
  ``CONCURRENT_REQUESTS`` are in the slots (Scrapy's ``needs_backout``), and
  a slot lends them while fewer than its concurrency are out and its delay
  has passed (Scrapy's ``Downloader._process_queue``, with the slot's
  concurrency, delay and jitter built by Scrapy from ``DOWNLOAD_SLOTS``,
  ``CONCURRENT_REQUESTS_PER_DOMAIN`` / ``_PER_IP`` and ``DOWNLOAD_DELAY``).

:func:`usable` says when: the project's scheduler, dupefilter and queues are
Scrapy's defaults, without ``JOBDIR``, AutoThrottle, adaptive concurrency or a
listener of ``request_dropped`` (each needs a ``Request`` in the coordinator).
Otherwise the coordinator keeps Scrapy's scheduler and downloader
(:mod:`.frontier`, :mod:`.downloader`).
"""

from __future__ import annotations

import heapq
import pickle
from collections import deque
from time import monotonic
from typing import TYPE_CHECKING, Any

from scrapy import Request

if TYPE_CHECKING:
    from collections.abc import Callable

    from scrapy.core.downloader import Slot
    from scrapy.crawler import Crawler

    from scrapy_speedup._bridge import Bridge, Timer

__all__ = ["ByteFrontier", "Entry", "slot_key", "usable"]

# A site whose slot has been idle this long, with nothing queued, is
# forgotten (Scrapy's slot garbage collection): a crawl of a million sites
# does not keep a million slots.
_SITE_IDLE_S = 60.0


def slot_key(request: Request) -> str:
    """The request's download slot as the coordinator's downloader names it
    (``Downloader.get_slot_key``): its ``download_slot`` meta, or its host.
    With ``CONCURRENT_REQUESTS_PER_IP`` too: the coordinator resolves no name,
    so a site's name stands for its address in every engine alike."""
    from scrapy.utils.httpobj import urlparse_cached

    meta_slot: str | None = request.meta.get("download_slot")
    if meta_slot is not None:
        return meta_slot
    return urlparse_cached(request).hostname or ""


class Entry:
    """One request, as bytes, with what the frontier needs to know of it."""

    __slots__ = ("blob", "dont_filter", "fingerprint", "priority", "slot", "start")

    def __init__(self, fingerprint: bytes, dont_filter: bool, slot: str, priority: int,  # noqa: PLR0917 - built a million times: positional is cheapest
                 blob: bytes, start: bool = False) -> None:
        self.fingerprint = fingerprint
        self.dont_filter = dont_filter
        self.slot = slot
        self.priority = priority
        self.blob = blob
        #: One of the spider's start requests (they wait behind the others).
        self.start = start

    def describe(self) -> str:
        """The request's method and URL, for a log line (rare: it unpickles)."""
        try:
            fields = pickle.loads(self.blob)
            return f"<{fields.get('method', 'GET')} {fields.get('url')}>"
        except Exception:  # noqa: BLE001 - a log line must not raise
            return f"<request {self.fingerprint.hex()}>"


class _PriorityQueue:
    """Scrapy's ``ScrapyPriorityQueue`` over memory queues, for entries: by
    priority, then the crawl's requests (LIFO or FIFO), then the start
    requests (their own order)."""

    __slots__ = ("_keys", "_lifo", "_queues", "_start_lifo", "size")

    def __init__(self, lifo: bool, start_lifo: bool | None) -> None:
        self._lifo = lifo
        #: None: start requests are queued as any other (no start queue).
        self._start_lifo = start_lifo
        # By negated priority: (the crawl's requests, the start requests).
        self._queues: dict[int, tuple[deque[Entry], deque[Entry]]] = {}
        self._keys: list[int] = []  # a heap of the keys in _queues
        self.size = 0

    def push(self, entry: Entry) -> None:
        key = -entry.priority
        queues = self._queues.get(key)
        if queues is None:
            queues = self._queues[key] = (deque(), deque())
            heapq.heappush(self._keys, key)
        queues[1 if entry.start and self._start_lifo is not None else 0].append(entry)
        self.size += 1

    def pop(self) -> Entry:
        key = self._keys[0]
        queues = self._queues[key]
        if queues[0]:
            entry = queues[0].pop() if self._lifo else queues[0].popleft()
        else:
            entry = queues[1].pop() if self._start_lifo else queues[1].popleft()
        if not (queues[0] or queues[1]):
            del self._queues[key]
            heapq.heappop(self._keys)
        self.size -= 1
        return entry


class _Site:
    """A download slot of the whole crawl: Scrapy's ``Slot`` gives its limits
    (concurrency, delay, jitter); its state is kept here."""

    __slots__ = ("key", "lastseen", "limits", "out", "queue", "timer")

    def __init__(self, key: str, limits: Slot) -> None:
        self.key = key
        self.limits = limits
        self.queue: deque[Entry] = deque()
        self.out = 0  # lent and not yet downloaded
        self.lastseen = 0.0
        self.timer: Timer | None = None


def usable(crawler: Crawler, scheduler: Any) -> str | None:
    """None when the byte frontier can stand for *scheduler* (Scrapy's own,
    with its defaults); otherwise why not, for the log."""
    from pydispatch import dispatcher
    from scrapy import signals
    from scrapy.core.scheduler import Scheduler
    from scrapy.dupefilters import RFPDupeFilter
    from scrapy.pqueues import DownloaderAwarePriorityQueue, ScrapyPriorityQueue
    from scrapy.squeues import FifoMemoryQueue, LifoMemoryQueue
    from scrapy.utils.misc import load_object

    settings = crawler.settings
    if type(scheduler) is not Scheduler:
        return f"the scheduler is {type(scheduler).__qualname__}"
    dupefilter = scheduler.df
    if type(dupefilter) is not RFPDupeFilter or dupefilter.debug:
        return f"the dupefilter is {type(dupefilter).__qualname__}" + \
            (" with DUPEFILTER_DEBUG" if type(dupefilter) is RFPDupeFilter else "")
    if settings.get("JOBDIR"):
        return "JOBDIR is set (Scrapy's disk queues keep the frontier)"
    if load_object(settings["SCHEDULER_PRIORITY_QUEUE"]) not in (
            ScrapyPriorityQueue, DownloaderAwarePriorityQueue):
        return f"SCHEDULER_PRIORITY_QUEUE is {settings['SCHEDULER_PRIORITY_QUEUE']}"
    memory_queues = (LifoMemoryQueue, FifoMemoryQueue)
    if load_object(settings["SCHEDULER_MEMORY_QUEUE"]) not in memory_queues:
        return f"SCHEDULER_MEMORY_QUEUE is {settings['SCHEDULER_MEMORY_QUEUE']}"
    start_queue = settings.get("SCHEDULER_START_MEMORY_QUEUE")
    if start_queue and load_object(start_queue) not in memory_queues:
        return f"SCHEDULER_START_MEMORY_QUEUE is {start_queue}"
    if settings.getbool("AUTOTHROTTLE_ENABLED"):
        return "AutoThrottle is on (it adjusts Scrapy's slots from each response)"
    if settings.getbool("SPEEDUP_ADAPTIVE_CONCURRENCY_ENABLED"):
        return "adaptive concurrency is on (it adjusts Scrapy's slots from each response)"
    if list(dispatcher.getAllReceivers(crawler.signals.sender, signals.request_dropped)):
        return "a component listens to request_dropped (it takes each Request)"
    return None


class ByteFrontier:
    def __init__(
        self, crawler: Crawler, bridge: Bridge, *, fingerprints: set[bytes],
        lend: Callable[[Entry], bool],
    ) -> None:
        from scrapy.pqueues import DownloaderAwarePriorityQueue
        from scrapy.squeues import LifoMemoryQueue
        from scrapy.utils.misc import load_object

        self.crawler = crawler
        self.stats = crawler.stats
        self._bridge = bridge
        #: Lends an entry to an engine; False when none has room now.
        self._lend = lend
        self._seen = fingerprints
        settings = crawler.settings
        self._lifo = load_object(settings["SCHEDULER_MEMORY_QUEUE"]) is LifoMemoryQueue
        start_queue = settings.get("SCHEDULER_START_MEMORY_QUEUE")
        self._start_lifo = None if not start_queue else \
            load_object(start_queue) is LifoMemoryQueue
        self._total = settings.getint("CONCURRENT_REQUESTS")
        self._by_site = load_object(settings["SCHEDULER_PRIORITY_QUEUE"]) is \
            DownloaderAwarePriorityQueue
        # One queue (ScrapyPriorityQueue), or one a site not yet in its slot
        # (DownloaderAwarePriorityQueue), with a heap of (requests in the
        # site's slot, turn, site): the least busy site first, in turns.
        # A site has one valid heap entry, the turn in _turns.
        self._queue = _PriorityQueue(self._lifo, self._start_lifo)
        self._pending: dict[str, _PriorityQueue] = {}
        self._heap: list[tuple[int, int, str]] = []
        self._turns: dict[str, int] = {}
        self._turn = 0
        self._queued = 0
        self._sites: dict[str, _Site] = {}
        # Sites with entries in their slot that an engine could not take.
        self._blocked: dict[str, _Site] = {}
        self.active = 0  # entries in the sites' slots: queued there or out
        self._gc_at = monotonic() + _SITE_IDLE_S
        self._logged_duplicate = False

    def __len__(self) -> int:
        """Entries waiting: in the queue and in the sites' slots."""
        return self._queued + sum(len(s.queue) for s in self._blocked.values())

    @property
    def pending(self) -> bool:
        return bool(self._queued or self.active)

    @property
    def full(self) -> bool:
        """Whether CONCURRENT_REQUESTS are in the sites' slots: Scrapy's
        ``Downloader.needs_backout``, which the engine's ``needs_backout``
        (and a start() that waits on it) reads."""
        return 0 < self._total <= self.active

    # -- in ---------------------------------------------------------------------------

    def push(self, entry: Entry) -> bool:
        """Queue *entry* unless the crawl has seen its fingerprint; whether it
        was queued. Counted in the stats as Scrapy's scheduler would."""
        if not entry.dont_filter:
            if entry.fingerprint in self._seen:
                self.stats.inc_value("dupefilter/filtered")
                self._log_duplicate(entry)
                return False
            self._seen.add(entry.fingerprint)
        self._put(entry)
        self.stats.inc_value("scheduler/enqueued/memory")
        self.stats.inc_value("scheduler/enqueued")
        return True

    def push_many(self, entries: list[tuple[bytes, bool, str, int, bytes]]) -> int:
        """:meth:`push` for a report's requests, counted once; how many were
        queued."""
        seen = self._seen
        filtered = queued = 0
        first_filtered = 0
        for index, (fingerprint, dont_filter, slot, priority, blob) in enumerate(entries):
            if not dont_filter:
                if fingerprint in seen:
                    if not filtered:
                        first_filtered = index
                    filtered += 1
                    continue
                seen.add(fingerprint)
            self._put(Entry(fingerprint, dont_filter, slot, priority, blob))
            queued += 1
        if filtered:
            self.stats.inc_value("dupefilter/filtered", filtered)
            if not self._logged_duplicate:
                self._log_duplicate(Entry(*entries[first_filtered]))
        if queued:
            self.stats.inc_value("scheduler/enqueued/memory", queued)
            self.stats.inc_value("scheduler/enqueued", queued)
        return queued

    def requeue(self, entry: Entry) -> None:
        """Put back an entry that was lent and not handled: past the
        dupefilter, which has seen it. Counted as enqueued again (it is
        dequeued again), as Scrapy's frontier counts it."""
        self._put(entry)
        self.stats.inc_value("scheduler/enqueued/memory")
        self.stats.inc_value("scheduler/enqueued")

    def _put(self, entry: Entry) -> None:
        self._queued += 1
        if not self._by_site:
            self._queue.push(entry)
            return
        queue = self._pending.get(entry.slot)
        if queue is None:
            queue = self._pending[entry.slot] = _PriorityQueue(self._lifo, self._start_lifo)
            self._next_turn(entry.slot)
        queue.push(entry)

    def _next_turn(self, key: str) -> None:
        """Give the site *key* (which has entries pending) its place in the
        heap, by the requests now in its slot."""
        site = self._sites.get(key)
        busy = site.out + len(site.queue) if site is not None else 0
        self._turn += 1
        self._turns[key] = self._turn
        heapq.heappush(self._heap, (busy, self._turn, key))

    def _pop(self) -> Entry:
        self._queued -= 1
        if not self._by_site:
            return self._queue.pop()
        while True:
            _, turn, key = heapq.heappop(self._heap)
            if self._turns.get(key) == turn:
                break  # else an entry the site's later turn replaced
        queue = self._pending[key]
        entry = queue.pop()
        if queue.size:
            # Its slot gets this entry: the site's turn after it.
            site = self._sites.get(key)
            busy = site.out + len(site.queue) + 1 if site is not None else 1
            self._turn += 1
            self._turns[key] = self._turn
            heapq.heappush(self._heap, (busy, self._turn, key))
        else:
            del self._pending[key]
            del self._turns[key]
        return entry

    def _log_duplicate(self, entry: Entry) -> None:
        """RFPDupeFilter's first-duplicate line (LOG_DUPES ... "no more
        duplicates will be shown")."""
        if self._logged_duplicate:
            return
        self._logged_duplicate = True
        import logging

        logging.getLogger("scrapy.dupefilters").debug(
            "Filtered duplicate request: %(request)s - no more duplicates will be shown"
            " (see DUPEFILTER_DEBUG to show all duplicates)", {"request": entry.describe()},
            extra={"crawler": self.crawler},
        )

    # -- out --------------------------------------------------------------------------

    def pump(self, held: bool = False) -> None:
        """Lend what the crawl's limits allow: first the sites that waited
        for an engine, then new entries into their sites' slots while fewer
        than CONCURRENT_REQUESTS are there (none while *held*)."""
        for site in list(self._blocked.values()):
            self._process(site)
        if self._blocked:
            return  # the engines are full: new entries would wait in slots too
        total = self._total
        stats_dequeued = 0
        while self._queued and not held and (total <= 0 or self.active < total):
            entry = self._pop()
            stats_dequeued += 1
            site = self._site(entry.slot)
            site.queue.append(entry)
            self.active += 1
            self._process(site)
            if self._blocked:
                break
        if stats_dequeued:
            self.stats.inc_value("scheduler/dequeued/memory", stats_dequeued)
            self.stats.inc_value("scheduler/dequeued", stats_dequeued)
        if monotonic() > self._gc_at:
            self._collect_idle_sites()

    def _site(self, key: str) -> _Site:
        site = self._sites.get(key)
        if site is None:
            # Scrapy's downloader builds the slot's limits from the crawl's
            # settings (DOWNLOAD_SLOTS, CONCURRENT_REQUESTS_PER_*, delay).
            downloader: Any = self.crawler.engine.downloader
            _, limits = downloader._get_slot(Request("data:,", meta={"download_slot": key}))
            downloader.slots.pop(key, None)  # held here, not there
            site = self._sites[key] = _Site(key, limits)
        return site

    def _process(self, site: _Site) -> None:
        """Scrapy's ``Downloader._process_queue`` for one site."""
        if site.timer is not None:
            return
        now = monotonic()
        delay = site.limits.download_delay()
        if delay:
            penalty = delay - now + site.lastseen
            if penalty > 0:
                site.timer = self._bridge.call_later(penalty, self._timer_fired, site)
                # It waits for its delay now, not for an engine (a longer
                # delay drawn with jitter, after a try that found none with
                # room): the other sites go on meanwhile.
                self._blocked.pop(site.key, None)
                return
        while site.queue and site.out < site.limits.concurrency:
            entry = site.queue[0]
            if not self._lend(entry):
                self._blocked[site.key] = site
                return
            site.queue.popleft()
            site.out += 1
            site.lastseen = now
            if delay:  # one per delay: the next waits for its turn
                if site.queue:
                    self._process(site)
                break
        self._blocked.pop(site.key, None)

    def _timer_fired(self, site: _Site) -> None:
        site.timer = None
        self._process(site)

    def released(self, entry: Entry, *, downloaded: bool) -> None:
        """An entry's download has ended in its engine (*downloaded*), or the
        engine handled it without a download (a cache hit, a request a
        middleware answered): its site's slot has a place free."""
        site = self._sites.get(entry.slot)
        self.active -= 1
        if site is None:  # pragma: no cover - a lent entry's site is kept
            return
        site.out -= 1
        if entry.slot in self._turns:
            self._next_turn(entry.slot)  # one fewer in its slot: it may go sooner
        if not downloaded and site.limits.delay:
            # As in one process, where such a request never reaches the
            # slot: the next waits no delay.
            site.lastseen = monotonic() - site.limits.delay
            if site.timer is not None:
                site.timer.cancel()
                site.timer = None
        if site.queue:
            self._process(site)

    def returned(self, entry: Entry) -> None:
        """An entry lent and not downloaded came back (its engine died): it
        goes first in its site's slot, for another engine."""
        site = self._sites.get(entry.slot)
        if site is None:  # pragma: no cover - a lent entry's site is kept
            self.active -= 1
            self.requeue(entry)
            return
        site.out -= 1
        site.queue.appendleft(entry)
        self._process(site)

    def _collect_idle_sites(self) -> None:
        now = monotonic()
        self._gc_at = now + _SITE_IDLE_S
        for key, site in list(self._sites.items()):
            if not site.queue and not site.out and site.timer is None and \
                    site.lastseen + site.limits.delay + _SITE_IDLE_S < now:
                del self._sites[key]

    def close(self) -> None:
        for site in self._sites.values():
            if site.timer is not None:
                site.timer.cancel()
                site.timer = None
