"""Engine processes (SPEEDUP_CRAWL_PROCESSES): one crawl, the same as in one
process, on every core. Whole ``scrapy crawl`` runs against real local sites."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pytest

from scrapy_speedup.demo.graph import expected_pages
from tests.conftest import CrawlResult, DemoSite, run_crawl, start_capacity_site

pytestmark = pytest.mark.subprocess

TWO = {"SPEEDUP_CRAWL_PROCESSES": 2}
#: Settings that choose each of the coordinator's frontiers: the byte
#: frontier with Scrapy's defaults, Scrapy's scheduler and downloader slots
#: otherwise (DUPEFILTER_DEBUG is one of the reasons, and changes nothing else).
FRONTIERS: dict[str, dict[str, object]] = {"bytes": {}, "scrapy": {"DUPEFILTER_DEBUG": True}}


def frontier_of(log: str) -> str:
    """Which frontier the crawl of *log* ran on."""
    if "the crawl's frontier keeps requests as bytes" in log:
        return "bytes"
    assert "the crawl's frontier is Scrapy's scheduler" in log, log[-3000:]
    return "scrapy"


def engine_pids(items: list[dict]) -> set[int]:
    return {item["pid"] for item in items if "pid" in item}


@pytest.mark.parametrize("frontier", ["bytes", "scrapy"])
def test_same_crawl_as_one_process(demo_site: DemoSite, follow_whole: CrawlResult,
                                   runtime: str, tmp_path: Path, frontier: str) -> None:
    """The demo site, every link followed (most are to pages already seen):
    the same pages, each scraped once, and the same counts, on either
    frontier."""
    one = follow_whole
    two = run_crawl(tmp_path, spider="follow", runtime=runtime,
                    args={"site": demo_site.url}, settings={**TWO, **FRONTIERS[frontier]})
    assert frontier_of(two.log) == frontier
    for result in (one, two):
        assert result.returncode == 0, result.log
        assert result.stats["finish_reason"] == "finished"
    urls_one = Counter(item["url"] for item in one.items)
    urls_two = Counter(item["url"] for item in two.items)
    assert urls_two == urls_one
    assert max(urls_two.values()) == 1
    assert len(urls_one) > 500  # the whole site, not a start page
    for key in ("item_scraped_count", "response_received_count", "dupefilter/filtered"):
        assert two.stats[key] == one.stats[key], key
    assert two.stats["speedup/crawl/processes"] == 2
    per_engine = [two.stats[f"speedup/crawl/engine/{i}/response_received_count"]
                  for i in range(2)]
    assert sum(per_engine) == two.stats["response_received_count"]
    assert min(per_engine) > 0, per_engine  # both engines crawled
    assert len(engine_pids(two.items)) == 2
    assert "Traceback" not in two.log, two.log
    assert re.search(rf"2 engines crawled {two.stats['response_received_count']} pages"
                     r" \(engine 0: \d+, engine 1: \d+\)", two.log), two.log


def test_dont_filter_and_duplicates(tmp_path: Path) -> None:
    """Each page asked three times: once, again with dont_filter=True (crawled
    again), and again without it (filtered), across processes."""
    site = start_capacity_site(capacity=100, latency_ms=5)
    try:
        result = run_crawl(tmp_path, spider="crawl_pages", settings=TWO,
                           args={"site": site.url, "count": 40, "again": 1})
    finally:
        site.process.terminate()
    assert result.returncode == 0, result.log
    seen = Counter((item["n"], item["again"]) for item in result.items)
    assert seen == Counter({**{(n, False): 1 for n in range(40)},
                            **{(n, True): 1 for n in range(40)}})
    assert result.stats["dupefilter/filtered"] == 40
    assert all(item["flags"] == ["test-flag"] for item in result.items if not item["again"])


def test_requests_that_cannot_travel_stay_in_their_engine(tmp_path: Path) -> None:
    site = start_capacity_site(capacity=100, latency_ms=5)
    try:
        result = run_crawl(tmp_path, spider="crawl_pages", settings=TWO,
                           args={"site": site.url, "count": 30, "lambdas": 3})
    finally:
        site.process.terminate()
    assert result.returncode == 0, result.log
    ns = Counter(item["n"] for item in result.items)
    expected = {*range(30), *(30 + n for n in range(0, 30, 3))}
    assert set(ns) == expected and max(ns.values()) == 1
    assert result.stats["speedup/crawl/unserializable_count"] == 10
    # A warning once per callback and engine, naming it.
    warnings = [line for line in result.log.splitlines() if "cannot be sent to the crawl" in line]
    assert 1 <= len(warnings) <= 2, warnings
    assert "<lambda>" in warnings[0]


def test_politeness_is_the_crawls(tmp_path: Path) -> None:
    """CONCURRENT_REQUESTS_PER_DOMAIN is the crawl's total, measured at the site."""
    site = start_capacity_site(capacity=1000, latency_ms=50)
    try:
        result = run_crawl(
            tmp_path, spider="crawl_pages",
            settings={**TWO, "CONCURRENT_REQUESTS": 32, "CONCURRENT_REQUESTS_PER_DOMAIN": 3},
            args={"site": site.url, "count": 60},
        )
        with urllib.request.urlopen(f"{site.url}/stats", timeout=10) as response:
            served = json.load(response)
    finally:
        site.process.terminate()
    assert result.returncode == 0, result.log
    assert len(result.items) == 60
    assert served["peak"] == 3, served  # never more, and the limit is used
    assert len(engine_pids(result.items)) == 2


