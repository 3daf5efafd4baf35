"""The add-on's downloader holds each slot's concurrency under asyncio
(finding 16): the user's DOWNLOAD_SLOTS and CONCURRENT_REQUESTS_PER_IP limits,
with or without adaptive concurrency."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import scrapy
from scrapy.core.downloader import Downloader, Slot

from scrapy_speedup.demo.capacity import CapacityResource
from scrapy_speedup.downloader import SpeedupDownloader, downloader_with_slot_limits
from tests.inprocess import crawl, inprocess, listening, make_crawler

pytestmark = pytest.mark.filterwarnings(
    "ignore:The CONCURRENT_REQUESTS_PER_IP setting is deprecated"
)

# Six requests of 0.2 s each: one at a time they take 1.2 s.
PAGES = 6
LATENCY_S = 0.2


class PagesSpider(scrapy.Spider):
    name = "pages"

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.url = url

    async def start(self):
        for i in range(PAGES):
            yield scrapy.Request(f"{self.url}/page/{i}")

    def parse(self, response):
        yield {"url": response.url}


ONE_PER_SLOT = {"DOWNLOAD_SLOTS": {"127.0.0.1": {"concurrency": 1}}}
# Deprecated in Scrapy 2.19, and refused by its default priority queue.
ONE_PER_IP = {"CONCURRENT_REQUESTS_PER_IP": 1,
              "SCHEDULER_PRIORITY_QUEUE": "scrapy.pqueues.ScrapyPriorityQueue"}


async def peak_of(settings: dict[str, Any]) -> int:
    """The most requests the server had at once during a crawl of PAGES pages."""
    site = CapacityResource(capacity=100, latency_s=LATENCY_S)
    with listening(site) as url:
        run = await crawl(PagesSpider, {"CONCURRENT_REQUESTS": 16, **settings}, url=url)
    assert run.finish_reason == "finished"
    assert len(run.items) == PAGES
    return site.peak


@pytest.mark.parametrize("limit", [ONE_PER_SLOT, ONE_PER_IP], ids=["DOWNLOAD_SLOTS", "PER_IP"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
@inprocess
async def test_the_users_limit_of_one_holds(limit: dict[str, Any], adaptive: bool) -> None:
    settings = {**limit, "SPEEDUP_ADAPTIVE_CONCURRENCY_ENABLED": adaptive}
    assert await peak_of(settings) == 1


@pytest.mark.parametrize("limit", [ONE_PER_SLOT, ONE_PER_IP], ids=["DOWNLOAD_SLOTS", "PER_IP"])
@inprocess
async def test_scrapy_alone_bursts_past_it_under_asyncio(limit: dict[str, Any]) -> None:
    """Why the add-on replaces the downloader: Scrapy 2.19's own, under the
    asyncio reactor, sends a slot's queue at once. If this starts failing,
    Scrapy fixed it, and SpeedupDownloader can go."""
    assert await peak_of({**limit, "SPEEDUP_ENABLED": False}) > 1


@inprocess
async def test_a_limit_of_two_holds_on_a_deep_queue() -> None:
    site = CapacityResource(capacity=100, latency_s=0.05)

    class Many(PagesSpider):
        async def start(self):
            for i in range(40):
                yield scrapy.Request(f"{self.url}/page/{i}")

    with listening(site) as url:
        run = await crawl(Many, {"CONCURRENT_REQUESTS": 64, "CONCURRENT_REQUESTS_PER_DOMAIN": 2},
                          url=url)
    assert run.finish_reason == "finished"
    assert len(run.items) == 40
    assert site.peak == 2


class ProjectDownloader(Downloader):
    """A project's own downloader, as a project might write one."""

    fetched = 0

    def fetch(self, request, spider=None):
        ProjectDownloader.fetched += 1
        return super().fetch(request)


@inprocess
async def test_a_projects_downloader_gets_the_fix_mixed_in() -> None:
    crawler = make_crawler(PagesSpider, {"DOWNLOADER": ProjectDownloader, **ONE_PER_SLOT})
    cls = crawler.settings["DOWNLOADER"]
    assert issubclass(cls, ProjectDownloader) and issubclass(cls, SpeedupDownloader)
    ProjectDownloader.fetched = 0
    assert await peak_of({"DOWNLOADER": ProjectDownloader, **ONE_PER_SLOT}) == 1
    assert ProjectDownloader.fetched == PAGES  # the project's code still runs


def test_scrapys_downloader_becomes_the_speedup_one() -> None:
    crawler = make_crawler(PagesSpider)
    assert crawler.settings["DOWNLOADER"] == "scrapy_speedup.downloader.SpeedupDownloader"
    off = make_crawler(PagesSpider, {"SPEEDUP_ENABLED": False})
    assert off.settings["DOWNLOADER"] == "scrapy.core.downloader.Downloader"


class OwnQueueDownloader(Downloader):
    def _process_queue(self, slot: Slot) -> None:
        super()._process_queue(slot)


class NotADownloader:
    def __init__(self, crawler: Any) -> None:
        self.crawler = crawler


@pytest.mark.parametrize("cls", [OwnQueueDownloader, NotADownloader])
def test_a_downloader_it_cannot_fix_is_left_alone_with_a_warning(
    cls: type, caplog: pytest.LogCaptureFixture
) -> None:
    assert downloader_with_slot_limits(cls) is None
    with caplog.at_level(logging.WARNING, logger="scrapy_speedup.addon"):
        crawler = make_crawler(PagesSpider, {"DOWNLOADER": cls})
    assert crawler.settings["DOWNLOADER"] is cls
    assert "may then have more requests in flight than its concurrency" in caplog.text


def test_the_speedup_downloader_and_its_subclasses_are_kept() -> None:
    class Sub(SpeedupDownloader):
        pass

    assert downloader_with_slot_limits(SpeedupDownloader) is SpeedupDownloader
    assert downloader_with_slot_limits(Sub) is Sub
    assert downloader_with_slot_limits(Downloader) is SpeedupDownloader
