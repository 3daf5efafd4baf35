"""Pages navigated again instead of opened anew, with a real Chromium: the
next page of a context renders in a page whose last rendering went well, and
never in one that something of the project's touched."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from scrapy import Request
from scrapy.http import Response
from scrapy_playwright.page import PageMethod

from scrapy_speedup.browser.handler import _page_reusable
from scrapy_speedup.demo.jsshop import ShopResource, expected_items
from tests.browser_shop import BROWSER_SETTINGS, ShopSpider, by_path, chromium_processes
from tests.inprocess import crawl, inprocess, listening

BROWSER: dict[str, Any] = {**BROWSER_SETTINGS, "SPEEDUP_BROWSER_ENABLED": True}
ALL_BROWSER = {"playwright": True}


class _ShopWithScript(ShopResource):
    """The shop, with *script* at the end of the body of its HTML pages
    (those whose path starts with *only*)."""

    def __init__(self, script: bytes, only: bytes = b"/", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.script, self.only = script, only

    def _body(self, path: bytes) -> tuple[bytes, bytes] | None:
        found = super()._body(path)
        if (found is None or not found[1].startswith(b"text/html")
                or not path.startswith(self.only)):
            return found
        return found[0].replace(b"</body>", self.script + b"</body>"), found[1]


def _never_cut(run: Any) -> bool:
    """Whether the handler kept its two pages at once all along (a busy
    machine makes it cut them, and keep fewer pages idle)."""
    return bool(run.stats.get("speedup/browser/pages_limit_min", 2) >= 2)


@pytest.mark.parametrize("reuse", [True, False], ids=["reused", "not-reused"])
@inprocess
async def test_pages_are_navigated_again_not_opened_anew(reuse: bool) -> None:
    shop = ShopResource(products=40, latency_s=0.02)
    with listening(shop) as url:
        run = await crawl(ShopSpider, {**BROWSER, "SPEEDUP_BROWSER_MAX_PAGES": 2,
                                       "SPEEDUP_BROWSER_PAGE_REUSE_ENABLED": reuse},
                          url=url, lists=2, meta=ALL_BROWSER)
    assert run.finish_reason == "finished"
    assert by_path(run) == expected_items(40)
    assert len(run.items) == 40
    rendered = run.stat("speedup/browser/rendered_count")
    assert rendered == 42
    opened = run.stat("playwright/page_count")
    if reuse:
        # At most two pages at once, in one context: two pages in all, unless
        # a busy machine cut the pages at once (then fewer are kept idle).
        assert opened <= 2 if _never_cut(run) else opened < rendered
        assert run.stat("speedup/browser/page_reused_count") == rendered - opened
    else:
        assert opened == rendered
        assert not run.stat("speedup/browser/page_reused_count")
    assert not chromium_processes()


@inprocess
async def test_a_recycled_contexts_pages_close_with_it() -> None:
    shop = ShopResource(products=40, latency_s=0.02)
    with listening(shop) as url:
        run = await crawl(ShopSpider, {**BROWSER, "SPEEDUP_BROWSER_MAX_PAGES": 2,
                                       "SPEEDUP_BROWSER_CONTEXT_MAX_PAGES": 5},
                          url=url, lists=2, meta=ALL_BROWSER)
    assert run.finish_reason == "finished"
    assert by_path(run) == expected_items(40)
    # 42 pages, 5 to a context: 9 contexts, never more than 2 pages each.
    assert run.stat("playwright/context_count") == 9
    assert run.stat("speedup/browser/context_recycled_count") == 8
    if _never_cut(run):
        assert run.stat("playwright/page_count") <= 2 * 9
        assert run.stat("speedup/browser/page_reused_count") >= 42 - 2 * 9
    assert run.stat("speedup/browser/page_reused_count") >= 1


_MARK = "window.addEventListener('DOMContentLoaded', () =>" \
        " document.body.setAttribute('data-marked', '1'))"


class _MarkingSpider(ShopSpider):
    """Every third product page gets an init script that marks the page's
    body; every item says whether its page was marked."""

    def parse(self, response: Response) -> Iterator[Request]:
        for n, href in enumerate(response.css("ul.products a::attr(href)").getall()):
            methods = [PageMethod("add_init_script", _MARK)] if n % 3 == 0 else []
            yield response.follow(href, callback=self.parse_product, meta={
                **self.meta, "playwright_page_methods": methods, "marked": bool(methods)})

    def parse_product(self, response: Response) -> Iterator[dict[str, Any]]:
        for item in super().parse_product(response):
            yield {**item, "asked": response.meta["marked"],
                   "marked": response.css("body::attr(data-marked)").get() == "1"}


@inprocess
async def test_a_page_touched_by_a_page_method_is_not_reused() -> None:
    # add_init_script outlives the page's navigation: had the page been
    # reused, the pages rendered in it next would be marked too.
    shop = ShopResource(products=40, latency_s=0.02)
    with listening(shop) as url:
        run = await crawl(_MarkingSpider, {**BROWSER, "SPEEDUP_BROWSER_MAX_PAGES": 2},
                          url=url, lists=2, meta=ALL_BROWSER)
    assert run.finish_reason == "finished"
    assert len(run.items) == 40
    # An init script runs on the navigation after it is added: the page it
    # was added on is not marked itself, and no other page may be.
    assert [item["url"] for item in run.items if item["marked"]] == []
    asked = sum(item["asked"] for item in run.items)
    assert asked == 14
    # One new page for each marked one at least; the rest reused.
    assert run.stat("playwright/page_count") >= asked
    assert run.stat("speedup/browser/page_reused_count") >= 1


@inprocess
async def test_a_page_whose_rendering_failed_is_closed_not_reused() -> None:
    from tests.test_browser_health import _HangsOnce

    shop = _HangsOnce(products=20, latency_s=0)
    with listening(shop) as url:
        run = await crawl(ShopSpider, {**BROWSER, "SPEEDUP_BROWSER_TIMEOUT_SECONDS": 1,
                                       "SPEEDUP_BROWSER_MAX_PAGES": 1, "RETRY_TIMES": 1},
                          url=url, meta=ALL_BROWSER, timeout=60)
    assert run.finish_reason == "finished"
    assert by_path(run) == expected_items(20)
    assert run.stat("speedup/browser/timeout_count") == 1
    # One page at a time: the one that timed out was closed, a second one
    # rendered the rest.
    assert run.stat("playwright/page_count") == 2
    assert run.stat("speedup/browser/page_reused_count") == 22 - 2


@pytest.mark.parametrize(("meta", "reusable"), [
    ({}, True),
    ({"playwright_page_methods": [PageMethod("wait_for_selector", "h1")]}, True),
    ({"playwright_page_methods": {"s": PageMethod("evaluate", "window.scrollBy(0, 100)")}},
     True),
    ({"playwright_page_methods": [PageMethod("set_viewport_size", {"width": 1, "height": 1})]},
     False),
    ({"playwright_page_methods": [PageMethod(lambda page: None)]}, False),
    ({"playwright_include_page": True}, False),
    ({"playwright_page_init_callback": "tests.x.f"}, False),
    ({"playwright_page_event_handlers": {"dialog": "f"}}, False),
])
def test_which_pages_may_be_reused(meta: dict[str, Any], reusable: bool) -> None:
    assert _page_reusable(Request("http://127.0.0.1/", meta=meta)) is reusable


@pytest.mark.parametrize("spider", [ShopSpider, _MarkingSpider], ids=["reusable", "mixed"])
@inprocess
async def test_idle_pages_do_not_starve_a_context_of_its_pages(spider: type[ShopSpider]) -> None:
    # An idle page holds its place in its context's page limit
    # (PLAYWRIGHT_MAX_PAGES_PER_CONTEXT): a page that waits for a place, or
    # one that may not be rendered in an idle page (an init script), must get
    # one, not wait for the handler's outer timeout (2 x 5 + 30 s) and fail.
    shop = ShopResource(products=9, latency_s=0.02)
    with listening(shop) as url:
        run = await crawl(spider, {**BROWSER, "SPEEDUP_BROWSER_TIMEOUT_SECONDS": 5,
                                   "SPEEDUP_BROWSER_MAX_PAGES": 2,
                                   "PLAYWRIGHT_MAX_PAGES_PER_CONTEXT": 1},
                          url=url, meta=ALL_BROWSER, timeout=30)
    assert run.finish_reason == "finished"
    assert len(run.items) == 9
    assert not run.stat("speedup/browser/timeout_count")
    assert run.stat("speedup/browser/page_reused_count") >= 1


# Each page remembers itself in the tab's sessionStorage and window.name,
# which a page's navigation keeps, and shows what it found there.
_REMEMBER = (b"<script>document.body.setAttribute('data-before',"
             b" (sessionStorage.getItem('seen') || '') + '|' + window.name);"
             b" sessionStorage.setItem('seen', location.pathname);"
             b" window.name = location.pathname;</script>")


class _BeforeSpider(ShopSpider):
    def parse_product(self, response: Response) -> Iterator[dict[str, Any]]:
        for item in super().parse_product(response):
            yield {**item, "before": response.css("body::attr(data-before)").get()}


@inprocess
async def test_a_reused_page_forgets_the_last_pages_session() -> None:
    # A new page starts with an empty sessionStorage and window.name; a
    # reused one must too, or a page renders what the one before it left.
    shop = _ShopWithScript(_REMEMBER, products=6, latency_s=0.02)
    with listening(shop) as url:
        run = await crawl(_BeforeSpider, {**BROWSER, "SPEEDUP_BROWSER_MAX_PAGES": 1},
                          url=url, meta=ALL_BROWSER, timeout=60)
    assert run.finish_reason == "finished"
    assert len(run.items) == 6
    assert run.stat("speedup/browser/page_reused_count") >= 5
    assert {item["before"] for item in run.items} == {"|"}


class _UnavailableOnce(ShopResource):
    """The first fetch of the first listing answers 503."""

    def render_GET(self, request: Any) -> int:  # noqa: N802 - Twisted's name
        if request.path == b"/shop/list/0.html" and not self.served["unavailable"]:
            self.served["unavailable"] += 1
            request.setResponseCode(503)
            return b"<html><body><h1>Busy</h1></body></html>"  # type: ignore[return-value]
        return super().render_GET(request)


class _FragmentSpider(ShopSpider):
    async def start(self) -> AsyncIterator[Request]:
        yield Request(f"{self.url}/shop/list/0.html#top", callback=self.parse, meta=self.meta)


@inprocess
async def test_a_retry_of_a_url_with_a_fragment_loads_it_again() -> None:
    # A page at the same URL but for the fragment navigates within its
    # document: a retry of a 503 in the page that rendered it would be the
    # 503's document again, as a 200 without headers.
    shop = _UnavailableOnce(products=6, latency_s=0.02)
    with listening(shop) as url:
        run = await crawl(_FragmentSpider, {**BROWSER, "SPEEDUP_BROWSER_MAX_PAGES": 1},
                          url=url, meta=ALL_BROWSER, timeout=60)
    assert run.finish_reason == "finished"
    assert shop.served["list"] == 1  # after the 503
    assert run.stat("downloader/response_status_count/503") == 1
    assert by_path(run) == expected_items(6)


# Each page fetches an image and a script a second after it loads: the page
# is idle by then (its callback sleeps longer), not still being read and made
# idle, which a loaded machine (make test, two at a time) stretched past a
# tenth of a second.
_LATER = (b"<script>setTimeout(() => { new Image().src = '/shop/img/0.png';"
          b" fetch('/shop/data/0.js'); }, 1000);</script>")


class _SlowSpider(ShopSpider):
    """Its callbacks take two seconds: the page that rendered sits idle."""

    async def parse(self, response: Response) -> AsyncIterator[Request]:  # type: ignore[override]
        await asyncio.sleep(2)
        for request in super().parse(response):
            yield request

    async def parse_product(self, response: Response) -> AsyncIterator[dict[str, Any]]:  # type: ignore[override]
        await asyncio.sleep(2)
        for item in super().parse_product(response):
            yield item


@inprocess
async def test_an_idle_pages_document_fetches_nothing() -> None:
    # A page closed after its rendering fetched nothing more; one kept idle
    # must not either: its document's fetches no longer go through the
    # page's route, which blocks images (SPEEDUP_BROWSER_BLOCKED_RESOURCE_TYPES).
    shop = _ShopWithScript(_LATER, products=2, latency_s=0.02)
    with listening(shop) as url:
        run = await crawl(_SlowSpider, {**BROWSER, "SPEEDUP_BROWSER_MAX_PAGES": 1},
                          url=url, meta=ALL_BROWSER, timeout=60)
    assert run.finish_reason == "finished"
    assert len(run.items) == 2
    assert run.stat("speedup/browser/page_reused_count") >= 1
    assert shop.served["img"] == 0
    assert shop.served["data"] == 0


class _ShrinkSpider(ShopSpider):
    """Four product pages at once, then, with the handler's pages at once cut
    to one (as a machine short of memory does), four more one after another;
    each of these says how many pages its context held idle."""

    def parse_product(self, response: Response) -> Iterator[Any]:
        yield from super().parse_product(response)
        self.done = getattr(self, "done", 0) + 1
        if self.done == 4:
            self.handler = self.crawler.engine.downloader.handlers._handlers["http"]
            self.handler.gate.resize(1)
            yield response.follow("/shop/item/1.html", callback=self.parse_after,
                                  meta=self.meta, dont_filter=True, cb_kwargs={"n": 1})

    def parse_after(self, response: Response, n: int) -> Iterator[Any]:
        yield {"idle": sum(map(len, self.handler._idle_pages.values()))}
        if n < 4:
            yield response.follow(f"/shop/item/{n + 1}.html", callback=self.parse_after,
                                  meta=self.meta, dont_filter=True, cb_kwargs={"n": n + 1})


@inprocess
async def test_idle_pages_beyond_the_pages_at_once_are_closed() -> None:
    # The handler cuts the pages it renders at once when memory runs short:
    # pages kept idle past that number hold their documents for nothing.
    shop = ShopResource(products=4, latency_s=0.3)
    with listening(shop) as url:
        run = await crawl(_ShrinkSpider, {**BROWSER, "SPEEDUP_BROWSER_MAX_PAGES": 4},
                          url=url, meta=ALL_BROWSER, timeout=60)
    assert run.finish_reason == "finished"
    assert run.stat("playwright/page_count/max_concurrent") >= 2
    assert [item["idle"] for item in run.items if "idle" in item][-1] <= 1


# A page that holds its main thread once it is asked to forget its session:
# making it idle cannot finish.
_HANGS_WHEN_IDLE = (b"<script>Object.defineProperty(window, 'name', {set() {"
                    b" for (;;) {} }, get() { return ''; }});</script>")


@inprocess
async def test_a_page_that_cannot_be_made_idle_is_closed_and_its_rendering_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from scrapy_speedup.browser import handler

    monkeypatch.setattr(handler, "_IDLE_SETUP_S", 1.0)
    shop = _ShopWithScript(_HANGS_WHEN_IDLE, only=b"/shop/item/1.", products=6,
                           latency_s=0.02)
    with listening(shop) as url:
        run = await crawl(ShopSpider, {**BROWSER, "SPEEDUP_BROWSER_MAX_PAGES": 1,
                                       "SPEEDUP_BROWSER_TIMEOUT_SECONDS": 10},
                          url=url, meta=ALL_BROWSER, timeout=60)
    assert run.finish_reason == "finished"
    # Its rendering went well: kept, not failed and retried.
    assert by_path(run) == expected_items(6)
    assert not run.stat("speedup/browser/timeout_count")
    assert not run.stat("retry/count")
    # It was closed: the next page opened a new one.
    assert run.stat("playwright/page_count") == 2
