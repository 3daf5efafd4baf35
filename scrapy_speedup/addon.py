"""``scrapy_speedup.Addon``: one line in ``ADDONS`` turns scrapy-speedup on."""

from __future__ import annotations

import logging
import multiprocessing
import os
from typing import TYPE_CHECKING, Any

from scrapy.settings import SETTINGS_PRIORITIES
from scrapy.utils.misc import load_object

from scrapy_speedup.config import SpeedupConfig
from scrapy_speedup.exceptions import SpeedupSettingsError
from scrapy_speedup.extension import SpeedupExtension
from scrapy_speedup.process.pipeline import process_pipeline_class
from scrapy_speedup.process.pool import warm_up_fork_server

if TYPE_CHECKING:
    from typing import Self

    from scrapy.crawler import Crawler
    from scrapy.settings import BaseSettings

__all__ = ["Addon"]

logger = logging.getLogger(__name__)

# The priority of the settings the add-on must decide in the coordinator and
# in engine processes, whatever the project or the command line says: above
# "cmdline" (40).
_DECIDES = 100
_SCRAPY_ITEM_PROCESSOR = "scrapy.pipelines.ItemPipelineManager"
_TURN_TAKING_ITEM_PROCESSOR = "scrapy_speedup.crawl.item_turns.TurnTakingItemPipelineManager"
_CLOSESPIDER = (
    "CLOSESPIDER_TIMEOUT", "CLOSESPIDER_ITEMCOUNT", "CLOSESPIDER_PAGECOUNT",
    "CLOSESPIDER_ERRORCOUNT", "CLOSESPIDER_TIMEOUT_NO_ITEM", "CLOSESPIDER_PAGECOUNT_NO_ITEM",
)


def _sqlite_pipelines(settings: BaseSettings) -> dict[type, int]:
    """The SQLite pipelines of ITEM_PIPELINES: with engine processes they run
    in the coordinator, so that a database file has one writer."""
    from scrapy_speedup.db.sqlite import SQLitePipeline

    found: dict[type, int] = {}
    for key, order in settings.getdict("ITEM_PIPELINES").items():
        if order is None:
            continue
        try:
            cls = load_object(key)
        except (ImportError, NameError, ValueError, AttributeError):
            continue  # Scrapy says what is wrong with it
        if isinstance(cls, type) and issubclass(cls, SQLitePipeline):
            found[cls] = order
    return found


