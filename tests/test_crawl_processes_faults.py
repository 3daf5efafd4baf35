"""Engine processes under faults: an engine killed mid-crawl, Ctrl-C once and
twice. Whole ``scrapy crawl`` runs against the real demo site."""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import Crawl, CrawlResult, DemoSite, run_crawl
from tests.test_crawl_processes import FRONTIERS, frontier_of

pytestmark = pytest.mark.subprocess

# Slow enough that the crawl is surely under way when the test acts.
SLOW = {"SPEEDUP_CRAWL_PROCESSES": 2, "CONCURRENT_REQUESTS": 2, "LOG_LEVEL": "DEBUG"}


def start(tmp_path: Path, demo_site: DemoSite, **settings: object) -> tuple[Crawl, list[int]]:
    crawl = Crawl(tmp_path, spider="follow", settings={**SLOW, **settings},
                  args={"site": demo_site.url})
    crawl.wait_for_log(r"engine processes crawl for this one")
    pids = [int(p) for p in re.search(r"\(pids ([\d, ]+)\)", crawl.log_file.read_text())[1]
            .split(", ")]
    crawl.wait_for_log(r"Crawled \(200\).*product")
    return crawl, pids


@pytest.mark.parametrize("frontier", ["bytes", "scrapy"])
def test_an_engine_killed_mid_crawl_loses_nothing(demo_site: DemoSite, follow_whole: CrawlResult,
                                                  tmp_path: Path, frontier: str) -> None:
    """On either frontier (see FRONTIERS in test_crawl_processes.py)."""
    whole = follow_whole
    crawl, pids = start(tmp_path, demo_site, **FRONTIERS[frontier])
    os.kill(pids[0], signal.SIGKILL)
    result = crawl.result(timeout=120)
    assert result.returncode == 0, result.log
    assert result.stats["finish_reason"] == "finished"
    urls = Counter(item["url"] for item in result.items)
    assert max(urls.values()) == 1  # none twice in the output
    assert set(urls) == {item["url"] for item in whole.items}  # none lost
    assert result.stats["speedup/crawl/process_crash_count"] == 1
    assert result.stats["speedup/crawl/process_restart_count"] == 1
    assert f"engine process 0 (pid {pids[0]}) ended during the crawl (killed by SIGKILL)" \
        in result.log
    assert frontier_of(result.log) == frontier
    assert not result.alive_descendants()


def test_ctrl_c_once_finishes_the_work_in_flight(demo_site: DemoSite, runtime: str,
                                                tmp_path: Path) -> None:
    crawl, _ = start(tmp_path, demo_site, **({"TWISTED_REACTOR": "twisted.internet.epollreactor"
                                             ".EPollReactor"} if runtime == "epoll" else {}),
                     **({"TWISTED_REACTOR_ENABLED": False} if runtime == "reactorless" else {}))
    crawl.interrupt()
    result = crawl.result(timeout=60)
    assert result.returncode == 0, result.log
    assert result.stats["finish_reason"] == "shutdown"
    urls = Counter(item["url"] for item in result.items)
    assert urls and max(urls.values()) == 1
    # Every response an engine received was handled, its item in the output.
    assert result.stats["item_scraped_count"] == len(urls) == \
        result.stats["response_received_count"]
    coordinator_closes = [line for line in result.log.splitlines()
                          if "Closing spider" in line and "[engine" not in line]
    assert coordinator_closes == [coordinator_closes[0]]
    assert "Closing spider (shutdown)" in coordinator_closes[0]
    assert not result.alive_descendants()


def test_ctrl_c_twice_exits_within_5_seconds(demo_site: DemoSite, tmp_path: Path) -> None:
    # Engines slow to close: a pipeline that sleeps at close.
    crawl, _ = start(tmp_path, demo_site, TEST_CLOSE_SLEEP_S=30,
                     ITEM_PIPELINES={"testproj.pipelines.FaultPipeline": 300},
                     TEST_PIPELINE_ENABLED=False)
    crawl.interrupt()
    crawl.wait_for_log(r"Closing spider \(shutdown\)")
    time.sleep(0.5)
    crawl.interrupt()
    began = time.monotonic()
    result = crawl.result(timeout=30)
    assert time.monotonic() - began < 5, result.log
    assert not result.alive_descendants(grace=2)


def test_jobdir_resumes_where_ctrl_c_stopped(demo_site: DemoSite, follow_whole: CrawlResult,
                                            tmp_path: Path) -> None:
    """The frontier is the coordinator's, persisted by Scrapy's own scheduler:
    stopped with Ctrl-C and run again, the crawl covers the whole site, each
    page in one run only."""
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    whole = follow_whole
    jobdir = str(tmp_path / "job")
    crawl, _ = start(tmp_path / "first", demo_site, JOBDIR=jobdir)
    crawl.wait_for_log(r"Scraped from .*product/1\d\d")
    crawl.interrupt()
    first = crawl.result(timeout=60)
    assert first.returncode == 0, first.log
    assert first.stats["finish_reason"] == "shutdown"
    assert 0 < len(first.items) < len(whole.items)
    second = run_crawl(tmp_path / "second", spider="follow", settings={**SLOW, "JOBDIR": jobdir,
                                                                        "LOG_LEVEL": "INFO"},
                       args={"site": demo_site.url})
    assert second.returncode == 0, second.log
    assert second.stats["finish_reason"] == "finished"
    urls = Counter(item["url"] for item in first.items + second.items)
    assert max(urls.values()) == 1
    assert set(urls) == {item["url"] for item in whole.items}
