"""Spiders and a pipeline for benchmarks/bench_redis_frontier.py.

Every run writes its items through :class:`StampPipeline`: one JSON line per
item, written through at once, with the time it was scraped, so that the
benchmark can see the crawl's progress from outside (and kill a process
mid-crawl) and measure every configuration's span the same way: launch to
the last page scraped.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from scrapy_redis.spiders import RedisMixin

from demo_catalogue.spiders.links import LinksSpider

if TYPE_CHECKING:
    from scrapy.crawler import Crawler


class StampPipeline:
    def __init__(self, path: str) -> None:
        self.file = open(path, "a", buffering=1)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> StampPipeline:
        return cls(crawler.settings["BENCH_ITEMS_FILE"])

    def process_item(self, item: dict[str, Any]) -> dict[str, Any]:
        self.file.write(json.dumps({**item, "at": time.time()}) + "\n")
        return item

    def close_spider(self) -> None:
        self.file.close()


class StampedLinksSpider(LinksSpider):
    """The link-graph crawl of ``scrapy crawl links``, its items stamped."""

    name = "links_stamped"
    custom_settings = {**LinksSpider.custom_settings,
                       "ITEM_PIPELINES": {"frontier_spiders.StampPipeline": 900}}


class ScrapyRedisLinksSpider(RedisMixin, StampedLinksSpider):
    """The same crawl as scrapy-redis users write it: its start() yields the
    root (each process's copy but one is dropped by the shared dupefilter),
    and RedisMixin keeps the spider open while it is idle (it waits for more
    work, as a RedisSpider does; the benchmark stops it once every page is
    in, or once none comes any more)."""

    name = "links_scrapy_redis"

    @classmethod
    def from_crawler(cls, crawler: Crawler, *args: Any, **kwargs: Any) -> ScrapyRedisLinksSpider:
        spider = super().from_crawler(crawler, *args, **kwargs)
        spider.setup_redis(crawler)
        return spider
