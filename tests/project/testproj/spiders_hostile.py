"""Spiders for the hostile tests of engine processes (SPEEDUP_CRAWL_PROCESSES):
tests/test_crawl_processes_hostile.py. Each takes the site to crawl as ``-a site=``
(the test's own server, see that file)."""

from __future__ import annotations

import os
import signal
import threading

import scrapy
from scrapy import signals
from scrapy.exceptions import DontCloseSpider, IgnoreRequest
from scrapy.http import HtmlResponse


class _Base(scrapy.Spider):
    custom_settings = {"ITEM_PIPELINES": {}}

    def __init__(self, site, count="10", **kwargs):
        super().__init__(**kwargs)
        self.site = site.rstrip("/")
        self.count = int(count)


class ErrbackSpider(_Base):
    """Requests that fail to download (a refused port, a 500 after retries, a
    404) each have an errback, which yields one item: it must run once per
    failing request, in an engine."""

    name = "h_errback"

    def __init__(self, site, refused, **kwargs):
        super().__init__(site, **kwargs)
        self.refused = refused.rstrip("/")

    async def start(self):
        for n in range(self.count):
            yield scrapy.Request(f"{self.refused}/page/{n}", errback=self.failed,
                                 cb_kwargs={"kind": "refused"})
            yield scrapy.Request(f"{self.site}/status/500/{n}", errback=self.failed,
                                 cb_kwargs={"kind": "500"})
            yield scrapy.Request(f"{self.site}/status/404/{n}", errback=self.failed,
                                 cb_kwargs={"kind": "404"})
            yield scrapy.Request(f"{self.site}/page/{n}", cb_kwargs={"kind": "ok"},
                                 errback=self.failed)

    def parse(self, response, kind):
        yield {"kind": kind, "url": response.url, "errback": False, "pid": os.getpid()}

    def failed(self, failure):
        request = failure.request
        yield {"kind": request.cb_kwargs.get("kind"), "url": request.url, "errback": True,
               "error": type(failure.value).__name__, "pid": os.getpid()}


class IdleSpider(_Base):
    """scrapy-redis style: a spider_idle handler feeds more requests
    (``crawler.engine.crawl``) and keeps the spider open (DontCloseSpider),
    ``batches`` times; then the crawl ends."""

    name = "h_idle"

    def __init__(self, site, batches="3", **kwargs):
        super().__init__(site, **kwargs)
        self.batches = int(batches)
        self.fed = 0

    @classmethod
    def from_crawler(cls, crawler, *args, **kwargs):
        spider = super().from_crawler(crawler, *args, **kwargs)
        crawler.signals.connect(spider.idle, signal=signals.spider_idle)
        return spider

    async def start(self):
        yield scrapy.Request(f"{self.site}/page/0")

    def idle(self, spider):
        if self.fed >= self.batches:
            return
        self.fed += 1
        for n in range(self.count):
            self.crawler.engine.crawl(scrapy.Request(f"{self.site}/page/{self.fed}-{n}"))
        raise DontCloseSpider

    def parse(self, response):
        yield {"url": response.url, "pid": os.getpid()}


class StateSpider(_Base):
    """Uses ``self.state``, which Scrapy gives a spider with JOBDIR (and
    persists across runs)."""

    name = "h_state"

    async def start(self):
        for n in range(self.count):
            yield scrapy.Request(f"{self.site}/page/{n}")

    def parse(self, response):
        self.state["pages"] = self.state.get("pages", 0) + 1
        yield {"url": response.url, "pid": os.getpid()}


class LoginSpider(_Base):
    """Logs in (the site sets a session cookie), then crawls pages that need
    the cookie: Scrapy's cookie middleware sends it with every request."""

    name = "h_login"

    async def start(self):
        yield scrapy.Request(f"{self.site}/login", callback=self.logged_in)

    def logged_in(self, response):
        for n in range(self.count):
            yield scrapy.Request(f"{self.site}/private/{n}", callback=self.private,
                                 errback=self.denied)

    def private(self, response):
        yield {"url": response.url, "ok": True, "pid": os.getpid()}

    def denied(self, failure):
        yield {"url": failure.request.url, "ok": False, "pid": os.getpid()}


