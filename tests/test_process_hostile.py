"""The process pool against results and bytes that are not what it expects,
and its backpressure on the crawl: in-process crawls with real workers."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import pytest

from scrapy_speedup.demo.site import CatalogueResource
from scrapy_speedup.exceptions import OffloadError, UnpicklableError, WorkerCrashedError
from tests.inprocess import CrawlRun, crawl, inprocess, listening
from tests.process_tasks import OffloadSpider

COUNT = 12
POOL = {"SPEEDUP_PROCESS_WORKERS": 2, "SPEEDUP_PROCESS_INLINE_BELOW_MS": 0,
        "LOG_LEVEL": "WARNING"}


def assert_adds_up(run: CrawlRun) -> None:
    s = run.stat
    assert s("speedup/process/task_count") == (
        s("speedup/process/succeeded_count") + s("speedup/process/dropped_count")
        + s("speedup/process/error_count") + s("speedup/process/abandoned_count")
        + s("speedup/process/cancelled_count")), run.stats


async def offload(fault: str = "", *, count: int = COUNT, settings: dict[str, Any] | None = None,
                  during: Any = None, **kwargs: Any) -> CrawlRun:
    with listening(CatalogueResource(1000, 0.001)) as url:
        run = await crawl(OffloadSpider, {**POOL, **(settings or {})}, timeout=60,
                          during=during, url=url, count=count, fault=fault, fault_at=3,
                          **kwargs)
    assert run.finish_reason == "finished", run.stats
    assert_adds_up(run)
    return run


def ids(run: CrawlRun) -> list[int]:
    return sorted(item["id"] for item in run.items)


@inprocess
async def test_a_result_that_cannot_be_unpickled_fails_its_task_alone() -> None:
    run = await offload("exception_value")
    assert ids(run) == [i for i in range(COUNT) if i != 3]
    [(_, error)] = run.spider_errors
    assert isinstance(error, UnpicklableError)
    assert "the result of task cannot be unpickled in the crawl" in str(error)
    assert "rebuilding a tests.process_tasks.PriceError failed" in str(error)
    assert run.stat("speedup/process/unpicklable_count") == 1
    assert run.stat("speedup/process/worker_crash_count") == 0


@pytest.mark.parametrize("fault", ["unknown_kind", "huge_frame", "truncated_then_exit"])
@inprocess
async def test_stray_bytes_on_a_worker_socket_end_that_worker(fault: str) -> None:
    run = await offload(fault)
    # The page whose task corrupted the channel errors after its retry; every
    # other page is scraped: its tasks went to another worker.
    assert ids(run) == [i for i in range(COUNT) if i != 3]
    [(_, error)] = run.spider_errors
    assert isinstance(error, WorkerCrashedError), error
    assert "died 2 times" in str(error)
    if fault != "truncated_then_exit":
        assert run.stat("speedup/process/protocol_error_count") == 2
    assert run.stat("speedup/process/worker_restart_count") == 2


@inprocess
async def test_a_result_over_the_message_limit_fails_alone() -> None:
    run = await offload("big_result", settings={"SPEEDUP_PROCESS_MAX_MESSAGE_MB": 1})
    assert ids(run) == [i for i in range(COUNT) if i != 3]
    [(_, error)] = run.spider_errors
    assert "over SPEEDUP_PROCESS_MAX_MESSAGE_MB (1)" in str(error)
    assert run.stat("speedup/process/worker_crash_count") == 0


@inprocess
async def test_max_in_flight_is_a_hard_limit() -> None:
    run = await offload(settings={"SPEEDUP_PROCESS_MAX_IN_FLIGHT": 1}, ms=5)
    assert ids(run) == list(range(COUNT))
    assert run.stat("speedup/process/in_flight_max") == 1


@inprocess
async def test_the_crawl_waits_for_a_busy_pool_instead_of_piling_up_pages() -> None:
    """Pages arrive in ~1 ms and each takes 60 ms of CPU in the pool: without
    backpressure the engine downloads everything and the responses wait in
    memory (hundreds); with it, a few batches of tasks wait at most. (At 20 ms
    a page, a machine busy with other crawls slowed the reactor as much as
    the pool, and the pool never fell behind.)"""
    waiting: list[int] = []
    task_handle: list[asyncio.Task[None]] = []

    def watch(crawler: Any) -> None:
        async def sample() -> None:
            while True:
                await asyncio.sleep(0.01)
                if crawler.engine is not None and crawler.engine.scraper.slot is not None:
                    waiting.append(len(crawler.engine.scraper.slot.active))

        task_handle.append(asyncio.ensure_future(sample()))

    run = await offload(count=200, ms=60, during=watch,
                        settings={"CONCURRENT_REQUESTS": 32, "SPEEDUP_PROCESS_MAX_IN_FLIGHT": 4})
    task_handle[0].cancel()
    assert ids(run) == list(range(200))
    assert run.stat("speedup/process/backpressure_count") >= 1
    # In the workers (4) + the queue's high mark (8) + what the downloader
    # had in flight when it was held (32), and a margin for responses still
    # on their way to the pool on a busy machine; without backpressure, hundreds.
    assert max(waiting) <= 4 + 8 + 32 + 16, max(waiting)


@inprocess
async def test_a_stats_change_the_crawl_refuses_costs_no_task() -> None:
    from tests.process_tasks import OddStatsSpider

    settings = {**POOL, "ITEM_PIPELINES": {"tests.process_tasks.OddStatsPipeline": 300},
                "SPEEDUP_PROCESS_PIPELINES": ["tests.process_tasks.OddStatsPipeline"]}
    with listening(CatalogueResource(100, 0.001)) as url:
        run = await crawl(OddStatsSpider, settings, timeout=60, url=url, count=COUNT)
    assert run.finish_reason == "finished", run.stats
    assert ids(run) == list(range(COUNT))
    assert_adds_up(run)
    assert run.stat("speedup/process/succeeded_count") == COUNT
    assert run.stat("test/odd") == "not a number"
    assert run.stat("test/fine") == COUNT


# What a hostile review found after the rewrite ------------------------------


async def noisy(how: str = "", *, count: int = COUNT, settings: dict[str, Any] | None = None,
                wait_s: float = 0.0) -> CrawlRun:
    from tests.process_tasks import NoisySpider

    with listening(CatalogueResource(1000, 0.001)) as url:
        run = await crawl(NoisySpider, {**POOL, **(settings or {})}, timeout=60, url=url,
                          count=count, how=how, wait_s=wait_s)
    assert run.finish_reason == "finished", run.stats
    assert_adds_up(run)
    return run


@inprocess
async def test_bad_bytes_are_blamed_on_the_task_that_sent_them() -> None:
    """Task 3 writes a bad frame header, then returns normally: the worker
    may be running a later task by the time the crawl reads it."""
    run = await noisy("huge_frame_then_return")
    assert ids(run) == [i for i in range(COUNT) if i != 3]
    [(url, error)] = run.spider_errors
    assert url.endswith("/product/3.html") and "died 2 times" in str(error)


@inprocess
async def test_a_huge_log_line_is_cut_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    run = await noisy("huge_log", settings={"SPEEDUP_PROCESS_MAX_MESSAGE_MB": 1})
    assert ids(run) == list(range(COUNT))
    assert run.stat("speedup/process/protocol_error_count") == 0
    assert "[cut: 3145728 characters in all]" in caplog.text


@pytest.mark.parametrize("how", ["system_exit", "keyboard_interrupt", "base_exception"])
@inprocess
async def test_a_base_exception_in_a_task_is_its_error_not_a_crash(how: str) -> None:
    run = await noisy(how)
    assert ids(run) == [i for i in range(COUNT) if i != 3]
    [(_, error)] = run.spider_errors
    assert isinstance(error, OffloadError) and not isinstance(error, WorkerCrashedError)
    assert "in its worker" in str(error)
    assert run.stat("speedup/process/worker_crash_count") == 0
    assert run.stat("speedup/process/retry_count") == 0


@inprocess
async def test_a_cancelled_call_does_not_run_or_hold_the_crawl() -> None:
    """Each callback gives its 1 s call 0.1 s: the crawl must not wait for
    100 s of calls nobody waits for, nor be held back by them."""
    started = time.monotonic()
    run = await noisy("slow", count=100, wait_s=0.1,
                      settings={"SPEEDUP_PROCESS_MAX_IN_FLIGHT": 2})
    assert len(run.items) == 100 and all(item["gave_up"] for item in run.items)
    assert time.monotonic() - started < 20
    # At most the tasks in flight ran; the rest never left the queue.
    assert run.stat("speedup/process/cancelled_count") == 100
    assert run.stat("speedup/process/succeeded_count") == 0


@inprocess
async def test_a_timeout_keeps_cheap_calls_in_the_workers() -> None:
    run = await noisy(count=30, settings={"SPEEDUP_PROCESS_INLINE_BELOW_MS": 0.5,
                                          "SPEEDUP_PROCESS_TIMEOUT_SECONDS": 5})
    assert ids(run) == list(range(30))
    assert run.stat("speedup/process/inline_count") == 0


@inprocess
async def test_cheap_calls_going_inline_is_said(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="scrapy_speedup.process.pool")
    run = await noisy(count=30, settings={"SPEEDUP_PROCESS_INLINE_BELOW_MS": 50})
    assert run.stat("speedup/process/inline_count") >= 1
    assert "run_in_process(noisy_or_odd) runs inline from now on" in caplog.text
    assert "Inline calls are not isolated in a worker" in caplog.text


@inprocess
async def test_pipelines_in_workers_get_spider_opened_and_spider_closed(tmp_path: Any) -> None:
    from tests.process_tasks import PlainSpider

    settings = {**POOL, "ITEM_PIPELINES": {"tests.process_tasks.BufferingPipeline": 300},
                "SPEEDUP_PROCESS_PIPELINES": ["tests.process_tasks.BufferingPipeline"],
                "TEST_BUFFER_DIR": str(tmp_path)}
    with listening(CatalogueResource(100, 0.001)) as url:
        run = await crawl(PlainSpider, settings, timeout=60, url=url, count=COUNT)
    assert run.finish_reason == "finished"
    rows = [json.loads(line) for path in tmp_path.glob("rows-*.jsonl")
            for line in path.read_text().splitlines()]
    assert sorted(row["id"] for row in rows) == list(range(COUNT))
    assert all(row["opened"] and row["reason"] == "finished" for row in rows)


@inprocess
async def test_a_stats_value_that_cannot_be_pickled_costs_only_itself(
        caplog: pytest.LogCaptureFixture) -> None:
    from tests.process_tasks import PlainSpider

    settings = {**POOL, "ITEM_PIPELINES": {"tests.process_tasks.UnpicklableStatsPipeline": 300},
                "SPEEDUP_PROCESS_PIPELINES": ["tests.process_tasks.UnpicklableStatsPipeline"]}
    with listening(CatalogueResource(100, 0.001)) as url:
        run = await crawl(PlainSpider, settings, timeout=60, url=url, count=COUNT)
    assert ids(run) == list(range(COUNT))
    assert run.stat("test/seen") == COUNT
    assert "Stats change set_value('test/odd_value') in a worker not sent" in caplog.text


@inprocess
async def test_items_from_start_wait_for_a_busy_pool() -> None:
    """start() yields items straight to the pipelines: they must wait for
    room in the pool, not all queue up at once."""
    from tests.process_tasks import StartItemsSpider

    queued: list[int] = []
    handles: list[asyncio.Task[None]] = []

    def watch(crawler: Any) -> None:
        async def sample() -> None:
            while True:
                await asyncio.sleep(0.01)
                pool = crawler.extensions.middlewares and next(
                    (e for e in crawler.extensions.middlewares
                     if type(e).__name__ == "SpeedupExtension"), None)
                if pool is not None and pool.pool_if_started is not None:
                    queued.append(len(pool.pool_if_started._queue))

        handles.append(asyncio.ensure_future(sample()))

    settings = {**POOL, "ITEM_PIPELINES": {"tests.process_tasks.SlowPipeline": 300},
                "SPEEDUP_PROCESS_PIPELINES": ["tests.process_tasks.SlowPipeline"],
                "SPEEDUP_PROCESS_MAX_IN_FLIGHT": 4}
    run = await crawl(StartItemsSpider, settings, timeout=90, during=watch, count=400)
    handles[0].cancel()
    assert run.finish_reason == "finished"
    assert len(run.items) == 400
    assert_adds_up(run)
    # The high mark is 2 x 4; what start() yields past it waits.
    assert max(queued) <= 8 + 4, max(queued)