class Addon:
    """Enable with ``ADDONS = {"scrapy_speedup.Addon": 500}``.

    Adds :class:`SpeedupExtension` and moves the pipelines listed in
    ``SPEEDUP_PROCESS_PIPELINES`` into the process pool. Settings are checked
    here, so a bad value stops the crawl before it starts.

    With ``SPEEDUP_CRAWL_PROCESSES`` above 1 it makes the crawler the
    coordinator of engine processes, or, in an engine process, an engine
    (see :mod:`scrapy_speedup.crawl`).
    """

    def __init__(self, crawler: Crawler | None = None) -> None:
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    def update_settings(self, settings: BaseSettings) -> None:
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # A worker process is starting and importing the main script,
            # which sets up a crawl: without this, every worker would run a
            # crawl of its own and the pool would never start.
            raise RuntimeError(
                "scrapy-speedup: a crawl is being set up while a worker process"
                " starts: the script that runs the crawl runs again in each"
                " worker. Put the code that starts the crawl under"
                " `if __name__ == \"__main__\":`, as multiprocessing requires."
            )
        config = SpeedupConfig.from_settings(settings)
        if not config.enabled:
            return
        if config.coordinates:
            if self.crawler is None:
                raise SpeedupSettingsError(
                    "SPEEDUP_CRAWL_PROCESSES needs the add-on loaded by Scrapy (ADDONS)"
                )
            from scrapy_speedup.crawl.engine_process import remember

            # The engines' settings: as the project and the command line made
            # them, before anything of the coordinator's is set.
            remember(self.crawler, settings)
        settings.set_in_component_priority_dict("EXTENSIONS", SpeedupExtension, 0)
        self._hold_slot_limits(settings)
        if config.coordinates:
            if config.frontier is not None:
                # The machine's frontier scheduler is the Redis one, which the
                # coordinator's dispatcher wraps; its engines lease from it.
                self._on_redis(settings, config)
            self._as_coordinator(settings, config)
            # Started from here, the main thread: it then ignores Ctrl-C, which
            # would otherwise kill it, and the engines it starts, mid-start.
            warm_up_fork_server(config)
            return
        if config.engine_index is not None:
            self._as_engine(settings, config, config.engine_index)
        if config.frontier is not None and config.engine_index is None:
            self._on_redis(settings, config)
        if config.adaptive_enabled:
            from scrapy_speedup.adaptive import AdaptiveConcurrencyMiddleware

            # Above RetryMiddleware (550): it sees a 503 first, and retries it
            # without using Scrapy's retry budget.
            settings.set_in_component_priority_dict(
                "DOWNLOADER_MIDDLEWARES", AdaptiveConcurrencyMiddleware, 580
            )
        if config.browser_enabled:
            from scrapy_speedup.browser.setup import configure_browser

            configure_browser(settings, config)
        if config.process_enabled:
            from scrapy_speedup.process.backpressure import StartBackpressure

            # Outermost (closest to the engine): it paces what start() yields
            # after every other middleware has seen it.
            settings.set_in_component_priority_dict("SPIDER_MIDDLEWARES", StartBackpressure, 0)
        if config.process_enabled and config.process_pipelines:
            self._offload_pipelines(settings, config.process_pipelines)
            # The earliest hook there is: the fork server imports Scrapy while
            # Scrapy builds the crawler, so the first worker starts at once.
            # Only when process work is certain, and local: it costs ~0.4 s
            # of CPU, which a crawl that never offloads should not pay.
            if config.process_executor == "local":
                warm_up_fork_server(config)

    @staticmethod
    def _on_redis(settings: BaseSettings, config: SpeedupConfig) -> None:
        """The crawl's frontier is in Redis (SPEEDUP_FRONTIER_URL): the
        scheduler leases from it, and a download that fails releases its
        site's place there as one that succeeds does."""
        from scrapy_speedup.crawl.lease_scheduler import ReleaseMiddleware
        from scrapy_speedup.redis_frontier.scheduler import LIMITS_SETTING, RedisScheduler

        if settings.get("JOBDIR"):
            raise SpeedupSettingsError(
                "JOBDIR and SPEEDUP_FRONTIER_URL: the frontier is in Redis, which keeps it"
                " between runs; leave JOBDIR unset"
            )
        scheduler = settings.get("SCHEDULER")
        default = "scrapy.core.scheduler.Scheduler"
        if scheduler not in (None, default) and load_object(scheduler) is not \
                load_object(default):
            raise SpeedupSettingsError(
                f"SPEEDUP_FRONTIER_URL replaces the scheduler, and SCHEDULER is {scheduler!r}:"
                " leave SCHEDULER to Scrapy's default"
            )
        stats_class = settings.get("STATS_CLASS")
        stats_path = stats_class if isinstance(stats_class, str) else \
            f"{getattr(stats_class, '__module__', '')}.{getattr(stats_class, '__qualname__', '')}"
        if stats_path.startswith("scrapy_redis."):
            # Its hash <spider>:stats is where the machines add up the crawl's
            # counts: two writers of one hash, and its dates are not counts.
            raise SpeedupSettingsError(
                f"STATS_CLASS is {stats_path!r}, which writes the Redis hash <spider>:stats"
                " that SPEEDUP_FRONTIER_URL keeps the crawl's counts in: remove it (each"
                " machine logs its own and the crawl's counts at close)"
            )
        for name in ("CLOSESPIDER_TIMEOUT_NO_ITEM", "CLOSESPIDER_PAGECOUNT_NO_ITEM"):
            if settings.getfloat(name):
                raise SpeedupSettingsError(
                    f"{name} is not supported with SPEEDUP_FRONTIER_URL yet: the crawl's"
                    " limits are CLOSESPIDER_ITEMCOUNT, _PAGECOUNT, _ERRORCOUNT and _TIMEOUT"
                )
        # The crawl's limits, which its machines apply together; each machine's
        # own CloseSpider would count this machine's pages alone.
        settings.set(LIMITS_SETTING, {
            "itemcount": settings.getint("CLOSESPIDER_ITEMCOUNT"),
            "pagecount": settings.getint("CLOSESPIDER_PAGECOUNT"),
            "errorcount": settings.getint("CLOSESPIDER_ERRORCOUNT"),
            "timeout_s": settings.getfloat("CLOSESPIDER_TIMEOUT"),
        }, priority=_DECIDES)
        for name in ("CLOSESPIDER_ITEMCOUNT", "CLOSESPIDER_PAGECOUNT", "CLOSESPIDER_ERRORCOUNT",
                     "CLOSESPIDER_TIMEOUT"):
            settings.set(name, 0, priority=_DECIDES)
        settings.set("SCHEDULER", RedisScheduler, priority="addon")
        settings.set_in_component_priority_dict(
            "DOWNLOADER_MIDDLEWARES", ReleaseMiddleware, 1000
        )

    @staticmethod
    def _as_coordinator(settings: BaseSettings, config: SpeedupConfig) -> None:
        """The process the user started holds the frontier and downloads
        nothing: its scheduler wraps the project's, its downloader leases to
        the engines, and its item pipelines are the crawl's
        (SPEEDUP_CRAWL_PIPELINES); downloader middlewares run in the engines."""
        from scrapy_speedup.crawl.frontier import INNER_SCHEDULER_SETTING

        if settings.getint("CLOSESPIDER_PAGECOUNT_NO_ITEM"):
            raise SpeedupSettingsError(
                "CLOSESPIDER_PAGECOUNT_NO_ITEM is not supported with SPEEDUP_CRAWL_PROCESSES"
                " above 1 (pages without items in a row have no order across engine"
                " processes); use CLOSESPIDER_TIMEOUT_NO_ITEM"
            )
        if settings.getbool("HTTPCACHE_ENABLED"):
            from scrapy.extensions.httpcache import DbmCacheStorage

            storage = settings.get("HTTPCACHE_STORAGE")
            try:
                storage_cls = load_object(storage)
            except (ImportError, NameError, ValueError, AttributeError):
                storage_cls = None  # Scrapy says what is wrong with it
            if isinstance(storage_cls, type) and issubclass(storage_cls, DbmCacheStorage):
                raise SpeedupSettingsError(
                    f"HTTPCACHE_STORAGE ({storage}) keeps the cache in one database file,"
                    " which the engine processes of SPEEDUP_CRAWL_PROCESSES cannot share:"
                    " use scrapy.extensions.httpcache.FilesystemCacheStorage (Scrapy's"
                    " default, a folder per page)"
                )
        settings.set(INNER_SCHEDULER_SETTING, settings.get("SCHEDULER"), priority=_DECIDES)
        settings.set("SCHEDULER", "scrapy_speedup.crawl.frontier.FrontierScheduler",
                     priority=_DECIDES)
        settings.set("DOWNLOADER", "scrapy_speedup.crawl.downloader.CoordinatorDownloader",
                     priority=_DECIDES)
        settings.set("DOWNLOADER_MIDDLEWARES_BASE", {}, priority=_DECIDES)
        settings.set("DOWNLOADER_MIDDLEWARES", {}, priority=_DECIDES)
        if config.adaptive_enabled:
            # Its limit-setting half: the crawl's slots are here.
            settings.set("DOWNLOADER_MIDDLEWARES", {
                "scrapy_speedup.adaptive.AdaptiveConcurrencyMiddleware": 580,
            }, priority=_DECIDES)
        for path in config.crawl_pipelines:
            try:
                load_object(path)
            except (ImportError, NameError, ValueError, AttributeError) as exc:
                raise SpeedupSettingsError(
                    f"SPEEDUP_CRAWL_PIPELINES lists {path!r}, which cannot be imported: {exc}"
                ) from exc
        crawl_pipelines: dict[Any, int] = dict(config.crawl_pipelines)
        for cls, order in _sqlite_pipelines(settings).items():
            crawl_pipelines[cls] = order
            logger.info(
                "scrapy-speedup: %s runs once for the crawl, in this process (one writer per"
                " SQLite file), after the engine processes' pipelines",
                f"{cls.__module__}.{cls.__qualname__}",
            )
        settings.set("ITEM_PIPELINES_BASE", {}, priority=_DECIDES)
        settings.set("ITEM_PIPELINES", crawl_pipelines, priority=_DECIDES)

    @staticmethod
    def _as_engine(settings: BaseSettings, config: SpeedupConfig, index: int) -> None:
        """An engine process downloads and handles what it is lent. The
        crawl's limits, delays, feeds, JOBDIR and stats dump are the
        coordinator's."""
        decide: dict[str, Any] = {
            "SCHEDULER": "scrapy_speedup.crawl.lease_scheduler.LeaseScheduler",
            "FEEDS": {},
            "DOWNLOAD_DELAY": 0,
            "AUTOTHROTTLE_ENABLED": False,
            "STATS_DUMP": False,
            "LOGSTATS_INTERVAL": 0,
            "JOBDIR": None,
            "TELNETCONSOLE_ENABLED": False,
            "LOG_FILE_APPEND": True,
            # The coordinator's collector persists the crawl's stats, once;
            # an engine's go to the coordinator.
            "STATS_CLASS": "scrapy.statscollectors.MemoryStatsCollector",
            **dict.fromkeys(_CLOSESPIDER, 0),
        }
        slots = settings.getdict("DOWNLOAD_SLOTS")
        if slots:
            decide["DOWNLOAD_SLOTS"] = {
                key: {k: v for k, v in dict(value).items() if k != "delay"}
                for key, value in slots.items()
            }
        for name, value in decide.items():
            settings.set(name, value, priority=_DECIDES)
        if settings.get("ITEM_PROCESSOR") == _SCRAPY_ITEM_PROCESSOR:
            # Items take turns with the responses: see crawl/item_turns.py.
            settings.set("ITEM_PROCESSOR", _TURN_TAKING_ITEM_PROCESSOR, priority="addon")
        for cls in _sqlite_pipelines(settings):  # the coordinator's (see _as_coordinator)
            settings.set_in_component_priority_dict("ITEM_PIPELINES", cls, None)
        # Closest to the download: it sees every download error first.
        from scrapy_speedup.crawl.lease_scheduler import ReleaseMiddleware

        settings.set_in_component_priority_dict("DOWNLOADER_MIDDLEWARES", ReleaseMiddleware, 1000)
        if settings.getpriority("SPEEDUP_PROCESS_WORKERS") is None:
            # One worker per core for the whole crawl, not per engine.
            cores = os.cpu_count() or 1
            settings.set("SPEEDUP_PROCESS_WORKERS",
                         max(1, round(cores / config.crawl_processes)), priority="addon")

    @staticmethod
    def _hold_slot_limits(settings: BaseSettings) -> None:
        """Use a downloader that holds each slot's concurrency under asyncio
        (the user's DOWNLOAD_SLOTS and CONCURRENT_REQUESTS_PER_* limits, and
        the adaptive limit): see scrapy_speedup/downloader.py."""
        from scrapy_speedup.downloader import SpeedupDownloader, downloader_with_slot_limits

        current = settings.get("DOWNLOADER")
        try:
            cls = load_object(current)
        except (ImportError, NameError, ValueError, AttributeError):
            return  # Scrapy says what is wrong with it when it builds the engine
        fixed = downloader_with_slot_limits(cls)
        if fixed is None:
            logger.warning(
                "DOWNLOADER (%s) is not a subclass of Scrapy's Downloader, or has its own"
                " _process_queue: scrapy-speedup leaves it as it is, and under the asyncio"
                " reactor a download slot may then have more requests in flight than its"
                " concurrency (DOWNLOAD_SLOTS, CONCURRENT_REQUESTS_PER_DOMAIN/_PER_IP, the"
                " adaptive limit). Subclass scrapy_speedup.downloader.SpeedupDownloader to"
                " hold them.", current,
            )
            return
        if fixed is not cls:
            value: object = fixed
            if fixed is SpeedupDownloader:
                value = "scrapy_speedup.downloader.SpeedupDownloader"
            # At the priority of the project's own value, which "addon" is below.
            priority = max(settings.getpriority("DOWNLOADER") or 0, SETTINGS_PRIORITIES["addon"])
            settings.set("DOWNLOADER", value, priority=priority)

    @staticmethod
    def _offload_pipelines(settings: BaseSettings, paths: tuple[str, ...]) -> None:
        enabled = {
            load_object(key): priority
            for key, priority in settings.getdict("ITEM_PIPELINES").items()
            if priority is not None
        }
        for index, path in enumerate(paths):
            try:
                cls = load_object(path)
            except (ImportError, NameError, ValueError) as exc:
                raise SpeedupSettingsError(
                    f"SPEEDUP_PROCESS_PIPELINES lists {path!r}, which cannot be imported: {exc}"
                ) from exc
            from scrapy_speedup.db._batching import BatchingPipeline

            if isinstance(cls, type) and issubclass(cls, BatchingPipeline):
                raise SpeedupSettingsError(
                    f"SPEEDUP_PROCESS_PIPELINES lists {path!r}, a database pipeline of"
                    " scrapy-speedup: it already writes off the reactor, on a thread of its"
                    " own, and cannot run in a worker; remove it from"
                    " SPEEDUP_PROCESS_PIPELINES"
                )
            if cls not in enabled:
                raise SpeedupSettingsError(
                    f"SPEEDUP_PROCESS_PIPELINES lists {path!r}, which is not enabled in"
                    " ITEM_PIPELINES; add it there with the priority it should run at"
                )
            settings.replace_in_component_priority_dict(
                "ITEM_PIPELINES", cls, process_pipeline_class(path, index)
            )
