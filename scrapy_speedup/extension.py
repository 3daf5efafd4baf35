"""The extension that owns scrapy-speedup's pools for one crawler."""

from __future__ import annotations

import logging
import platform
import weakref
from typing import TYPE_CHECKING, Any

import scrapy
import twisted
from scrapy import signals
from scrapy.exceptions import NotConfigured

from scrapy_speedup._bridge import Bridge
from scrapy_speedup._process_pool import ProcessPool, warm_up_fork_server
from scrapy_speedup.config import SpeedupConfig

if TYPE_CHECKING:
    from collections.abc import Callable

    # typing.Self requires Python 3.11
    from typing import Self

    from scrapy import Spider
    from scrapy.crawler import Crawler

__all__ = ["SpeedupExtension"]

logger = logging.getLogger(__name__)

# Crawls of this process whose speedup is on, so that run_in_process() finds
# the pools without being passed the crawler when only one crawl runs. This
# is a lookup table: the pools themselves belong to each extension.
_running: weakref.WeakSet[SpeedupExtension] = weakref.WeakSet()


def running_extensions() -> list[SpeedupExtension]:
    return list(_running)


class SpeedupExtension:
    """Owns the process pool of one crawler: starts it once the reactor runs,
    drains and shuts it down when the spider closes, logs and counts.

    Reach it from a component with ``SpeedupExtension.of(crawler)``.
    """

    def __init__(self, crawler: Crawler, config: SpeedupConfig) -> None:
        self.crawler = crawler
        self.config = config
        self._pool: ProcessPool | None = None

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        config = SpeedupConfig.from_settings(crawler.settings)
        if not config.enabled:
            raise NotConfigured
        ext = cls(crawler, config)
        if config.process_enabled:
            warm_up_fork_server(config)
        crawler.signals.connect(ext.spider_opened, signal=signals.spider_opened)
        crawler.signals.connect(ext.spider_closed, signal=signals.spider_closed)
        _running.add(ext)
        return ext

    @classmethod
    def of(cls, crawler: Crawler) -> Self:
        """The extension of *crawler*; raises if scrapy-speedup is not enabled."""
        ext = crawler.get_extension(cls)
        if ext is None:
            raise RuntimeError(
                "scrapy-speedup is not enabled for this crawler: add"
                ' ADDONS = {"scrapy_speedup.Addon": 500} to its settings'
                " (and leave SPEEDUP_ENABLED unset or True)"
            )
        return ext

    @property
    def pool(self) -> ProcessPool:
        """The crawl's process pool, created on first use (the reactor runs by then)."""
        if self._pool is None:
            self._pool = ProcessPool(self.crawler, self.config, Bridge())
        return self._pool

    async def run_in_process(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``func(*args, **kwargs)`` in this crawl's process pool."""
        if not self.config.process_enabled:
            return getattr(func, "__speedup_wrapped__", func)(*args, **kwargs)
        return await self.pool.run(func, args, kwargs)

    def spider_opened(self, spider: Spider) -> None:
        from scrapy_speedup import __version__

        config = self.config
        # Workers start on the first offload (or now, for the pipelines that
        # run in them, whose open_spider waits for them): a crawl that never
        # offloads, or whose calls all turn out cheap, pays almost nothing.
        logger.info(
            "scrapy-speedup %s (Scrapy %s, Twisted %s, Python %s) on the %s: %s",
            __version__,
            scrapy.__version__,
            twisted.__version__,
            platform.python_version(),
            self.pool.bridge.runtime if config.process_enabled else Bridge().runtime,
            (
                f"process pool of {config.process_workers} workers"
                f" ({config.process_start_method}), {config.process_max_in_flight}"
                f" tasks in flight at most, pipelines in workers:"
                f" {list(config.process_pipelines) or 'none'}"
            )
            if config.process_enabled
            else "process pool off (SPEEDUP_PROCESS_ENABLED=False)",
            extra={"crawler": self.crawler},
        )

    async def spider_closed(self, spider: Spider, reason: str) -> None:
        _running.discard(self)
        if self._pool is not None:
            await self._pool.close()
        self._log_summary()

    def _log_summary(self) -> None:
        if self._pool is None:
            return
        stats = self.crawler.stats

        def count(name: str) -> int:
            return int(stats.get_value(f"speedup/process/{name}", 0))

        logger.info(
            "scrapy-speedup process pool: %d tasks: %d succeeded, %d dropped,"
            " %d errored, %d abandoned (%d ran inline); %d retries,"
            " %d worker crashes, %d timeouts",
            count("task_count"),
            count("succeeded_count"),
            count("dropped_count"),
            count("error_count"),
            count("abandoned_count"),
            count("inline_count"),
            count("retry_count"),
            count("worker_crash_count"),
            count("timeout_count"),
            extra={"crawler": self.crawler},
        )
