"""A local demo site to crawl with no network: ``python -m scrapy_speedup.demo``."""
