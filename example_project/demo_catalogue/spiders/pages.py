from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import scrapy
from scrapy.http import Response


class PagesSpider(scrapy.Spider):
    """``/page/0`` .. ``/page/N-1`` of the capacity server
    (``python -m scrapy_speedup.demo.capacity``), all requested at once:
    ``scrapy crawl pages -a site=http://127.0.0.1:PORT -a count=1000``.

    ``-a cpu_ms=10`` makes each page cost 10 ms of CPU in the callback, as
    heavy parsing on a slow machine does."""

    name = "pages"
    custom_settings = {"ITEM_PIPELINES": {}, "SPEEDUP_PROCESS_PIPELINES": []}

    def __init__(self, site: str, count: str = "1000", cpu_ms: str = "0", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.site, self.count = site.rstrip("/"), int(count)
        self.cpu_s = float(cpu_ms) / 1000

    async def start(self) -> AsyncIterator[scrapy.Request]:
        for i in range(self.count):
            yield scrapy.Request(f"{self.site}/page/{i}")

    def parse(self, response: Response) -> Iterator[dict[str, str]]:
        if self.cpu_s:
            deadline = time.thread_time() + self.cpu_s
            while time.thread_time() < deadline:
                hashlib.sha256(response.body).digest()
        yield {"url": response.url}
