from __future__ import annotations

import asyncio

import scrapy
from scrapy.utils.asyncio import sleep

from scrapy_speedup import run_in_thread
from testproj import blocking
from testproj.spiders_doctor import burn_cpu


class BlockingSpider(scrapy.Spider):
    """Products 0..count-1; each item makes a blocking call: ``mode=call``
    (run_in_thread from the callback) or ``mode=pipeline`` (@blocking
    BlockingPipeline, enabled by the test)."""

    name = "blocking"
    custom_settings = {"ITEM_PIPELINES": {}}

    def __init__(self, site, count="20", mode="call", **kwargs):
        super().__init__(**kwargs)
        self.site, self.count, self.mode = site.rstrip("/"), int(count), mode

    async def start(self):
        for i in range(self.count):
            yield scrapy.Request(f"{self.site}/product/{i}.html", cb_kwargs={"id": i})

    async def parse(self, response, id):
        item = {"id": id, "url": response.url, "tags": ["product", f"p{id}"]}
        if self.mode == "call":
            settings = self.crawler.settings
            fault = settings.getdict("TEST_FAULTS").get(str(id))
            item["thread"] = await run_in_thread(
                blocking.slow_call, settings.getfloat("TEST_BLOCK_SECONDS", 0.05), fault
            )
        yield item


class DnsSpider(scrapy.Spider):
    """Fills every pool thread with a call that waits, then resolves a name
    through the crawl's resolver: it must answer, or the calls never end."""

    name = "dns"
    custom_settings = {"ITEM_PIPELINES": {}}

    def __init__(self, site, threads, **kwargs):
        super().__init__(**kwargs)
        self.site, self.threads = site.rstrip("/"), int(threads)

    async def start(self):
        for i in range(self.threads + 1):
            yield scrapy.Request(f"{self.site}/product/{i}.html", cb_kwargs={"id": i})

    async def parse(self, response, id):
        if id < self.threads:
            thread = await run_in_thread(blocking.wait_for_dns_check)
            yield {"id": id, "thread": thread}
            return
        for _ in range(500):  # wait until every pool thread is taken (<= 5 s)
            if blocking.entered() == self.threads:
                break
            await sleep(0.01)
        assert blocking.entered() == self.threads, blocking.entered()
        address = await self.resolve("localhost", timeout=10)
        blocking.dns_checked.set()
        yield {"id": id, "resolved": address, "pool_threads_busy": blocking.entered()}

    async def resolve(self, host: str, timeout: float) -> str:
        """Through the reactor's resolver (its thread pool), or the loop's
        getaddrinfo (its default executor) when there is no reactor."""
        from scrapy.utils.reactor import is_reactor_installed

        if is_reactor_installed():
            from scrapy.utils.defer import maybe_deferred_to_future
            from twisted.internet import reactor

            lookup = reactor.resolve(host).addTimeout(timeout, reactor)
            return await maybe_deferred_to_future(lookup)
        infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(host, 80), timeout)
        return infos[0][4][0]


class PagesSpider(scrapy.Spider):
    """``/page/0`` .. ``/page/count-1`` of a capacity site, all at once;
    each page costs ``cpu_ms`` of CPU in the callback (a slow machine)."""

    name = "pages"
    custom_settings = {"ITEM_PIPELINES": {}}

    def __init__(self, site, count="300", cpu_ms="0", **kwargs):
        super().__init__(**kwargs)
        self.site, self.count = site.rstrip("/"), int(count)
        self.cpu_ms = float(cpu_ms)

    async def start(self):
        for i in range(self.count):
            yield scrapy.Request(f"{self.site}/page/{i}")

    def parse(self, response):
        if self.cpu_ms:
            burn_cpu(self.cpu_ms)
        yield {"url": response.url}
