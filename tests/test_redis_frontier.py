"""Several `scrapy crawl` processes, standing for machines, joined in one
crawl by a frontier on a real redis-server (SPEEDUP_FRONTIER_URL)."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from scrapy_speedup.demo.graph import expected_pages
from tests.conftest import Crawl, CrawlResult, start_capacity_site, timing
from tests.redis_server import RedisServer, redis_server
from tests.test_crawl_processes import crawled_paths, graph_site

pytestmark = pytest.mark.subprocess

_crawls = itertools.count()


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def machines(tmp_path: Path, redis: RedisServer, count: int, site: str,
             args: dict[str, object] | None = None, **settings: object) -> list[Crawl]:
    name = f"crawl{next(_crawls)}"
    crawls = []
    for i in range(count):
        folder = tmp_path / f"machine{i}"
        folder.mkdir()
        crawls.append(Crawl(folder, spider="follow", settings={
            "SPEEDUP_FRONTIER_URL": redis.url, "SPEEDUP_FRONTIER_NAME": name,
            "CONCURRENT_REQUESTS": 8, **settings,
        }, args={"site": site, "start_path": "/p/0", **(args or {})}))
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
    # A machine sends each link once at most: its repeats are dropped at
    # home (each sent all 4 links of every page it crawled, ~4 x 100, before).
    for result in results:
        assert result.stat("speedup/frontier/pushed_count") <= 301, result.stats
        assert result.stat("speedup/frontier/round_trip_count") >= 1



def test_machines_with_engine_processes_crawl_one_site_once(tmp_path: Path,
                                                            redis: RedisServer) -> None:
    """Each machine runs SPEEDUP_CRAWL_PROCESSES engine processes: its
    coordinator leases from Redis and lends to its engines; an engine's
    requests go to Redis, and a lease ends there once its engine handled it
    and its items passed the machine's pipelines."""
    shape = ("--pages", "300", "--links", "4", "--shape", "random", "--seed", "7")
    with graph_site(*shape, "--latency-ms", "5") as site:
        crawls = machines(tmp_path, redis, 2, site, SPEEDUP_CRAWL_PROCESSES=2)
        results = [crawl.result(180) for crawl in crawls]
    for result in results:
        assert result.returncode == 0, result.log[-4000:]
        assert result.stats["finish_reason"] == "finished"
        assert result.stat("speedup/crawl/processes") == 2
        assert result.stat("speedup/frontier/leased_count") >= 1
    paths = union(results)
    assert max(paths.values()) == 1, [p for p, n in paths.items() if n > 1]
    assert set(paths) == expected_pages(300, 4, seed=7, shape="random")
    # Each machine's pages were crawled in its engine processes, not in it.
    for crawl, result in zip(crawls, results, strict=True):
        pids = {item["pid"] for item in result.items}
        assert pids and crawl.process.pid not in pids, pids



def test_an_engine_killed_in_a_machine_loses_no_page(tmp_path: Path,
                                                     redis: RedisServer) -> None:
    """An engine process of a machine dies mid-crawl: the pages it was
    handling are crawled again under the leases their machine holds (not
    pushed again as new requests, not left leased until the crawl hangs)."""
    shape = ("--pages", "300", "--links", "4", "--shape", "tree")
    with graph_site(*shape, "--latency-ms", "30") as site:
        # Callbacks of 50 ms: the engine killed holds pages downloaded and
        # not yet handled.
        (crawl,) = machines(tmp_path, redis, 1, site, {"handle_ms": 50},
                            SPEEDUP_CRAWL_PROCESSES=2, CONCURRENT_REQUESTS=8,
                            LOG_LEVEL="DEBUG")
        crawl.wait_for_log(r"engine processes crawl for this one")
        pids = [int(p) for p in re.search(r"\(pids ([\d, ]+)\)",
                                          crawl.log_file.read_text())[1].split(", ")]
        crawl.wait_for_log(r"Crawled \(200\).*/p/2\d")
        os.kill(pids[0], signal.SIGKILL)
        result = crawl.result(180)
    assert result.returncode == 0, result.log[-4000:]
    assert result.stats["finish_reason"] == "finished"
    assert result.stats["speedup/crawl/process_crash_count"] == 1
    paths = crawled_paths(result.items)
    assert max(paths.values()) == 1 and set(paths) == expected_pages(300, 4, shape="tree")
    assert result.stat("speedup/crawl/requeued_count") >= 1, result.stats
    assert result.stat("speedup/frontier/leased_count") == 300  # none pushed again


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


