"""Several `scrapy crawl` processes, standing for machines, joined in one
crawl by a frontier on a real redis-server (SPEEDUP_FRONTIER_URL)."""

from __future__ import annotations

import itertools
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from scrapy_speedup.demo.graph import expected_pages
from tests.conftest import Crawl, CrawlResult
from tests.redis_server import RedisServer, redis_server
from tests.test_crawl_processes import crawled_paths, graph_site

pytestmark = pytest.mark.subprocess

_crawls = itertools.count()


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def machines(tmp_path: Path, redis: RedisServer, count: int, site: str,
             **settings: object) -> list[Crawl]:
    name = f"crawl{next(_crawls)}"
    crawls = []
    for i in range(count):
        folder = tmp_path / f"machine{i}"
        folder.mkdir()
        crawls.append(Crawl(folder, spider="follow", settings={
            "SPEEDUP_FRONTIER_URL": redis.url, "SPEEDUP_FRONTIER_NAME": name,
            "CONCURRENT_REQUESTS": 8, **settings,
        }, args={"site": site, "start_path": "/p/0"}))
    return crawls


def union(results: list[CrawlResult]) -> Counter:
    total: Counter = Counter()
    for result in results:
        total += crawled_paths(result.items)
    return total


def test_machines_crawl_one_site_once(tmp_path: Path, redis: RedisServer) -> None:
    shape = ("--pages", "300", "--links", "4", "--shape", "random", "--seed", "5")
    with graph_site(*shape, "--latency-ms", "5") as site:
        results = [crawl.result(120) for crawl in machines(tmp_path, redis, 3, site)]
    for result in results:
        assert result.returncode == 0, result.log[-4000:]
        assert result.stats["finish_reason"] == "finished"
    paths = union(results)
    assert max(paths.values()) == 1, [p for p, n in paths.items() if n > 1]
    assert set(paths) == expected_pages(300, 4, seed=5, shape="random")
    # Every machine took part.
    assert all(result.items for result in results), [len(r.items) for r in results]


def test_a_machine_killed_mid_crawl_loses_no_page(tmp_path: Path, redis: RedisServer) -> None:
    """kill -9 of one machine: its leases come back after the visibility
    timeout and the others crawl them. A page that was in flight there may be
    scraped twice in the union of the outputs, never zero times."""
    shape = ("--pages", "400", "--links", "4", "--shape", "tree")
    with graph_site(*shape, "--latency-ms", "20") as site:
        crawls = machines(tmp_path, redis, 2, site,
                          SPEEDUP_FRONTIER_VISIBILITY_TIMEOUT_SECONDS=3)
        victim, survivor = crawls
        deadline = time.monotonic() + 60
        while victim.items_file.stat().st_size < 2000 if victim.items_file.exists() else True:
            assert time.monotonic() < deadline, victim.log_file.read_text()[-3000:]
            time.sleep(0.05)
        victim.interrupt(signal.SIGKILL)
        killed = victim.result(30)
        result = survivor.result(120)
    assert killed.returncode == -signal.SIGKILL
    assert result.returncode == 0, result.log[-4000:]
    paths = union([killed, result])
    assert set(paths) == expected_pages(400, 4, shape="tree")
    repeats = sum(n - 1 for n in paths.values())
    assert repeats <= 16, repeats  # at most what the victim had leased (2 x 8)
    assert result.stat("speedup/frontier/lease_expired_count") >= 1
