"""An extension for the benchmarks: how many pages the crawl holds while
their items wait (the item pipelines, the process pool's included).

Every 0.2 s it records, in ``bench/scraper_active_max``, the most responses
in Scrapy's scraper at once: downloaded, and not yet done with (their
callbacks' output, items included, still being processed).
"""

from __future__ import annotations

from scrapy import signals
from scrapy.utils.asyncio import create_looping_call


class PagesAhead:
    def __init__(self, crawler):
        self.crawler = crawler
        self.loop = create_looping_call(self.sample)
        crawler.signals.connect(self.opened, signal=signals.spider_opened)
        crawler.signals.connect(self.closed, signal=signals.spider_closed)

    @classmethod
    def from_crawler(cls, crawler):
        return cls(crawler)

    def opened(self):
        self.loop.start(0.2)

    def closed(self):
        if self.loop.running:
            self.loop.stop()

    def sample(self):
        engine = self.crawler.engine
        slot = engine.scraper.slot if engine is not None else None
        if slot is not None:
            self.crawler.stats.max_value("bench/scraper_active_max", len(slot.active))
