"""Blocking calls in the crawl's thread pool, in real crawls on each runtime."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import DemoSite, run_crawl

pytestmark = pytest.mark.subprocess

COUNT = 30


def assert_thread_stats_add_up(result) -> None:
    s = result.stat
    assert s("speedup/thread/task_count") == (
        s("speedup/thread/succeeded_count") + s("speedup/thread/error_count")
    ), result.stats


@pytest.mark.parametrize("mode", ["call", "pipeline"])
def test_blocking_calls_run_in_the_pool(demo_site: DemoSite, runtime: str, mode: str,
                                        tmp_path: Path) -> None:
    settings = {"SPEEDUP_THREAD_WORKERS": 8, "TEST_BLOCK_SECONDS": 0.2}
    if mode == "pipeline":
        settings["ITEM_PIPELINES"] = {"testproj.blocking.BlockingPipeline": 300}
    started = time.monotonic()
    result = run_crawl(tmp_path, spider="blocking", runtime=runtime, settings=settings,
                       args={"site": demo_site.url, "count": COUNT, "mode": mode})
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.log
    assert sorted(item["id"] for item in result.items) == list(range(COUNT))
    assert all(item["thread"].startswith("scrapy-speedup-thread-") for item in result.items)
    assert result.stat("speedup/thread/task_count") == COUNT
    assert_thread_stats_add_up(result)
    # 30 calls of 0.2 s would take 6 s on the reactor thread; 8 threads overlap them.
    assert result.stat("speedup/thread/busy_max") >= 4
    assert elapsed < 6 + 3, result.log
    assert "scrapy-speedup thread pool: 30 calls: 30 succeeded" in result.log


def test_dns_resolves_while_every_pool_thread_is_busy(demo_site: DemoSite, runtime: str,
                                                      tmp_path: Path) -> None:
    site = demo_site.url.replace("127.0.0.1", "localhost")
    result = run_crawl(tmp_path, spider="dns", runtime=runtime,
                       settings={"SPEEDUP_THREAD_WORKERS": 4, "DNSCACHE_ENABLED": False},
                       args={"site": site, "threads": 4}, timeout=60)
    assert result.returncode == 0, result.log
    [check] = [item for item in result.items if "resolved" in item]
    assert check["resolved"] in ("127.0.0.1", "::1")
    assert check["pool_threads_busy"] == 4
    assert len(result.items) == 5
    assert result.stat("speedup/thread/busy_max") == 4


def test_call_past_its_timeout_errors_and_its_thread_is_replaced(
    demo_site: DemoSite, runtime: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    result = run_crawl(
        tmp_path, spider="blocking", runtime=runtime,
        settings={
            "SPEEDUP_THREAD_WORKERS": 2,
            "SPEEDUP_THREAD_TIMEOUT_SECONDS": 1,
            "SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS": 2,
            "TEST_BLOCK_SECONDS": 0.05,
            # Two calls that never return: without replacements the two
            # threads would be gone and the crawl would never end.
            "TEST_FAULTS": {"3": "hang", "4": "hang", "5": "raise"},
        },
        args={"site": demo_site.url, "count": COUNT, "mode": "call"},
    )
    assert time.monotonic() - started < 30
    assert result.returncode == 0, result.log
    assert sorted(i["id"] for i in result.items) == [i for i in range(COUNT) if i not in (3, 4, 5)]
    assert result.stat("speedup/thread/timeout_count") == 2
    assert result.stat("speedup/thread/stuck_count") == 2
    assert result.stat("spider_exceptions/TimeoutError") == 2
    assert result.stat("spider_exceptions/ConnectionError") == 1
    assert_thread_stats_add_up(result)
    assert "slow_call ran past its timeout of 1.0 s; its thread is stuck" in result.log
    # Their calls had their answer: the close does not wait for them.
    assert "2 threads are still in calls given up" in result.log
    assert "threads still blocked after SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS" not in result.log
