"""Spiders of the JavaScript shop (scrapy_speedup.demo.jsshop) for the browser tests."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psutil
from scrapy import Request, Spider
from scrapy.http import Response

#: Settings of every browser test crawl: small, quick to fail.
BROWSER_SETTINGS: dict[str, Any] = {
    "SPEEDUP_PROCESS_ENABLED": False,
    "SPEEDUP_BROWSER_TIMEOUT_SECONDS": 20,
    "CONCURRENT_REQUESTS": 8,
    "RETRY_TIMES": 1,
}


class ShopSpider(Spider):
    """Listings, then each product: its title and price."""

    name = "shop"

    def __init__(self, url: str = "", lists: int = 1, meta: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.url = url
        self.lists = int(lists)
        self.meta = meta or {}

    async def start(self) -> AsyncIterator[Request]:
        for n in range(self.lists):
            yield Request(f"{self.url}/shop/list/{n}.html", callback=self.parse, meta=self.meta)

    def parse(self, response: Response) -> Iterator[Request]:
        yield from response.follow_all(css="ul.products a", callback=self.parse_product,
                                       meta=self.meta)

    def parse_product(self, response: Response) -> Iterator[dict[str, Any]]:
        yield {
            "url": response.url,
            "title": response.css("h1::text").get(),
            "price": response.css("p.price::text").get(),
        }


def by_path(run: Any) -> dict[str, dict[str, Any]]:
    """A crawl's items by URL path ({title, price}), each path once."""
    paths = ["/" + item["url"].split("/", 3)[3] for item in run.items]
    assert len(paths) == len(set(paths)), Counter(paths).most_common(3)  # no duplicates
    return {path: {"title": item["title"], "price": item["price"]}
            for path, item in zip(paths, run.items, strict=True)}


def chromium_processes() -> list[psutil.Process]:
    """This test process's Chromium descendants."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "chrom" in child.name():
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found
