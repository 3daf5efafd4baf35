"""In-process crawls for pytest-twisted tests: a real crawler with the add-on,
on the reactor that pytest-twisted runs (the asyncio reactor, see
pyproject.toml), against real HTTP servers listening on 127.0.0.1 in the same
reactor.

Write the tests as coroutines decorated with :func:`inprocess` (Scrapy's
``deferred_f_from_coro_f``: the coroutine runs as an asyncio task, and
pytest-twisted waits for it)::

    @inprocess
    async def test_something():
        with listening(MyResource()) as url:
            run = await crawl(MySpider, {"SPEEDUP_...": ...}, url=url)
        assert run.finish_reason == "finished"
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from scrapy import Spider, signals
from scrapy.crawler import Crawler
from scrapy.utils.defer import deferred_f_from_coro_f
from scrapy.utils.test import get_crawler
from twisted.internet import reactor as _reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

reactor: Any = _reactor

#: Decorates an ``async def`` test that runs on pytest-twisted's reactor.
inprocess = deferred_f_from_coro_f

#: Settings of every in-process crawl: the add-on, no telnet, quiet.
BASE_SETTINGS: dict[str, Any] = {
    "ADDONS": {"scrapy_speedup.Addon": 500},
    "TELNETCONSOLE_ENABLED": False,
    "LOG_LEVEL": "INFO",
    "ROBOTSTXT_OBEY": False,
}


@contextlib.contextmanager
def listening(resource: Resource) -> Iterator[str]:
    """Serve *resource* on 127.0.0.1 (a free port) in this reactor; yields its URL."""
    site = Site(resource)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        yield f"http://127.0.0.1:{port.getHost().port}"
    finally:
        port.stopListening()


@dataclass
class CrawlRun:
    """What an in-process crawl did."""

    crawler: Crawler
    items: list[Any] = field(default_factory=list)
    #: (item, exception) of each item_error.
    errors: list[tuple[Any, BaseException]] = field(default_factory=list)
    #: (response URL, exception) of each spider_error (a callback raised).
    spider_errors: list[tuple[str, BaseException]] = field(default_factory=list)

    @property
    def stats(self) -> dict[str, Any]:
        assert self.crawler.stats is not None
        return self.crawler.stats.get_stats()

    def stat(self, name: str) -> Any:
        return self.stats.get(name, 0)

    @property
    def finish_reason(self) -> str | None:
        return self.stats.get("finish_reason")


def make_crawler(spidercls: type[Spider], settings: dict[str, Any] | None = None) -> Crawler:
    return get_crawler(spidercls, {**BASE_SETTINGS, **(settings or {})})


async def crawl(
    spidercls: type[Spider],
    settings: dict[str, Any] | None = None,
    *,
    timeout: float = 60,
    during: Callable[[Crawler], Any] | None = None,
    **spider_kwargs: Any,
) -> CrawlRun:
    """Run a whole crawl of *spidercls* in this process; fails if it has not
    finished within *timeout* seconds (a hang is a failure, not a stuck test)."""
    crawler = make_crawler(spidercls, settings)
    run = CrawlRun(crawler)

    def on_item(item: Any) -> None:
        run.items.append(item)

    def on_error(item: Any, response: Any, spider: Any, failure: Any) -> None:
        run.errors.append((item, failure.value))

    def on_spider_error(failure: Any, response: Any, spider: Any) -> None:
        run.spider_errors.append((getattr(response, "url", ""), failure.value))

    # Signals hold weak references: these closures live as long as `run`.
    run._handlers = (on_item, on_error, on_spider_error)  # type: ignore[attr-defined]
    crawler.signals.connect(on_item, signal=signals.item_scraped)
    crawler.signals.connect(on_error, signal=signals.item_error)
    crawler.signals.connect(on_spider_error, signal=signals.spider_error)
    task = asyncio.ensure_future(crawler.crawl_async(**spider_kwargs))
    if during is not None:
        during(crawler)
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout)
    except TimeoutError:
        stats = crawler.stats.get_stats() if crawler.stats else {}
        with contextlib.suppress(Exception):
            await asyncio.wait_for(crawler.stop_async(), 10)
        raise AssertionError(f"the crawl still ran after {timeout} s; stats: {stats}") from None
    return run
