from __future__ import annotations

import os
import time
from pathlib import Path

from testproj import faults


class FaultPipeline:
    """Listed in SPEEDUP_PROCESS_PIPELINES by the pipeline tests; inline otherwise."""

    def __init__(self, crawler):
        settings = crawler.settings
        self.stats = crawler.stats
        self.faults = settings.getdict("TEST_FAULTS")
        self.marker_dir = settings.get("TEST_MARKER_DIR")
        self.enabled = settings.getbool("TEST_PIPELINE_ENABLED", True)
        if settings.getbool("TEST_FAIL_FROM_CRAWLER"):
            raise RuntimeError("from_crawler failed on purpose")
        self.fail_open = settings.getbool("TEST_FAIL_OPEN")
        self.close_sleep_s = settings.getfloat("TEST_CLOSE_SLEEP_S")

    @classmethod
    def from_crawler(cls, crawler):
        return cls(crawler)

    def _mark(self, what):
        if self.marker_dir:
            Path(self.marker_dir, f"{what}-{os.getpid()}").touch()

    def open_spider(self, spider):
        if self.fail_open:
            raise RuntimeError("open_spider failed on purpose")
        self._mark("opened")
        self.spider_name = spider.name

    def process_item(self, item):
        if not self.enabled:
            return item
        self.stats.inc_value("test/pipeline_items")
        return faults.apply(item, self.faults, self.marker_dir)

    def close_spider(self):
        if self.close_sleep_s:  # a pipeline that flushes a buffer at close
            self._mark("closing")
            time.sleep(self.close_sleep_s)
        self.stats.inc_value("test/pipeline_closed")
        self._mark("closed")


class SeenOnce:
    """A crawl-wide pipeline: counts URLs it sees once and again, and the
    engine processes its items came from."""

    def __init__(self, crawler):
        self.stats = crawler.stats
        self.seen: set[str] = set()
        self.pids: set[int] = set()

    @classmethod
    def from_crawler(cls, crawler):
        return cls(crawler)

    def process_item(self, item):
        key = "test/seen_twice" if item["url"] in self.seen else "test/seen_once"
        self.seen.add(item["url"])
        self.pids.add(item["pid"])
        self.stats.inc_value(key)
        self.stats.set_value("test/seen_pids", len(self.pids))
        return item
