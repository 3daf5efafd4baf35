"""A downloader that holds each slot's concurrency on every reactor.

Scrapy 2.19's ``Downloader._process_queue`` pops requests off a slot's queue
while ``slot.free_transfer_slots() > 0``, and starts each download with
``_schedule_coro``. Under a plain Twisted reactor that runs the download
coroutine at once, up to its first ``await``, and ``_download`` adds the
request to ``slot.transferring`` before the next pop. Under asyncio (the
default reactor, and reactorless mode) it creates a task that runs only on the
next turn of the loop, so nothing is transferring yet when the loop checks the
free slots again, and one pass sends the slot's whole queue: six requests to a
slot of ``DOWNLOAD_SLOTS={"127.0.0.1": {"concurrency": 1}}`` ran 4 or 5 at once (a
slot whose adaptive limit was 4 had 59 requests transferring).

:class:`SpeedupDownloader` is Scrapy's downloader with one line added: a
request counts as transferring from the moment it is popped. The add-on sets
``DOWNLOADER`` to it (or to a subclass of the project's own downloader with the
fix mixed in, see :func:`downloader_with_slot_limits`).
"""

from __future__ import annotations

from time import monotonic
from typing import TYPE_CHECKING

from scrapy.core.downloader import Downloader
from scrapy.utils.asyncio import call_later
from scrapy.utils.defer import _schedule_coro

if TYPE_CHECKING:
    from scrapy.core.downloader import Slot
    from scrapy.crawler import Crawler

__all__ = ["SpeedupDownloader", "downloader_with_slot_limits"]


class SpeedupDownloader(Downloader):
    """Scrapy's :class:`~scrapy.core.downloader.Downloader`, holding each
    slot's concurrency under asyncio too (see the module's docstring), and
    taking no new request while a component holds it back (see
    :meth:`hold`)."""

    def __init__(self, crawler: Crawler) -> None:
        super().__init__(crawler)
        self._holders: set[object] = set()

    def hold(self, holder: object) -> None:
        """Take no new request until :meth:`release`: the engine backs out
        (``needs_backout()``) as when every place is taken. Requests in
        flight finish. The process pool holds it while its queue is long."""
        self._holders.add(holder)

    def release(self, holder: object) -> None:
        """End *holder*'s hold, and have the engine look for requests to send
        at once (it would otherwise wait for its next heartbeat)."""
        if holder not in self._holders:
            return
        self._holders.discard(holder)
        if not self._holders:
            engine = self.crawler.engine
            nextcall = getattr(getattr(engine, "_slot", None), "nextcall", None)
            if nextcall is not None:
                nextcall.schedule()

    @property
    def held(self) -> bool:
        return bool(self._holders)

    def needs_backout(self) -> bool:
        return bool(self._holders) or super().needs_backout()

    def _process_queue(self, slot: Slot) -> None:
        """Scrapy 2.19's method with one line added: ``slot.transferring.add``
        before the download is scheduled, so that the loop's next
        ``free_transfer_slots()`` counts it even though its task has not run
        yet. Accounting stays Scrapy's own: ``_download`` adds the request
        again (a set) and removes it in its ``finally``, which every way a
        download ends goes through.
        """
        if slot.latercall:
            # block processing until slot.latercall is called
            return

        # Delay queue processing if a download_delay is configured
        now = monotonic()
        delay = slot.download_delay()
        if delay:
            penalty = delay - now + slot.lastseen
            if penalty > 0:
                slot.latercall = call_later(penalty, self._latercall, slot)
                return

        # Process enqueued requests if there are free slots to transfer for this slot
        while slot.queue and slot.free_transfer_slots() > 0:
            slot.lastseen = now
            request, queue_dfd = slot.queue.popleft()
            slot.transferring.add(request)  # the one line added
            _schedule_coro(self._wait_for_download(slot, request, queue_dfd))
            # prevent burst if inter-request delays were configured
            if delay:
                self._process_queue(slot)
                break


def downloader_with_slot_limits(cls: type[object]) -> type[Downloader] | None:
    """The downloader class to use instead of *cls* (a project's
    ``DOWNLOADER``), or None when the fix cannot be applied to it.

    Scrapy's own downloader becomes :class:`SpeedupDownloader`; a subclass of
    it gets the fix mixed in, unless it has its own ``_process_queue`` (the
    fix would replace it); anything else is left alone.
    """
    if not isinstance(cls, type) or not issubclass(cls, Downloader):
        return None
    if issubclass(cls, SpeedupDownloader):
        return cls
    if cls is Downloader:
        return SpeedupDownloader
    if cls._process_queue is not Downloader._process_queue:
        return None
    # Created here rather than written out: it subclasses the project's class.
    return type(
        f"{cls.__name__}WithSlotLimits",
        (SpeedupDownloader, cls),
        {"__module__": __name__, "__doc__": cls.__doc__},
    )
