"""A stats collector that writes the final stats as JSON (BENCH_STATS_FILE)."""

from __future__ import annotations

import json

from scrapy.statscollectors import MemoryStatsCollector


class JsonStatsCollector(MemoryStatsCollector):
    def _persist_stats(self, stats):
        path = self._crawler.settings.get("BENCH_STATS_FILE")
        if path:
            with open(path, "w") as f:
                json.dump(stats, f, default=str)
