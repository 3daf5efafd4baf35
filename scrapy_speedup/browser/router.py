"""The browser router: plain HTTP for every page, the browser only for the
kinds of page that need it (``SPEEDUP_BROWSER_ROUTER_ENABLED``).

Two middlewares share one :class:`BrowserRouter` per crawler:

* :class:`BrowserRouterDownloaderMiddleware` (first of the downloader
  middlewares, so that a redirect or a retry of a page, which comes back
  through it, is routed again for its own URL) sets ``meta["playwright"]``
  from what the kind of the request has learned (:mod:`.kinds`). With a user
  check (``SPEEDUP_BROWSER_CHECK``) it checks each plain page here, before
  any callback runs, and replaces one that fails by the browser's rendering
  of it: one callback call, one result.
* :class:`BrowserRouterSpiderMiddleware` (closest to the spider) does the
  sampling: the callback's output on the plain page is held back, the page
  is fetched again in the browser (``engine.download_async``: through the
  downloader middlewares, not the scheduler, so neither the dupefilter nor
  the crawl's request count sees it), the callback runs on that response
  too, and the two outputs (items, and the requests yielded) are compared.
  Only one is passed on: the plain one when they are the same, else the
  browser's; the requests of the plain page go on at once (their links are
  in its HTML), and the browser's only add those the plain page lacked.
  Sampling never duplicates an item or a request.

Left alone: requests whose ``meta`` already has ``"playwright"`` (the
project decided), and requests without a callback (robots.txt, media
pipelines' downloads).

When a sample's browser fetch fails, or the callback raises on the browser's
response only, the plain result is passed on, with a warning, and the sample
counts for nothing. When the callback raises on the plain response only, the
browser's result is passed on (the page needed the browser). When it raises
on both, the plain exception goes on to Scrapy as if there were no router.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import TYPE_CHECKING, Any

from itemadapter import ItemAdapter, is_item
from scrapy import Request, signals
from scrapy.http import Response, TextResponse
from scrapy.http.request import NO_CALLBACK

from scrapy_speedup.browser.kinds import Kind, KindKey, Route, url_pattern
from scrapy_speedup.config import SpeedupConfig

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable, Iterator
    from typing import Self

    from scrapy.crawler import Crawler

__all__ = ["BrowserRouter", "BrowserRouterDownloaderMiddleware", "BrowserRouterSpiderMiddleware"]

logger = logging.getLogger(__name__)

_STAT = "speedup/browser/"
#: The route the router chose, in the request's meta (a plain string: meta
#: must stay serialisable for JOBDIR's disk queues).
ROUTE_KEY = "speedup_browser_route"
_KIND_KEY = "speedup_browser_kind"
#: The browser fetch of a sample, and the browser refetch of a page that
#: failed the check: fetched as they are, not routed again.
_TWIN = TWIN_ROUTE = "twin"
_REFETCH = "refetch"
_SAMPLED = "_speedup_browser_sampled"
#: The requests a held-back page's callback yielded on the plain page, passed
#: on at once: (method, url, callback) of each, as a list (meta stays plain data).
_COMMITTED = "_speedup_browser_committed"


class BrowserRouter:
    """What the router has learned, for one crawler."""

    def __init__(self, crawler: Crawler, config: SpeedupConfig) -> None:
        self.crawler = crawler
        self.samples_needed = config.browser_samples
        self.recheck_share = config.browser_recheck_share
        self.check = _check_function(config.browser_check)
        self.check_text = config.browser_check if isinstance(config.browser_check, str) \
            else getattr(config.browser_check, "__qualname__", repr(config.browser_check))
        self._expiry_s = 3 * config.browser_timeout_seconds
        self._held_cap = max(1, crawler.settings.getint("CONCURRENT_REQUESTS"))
        self.kinds: dict[KindKey, Kind] = {}
        #: The page gates of the browser's download handlers (they add
        #: themselves): pages waiting at one make plain kinds' re-checks wait.
        self.gates: list[Any] = []
        assert crawler.stats is not None
        self.stats = crawler.stats
        crawler.signals.connect(self.spider_closed, signal=signals.spider_closed)

    @classmethod
    def of(cls, crawler: Crawler) -> BrowserRouter:
        router = _routers.get(crawler)
        if router is None:
            router = _routers[crawler] = cls(crawler, SpeedupConfig.of(crawler))
        return router

    def kind(self, key: KindKey) -> Kind:
        kind = self.kinds.get(key)
        if kind is None:
            kind = self.kinds[key] = Kind(key, self.samples_needed, self.recheck_share,
                                          self._expiry_s, self._held_cap)
        return kind

    def browser_busy(self) -> bool:
        """Pages are waiting for a place in the browser."""
        return any(gate.waiting for gate in self.gates)

    def learn(self, kind: Kind, same: bool, why: str) -> None:
        changed = kind.learn(same, why)
        if changed:
            logger.info("scrapy-speedup: browser router changed its mind on %s: %s",
                        kind.label(), changed, extra={"crawler": self.crawler})

    def spider_closed(self) -> None:
        if not self.kinds:
            return
        rows = [("kind", "decision", "pages", "why")]
        for kind in sorted(self.kinds.values(), key=lambda k: k.key):
            decision = {"?": "undecided", "http": "plain HTTP", "browser": "browser"}
            pages = (f"{kind.http_pages} plain, {kind.browser_pages} browser,"
                     f" {kind.samples} sampled, {kind.mispredictions} mispredicted")
            rows.append((kind.label(), decision[kind.decision], pages, kind.why))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
                 + "  " + row[3] for row in rows]
        logger.info("scrapy-speedup: browser router, by kind of page:\n%s", "\n".join(lines),
                    extra={"crawler": self.crawler})


_routers: weakref.WeakKeyDictionary[Crawler, BrowserRouter] = weakref.WeakKeyDictionary()


def _check_function(check: str | Callable[[Any], bool] | None) -> Callable[[Any], bool] | None:
    if check is None or callable(check):
        return check
    selector = check

    def css_matches(response: Any) -> bool:
        return bool(response.css(selector))

    return css_matches


def kind_key(request: Request) -> KindKey:
    site, pattern = url_pattern(request.url)
    callback = request.callback
    name = getattr(callback, "__name__", None) or ("parse" if callback is None else repr(callback))
    return site, pattern, name


def _is_ok(response: Response) -> bool:
    return 200 <= response.status < 300


class BrowserRouterDownloaderMiddleware:
    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        self.router = BrowserRouter.of(crawler)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    async def process_request(self, request: Request) -> None:
        meta = request.meta
        route = meta.get(ROUTE_KEY)
        if route is None and "playwright" in meta:
            return  # the project's decision
        if route in (_TWIN, _REFETCH) or request.callback is NO_CALLBACK:
            return
        router = self.router
        if route == "sample":
            # A redirect or retry of a sample, whose first fetch ended here
            # without a response to compare.
            router.kind(tuple(meta[_KIND_KEY])).sample_ended()  # type: ignore[arg-type]
        elif route == "held":  # a redirect or retry of a held page
            router.kind(tuple(meta[_KIND_KEY])).held_done()  # type: ignore[arg-type]
        key = kind_key(request)
        kind = router.kind(key)
        new: Route = kind.route(checked=router.check is not None,
                                browser_busy=router.browser_busy())
        while new == "wait":
            try:
                await asyncio.wait_for(kind.decided(), kind.sample_expiry_s)
            except TimeoutError:
                new = "browser"  # no decision came: the browser is always right
                break
            new = kind.route(checked=router.check is not None)
        meta[ROUTE_KEY] = new
        meta[_KIND_KEY] = list(key)
        meta["playwright"] = new == "browser"
        if new == "browser":
            kind.browser_pages += 1
            router.stats.inc_value(_STAT + "browser_count")
        else:
            kind.http_pages += 1
            router.stats.inc_value(_STAT + "http_count")
        if new in ("sample", "probe"):
            kind.samples += 1
            router.stats.inc_value(_STAT + "sample_count")
        elif new == "held":
            router.stats.inc_value(_STAT + "held_count")

    async def process_response(self, request: Request, response: Response) -> Response:
        route = request.meta.get(ROUTE_KEY)
        if route == "held" and not _is_ok(response):
            # Not held: the spider middleware passes it on as it is.
            self.router.kind(tuple(request.meta[_KIND_KEY])).held_done()  # type: ignore[arg-type]
            request.meta[ROUTE_KEY] = "http"
        if route not in ("http", "probe", "sample"):
            return response
        kind = self.router.kind(tuple(request.meta[_KIND_KEY]))  # type: ignore[arg-type]
        if route == "sample":
            if not _is_ok(response):
                # Nothing to compare (the spider middleware leaves it alone).
                kind.sample_ended()
                request.meta[ROUTE_KEY] = "http"
            return response
        check = self.router.check
        if check is None or not _is_ok(response) or not isinstance(response, TextResponse):
            return response
        if check(response):
            self.router.learn(kind, True, f"the check ({self.router.check_text}) passed")
            return response
        if route == "http":
            kind.mispredictions += 1
            self.router.stats.inc_value(_STAT + "mispredict_count")
        self.router.learn(kind, False, f"the check ({self.router.check_text}) failed on a"
                                       f" plain page: {response.url}")
        browser = request.replace(
            dont_filter=True, meta={**request.meta, "playwright": True, ROUTE_KEY: _REFETCH}
        )
        kind.browser_pages += 1
        self.router.stats.inc_value(_STAT + "browser_count")
        assert self.crawler.engine is not None
        # Fetched here, before any callback: the callback runs once, on it.
        return await self.crawler.engine.download_async(browser)

    def process_exception(self, request: Request, exception: Exception) -> None:
        route = request.meta.get(ROUTE_KEY)
        if route in ("sample", "held"):
            kind = self.router.kind(tuple(request.meta[_KIND_KEY]))  # type: ignore[arg-type]
            if route == "sample":
                kind.sample_ended()
            else:
                kind.held_done()
            request.meta[ROUTE_KEY] = "http"


class BrowserRouterSpiderMiddleware:
    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        self.router = BrowserRouter.of(crawler)
        #: The plain output of each held-back response so far, by id of the
        #: response: when the callback raises, process_spider_exception takes
        #: over the page, and what the callback yielded before it raised is
        #: part of the plain result (Scrapy passes it on without the router).
        self._plain_so_far: dict[int, list[Any]] = {}

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    @staticmethod
    def _held_back(response: Response) -> bool:
        """A sample's or a held page's plain response, not handled yet: the
        callback's output waits here for the browser or the decision."""
        request = response.request
        return (request is not None and request.meta.get(ROUTE_KEY) in ("sample", "held")
                and not request.meta.get(_SAMPLED) and _is_ok(response))

    async def process_spider_output(
        self, response: Response, result: AsyncIterator[Any]
    ) -> AsyncIterator[Any]:
        if not self._held_back(response):
            async for output in result:
                yield output
            return
        plain: list[Any] = []
        committed = response.meta.setdefault(_COMMITTED, [])
        self._plain_so_far[id(response)] = plain
        try:
            async for output in result:
                plain.append(output)
                if isinstance(output, Request):
                    # Its link is in the page's HTML: followed now, not after
                    # the rendering (a listing page's next page is the
                    # crawl's chain).
                    committed.append(_request_key(output))
                    yield output
        finally:
            del self._plain_so_far[id(response)]
        if response.meta.get(_SAMPLED):
            # The callback raised: Scrapy handed the exception to
            # process_spider_exception, which took the page over (with what
            # the callback yielded before it raised), and ended the
            # callback's output here.
            return
        async for output in self._decide(response, plain, None):
            yield output

    def process_spider_exception(
        self, response: Response, exception: Exception
    ) -> AsyncIterator[Any] | None:
        # The callback raised, on a sampled or held plain page: the browser's
        # rendering or the kind's decision settles it.
        if not self._held_back(response):
            return None
        response.meta[_SAMPLED] = True  # now: process_spider_output reads it next
        # Called while process_spider_output reads the callback's output (a
        # generator that raised), or before (a callback that raised at once).
        plain = self._plain_so_far.get(id(response), [])
        return self._decide(response, plain, exception)

    def _decide(
        self, response: Response, plain: list[Any], plain_error: Exception | None
    ) -> AsyncIterator[Any]:
        request = response.request
        assert request is not None
        if request.meta[ROUTE_KEY] == "sample":
            return self._sample(response, plain, plain_error)
        return self._held(response, plain, plain_error)

    async def _held(
        self, response: Response, plain: list[Any], plain_error: Exception | None
    ) -> AsyncIterator[Any]:
        request = response.request
        assert request is not None
        kind = self.router.kind(tuple(request.meta[_KIND_KEY]))  # type: ignore[arg-type]
        try:
            async for output in self._settle_held(response, plain, plain_error):
                yield output
        finally:
            kind.held_done()

    async def _settle_held(
        self, response: Response, plain: list[Any], plain_error: Exception | None
    ) -> AsyncIterator[Any]:
        """A page fetched plain while its kind's samples were out: its output
        follows the decision. The page becomes a sample itself when a sample
        ends without one (its browser fetch failed) and leaves room."""
        request = response.request
        assert request is not None
        request.meta[_SAMPLED] = True
        kind = self.router.kind(tuple(request.meta[_KIND_KEY]))  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + kind.sample_expiry_s
        while kind.decision == "?":
            if kind.take_sample():
                kind.samples += 1
                self.router.stats.inc_value(_STAT + "sample_count")
                async for output in self._sample(response, plain, plain_error):
                    yield output  # committed by _sample
                return
            try:
                await asyncio.wait_for(kind.decided(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                break  # no sample came back: the browser is always right
        if kind.decision == "http":
            for output in _committed(request, plain, plain_error):
                yield output
            return
        # Counted as a plain page when it was fetched; it is the browser's now.
        kind.http_pages -= 1
        kind.browser_pages += 1
        self.router.stats.inc_value(_STAT + "http_count", -1)
        self.router.stats.inc_value(_STAT + "browser_count")
        twin_request, twin, error = await self._browser_fetch(request)
        if twin is None:
            self._keep_plain(request, "the browser fetch of a held page", error)
            for output in _committed(request, plain, plain_error):
                yield output
            return
        browser, browser_error = await self._callback_output(twin, twin_request)
        for output in _committed(request, browser, browser_error):
            yield output

    async def _sample(
        self, response: Response, plain: list[Any], plain_error: Exception | None
    ) -> AsyncIterator[Any]:
        request = response.request
        assert request is not None
        request.meta[_SAMPLED] = True
        router = self.router
        kind = router.kind(tuple(request.meta[_KIND_KEY]))  # type: ignore[arg-type]
        twin_request, twin, error = await self._browser_fetch(request)
        if twin is None:
            kind.sample_ended()
            self._keep_plain(request, "the browser fetch of a sample", error)
            for output in _committed(request, plain, plain_error):
                yield output
            return
        browser, browser_error = await self._callback_output(twin, twin_request)
        kind.sample_ended()  # held until now: a new sample must not start meanwhile
        if browser_error is not None and plain_error is None:
            router.stats.inc_value(_STAT + "sample_error_count")
            logger.warning(
                "scrapy-speedup: the callback raised on the browser's rendering of %s (%s:"
                " %s); the plain page's result is kept", request.url,
                type(browser_error).__name__, browser_error, extra={"crawler": self.crawler},
            )
            for output in _uncommitted(request, plain):
                yield output
            return
        if plain_error is not None and browser_error is None:
            why = (f"the callback raised {type(plain_error).__name__} on a plain page, not in"
                   f" the browser: {request.url}")
        elif plain_error is not None and type(plain_error) is not type(browser_error):
            why = (f"the callback raised {type(plain_error).__name__} on a plain page,"
                   f" {type(browser_error).__name__} in the browser: {request.url}")
        else:
            # Raised both ways, the same exception: what it yielded before is
            # compared (a bug of the callback's that the browser does not
            # change must not keep the kind sampled, nor lose the items).
            why = compare_outputs(plain, browser)
            if why:
                why += f": {request.url}"
        same = not why
        if same:
            why = "same items and links"
            if plain_error is not None:
                why += f", then {type(plain_error).__name__} both ways"
        if not same and kind.decision == "http":
            kind.mispredictions += 1
            router.stats.inc_value(_STAT + "mispredict_count")
        router.learn(kind, same, why)
        # The committed result keeps its exception: Scrapy logs and counts it
        # after the outputs, as without the router.
        outputs, error = (plain, plain_error) if same else (browser, browser_error)
        for output in _committed(request, outputs, error):
            yield output


    async def _browser_fetch(
        self, request: Request
    ) -> tuple[Request, Response | None, Exception | None]:
        """The browser's rendering of *request*, fetched as it is (not routed
        again), or why there is none."""
        meta = {k: v for k, v in request.meta.items() if k != _COMMITTED}
        twin_request = request.replace(
            dont_filter=True, meta={**meta, "playwright": True, ROUTE_KEY: _TWIN}
        )
        engine = self.crawler.engine
        try:
            assert engine is not None and engine.spider is not None
            twin = await engine.download_async(twin_request)
            if not _is_ok(twin):
                raise ValueError(f"the browser got HTTP {twin.status}")
        except Exception as exc:  # noqa: BLE001 - the caller keeps the plain result
            return twin_request, None, exc
        return twin_request, twin, None

    def _keep_plain(self, request: Request, what: str, error: Exception | None) -> None:
        self.router.stats.inc_value(_STAT + "sample_error_count")
        logger.warning(
            "scrapy-speedup: %s of %s failed (%s: %s); the plain page's result is kept",
            what, request.url, type(error).__name__, error, extra={"crawler": self.crawler},
        )

    async def _callback_output(
        self, response: Response, request: Request
    ) -> tuple[list[Any], Exception | None]:
        """The callback's output on *response*, called as Scrapy calls it:
        what it yielded, and the exception it raised, if any, after that."""
        assert self.crawler.engine is not None
        outputs: list[Any] = []
        try:
            output = await self.crawler.engine.scraper.call_spider_async(response, request)
            if hasattr(output, "__aiter__"):
                async for one in output:
                    outputs.append(one)
            else:
                outputs.extend(output)
        except Exception as exc:  # noqa: BLE001 - the caller weighs it
            return outputs, exc
        return outputs, None


def _normal(value: Any) -> Any:
    """A value as compared: text with its whitespace collapsed (a browser
    re-serialises the page), containers recursively, items as dicts."""
    if isinstance(value, str):
        return " ".join(value.split())
    if is_item(value):
        value = ItemAdapter(value).asdict()
    if isinstance(value, dict):
        return tuple(sorted((str(k), repr(_normal(v))) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_normal(v) for v in value)
    return value


def _request_key(request: Request) -> tuple[str, str, str]:
    callback = getattr(request.callback, "__name__", None) or "parse"
    return request.method, request.url, callback


def _committed(
    request: Request, outputs: Iterable[Any], error: Exception | None
) -> Iterator[Any]:
    """A page's committed result: its outputs (but the requests already
    passed on), then its callback's exception, as Scrapy would raise it."""
    yield from _uncommitted(request, outputs)
    if error is not None:
        raise error


def _uncommitted(request: Request, outputs: Iterable[Any]) -> Iterator[Any]:
    """*outputs* but the requests already passed on from the plain page."""
    committed = {tuple(key) for key in request.meta.get(_COMMITTED, ())}
    for output in outputs:
        if not (isinstance(output, Request) and _request_key(output) in committed):
            yield output


def _summary(outputs: Iterable[Any]) -> tuple[list[Any], list[tuple[str, str, str]]]:
    items, requests = [], []
    for output in outputs:
        if isinstance(output, Request):
            requests.append(_request_key(output))
        else:
            items.append(_normal(output))
    return sorted(items, key=repr), sorted(requests)


def compare_outputs(plain: list[Any], browser: list[Any]) -> str:
    """Why the two outputs differ, or "" when they are the same (items and
    requests, in any order)."""
    plain_items, plain_requests = _summary(plain)
    browser_items, browser_requests = _summary(browser)
    if len(plain_items) != len(browser_items):
        return f"{len(plain_items)} item(s) in plain HTTP, {len(browser_items)} in the browser"
    for a, b in zip(plain_items, browser_items, strict=True):
        if a != b:
            if isinstance(a, tuple) and isinstance(b, tuple):
                fields = sorted({k for k, _ in set(a) ^ set(b)})
                return f"items differ in {', '.join(map(str, fields))}"
            return "items differ"
    if plain_requests != browser_requests:
        return (f"{len(plain_requests)} request(s) in plain HTTP, {len(browser_requests)} in"
                " the browser, not the same")
    return ""
