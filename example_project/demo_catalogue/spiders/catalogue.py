from __future__ import annotations

from typing import TYPE_CHECKING, Any

import scrapy

from demo_catalogue.textstats import top_words
from scrapy_speedup import run_in_process

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from scrapy.http import Response


class CatalogueSpider(scrapy.Spider):
    """Crawls the demo catalogue: ``scrapy crawl catalogue -a site=http://127.0.0.1:PORT``."""

    name = "catalogue"

    def __init__(
        self, site: str = "http://127.0.0.1:8000", top_words: str = "", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.site = site.rstrip("/")
        # -a top_words=1 adds light (~0.1 ms) work per page through run_in_process.
        self.with_top_words = bool(top_words)

    async def start(self) -> AsyncIterator[scrapy.Request]:
        yield scrapy.Request(f"{self.site}/catalogue/page-1.html", callback=self.parse)

    def parse(self, response: Response) -> Iterator[scrapy.Request]:
        yield from response.follow_all(css="li.product a", callback=self.parse_product)
        yield from response.follow_all(css="a.next", callback=self.parse)

    async def parse_product(self, response: Response) -> AsyncIterator[dict[str, Any]]:
        item = {
            "url": response.url,
            "title": response.css("h1::text").get(),
            "price": float(response.css("p.price::text").get("0")),
            "description": "\n".join(response.css("section.description p::text").getall()),
            "specs": dict(
                zip(
                    response.css("table.specs th::text").getall(),
                    response.css("table.specs td::text").getall(),
                    strict=True,
                )
            ),
        }
        if self.with_top_words:
            item["top_words"] = await run_in_process(top_words, item["description"])
        yield item
