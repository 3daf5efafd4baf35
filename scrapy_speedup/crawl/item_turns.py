"""Items take turns in an engine process: the ``ITEM_PROCESSOR`` the add-on
sets there (when the project keeps Scrapy's own).

Scrapy handles a response's items as soon as its callback yields them, and
a pipeline that computes (inline, not in the process pool) holds the reactor
for the whole burst: every item of every response that came in together. A
response that arrived meanwhile (a listing page, whose callback yields the
crawl's next links) waits in its socket behind all of them, and so does
every request it would yield. In one process the reactor thread is where
that burst would run anyway; in an engine process it also delays the whole
crawl, which is lent only what the engines have yielded so far: on the demo
catalogue with a 10-ms pipeline inline, the chain of listing pages took
265 ms a link, the time of a listing page's 20 products' pipelines
(docs/design.rst).

Here items enter the pipelines in turns of the reactor (a call after 0 s):
each turn lets in as many as fit 5 ms at the items' recent cost, one at
least. The reactor reads its sockets between two turns, so a response that
came in runs its callback after at most one turn, and the requests it
yields go to the coordinator at once; items keep their order. (One item a
turn, whatever its cost, held cheap items behind the responses that made
them, and their pages' leases with them: the plain I/O crawl lost 15-20%.)
Only the start of an item waits for its turn: an item whose pipeline awaits
(a database, a thread, the process pool) lets the next one start, so
pipelines that wait are not made to wait one after another.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

from scrapy.pipelines import ItemPipelineManager

from scrapy_speedup.extension import SpeedupExtension

if TYPE_CHECKING:
    from asyncio import Future

    from twisted.internet.defer import Deferred

    from scrapy_speedup._bridge import Bridge

__all__ = ["TurnTakingItemPipelineManager"]

#: The pipelines' time a turn gives items, at most (one item always goes):
#: what a response that came in waits for at most, beyond one item.
_TURN_BUDGET_S = 0.005
_EWMA_WEIGHT = 0.2


class TurnTakingItemPipelineManager(ItemPipelineManager):
    """Scrapy's pipeline manager, one item started per turn of the reactor."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._bridge: Bridge | None = None
        self._waiting: deque[Future[Any] | Deferred[Any]] = deque()
        self._turn_due = False
        #: An item's recent time in the pipelines, in seconds (a moving average).
        self._item_s: float | None = None

    async def process_item_async(self, item: Any) -> Any:
        await self._turn()
        started = time.perf_counter()
        try:
            return await super().process_item_async(item)
        finally:
            took = time.perf_counter() - started
            self._item_s = took if self._item_s is None else \
                self._item_s + (took - self._item_s) * _EWMA_WEIGHT

    def _turn(self) -> Future[Any] | Deferred[Any]:
        if self._bridge is None:
            if self.crawler is None:
                raise RuntimeError(
                    f"{type(self).__name__} needs the crawler: build it with"
                    " scrapy.utils.misc.build_from_crawler, as Scrapy's scraper does"
                )
            self._bridge = SpeedupExtension.of(self.crawler).bridge  # the crawl's one
        waiter = self._bridge.new_waiter()
        self._waiting.append(waiter)
        if not self._turn_due:
            self._turn_due = True
            self._bridge.call_later(0, self._next)
        return waiter

    def _next(self) -> None:
        bridge = self._bridge
        assert bridge is not None
        self._turn_due = False
        # As many items as fit the turn's budget at their recent cost: one
        # 10-ms item a turn, a hundred 0.05-ms ones (one a turn, cheap items
        # fell behind the responses that made them, and held their leases).
        cost = self._item_s
        room = 1 if cost is None else max(1, int(_TURN_BUDGET_S / max(cost, 1e-6)))
        while self._waiting and room:
            waiter = self._waiting.popleft()
            if bridge.is_pending(waiter):  # not cancelled (a forced stop)
                bridge.resolve(waiter, None)
                room -= 1
        if self._waiting:
            self._turn_due = True
            bridge.call_later(0, self._next)
