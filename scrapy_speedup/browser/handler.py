"""scrapy-playwright's download handler, kept healthy over a long crawl.

What it adds to :class:`ScrapyPlaywrightDownloadHandler`, for requests with
``meta["playwright"]``:

* **Contexts recycled.** Playwright keeps every request and response of a
  context until the context closes (microsoft/playwright#6319), so one context
  for a whole crawl grows without bound (scrapy-playwright#126, #240). Pages go
  to a context named ``speedup-<n>``; after ``SPEEDUP_BROWSER_CONTEXT_MAX_PAGES``
  pages the next context takes over, and the old one is closed as soon as its
  last page is done. A request whose ``playwright_context`` the project chose
  keeps it; one with ``playwright_include_page`` (its callback holds the page)
  goes to scrapy-playwright's default context, never recycled.
* **Open pages adapted to the machine.** A gate holds how many pages render at
  once: at most ``SPEEDUP_BROWSER_MAX_PAGES``, a quarter fewer each second
  while the reactor doctor has seen the reactor busy, or memory short, two
  seconds in a row, one more each second while pages wait and the machine is
  not busy (#59).
* **Pages navigated again.** A page whose rendering went well is not closed:
  the next page of its context is rendered in it (``page.goto``), which
  spares Chromium a page's set-up and tear-down (a renderer's, a target's).
  Only a page that nothing of the project's touched is reused: not one a
  callback keeps (``playwright_include_page``), one given in
  ``playwright_page``, one with ``playwright_page_init_callback`` or
  ``playwright_page_event_handlers``, or page methods other than waits,
  ``evaluate`` and captures (:data:`_REUSE_SAFE_METHODS`); what such a page
  does can outlive its navigation. An idle page forgets its tab's session
  (``sessionStorage``, ``window.name``), aborts whatever its document still
  fetches, gives up its place in its context's page limit to a page that
  waits for one, and is closed when making it idle takes more than
  :data:`_IDLE_SETUP_S`, or when the next URL differs only by its fragment
  (``page.goto`` would only scroll). ``SPEEDUP_BROWSER_PAGE_REUSE_ENABLED``.
* **A timeout on every browser operation**: the navigation and every page
  operation (Playwright's default timeouts), and the whole of a page's
  rendering, page methods included: past ``SPEEDUP_BROWSER_TIMEOUT_SECONDS``
  the page is closed and the download fails with ``DownloadTimeoutError``,
  which ``RetryMiddleware`` retries. A page is never left open to hold its
  context's page limit (#6, #133, #266).
* **A crashed browser restarted.** When Chromium dies, the pages it was
  rendering fail; the handler launches a new browser and renders them again
  (up to 3 times a page), so none is lost. A page whose renderer alone died
  (killed, out of memory) fails at once and is rendered again in a new page.
* **Stats**: time in the browser per page, the browser's RSS, contexts
  recycled, restarts, timeouts (docs/reference/stats.rst).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urldefrag

from playwright._impl._errors import TargetClosedError
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import TimeoutError as PlaywrightTimeoutError
from scrapy import signals
from scrapy.exceptions import DownloadTimeoutError
from scrapy_playwright.handler import ScrapyPlaywrightDownloadHandler
from scrapy_playwright.page import PageMethod

from scrapy_speedup.browser.router import ROUTE_KEY, TWIN_ROUTE, BrowserRouter
from scrapy_speedup.config import SpeedupConfig

if TYPE_CHECKING:
    from scrapy.crawler import Crawler
    from scrapy.http import Request, Response

__all__ = ["SpeedupPlaywrightHandler"]

logger = logging.getLogger(__name__)

_STAT = "speedup/browser/"
#: Set in a request's meta when the handler chose its context: a retry of it
#: then gets the context of the moment, not a recycled one.
CONTEXT_CHOSEN_KEY = "_speedup_browser_context"
_CONTEXT_PREFIX = "speedup-"
# How often the gate and the RSS are looked at: often enough to follow a
# crawl's load, rarely enough that reading /proc costs nothing.
_TICK_S = 1.0
# Memory is short when less than this share of the machine's is available.
_LOW_MEMORY_SHARE = 0.1
# Renders of one page after its browser died, before the page fails.
_CRASH_RETRIES = 3
# Time for Chromium to start, on top of a page's timeout: ~1 s on an idle
# machine, several on a loaded one.
_LAUNCH_S = 30.0
#: Page methods whose effects end with the page's next navigation: a page
#: they ran on may render the next page. Others (``set_viewport_size``,
#: ``route``, ``add_init_script``, ``expose_function``, ``set_extra_http_headers``,
#: a click that arms a ``beforeunload``, a callable) leave state on the page.
_REUSE_SAFE_METHODS = frozenset({
    "wait_for_selector", "wait_for_load_state", "wait_for_timeout", "wait_for_function",
    "wait_for_url", "evaluate", "screenshot", "pdf", "content", "title",
})
#: How long making a page idle may take (three quick calls) before it is
#: closed instead.
_IDLE_SETUP_S = 5.0
#: The tab's sessionStorage (of the page's origin) and window.name, which
#: survive a navigation; about:blank's sessionStorage throws.
_FORGET_SESSION = "() => { window.name = ''; try { sessionStorage.clear() } catch (e) {} }"
#: Set on a Playwright page while the handler may hand it to the next
#: request of its context once this one is done.
_REUSE_ATTR = "_speedup_reuse"


async def _abort(route: Any) -> None:
    """An idle page's route: it fetches nothing."""
    with contextlib.suppress(PlaywrightError):
        await route.abort()


