"""An extension that records a crawl's timeline (BENCH_TIMELINE_FILE), for charts.

Every download as it comes off the wire (``response_downloaded``: before the
downloader middlewares, so the 503s that the adaptive middleware retries are
seen too), as ``[seconds, status]``, and every 0.1 s the concurrency of the
slot ``BENCH_TIMELINE_SLOT`` (the adaptive limit, when adaptive concurrency is
on) and the number of its requests in flight.
Time 0 is when the first request reached the downloader, which is when the
capacity server starts its clock for ``--halve-after-s``.
"""

from __future__ import annotations

import json
import time

from scrapy import signals
from scrapy.utils.asyncio import create_looping_call


class Timeline:
    def __init__(self, crawler):
        self.crawler = crawler
        self.path = crawler.settings["BENCH_TIMELINE_FILE"]
        self.slot = crawler.settings.get("BENCH_TIMELINE_SLOT", "127.0.0.1")
        self.t0: float | None = None
        self.downloads: list[tuple[float, int]] = []
        self.samples: list[tuple[float, int | None, int]] = []
        self.loop = create_looping_call(self.sample)
        crawler.signals.connect(self.request_reached, signals.request_reached_downloader)
        crawler.signals.connect(self.response_downloaded, signals.response_downloaded)
        crawler.signals.connect(self.spider_opened, signals.spider_opened)
        crawler.signals.connect(self.spider_closed, signals.spider_closed)

    @classmethod
    def from_crawler(cls, crawler):
        return cls(crawler)

    def now(self) -> float:
        return round(time.monotonic() - (self.t0 or time.monotonic()), 4)

    def request_reached(self, request, spider):
        if self.t0 is None:
            self.t0 = time.monotonic()

    def response_downloaded(self, response, request, spider):
        self.downloads.append((self.now(), response.status))

    def spider_opened(self, spider):
        self.loop.start(0.1)

    def sample(self):
        if self.t0 is None:
            return
        # The middleware sets the slot's concurrency: that is the adaptive limit.
        slot = self.crawler.engine.downloader.slots.get(self.slot)
        limit = slot.concurrency if slot else None
        in_flight = len(slot.transferring) if slot else 0
        self.samples.append((self.now(), limit, in_flight))

    def spider_closed(self, spider):
        if self.loop.running:
            self.loop.stop()
        with open(self.path, "w") as f:
            json.dump({"downloads": self.downloads, "samples": self.samples}, f)
