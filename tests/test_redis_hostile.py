"""Hostile inputs for the Redis frontier, in this process against a real
redis-server and a real local site: requests, servers and errors that a
crawl of a million pages meets, each of which stopped or stalled a machine."""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import scrapy

from scrapy_speedup.demo.site import CatalogueResource
from tests.inprocess import crawl, inprocess, listening
from tests.redis_server import RedisServer, redis_server

_names = itertools.count()


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with redis_server() as running:
        yield running


def frontier(url: str, **settings: Any) -> dict[str, Any]:
    """Settings of a machine of a crawl of its own on the Redis at *url*;
    an outage would be waited out far longer than any test runs."""
    return {"SPEEDUP_FRONTIER_URL": url, "SPEEDUP_FRONTIER_NAME": f"hostile{next(_names)}",
            "SPEEDUP_FRONTIER_MAX_OUTAGE_SECONDS": 600, **settings}


class Products(scrapy.Spider):
    name = "products"

    def __init__(self, url: str, priorities: list[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.url, self.priorities = url, priorities

    async def start(self) -> Any:
        for i, priority in enumerate(self.priorities):
            yield scrapy.Request(f"{self.url}/product/{i}.html", priority=priority)

    def parse(self, response: Any) -> Any:
        yield {"url": response.url}


@inprocess
async def test_a_priority_beyond_the_frontiers_range_does_not_stall_the_machine(
        server: RedisServer) -> None:
    """Scrapy takes any priority; the frontier orders +-4095. One request
    with priority 5000 made every tick fail, and the machine waited for
    Redis, which was there, for SPEEDUP_FRONTIER_MAX_OUTAGE_SECONDS."""
    with listening(CatalogueResource(20, 0.001)) as url:
        run = await crawl(Products, frontier(server.url), timeout=30, url=url,
                          priorities=[0, 5000, -10**6, 3])
    assert run.finish_reason == "finished"
    assert len(run.items) == 4
    assert run.stat("speedup/frontier/error_count") == 0


@inprocess
async def test_a_wrong_or_missing_password_stops_the_machine_with_the_reason(
        caplog: pytest.LogCaptureFixture) -> None:
    """Redis refuses the password at once; waiting does not cure that, so
    the machine says so and stops, where it waited the outage out (300 s by
    default) saying that Redis could not be reached."""
    with redis_server(password="s3cret") as server, \
            listening(CatalogueResource(20, 0.001)) as url:
        right = await crawl(Products, frontier(server.url), timeout=30, url=url,
                            priorities=[0, 0])
        assert right.finish_reason == "finished" and len(right.items) == 2
        for wrong in (server.url.replace("s3cret", "guess"),
                      server.url.replace(":s3cret@", "")):
            run = await crawl(Products, frontier(wrong), timeout=30, url=url, priorities=[0])
            assert run.finish_reason == "frontier_error"
            assert run.items == []
        assert caplog.text.count("Put the password in SPEEDUP_FRONTIER_URL") == 2, caplog.text
        assert "s3cret" not in caplog.text and "guess" not in caplog.text


class CuttingProxy:
    """A TCP proxy to Redis on 127.0.0.1 that passes the first command
    holding *marker* that Redis runs and drops the connection when Redis
    answers it: the command ran, its reply is lost, as when Redis restarts
    or the network breaks after a command left the machine."""

    def __init__(self, upstream_port: int, marker: bytes) -> None:
        self.upstream_port, self.marker = upstream_port, marker
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        self.cut = threading.Event()
        self._sent = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
                threading.Thread(target=self._pump, args=(client, upstream, True),
                                 daemon=True).start()
                threading.Thread(target=self._pump, args=(upstream, client, False),
                                 daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, to_redis: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                if to_redis and not self._sent.is_set() and self.marker in data:
                    self._sent.set()
                elif not to_redis and self._sent.is_set() and not self.cut.is_set():
                    if data.startswith(b"-"):  # NOSCRIPT: it did not run
                        self._sent.clear()
                        target.sendall(data)
                        continue
                    self.cut.set()  # the reply: never delivered
                    for end in (source, target):
                        end.shutdown(socket.SHUT_RDWR)
                    return
                target.sendall(data)
        for end in (source, target):
            with contextlib.suppress(OSError):
                end.close()

    def close(self) -> None:
        self.listener.close()


class Repeats(scrapy.Spider):
    """Requests that Scrapy's dupefilter lets through (dont_filter): the
    frontier queues each as often as it is sent."""

    name = "repeats"

    def __init__(self, url: str, count: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.url, self.count = url, count

    async def start(self) -> Any:
        for i in range(self.count):
            yield scrapy.Request(f"{self.url}/product/{i}.html?marker=cut-here",
                                 dont_filter=True)

    def parse(self, response: Any) -> Any:
        yield {"url": response.url}


@inprocess
async def test_a_tick_whose_reply_is_lost_is_not_done_twice(server: RedisServer) -> None:
    """redis-py sends a command again when its connection drops (the link's
    Retry): a tick that Redis ran but whose reply was lost ran twice. Its
    dont_filter requests were queued twice (crawled twice), and the leases
    of the first run were out to nobody until the visibility timeout."""
    proxy = CuttingProxy(server.port, b"cut-here")
    try:
        with listening(CatalogueResource(20, 0.001)) as url:
            run = await crawl(Repeats, frontier(proxy.url,
                                                SPEEDUP_FRONTIER_VISIBILITY_TIMEOUT_SECONDS=20),
                              timeout=15, url=url, count=5)
    finally:
        proxy.close()
    assert proxy.cut.is_set()
    assert run.finish_reason == "finished"
    assert sorted(item["url"] for item in run.items) == sorted(
        f"{url}/product/{i}.html?marker=cut-here" for i in range(5))
    assert run.stat("speedup/frontier/lease_expired_count") == 0


@inprocess
async def test_a_machine_that_died_in_the_last_run_does_not_carry_its_counts_over(
        server: RedisServer) -> None:
    """The first machine of a run starts the crawl's counts, start time and
    closing reason afresh. A machine of the last run that was killed (kill -9,
    Ctrl-C twice) never left P:machines, so the next run did not count as
    new: it closed at once with the last run's CLOSESPIDER_ITEMCOUNT reason."""
    import json
    import time

    import redis as redis_client

    settings = frontier(server.url, CLOSESPIDER_ITEMCOUNT=3)
    prefix = settings["SPEEDUP_FRONTIER_NAME"]
    client = redis_client.Redis.from_url(server.url)
    try:
        # What a run left that reached its limit and had a machine killed.
        client.hset(f"{prefix}:machines", "dead-machine", f"running|{time.time() - 60}")
        client.hset(f"{prefix}:ticked", "dead-machine", json.dumps(["token", 0, []]))
        client.hset(f"{prefix}:stats", "item_scraped_count", 3)
        client.set(f"{prefix}:started", time.time() - 3600)
        client.set(f"{prefix}:closing", "closespider_itemcount")
    finally:
        client.close()
    with listening(CatalogueResource(20, 0.001)) as url:
        run = await crawl(Products, settings, timeout=30, url=url, priorities=[0] * 10)
    assert run.finish_reason == "closespider_itemcount"
    assert len(run.items) >= 3, run.stats


@inprocess
async def test_counts_whose_reply_is_lost_are_added_once(server: RedisServer) -> None:
    """The machine adds its counts to the crawl's after its tick; when that
    reply was lost, redis-py sent the counts again and Redis added them
    twice: the crawl's item count ran ahead of its items, and
    CLOSESPIDER_ITEMCOUNT closed a crawl that had not reached it."""
    proxy = CuttingProxy(server.port, b"item_scraped_count")
    try:
        with listening(CatalogueResource(20, 0.001)) as url:
            run = await crawl(Products, frontier(proxy.url, CLOSESPIDER_ITEMCOUNT=21),
                              timeout=30, url=url, priorities=[0] * 20)
    finally:
        proxy.close()
    assert proxy.cut.is_set()
    assert run.finish_reason == "finished", run.stats
    assert len(run.items) == 20


class HoldingProxy(CuttingProxy):
    """Passes everything, except that once :attr:`armed`, the reply to the
    next command holding *marker* waits until :attr:`release` is set (a tick
    that Redis ran and whose reply is still on its way)."""

    def __init__(self, upstream_port: int, marker: bytes) -> None:
        super().__init__(upstream_port, marker)
        self.armed, self.holding, self.release = (threading.Event() for _ in range(3))

    def _pump(self, source: socket.socket, target: socket.socket, to_redis: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                if to_redis and self.armed.is_set() and not self.holding.is_set() \
                        and self.marker in data:
                    self.holding.set()
                elif not to_redis and self.holding.is_set() and not self.release.is_set():
                    self.release.wait(20)
                target.sendall(data)


@inprocess
async def test_a_tick_in_flight_when_the_machine_closes_leaves_nothing_leased(
        server: RedisServer) -> None:
    """The machine closes (Ctrl-C) while a tick is on its way back: what that
    tick leased (here a start URL pushed meanwhile) must go back with the
    rest. The close sent the leases it knew of and left that tick's to the
    visibility timeout (60 s, in which no machine crawls them)."""
    import asyncio
    import time

    import redis as redis_client

    settings = frontier(server.url, SPEEDUP_FRONTIER_WAIT_FOR_START_URLS_SECONDS="forever")
    name = settings["SPEEDUP_FRONTIER_NAME"]
    proxy = HoldingProxy(server.port, f"{name}:start_urls".encode())
    settings["SPEEDUP_FRONTIER_URL"] = proxy.url
    client = redis_client.Redis.from_url(server.url)

    async def stop_with_a_tick_in_flight(crawler: Any) -> None:
        deadline = time.monotonic() + 20
        while crawler.stats.get_value("item_scraped_count", 0) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        client.lpush(f"{name}:start_urls", f"{url}/product/7.html")
        proxy.armed.set()
        while not proxy.holding.is_set():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        stopping = asyncio.ensure_future(crawler.stop_async())
        scheduler = crawler.engine._slot.scheduler
        while not scheduler._closed:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        proxy.release.set()
        await stopping

    try:
        with listening(CatalogueResource(20, 0.001)) as url:
            run = await crawl(Products, settings, timeout=30, url=url, priorities=[0, 0],
                              during=lambda crawler: asyncio.ensure_future(
                                  stop_with_a_tick_in_flight(crawler)))
        assert run.finish_reason == "shutdown"
        assert len(run.items) == 2
        assert client.zcard(f"{name}:leases") == 0
        # The entry, or the request made of it, waits for the next run.
        assert int(client.get(f"{name}:queued") or 0) == 1
    finally:
        proxy.release.set()
        proxy.close()
        client.close()


class SlowClosingPipeline:
    """Its close takes a while, as a pipeline's that flushes a batch does."""

    def process_item(self, item: Any) -> Any:
        return item

    async def close_spider(self) -> None:
        import asyncio

        await asyncio.sleep(0.6)


@inprocess
async def test_a_closing_machine_leases_nothing_more(server: RedisServer) -> None:
    """Once its crawl closes (a limit, Ctrl-C), a machine would only hand
    back what it leased: while its pipelines closed it kept leasing as its
    pages in hand finished, holding their sites' places from the others."""
    with listening(CatalogueResource(200, 0.2)) as url:
        run = await crawl(Products, frontier(
            server.url, CONCURRENT_REQUESTS=4, CLOSESPIDER_ITEMCOUNT=1,
            ITEM_PIPELINES={SlowClosingPipeline: 300}), timeout=30, url=url,
            priorities=[0] * 60)
    assert run.finish_reason == "closespider_itemcount"
    # Leased before the close: the 4 downloads and a batch of 4 waiting.
    assert run.stat("speedup/frontier/leased_count") <= 2 * 4, run.stats
