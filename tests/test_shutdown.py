"""Ctrl-C during a crawl with work in the process pool, with real signals."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.conftest import Crawl, DemoSite, assert_process_stats_add_up

pytestmark = pytest.mark.subprocess


def start_slow_crawl(tmp_path: Path, demo_site: DemoSite, runtime: str, seconds: float,
                     **settings: object) -> Crawl:
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
            **settings,
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


def test_sigterm_to_the_process_group_is_a_graceful_stop(demo_site: DemoSite,
                                                        tmp_path: Path) -> None:
    """systemd's stop and ``kill -- -PGID`` send SIGTERM to every process of
    the crawl: the workers and the fork server must leave the stop to the
    crawl, not die in the middle of their tasks."""
    crawl = start_slow_crawl(tmp_path, demo_site, "asyncio", seconds=0.3,
                             SPEEDUP_PROCESS_RETRY_TIMES=0)
    crawl.wait_for_log(r"Scraped from")
    crawl.interrupt(signal.SIGTERM)
    result = crawl.result(timeout=60)
    assert result.returncode == 0, result.log
    assert "Received SIGTERM, shutting down gracefully" in result.log
    assert result.stats["finish_reason"] == "shutdown"
    assert_process_stats_add_up(result)
    assert result.stat("speedup/process/error_count") == 0, result.log
    assert result.stat("speedup/process/worker_crash_count") == 0, result.log
    assert result.stat("speedup/process/succeeded_count") == len(result.items)
    assert not result.alive_descendants(grace=2)


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
    # Scrapy's own exit status for a forced stop (0, as without the add-on),
    # not 142: the reactor doctor's alarm must not outlive the crawl.
    assert result.returncode == 0, result.log
    assert not result.alive_descendants(grace=2)


def test_ctrl_c_once_is_bounded_by_the_shutdown_timeout(demo_site: DemoSite,
                                                        tmp_path: Path) -> None:
    """Scrapy closes the spider only once every item in progress is done: a
    task that never ends must not hold a graceful stop past the timeout."""
    crawl = start_slow_crawl(tmp_path, demo_site, "asyncio", seconds=600,
                             SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS=3,
                             JOBDIR=str(tmp_path / "job"))
    crawl.wait_for_log(r"Crawled \(200\).*product/8\.html")
    crawl.interrupt()
    stopped = time.monotonic()
    result = crawl.result(timeout=60)
    assert time.monotonic() - stopped < 3 + 10, result.log
    assert result.returncode == 0, result.log
    assert result.stats["finish_reason"] == "shutdown"
    assert "offloaded work has 3.0 s to finish" in result.log
    assert "still queued or running 3.0 s after the crawl began to stop" in result.log
    assert_process_stats_add_up(result)
    assert result.stat("speedup/process/abandoned_count") >= 2
    assert result.stat("speedup/process/succeeded_count") == 0
    assert result.stat("test/item_error/PoolClosedError") >= 2
    # A paused crawl will not fetch those pages again: said, not silent.
    assert "a resumed crawl will not fetch those pages again" in result.log
    assert not result.alive_descendants()


def test_ctrl_c_once_with_hung_blocking_calls_is_bounded(demo_site: DemoSite,
                                                         tmp_path: Path) -> None:
    crawl = Crawl(
        tmp_path, spider="blocking",
        settings={"SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS": 2, "SPEEDUP_THREAD_WORKERS": 4,
                  "CONCURRENT_REQUESTS": 4, "LOG_LEVEL": "DEBUG",
                  "TEST_FAULTS": {str(i): "hang" for i in range(100)}},
        args={"site": demo_site.url, "count": 100, "mode": "call"},
    )
    crawl.wait_for_log(r"Crawled \(200\).*product/3\.html")
    crawl.interrupt()
    stopped = time.monotonic()
    result = crawl.result(timeout=60)
    assert time.monotonic() - stopped < 2 + 2 + 10, result.log
    assert result.returncode == 0, result.log
    assert result.stats["finish_reason"] == "shutdown"
    s = result.stat
    assert s("speedup/thread/abandoned_count") >= 1
    assert s("speedup/thread/task_count") == (s("speedup/thread/succeeded_count")
                                             + s("speedup/thread/error_count")
                                             + s("speedup/thread/abandoned_count"))


def test_ctrl_c_while_the_fork_server_starts(demo_site: DemoSite, tmp_path: Path) -> None:
    """Ctrl-C signals the whole process group: the fork server, still
    importing the pipelines' modules, must not die of it and take the
    pool's start with it."""
    crawl = Crawl(
        tmp_path,
        settings={"ITEM_PIPELINES": {"testproj.slow_import.SlowImportPipeline": 300},
                  "SPEEDUP_PROCESS_PIPELINES": "testproj.slow_import.SlowImportPipeline",
                  "SPEEDUP_PROCESS_WORKERS": 2, "TEST_PIPELINE_ENABLED": False},
        args={"site": demo_site.url, "count": 20},
    )
    crawl.wait_for_log(r"Enabled item pipelines")
    time.sleep(0.5)  # inside the fork server's 3 s import
    crawl.interrupt()
    result = crawl.result(timeout=60)
    # Scrapy's own ending of a Ctrl-C while the spider opens: exit status 0
    # (and no stats, as the spider never finished opening).
    assert result.returncode == 0, result.log
    assert "Traceback" not in result.log, result.log
    assert "Could not start worker" not in result.log, result.log
    assert_process_stats_add_up(result)
    assert not result.alive_descendants()


