from __future__ import annotations

from typing import TYPE_CHECKING, Any

import scrapy

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from scrapy.http import Response


class ShopSpider(scrapy.Spider):
    """Crawls the JavaScript shop (python -m scrapy_speedup.demo.jsshop), whose
    product pages are static, rendered by a script, or load their price with
    one; the browser router learns which need the browser::

        scrapy crawl shop -a site=http://127.0.0.1:PORT

    ``-a browser=all`` renders every page in the browser, ``-a browser=oracle``
    exactly the pages that need it, as a project that knew would mark them
    (both with the router off: ``-s SPEEDUP_BROWSER_ROUTER_ENABLED=False``).
    """

    name = "shop"
    custom_settings = {
        "SPEEDUP_BROWSER_ROUTER_ENABLED": True,
        # The project's pipelines are the catalogue's (descriptions, MinHash).
        "ITEM_PIPELINES": {},
        "SPEEDUP_PROCESS_PIPELINES": [],
    }

    def __init__(self, site: str = "http://127.0.0.1:8000", browser: str = "",
**kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.site = site.rstrip("/")
        if browser not in ("", "all", "oracle"):
            raise ValueError(f"-a browser={browser!r}: give all or oracle, or nothing")
        self.browser = browser

    def _meta(self, url: str) -> dict[str, Any]:
        if self.browser == "all":
            return {"playwright": True}
        if self.browser == "oracle":
            return {"playwright": "/shop/app/" in url or "/shop/deal/" in url}
        return {}

    async def start(self) -> AsyncIterator[scrapy.Request]:
        url = f"{self.site}/shop/list/0.html"
        yield scrapy.Request(url, callback=self.parse, meta=self._meta(url))

    def parse(self, response: Response) -> Iterator[scrapy.Request]:
        for href in response.css("ul.products a::attr(href)").getall():
            url = response.urljoin(href)
            yield scrapy.Request(url, callback=self.parse_product, meta=self._meta(url))
        next_href = response.css("a.next::attr(href)").get()
        if next_href:
            url = response.urljoin(next_href)
            yield scrapy.Request(url, callback=self.parse, meta=self._meta(url))

    def parse_product(self, response: Response) -> Iterator[dict[str, Any]]:
        yield {
            "url": response.url,
            "title": response.css("h1::text").get(),
            "price": response.css("p.price::text").get(),
        }
