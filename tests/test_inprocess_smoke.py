"""The in-process harness itself: a crawl with the add-on against a local server."""

from __future__ import annotations

import scrapy

from scrapy_speedup.demo.site import CatalogueResource
from tests.inprocess import crawl, inprocess, listening


class ProductSpider(scrapy.Spider):
    name = "product"

    def __init__(self, url: str, count: int, **kwargs):
        super().__init__(**kwargs)
        self.url, self.count = url, count

    async def start(self):
        for i in range(self.count):
            yield scrapy.Request(f"{self.url}/product/{i}.html")

    def parse(self, response):
        yield {"url": response.url}


@inprocess
async def test_a_crawl_in_this_process_scrapes_every_page() -> None:
    with listening(CatalogueResource(50, 0.001)) as url:
        run = await crawl(ProductSpider, url=url, count=20)
    assert run.finish_reason == "finished"
    assert len(run.items) == 20
