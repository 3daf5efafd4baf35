"""Ctrl-C during a crawl with work in the process pool, with real signals."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import Crawl, DemoSite, assert_process_stats_add_up

pytestmark = pytest.mark.subprocess


def start_slow_crawl(tmp_path: Path, demo_site: DemoSite, runtime: str, seconds: float) -> Crawl:
    count = 200
    crawl = Crawl(
        tmp_path,
        runtime=runtime,
        settings={
            "LOG_LEVEL": "DEBUG",
            "CONCURRENT_REQUESTS": 4,
            # Scrapy's backpressure: ~10 small pages waiting for the pool at most.
            "SCRAPER_SLOT_MAX_ACTIVE_SIZE": 50_000,
            "SPEEDUP_PROCESS_WORKERS": 2,
            "SPEEDUP_PROCESS_PIPELINES": "testproj.pipelines.FaultPipeline",
            "TEST_FAULTS": {str(i): f"sleep:{seconds}" for i in range(count)},
        },
        args={"site": demo_site.url, "count": count},
    )
    # Wait until tasks are in the workers: the pool is up and pages arrive.
    crawl.wait_for_log(r"Crawled \(200\)")
    crawl.wait_for_log(r"process pool of 2 workers")
    return crawl


def test_ctrl_c_once_finishes_work_in_flight(demo_site: DemoSite, runtime: str,
                                             tmp_path: Path) -> None:
    crawl = start_slow_crawl(tmp_path, demo_site, runtime, seconds=0.3)
    crawl.wait_for_log(r"Scraped from")
    crawl.interrupt()
    result = crawl.result(timeout=60)
    assert result.returncode == 0, result.log
    assert "Received SIGINT, shutting down gracefully" in result.log
    assert result.stats["finish_reason"] == "shutdown"
    # Nothing lost: every task that started ended with its item scraped.
    assert_process_stats_add_up(result)
    assert result.stat("speedup/process/error_count") == 0
    assert result.stat("speedup/process/abandoned_count") == 0
    assert result.stat("speedup/process/succeeded_count") == len(result.items)
    # The crawl stopped early: only the few items in flight were finished.
    assert len(result.items) < 50
    assert not result.alive_descendants()


def test_ctrl_c_twice_exits_within_5_seconds(demo_site: DemoSite, runtime: str,
                                             tmp_path: Path) -> None:
    crawl = start_slow_crawl(tmp_path, demo_site, runtime, seconds=60)
    crawl.interrupt()
    crawl.wait_for_log(r"Received SIGINT, shutting down gracefully")
    stopped = time.monotonic()
    crawl.interrupt()
    result = crawl.result(timeout=30)
    assert time.monotonic() - stopped < 5, result.log
    assert "forced stop" in result.log
    assert not result.alive_descendants(grace=2)
