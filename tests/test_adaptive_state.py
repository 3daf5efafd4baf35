"""Adaptive concurrency keeps bounded state and aggregated stats however many
sites a crawl visits (finding 13), and the user's limits as ceilings (finding 16)."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
import scrapy
from scrapy.http import HtmlResponse, Request

from scrapy_speedup import adaptive
from scrapy_speedup.adaptive import AdaptiveConcurrencyMiddleware
from scrapy_speedup.demo.capacity import CapacityResource
from scrapy_speedup.exceptions import SpeedupSettingsError
from tests.inprocess import crawl, inprocess, listening, make_crawler

ADAPTIVE: dict[str, Any] = {
    "SPEEDUP_ADAPTIVE_CONCURRENCY_ENABLED": True,
    "CONCURRENT_REQUESTS": 64,
    "CONCURRENT_REQUESTS_PER_DOMAIN": 64,
}
# Every speedup/adaptive/* key there is; a crawl of any size has no others.
STAT_KEYS = {
    f"speedup/adaptive/{name}"
    for name in ("slot_count", "slots_tracked_max", "slot_evicted_count", "slot_forgotten_count",
                 "concurrency_min", "concurrency_max", "decrease_count", "overload_count",
                 "timeout_count", "overload_retry_count", "overload_retry_max_reached",
                 "reactor_busy_count")
}


def adaptive_keys(stats: dict[str, Any]) -> set[str]:
    return {key for key in stats if key.startswith("speedup/adaptive/")}


class ManySitesSpider(scrapy.Spider):
    """One page from each of *count* sites (download slots ``site-N``), all
    served by one local server."""

    name = "many_sites"

    def __init__(self, url: str, count: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.url, self.count = url, count

    async def start(self):
        for i in range(self.count):
            yield scrapy.Request(f"{self.url}/page/{i}", meta={"download_slot": f"site-{i}"})

    def parse(self, response):
        yield {"url": response.url}


def middleware_of(crawler: Any) -> AdaptiveConcurrencyMiddleware:
    for mw in crawler.engine.downloader.middleware.middlewares:
        if isinstance(mw, AdaptiveConcurrencyMiddleware):
            return mw
    raise AssertionError("AdaptiveConcurrencyMiddleware is not enabled")


@inprocess
async def test_a_crawl_of_3000_sites_keeps_bounded_state_and_stats(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="scrapy_speedup")
    monkeypatch.setattr(AdaptiveConcurrencyMiddleware, "max_tracked_slots", 1000)
    with listening(CapacityResource(10_000, 0.0)) as url:
        # Scrapy's default DownloaderAwarePriorityQueue looks at every slot on
        # each pop: 3,000 slots would make the test slow, not the middleware.
        settings = {**ADAPTIVE, "SCHEDULER_PRIORITY_QUEUE": "scrapy.pqueues.ScrapyPriorityQueue"}
        run = await crawl(ManySitesSpider, settings, timeout=90, url=url, count=3000)
    assert run.finish_reason == "finished"
    assert len(run.items) == 3000
    assert adaptive_keys(run.stats) <= STAT_KEYS, adaptive_keys(run.stats) - STAT_KEYS
    assert run.stat("speedup/adaptive/slot_count") == 3000
    assert run.stat("speedup/adaptive/slots_tracked_max") == 1000
    assert run.stat("speedup/adaptive/slot_evicted_count") == 2000
    assert len(middleware_of(run.crawler)._states) == 1000
    # Nothing written into Scrapy's per-slot settings.
    assert run.crawler.engine.downloader.per_slot_settings == {}
    summary = [r.getMessage() for r in caplog.records
               if r.getMessage().startswith("Adaptive concurrency:")]
    assert len(summary) == 1
    assert "3000 slots seen, 1000 tracked at most" in summary[0]
    assert summary[0].count(": limit ") == 5 and len(summary[0]) < 1000


def standalone(settings: dict[str, Any] | None = None) -> AdaptiveConcurrencyMiddleware:
    """The middleware of a crawler that never runs; the downloader's slots
    are a plain dict the test fills."""
    crawler = make_crawler(scrapy.Spider, {**ADAPTIVE, **(settings or {})})
    crawler.engine = SimpleNamespace(downloader=SimpleNamespace(slots={}))
    return AdaptiveConcurrencyMiddleware.from_crawler(crawler)


def downloaded(mw: AdaptiveConcurrencyMiddleware, slot: str, status: int = 200) -> None:
    request = Request("http://example.com/", meta={"download_slot": slot,
                                                   "download_latency": 0.05})
    mw._response_downloaded(HtmlResponse(request.url, status=status, request=request), request)


def test_50000_slots_stay_within_the_cap() -> None:
    mw = standalone()
    for i in range(50_000):
        downloaded(mw, f"site-{i}")
    stats = mw.stats.get_stats()
    assert len(mw._states) == mw.max_tracked_slots == 10_000
    assert stats["speedup/adaptive/slot_evicted_count"] == 40_000
    assert stats["speedup/adaptive/slots_tracked_max"] == 10_000
    # The least recently used went first.
    assert mw.limit("site-49999") is not None and mw.limit("site-0") is None
    assert adaptive_keys(stats) <= STAT_KEYS


def test_idle_slots_that_scrapy_dropped_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(adaptive, "time", SimpleNamespace(monotonic=lambda: now[0]))
    mw = standalone()
    for i in range(100):
        downloaded(mw, f"old-{i}")
    mw.crawler.engine.downloader.slots["old-0"] = object()  # Scrapy still has it
    now[0] += mw.forget_idle_s - 1
    downloaded(mw, "old-1")  # seen again: not idle
    now[0] += 2
    downloaded(mw, "new")
    assert set(mw._states) == {"old-0", "old-1", "new"}
    assert mw.stats.get_value("speedup/adaptive/slot_forgotten_count") == 98


def test_a_slot_that_returns_starts_afresh() -> None:
    mw = standalone({"SPEEDUP_ADAPTIVE_MAX_CONCURRENCY": 64})
    for _ in range(200):
        downloaded(mw, "a")
    grown = mw.limit("a")
    assert grown is not None and grown > 4
    mw._states.clear()
    downloaded(mw, "a", status=200)
    assert mw.limit("a") is not None and mw.limit("a") <= 5


# Ceilings ----------------------------------------------------------------------


def test_the_users_slot_limits_are_ceilings() -> None:
    mw = standalone({"DOWNLOAD_SLOTS": {"a": {"concurrency": 2, "delay": 1}, "b": {"delay": 1},
                                        "c": {"concurrency": 500}},
                     "SPEEDUP_ADAPTIVE_MAX_CONCURRENCY": 32})
    assert (mw.ceiling("a"), mw.ceiling("b"), mw.ceiling("c"), mw.ceiling("z")) == (2, 32, 32, 32)
    for _ in range(300):
        downloaded(mw, "a")
    assert mw.limit("a") == 2


@pytest.mark.filterwarnings("ignore:The CONCURRENT_REQUESTS_PER_IP setting is deprecated")
def test_the_per_ip_limit_is_a_ceiling_of_every_slot() -> None:
    mw = standalone({"CONCURRENT_REQUESTS_PER_IP": 3,
                     "DOWNLOAD_SLOTS": {"a": {"concurrency": 5}}})
    assert (mw.ceiling("10.0.0.1"), mw.ceiling("a")) == (3, 5)


def test_a_min_above_the_users_limit_yields_to_it() -> None:
    mw = standalone({"DOWNLOAD_SLOTS": {"a": {"concurrency": 1}},
                     "SPEEDUP_ADAPTIVE_MIN_CONCURRENCY": 4})
    downloaded(mw, "a", status=503)
    assert mw.limit("a") == 1


@pytest.mark.parametrize("value", ["2", 2.5, True])
def test_a_slot_limit_that_is_not_an_integer_is_refused(value: Any) -> None:
    with pytest.raises(SpeedupSettingsError, match=r"DOWNLOAD_SLOTS\['a'\]\['concurrency'\]"):
        standalone({"DOWNLOAD_SLOTS": {"a": {"concurrency": value}}})
