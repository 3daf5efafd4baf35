"""Functions that the process-pool tests run in worker processes (they must
be importable by the workers): well-behaved ones, and ones that misbehave on
purpose."""

from __future__ import annotations

import hashlib
import os
import struct
import time
from typing import Any

import scrapy

from scrapy_speedup import run_in_process
from scrapy_speedup.process import worker


class PriceError(Exception):
    """An exception class with required arguments: it pickles, but cannot be
    rebuilt from its ``args`` (a classic that users return as values)."""

    def __init__(self, amount: int, currency: str) -> None:
        super().__init__(f"bad price {amount} {currency}")
        self.amount, self.currency = amount, currency


def burn(ms: float) -> None:
    deadline = time.thread_time() + ms / 1000
    while time.thread_time() < deadline:
        hashlib.sha256(b"x" * 512).digest()


def _socket_fd() -> int:
    assert worker.current is not None, "not in a worker process"
    return worker.current.channel.conn.fileno()


def task(i: int, fault: str = "", ms: float = 0.0) -> dict[str, Any]:
    """What each page of :class:`OffloadSpider` runs in a worker; *fault* says
    how page ``fault_at`` misbehaves."""
    if ms:
        burn(ms)
    if fault == "exception_value":
        return {"id": i, "problems": [PriceError(10, "EUR")]}
    if fault == "unknown_kind":
        os.write(_socket_fd(), struct.pack("!i", 5) + b"Zjunk")
        time.sleep(60)  # ended by the crawl long before
    if fault == "huge_frame":
        os.write(_socket_fd(), struct.pack("!i", -1) + struct.pack("!Q", 2**63))
        time.sleep(60)
    if fault == "truncated_then_exit":
        os.write(_socket_fd(), struct.pack("!i", 100) + b"R" + b"\0" * 9)
        os._exit(3)
    if fault == "big_result":
        return {"id": i, "blob": os.urandom(3 * 2**20)}
    return {"id": i, "pid": os.getpid()}


class OffloadSpider(scrapy.Spider):
    """``count`` pages of a local server; each page's item comes from
    :func:`task` in the process pool; page *fault_at* gets *fault*."""

    name = "offload"

    def __init__(self, url: str, count: int, fault: str = "", fault_at: int = -1,
                 ms: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.url, self.count = url, count
        self.fault, self.fault_at, self.ms = fault, fault_at, ms

    async def start(self):
        for i in range(self.count):
            yield scrapy.Request(f"{self.url}/product/{i}.html", cb_kwargs={"i": i})

    async def parse(self, response, i):
        fault = self.fault if i == self.fault_at else ""
        yield await run_in_process(task, i, fault, self.ms)


class OddStatsPipeline:
    """Counts into a stat that the crawl holds as a string: the worker's
    change cannot be applied in the crawl (a TypeError there)."""

    def __init__(self, crawler: Any) -> None:
        self.stats = crawler.stats

    @classmethod
    def from_crawler(cls, crawler: Any) -> OddStatsPipeline:
        return cls(crawler)

    def process_item(self, item: Any) -> Any:
        self.stats.inc_value("test/odd")
        self.stats.inc_value("test/fine")
        return item


class OddStatsSpider(scrapy.Spider):
    name = "odd_stats"

    def __init__(self, url: str, count: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.url, self.count = url, count

    async def start(self):
        self.crawler.stats.set_value("test/odd", "not a number")
        for i in range(self.count):
            yield scrapy.Request(f"{self.url}/product/{i}.html", cb_kwargs={"i": i})

    def parse(self, response, i):
        yield {"id": i}


def noisy_or_odd(i: int, how: str = "") -> dict[str, Any]:
    """Page 3 misbehaves in a way that must cost nothing but what it says."""
    import logging

    if i == 3 and how == "huge_log":
        logging.getLogger("tests.process_tasks").warning("x" * (3 * 2**20))
    if i == 3 and how == "huge_frame_then_return":
        os.write(_socket_fd(), struct.pack("!i", -1) + struct.pack("!Q", 2**63))
    if i == 3 and how in ("system_exit", "keyboard_interrupt", "base_exception"):
        raise {"system_exit": SystemExit(3), "keyboard_interrupt": KeyboardInterrupt(),
               "base_exception": OddBaseException("odd")}[how]
    if how == "slow":
        time.sleep(1.0)
    return {"id": i, "pid": os.getpid()}


class OddBaseException(BaseException):
    pass


class NoisySpider(scrapy.Spider):
    name = "noisy"

    def __init__(self, url: str, count: int, how: str = "", wait_s: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.url, self.count, self.how, self.wait_s = url, count, how, wait_s

    async def start(self):
        for i in range(self.count):
            yield scrapy.Request(f"{self.url}/product/{i}.html", cb_kwargs={"i": i})

    async def parse(self, response, i):
        import asyncio

        call = run_in_process(noisy_or_odd, i, self.how)
        if self.wait_s:
            # The caller gives up: the task must not run, or not hold anything.
            try:
                yield await asyncio.wait_for(call, self.wait_s)
            except TimeoutError:
                yield {"id": i, "gave_up": True}
            return
        yield await call


class BufferingPipeline:
    """Writes its items at spider_closed, connected in from_crawler (a common
    pattern); counts spider_opened. Used in SPEEDUP_PROCESS_PIPELINES."""

    def __init__(self, crawler: Any) -> None:
        from scrapy import signals

        self.path = crawler.settings["TEST_BUFFER_DIR"]
        self.rows: list[Any] = []
        self.opened = False
        crawler.signals.connect(self.spider_opened, signal=signals.spider_opened)
        crawler.signals.connect(self.spider_closed, signal=signals.spider_closed)

    @classmethod
    def from_crawler(cls, crawler: Any) -> BufferingPipeline:
        return cls(crawler)

    def spider_opened(self, spider: Any) -> None:
        self.opened = True

    async def spider_closed(self, spider: Any, reason: str) -> None:
        import json
        from pathlib import Path

        lines = [json.dumps({**row, "opened": self.opened, "reason": reason})
                 for row in self.rows]
        Path(self.path, f"rows-{os.getpid()}.jsonl").write_text("".join(f"{x}\n" for x in lines))

    def process_item(self, item: Any) -> Any:
        self.rows.append({"id": item["id"]})
        return item


class UnpicklableStatsPipeline:
    def __init__(self, crawler: Any) -> None:
        self.stats = crawler.stats

    @classmethod
    def from_crawler(cls, crawler: Any) -> UnpicklableStatsPipeline:
        return cls(crawler)

    def process_item(self, item: Any) -> Any:
        if item["id"] == 2:
            self.stats.set_value("test/odd_value", lambda: 1)
        self.stats.inc_value("test/seen")
        return item


class StartItemsSpider(scrapy.Spider):
    """Items straight from start(): they bypass the downloader."""

    name = "start_items"

    def __init__(self, count: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.count = count

    async def start(self):
        for i in range(self.count):
            yield {"id": i, "text": "x" * 1000}


class SlowPipeline:
    def __init__(self, crawler: Any) -> None:
        pass

    @classmethod
    def from_crawler(cls, crawler: Any) -> SlowPipeline:
        return cls(crawler)

    def process_item(self, item: Any) -> Any:
        burn(5)
        return item


class PlainSpider(scrapy.Spider):
    """One item per page, for the pipelines under test."""

    name = "plain"

    def __init__(self, url: str, count: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.url, self.count = url, count

    async def start(self):
        for i in range(self.count):
            yield scrapy.Request(f"{self.url}/product/{i}.html", cb_kwargs={"i": i})

    def parse(self, response, i):
        yield {"id": i}
