"""Concurrency that tunes itself, per download slot.

``AdaptiveConcurrencyMiddleware`` moves each download slot's concurrency
between ``SPEEDUP_ADAPTIVE_MIN_CONCURRENCY`` and
``SPEEDUP_ADAPTIVE_MAX_CONCURRENCY`` from what the site tells it:

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
  The overloaded request is retried, after ``Retry-After`` when the site sends
  one, without using Scrapy's retry budget, so that backing off loses no page
  (up to ``SPEEDUP_ADAPTIVE_OVERLOAD_RETRY_TIMES``).

AutoThrottle, when also enabled, keeps setting delays; this middleware only
sets concurrency.

The limit is enforced here as well as set on Scrapy's slot: in Scrapy 2.19,
under asyncio, ``Downloader._process_queue`` starts each download as a task,
and a request joins ``slot.transferring`` only when its task runs, so one pass
over a deep slot queue sends all of it, whatever the slot's concurrency (seen:
59 requests transferring with a concurrency of 4). ``process_request`` waits
for a place below the limit instead.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from scrapy.exceptions import NotConfigured
from scrapy.utils.asyncio import sleep
from twisted.internet.error import TCPTimedOutError, TimeoutError

from scrapy_speedup._bridge import Bridge
from scrapy_speedup.config import SpeedupConfig
from scrapy_speedup.extension import SpeedupExtension

if TYPE_CHECKING:
    import asyncio
    from typing import Self

    from scrapy import Request
    from scrapy.core.downloader import Slot
    from scrapy.crawler import Crawler
    from scrapy.http import Response
    from twisted.internet.defer import Deferred

    from scrapy_speedup.reactor_doctor import ReactorDoctor, ReactorLoad

__all__ = ["AdaptiveConcurrencyMiddleware"]

logger = logging.getLogger(__name__)

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
_MAX_RETRY_AFTER_S = 60.0
_STAT = "speedup/adaptive/"


_IN_FLIGHT_KEY = "_speedup_adaptive_slot"
# The reactor is full when its thread ran on the CPU this share of a window.
_BUSY_CPU_SHARE = 0.9
# While the reactor is full, the limit stays above this many times what
# keeps it fed (responses per second x no-load latency): without a floor,
# the gradient took a CPU-bound crawl down to 3 in flight and cost it 16%;
# a run with 2x ended at 5 and 0.91x a fixed 64, three rounds with 3x at
# 6-11 and 1.08x (benchmarks/bench_concurrency.py, "slow machine").
_BUSY_HEADROOM = 3.0
_RATE_WINDOW_S = 1.0


@dataclass
class _SlotState:
    limit: float
    in_flight: int = 0
    waiting: deque[asyncio.Future[None] | Deferred[None]] = field(default_factory=deque)
    recent_s: float | None = None
    no_load_s: float | None = None
    last_decrease: float = 0.0
    # After an overload, growth past this is one per round trip, not the
    # square root of the limit (TCP Reno's slow-start threshold).
    threshold: float = math.inf
    lowest: int = 0
    highest: int = 0
    # Responses per second over the last complete window.
    rate: float = 0.0
    rate_start: float = 0.0
    rate_count: int = 0


class AdaptiveConcurrencyMiddleware:
    """Enable with ``SPEEDUP_ADAPTIVE_CONCURRENCY_ENABLED = True`` (the add-on
    adds it to ``DOWNLOADER_MIDDLEWARES``)."""

    def __init__(self, crawler: Crawler, config: SpeedupConfig) -> None:
        self.crawler = crawler
        self.stats = crawler.stats
        self.min = config.adaptive_min_concurrency
        self.max = config.adaptive_max_concurrency
        self.debug = config.adaptive_debug
        self.overload_retry_times = config.adaptive_overload_retry_times
        self._states: dict[str, _SlotState] = {}
        self._bridge: Bridge | None = None
        self._doctor: ReactorDoctor | None = None
        self._load_seen: ReactorLoad | None = None
        self._busy = ""

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        config = SpeedupConfig.from_settings(crawler.settings)
        if not (config.enabled and config.adaptive_enabled):
            raise NotConfigured
        return cls(crawler, config)

    def _slot(self, request: Request) -> tuple[str, Slot | None, _SlotState]:
        downloader = self.crawler.engine.downloader
        key = downloader.get_slot_key(request)
        state = self._states.get(key)
        if state is None:
            start = float(max(self.min, min(self.max, 4)))
            state = self._states[key] = _SlotState(start, lowest=int(start), highest=int(start))
            self._record(key, state)
        return key, downloader.slots.get(key), state

    async def process_request(self, request: Request) -> None:
        key, slot, state = self._slot(request)
        if slot is None:
            # Not created yet: the downloader creates it from DOWNLOAD_SLOTS,
            # so it starts at the learned limit (so does a slot that Scrapy's
            # slot GC recreates).
            self._remember(key, round(state.limit))
        elif slot.concurrency != round(state.limit):
            slot.concurrency = round(state.limit)
        while state.in_flight >= round(state.limit):
            if self._bridge is None:
                self._bridge = Bridge()
            waiter = self._bridge.new_waiter()
            state.waiting.append(waiter)
            await waiter
        state.in_flight += 1
        request.meta[_IN_FLIGHT_KEY] = key

    def _release(self, request: Request) -> None:
        key = request.meta.pop(_IN_FLIGHT_KEY, None)
        if key is None:
            return
        state = self._states[key]
        state.in_flight -= 1
        self._wake(state)

    def _wake(self, state: _SlotState) -> None:
        free = round(state.limit) - state.in_flight
        while free > 0 and state.waiting:
            assert self._bridge is not None
            self._bridge.resolve(state.waiting.popleft(), None)
            free -= 1

    def _remember(self, key: str, concurrency: int) -> None:
        per_slot = self.crawler.engine.downloader.per_slot_settings
        per_slot.setdefault(key, {})["concurrency"] = concurrency

    async def process_response(self, request: Request, response: Response) -> Request | Response:
        self._release(request)
        key, slot, state = self._slot(request)
        if response.status in _OVERLOAD_STATUSES:
            self._overload(key, slot, state, f"HTTP {response.status}")
            return await self._retry(request, response.headers.get(b"Retry-After"), response)
        latency = request.meta.get("download_latency")
        if latency is not None:
            self._sample(key, slot, state, float(latency))
        return response

    def process_exception(self, request: Request, exception: Exception) -> None:
        self._release(request)
        if isinstance(exception, (TimeoutError, TCPTimedOutError)):
            key, slot, state = self._slot(request)
            self._overload(key, slot, state, type(exception).__name__)

    def _sample(self, key: str, slot: Slot | None, state: _SlotState, latency: float) -> None:
        if state.no_load_s is None or latency < state.no_load_s:
            state.no_load_s = latency
        else:
            state.no_load_s *= _NO_LOAD_DRIFT
        if state.recent_s is None:
            state.recent_s = latency
        else:
            state.recent_s += _RECENT_WEIGHT * (latency - state.recent_s)
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
        self._set(key, slot, state, limit, why)

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

    def _overload(self, key: str, slot: Slot | None, state: _SlotState, why: str) -> None:
        self.stats.inc_value(_STAT + "overload_count")
        now = time.monotonic()
        if now - state.last_decrease < (state.recent_s or 0.0):
            return  # the in-flight requests' overloads are the same news
        state.last_decrease = now
        state.threshold = state.limit / 2
        self._set(key, slot, state, state.limit / 2, why)

    def _set(self, key: str, slot: Slot | None, state: _SlotState, limit: float, why: str) -> None:
        limit = max(float(self.min), min(float(self.max), limit))
        before, after = round(state.limit), round(limit)
        state.limit = limit
        if before == after:
            return
        self._wake(state)
        if slot is not None:
            slot.concurrency = after
        self._remember(key, after)
        state.lowest, state.highest = min(state.lowest, after), max(state.highest, after)
        self._record(key, state)
        if self.debug:
            logger.info(
                "slot %s: concurrency %d -> %d (%s)", key, before, after, why,
                extra={"crawler": self.crawler},
            )

    def _record(self, key: str, state: _SlotState) -> None:
        self.stats.set_value(f"{_STAT}{key}/concurrency", round(state.limit))
        self.stats.set_value(f"{_STAT}{key}/concurrency_min", state.lowest)
        self.stats.set_value(f"{_STAT}{key}/concurrency_max", state.highest)

    async def _retry(
        self, request: Request, retry_after: bytes | None, response: Response
    ) -> Request | Response:
        retries = request.meta.get("speedup_overload_retries", 0)
        if retries >= self.overload_retry_times:
            return response  # Scrapy's RetryMiddleware takes it from here
        delay = 0.0
        if retry_after:
            try:
                delay = min(_MAX_RETRY_AFTER_S, max(0.0, float(retry_after)))
            except ValueError:
                delay = 0.0  # an HTTP date: not worth parsing for a back-off
        if delay:
            await sleep(delay)
        self.stats.inc_value(_STAT + "overload_retry_count")
        retry = request.copy()
        retry.meta["speedup_overload_retries"] = retries + 1
        retry.dont_filter = True
        return retry
