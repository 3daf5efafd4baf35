"""Concurrency that tunes itself, per download slot.

``AdaptiveConcurrencyMiddleware`` moves each download slot's concurrency
between ``SPEEDUP_ADAPTIVE_MIN_CONCURRENCY`` and a ceiling (the lowest of
``SPEEDUP_ADAPTIVE_MAX_CONCURRENCY``, the slot's own ``concurrency`` in
``DOWNLOAD_SLOTS`` and ``CONCURRENT_REQUESTS_PER_IP``) from what the site
tells it:

* **Latency against the no-load latency** (a gradient, as in Netflix's
  concurrency-limits "Gradient2"): ``gradient = clamp(1.25 x no_load / recent,
  0.5, 1)`` and ``limit = limit x gradient + growth``, one such step per round
  trip (each response moves the limit by 1/limit of the step, as about
  ``limit`` responses arrive per round trip). While latency shows no queueing
  the limit grows; when the site queues requests, latency rises and the limit
  shrinks in proportion. Growth is TCP's: it doubles per round trip until the
  first sign of trouble (slow start), then grows by its square root up to a
  threshold and by one past it.
* **Local overload**: while the reactor doctor saw the reactor full over its
  last window (about a second: its thread on the CPU 90% of the time or more,
  or blocked longer than ``SPEEDUP_LAG_WARN_MS``), the crawl's own processing
  is the bottleneck: the limit does not grow, as more requests in flight
  would only wait as responses, and the latency gradient (latency then
  includes the time responses wait for the reactor) brings it down, but not
  below what keeps the reactor fed, by Little's law with headroom: 3 x the
  slot's responses per second x its no-load latency.
* **Overload**: a 429 or 503, or a download timeout, halves the limit, at most
  once per recent round trip (the responses of requests already in flight say
  nothing new), and sets the threshold to the halved limit, as TCP Reno does.
  An overloaded request is retried without using Scrapy's retry budget (up to
  ``SPEEDUP_ADAPTIVE_OVERLOAD_RETRY_TIMES``), after ``Retry-After`` when the
  site sends a usable one, else after an exponential, jittered back-off.

The middleware only *sets* ``slot.concurrency``, as AutoThrottle sets
``slot.delay``; Scrapy's downloader enforces it (the add-on installs
:class:`~scrapy_speedup.downloader.SpeedupDownloader`, which holds it under
asyncio too). Nothing here waits for a place: a response or exception that
never reaches the middleware (a redirect, ``IgnoreRequest`` or a request
returned by a middleware above it) costs a sample, never a place. Samples come
from the ``response_downloaded`` signal, so every response off the wire counts,
whatever the middlewares above do with it.

With engine processes (``SPEEDUP_CRAWL_PROCESSES``) the middleware runs in
two halves: in the coordinator it sets the limits of the crawl's slots (it
sees each download's status and latency, and timeouts, from the engines), and
does not retry; in each engine process it retries overloaded requests and
leaves the engine's own slots alone.

State is bounded: a slot is forgotten once Scrapy's slot GC has removed it and
it has had no request for :attr:`~AdaptiveConcurrencyMiddleware.forget_idle_s`,
and at most :attr:`~AdaptiveConcurrencyMiddleware.max_tracked_slots` slots are
tracked (the least recently used is forgotten first). Stats are aggregated over
all slots; one line at close names the busiest slots.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

from scrapy import signals
from scrapy.exceptions import NotConfigured
from twisted.internet.error import TCPTimedOutError, TimeoutError

from scrapy_speedup.config import SpeedupConfig
from scrapy_speedup.exceptions import SpeedupSettingsError
from scrapy_speedup.extension import SpeedupExtension

if TYPE_CHECKING:
    import asyncio
    from typing import Self

    from scrapy import Request
    from scrapy.crawler import Crawler
    from scrapy.http import Response
    from twisted.internet.defer import Deferred

    from scrapy_speedup._bridge import Bridge, Timer
    from scrapy_speedup.reactor_doctor import ReactorDoctor, ReactorLoad

__all__ = ["AdaptiveConcurrencyMiddleware", "retry_after_seconds"]

logger = logging.getLogger(__name__)

# Scrapy >= 2.14 raises its own DownloadTimeoutError; older versions raise
# Twisted's.
_TIMEOUTS: tuple[type[BaseException], ...] = (TimeoutError, TCPTimedOutError)
try:
    from scrapy.exceptions import DownloadTimeoutError
except ImportError:  # pragma: no cover - Scrapy < 2.14
    pass
else:
    _TIMEOUTS += (DownloadTimeoutError,)

#: Latency up to this many times the no-load latency counts as "not queued".
#: concurrency-limits uses 1.5 against a mean; the no-load latency here is the
#: lowest recent one, and a server that queues at most as many requests as it
#: serves no more than doubles latency, so 1.5 would never see it queue.
_TOLERANCE = 1.25
_RECENT_WEIGHT = 0.1  # EWMA weight of a latency sample in the recent latency
# The no-load latency is the lowest recent latency; it drifts up slowly so
# that a site that really got slower is not punished forever.
_NO_LOAD_DRIFT = 1.001
_OVERLOAD_STATUSES = frozenset({429, 503})
_START_LIMIT = 4
_STAT = "speedup/adaptive/"
_RETRIES_KEY = "speedup_overload_retries"

# The reactor is full when its thread ran on the CPU this share of a window.
_BUSY_CPU_SHARE = 0.9
# While the reactor is full, the limit stays above this many times what
# keeps it fed (responses per second x no-load latency, Little's law): a
# floor that lets the gradient starve the reactor costs a CPU-bound crawl
# more than the extra requests in flight do (docs/design.rst).
_BUSY_HEADROOM = 3.0
_RATE_WINDOW_S = 1.0

# An overload retry waits at most this long, whatever Retry-After says: a
# waiting request holds one of CONCURRENT_REQUESTS' places.
_MAX_WAIT_S = 60.0
# The n-th overload retry of a request waits _BACKOFF_BASE_S x 2**n, +-50%
# (so that requests that failed together do not come back together), or
# what Retry-After asks if longer, at most _MAX_WAIT_S: a server that stays
# overloaded must not be hammered (docs/design.rst).
_BACKOFF_BASE_S = 1.0
_BACKOFF_JITTER = 0.5
# How often a waiting retry checks whether the crawl is stopping: there is no
# signal for the start of a graceful stop.
_STOP_POLL_S = 0.2
_SUMMARY_SLOTS = 5  # slots named in the line at close
_SUMMARY_KEY_CHARS = 80


@dataclass(slots=True)
class _SlotState:
    limit: float
    floor: int
    ceiling: int
    last_seen: float
    lowest: int
    highest: int
    recent_s: float | None = None
    no_load_s: float | None = None
    last_decrease: float = 0.0
    # After an overload, growth past this is one per round trip, not the
    # square root of the limit (TCP Reno's slow-start threshold).
    threshold: float = math.inf
    responses: int = 0
    # Responses per second over the last complete window.
    rate: float = 0.0
    rate_start: float = 0.0
    rate_count: int = 0


def retry_after_seconds(
    value: bytes | str | None, date: bytes | str | None = None, *, now: datetime | None = None
) -> float | None:
    """Seconds to wait according to a ``Retry-After`` header *value*, at most
    60; None when there is none or it is of no use (garbage, negative, a date
    in the past).

    It is either delta-seconds or an HTTP date. A date is taken relative to
    the response's ``Date`` header when it has a valid one (the server's own
    clock: a skewed clock on either side cancels out), else to *now*.
    """
    text = _header_text(value)
    if not text:
        return None
    if text.isascii() and text.isdigit():  # delta-seconds: 1*DIGIT, nothing else
        seconds = float(int(text))
    else:
        when = _http_date(text)
        if when is None:
            return None
        reference = _http_date(_header_text(date)) or now or datetime.now(UTC)
        seconds = (when - reference).total_seconds()
        if seconds <= 0:
            return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, _MAX_WAIT_S)


def _header_text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value.strip()


def _http_date(text: str) -> datetime | None:
    if not text:
        return None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    # HTTP dates are GMT; "-0000" gives a naive datetime.
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def backoff_seconds(retries: int) -> float:
    """The wait before overload retry number ``retries + 1`` of a request
    when the site gives no usable ``Retry-After``."""
    base = _BACKOFF_BASE_S * 2.0 ** min(retries, 32)
    jittered = base * (1 + random.uniform(-_BACKOFF_JITTER, _BACKOFF_JITTER))
    return min(_MAX_WAIT_S, jittered)


class AdaptiveConcurrencyMiddleware:
    """Enable with ``SPEEDUP_ADAPTIVE_CONCURRENCY_ENABLED = True`` (the add-on
    adds it to ``DOWNLOADER_MIDDLEWARES``)."""

    #: The most slots tracked at once; past it the least recently used slot
    #: is forgotten (its learned limit is lost, it starts again at 4).
    #: A slot costs about 300 bytes with its key: 10,000 slots are about 3 MB.
    max_tracked_slots = 10_000
    #: A slot that Scrapy's slot GC removed (no request in flight for 60 s) is
    #: forgotten after this long without a request.
    forget_idle_s = 600.0
    #: How often (at most) idle slots are looked for, when a slot is added.
    forget_interval_s = 60.0

    def __init__(self, crawler: Crawler, config: SpeedupConfig) -> None:
        self.crawler = crawler
        self.stats = crawler.stats
        self.min = config.adaptive_min_concurrency
        self.max = config.adaptive_max_concurrency
        self.debug = config.adaptive_debug
        self.overload_retry_times = config.adaptive_overload_retry_times
        settings = crawler.settings
        # The user's own limits, from the settings: the downloader's
        # per_slot_settings are Scrapy's working copy, which others may write.
        self._slot_limits = _user_slot_limits(settings.getdict("DOWNLOAD_SLOTS"))
        # Not getint: it warns that the setting is deprecated, as the downloader
        # already did.
        self._ip_limit = int(settings["CONCURRENT_REQUESTS_PER_IP"] or 0)
        self._priority_adjust = settings.getint("RETRY_PRIORITY_ADJUST")
        self._states: OrderedDict[str, _SlotState] = OrderedDict()
        self._next_forget = 0.0
        self._doctor: ReactorDoctor | None = None
        self._load_seen: ReactorLoad | None = None
        self._busy = ""
        # Overload retries waiting, and the timer that ends each wait.
        self._waiting: dict[asyncio.Future[Any] | Deferred[Any], Timer] = {}
        self._stop_poll: Timer | None = None
        #: Whether this half sets limits / retries overloaded requests (see
        #: the module's docstring on engine processes).
        self.sets_limits = config.engine_index is None
        self.retries = not config.coordinates

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        config = SpeedupConfig.of(crawler)
        if not (config.enabled and config.adaptive_enabled):
            raise NotConfigured
        mw = cls(crawler, config)
        if mw.sets_limits:
            crawler.signals.connect(mw._request_reached,
                                    signal=signals.request_reached_downloader)
            crawler.signals.connect(mw._response_downloaded,
                                    signal=signals.response_downloaded)
        crawler.signals.connect(mw._spider_closed, signal=signals.spider_closed)
        return mw

    # The limit -----------------------------------------------------------

    def ceiling(self, key: str) -> int:
        """The highest limit of slot *key*: the user's own limit for it
        (``DOWNLOAD_SLOTS``, or ``CONCURRENT_REQUESTS_PER_IP``, which Scrapy
        applies to every slot when set) is a ceiling, as is
        ``SPEEDUP_ADAPTIVE_MAX_CONCURRENCY``."""
        user = self._slot_limits.get(key)
        if user is None and self._ip_limit > 0:
            user = self._ip_limit
        # A limit of 0 stops Scrapy's slot for good; 1 is the least that runs.
        return self.max if user is None else max(1, min(self.max, user))

    def limit(self, key: str) -> int | None:
        """The current limit of slot *key*, or None when it is not tracked."""
        state = self._states.get(key)
        return None if state is None else round(state.limit)

    def _state(self, key: str) -> _SlotState:
        now = time.monotonic()
        state = self._states.get(key)
        if state is not None:
            self._states.move_to_end(key)
            state.last_seen = now
            return state
        if now >= self._next_forget:
            self._next_forget = now + self.forget_interval_s
            self._forget_idle(now)
        ceiling = self.ceiling(key)
        floor = min(self.min, ceiling)
        start = max(floor, min(ceiling, _START_LIMIT))
        state = self._states[key] = _SlotState(float(start), floor, ceiling, now, start, start)
        self.stats.inc_value(_STAT + "slot_count")
        while len(self._states) > self.max_tracked_slots:
            self._states.popitem(last=False)
            self.stats.inc_value(_STAT + "slot_evicted_count")
        self.stats.max_value(_STAT + "slots_tracked_max", len(self._states))
        self._record_limit(start)
        return state

    def _forget_idle(self, now: float) -> None:
        """Forget the slots that Scrapy no longer has and that had no request
        for forget_idle_s; the oldest come first, so the walk stops early."""
        slots = self.crawler.engine.downloader.slots
        idle = []
        for key, state in self._states.items():
            if now - state.last_seen < self.forget_idle_s:
                break
            if key not in slots:
                idle.append(key)
        for key in idle:
            del self._states[key]
        if idle:
            self.stats.inc_value(_STAT + "slot_forgotten_count", len(idle))

    def _request_reached(self, request: Request) -> None:
        # The downloader has just created or found the slot, and has not
        # started anything from its queue yet: the slot gets its limit before
        # its first download (and again after Scrapy's slot GC recreated it).
        key = request.meta.get("download_slot")
        if key is None:
            return
        slot = self.crawler.engine.downloader.slots.get(key)
        if slot is None:
            return
        limit = round(self._state(key).limit)
        if slot.concurrency != limit:
            slot.concurrency = limit

    def _response_downloaded(self, response: Response, request: Request) -> None:
        key = request.meta.get("download_slot")
        if key is None:
            return
        state = self._state(key)
        state.responses += 1
        if response.status in _OVERLOAD_STATUSES:
            self._overload(key, state, f"HTTP {response.status}")
            return
        if 300 <= response.status < 400:
            # A redirect or a 304 has no body and comes back far faster than
            # a page: taken as the no-load latency, it made every page look
            # queued and held a site of redirects at 1 or 2 in flight.
            return
        latency = request.meta.get("download_latency")
        if latency is not None:
            self._sample(key, state, float(latency))

    def process_exception(self, request: Request, exception: Exception) -> None:
        key = request.meta.get("download_slot")
        if key is not None and self.sets_limits and isinstance(exception, _TIMEOUTS):
            self.stats.inc_value(_STAT + "timeout_count")
            self._overload(key, self._state(key), type(exception).__name__)

    def _sample(self, key: str, state: _SlotState, latency: float) -> None:
        if state.no_load_s is None or latency < state.no_load_s:
            state.no_load_s = latency
        else:
            state.no_load_s *= _NO_LOAD_DRIFT
        if state.recent_s is None:
            state.recent_s = latency
        else:
            state.recent_s += _RECENT_WEIGHT * (latency - state.recent_s)
        if state.recent_s <= 0:
            return  # a response faster than the clock: nothing to learn
        gradient = max(0.5, min(1.0, _TOLERANCE * state.no_load_s / state.recent_s))
        self._count_response(state)
        busy = self._reactor_busy()
        if busy:
            state.threshold = min(state.threshold, state.limit)  # slow start ends
            fed = _BUSY_HEADROOM * state.rate * state.no_load_s
            target = max(state.limit * gradient, min(state.limit, fed))
            why = (f"{busy}: no growth, at least {_BUSY_HEADROOM:g} x {state.rate:.0f}"
                   f" responses/s x {state.no_load_s * 1000:.0f} ms no-load latency")
        else:
            if state.threshold is math.inf and gradient >= 1.0:
                growth = state.limit  # slow start: double per round trip until a sign
            elif state.limit < state.threshold:
                growth = math.sqrt(state.limit)
            else:
                growth = 1.0
            target = state.limit * gradient + growth
            why = (f"latency {state.recent_s * 1000:.0f} ms, no-load"
                   f" {state.no_load_s * 1000:.0f} ms, gradient {gradient:.2f}")
        limit = state.limit + (target - state.limit) / state.limit
        self._set(key, state, limit, why)

    @staticmethod
    def _count_response(state: _SlotState) -> None:
        now = time.monotonic()
        state.rate_count += 1
        if not state.rate_start:
            state.rate_start = now
        elif now - state.rate_start >= _RATE_WINDOW_S:
            state.rate = state.rate_count / (now - state.rate_start)
            state.rate_start, state.rate_count = now, 0

    def _reactor_busy(self) -> str:
        """Why the reactor is too busy for more concurrency, or ""."""
        if self._doctor is None:
            ext = self.crawler.get_extension(SpeedupExtension)
            if ext is None or ext.doctor is None:
                return ""  # SPEEDUP_DOCTOR_ENABLED = False: no local input
            self._doctor = ext.doctor
        load = self._doctor.load
        if load is self._load_seen:
            return self._busy
        self._load_seen = load
        self._busy = ""
        if load.cpu_share >= _BUSY_CPU_SHARE or load.lag_max_s > self._doctor.warn_s:
            self._busy = (f"reactor busy (CPU {load.cpu_share:.0%},"
                          f" lag {load.lag_max_s * 1000:.0f} ms)")
            self.stats.inc_value(_STAT + "reactor_busy_count")
        return self._busy

    def _overload(self, key: str, state: _SlotState, why: str) -> None:
        self.stats.inc_value(_STAT + "overload_count")
        now = time.monotonic()
        if now - state.last_decrease < (state.recent_s or 0.0):
            return  # the in-flight requests' overloads are the same news
        state.last_decrease = now
        state.threshold = state.limit / 2
        if state.limit > state.floor:  # a limit at its floor has nothing to give
            self.stats.inc_value(_STAT + "decrease_count")
        self._set(key, state, state.limit / 2, why)

    def _set(self, key: str, state: _SlotState, limit: float, why: str) -> None:
        limit = max(float(state.floor), min(float(state.ceiling), limit))
        before, after = round(state.limit), round(limit)
        state.limit = limit
        if before == after:
            return
        slot = self.crawler.engine.downloader.slots.get(key)
        if slot is not None:
            slot.concurrency = after
        state.lowest, state.highest = min(state.lowest, after), max(state.highest, after)
        self._record_limit(after)
        if self.debug:
            logger.info(
                "slot %s: concurrency %d -> %d (%s)", key, before, after, why,
                extra={"crawler": self.crawler},
            )

    def _record_limit(self, limit: int) -> None:
        self.stats.min_value(_STAT + "concurrency_min", limit)
        self.stats.max_value(_STAT + "concurrency_max", limit)

    # Overload retries ---------------------------------------------------------

    async def process_response(self, request: Request, response: Response) -> Request | Response:
        if (not self.retries or response.status not in _OVERLOAD_STATUSES
                or request.meta.get("dont_retry") or "cached" in response.flags):
            # A 503 from HttpCacheMiddleware's cache would come back the same.
            return response
        retries = request.meta.get(_RETRIES_KEY, 0)
        if retries >= self.overload_retry_times:
            self.stats.inc_value(_STAT + "overload_retry_max_reached")
            return response  # Scrapy's RetryMiddleware takes it from here
        # Retry-After is the least the site asks for; the back-off still
        # grows with each retry, so that "Retry-After: 0" on a page that stays
        # overloaded does not bring back immediate retries.
        delay = max(
            retry_after_seconds(
                response.headers.get(b"Retry-After"), response.headers.get(b"Date")
            ) or 0.0,
            backoff_seconds(retries),
        )
        if not await self._wait(delay, request):
            return response  # the crawl is stopping: Scrapy's retry decides
        self.stats.inc_value(_STAT + "overload_retry_count")
        retry = request.copy()
        retry.meta[_RETRIES_KEY] = retries + 1
        retry.dont_filter = True
        retry.priority = request.priority + request.meta.get(
            "priority_adjust", self._priority_adjust
        )
        return retry

    def _stopping(self) -> bool:
        engine = self.crawler.engine
        if not self.crawler.crawling or engine is None or not engine.running:
            return True
        # A spider closed by CloseSpider or the closespider extension does not
        # stop the engine first; its slot is closing, waiting for us.
        slot = getattr(engine, "_slot", None)
        return slot is not None and slot.closing is not None

    async def _wait(self, delay: float, request: Request) -> bool:
        """Wait *delay* seconds; False, and at once, when the crawl stops."""
        if self._stopping():
            return False
        if delay <= 0:
            return True
        bridge = self._bridge()
        waiter = bridge.new_waiter()
        self._waiting[waiter] = bridge.call_later(delay, bridge.resolve, waiter, True)
        if self._stop_poll is None:
            self._stop_poll = bridge.call_later(_STOP_POLL_S, self._poll_stop)
        # Counted in its slot's active requests meanwhile: Scrapy's slot GC
        # keeps the slot, and DownloaderAwarePriorityQueue sends other sites'
        # requests first.
        key = request.meta.get("download_slot")
        slot = self.crawler.engine.downloader.slots.get(key) if key is not None else None
        if slot is not None:
            slot.active.add(request)
        try:
            return bool(await waiter)
        finally:
            self._waiting.pop(waiter).cancel()
            if slot is not None:
                slot.active.discard(request)

    def _bridge(self) -> Bridge:
        return SpeedupExtension.of(self.crawler).bridge

    def _poll_stop(self) -> None:
        self._stop_poll = None
        if not self._waiting:
            return
        if not self._stopping():
            self._stop_poll = self._bridge().call_later(_STOP_POLL_S, self._poll_stop)
            return
        self._end_waits()

    def _end_waits(self) -> None:
        bridge = self._bridge()
        for waiter in list(self._waiting):
            bridge.resolve(waiter, False)

    # Close --------------------------------------------------------------------

    def _spider_closed(self) -> None:
        if self._stop_poll is not None:
            self._stop_poll.cancel()
            self._stop_poll = None
        if self._waiting:
            self._end_waits()
        busiest = heapq.nlargest(
            _SUMMARY_SLOTS, self._states.items(), key=lambda item: item[1].responses
        )
        logger.info(
            "Adaptive concurrency: %d slots seen, %d tracked at most; busiest: %s",
            self.stats.get_value(_STAT + "slot_count", 0),
            self.stats.get_value(_STAT + "slots_tracked_max", 0),
            "; ".join(
                f"{_short(key)}: limit {round(state.limit)} (min {state.lowest},"
                f" max {state.highest}, {state.responses} responses{_no_load(state)})"
                for key, state in busiest
            ) or "none",
            extra={"crawler": self.crawler},
        )


def _no_load(state: _SlotState) -> str:
    if state.no_load_s is None:
        return ""
    return f", no-load latency {state.no_load_s * 1000:.0f} ms"


def _short(key: str) -> str:
    if len(key) <= _SUMMARY_KEY_CHARS:
        return key
    return key[: _SUMMARY_KEY_CHARS - 3] + "..."


def _user_slot_limits(download_slots: dict[Any, Any]) -> dict[str, int]:
    """The ``concurrency`` of each ``DOWNLOAD_SLOTS`` entry that has one."""
    limits = {}
    for key, entry in download_slots.items():
        if not isinstance(entry, dict) or entry.get("concurrency") is None:
            continue
        value = entry["concurrency"]
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # Scrapy takes 2.0 as 2
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpeedupSettingsError(
                f"DOWNLOAD_SLOTS[{key!r}]['concurrency'] ({value!r}) must be an integer"
                " (the most requests in flight to that slot)"
            )
        limits[str(key)] = value
    return limits
