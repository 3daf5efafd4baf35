"""The three ways to offload CPU work, each in a real crawl on each runtime."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import DemoSite, assert_process_stats_add_up, run_crawl

pytestmark = pytest.mark.subprocess

COUNT = 30


def _check_items(result, count=COUNT):
    assert result.returncode == 0, result.log
    assert sorted(item["id"] for item in result.items) == list(range(count))
    for item in result.items:
        assert item["words"] == len(item["text"].split())
    # The work ran in worker processes, not in the crawl's process.
    pids = {item["pid"] for item in result.items}
    assert pids and all(pid in result.descendants for pid in pids), (pids, result.descendants)
    assert_process_stats_add_up(result)
    assert result.stat("speedup/process/error_count") == 0
    assert not result.alive_descendants()


def test_pipeline_runs_in_workers(demo_site: DemoSite, runtime: str, tmp_path: Path) -> None:
    result = run_crawl(
        tmp_path,
        runtime=runtime,
        settings={
            "SPEEDUP_PROCESS_WORKERS": 2,
            "SPEEDUP_PROCESS_PIPELINES": "testproj.pipelines.FaultPipeline",
            "TEST_MARKER_DIR": tmp_path,
        },
        args={"site": demo_site.url, "count": COUNT},
    )
    _check_items(result)
    # Stats calls made in the workers land in the crawl's stats, close_spider's too.
    assert result.stat("test/pipeline_items") == COUNT
    opened = {p.name.split("-")[1] for p in tmp_path.glob("opened-*")}
    closed = {p.name.split("-")[1] for p in tmp_path.glob("closed-*")}
    assert opened and opened == closed
    assert result.stat("test/pipeline_closed") == len(opened)
    assert str(os.getpid()) not in opened
    assert "scrapy-speedup process pool: 30 tasks: 30 succeeded" in result.log
    assert "(forkserver)" in result.log


@pytest.mark.parametrize("mode", ["call", "decorator", "explicit"])
def test_run_in_process(demo_site: DemoSite, runtime: str, mode: str, tmp_path: Path) -> None:
    result = run_crawl(
        tmp_path,
        runtime=runtime,
        # Inline runs are tested on their own: here every call must offload.
        settings={"TEST_PIPELINE_ENABLED": False, "SPEEDUP_PROCESS_INLINE_BELOW_MS": 0},
        args={"site": demo_site.url, "count": COUNT, "mode": mode},
    )
    _check_items(result)
    assert result.stat("speedup/process/task_count") == COUNT


def test_spawn_start_method(demo_site: DemoSite, tmp_path: Path) -> None:
    result = run_crawl(
        tmp_path,
        settings={
            "SPEEDUP_PROCESS_START_METHOD": "spawn",
            "SPEEDUP_PROCESS_PIPELINES": "testproj.pipelines.FaultPipeline",
        },
        args={"site": demo_site.url, "count": 10},
    )
    _check_items(result, 10)
    assert "(spawn)" in result.log


def test_cheap_function_runs_inline(demo_site: DemoSite, tmp_path: Path) -> None:
    result = run_crawl(
        tmp_path,
        settings={"TEST_PIPELINE_ENABLED": False, "SPEEDUP_PROCESS_INLINE_BELOW_MS": 50},
        args={"site": demo_site.url, "count": COUNT, "mode": "call"},
    )
    assert result.returncode == 0, result.log
    assert len(result.items) == COUNT
    inline = result.stat("speedup/process/inline_count")
    # The first calls are measured in workers, then the rest run inline.
    assert 0 < inline < COUNT
    assert sum(item["pid"] not in result.descendants for item in result.items) == inline
    assert_process_stats_add_up(result)


def test_without_the_addon_run_in_process_runs_inline(demo_site: DemoSite, tmp_path: Path) -> None:
    result = run_crawl(
        tmp_path,
        settings={"SPEEDUP_ENABLED": False, "TEST_PIPELINE_ENABLED": False},
        args={"site": demo_site.url, "count": 5, "mode": "call"},
    )
    assert result.returncode == 0, result.log
    assert len(result.items) == 5
    assert "scrapy-speedup is not enabled in this process" in result.log
    # Every call ran in the crawl's own process. (Not "no child process at
    # all": Python's platform module runs `uname -p` as Scrapy logs its
    # versions, a child that the test's polling sometimes sees.)
    pids = {item["pid"] for item in result.items}
    assert len(pids) == 1 and not pids & result.descendants, (pids, result.descendants)
    assert "scrapy-speedup process pool" not in result.log
