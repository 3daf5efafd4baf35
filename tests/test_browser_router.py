"""The browser router against the JavaScript shop, with a real Chromium: what
it decides per kind of page, that sampling commits one result, and what
happens when a sample goes wrong."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from scrapy import Request, signals
from scrapy.http import Response

from scrapy_speedup.browser.router import BrowserRouter
from scrapy_speedup.demo.jsshop import ShopResource, expected_items, kind_of
from tests.browser_shop import BROWSER_SETTINGS, ShopSpider, by_path, chromium_processes
from tests.conftest import timing
from tests.inprocess import CrawlRun, crawl, inprocess, listening, reactor

# Three samples a kind (the default is 2): the tests count on the third.
ROUTER: dict[str, Any] = {**BROWSER_SETTINGS, "SPEEDUP_BROWSER_ROUTER_ENABLED": True,
                          "SPEEDUP_BROWSER_SAMPLES": 3}



def table(caplog: pytest.LogCaptureFixture) -> str:
    tables = [r.getMessage() for r in caplog.records if "browser router, by kind" in r.getMessage()]
    assert len(tables) == 1
    return tables[0]


def decision_line(text: str, pattern: str) -> str:
    (line,) = [line for line in text.splitlines() if pattern in line]
    return line


@inprocess
async def test_router_learns_which_kinds_need_the_browser(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    shop = ShopResource(products=100, latency_s=0.01)
    with listening(shop) as url:
        run = await crawl(ShopSpider, {**ROUTER, "SPEEDUP_BROWSER_RECHECK_SHARE": 0}, url=url,
                          lists=5)
    assert run.finish_reason == "finished"
    # Every product once, rendered right: the scripted ones too.
    assert by_path(run) == expected_items(100)
    s = run.stat
    # Sampling added no request to the crawl: 5 lists and 100 products.
    assert s("scheduler/enqueued") == 105
    assert s("speedup/browser/http_count") + s("speedup/browser/browser_count") == 105
    assert s("speedup/browser/sample_count") >= 3 * 2  # listing and item kinds, 3 each
    # The 10 scripted products went to the browser (or were sampled), no
    # static page did: while a kind's samples were out, its other pages were
    # fetched plain and held for the decision.
    assert s("speedup/browser/browser_count") <= 10
    assert shop.served["item"] == 90 + 3  # each of the 3 samples fetched twice
    assert s("speedup/browser/rendered_count") == s("speedup/browser/browser_count") + s(
        "speedup/browser/sample_count")
    assert s("speedup/browser/mispredict_count") == 0
    # The browser's page gate tells the router when pages wait (re-checks).
    assert BrowserRouter.of(run.crawler).gates
    text = table(caplog)
    assert "plain HTTP" in decision_line(text, "/shop/item/{n}.html parse_product")
    assert "plain HTTP" in decision_line(text, "/shop/list/{n}.html parse")
    app = decision_line(text, "/shop/app/{n}.html parse_product")
    deal = decision_line(text, "/shop/deal/{n}.html parse_product")
    assert "browser" in app and "1 item(s) in plain HTTP" not in app
    # The deal pages have the markup; only the price differs.
    assert "browser" in deal and "items differ in price" in deal
    assert not chromium_processes()


@inprocess
async def test_explicit_playwright_meta_is_left_alone() -> None:
    shop = ShopResource(products=20, latency_s=0)
    with listening(shop) as url:
        run = await crawl(ShopSpider, ROUTER, url=url, meta={"playwright": False})
    assert run.finish_reason == "finished"
    items = by_path(run)
    assert items["/shop/app/0.html"]["title"] is None  # not rendered: as the project asked
    assert run.stat("speedup/browser/http_count") == 0
    assert run.stat("speedup/browser/sample_count") == 0
    assert run.stat("speedup/browser/rendered_count") == 0


def price_is_real(response: Response) -> bool:
    """A check that knows the deal pages' placeholder (listings pass)."""
    if "/shop/list/" in response.url:
        return True
    return response.css("p.price::text").get() not in (None, "0.00")


@inprocess
async def test_check_function_replaces_the_comparison() -> None:
    shop = ShopResource(products=100, latency_s=0.01)
    with listening(shop) as url:
        run = await crawl(ShopSpider, {
            **ROUTER, "SPEEDUP_BROWSER_CHECK": f"{__name__}.price_is_real",
            "SPEEDUP_BROWSER_RECHECK_SHARE": 0,
        }, url=url, lists=5)
    assert run.finish_reason == "finished"
    assert by_path(run) == expected_items(100)
    s = run.stat
    # Plain pages that failed the check: each fetched again in the browser.
    assert s("speedup/browser/mispredict_count") >= 2  # an app and a deal page at least
    assert shop.served["app"] + shop.served["deal"] == 10 + s("speedup/browser/mispredict_count")
    # No comparison: no page fetched both ways but those that failed.
    assert s("speedup/browser/sample_count") == 0
    assert s("scheduler/enqueued") == 105


