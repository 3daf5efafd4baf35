"""A crawl script without the ``if __name__ == "__main__":`` guard, run with
``python unguarded_crawl.py SITE``: it must fail with a clear message."""

import sys

from scrapy.crawler import AsyncCrawlerProcess
from scrapy.utils.project import get_project_settings

settings = get_project_settings()
settings.set("TEST_PIPELINE_ENABLED", False)
settings.set("SPEEDUP_PROCESS_INLINE_BELOW_MS", 0)
process = AsyncCrawlerProcess(settings)
process.crawl("products", site=sys.argv[1], count=3, mode="call")
process.start()
