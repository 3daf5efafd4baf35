"""``StartBackpressure``: the spider's ``start()`` waits while the process
pool is full.

The pool holds the downloader back while its queue is long, which stops the
pages that would only wait for it (see ``pool.py``). Items that ``start()``
yields go to the item pipelines directly, and the engine reads ``start()``
on without waiting while it backs out (Scrapy 2.19 waits between start
items only while it does *not* need to back out), so a ``start()`` that
yields 20,000 items put them all in the pool's queue at once. This spider
middleware, added by the add-on, makes ``start()`` wait for room instead.

The items are counted as Scrapy counts them (the scraper's ``itemproc_size``,
raised as soon as an item is handed over): an item is in the pool's queue
only once its task runs, which is after ``start()`` is read again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scrapy.utils.asyncio import sleep

from scrapy_speedup.extension import SpeedupExtension

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from typing import Self

    from scrapy.crawler import Crawler

__all__ = ["StartBackpressure"]

# How often a waiting start() looks again: room comes with results from the
# workers, a few ms apart; nothing signals it.
_POLL_S = 0.01


class StartBackpressure:
    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    def _items_in_pipelines(self) -> int:
        engine = self.crawler.engine
        slot = engine.scraper.slot if engine is not None else None
        return slot.itemproc_size if slot is not None else 0

    async def process_start(self, start: AsyncIterator[Any]) -> AsyncIterator[Any]:
        extension = SpeedupExtension.of(self.crawler)
        async for item_or_request in start:
            # Only a pool that exists makes start() wait: a crawl that never
            # offloads pays one attribute lookup per start item.
            pool = extension.pool_if_started
            while pool is not None and not pool.has_room(self._items_in_pipelines()):
                await sleep(_POLL_S)
            yield item_or_request
