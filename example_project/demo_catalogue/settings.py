# Settings of the demo project: a crawl of the local demo catalogue
# (python -m scrapy_speedup.demo) with a CPU-heavy pipeline.

BOT_NAME = "demo_catalogue"
SPIDER_MODULES = ["demo_catalogue.spiders"]
NEWSPIDER_MODULE = "demo_catalogue.spiders"

ROBOTSTXT_OBEY = False
LOG_LEVEL = "INFO"
CONCURRENT_REQUESTS = 32
CONCURRENT_REQUESTS_PER_DOMAIN = 32
TELNETCONSOLE_ENABLED = False

ITEM_PIPELINES = {
    "demo_catalogue.pipelines.MinHashPipeline": 300,
    "demo_catalogue.pipelines.NearDuplicatePipeline": 400,
}

# scrapy-speedup: one line turns it on ...
ADDONS = {"scrapy_speedup.Addon": 500}
# ... and the CPU-heavy pipeline, unchanged, runs in a pool of worker processes.
SPEEDUP_PROCESS_PIPELINES = ["demo_catalogue.pipelines.MinHashPipeline"]
