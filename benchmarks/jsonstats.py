"""A stats collector that writes the final stats as JSON (BENCH_STATS_FILE)."""

from __future__ import annotations

import json
import time

from scrapy.statscollectors import MemoryStatsCollector


class JsonStatsCollector(MemoryStatsCollector):
    """Also records ``bench/crawl_seconds``: from the crawler's stats collector
    being built (right after the add-ons ran, before extensions, pipelines and
    scrapy-speedup's pool start) to the spider's close, so that it leaves out
    only the interpreter's start and imports, the same for every run."""

    def __init__(self, crawler):
        super().__init__(crawler)
        self._built = time.monotonic()

    def _persist_stats(self, stats):
        stats["bench/crawl_seconds"] = time.monotonic() - self._built
        path = self._crawler.settings.get("BENCH_STATS_FILE")
        if path:
            with open(path, "w") as f:
                json.dump(stats, f, default=str)