def start_crawl_that_closes_slowly(tmp_path: Path, demo_site: DemoSite,
                                   runtime: str = "asyncio") -> Crawl:
    """A short crawl whose offloaded pipelines take 3 s in close_spider (a
    buffer flushed to a database); returns once they are closing."""
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    crawl = Crawl(
        tmp_path,
        runtime=runtime,
        settings={
            "SPEEDUP_PROCESS_WORKERS": 2,
            "SPEEDUP_PROCESS_PIPELINES": "testproj.pipelines.FaultPipeline",
            "TEST_CLOSE_SLEEP_S": 3,
            "TEST_MARKER_DIR": str(marker_dir),
        },
        args={"site": demo_site.url, "count": 10},
    )
    crawl.wait_for_log(r"Closing spider \(finished\)")
    deadline = time.monotonic() + 30
    while len(list(marker_dir.glob("closing-*"))) < 2:
        assert time.monotonic() < deadline, "the workers' close_spider never began"
        time.sleep(0.05)
    return crawl


def test_ctrl_c_while_the_workers_close_their_pipelines_waits_for_them(
        demo_site: DemoSite, runtime: str, tmp_path: Path) -> None:
    """Scrapy 2.19 stops the reactor in the middle of a spider's close when a
    graceful stop begins during it: the workers' close_spider must still end."""
    crawl = start_crawl_that_closes_slowly(tmp_path, demo_site, runtime)
    crawl.interrupt()
    result = crawl.result(timeout=60)
    assert result.returncode == 0, result.log
    assert "Received SIGINT, shutting down gracefully" in result.log
    assert result.stat("test/pipeline_closed") == 2, result.log  # both workers
    assert "Spider closed (finished)" in result.log
    assert len(result.items) == 10
    assert not result.alive_descendants(grace=2)


def test_ctrl_c_twice_while_the_workers_close_their_pipelines_is_prompt(
        demo_site: DemoSite, tmp_path: Path) -> None:
    crawl = start_crawl_that_closes_slowly(tmp_path, demo_site)
    crawl.interrupt()
    crawl.wait_for_log(r"Received SIGINT, shutting down gracefully")
    crawl.wait_for_log(r"waiting for the spider's close to end")
    stopped = time.monotonic()
    crawl.interrupt()
    result = crawl.result(timeout=30)
    assert time.monotonic() - stopped < 2.5, result.log
    assert result.returncode == 0, result.log
    assert not result.alive_descendants(grace=2)


def test_workers_in_a_long_task_die_with_a_killed_crawl(demo_site: DemoSite,
                                                       tmp_path: Path) -> None:
    """The crawl is killed with SIGKILL (the OOM killer, kill -9): workers in
    the middle of a task that would take 10 minutes, and the fork server,
    must not live on as orphans (they ignore SIGINT and SIGTERM)."""
    import os

    crawl = start_slow_crawl(tmp_path, demo_site, "asyncio", seconds=600)
    crawl.track_descendants()
    os.kill(crawl.process.pid, signal.SIGKILL)
    result = crawl.result(timeout=30)
    assert result.returncode == -signal.SIGKILL
    assert len(result.descendants) >= 3  # the fork server and two workers
    assert not result.alive_descendants(grace=5)