@timing
def test_politeness_is_the_crawls_across_machines(tmp_path: Path, redis: RedisServer) -> None:
    """CONCURRENT_REQUESTS_PER_DOMAIN is the crawl's total over every machine,
    measured at the site."""
    site = start_capacity_site(capacity=1000, latency_ms=50)
    name = f"crawl{next(_crawls)}"
    try:
        crawls = []
        for i in range(2):
            folder = tmp_path / f"machine{i}"
            folder.mkdir()
            crawls.append(Crawl(folder, spider="crawl_pages", settings={
                "SPEEDUP_FRONTIER_URL": redis.url, "SPEEDUP_FRONTIER_NAME": name,
                "CONCURRENT_REQUESTS": 32, "CONCURRENT_REQUESTS_PER_DOMAIN": 3,
            }, args={"site": site.url, "count": 60}))
        results = [crawl.result(120) for crawl in crawls]
        with urllib.request.urlopen(f"{site.url}/stats", timeout=10) as response:
            served = json.load(response)
    finally:
        site.process.terminate()
        site.process.wait(10)
    for result in results:
        assert result.returncode == 0, result.log[-4000:]
    pages = Counter(item["n"] for result in results for item in result.items)
    assert sorted(pages) == list(range(60)) and max(pages.values()) == 1
    assert served["peak"] == 3, served  # never more, and the limit is used
    assert all(result.items for result in results)


def test_a_redis_restart_mid_crawl_loses_nothing(tmp_path: Path) -> None:
    """Redis goes away for 3 s and comes back with its data: the machines
    wait, then go on; every page once."""
    shape = ("--pages", "300", "--links", "4", "--shape", "tree")
    with redis_server() as server, graph_site(*shape, "--latency-ms", "20") as site:
        crawls = machines(tmp_path, server, 2, site)
        first = crawls[0]
        deadline = time.monotonic() + 60
        while not first.items_file.exists() or first.items_file.stat().st_size < 1500:
            assert time.monotonic() < deadline, first.log_file.read_text()[-3000:]
            time.sleep(0.05)
        server.stop()
        time.sleep(3)
        server.start()
        results = [crawl.result(120) for crawl in crawls]
    for result in results:
        assert result.returncode == 0, result.log[-4000:]
        assert result.stats["finish_reason"] == "finished"
    paths = union(results)
    assert set(paths) == expected_pages(300, 4, shape="tree")
    assert max(paths.values()) == 1


def test_no_machine_ends_while_another_still_makes_requests(tmp_path: Path,
                                                            redis: RedisServer) -> None:
    """One machine starts at a page that links nowhere, the other at the
    root of 300 pages (slowly): the first must not end while the second's
    pages make requests, and takes its share of them."""
    shape = ("--pages", "300", "--links", "4", "--shape", "random", "--seed", "7")
    leaf = next(p for p in sorted(expected_pages(300, 4, seed=7, shape="random"))
                if p != "/p/0")
    with graph_site(*shape, "--latency-ms", "30") as site:
        name = f"crawl{next(_crawls)}"
        crawls = []
        for i, start in enumerate([leaf, "/p/0"]):
            folder = tmp_path / f"machine{i}"
            folder.mkdir()
            crawls.append(Crawl(folder, spider="follow", settings={
                "SPEEDUP_FRONTIER_URL": redis.url, "SPEEDUP_FRONTIER_NAME": name,
                "CONCURRENT_REQUESTS": 4, "CONCURRENT_REQUESTS_PER_DOMAIN": 8,
            }, args={"site": site, "start_path": start}))
        results = [crawl.result(120) for crawl in crawls]
    for result in results:
        assert result.returncode == 0, result.log[-4000:]
    paths = union(results)
    assert max(paths.values()) == 1
    assert set(paths) == expected_pages(300, 4, seed=7, shape="random")
    assert len(results[0].items) > 20, len(results[0].items)


