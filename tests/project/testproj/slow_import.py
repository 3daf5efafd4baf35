"""A pipeline module that the fork server takes 3 s to import (the crawl
itself imports it at once): Ctrl-C while the fork server starts."""

from __future__ import annotations

import time

import __main__

# The fork server runs `python -c ...`: its __main__ has no file; the crawl's
# (scrapy's __main__) has one.
if getattr(__main__, "__file__", None) is None:
    time.sleep(3)


class SlowImportPipeline:
    def process_item(self, item):
        return item
