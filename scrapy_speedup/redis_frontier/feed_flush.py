"""Flush Scrapy's feed files before this machine acknowledges pages.

A lease is acknowledged once its response is handled: its items have left
the item pipelines and the feed exporter has written them, but into the
file's buffer (Python's, 4-8 KiB). A machine killed then would lose those
items while the frontier counts their pages done, so no machine would crawl
them again. Flushing first moves them into the operating system, which keeps
them through the death of the process (not of the machine: that needs the
database pipelines, which commit before an item leaves them).

Feeds with post-processing (gzip) keep their compressor's buffer, and remote
feeds (S3, FTP) upload only at the end: both lose what a killed machine had.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from scrapy.extensions.feedexport import FeedExporter

if TYPE_CHECKING:
    from scrapy.crawler import Crawler

logger = logging.getLogger(__name__)


class FeedFlusher:
    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        self._exporters: list[FeedExporter] | None = None
        self._warned = False

    def flush(self) -> None:
        """On the reactor thread, where the exporter writes."""
        if self._exporters is None:
            manager = getattr(self.crawler, "extensions", None)
            self._exporters = [extension for extension in getattr(manager, "middlewares", ())
                               if isinstance(extension, FeedExporter)]
        for exporter in self._exporters:
            for slot in exporter.slots:
                file = slot.file
                if file is None or file.closed:
                    continue
                try:
                    file.flush()
                except (OSError, ValueError) as error:
                    if not self._warned:
                        self._warned = True
                        logger.warning("scrapy-speedup: could not flush the feed %s before"
                                       " acknowledging its pages to the frontier: %s",
                                       slot.uri, error, extra={"crawler": self.crawler})
