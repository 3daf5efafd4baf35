"""A graceful stop while items sent by the spider's ``start()`` are in a
pipeline that takes time: Scrapy 2.19's scraper never rechecks that it is
idle for such items, and the stop waited for ever (vanilla Scrapy too)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import scrapy

from tests.inprocess import crawl, inprocess


class StartItemsSpider(scrapy.Spider):
    name = "start_items"

    async def start(self) -> Any:
        for i in range(3000):
            yield {"key": i, "value": f"v{i}"}
            await asyncio.sleep(0.001)


@inprocess
async def test_a_stop_while_start_items_are_in_the_database_pipeline_ends(
        tmp_path: Path) -> None:
    database = tmp_path / "items.db"

    def stop_after_some_items(crawler: Any) -> None:
        def scraped(item: Any) -> None:
            if item["key"] == 200:
                crawler._test_stop = asyncio.ensure_future(crawler.stop_async())

        crawler._test_handler = scraped  # signals hold weak references
        crawler.signals.connect(scraped, signal=scrapy.signals.item_scraped)

    run = await crawl(StartItemsSpider, {
        "ITEM_PIPELINES": {"scrapy_speedup.db.SQLitePipeline": 300},
        "SPEEDUP_SQLITE_PATH": str(database),
        "SPEEDUP_DB_BATCH_SIZE": 20,
        "SPEEDUP_DB_COMMIT_INTERVAL_SECONDS": 0.2,
    }, timeout=30, during=stop_after_some_items)
    assert run.finish_reason == "shutdown", run.stats
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT count(*) FROM items").fetchone()[0]
    assert 200 < rows < 3000
    assert rows == run.stats["item_scraped_count"] == len(run.items)