@inprocess
async def test_a_naive_check_is_wrong_on_pages_that_load_their_data() -> None:
    """``p.price`` is on the deal pages before their script runs: the check
    passes on the plain page, and its placeholder price is what is scraped.
    The comparison (first test) sees the difference; this check cannot."""
    shop = ShopResource(products=40, latency_s=0)
    with listening(shop) as url:
        run = await crawl(ShopSpider, {**ROUTER, "SPEEDUP_BROWSER_CHECK": "p.price"}, url=url,
                          lists=2)
    assert run.finish_reason == "finished"
    items = by_path(run)
    assert items["/shop/app/0.html"] == expected_items(40)["/shop/app/0.html"]
    assert items["/shop/deal/10.html"]["price"] == "0.00"


@timing
@inprocess
async def test_router_changes_its_mind_when_the_site_changes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    shop = ShopResource(products=120, latency_s=0.01)
    seen: list[str] = []

    def on_item(item: dict[str, Any]) -> None:
        seen.append(item["url"])
        if len(seen) == 40:
            shop.scripted_items = True  # item pages now need the browser

    def during(crawler: Any) -> None:
        crawler.signals.connect(on_item, signal=signals.item_scraped)

    with listening(shop) as url:
        run = await crawl(ShopSpider, {**ROUTER, "SPEEDUP_BROWSER_RECHECK_SHARE": 0.2,
                                       "CONCURRENT_REQUESTS": 4},
                          url=url, lists=6, during=during)
    assert run.finish_reason == "finished"
    assert len(run.items) == 120
    changes = [r.getMessage() for r in caplog.records if "changed its mind" in r.getMessage()]
    assert any("/shop/item/{n}.html parse_product: http -> browser" in c for c in changes), changes
    assert "browser" in decision_line(table(caplog), "/shop/item/{n}.html parse_product").split(
        "parse_product", 1)[1][:20]
    # Item pages scraped plain between the change and the re-check that saw
    # it: a few (one re-check in 5 pages, 4 at a time, more while the
    # re-check's render is slow: CI, busy, once saw 13), then none.
    wrong = [item for item in run.items[40:] if item["title"] is None]
    assert 0 < len(wrong) <= 20, len(wrong)
    assert all(item["title"] for item in run.items[-40:])
    assert run.stat("speedup/browser/mispredict_count") >= 1


