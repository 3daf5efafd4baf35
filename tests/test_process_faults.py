"""Faults in the process pool: every item ends scraped, dropped or errored,
and the stats add up (task_count = succeeded + dropped + errored)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import DemoSite, assert_process_stats_add_up, run_crawl

pytestmark = pytest.mark.subprocess

COUNT = 20


def crawl_with_faults(tmp_path, demo_site, faults, *, runtime="asyncio", mode="pipeline",
                      settings=None, args=None):
    base = {
        "SPEEDUP_PROCESS_WORKERS": 2,
        "TEST_FAULTS": faults,
        "TEST_MARKER_DIR": tmp_path,
        "SPEEDUP_PROCESS_INLINE_BELOW_MS": 0,
    }
    if mode == "pipeline":
        base["SPEEDUP_PROCESS_PIPELINES"] = "testproj.pipelines.FaultPipeline"
    else:
        base["TEST_PIPELINE_ENABLED"] = False
    result = run_crawl(
        tmp_path,
        runtime=runtime,
        settings={**base, **(settings or {})},
        args={"site": demo_site.url, "count": COUNT, "mode": mode, **(args or {})},
    )
    assert_process_stats_add_up(result)
    assert not result.alive_descendants()
    return result


def scraped_ids(result):
    return sorted(item["id"] for item in result.items)


def test_worker_killed_mid_item_is_retried(demo_site: DemoSite, runtime: str,
                                           tmp_path: Path) -> None:
    result = crawl_with_faults(tmp_path, demo_site, {"3": "kill_once"}, runtime=runtime)
    assert result.returncode == 0
    assert scraped_ids(result) == list(range(COUNT))
    assert result.stat("speedup/process/worker_crash_count") == 1
    assert result.stat("speedup/process/retry_count") == 1
    assert result.stat("speedup/process/worker_restart_count") == 1
    assert result.stat("speedup/process/error_count") == 0
    assert "died with signal SIGKILL (exit code -9) while running FaultPipeline" in result.log


def test_poison_item_errors_after_its_retries(demo_site: DemoSite, tmp_path: Path) -> None:
    start = time.monotonic()
    result = crawl_with_faults(tmp_path, demo_site, {"5": "poison"},
                               settings={"SPEEDUP_PROCESS_RETRY_TIMES": 2})
    assert result.returncode == 0
    assert scraped_ids(result) == [i for i in range(COUNT) if i != 5]
    # Three attempts, each killed its worker; the other items lost nothing.
    assert result.stat("speedup/process/worker_crash_count") == 3
    assert result.stat("speedup/process/retry_count") == 2
    assert result.stat("speedup/process/error_count") == 1
    assert result.stat("test/item_error/WorkerCrashedError") == 1
    assert "its worker process died 3 times" in result.log
    assert time.monotonic() - start < 60


def test_poison_call_errors_in_the_callback(demo_site: DemoSite, tmp_path: Path) -> None:
    result = crawl_with_faults(tmp_path, demo_site, {"5": "poison"}, mode="call")
    assert scraped_ids(result) == [i for i in range(COUNT) if i != 5]
    assert result.stat("spider_exceptions/WorkerCrashedError") == 1
    assert result.stat("speedup/process/error_count") == 1


def test_unpicklable_item_field_is_named(demo_site: DemoSite, tmp_path: Path) -> None:
    result = crawl_with_faults(tmp_path, demo_site, {}, args={"unpicklable": "4"})
    assert scraped_ids(result) == [i for i in range(COUNT) if i != 4]
    assert result.stat("test/item_error/UnpicklableError") == 1
    assert (
        "the item sent to FaultPipeline.process_item(): ['selector'] holds a"
        " parsel.selector.Selector, which cannot be pickled" in result.log
    )
    assert result.stat("speedup/process/worker_crash_count") == 0


def test_unpicklable_argument_is_named(demo_site: DemoSite, tmp_path: Path) -> None:
    result = crawl_with_faults(tmp_path, demo_site, {}, mode="call", args={"unpicklable": "4"})
    assert scraped_ids(result) == [i for i in range(COUNT) if i != 4]
    assert "the arguments of process(): [0]['selector'] holds a parsel.selector.Selector" \
        in result.log


def test_lambda_is_refused_with_a_hint(demo_site: DemoSite, tmp_path: Path) -> None:
    result = crawl_with_faults(tmp_path, demo_site, {}, mode="lambda")
    assert result.items == []
    assert result.stat("spider_exceptions/UnpicklableError") == COUNT
    assert "define the function at module level" in result.log


def test_unpicklable_result_is_named(demo_site: DemoSite, tmp_path: Path) -> None:
    result = crawl_with_faults(tmp_path, demo_site, {"6": "unpicklable_result"})
    assert scraped_ids(result) == [i for i in range(COUNT) if i != 6]
    assert (
        "the item returned by FaultPipeline.process_item(): ['lock'] holds a _thread.lock"
        in result.log
    )
    assert result.stat("speedup/process/unpicklable_count") == 1


def test_worker_exception_keeps_its_traceback(demo_site: DemoSite, tmp_path: Path) -> None:
    result = crawl_with_faults(tmp_path, demo_site, {"7": "raise", "8": "drop"})
    assert scraped_ids(result) == [i for i in range(COUNT) if i not in (7, 8)]
    assert result.stat("test/item_error/ValueError") == 1
    assert result.stat("item_dropped_count") == 1
    assert result.stat("speedup/process/dropped_count") == 1
    assert "Worker traceback:" in result.log
    assert 'testproj/faults.py", line' in result.log and "bad product 7" in result.log
    assert "unwanted product 8" in result.log


@pytest.mark.parametrize("setting", ["TEST_FAIL_OPEN", "TEST_FAIL_FROM_CRAWLER"])
def test_pipeline_that_cannot_start_fails_the_crawl(demo_site: DemoSite, setting: str,
                                                    tmp_path: Path) -> None:
    start = time.monotonic()
    result = crawl_with_faults(tmp_path, demo_site, {}, settings={setting: True})
    assert time.monotonic() - start < 30
    assert result.returncode != 0
    assert result.items == []
    assert "failed to start in a worker" in result.log
    assert "failed on purpose" in result.log
    assert result.stat("speedup/process/worker_restart_count") == 0


def test_task_past_its_timeout_errors(demo_site: DemoSite, tmp_path: Path) -> None:
    start = time.monotonic()
    result = crawl_with_faults(tmp_path, demo_site, {"2": "sleep:60"},
                               settings={"SPEEDUP_PROCESS_TIMEOUT_SECONDS": 1})
    assert time.monotonic() - start < 30
    assert scraped_ids(result) == [i for i in range(COUNT) if i != 2]
    assert result.stat("speedup/process/timeout_count") == 1
    assert result.stat("test/item_error/TaskTimeoutError") == 1
    assert result.stat("speedup/process/worker_crash_count") == 0
    assert result.stat("speedup/process/worker_restart_count") == 1
    assert "ran past SPEEDUP_PROCESS_TIMEOUT_SECONDS (1.0 s); killing its worker" in result.log


def test_max_tasks_per_child_recycles_workers(demo_site: DemoSite, tmp_path: Path) -> None:
    result = crawl_with_faults(tmp_path, demo_site, {},
                               settings={"SPEEDUP_PROCESS_MAX_TASKS_PER_CHILD": 3})
    assert scraped_ids(result) == list(range(COUNT))
    pids = {item["pid"] for item in result.items}
    assert len(pids) >= COUNT // 3
    # Each recycled worker ran close_spider: nothing it held is lost.
    opened = {p.name for p in tmp_path.glob("opened-*")}
    closed = {p.name.replace("closed", "opened") for p in tmp_path.glob("closed-*")}
    assert opened == closed
    assert result.stat("speedup/process/worker_crash_count") == 0
    assert result.stat("speedup/process/worker_restart_count") == len(opened) - 2