def test_one_feed_of_each_format(demo_site: DemoSite, tmp_path: Path) -> None:
    feeds = {
        str(tmp_path / "items.json"): {"format": "json"},
        str(tmp_path / "items.csv"): {"format": "csv"},
    }
    result = run_crawl(tmp_path, spider="follow", settings={**TWO, "FEEDS": feeds},
                       args={"site": demo_site.url})
    assert result.returncode == 0, result.log
    urls = Counter(item["url"] for item in result.items)  # the -o jsonlines feed
    assert max(urls.values()) == 1
    as_json = json.loads((tmp_path / "items.json").read_text())
    assert Counter(item["url"] for item in as_json) == urls
    lines = (tmp_path / "items.csv").read_text().splitlines()
    assert len(lines) == len(urls) + 1  # and a header


def test_crawl_pipelines_see_every_item_once(demo_site: DemoSite, tmp_path: Path) -> None:
    result = run_crawl(
        tmp_path, spider="follow",
        settings={**TWO, "SPEEDUP_CRAWL_PIPELINES": {"testproj.pipelines.SeenOnce": 100}},
        args={"site": demo_site.url},
    )
    assert result.returncode == 0, result.log
    # SeenOnce runs once for the crawl: it sees each URL once, from both engines.
    assert result.stats["test/seen_once"] == len(result.items)
    assert result.stats["test/seen_twice"] == 0 if "test/seen_twice" in result.stats else True
    assert result.stats["test/seen_pids"] == 2


@pytest.mark.parametrize(("setting", "reason"), [
    ({"CLOSESPIDER_ITEMCOUNT": 50}, "closespider_itemcount"),
    ({"CLOSESPIDER_PAGECOUNT": 50}, "closespider_pagecount"),
])
def test_closespider_limits_are_the_crawls(demo_site: DemoSite, tmp_path: Path,
                                           setting: dict, reason: str) -> None:
    result = run_crawl(tmp_path, spider="follow", settings={**TWO, **setting,
                                                            "CONCURRENT_REQUESTS": 8},
                       args={"site": demo_site.url})
    assert result.returncode == 0, result.log
    assert result.stats["finish_reason"] == reason
    # What was in flight when the limit was reached finishes, as in one
    # process: a little over the limit, far from the site's 700 pages.
    assert 50 <= len(result.items) <= 50 + 8 * 2 + 20, len(result.items)


def test_a_callback_that_closes_the_spider_closes_the_crawl(demo_site: DemoSite,
                                                            tmp_path: Path) -> None:
    result = run_crawl(tmp_path, spider="follow", settings=TWO,
                       args={"site": demo_site.url, "close_at": "/product/7.html"})
    assert result.returncode == 0, result.log
    assert result.stats["finish_reason"] == "asked_by_a_callback"
    assert len(result.items) < 500


