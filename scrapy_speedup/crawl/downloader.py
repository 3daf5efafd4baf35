"""The coordinator's downloader: Scrapy's slots for the whole crawl, leasing
instead of downloading.

It keeps everything of :class:`~scrapy_speedup.downloader.SpeedupDownloader`
up to the download itself: the slot of each request (its site, or IP, or
``download_slot`` meta, and ``DOWNLOAD_SLOTS``), the slot's concurrency and
delay, the total of ``CONCURRENT_REQUESTS``. Where Scrapy would call the
download handler, it lends the request to an engine process and waits until
that engine's download ends, so a site sees at most its limit from the whole
crawl. AutoThrottle, which runs here, sees the download's latency and status
(``response_downloaded`` is sent with a body-less stand-in response).
"""

from __future__ import annotations

from time import monotonic
from typing import TYPE_CHECKING

from scrapy import signals
from scrapy.exceptions import DownloadTimeoutError
from scrapy.http import Response

from scrapy_speedup.crawl.coordinator import HANDLED
from scrapy_speedup.downloader import SpeedupDownloader

if TYPE_CHECKING:
    from scrapy import Request
    from scrapy.core.downloader import Slot

    from scrapy_speedup.crawl.coordinator import Coordinator

__all__ = ["CoordinatorDownloader", "LeaseEnded"]

_TIMEOUT_NAMES = frozenset({"DownloadTimeoutError", "TimeoutError", "TCPTimedOutError"})


class LeaseEnded(Exception):  # noqa: N818 - an outcome, not a fault
    """The lease ended without a response here: the download failed in the
    engine (its errback ran there), or the lease was handed back."""


class CoordinatorDownloader(SpeedupDownloader):
    def _coordinator(self) -> Coordinator:
        from scrapy_speedup.crawl.frontier import FrontierScheduler

        scheduler = self.crawler.engine.scheduler
        if not isinstance(scheduler, FrontierScheduler) or scheduler.coordinator is None:
            raise RuntimeError("CoordinatorDownloader runs only with the frontier scheduler")
        return scheduler.coordinator

    def needs_backout(self) -> bool:
        from scrapy_speedup.crawl.frontier import FrontierScheduler

        scheduler = getattr(self.crawler.engine, "scheduler", None)
        frontier = scheduler.frontier if isinstance(scheduler, FrontierScheduler) else None
        if frontier is not None:
            # The byte frontier holds the crawl's slots, not this downloader.
            return self.held or frontier.full
        return super().needs_backout()

    async def _download(self, slot: Slot, request: Request) -> Response:  # type: ignore[override]
        slot.transferring.add(request)
        try:
            outcome = await self._coordinator().lease(request)
            if outcome is HANDLED and slot.delay:
                # Nothing reached the site (a cache hit, a request a
                # middleware answered): as in one process, where such a
                # request never reaches the slot, the next waits no delay.
                slot.lastseen = monotonic() - slot.delay
                if slot.latercall is not None:  # the wait for the delay
                    slot.latercall.cancel()
                    slot.latercall = None
            if outcome.status is None:
                if outcome.error in _TIMEOUT_NAMES:
                    # What the coordinator's adaptive concurrency takes as
                    # overload, as in one process.
                    raise DownloadTimeoutError(f"{request} timed out in an engine process")
                raise LeaseEnded(outcome.error)
            if outcome.latency is not None:
                request.meta["download_latency"] = outcome.latency
            response = Response(request.url, status=outcome.status, request=request)
            self.signals.send_catch_log(
                signal=signals.response_downloaded, response=response, request=request,
                spider=self.crawler.spider,
            )
            return response
        finally:
            slot.transferring.discard(request)
            self._process_queue(slot)
