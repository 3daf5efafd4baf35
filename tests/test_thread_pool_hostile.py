"""The thread pool under calls that never return, threads that cannot start
and a stop while calls hang: in process, on pytest-twisted's reactor."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from scrapy_speedup._bridge import Bridge
from scrapy_speedup._thread_pool import ThreadPool
from scrapy_speedup.config import SpeedupConfig
from scrapy_speedup.exceptions import PoolClosedError, ThreadPoolExhaustedError
from tests.inprocess import inprocess, make_crawler


def new_pool(**settings: Any) -> tuple[ThreadPool, Any]:
    crawler = make_crawler(__import__("scrapy").Spider, settings)
    crawler.stats.open_spider()
    return ThreadPool(crawler, SpeedupConfig.of(crawler), Bridge()), crawler.stats


def thread_stats(stats: Any) -> dict[str, int]:
    return {k.rpartition("/")[2]: v for k, v in stats.get_stats().items()
            if k.startswith("speedup/thread/")}


def assert_adds_up(stats: Any) -> None:
    s = thread_stats(stats)
    assert s.get("task_count", 0) == (s.get("succeeded_count", 0) + s.get("error_count", 0)
                                      + s.get("abandoned_count", 0)), s


def pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("scrapy-speedup-thread-")]


async def outcome(pool: ThreadPool, func: Any, *args: Any, timeout: float | None = None) -> Any:
    try:
        return await pool.run(func, args, {}, timeout)
    except Exception as exc:  # noqa: BLE001 - the outcome is what the test checks
        return exc


@pytest.fixture
def release() -> Any:
    """An event the hanging calls wait on; set at the end so no thread is left."""
    event = threading.Event()
    yield event
    event.set()


@inprocess
async def test_stuck_threads_are_bounded_and_calls_then_fail_fast(release: threading.Event
                                                                   ) -> None:
    before = len(pool_threads())
    pool, stats = new_pool(SPEEDUP_THREAD_WORKERS=4, SPEEDUP_THREAD_MAX_STUCK=4)
    started = time.monotonic()
    results = await asyncio.wait_for(asyncio.gather(*(
        outcome(pool, release.wait, timeout=0.2) for _ in range(300)
    )), 30)
    # 300 calls that never return: 8 threads at most (4 + 4 stuck), not 307.
    assert len(pool_threads()) - before <= 8
    timeouts = [r for r in results if isinstance(r, TimeoutError)]
    exhausted = [r for r in results if isinstance(r, ThreadPoolExhaustedError)]
    assert len(timeouts) == 8
    assert len(exhausted) == 292
    assert "all 8 threads it may have are stuck" in str(exhausted[0])
    assert "SPEEDUP_THREAD_MAX_STUCK 4" in str(exhausted[0])
    assert time.monotonic() - started < 10
    s = thread_stats(stats)
    assert s["timeout_count"] == 8 and s["stuck_max"] == 8
    assert s["busy_max"] == 8
    assert_adds_up(stats)
    # A stuck call that returns frees its thread for new calls.
    release.set()
    for _ in range(100):
        if pool._usable() >= 4:
            break
        await asyncio.sleep(0.05)
    assert await outcome(pool, lambda: "back", timeout=5) == "back"
    await pool.close()


@inprocess
async def test_a_thread_that_cannot_start_never_stops_the_timeouts(
        release: threading.Event, monkeypatch: pytest.MonkeyPatch) -> None:
    pool, stats = new_pool(SPEEDUP_THREAD_WORKERS=4)
    real_start = threading.Thread.start
    started: list[str] = []

    def start(thread: threading.Thread) -> None:
        if thread.name.startswith("scrapy-speedup-thread-") and len(started) >= 2:
            raise RuntimeError("can't start new thread")
        started.append(thread.name)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    results = await asyncio.wait_for(asyncio.gather(
        *(outcome(pool, release.wait, timeout=0.3) for _ in range(2)),
        *(outcome(pool, time.sleep, 0.01, timeout=0.3) for _ in range(6)),
    ), 20)
    # The two threads that started got stuck and timed out, and no
    # replacement could start: the six waiting calls fail at once with the
    # reason instead of waiting forever (the timer kept running).
    assert [type(r) for r in results[:2]] == [TimeoutError, TimeoutError]
    assert all(isinstance(r, ThreadPoolExhaustedError) for r in results[2:]), results
    assert "no thread could be started (can't start new thread)" in str(results[2])
    assert thread_stats(stats)["start_error_count"] >= 1
    assert_adds_up(stats)
    release.set()
    monkeypatch.setattr(threading.Thread, "start", real_start)
    await pool.close()


@inprocess
async def test_abandon_answers_waiting_and_running_calls(release: threading.Event) -> None:
    pool, stats = new_pool(SPEEDUP_THREAD_WORKERS=2)
    calls = [asyncio.ensure_future(outcome(pool, release.wait)) for _ in range(5)]
    for _ in range(100):
        if thread_stats(stats).get("task_count") == 5 and pool._busy == 2:
            break
        await asyncio.sleep(0.02)
    pool.abandon("test")
    results = await asyncio.wait_for(asyncio.gather(*calls), 5)
    assert all(isinstance(r, PoolClosedError) for r in results), results
    assert "abandoned" in str(results[0])
    assert thread_stats(stats)["abandoned_count"] == 5
    assert_adds_up(stats)
    assert isinstance(await outcome(pool, time.sleep, 0), PoolClosedError)
    release.set()
    await pool.close()


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), 1e12, "5"])
@inprocess
async def test_a_bad_timeout_is_refused_by_name(timeout: Any) -> None:
    pool, stats = new_pool()
    result = await outcome(pool, time.sleep, 0, timeout=timeout)
    assert isinstance(result, ValueError), result
    assert "the timeout of sleep" in str(result)
    assert_adds_up(stats)
    await pool.close()


@inprocess
async def test_close_does_not_wait_for_calls_already_given_up(release: threading.Event) -> None:
    """A call that timed out has had its answer: closing the pool must not
    wait SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS for its thread, at the end of every
    crawl that had one; a call still running for its caller is waited for."""
    pool, _ = new_pool(SPEEDUP_THREAD_WORKERS=2, SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS=20)
    assert isinstance(await outcome(pool, release.wait, timeout=0.1), TimeoutError)
    started = time.monotonic()
    await asyncio.wait_for(pool.close(), 10)
    assert time.monotonic() - started < 2

    pool, _ = new_pool(SPEEDUP_THREAD_WORKERS=2, SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS=20)
    running = asyncio.ensure_future(outcome(pool, time.sleep, 0.5))
    await asyncio.sleep(0.1)
    await asyncio.wait_for(pool.close(), 10)
    assert running.done() and running.result() is None