@timing  # how far past the limit depends on the pages in hand, more on a busy machine
def test_closespider_itemcount_is_the_crawls(tmp_path: Path, redis: RedisServer) -> None:
    """CLOSESPIDER_ITEMCOUNT counts every machine's items: the crawl closes
    soon after 40 in all, each machine with the crawl's reason."""
    shape = ("--pages", "400", "--links", "4", "--shape", "tree")
    with graph_site(*shape, "--latency-ms", "20") as site:
        crawls = machines(tmp_path, redis, 2, site, CLOSESPIDER_ITEMCOUNT=40)
        results = [crawl.result(120) for crawl in crawls]
    for result in results:
        assert result.returncode == 0, result.log[-4000:]
        assert result.stats["finish_reason"] == "closespider_itemcount"
    total = sum(len(result.items) for result in results)
    # Each machine may finish the pages it had in hand (8 at once, 16 leased).
    # Which machine did most is chance (one may start seconds late), so only
    # the total says the limit was the crawl's.
    assert 40 <= total <= 40 + 2 * 16, [len(r.items) for r in results]


def test_a_finished_crawl_leaves_no_keys_and_runs_again(tmp_path: Path,
                                                         redis: RedisServer) -> None:
    """Each machine writes its own feed (%(speedup_machine)s); once the crawl
    finished, its keys are gone, and the same crawl started again crawls the
    site again (where scrapy-redis's persisted dupefilter would crawl nothing)."""
    import redis as redis_client

    shape = ("--pages", "60", "--links", "3", "--shape", "tree")
    name = f"crawl{next(_crawls)}"
    with graph_site(*shape, "--latency-ms", "5") as site:
        for run in range(2):
            folder = tmp_path / f"run{run}"
            folder.mkdir()
            crawl = Crawl(folder, spider="follow", settings={
                "SPEEDUP_FRONTIER_URL": redis.url, "SPEEDUP_FRONTIER_NAME": name,
                "FEEDS": {str(folder / "items-%(speedup_machine)s.jsonl"): {
                    "format": "jsonlines"}},
            }, args={"site": site, "start_path": "/p/0"})
            result = crawl.result(120)
            assert result.returncode == 0, result.log[-4000:]
            assert "its keys are deleted" in result.log
            (feed,) = folder.glob("items-*-*.jsonl")
            assert len(feed.read_text().splitlines()) == len(expected_pages(60, 3,
                                                                             shape="tree"))
    client = redis_client.Redis.from_url(redis.url)
    try:
        assert client.keys(f"{name}:*") == []
    finally:
        client.close()


def test_a_key_of_another_type_stops_the_crawl_with_the_reason(tmp_path: Path,
                                                               redis: RedisServer) -> None:
    """Redis refuses a command (another program's key where the crawl keeps
    its count): waiting would not cure it, so the machine says why and stops
    at once instead of waiting SPEEDUP_FRONTIER_MAX_OUTAGE_SECONDS."""
    import redis as redis_client

    with redis_client.Redis.from_url(redis.url) as client:
        client.lpush("squatted:queued", "not a count")
    started = time.monotonic()
    with graph_site("--pages", "20", "--links", "2") as site:
        result = Crawl(tmp_path, spider="follow", settings={
            "SPEEDUP_FRONTIER_URL": redis.url, "SPEEDUP_FRONTIER_NAME": "squatted",
            "SPEEDUP_FRONTIER_MAX_OUTAGE_SECONDS": 120,
        }, args={"site": site, "start_path": "/p/0"}).result(90)
    assert result.returncode == 0, result.log[-4000:]
    assert result.stats["finish_reason"] == "frontier_error"
    assert "refused the frontier's commands (ResponseError: WRONGTYPE" in result.log
    assert "'squatted:'" in result.log
    assert time.monotonic() - started < 60



def test_closespider_errorcount_with_engine_processes(tmp_path: Path, redis: RedisServer) -> None:
    """A machine with engine processes: its callbacks' errors are counted in
    the engines, and CLOSESPIDER_ERRORCOUNT is the crawl's, in Redis. The
    errors never reached the counts the machine sends there, so the limit
    never applied: all 200 pages were crawled."""
    site = start_capacity_site(capacity=1000, latency_ms=20)
    try:
        result = Crawl(tmp_path, spider="h_raise", settings={
            "SPEEDUP_FRONTIER_URL": redis.url, "SPEEDUP_FRONTIER_NAME": f"crawl{next(_crawls)}",
            "SPEEDUP_CRAWL_PROCESSES": 2, "CONCURRENT_REQUESTS": 2,
            "CLOSESPIDER_ERRORCOUNT": 5,
        }, args={"site": site.url, "count": 200}).result(120)
    finally:
        site.process.terminate()
        site.process.wait(10)
    assert result.returncode == 0, result.log[-4000:]
    assert result.stats["finish_reason"] == "closespider_errorcount"
    assert 5 <= result.stats["spider_exceptions/count"] < 40, result.stats