def _page_reusable(request: Request) -> bool:
    """Whether nothing the project asked of *request*'s page can outlive its
    next navigation (see the module's doc)."""
    meta = request.meta
    if (meta.get("playwright_include_page") or meta.get("playwright_page") is not None
            or meta.get("playwright_page_init_callback")
            or meta.get("playwright_page_event_handlers")):
        return False
    methods = meta.get("playwright_page_methods") or ()
    if isinstance(methods, dict):
        methods = methods.values()
    return all(isinstance(m, PageMethod) and isinstance(m.method, str)
               and m.method in _REUSE_SAFE_METHODS for m in methods)


class _PageGate:
    """An asyncio semaphore whose size can change."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        # Ahead of the others: the browser router's second fetches, on which
        # a kind's decision and its held pages wait.
        self._first: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters) + len(self._first)

    async def acquire(self, first: bool = False) -> None:
        if self.in_use < self.limit and not self.waiting:
            self.in_use += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._first if first else self._waiters
        queue.append(future)
        try:
            await future  # the releaser counted us in
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # counted in, and cancelled before running
            else:
                queue.remove(future)
            raise

    def release(self) -> None:
        self.in_use -= 1
        self._wake()

    def resize(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        while self.waiting and self.in_use < self.limit:
            future = (self._first or self._waiters).popleft()
            if not future.done():
                self.in_use += 1
                future.set_result(None)


def _unless_gone(
    call: Callable[..., Awaitable[Any]], gone: asyncio.Future[None]
) -> Callable[..., Awaitable[Any]]:
    """*call* (a browser's ``new_context``, a context's ``new_page``), failing
    with ``TargetClosedError`` if the browser disconnects first.

    Playwright does not always answer one of these sent to a browser killed
    before it answered: the call waited for the handler's outer timeout, 70 s,
    and the crawl with it (a CI failure). Failing as a call to a dead browser
    does, the page is rendered again in the new one, and scrapy-playwright,
    which catches the error, gives back the context's place the call held.
    """

    async def unless_gone(*args: Any, **kwargs: Any) -> Any:
        calling = asyncio.ensure_future(call(*args, **kwargs))
        try:
            await asyncio.wait({calling, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not calling.done():
                calling.cancel()
                # Its result, a page of the dead browser, or its error: nothing to keep.
                calling.add_done_callback(lambda done: done.cancelled() or done.exception())
        if calling.done() and not calling.cancelled():
            return calling.result()
        raise TargetClosedError("the browser died before it answered")

    return unless_gone


class PageCrashedError(PlaywrightError):  # type: ignore[misc]
    """The page's renderer died (killed, out of memory) while it rendered."""


