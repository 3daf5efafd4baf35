"""Item pipelines whose ``process_item`` runs in the process pool.

``SPEEDUP_PROCESS_PIPELINES`` lists pipelines that are already in
``ITEM_PIPELINES``. The add-on swaps each one, at its priority, for a proxy
made by :func:`process_pipeline_class`. The proxy sends every item to the
workers, where each worker built the real pipeline once (``from_crawler``
with the crawl's settings, then ``open_spider``); ``close_spider`` runs in
each worker when the pool shuts down at the end of the crawl.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from scrapy_speedup.extension import SpeedupExtension

if TYPE_CHECKING:
    from typing import Self

    from scrapy.crawler import Crawler

__all__ = ["ProcessPipeline", "process_pipeline_class"]


class ProcessPipeline:
    """Base of the proxies; one subclass per pipeline that runs in workers."""

    #: Import path of the pipeline that runs in the workers.
    target: ClassVar[str]
    #: Its position in SPEEDUP_PROCESS_PIPELINES, which is how workers find it.
    index: ClassVar[int]

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        self.speedup = SpeedupExtension.of(crawler)
        self._name = f"{self.target.rpartition('.')[2]}.process_item()"

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    async def open_spider(self) -> None:
        # Fail the crawl now, with the worker's error, if the pipeline cannot
        # start there, rather than error on every item.
        await self.speedup.pool.wait_ready()

    async def process_item(self, item: Any) -> Any:
        return await self.speedup.pool.process_item(self.index, item, self._name)


def process_pipeline_class(target: str, index: int) -> type[ProcessPipeline]:
    """A proxy class for the pipeline at import path *target*."""
    name = f"ProcessPipeline[{target}]"
    return type(
        name,
        (ProcessPipeline,),
        {"target": target, "index": index, "__qualname__": name, "__module__": __name__},
    )
