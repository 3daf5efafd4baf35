"""Make a crawl's outcome readable by the tests: stats as JSON, item outcomes counted."""

from __future__ import annotations

import json
import os

from scrapy import signals
from scrapy.statscollectors import MemoryStatsCollector


class JsonStatsCollector(MemoryStatsCollector):
    def _persist_stats(self, stats):
        path = self._crawler.settings.get("TEST_STATS_FILE") or os.environ.get("TEST_STATS_FILE")
        if path:
            with open(path, "w") as f:
                json.dump(stats, f, default=str)


class ItemOutcomes:
    """Scrapy counts scraped and dropped items, not items that errored."""

    def __init__(self, crawler):
        self.stats = crawler.stats
        crawler.signals.connect(self.item_error, signal=signals.item_error)

    @classmethod
    def from_crawler(cls, crawler):
        return cls(crawler)

    def item_error(self, item, response, spider, failure):
        self.stats.inc_value("test/item_error_count")
        self.stats.inc_value(f"test/item_error/{type(failure.value).__name__}")