class _SlowSecondFetch(ShopResource):
    """Every second fetch of an item page, or of the pages under
    *slow_prefix* (a sample's browser fetch), answers after *slow_s*."""

    def __init__(self, *args: Any, slow_s: float, slow_prefix: bytes = b"/shop/item/",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slow_s = slow_s
        self.slow_prefix = slow_prefix
        self.fetches: Counter[bytes] = Counter()
        self.first_fetch: dict[bytes, float] = {}
        self.slow_answered: list[float] = []

    def render_GET(self, request: Any) -> int:  # noqa: N802 - Twisted's name
        self.fetches[request.path] += 1
        self.first_fetch.setdefault(request.path, time.monotonic())
        if request.path.startswith(self.slow_prefix) and self.fetches[request.path] % 2 == 0:
            body = self._body(request.path)
            reactor.callLater(self.slow_s, self._respond_slow, request, body)
            return 1  # NOT_DONE_YET
        return super().render_GET(request)

    def _respond_slow(self, request: Any, body: Any) -> None:
        self.slow_answered.append(time.monotonic())
        self._respond(request, body)


@inprocess
async def test_a_failed_browser_fetch_keeps_the_plain_result(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A rendering under load may take over a second (make test once timed
    # out app/0's, whose plain result then stood): the timeout leaves room
    # for one, and the slow fetches stay well past it.
    shop = _SlowSecondFetch(products=40, latency_s=0, slow_s=8)
    with listening(shop) as url:
        run = await crawl(ShopSpider, {
            **ROUTER, "SPEEDUP_BROWSER_TIMEOUT_SECONDS": 3, "RETRY_TIMES": 0,
            "SPEEDUP_BROWSER_RECHECK_SHARE": 0,
        }, url=url, lists=2)
    assert run.finish_reason == "finished"
    # Nothing lost, nothing twice: the samples' plain results were kept.
    assert by_path(run) == expected_items(40)
    s = run.stat
    assert s("speedup/browser/sample_error_count") >= 1
    assert s("speedup/browser/timeout_count") == s("speedup/browser/sample_error_count")
    assert any("failed (DownloadTimeoutError" in r.getMessage() for r in caplog.records)


async def _crawl_with_slow_samples(spidercls: type[ShopSpider]) -> tuple[CrawlRun,
                                                                         _SlowSecondFetch]:
    """A router crawl of 40 products whose item samples' browser fetches take
    2 s; it finishes with every product's item, once."""
    shop = _SlowSecondFetch(products=40, latency_s=0, slow_s=2)
    with listening(shop) as url:
        run = await crawl(spidercls, {**ROUTER, "SPEEDUP_BROWSER_RECHECK_SHARE": 0},
                          url=url, lists=2)
    assert run.finish_reason == "finished"
    assert by_path(run) == expected_items(40)
    return run, shop


@inprocess
async def test_pages_of_a_kind_being_sampled_are_fetched_and_held_for_the_decision() -> None:
    # The item samples' browser fetches take 2 s: meanwhile the other item
    # pages are downloaded, not kept waiting for the decision. The app pages'
    # callback raises on their plain pages (no price): the held ones get the
    # browser's result, no error.
    run, shop = await _crawl_with_slow_samples(FloatPriceSpider)
    assert run.spider_errors == []
    s = run.stat
    items = sum(1 for i in range(40) if kind_of(i) == "item")
    # Held, not kept waiting (a loaded machine downloads fewer of them
    # before the samples end: make test once saw 8).
    assert s("speedup/browser/held_count") >= 5
    # Every page once, whatever its route; the held item pages were not rendered.
    assert s("speedup/browser/http_count") + s("speedup/browser/browser_count") == 42
    assert sum(n for p, n in shop.fetches.items() if p.startswith(b"/shop/item/")) == items + 3
    assert s("speedup/browser/rendered_count") == s("speedup/browser/browser_count") + s(
        "speedup/browser/sample_count")
    # Held item pages were fetched while the samples' renderings were slow.
    first_sample_done = min(shop.slow_answered)
    fetched_early = [p for p, t in shop.first_fetch.items()
                     if p.startswith(b"/shop/item/") and t < first_sample_done]
    assert len(fetched_early) >= 3 + 5, (len(fetched_early), items)  # samples and held


class ChainSpider(ShopSpider):
    """The first listing page only; each links the next, as a shop does."""

    async def start(self) -> AsyncIterator[Request]:
        yield Request(f"{self.url}/shop/list/0.html", callback=self.parse)

    def parse(self, response: Response) -> Iterator[Request]:
        yield from super().parse(response)
        yield from response.follow_all(css="a.next", callback=self.parse)


@inprocess
async def test_a_sampled_pages_links_are_followed_before_its_rendering_ends() -> None:
    # The listing pages' renderings take 2 s: the next listing page, in the
    # plain page's HTML, is fetched meanwhile. Each request once, items right.
    shop = _SlowSecondFetch(products=60, latency_s=0, slow_s=2, slow_prefix=b"/shop/list/")
    with listening(shop) as url:
        run = await crawl(ChainSpider, {**ROUTER, "SPEEDUP_BROWSER_RECHECK_SHARE": 0},
                          url=url)
    assert run.finish_reason == "finished"
    assert by_path(run) == expected_items(60)
    assert run.stat("scheduler/enqueued") == 63
    assert run.stat("dupefilter/filtered") == 0  # no link passed on twice
    first_render_done = min(shop.slow_answered)
    assert shop.first_fetch[b"/shop/list/2.html"] < first_render_done


@inprocess
async def test_pages_held_at_once_stay_within_the_crawls_concurrency() -> None:
    # Held pages free their download slots: without a cap the crawl ran
    # ahead of its limits while a kind was learned (CLOSESPIDER_ITEMCOUNT=5
    # scraped all 80 products). Past CONCURRENT_REQUESTS held, pages wait.
    shop = _SlowSecondFetch(products=80, latency_s=0, slow_s=2)
    with listening(shop) as url:
        run = await crawl(ShopSpider, {
            **ROUTER, "SPEEDUP_BROWSER_RECHECK_SHARE": 0, "CONCURRENT_REQUESTS": 4,
            "CLOSESPIDER_ITEMCOUNT": 5,
        }, url=url, lists=4)
    assert run.finish_reason == "closespider_itemcount"
    assert 5 <= len(run.items) <= 5 + 3 * 4, len(run.items)
    assert len({item["url"] for item in run.items}) == len(run.items)


class FloatPriceSpider(ShopSpider):
    """A callback that raises on a page without its price (float(None))."""

    def parse_product(self, response: Response) -> Iterator[dict[str, Any]]:
        price = float(response.css("p.price::text").get())  # type: ignore[arg-type]
        yield {"url": response.url, "title": response.css("h1::text").get(),
               "price": f"{price:.2f}"}


@inprocess
async def test_callback_raising_on_the_plain_page_only_commits_the_browser_result() -> None:
    shop = ShopResource(products=40, latency_s=0)
    with listening(shop) as url:
        run = await crawl(FloatPriceSpider, {**ROUTER, "SPEEDUP_BROWSER_RECHECK_SHARE": 0},
                          url=url, lists=2)
    assert run.finish_reason == "finished"
    assert by_path(run) == expected_items(40)
    assert run.spider_errors == []  # the plain page's TypeError was the sample's answer
    assert run.stat("spider_exceptions/TypeError") == 0


@inprocess
async def test_crawl_stopped_mid_sample_ends_cleanly() -> None:
    shop = _SlowSecondFetch(products=40, latency_s=0, slow_s=5)

    def stop_soon(crawler: Any) -> None:
        # While the first samples' browser fetches wait on the slow server.
        reactor.callLater(2.5, lambda: asyncio.ensure_future(crawler.stop_async()))

    with listening(shop) as url:
        run = await crawl(ShopSpider, ROUTER, url=url, lists=2, during=stop_soon, timeout=40)
    assert run.finish_reason == "shutdown"
    paths = [item["url"] for item in run.items]
    assert len(paths) == len(set(paths))
    assert not chromium_processes()


class YieldThenRaiseSpider(ShopSpider):
    """A callback with a bug after its item: on every product page, plain or
    rendered, it raises once the item is out (Scrapy keeps the item)."""

    def parse_product(self, response: Response) -> Iterator[dict[str, Any]]:
        yield from super().parse_product(response)
        raise ValueError("a bug after the item")


@inprocess
async def test_a_callback_raising_after_its_item_keeps_the_item_and_its_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The item samples' browser fetches take 2 s: most item pages are held.
    caplog.set_level(logging.INFO)
    # Every item, as without the router (the scripted ones rendered), and
    # every page's exception on to Scrapy, once.
    run, shop = await _crawl_with_slow_samples(YieldThenRaiseSpider)
    assert run.stat("spider_exceptions/ValueError") == 40
    assert sorted(url for url, _ in run.spider_errors) == sorted(item["url"] for item in run.items)
    # The same item, then the same exception, both ways: the item pages are
    # plain HTTP, not each sampled for ever.
    text = table(caplog)
    assert "plain HTTP" in decision_line(text, "/shop/item/{n}.html parse_product")
    assert "browser" in decision_line(text, "/shop/app/{n}.html parse_product")
    items = sum(1 for i in range(40) if kind_of(i) == "item")
    assert sum(n for p, n in shop.fetches.items() if p.startswith(b"/shop/item/")) == items + 3
    s = run.stat
    assert s("speedup/browser/http_count") + s("speedup/browser/browser_count") == 42
    assert s("speedup/browser/sample_error_count") == 0


@inprocess
async def test_a_router_crawl_of_one_scheme_launches_one_browser_and_counts_no_restart() -> None:
    # Scrapy builds a handler for http and one for https: only the one that
    # downloads launches a browser, early; the first samples' renderings ask
    # for it while that launch is under way (one launch, not a restart).
    shop = ShopResource(products=20, latency_s=0)
    with listening(shop) as url:
        run = await crawl(ShopSpider, ROUTER, url=url)
    assert run.finish_reason == "finished"
    assert run.stat("speedup/browser/rendered_count") >= 1
    assert run.stat("playwright/browser_count") == 1
    assert run.stat("speedup/browser/restart_count") == 0


def test_a_plain_kinds_recheck_waits_while_pages_wait_for_the_browser() -> None:
    from scrapy_speedup.browser.kinds import RECHECK_LATE_MAX, Kind

    def rechecks(decision: str, busy: bool, pages: int) -> list[int]:
        kind = Kind(("site", "/p/{n}", "parse"), 2, 0.1, 60)
        kind.decision = decision  # type: ignore[assignment]
        routes = [kind.route(checked=False, browser_busy=busy) for _ in range(pages)]
        return [n + 1 for n, route in enumerate(routes) if route == "sample"]

    # Every 10th page (a share of 0.1) while the browser has room.
    assert rechecks("http", busy=False, pages=40) == [10, 20, 30, 40]
    # A rendering more: late while pages wait for the browser, never more
    # than RECHECK_LATE_MAX intervals.
    assert rechecks("http", busy=True, pages=80) == [10 * RECHECK_LATE_MAX, 20 * RECHECK_LATE_MAX]
    # A browser kind's re-check costs a plain fetch: on time.
    assert rechecks("browser", busy=True, pages=20) == [10, 20]
