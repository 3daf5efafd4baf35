"""The settings the add-on writes when the browser is on: scrapy-playwright's
download handler (ours, :class:`~.handler.SpeedupPlaywrightHandler`), the
Chromium to launch, the resource types to block, the timeouts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scrapy.settings import SETTINGS_PRIORITIES

from scrapy_speedup.config import find_browser_executable
from scrapy_speedup.exceptions import SpeedupSettingsError

if TYPE_CHECKING:
    from scrapy.settings import BaseSettings

    from scrapy_speedup.config import SpeedupConfig

__all__ = ["ResourceBlocker", "configure_browser"]

_HANDLER = "scrapy_speedup.browser.handler.SpeedupPlaywrightHandler"
_PLAYWRIGHT_HANDLER = "scrapy_playwright.handler.ScrapyPlaywrightDownloadHandler"
_ASYNCIO_REACTOR = "twisted.internet.asyncioreactor.AsyncioSelectorReactor"
_ROUTER_DOWNLOADER_ORDER = 50  # before every other: see BrowserRouterDownloaderMiddleware
_ROUTER_SPIDER_ORDER = 1000  # closest to the spider: it compares the callback's own output


class ResourceBlocker:
    """``PLAYWRIGHT_ABORT_REQUEST``: abort the browser's requests for these
    resource types (images, media and fonts by default: a crawl reads the
    DOM, and they are most of a page's bytes, scrapy-playwright#46)."""

    def __init__(self, resource_types: tuple[str, ...]) -> None:
        self.resource_types = frozenset(resource_types)

    def __call__(self, request: Any) -> bool:
        return request.resource_type in self.resource_types

    def __repr__(self) -> str:
        return f"ResourceBlocker({sorted(self.resource_types)})"


def configure_browser(settings: BaseSettings, config: SpeedupConfig) -> None:
    """Write scrapy-playwright's settings, at "addon" priority, so that the
    project's own values win."""
    try:
        import scrapy_playwright  # noqa: F401
    except ImportError:
        raise SpeedupSettingsError(
            "SPEEDUP_BROWSER_ROUTER_ENABLED / SPEEDUP_BROWSER_ENABLED need scrapy-playwright:"
            " pip install 'scrapy-speedup[playwright]'"
        ) from None
    reactor = settings.get("TWISTED_REACTOR")
    if not settings.getbool("TWISTED_REACTOR_ENABLED", True) or (
        reactor and reactor != _ASYNCIO_REACTOR
    ):
        raise SpeedupSettingsError(
            "SPEEDUP_BROWSER_ROUTER_ENABLED / SPEEDUP_BROWSER_ENABLED need the asyncio reactor"
            f" (scrapy-playwright runs on asyncio): TWISTED_REACTOR is {reactor!r}; set it to"
            f" {_ASYNCIO_REACTOR!r}, Scrapy's default"
        )
    settings.set("TWISTED_REACTOR", _ASYNCIO_REACTOR, priority="addon")
    _handlers(settings)
    addon = SETTINGS_PRIORITIES["addon"]
    options = dict(settings.getdict("PLAYWRIGHT_LAUNCH_OPTIONS"))
    remote = settings.get("PLAYWRIGHT_CDP_URL") or settings.get("PLAYWRIGHT_CONNECT_URL")
    if not remote and "executable_path" not in options:
        headless = bool(options.get("headless", True))
        executable = find_browser_executable(config.browser_executable, headless)
        if executable is None:
            # The headless shell has no window: not one to look for, nor to
            # install, for a browser with one.
            looked_for, install = (
                ("chromium-headless-shell, chromium or chromium-browser on PATH",
                 "chromium-headless-shell, or chromium") if headless else
                ('chromium or chromium-browser on PATH; PLAYWRIGHT_LAUNCH_OPTIONS {"headless":'
                 " false} asks for a window, which the headless shell has not", "chromium"))
            raise SpeedupSettingsError(
                f"scrapy-speedup's browser found no Chromium ({looked_for}): install Debian's"
                f" package (apt-get install {install}), or"
                " name one with SPEEDUP_BROWSER_EXECUTABLE or PLAYWRIGHT_LAUNCH_OPTIONS"
                ' {"executable_path": ...}'
            )
        options["executable_path"] = executable
        args = list(options.get("args", []))
        # Chromium refuses to start as root with its sandbox (containers, CI).
        if os.geteuid() == 0 and "--no-sandbox" not in args:
            args.append("--no-sandbox")
        # Without the headless shell, the new headless mode is the full
        # browser without a window (the shell is headless already).
        shell = Path(executable).name.startswith("chromium-headless-shell")
        if headless and not shell and not any(a.startswith("--headless") for a in args):
            args.append("--headless=new")
        # Chromium starts a renderer process for each new page; pages that
        # share one renderer per core cost a quarter less CPU each (measured:
        # docs/benchmarks.rst, "Pages that need JavaScript").
        if not any(a.startswith("--renderer-process-limit") for a in args):
            args.append(f"--renderer-process-limit={os.cpu_count() or 1}")
        options["args"] = args
        priority = max(settings.getpriority("PLAYWRIGHT_LAUNCH_OPTIONS") or 0, addon)
        settings.set("PLAYWRIGHT_LAUNCH_OPTIONS", options, priority=priority)
    if config.browser_blocked_resource_types:
        settings.set("PLAYWRIGHT_ABORT_REQUEST",
                     ResourceBlocker(config.browser_blocked_resource_types), priority="addon")
    settings.set("PLAYWRIGHT_DEFAULT_NAVIGATION_TIMEOUT",
                 config.browser_timeout_seconds * 1000, priority="addon")
    # The pages open at once are held by the handler's own gate (adapted to
    # the machine's load), below scrapy-playwright's per-context limit
    # (CONCURRENT_REQUESTS by default), which only pages kept open by the
    # project's callbacks (playwright_include_page) reach.
    if config.browser_router_enabled:
        from scrapy_speedup.browser.router import (
            BrowserRouterDownloaderMiddleware,
            BrowserRouterSpiderMiddleware,
        )

        settings.set_in_component_priority_dict(
            "DOWNLOADER_MIDDLEWARES", BrowserRouterDownloaderMiddleware,
            _ROUTER_DOWNLOADER_ORDER,
        )
        settings.set_in_component_priority_dict(
            "SPIDER_MIDDLEWARES", BrowserRouterSpiderMiddleware, _ROUTER_SPIDER_ORDER
        )


def _handlers(settings: BaseSettings) -> None:
    """Our handler for http and https, unless the project has a handler of
    its own there (scrapy-playwright's own is replaced: ours is a subclass)."""
    handlers = settings.getdict("DOWNLOAD_HANDLERS")
    priority = max(settings.getpriority("DOWNLOAD_HANDLERS") or 0, SETTINGS_PRIORITIES["addon"])
    for scheme in ("http", "https"):
        current = handlers.get(scheme)
        name = current if isinstance(current, str) else (
            f"{current.__module__}.{current.__qualname__}" if isinstance(current, type) else None
        )
        if current is None or name in (_PLAYWRIGHT_HANDLER, _HANDLER):
            handlers[scheme] = _HANDLER
        else:
            raise SpeedupSettingsError(
                f"DOWNLOAD_HANDLERS[{scheme!r}] is {current!r}: scrapy-speedup's browser needs"
                f" its own handler there ({_HANDLER}, a subclass of scrapy-playwright's)"
            )
    settings.set("DOWNLOAD_HANDLERS", handlers, priority=priority)
