BOT_NAME = "testproj"
SPIDER_MODULES = [
    "testproj.spiders", "testproj.spiders_blocking", "testproj.spiders_doctor",
    "testproj.spiders_crawl", "testproj.spiders_hostile", "testproj.spiders_browser",
]
ROBOTSTXT_OBEY = False
LOG_LEVEL = "INFO"
TELNETCONSOLE_ENABLED = False
CONCURRENT_REQUESTS = 16
CONCURRENT_REQUESTS_PER_DOMAIN = 16
ADDONS = {"scrapy_speedup.Addon": 500}
STATS_CLASS = "testproj.stats.JsonStatsCollector"
EXTENSIONS = {"testproj.stats.ItemOutcomes": 0}
ITEM_PIPELINES = {"testproj.pipelines.FaultPipeline": 300}
