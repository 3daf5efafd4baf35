from __future__ import annotations

import scrapy
from parsel import Selector

from scrapy_speedup import SpeedupExtension, cpu_bound, run_in_process
from testproj import faults


@cpu_bound
def process_decorated(item: dict, fault_map: dict, marker_dir: str | None) -> dict:
    return faults.apply(item, fault_map, marker_dir)


class ProductsSpider(scrapy.Spider):
    """Fetches products 0..count-1 of the demo site; *mode* says how each item
    is processed: ``pipeline`` (FaultPipeline, in workers when listed in
    SPEEDUP_PROCESS_PIPELINES), ``call`` (run_in_process), ``decorator``
    (@cpu_bound), ``explicit`` (SpeedupExtension.of(crawler).run_in_process)."""

    name = "products"

    def __init__(self, site, count="20", mode="pipeline", unpicklable="", **kwargs):
        super().__init__(**kwargs)
        self.site = site.rstrip("/")
        self.count = int(count)
        self.mode = mode
        self.unpicklable = {int(x) for x in unpicklable.split(",") if x}

    async def start(self):
        for i in range(self.count):
            yield scrapy.Request(f"{self.site}/product/{i}.html", cb_kwargs={"id": i})

    async def parse(self, response, id):
        item = {
            "id": id,
            "url": response.url,
            "text": " ".join(response.css("section.description p::text").getall()),
        }
        if id in self.unpicklable:
            item["selector"] = Selector(text="<p>not picklable</p>")
        settings = self.crawler.settings
        args = (settings.getdict("TEST_FAULTS"), settings.get("TEST_MARKER_DIR"))
        if self.mode == "call":
            item = await run_in_process(faults.process, item, *args)
        elif self.mode == "decorator":
            item = await process_decorated(item, *args)
        elif self.mode == "explicit":
            speedup = SpeedupExtension.of(self.crawler)
            item = await speedup.run_in_process(faults.process, item, *args)
        elif self.mode == "lambda":
            item = await run_in_process(lambda x: x, item)
        yield item