class KillerSpider(_Base):
    """The callback of one page kills its own process, each time it gets it."""

    name = "h_killer"

    def __init__(self, site, kill_at="3", kills="0", kill_dir="", **kwargs):
        super().__init__(site, **kwargs)
        self.kill_at = f"/page/{kill_at}"
        # kills=K (with kill_dir): only the first K times, counted in files.
        self.kills = int(kills)
        self.kill_dir = kill_dir

    def _kill_now(self):
        if not self.kills:
            return True
        done = len(os.listdir(self.kill_dir))
        if done >= self.kills:
            return False
        with open(os.path.join(self.kill_dir, str(os.getpid())), "w"):
            pass
        return True

    async def start(self):
        for n in range(self.count):
            yield scrapy.Request(f"{self.site}/page/{n}")

    def parse(self, response):
        if response.url.endswith(self.kill_at) and self._kill_now():
            os.kill(os.getpid(), signal.SIGKILL)
        yield {"url": response.url, "pid": os.getpid()}


class SpinSpider(_Base):
    """The callback of one page never returns (a CPU loop); the others are
    fine. Writes a marker file when it starts spinning."""

    name = "h_spin"

    def __init__(self, site, marker, spin_at="0", **kwargs):
        super().__init__(site, **kwargs)
        self.spin_at = f"/page/{spin_at}"
        self.marker = marker

    async def start(self):
        for n in range(self.count):
            yield scrapy.Request(f"{self.site}/page/{n}")

    def parse(self, response):
        if response.url.endswith(self.spin_at):
            with open(self.marker, "w") as f:
                f.write(str(os.getpid()))
            while True:
                pass
        yield {"url": response.url, "pid": os.getpid()}


class StartUrlsSpider(scrapy.Spider):
    """start_urls only: Scrapy's default start(); a callback that yields
    items only, one of which cannot be pickled (a lock)."""

    name = "h_start_urls"
    custom_settings = {"ITEM_PIPELINES": {}}

    def __init__(self, site, count="10", lock_at="-1", **kwargs):
        super().__init__(**kwargs)
        self.start_urls = [f"{site.rstrip('/')}/page/{n}" for n in range(int(count))]
        self.lock_at = f"/page/{lock_at}"

    def parse(self, response):
        item = {"url": response.url, "pid": os.getpid()}
        if response.url.endswith(self.lock_at):
            item["lock"] = threading.Lock()
        yield item


class FakeResponseMiddleware:
    """A downloader middleware that answers ``/fake/`` itself (as a cache
    does) and refuses ``/ignore/`` (IgnoreRequest)."""

    def process_request(self, request):
        if "/fake/" in request.url:
            return HtmlResponse(request.url, body=b"<html>fake</html>", request=request)
        if "/ignore/" in request.url:
            raise IgnoreRequest("ignored on purpose")
        return None


class MiddlewareSpider(_Base):
    name = "h_dmw"
    custom_settings = {
        "ITEM_PIPELINES": {},
        "DOWNLOADER_MIDDLEWARES": {"testproj.spiders_hostile.FakeResponseMiddleware": 100},
    }

    async def start(self):
        for n in range(self.count):
            for kind in ("fake", "ignore", "page"):
                yield scrapy.Request(f"{self.site}/{kind}/{n}", errback=self.failed,
                                     cb_kwargs={"kind": kind})

    def parse(self, response, kind):
        yield {"kind": kind, "url": response.url, "errback": False}

    def failed(self, failure):
        yield {"kind": failure.request.cb_kwargs["kind"], "url": failure.request.url,
               "errback": True, "error": type(failure.value).__name__}


