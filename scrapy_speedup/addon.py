"""``scrapy_speedup.Addon``: one line in ``ADDONS`` turns scrapy-speedup on."""

from __future__ import annotations

import multiprocessing
from typing import TYPE_CHECKING

from scrapy.utils.misc import load_object

from scrapy_speedup._process_pool import warm_up_fork_server
from scrapy_speedup.config import SpeedupConfig, SpeedupSettingsError
from scrapy_speedup.extension import SpeedupExtension
from scrapy_speedup.pipelines import process_pipeline_class

if TYPE_CHECKING:
    from scrapy.settings import BaseSettings

__all__ = ["Addon"]


class Addon:
    """Enable with ``ADDONS = {"scrapy_speedup.Addon": 500}``.

    Adds :class:`SpeedupExtension` and moves the pipelines listed in
    ``SPEEDUP_PROCESS_PIPELINES`` into the process pool. Settings are checked
    here, so a bad value stops the crawl before it starts.
    """

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
        settings.set_in_component_priority_dict("EXTENSIONS", SpeedupExtension, 0)
        if config.adaptive_enabled:
            from scrapy_speedup.adaptive import AdaptiveConcurrencyMiddleware

            # Above RetryMiddleware (550): it sees a 503 first, and retries it
            # without using Scrapy's retry budget.
            settings.set_in_component_priority_dict(
                "DOWNLOADER_MIDDLEWARES", AdaptiveConcurrencyMiddleware, 580
            )
        if config.process_enabled and config.process_pipelines:
            self._offload_pipelines(settings, config.process_pipelines)
            # The earliest hook there is: the fork server imports Scrapy while
            # Scrapy builds the crawler, so the first worker starts at once.
            # Only when process work is certain: it costs ~0.4 s of CPU, which
            # a crawl that never offloads should not pay.
            warm_up_fork_server(config)

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
            if cls not in enabled:
                raise SpeedupSettingsError(
                    f"SPEEDUP_PROCESS_PIPELINES lists {path!r}, which is not enabled in"
                    " ITEM_PIPELINES; add it there with the priority it should run at"
                )
            settings.replace_in_component_priority_dict(
                "ITEM_PIPELINES", cls, process_pipeline_class(path, index)
            )
