"""Components that block the reactor, for the reactor doctor's tests.

``blocker`` says which one blocks, for ``ms`` on every ``every``-th page:
``parse`` (CPU work in the spider callback, in a helper function),
``pipeline`` (SleepyPipeline sleeps in process_item), ``pipeline_cpu``
(CpuPipeline hashes in process_item), ``middleware``
(HashingMiddleware hashes in process_response), ``spidermw``
(CheckingSpiderMiddleware in process_spider_output), ``extension``
(a signal handler of TallyExtension), ``none``.
"""

from __future__ import annotations

import hashlib
import time

import scrapy
from scrapy import signals


def burn_cpu(ms: float) -> int:
    """CPU work for *ms* milliseconds, in a helper as real parsing code is."""
    deadline = time.thread_time() + ms / 1000
    rounds = 0
    while time.thread_time() < deadline:
        hashlib.sha256(b"x" * 1024).digest()
        rounds += 1
    return rounds


class DoctorSpider(scrapy.Spider):
    name = "doctor"
    custom_settings = {
        "ITEM_PIPELINES": {"testproj.spiders_doctor.SleepyPipeline": 300,
                           "testproj.spiders_doctor.CpuPipeline": 310},
        "DOWNLOADER_MIDDLEWARES": {"testproj.spiders_doctor.HashingMiddleware": 543},
        "SPIDER_MIDDLEWARES": {"testproj.spiders_doctor.CheckingSpiderMiddleware": 543},
        "EXTENSIONS": {"testproj.stats.ItemOutcomes": 0,
                       "testproj.spiders_doctor.TallyExtension": 0},
    }

    def __init__(self, site, count="30", blocker="none", ms="150", every="10", **kwargs):
        super().__init__(**kwargs)
        self.site, self.count = site.rstrip("/"), int(count)
        self.blocker, self.ms, self.every = blocker, float(ms), int(every)

    def blocks(self, id: int, where: str) -> bool:
        return self.blocker == where and id % self.every == 0

    async def start(self):
        for i in range(self.count):
            yield scrapy.Request(f"{self.site}/product/{i}.html", cb_kwargs={"id": i})

    def parse(self, response, id):
        if self.blocks(id, "parse"):
            burn_cpu(self.ms)
        yield {"id": id, "url": response.url}


class _Component:
    def __init__(self, crawler):
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler):
        return cls(crawler)


class SleepyPipeline(_Component):
    """A pipeline with a blocking call (what a synchronous database driver does)."""

    def process_item(self, item):
        spider = self.crawler.spider
        if spider.blocks(item["id"], "pipeline"):
            time.sleep(spider.ms / 1000)
        return item


class CpuPipeline(_Component):
    """A pipeline with CPU work on its items (say, a text signature)."""

    def process_item(self, item):
        spider = self.crawler.spider
        if spider.blocks(item["id"], "pipeline_cpu"):
            burn_cpu(spider.ms)
        return item


class HashingMiddleware(_Component):
    """A downloader middleware with CPU work (say, checking a page's hash)."""

    def process_response(self, request, response):
        spider = self.crawler.spider
        if spider.blocks(request.cb_kwargs["id"], "middleware"):
            burn_cpu(spider.ms)
        return response


class CheckingSpiderMiddleware(_Component):
    """A spider middleware that checks every item (CPU work)."""

    async def process_spider_output(self, response, result):
        async for item_or_request in result:
            if isinstance(item_or_request, dict) and self.crawler.spider.blocks(
                    item_or_request["id"], "spidermw"):
                burn_cpu(self.crawler.spider.ms)
            yield item_or_request


class TallyExtension(_Component):
    """An extension whose signal handler does CPU work."""

    def __init__(self, crawler):
        super().__init__(crawler)
        crawler.signals.connect(self.item_scraped, signal=signals.item_scraped)

    def item_scraped(self, item):
        if self.crawler.spider.blocks(item["id"], "extension"):
            burn_cpu(self.crawler.spider.ms)
