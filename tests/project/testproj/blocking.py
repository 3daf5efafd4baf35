"""Blocking calls for the thread-pool tests."""

from __future__ import annotations

import threading
import time

from scrapy_speedup import blocking

#: Set once the DNS lookup made while every pool thread waits has succeeded.
dns_checked = threading.Event()
_entered = 0
_entered_lock = threading.Lock()


def entered() -> int:
    return _entered


def wait_for_dns_check() -> str:
    global _entered  # noqa: PLW0603 - shared by the pool's threads, on purpose
    with _entered_lock:
        _entered += 1
    if not dns_checked.wait(30):
        raise TimeoutError("the DNS lookup never completed")
    return threading.current_thread().name


def slow_call(seconds: float, fault: str | None) -> str:
    """What a blocking driver does: wait. ``hang`` never returns."""
    if fault == "hang":
        threading.Event().wait()
    if fault == "raise":
        raise ConnectionError("the API refused the item")
    time.sleep(seconds)
    return threading.current_thread().name


class BlockingPipeline:
    """Its process_item blocks; @blocking sends it to the crawl's thread pool."""

    def __init__(self, crawler):
        self.seconds = crawler.settings.getfloat("TEST_BLOCK_SECONDS", 0.05)
        self.faults = crawler.settings.getdict("TEST_FAULTS")

    @classmethod
    def from_crawler(cls, crawler):
        return cls(crawler)

    @blocking
    def process_item(self, item):
        item["thread"] = slow_call(self.seconds, self.faults.get(str(item["id"])))
        return item
