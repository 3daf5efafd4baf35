from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any

import scrapy
from scrapy.core.downloader.handlers.base import BaseDownloadHandler
from scrapy.http import HtmlResponse

from scrapy_speedup.demo.graph import links_of, page_html

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from scrapy.crawler import Crawler
    from scrapy.http import Request, Response


class LinksSpider(scrapy.Spider):
    """Follows every link of the link-graph site
    (``python -m scrapy_speedup.demo.graph``) from ``/p/0``:
    ``scrapy crawl links -a site=http://127.0.0.1:PORT``; one item a page.

    ``-a cpu_ms=10`` makes each page cost 10 ms of CPU in the callback, as
    heavy parsing on a slow machine does; ``-a items=0`` yields only the
    requests (to measure the frontier alone)."""

    name = "links"
    # A plain link-following crawl: none of the project's CPU-heavy pipelines.
    custom_settings = {
        "ITEM_PIPELINES": {},
        "SPEEDUP_PROCESS_PIPELINES": [],
        "SPEEDUP_CRAWL_PIPELINES": {},
        "CONCURRENT_REQUESTS": 64,
        "CONCURRENT_REQUESTS_PER_DOMAIN": 64,
    }

    def __init__(self, site: str = "http://127.0.0.1:8000", cpu_ms: str = "0",
                 items: str = "1", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.site = site.rstrip("/")
        self.cpu_s = float(cpu_ms) / 1000
        self.items = items != "0"

    async def start(self) -> AsyncIterator[scrapy.Request]:
        yield scrapy.Request(f"{self.site}/p/0")

    def parse(self, response: Response) -> Iterator[scrapy.Request | dict[str, Any]]:
        if self.cpu_s:
            deadline = time.thread_time() + self.cpu_s
            while time.thread_time() < deadline:
                hashlib.sha256(response.body).digest()
        if self.items:
            yield {"url": response.url, "title": response.css("h1::text").get()}
        yield from response.follow_all(css="a::attr(href)")


class InstantGraphHandler(BaseDownloadHandler):
    """A download handler that answers at once, without the network, with the
    page of the link-graph site that the URL's path names: for measuring
    what a crawl costs apart from waiting. Its site is ``GRAPH_PAGES`` pages
    of ``GRAPH_LINKS`` links (as ``--pages``/``--links`` of the server)."""

    def __init__(self, crawler: Crawler) -> None:
        super().__init__(crawler)
        self.graph = links_of(crawler.settings.getint("GRAPH_PAGES", 2000),
                              crawler.settings.getint("GRAPH_LINKS", 10))

    async def download_request(self, request: Request) -> Response:
        _, _, number = request.url.rpartition("/p/")
        index = int(number) if number.isdigit() else -1
        if not 0 <= index < len(self.graph):
            return HtmlResponse(request.url, status=404, body=b"", request=request)
        return HtmlResponse(request.url, body=page_html(index, self.graph[index]),
                            encoding="utf-8", request=request)
