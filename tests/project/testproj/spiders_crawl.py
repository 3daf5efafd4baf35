"""Spiders for the tests of engine processes (SPEEDUP_CRAWL_PROCESSES) and of
the frontier on Redis (SPEEDUP_FRONTIER_URL)."""

from __future__ import annotations

import os
import time
from urllib.parse import urlparse

import scrapy
from scrapy.exceptions import CloseSpider


class FollowSpider(scrapy.Spider):
    """Follows every link of the demo site from its home page: most links are
    to pages already seen (related products, the navigation). ``handle_ms``
    makes each callback block that long (pages downloaded wait their turn)."""

    name = "follow"
    custom_settings = {"ITEM_PIPELINES": {}}

    def __init__(self, site, close_at="", start_path="/", handle_ms="0", **kwargs):
        super().__init__(**kwargs)
        self.handle_s = float(handle_ms) / 1000
        self.site = site.rstrip("/")
        self.host = urlparse(self.site).netloc
        self.close_at = close_at
        self.start_path = start_path

    async def start(self):
        yield scrapy.Request(f"{self.site}{self.start_path}")

    def parse(self, response):
        if self.close_at and response.url.endswith(self.close_at):
            raise CloseSpider("asked_by_a_callback")
        if self.handle_s:
            time.sleep(self.handle_s)
        yield {"url": response.url, "title": response.css("title::text").get(),
               "pid": os.getpid()}
        for href in response.css("a::attr(href)").getall():
            url = response.urljoin(href)
            if urlparse(url).netloc == self.host:
                yield scrapy.Request(url)


class PagesSpider(scrapy.Spider):
    """``/page/0`` .. ``/page/count-1`` of the capacity site.

    ``again=1`` asks for each page a second time with ``dont_filter=True``
    (and a third time without it: filtered); ``lambdas=K`` has the callback
    of every K-th page ask for one more page with a lambda callback, which
    cannot leave its engine process; ``priority=1`` gives page n priority n."""

    name = "crawl_pages"
    custom_settings = {"ITEM_PIPELINES": {}}

    def __init__(self, site, count="50", again="0", lambdas="0", priority="0", **kwargs):
        super().__init__(**kwargs)
        self.site = site.rstrip("/")
        self.count = int(count)
        self.again = again == "1"
        self.lambdas = int(lambdas)
        self.priority = priority == "1"

    async def start(self):
        for n in range(self.count):
            prio = n if self.priority else 0
            yield scrapy.Request(f"{self.site}/page/{n}", cb_kwargs={"n": n}, priority=prio,
                                 meta={"sent_as": n}, flags=["test-flag"])
            if self.again:
                yield scrapy.Request(f"{self.site}/page/{n}", cb_kwargs={"n": n, "again": True},
                                     dont_filter=True)
                yield scrapy.Request(f"{self.site}/page/{n}", cb_kwargs={"n": n, "again": True})

    def parse(self, response, n, again=False):
        assert response.meta.get("sent_as", n) == n  # meta and cb_kwargs travel
        yield {"n": n, "again": again, "pid": os.getpid(),
               "flags": response.request.flags}
        if self.lambdas and n % self.lambdas == 0:
            m = self.count + n
            yield scrapy.Request(f"{self.site}/page/{m}", callback=lambda r: [{"n": m}])


class OffloadSpider(scrapy.Spider):
    """``/page/0`` .. ``/page/count-1``, each item made by run_in_process in
    the crawl's process pool (in an engine process: that engine's pool)."""

    name = "crawl_offload"
    custom_settings = {"ITEM_PIPELINES": {}}

    def __init__(self, site, count="40", **kwargs):
        super().__init__(**kwargs)
        self.site = site.rstrip("/")
        self.count = int(count)

    async def start(self):
        for n in range(self.count):
            yield scrapy.Request(f"{self.site}/page/{n}", cb_kwargs={"n": n})

    async def parse(self, response, n):
        from scrapy_speedup import run_in_process

        worker = await run_in_process(os.getpid)
        yield {"n": n, "pid": os.getpid(), "worker": worker}


class RedisStartSpider(scrapy.Spider):
    """A plain spider with no start requests of its own: with
    SPEEDUP_FRONTIER_URL its start URLs come from Redis
    (``<crawl>:start_urls``). Each page's item says what its request carried."""

    name = "redis_start"
    custom_settings = {"ITEM_PIPELINES": {}}

    def parse(self, response):
        yield {"url": response.url, "tag": response.meta.get("tag"),
               "priority": response.request.priority, "callback": "parse",
               "pid": os.getpid()}

    def parse_other(self, response):
        yield {"url": response.url, "tag": response.meta.get("tag"),
               "priority": response.request.priority, "callback": "parse_other",
               "pid": os.getpid()}


class RedisHookSpider(RedisStartSpider):
    """Start URLs in a format of its own, read by scrapy-redis's hook
    ``make_request_from_data``: each entry is ``<site>|<n>`` for the page
    ``<site>/page/<n>``. ``hang_at=<n>``: the hook blocks the reactor at that
    entry (after writing ``<hang_file>``), for a test to kill the machine
    between taking its start URLs and sending their requests."""

    name = "redis_hook"

    def __init__(self, hang_at="", hang_file="", **kwargs):
        super().__init__(**kwargs)
        self.hang_at = hang_at
        self.hang_file = hang_file

    def make_request_from_data(self, data):
        site, _, n = data.decode().partition("|")
        if n == self.hang_at:
            with open(self.hang_file, "w") as file:
                file.write(str(os.getpid()))
            time.sleep(300)  # the test kills this process meanwhile
        return scrapy.Request(f"{site}/page/{n}", meta={"tag": n})
