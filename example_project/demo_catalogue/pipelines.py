from __future__ import annotations

import json
import urllib.request
from typing import TYPE_CHECKING, Any

from scrapy.exceptions import NotConfigured

from demo_catalogue.minhash import signature, similarity
from scrapy_speedup import blocking

if TYPE_CHECKING:
    from scrapy.crawler import Crawler


class MinHashPipeline:
    """Adds the MinHash signature of the product description: ~10 ms of pure
    Python per item. Listed in SPEEDUP_PROCESS_PIPELINES, it runs in workers,
    unchanged."""

    def __init__(self, crawler: Crawler) -> None:
        self.stats = crawler.stats

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> MinHashPipeline:
        return cls(crawler)

    def process_item(self, item: dict[str, Any]) -> dict[str, Any]:
        item["signature"] = signature(item["description"])
        self.stats.inc_value("demo/signatures")
        return item


class NearDuplicatePipeline:
    """Marks products whose description is a near duplicate of one seen before,
    with locality-sensitive hashing over the signature bands. Cheap dictionary
    work on shared state: it stays inline."""

    BANDS = 20  # 4 rows per band: pairs above ~0.6 similarity collide

    def __init__(self, crawler: Crawler) -> None:
        self.stats = crawler.stats
        self.buckets: dict[tuple[int, tuple[int, ...]], dict[str, Any]] = {}

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> NearDuplicatePipeline:
        return cls(crawler)

    def process_item(self, item: dict[str, Any]) -> dict[str, Any]:
        sig = item["signature"]
        rows = len(sig) // self.BANDS
        for band in range(self.BANDS):
            key = (band, tuple(sig[band * rows : (band + 1) * rows]))
            seen = self.buckets.setdefault(key, item)
            if seen is not item and similarity(sig, seen["signature"]) >= 0.5:
                item["near_duplicate_of"] = seen["url"]
                self.stats.inc_value("demo/near_duplicates")
                break
        return item


class ApiExportPipeline:
    """Sends each item to an HTTP API with a blocking client (urllib), the way
    many pipelines are written. Inline, every call freezes the reactor; see
    ThreadedApiExportPipeline for the fix. Set DEMO_API_URL to enable it."""

    def __init__(self, url: str) -> None:
        self.url = url

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> ApiExportPipeline:
        url = crawler.settings.get("DEMO_API_URL")
        if not url:
            raise NotConfigured("set DEMO_API_URL, e.g. http://127.0.0.1:8000/api/items")
        return cls(url)

    def store(self, item: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps({"url": item["url"], "title": item["title"]}).encode()
        request = urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            item["stored"] = json.load(response)["stored"]
        return item

    def process_item(self, item: dict[str, Any]) -> dict[str, Any]:
        return self.store(item)


class ThreadedApiExportPipeline(ApiExportPipeline):
    """The same blocking call, in scrapy-speedup's thread pool: one decorator."""

    @blocking(timeout=30)
    def process_item(self, item: dict[str, Any]) -> dict[str, Any]:
        return self.store(item)


class DeferToThreadApiExportPipeline(ApiExportPipeline):
    """The same call wrapped by hand in Twisted's deferToThread (the reactor's
    shared pool, sized by REACTOR_THREADPOOL_MAXSIZE): the benchmark's peer."""

    async def process_item(self, item: dict[str, Any]) -> dict[str, Any]:
        from scrapy.utils.defer import maybe_deferred_to_future
        from twisted.internet.threads import deferToThread

        result: dict[str, Any] = await maybe_deferred_to_future(deferToThread(self.store, item))
        return result