def test_an_engine_that_cannot_open_stops_the_crawl(demo_site: DemoSite, tmp_path: Path) -> None:
    """The engines' pipelines open in the engines: one that raises stops the
    crawl with its error, and the exit status says so."""
    result = run_crawl(
        tmp_path, spider="follow",
        settings={**TWO, "ITEM_PIPELINES": {"testproj.pipelines.FaultPipeline": 300},
                  "TEST_FAIL_OPEN": True},
        args={"site": demo_site.url}, timeout=60,
    )
    assert result.returncode == 1, result.log
    assert "open_spider failed on purpose" in result.log
    assert "engine process" in result.log
    assert not result.items


def test_download_delay_holds_across_processes(tmp_path: Path) -> None:
    """20 pages, 0.2 s apart for the whole crawl: about 4 s, not the 2 s of
    two engines that each keep the delay alone."""
    with start_capacity_site(100, 5) as site:
        result = run_crawl(
            tmp_path, spider="crawl_pages",
            settings={**TWO, "DOWNLOAD_DELAY": 0.2, "RANDOMIZE_DOWNLOAD_DELAY": False},
            args={"site": site.url, "count": 20},
        )
        assert result.returncode == 0, result.log
        served = json.load(urllib.request.urlopen(f"{site.url}/stats", timeout=10))
    assert len(result.items) == 20
    assert len(engine_pids(result.items)) == 2
    assert result.stats["elapsed_time_seconds"] >= 19 * 0.2 * 0.95, result.stats
    assert served["peak"] == 1


def test_adaptive_concurrency_has_one_limit_per_site_for_the_crawl(tmp_path: Path) -> None:
    """A site that serves 6 at once and answers 503 past 12: the coordinator
    holds one limit for it, the engines retry what was refused."""
    settings = {**TWO, "SPEEDUP_ADAPTIVE_CONCURRENCY_ENABLED": True, "SPEEDUP_ADAPTIVE_DEBUG": True,
                "CONCURRENT_REQUESTS": 64, "CONCURRENT_REQUESTS_PER_DOMAIN": 64}
    with start_capacity_site(6, 50) as site:
        result = run_crawl(tmp_path, spider="crawl_pages", settings=settings,
                           args={"site": site.url, "count": 300})
    assert result.returncode == 0, result.log
    assert sorted(item["n"] for item in result.items) == list(range(300))
    rejected = result.stats.get("downloader/response_status_count/503", 0)
    assert rejected <= 0.05 * result.stats["downloader/response_count"], result.stats
    # The limit is set in the coordinator ("[engine" lines would be per engine).
    limits = [line for line in result.log.splitlines() if "slot 127.0.0.1: concurrency" in line]
    assert limits and not any("[engine" in line for line in limits)
    assert re.search(r"127\.0\.0\.1: limit (\d+)", result.log)
    assert int(re.search(r"127\.0\.0\.1: limit (\d+)", result.log)[1]) <= 20


def test_autothrottle_runs_for_the_crawl(tmp_path: Path) -> None:
    settings = {**TWO, "AUTOTHROTTLE_ENABLED": True, "AUTOTHROTTLE_DEBUG": True,
                "AUTOTHROTTLE_START_DELAY": 0.3, "AUTOTHROTTLE_TARGET_CONCURRENCY": 2}
    with start_capacity_site(100, 20) as site:
        result = run_crawl(tmp_path, spider="crawl_pages", settings=settings,
                           args={"site": site.url, "count": 40})
    assert result.returncode == 0, result.log
    assert len(result.items) == 40
    throttle = [line for line in result.log.splitlines() if "slot: 127.0.0.1" in line]
    assert len(throttle) >= 30, result.log  # it saw the engines' latencies
    assert not any("[engine" in line for line in throttle)


def test_sqlite_has_one_writer(demo_site: DemoSite, tmp_path: Path) -> None:
    """The SQLite pipeline runs in the coordinator: every item in the file,
    once, written by one connection."""
    db = tmp_path / "items.sqlite3"
    result = run_crawl(
        tmp_path, spider="follow",
        settings={**TWO, "ITEM_PIPELINES": {"scrapy_speedup.db.SQLitePipeline": 300},
                  "SPEEDUP_SQLITE_PATH": db},
        args={"site": demo_site.url},
    )
    assert result.returncode == 0, result.log
    with sqlite3.connect(db) as conn:
        urls = [row[0] for row in conn.execute("SELECT url FROM items")]
    assert Counter(urls) == Counter(item["url"] for item in result.items)
    assert len(engine_pids(result.items)) == 2
    assert result.stats["speedup/db/row_count"] == len(urls)
    assert "runs once for the crawl, in this process (one writer per SQLite file)" in result.log


