"""Hostile inputs for the Redis frontier, in this process against a real
redis-server and a real local site: requests, servers and errors that a
crawl of a million pages meets, each of which stopped or stalled a machine."""

from __future__ import annotations

import itertools
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