#: Playwright's words for a page whose renderer died: "Target crashed" (a
#: call to it), "Page crashed" and "Navigation failed because page crashed!"
#: (its navigation). Those words, not "crashed" anywhere: an error names the
#: page's URL ("net::ERR_CONNECTION_RESET at https://…/car-crashed.html"),
#: and a page that failed so was rendered 3 times more and counted a crash.
#: (A URL has no spaces.)
_CRASHED_WORDS = re.compile(r"\b(?:target|page) crashed\b", re.IGNORECASE)


def _crashed(exc: BaseException) -> bool:
    """Whether a Playwright error says the page's renderer died: ours, or
    Playwright's (:data:`_CRASHED_WORDS`)."""
    return isinstance(exc, PageCrashedError) or bool(_CRASHED_WORDS.search(str(exc)))


async def _unless_crashed(page: Any, rendering: Awaitable[Any]) -> Any:
    """*rendering* of *page*, failing with :class:`PageCrashedError` as soon
    as the page crashes: a crashed page's navigation waited out its timeout
    (Playwright does not always fail it), and then RetryMiddleware's retry."""
    crashed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_crash(*_: Any) -> None:
        if not crashed.done():
            crashed.set_result(None)

    page.on("crash", on_crash)
    task = asyncio.ensure_future(rendering)
    try:
        await asyncio.wait({task, crashed}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        # It may have failed in the same step: its error is not to be logged.
        task.add_done_callback(lambda done: done.cancelled() or done.exception())
        raise
    finally:
        page.remove_listener("crash", on_crash)
    if task.done():
        return task.result()
    task.cancel()
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    raise PageCrashedError("the page crashed while it rendered")


class SpeedupPlaywrightHandler(ScrapyPlaywrightDownloadHandler):  # type: ignore[misc]
    """Set by the add-on for http and https when the browser is on."""

    def __init__(self, crawler: Crawler) -> None:
        super().__init__(crawler)
        config = SpeedupConfig.of(crawler)
        self._speedup_crawler = crawler
        self.timeout_s = config.browser_timeout_seconds
        self.context_max_pages = config.browser_context_max_pages
        self.max_pages = config.browser_max_pages
        self.page_reuse = config.browser_page_reuse_enabled
        #: Pages done well and kept open for the next page, by context name.
        #: Each still holds its place in its context's page limit.
        self._idle_pages: dict[str, list[Any]] = {}
        #: Requests opening a new page, by context name: they may wait for a
        #: place in its page limit that only an idle page's closing gives back.
        self._opening: Counter[str] = Counter()
        self.gate = _PageGate(self.max_pages)
        if config.browser_router_enabled:
            BrowserRouter.of(crawler).gates.append(self.gate)
        self._generation = 0
        self._assigned = 0  # pages given to the current context
        self._open_pages: Counter[str] = Counter()
        self._retired: set[str] = set()
        self._launched = 0
        self._restarted: set[int] = set()  # ids of the dead browsers replaced
        self._ticker: asyncio.Task[None] | None = None
        self._busy_before = ""  # why the last tick found the machine busy
        # The router samples a crawl's first pages in the browser: launched
        # at this handler's first download (plain), Chromium's start (a second
        # or more) is not on the path of the first samples, which hold the
        # crawl's first links. Not with the engine: Scrapy builds a handler
        # for http and one for https, and each would launch a browser that a
        # crawl of one scheme never uses. (Not on scrapy-playwright's threaded
        # loop, Windows': the download runs outside the loop of the browser.)
        self._launch_early = config.browser_router_enabled and not self.config.use_threaded_loop
        self._early_launch: asyncio.Task[None] | None = None
        self._counted_browser: Any = None  # the last browser counted in _launched
        # Done when that browser disconnects (see _unless_gone).
        self._counted_browser_gone: asyncio.Future[None] | None = None
        # The contexts of the running browser, also those scrapy-playwright
        # has already forgotten (it drops a context when its "close" event
        # comes, which a dying browser sends before "disconnected").
        self._wrappers: list[Any] = []
        crawler.signals.connect(self._spider_opened, signal=signals.spider_opened)
        crawler.signals.connect(self._spider_closed, signal=signals.spider_closed)

    # -- the download ---------------------------------------------------------

    async def download_request(self, request: Request) -> Response:  # type: ignore[override]
        if self._launch_early and self._early_launch is None:
            self._early_launch = asyncio.get_running_loop().create_task(
                self._launch_browser_early()
            )
        if not request.meta.get("playwright"):
            return await super().download_request(request)  # type: ignore[no-any-return]
        stats = self._speedup_crawler.stats
        assert stats is not None
        # The router's second fetches (a sample's, a held page's) first: the
        # output of their pages, and a kind's decision, wait on them.
        await self.gate.acquire(first=request.meta.get(ROUTE_KEY) == TWIN_ROUTE)
        started = time.monotonic()
        try:
            for attempt in range(_CRASH_RETRIES + 1):
                name = self._choose_context(request)
                try:
                    # The page's own timeout (below) covers its rendering; this
                    # one the rest: a browser that does not start, a page that
                    # cannot be opened in a context of a browser that died.
                    async with asyncio.timeout(2 * self.timeout_s + _LAUNCH_S):
                        return await super().download_request(  # type: ignore[no-any-return]
                            request
                        )
                except TimeoutError:
                    stats.inc_value(_STAT + "timeout_count")
                    raise DownloadTimeoutError(
                        f"the browser took more than {2 * self.timeout_s + _LAUNCH_S:g} s to"
                        f" open a page for {request.url} (SPEEDUP_BROWSER_TIMEOUT_SECONDS)"
                    ) from None
                except PlaywrightError as exc:
                    died = self._browser_died()
                    if attempt == _CRASH_RETRIES or not (died or _crashed(exc)):
                        raise
                    if died:
                        logger.warning("scrapy-speedup: the browser died while rendering %s;"
                                       " restarting it and rendering the page again",
                                       request.url, extra={"crawler": self._speedup_crawler})
                        await self._forget_dead_browser()
                    else:
                        # Not in the same page: a page given to the callback
                        # (playwright_include_page) is in the meta from the
                        # first rendering, and scrapy-playwright renders again
                        # in it while it is open; a crashed page is closed only
                        # later (_close_when_crashed), and each retry failed at
                        # once ("Page.route: Target crashed"): the page was lost.
                        request.meta.pop("playwright_page", None)
                        stats.inc_value(_STAT + "page_crash_count")
                        logger.warning("scrapy-speedup: the page rendering %s crashed (%s);"
                                       " rendering it again in a new page", request.url, exc,
                                       extra={"crawler": self._speedup_crawler})
                finally:
                    if name is not None:
                        await self._page_done(name)
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            self.gate.release()
            elapsed_ms = (time.monotonic() - started) * 1000
            stats.inc_value(_STAT + "page_ms_total", round(elapsed_ms))
            stats.max_value(_STAT + "page_ms_max", round(elapsed_ms))
            stats.inc_value(_STAT + "rendered_count")

    async def _download_request_with_page(
        self, request: Request, page: Any, spider: Any
    ) -> Response:
        # Inside scrapy-playwright's try: on the timeout it closes the page,
        # which frees the page's place in its context (#6, #133).
        try:
            try:
                async with asyncio.timeout(self.timeout_s):
                    return await _unless_crashed(  # type: ignore[no-any-return]
                        page, super()._download_request_with_page(request, page, spider)
                    )
            except BaseException:
                # A page whose rendering failed is closed, not reused: what
                # it holds is not known.
                setattr(page, _REUSE_ATTR, False)
                raise
        except (TimeoutError, PlaywrightTimeoutError):
            # Playwright's own (the navigation's) too: as DownloadTimeoutError,
            # RetryMiddleware retries it; Playwright's it would not.
            assert self._speedup_crawler.stats is not None
            self._speedup_crawler.stats.inc_value(_STAT + "timeout_count")
            raise DownloadTimeoutError(
                f"the browser took more than {self.timeout_s:g} s"
                f" (SPEEDUP_BROWSER_TIMEOUT_SECONDS) to render {request.url}"
            ) from None

    async def _create_page(self, request: Request, spider: Any) -> Any:
        name: str | None = request.meta.get("playwright_context")
        # Only in the contexts the handler chose (recycled, never the project's).
        reuse = (self.page_reuse and name is not None
                 and bool(request.meta.get(CONTEXT_CHOSEN_KEY)) and _page_reusable(request))
        if reuse and name is not None:
            idle = self._idle_pages.get(name, [])
            while idle:
                page = idle.pop()
                if "#" in request.url and urldefrag(page.url)[0] == urldefrag(request.url)[0]:
                    # Its document's URL but for the fragment: page.goto would
                    # only scroll it (no response: a 200 without headers), not
                    # load it again, as a retry of a 503 must.
                    with contextlib.suppress(PlaywrightError):
                        await page.close()  # not to be reused while idle: really closed
                    continue
                if not page.is_closed():
                    setattr(page, _REUSE_ATTR, True)
                    assert self._speedup_crawler.stats is not None
                    self._speedup_crawler.stats.inc_value(_STAT + "page_reused_count")
                    return page
        if name is not None:
            # Idle pages hold their places in the context's page limit
            # (PLAYWRIGHT_MAX_PAGES_PER_CONTEXT): one that does not go to this
            # page gives its place up, or this page might wait for one forever.
            wrapper = self.context_wrappers.get(name)
            idle = self._idle_pages.get(name, [])
            if idle and wrapper is not None and wrapper.semaphore.locked():
                with contextlib.suppress(PlaywrightError):
                    await idle.pop().close()  # not to be reused: really closed
            self._opening[name] += 1
        try:
            page = await super()._create_page(request, spider)
        finally:
            if name is not None:
                self._opening[name] -= 1
                if not self._opening[name]:
                    del self._opening[name]  # (a name a context had, once)
        if self.page_reuse and name is not None:
            self._keep_on_close(page, name)
        self._close_when_crashed(page, name)
        setattr(page, _REUSE_ATTR, reuse)
        return page

    def _keep_on_close(self, page: Any, name: str) -> None:
        """scrapy-playwright closes a page once its response is read: keep it
        open for the next page of its context instead, when it may be reused."""
        close = page.close

        async def keep_or_close(*args: Any, **kwargs: Any) -> None:
            idle = self._idle_pages.setdefault(name, [])
            if (args or kwargs or not getattr(page, _REUSE_ATTR, False) or page.is_closed()
                    or name in self._retired or name not in self.context_wrappers
                    # No more than the pages rendered at once, which the
                    # handler cuts when memory runs short (_tick).
                    or len(idle) >= self.gate.limit
                    # A page waits for a place in the context's limit: this one's.
                    or (self._opening[name] > 0
                        and self.context_wrappers[name].semaphore.locked())):
                await close(*args, **kwargs)
                return
            setattr(page, _REUSE_ATTR, False)  # until it is handed out again
            try:
                async with asyncio.timeout(_IDLE_SETUP_S):
                    await self._make_idle(page)
            except (PlaywrightError, TimeoutError):
                # A page that cannot be made idle at once (its script holds
                # its main thread, say) is closed: its rendering went well.
                with contextlib.suppress(PlaywrightError):
                    await close()
                return
            idle.append(page)

        page.close = keep_or_close

    def _close_when_crashed(self, page: Any, name: str | None) -> None:
        """Close a page whose renderer died (killed, out of memory), idle or
        not: it can render nothing more, and open it kept its target and its
        place in its context's page limit until the context closed. Its
        rendering, if one was under way, is rendered again: see
        :func:`_unless_crashed` and ``download_request``."""

        def crashed(*_: Any) -> None:
            setattr(page, _REUSE_ATTR, False)  # closed for real, not kept idle
            with contextlib.suppress(ValueError):
                self._idle_pages.get(name or "", []).remove(page)
            task = asyncio.ensure_future(page.close())
            task.add_done_callback(lambda done: done.cancelled() or done.exception())

        page.on("crash", crashed)

    @staticmethod
    async def _make_idle(page: Any) -> None:
        """Make a page that rendered well ready for the next page of its context."""
        # Each rendering routes "**" anew (scrapy-playwright's handler
        # for its request): the last one's goes. While idle, what the
        # document still fetches (a timer's, a refresh's) is aborted:
        # a closed page fetched nothing more, and unrouted it would
        # escape PLAYWRIGHT_ABORT_REQUEST (the blocked resource types).
        # The next rendering's route, the last one, comes first: it
        # answers every request, and _abort goes with it here.
        await page.unroute("**")
        await page.route("**", _abort)
        # What a tab keeps across its navigations, and a new page has
        # not: the next page would render what this one left there.
        await page.evaluate(_FORGET_SESSION)

    async def _create_browser_context(self, *args: Any, **kwargs: Any) -> Any:
        wrapper = await super()._create_browser_context(*args, **kwargs)
        self._wrappers.append(wrapper)
        if (self._counted_browser_gone is not None
                and wrapper.context.browser is self._counted_browser):
            # (A persistent context has no browser to watch.)
            wrapper.context.new_page = _unless_gone(wrapper.context.new_page,
                                                    self._counted_browser_gone)
        # Every page operation (a wait_for_selector among playwright_page_methods,
        # a click) gets the timeout, not only the navigation.
        wrapper.context.set_default_timeout(self.timeout_s * 1000)
        return wrapper

    async def _launch_browser_early(self) -> None:
        try:
            async with asyncio.timeout(_LAUNCH_S):
                await self._maybe_launch_browser()
        except Exception as exc:  # noqa: BLE001 - the first page's launch reports it
            logger.debug("scrapy-speedup: launching the browser early failed (%s: %s); the"
                         " first page rendered launches it", type(exc).__name__, exc,
                         extra={"crawler": self._speedup_crawler})

    async def _close(self) -> None:
        if self._early_launch is not None:
            # A browser being launched is closed below only once it is there.
            with contextlib.suppress(asyncio.CancelledError):
                await self._early_launch
        await super()._close()

    async def _maybe_launch_browser(self) -> None:
        await super()._maybe_launch_browser()
        # By identity: a render that asked while the early launch was under
        # way finds the same new browser as the launch itself.
        browser = getattr(self, "browser", None)
        if browser is not None and browser is not self._counted_browser:
            self._counted_browser = browser
            gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def disconnected(*_: Any) -> None:
                if not gone.done():
                    gone.set_result(None)

            # Playwright's event, not a Scrapy signal: it holds the callback.
            browser.on("disconnected", disconnected)
            self._counted_browser_gone = gone
            browser.new_context = _unless_gone(browser.new_context, gone)
            self._launched += 1
            if self._launched > 1:
                assert self._speedup_crawler.stats is not None
                self._speedup_crawler.stats.inc_value(_STAT + "restart_count")

    # -- contexts -------------------------------------------------------------

    def _choose_context(self, request: Request) -> str | None:
        """The recycled context for this page, or None when the project chose one."""
        if request.meta.get("playwright_context") and not request.meta.get(CONTEXT_CHOSEN_KEY):
            return None
        if request.meta.get("playwright_include_page"):
            # The callback holds the page: its context must outlive the
            # download, so it is not one that recycling may close.
            return None
        if self._assigned >= self.context_max_pages:
            old = f"{_CONTEXT_PREFIX}{self._generation}"
            self._retired.add(old)
            if not self._open_pages[old]:  # its pages all done already
                self._open_pages[old] += 1  # _page_done takes it back
                asyncio.get_running_loop().create_task(self._page_done(old))
            self._generation += 1
            self._assigned = 0
        self._assigned += 1
        name = f"{_CONTEXT_PREFIX}{self._generation}"
        request.meta["playwright_context"] = name
        request.meta[CONTEXT_CHOSEN_KEY] = True
        self._open_pages[name] += 1
        return name

    async def _page_done(self, name: str) -> None:
        self._open_pages[name] -= 1
        if self._open_pages[name] > 0 or name not in self._retired:
            return
        del self._open_pages[name]
        self._retired.discard(name)
        self._idle_pages.pop(name, None)  # closed with their context
        wrapper = self.context_wrappers.get(name)
        if wrapper is None:
            return  # never opened, or gone with a dead browser
        if wrapper in self._wrappers:
            self._wrappers.remove(wrapper)
        with contextlib.suppress(PlaywrightError):
            await wrapper.context.close()
        assert self._speedup_crawler.stats is not None
        self._speedup_crawler.stats.inc_value(_STAT + "context_recycled_count")

    # -- a dead browser -------------------------------------------------------

    def _browser_died(self) -> bool:
        browser = getattr(self, "browser", None)
        return browser is not None and not browser.is_connected()

    async def _forget_dead_browser(self) -> None:
        """What scrapy-playwright's disconnected callback does, at once: the
        page must not be rendered again in the dead browser."""
        async with self.browser_launch_lock:
            browser = getattr(self, "browser", None)
            if browser is None or browser.is_connected() or id(browser) in self._restarted:
                return
            self._restarted.add(id(browser))
            self._unblock_dead_contexts()
            del self.browser

    async def _browser_disconnected_callback(self) -> None:
        browser = getattr(self, "browser", None)
        if browser is not None and browser.is_connected():
            # The news of a browser already replaced (_forget_dead_browser):
            # scrapy-playwright would close the new one's contexts.
            return
        self._unblock_dead_contexts()
        await super()._browser_disconnected_callback()

    def _unblock_dead_contexts(self) -> None:
        """A dead browser's pages never emit "close", so their places in their
        context's page limit are never given back, and a request waiting for
        one would wait forever: let the waiters through, to fail on the dead
        context and be rendered again in the new browser."""
        wrappers, self._wrappers = self._wrappers, []
        self.context_wrappers.clear()
        self._idle_pages.clear()
        for wrapper in wrappers:
            for _ in range(self.config.max_pages_per_context):
                wrapper.semaphore.release()

    # -- the gate and the RSS, every second -----------------------------------

    def _spider_opened(self) -> None:
        self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())

    def _spider_closed(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    async def _tick_forever(self) -> None:
        import psutil

        while True:
            await asyncio.sleep(_TICK_S)
            try:
                self._tick(psutil)
            except Exception:  # a tick must never end the ticking
                logger.exception("scrapy-speedup: browser health tick failed",
                                 extra={"crawler": self._speedup_crawler})

    def _tick(self, psutil: Any) -> None:
        stats = self._speedup_crawler.stats
        assert stats is not None
        rss = self.browser_rss_bytes(psutil)
        if rss:
            stats.max_value(_STAT + "rss_max_mb", round(rss / 2**20))
        busy = self._busy(psutil)
        # Shrunk when the load lasts: one slow second (a collection, a burst
        # of callbacks, Chromium starting) took a quarter of the pages for
        # seconds while the rest of the crawl had the CPU to spare.
        sustained = bool(busy) and bool(self._busy_before)
        self._busy_before = busy
        limit = self.gate.limit
        if sustained:
            limit = max(1, limit - max(1, limit // 4))
        elif self.gate.waiting and not busy:  # one busy second: neither way
            limit = min(self.max_pages, limit + 1)
        if limit != self.gate.limit:
            logger.debug("scrapy-speedup: browser pages at once %d -> %d%s", self.gate.limit,
                         limit, f" ({busy})" if busy else "",
                         extra={"crawler": self._speedup_crawler})
            self.gate.resize(limit)
        stats.min_value(_STAT + "pages_limit_min", limit)

    def _busy(self, psutil: Any) -> str:
        memory = psutil.virtual_memory()
        if memory.available < _LOW_MEMORY_SHARE * memory.total:
            return f"memory available {memory.available / 2**20:.0f} MB"
        from scrapy_speedup.extension import SpeedupExtension

        ext = self._speedup_crawler.get_extension(SpeedupExtension)
        doctor = ext.doctor if ext is not None else None
        if doctor is not None:
            load = doctor.load
            if load.cpu_share >= 0.9 or load.lag_max_s > doctor.warn_s:
                return f"reactor CPU {load.cpu_share:.0%}, lag {load.lag_max_s * 1000:.0f} ms"
        return ""

    def browser_rss_bytes(self, psutil: Any) -> int:
        """The RSS of Playwright's driver and the browser processes under it."""
        try:
            manager = self.browser_provider.playwright_context_manager  # type: ignore[attr-defined]
            pid = manager._connection._transport._proc.pid
            root = psutil.Process(pid)
            total = 0
            for process in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += process.memory_info().rss
            return total
        except (AttributeError, psutil.Error):
            return 0  # not launched yet, or a remote browser
