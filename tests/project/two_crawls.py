"""Two crawls with scrapy-speedup in one process: python two_crawls.py SITE MODE OUT."""

from __future__ import annotations

import json
import sys

from scrapy import signals
from scrapy.crawler import AsyncCrawlerProcess
from scrapy.utils.project import get_project_settings


def main() -> None:
    site, mode, out = sys.argv[1:4]
    settings = get_project_settings()
    settings.set("TEST_PIPELINE_ENABLED", False)
    settings.set("SPEEDUP_PROCESS_INLINE_BELOW_MS", 0)
    process = AsyncCrawlerProcess(settings)
    results: dict[str, dict] = {}


    def collect(name: str):
        results[name] = {"pids": [], "errors": []}

        def item_scraped(item):
            results[name]["pids"].append(item["pid"])

        def spider_error(failure):
            results[name]["errors"].append(str(failure.value))

        return item_scraped, spider_error


    handlers = []
    for name in ("first", "second"):
        crawler = process.create_crawler("products")
        scraped, errored = collect(name)
        handlers += [scraped, errored]  # signals hold weak references
        crawler.signals.connect(scraped, signal=signals.item_scraped)
        crawler.signals.connect(errored, signal=signals.spider_error)
        process.crawl(crawler, site=site, count=10, mode=mode)
    process.start()
    with open(out, "w") as f:
        json.dump(results, f)


# Worker processes (forkserver, spawn) import this script again: the crawl
# must only run in the main process.
if __name__ == "__main__":
    main()