class OddRequestSpider(_Base):
    """POST with a large body, bytes in meta and cb_kwargs, non-ASCII URLs,
    headers: what reaches the site and the callback must be what was sent."""

    name = "h_odd"

    def __init__(self, site, body_kb="512", **kwargs):
        super().__init__(site, **kwargs)
        self.body = os.urandom(int(body_kb) * 1024 // 2).hex().encode()

    async def start(self):
        for n in range(self.count):
            yield scrapy.Request(
                f"{self.site}/echo/{n}/é?q=日本&n={n}", method="POST", body=self.body,
                headers={"X-Test": f"h{n}"}, meta={"raw": b"\x00\xff" * 3, "n": n},
                cb_kwargs={"blob": bytes([n]) * 5}, priority=n,
            )

    def parse(self, response, blob):
        n = response.meta["n"]
        yield {"n": n, "meta_ok": response.meta["raw"] == b"\x00\xff" * 3,
               "blob_ok": blob == bytes([n]) * 5, "echo": response.text,
               "body_len": len(response.request.body)}


class ProcessSpider(_Base):
    """run_in_process in a callback of an engine process."""

    name = "h_process"

    async def start(self):
        for n in range(self.count):
            yield scrapy.Request(f"{self.site}/page/{n}", cb_kwargs={"n": n})

    async def parse(self, response, n):
        from scrapy_speedup import run_in_process

        yield {"n": n, "square": await run_in_process(pow, n, 2), "pid": os.getpid()}


class PagesSpider(_Base):
    """``/page/0`` .. ``/page/count-1``, one item each."""

    name = "h_pages"

    async def start(self):
        for n in range(self.count):
            yield scrapy.Request(f"{self.site}/page/{n}", cb_kwargs={"n": n})

    def parse(self, response, n):
        yield {"n": n, "url": response.url, "pid": os.getpid()}


class LazyStartSpider(PagesSpider):
    """Scrapy's recipe for a start() read as the crawl has room
    (:ref:`start-requests-lazy`): before each start request, wait while the
    engine backs out. The most requests the scheduler held meanwhile is in
    the stats (``lazy/scheduled_max``)."""

    name = "h_lazy_start"

    async def start(self):
        async for request in super().start():
            if self.crawler.engine.needs_backout():
                await self.crawler.signals.wait_for(signals.scheduler_empty)
            scheduler = self.crawler.engine._slot.scheduler
            self.crawler.stats.max_value("lazy/scheduled_max", len(scheduler))
            yield request


class ChainSpider(_Base):
    """Page n links to page n + 1 only. The engine's pipeline holds page n's
    item until page n + 1 has been parsed (a file in ``mark_dir`` says so),
    for at most ``wait_s``: as in one process, the link must be crawled while
    the item is in the pipelines, not only once its page is done with.
    ``chain=0``: every page is a start request instead (by priority, page 0
    first), and page n + 1 must be downloaded once page n's download ends."""

    name = "h_chain"
    custom_settings = {"ITEM_PIPELINES": {"testproj.spiders_hostile.WaitForNextPipeline": 100}}

    def __init__(self, site, mark_dir, wait_s="3", chain="1", **kwargs):
        super().__init__(site, **kwargs)
        self.mark_dir = mark_dir
        self.wait_s = float(wait_s)
        self.chain = chain == "1"

    async def start(self):
        for n in range(1 if self.chain else self.count):
            yield scrapy.Request(f"{self.site}/page/{n}", cb_kwargs={"n": n}, priority=-n)

    def parse(self, response, n):
        with open(os.path.join(self.mark_dir, str(n)), "w"):
            pass
        if self.chain and n + 1 < self.count:
            yield scrapy.Request(f"{self.site}/page/{n + 1}", cb_kwargs={"n": n + 1})
        yield {"n": n, "pid": os.getpid()}


class WaitForNextPipeline:
    def __init__(self, crawler):
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler):
        return cls(crawler)

    async def process_item(self, item):
        import asyncio
        import time

        spider = self.crawler.spider
        nxt = item["n"] + 1
        until = time.monotonic() + spider.wait_s
        while nxt < spider.count and not os.path.exists(os.path.join(spider.mark_dir, str(nxt))):
            if time.monotonic() > until:
                item["waited_out"] = True
                break
            await asyncio.sleep(0.02)
        return item


class RaiseSpider(_Base):
    """Every callback raises."""

    name = "h_raise"

    async def start(self):
        for n in range(self.count):
            yield scrapy.Request(f"{self.site}/page/{n}")

    def parse(self, response):
        raise ValueError(f"callback failed on purpose on {response.url}")


from testproj.stats import JsonStatsCollector  # noqa: E402


class PerProcessStats(JsonStatsCollector):
    """Also writes each process's own stats to ``TEST_STATS_FILE.<pid>``."""

    def _persist_stats(self, stats):
        super()._persist_stats(stats)
        path = self._crawler.settings.get("TEST_STATS_FILE")
        if path:
            import json

            with open(f"{path}.{os.getpid()}", "w") as f:
                json.dump(stats, f, default=str)