SCRIPT = '''
import json, sys
import scrapy
from scrapy.crawler import AsyncCrawlerProcess


class ScriptSpider(scrapy.Spider):
    name = "script"

    def __init__(self, site, **kwargs):
        super().__init__(**kwargs)
        self.site = site

    async def start(self):
        for n in range(30):
            yield scrapy.Request(f"{self.site}/page/{n}", cb_kwargs={"n": n})

    def parse(self, response, n):
        import os
        yield {"n": n, "pid": os.getpid()}


if __name__ == "__main__":
    process = AsyncCrawlerProcess({
        "ADDONS": {"scrapy_speedup.Addon": 500}, "SPEEDUP_CRAWL_PROCESSES": 2,
        "FEEDS": {sys.argv[2]: {"format": "jsonlines"}}, "LOG_LEVEL": "INFO",
    })
    crawler = process.create_crawler(%s)
    process.crawl(crawler, site=sys.argv[1])
    process.start()
    print("STATS", json.dumps({k: v for k, v in crawler.stats.get_stats().items()
                               if isinstance(v, int)}))
'''


@pytest.mark.parametrize("where", ["__main__", "module"])
def test_a_crawler_process_script(tmp_path: Path, where: str) -> None:
    """CrawlerProcess in a script: a spider class defined in the script
    itself, or imported from a module."""
    if where == "module":
        (tmp_path / "script_spiders.py").write_text(SCRIPT.split("if __name__", maxsplit=1)[0])
        source = "from script_spiders import ScriptSpider\n" + \
            SCRIPT.replace("class ScriptSpider", "class _Unused")
    else:
        source = SCRIPT
    (tmp_path / "run.py").write_text(source % "ScriptSpider")
    out = tmp_path / "items.jsonl"
    with start_capacity_site(100, 5) as site:
        done = subprocess.run([sys.executable, "run.py", site.url, str(out)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr
    items = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(item["n"] for item in items) == list(range(30))
    assert len(engine_pids(items)) == 2
    stats = json.loads(done.stdout.split("STATS ", 1)[1])
    assert stats["item_scraped_count"] == 30
    assert stats["speedup/crawl/processes"] == 2


@contextmanager
def graph_site(*args: str) -> Iterator[str]:
    process = subprocess.Popen([sys.executable, "-m", "scrapy_speedup.demo.graph", *args],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        match = re.search(r"listening on (http://\S+)", process.stdout.readline())
        assert match, "the graph site did not start"
        yield match[1]
    finally:
        process.terminate()
        process.wait(10)


def crawled_paths(items: list[dict]) -> Counter:
    return Counter(urlparse(item["url"]).path for item in items)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_link_graphs_end_neither_early_nor_late(tmp_path: Path, seed: int) -> None:
    """Pages that link nowhere, pages reachable only at the end of a long
    chain: the crawl ends when, and only when, every reachable page is in."""
    shape = ("--pages", "300", "--links", "4", "--shape", "random", "--seed", str(seed))
    with graph_site(*shape, "--latency-ms", "2") as site:
        result = run_crawl(tmp_path, spider="follow", settings=TWO,
                           args={"site": site, "start_path": "/p/0"})
    assert result.returncode == 0, result.log
    assert result.stats["finish_reason"] == "finished"
    paths = crawled_paths(result.items)
    assert max(paths.values()) == 1
    assert set(paths) == expected_pages(300, 4, seed=seed, shape="random")


def test_a_site_of_duplicate_links(tmp_path: Path) -> None:
    """A site where 90% of the links are to pages already linked: the same
    pages as one process, each once, and the same count of filtered
    duplicates (partly filtered in the engines, partly in the coordinator)."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    with graph_site("--pages", "600", "--links", "10", "--dup-share", "0.9",
                    "--latency-ms", "2") as site:
        one = run_crawl(tmp_path / "one", spider="follow",
                        args={"site": site, "start_path": "/p/0"})
        two = run_crawl(tmp_path / "two", spider="follow", settings=TWO,
                        args={"site": site, "start_path": "/p/0"})
    for result in (one, two):
        assert result.returncode == 0, result.log
    assert crawled_paths(two.items) == crawled_paths(one.items)
    assert set(crawled_paths(two.items)) == expected_pages(600, 10, dup_share=0.9)
    assert two.stats["dupefilter/filtered"] == one.stats["dupefilter/filtered"] > 5000


def test_priorities_hold_for_the_crawl(tmp_path: Path) -> None:
    """Start requests with rising priorities, one download at a time: the
    crawl downloads in priority order, the same order as in one process
    (where the first request leaves before the others are queued). The order
    is the downloads' ("Crawled" lines: each is logged before the next
    download may start); items may be committed in another order, as the
    next download starts once the previous has ended, before its page is
    handled."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    orders = []
    with start_capacity_site(100, 5) as site:
        for name, settings in (("one", {}), ("two", TWO)):
            result = run_crawl(tmp_path / name, spider="crawl_pages",
                               settings={**settings, "CONCURRENT_REQUESTS": 1,
                                         "LOG_LEVEL": "DEBUG"},
                               args={"site": site.url, "count": 30, "priority": 1})
            assert result.returncode == 0, result.log
            assert sorted(item["n"] for item in result.items) == list(range(30))
            orders.append([int(n) for n in re.findall(r"Crawled \(200\) <GET \S+/page/(\d+)>",
                                                      result.log)])
    assert orders[1] == orders[0]
    assert orders[1][1:] == list(range(29, 0, -1)), orders[1]


def test_the_process_pool_in_engine_processes(tmp_path: Path) -> None:
    """run_in_process in an engine's callback runs in that engine's pool; the
    pools share the cores (one worker per core for the crawl)."""
    with start_capacity_site(100, 5) as site:
        result = run_crawl(tmp_path, spider="crawl_offload",
                           settings={**TWO, "SPEEDUP_PROCESS_INLINE_BELOW_MS": 0},
                           args={"site": site.url, "count": 40})
    assert result.returncode == 0, result.log
    assert sorted(item["n"] for item in result.items) == list(range(40))
    assert all(item["worker"] != item["pid"] for item in result.items)
    cores = len(os.sched_getaffinity(0))
    assert result.stats["speedup/process/workers"] == 2 * max(1, round(cores / 2))
    assert not result.alive_descendants()


def test_the_example_projects_near_duplicates_are_the_same(demo_site: DemoSite,
                                                          tmp_path: Path) -> None:
    """The example project, its near-duplicate pipeline crawl-wide: the same
    near-duplicate pairs as in one process."""
    project = Path(__file__).resolve().parent.parent / "example_project"
    results = []
    for name, settings in (
        ("one", []),
        ("two", ["-s", "SPEEDUP_CRAWL_PROCESSES=2",
                 "-s", 'ITEM_PIPELINES={"demo_catalogue.pipelines.MinHashPipeline": 300}',
                 "-s", 'SPEEDUP_CRAWL_PIPELINES='
                       '{"demo_catalogue.pipelines.NearDuplicatePipeline": 400}']),
    ):
        out = tmp_path / f"{name}.jsonl"
        done = subprocess.run(
            [sys.executable, "-m", "scrapy", "crawl", "catalogue", "-a", f"site={demo_site.url}",
             "-o", f"{out}:jsonlines", "-s", "LOG_LEVEL=INFO", *settings],
            cwd=project, capture_output=True, text=True, timeout=180, check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "ERROR" not in done.stderr, done.stderr[-3000:]
        results.append([json.loads(line) for line in out.read_text().splitlines()])
    one, two = results
    assert sorted(item["url"] for item in two) == sorted(item["url"] for item in one)

    def pairs(items: list[dict]) -> set[frozenset[str]]:
        return {frozenset((item["url"], item["near_duplicate_of"])) for item in items
                if item.get("near_duplicate_of")}

    assert pairs(one) and pairs(two) == pairs(one)
