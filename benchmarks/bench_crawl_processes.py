"""Benchmark: engine processes (SPEEDUP_CRAWL_PROCESSES) against vanilla Scrapy.

One run, side by side, real ``scrapy crawl`` processes of example_project:

a. **Plain I/O crawl**: the link-graph site (python -m scrapy_speedup.demo.graph,
   2,000 pages, 10 links a page, 20 ms latency), 64 concurrent requests:
   vanilla Scrapy, scrapy-speedup with SPEEDUP_CRAWL_PROCESSES=1 (which is
   scrapy-speedup as it was: part d) and =2. Target: 2 processes >= 1.7x.
b. **CPU in the callback**: the same crawl, each callback burning ~10 ms of
   CPU: vanilla against 2 engine processes. Target: >= 1.8x.
c. **CPU-heavy pipeline**: the demo catalogue crawl (MinHash, ~10 ms per item):
   vanilla; the process pool; 2 engine processes running the pipeline inline;
   both. With engine processes the near-duplicate pipeline (crawl-wide state)
   runs once, in the coordinator (SPEEDUP_CRAWL_PIPELINES).
e. **The frontier's capacity**: a crawl whose engines answer at once (a
   download handler without network); the coordinator process's own CPU time
   per request leased and acknowledged gives requests/s per coordinator core.

Configurations run in alternating rounds; each ratio is the median of the
per-round ratios, over the crawl's own span (the stats' elapsed_time_seconds,
start to finish of the crawl) and end to end (the process's wall time). The
machine's own 2-process scaling (benchmarks/machine_scaling.py) is measured
before each part and printed beside the ratios: it bounds them. Every run's
items are checked against the others (and, on the graph site, against the
pages reachable from /p/0); the logs of every run are searched for ERROR
and Traceback lines. Results go to benchmarks/results/crawl_processes.json.

    .venv/bin/python benchmarks/bench_crawl_processes.py [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from jsonstats import JsonStatsCollector
from machine_scaling import texts, work
from sidebyside import PROJECT, ROOT, CrawlRun, DemoSite, _tree_cpu, write_results

from scrapy_speedup.demo.graph import expected_pages

_ENGINE_INDEX_SETTING = "_SPEEDUP_ENGINE_INDEX"
_PROBLEM = re.compile(r"\bERROR\b|Traceback")


class CrawlStatsCollector(JsonStatsCollector):
    """The JSON stats of the crawl: written by the coordinator only, not by
    each engine process (they have the same settings, hence the same file)."""

    def _persist_stats(self, stats: dict[str, Any]) -> None:
        if self._crawler.settings.get(_ENGINE_INDEX_SETTING) is None:
            super()._persist_stats(stats)


@dataclass
class Run(CrawlRun):
    #: CPU time of the process the user started (the coordinator) alone.
    top_cpu_s: float = 0.0
    log_problems: tuple[str, ...] = ()

    @property
    def crawl_s(self) -> float:
        """The crawl's own span: from the stats' start_time to finish_time."""
        return float(self.stats["elapsed_time_seconds"])

    @property
    def urls(self) -> set[str]:
        return {row["url"] for row in self.item_rows}


def run(label: str, site: str, settings: dict[str, Any], args: dict[str, Any] | None = None,
        *, spider: str, timeout_s: float = 600) -> Run:
    """A ``scrapy crawl`` of example_project, as benchmarks/sidebyside.py's
    run_crawl, also measuring the top process's own CPU and keeping the
    log's ERROR and Traceback lines."""
    with tempfile.TemporaryDirectory() as tmp:
        stats_file, items_file = Path(tmp, "stats.json"), Path(tmp, "items.jsonl")
        cmd = [sys.executable, "-m", "scrapy", "crawl", spider, "-a", f"site={site}",
               "-o", f"{items_file}:jsonlines",
               "-s", "STATS_CLASS=bench_crawl_processes.CrawlStatsCollector",
               "-s", f"BENCH_STATS_FILE={stats_file}", "-s", "LOG_LEVEL=WARNING"]
        for key, value in settings.items():
            text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
            cmd += ["-s", f"{key}={text}"]
        for key, value in (args or {}).items():
            cmd += ["-a", f"{key}={value}"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), str(Path(__file__).parent), str(PROJECT)])}
        cpu: dict[int, float] = {}
        started = time.perf_counter()
        log_path = Path(tmp, "crawl.log")
        with open(log_path, "w") as log:
            process = subprocess.Popen(cmd, cwd=PROJECT, env=env, stderr=log, text=True)
            root = psutil.Process(process.pid)
            deadline = time.monotonic() + timeout_s
            samples = 0
            while process.poll() is None:
                samples += 1
                _tree_cpu(root, cpu, tree_memory=False)
                if time.monotonic() > deadline:
                    process.kill()
                    raise RuntimeError(f"{label}: crawl ran past {timeout_s} s")
                time.sleep(0.1)
        wall = time.perf_counter() - started
        err = log_path.read_text()
        if process.returncode != 0:
            raise RuntimeError(f"{label}: crawl failed ({process.returncode}):\n{err[-5000:]}")
        stats = json.loads(stats_file.read_text())
        rows = [json.loads(line) for line in items_file.read_text().splitlines()]
    # The doctor's report is WARNING; anything at ERROR, or a traceback, is a bug.
    problems = tuple(line for line in err.splitlines() if _PROBLEM.search(line))
    return Run(label, int(stats.get("response_received_count", 0)),
               int(stats.get("item_scraped_count", 0)), wall, sum(cpu.values()), stats, rows,
               top_cpu_s=cpu.get(root.pid, 0.0), log_problems=problems)


class GraphSite(DemoSite):
    """``python -m scrapy_speedup.demo.graph`` in a subprocess, for a ``with`` block."""

    def __init__(self, pages: int, links: int, latency_ms: float) -> None:
        self.pages, self.links, self.latency_ms = pages, links, latency_ms

    def __enter__(self) -> GraphSite:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "scrapy_speedup.demo.graph", "--pages", str(self.pages),
             "--links", str(self.links), "--latency-ms", str(self.latency_ms)],
            stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        match = re.search(r"listening on (\S+)", self.process.stdout.readline())
        assert match, "the graph site did not start"
        self.url = match[1]
        return self

    def expected_urls(self) -> set[str]:
        return {self.url + path for path in expected_pages(self.pages, self.links)}


def machine_scaling() -> float:
    """benchmarks/machine_scaling.py's measure, returned: how much faster 2
    processes do the demo's CPU work than one, right now."""
    sample = texts(100)
    started = time.perf_counter()
    work(sample)
    one = time.perf_counter() - started
    with ProcessPoolExecutor(2) as pool:
        pool.submit(work, sample[:1]).result()
        started = time.perf_counter()
        list(pool.map(work, [sample[0::2], sample[1::2]]))
        two = time.perf_counter() - started
    return one / two


def rounds(configs: dict[str, tuple[dict[str, Any], dict[str, Any]]], count: int, title: str,
           site: str, spider: str) -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = {label: [] for label in configs}
    labels = list(configs)
    for i in range(count):
        print(f"  {title}, round {i + 1}/{count}", flush=True)
        # A different order each round, so that no configuration always runs first.
        for label in labels[i % len(labels):] + labels[:i % len(labels)]:
            settings, args = configs[label]
            runs[label].append(run(label, site, settings, args, spider=spider))
    return runs


def ratios(runs: list[Run], base: list[Run]) -> dict[str, Any]:
    pairs = list(zip(runs, base, strict=True))
    crawl = [r.crawl_pages_per_s / b.crawl_pages_per_s for r, b in pairs]
    end = [r.pages_per_s / b.pages_per_s for r, b in pairs]
    return {"crawl": round(statistics.median(crawl), 3),
            "end_to_end": round(statistics.median(end), 3),
            "crawl_rounds": [round(x, 3) for x in crawl],
            "end_to_end_rounds": [round(x, 3) for x in end]}


def median(runs: list[Run]) -> Run:
    middle = statistics.median_low([r.crawl_pages_per_s for r in runs])
    return next(r for r in runs if r.crawl_pages_per_s == middle)


def table(runs: dict[str, list[Run]], scaling: float) -> dict[str, Any]:
    """Print one line per configuration (its median run, ratios to the first)."""
    base = next(iter(runs.values()))
    print(f"{'':44} {'pages':>5} {'crawl span':>17} {'end to end':>17} {'CPU':>6}")
    print(f"{'':44} {'':>5} {'pages/s':>9} {'ratio':>7} {'pages/s':>9} {'ratio':>7}"
          f" {'cores':>6}")
    out = {}
    for label, config_runs in runs.items():
        m, r = median(config_runs), ratios(config_runs, base)
        print(f"{label:44} {m.pages:5d} {m.crawl_pages_per_s:9.1f} {r['crawl']:6.2f}x"
              f" {m.pages_per_s:9.1f} {r['end_to_end']:6.2f}x {m.cores_busy:6.2f}")
        out[label] = {**m.summary(), "ratios": r,
                      "cpu_ms_per_page": round(m.cpu_s / max(1, m.pages) * 1000, 2)}
    for label in list(runs)[1:]:
        r = out[label]["ratios"]
        print(f"  {label}: ratio per round, crawl {r['crawl_rounds']},"
              f" end to end {r['end_to_end_rounds']}")
    print(f"  the machine's 2-process scaling, measured before this part: {scaling:.2f}x")
    return out


def check_items(runs: dict[str, list[Run]], expected: set[str] | None = None,
                ignore: tuple[str, ...] = ()) -> bool:
    """Whether every run has the same items (by URL, fields but *ignore*),
    each once; prints a loud line for each that does not."""
    def key(r: Run) -> dict[str, Any]:
        return {row["url"]: {k: v for k, v in row.items() if k not in ignore}
                for row in r.item_rows}

    every = [r for config_runs in runs.values() for r in config_runs]
    reference = key(every[0])
    same = True
    for r in every:
        problems = []
        if len(r.item_rows) != len(r.urls):
            problems.append(f"{len(r.item_rows) - len(r.urls)} items twice")
        if expected is not None and r.urls != expected:
            problems.append(f"{len(expected - r.urls)} pages missing,"
                            f" {len(r.urls - expected)} not of the site")
        if key(r) != reference:
            differ = sum(1 for u in reference if key(r).get(u) != reference[u])
            problems.append(f"{differ} items differ from {every[0].label}'s")
        if problems:
            same = False
            print(f"!!!!! ITEMS MISMATCH in {r.label}: {'; '.join(problems)} !!!!!")
    return same


def report_log_problems(runs: dict[str, list[Run]]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for label, config_runs in runs.items():
        for i, r in enumerate(config_runs):
            if r.log_problems:
                found[f"{label}, round {i + 1}"] = list(r.log_problems)
                print(f"!!!!! {label}, round {i + 1}: {len(r.log_problems)} ERROR/Traceback"
                      " lines in the log; the first:")
                for line in r.log_problems[:10]:
                    print(f"    {line}")
    return found


GRAPH = {"CONCURRENT_REQUESTS": 64, "CONCURRENT_REQUESTS_PER_DOMAIN": 64}
VANILLA = {"ADDONS": {}}


def plain_io(site: GraphSite, count: int) -> dict[str, Any]:
    scaling = machine_scaling()
    configs = {
        "vanilla Scrapy": ({**GRAPH, **VANILLA}, {}),
        "scrapy-speedup, SPEEDUP_CRAWL_PROCESSES=1": ({**GRAPH, "SPEEDUP_CRAWL_PROCESSES": 1}, {}),
        "scrapy-speedup, SPEEDUP_CRAWL_PROCESSES=2": ({**GRAPH, "SPEEDUP_CRAWL_PROCESSES": 2}, {}),
    }
    runs = rounds(configs, count, "plain I/O crawl", site.url, "links")
    print(f"\na. Plain I/O crawl ({site.pages} pages, {site.links} links a page,"
          f" {site.latency_ms:g} ms latency, 64 concurrent); d. PROCESSES=1 against vanilla")
    out = table(runs, scaling)
    same = check_items(runs, site.expected_urls())
    print(f"  items identical, and the site's reachable pages: {same}")
    return {"scaling": round(scaling, 3), "configs": out, "items_identical": same,
            "log_problems": report_log_problems(runs), "runs": runs}


def cpu_callback(site: GraphSite, count: int) -> dict[str, Any]:
    scaling = machine_scaling()
    cpu = {"cpu_ms": 10}
    configs = {
        "vanilla Scrapy": ({**GRAPH, **VANILLA}, cpu),
        "scrapy-speedup, SPEEDUP_CRAWL_PROCESSES=2": ({**GRAPH, "SPEEDUP_CRAWL_PROCESSES": 2}, cpu),
    }
    runs = rounds(configs, count, "CPU in the callback", site.url, "links")
    print("\nb. CPU in the callback (~10 ms per page)")
    out = table(runs, scaling)
    same = check_items(runs, site.expected_urls())
    print(f"  items identical, and the site's reachable pages: {same}")
    return {"scaling": round(scaling, 3), "configs": out, "items_identical": same,
            "log_problems": report_log_problems(runs)}


def cpu_pipeline(site: DemoSite, count: int) -> dict[str, Any]:
    scaling = machine_scaling()
    minhash = "demo_catalogue.pipelines.MinHashPipeline"
    near = "demo_catalogue.pipelines.NearDuplicatePipeline"
    # The near-duplicate pipeline keeps crawl-wide state: with engine
    # processes it runs once, in the coordinator, after the engines' MinHash.
    engines = {"SPEEDUP_CRAWL_PROCESSES": 2, "ITEM_PIPELINES": {minhash: 300},
               "SPEEDUP_CRAWL_PIPELINES": {near: 400}}
    configs = {
        "vanilla Scrapy": (VANILLA, {}),
        "process pool (SPEEDUP_PROCESS_PIPELINES)": ({}, {}),
        "2 engine processes, pipeline inline": ({**engines, "SPEEDUP_PROCESS_PIPELINES": []}, {}),
        "2 engine processes + process pool": (engines, {}),
    }
    runs = rounds(configs, count, "CPU-heavy pipeline", site.url, "catalogue")
    print("\nc. CPU-heavy pipeline (demo catalogue, MinHash ~10 ms per item)")
    out = table(runs, scaling)
    # Which item is marked a near duplicate of which depends on the order
    # items arrive; the set of marked items should not, much.
    same = check_items(runs, ignore=("near_duplicate_of",))
    marked = {label: [sum(1 for row in r.item_rows if row.get("near_duplicate_of"))
                      for r in config_runs] for label, config_runs in runs.items()}
    print(f"  items identical (near_duplicate_of aside): {same}")
    print(f"  items marked near duplicates, per round: {marked}")
    return {"scaling": round(scaling, 3), "configs": out, "items_identical": same,
            "near_duplicates": marked, "log_problems": report_log_problems(runs)}


def frontier_capacity(pages: int, engine_ms_per_page: float | None) -> dict[str, Any]:
    settings = {**GRAPH, "SPEEDUP_CRAWL_PROCESSES": 2, "GRAPH_PAGES": pages,
                "GRAPH_LINKS": 10, "CONCURRENT_REQUESTS": 256,
                "CONCURRENT_REQUESTS_PER_DOMAIN": 256,
                "DOWNLOAD_HANDLERS": {"http": "demo_catalogue.spiders.links.InstantGraphHandler"}}
    print("  frontier capacity", flush=True)
    # The coordinator's fixed cost (start-up, engines' start, close) is
    # measured on a crawl of one page and taken off.
    fixed = run("instant engines, 1 page", "http://graph.invalid",
                {**settings, "GRAPH_PAGES": 1}, spider="links").top_cpu_s
    # Without items: the frontier alone (leases, acknowledgements, the
    # requests the engines send); with them, each item also goes through the
    # crawl's feed (-o) in the coordinator.
    bare = run("instant engines, no items", "http://graph.invalid", settings,
               {"items": 0}, spider="links")
    bare_leases = int(bare.stats.get("speedup/crawl/lease_count", 0))
    bare_cost = max(0.0, bare.top_cpu_s - fixed) / max(1, bare_leases)
    r = run("instant engines, SPEEDUP_CRAWL_PROCESSES=2", "http://graph.invalid", settings,
            spider="links")
    leases = int(r.stats.get("speedup/crawl/lease_count", 0))
    cost = max(0.0, r.top_cpu_s - fixed) / max(1, leases)
    per_core = 1 / cost if cost else float("inf")
    print(f"\ne. The frontier alone (no items): {bare_leases} leases, coordinator CPU"
          f" {bare.top_cpu_s:.2f} s less {fixed:.2f} s fixed = {bare_cost * 1e6:.0f} us per"
          f" lease: {1 / bare_cost if bare_cost else float('inf'):,.0f} leases/s on one core")
    engine_ms = (r.cpu_s - r.top_cpu_s) / max(1, r.pages) * 1000
    print(f"e. With an item a page through the feed ({pages} pages, engines that answer"
          " at once)")
    print(f"  {r.pages} pages, {leases} leases in {r.crawl_s:.1f} s ({r.crawl_pages_per_s:.0f}"
          f" pages/s); coordinator CPU {r.top_cpu_s:.2f} s less the fixed cost ="
          f" {cost * 1e6:.0f} us per lease:"
          f" {per_core:,.0f} leases/s on one coordinator core")
    print(f"  engines' CPU here: {engine_ms:.2f} ms per page (no network)")
    bounds = {}
    for label, ms in [("instant engines", engine_ms),
                      ("the plain I/O crawl's engines", engine_ms_per_page)]:
        if not ms:
            continue
        # C engine cores make C / (ms per page) requests/s; the coordinator
        # keeps up while that is below its own capacity.
        saturate_cores = per_core * ms / 1000
        bounds[label] = {"engine_ms_per_page": round(ms, 2),
                         "saturates_at_cores": round(saturate_cores, 1)}
        for cores in (16, 64):
            demand = cores / (ms / 1000)
            print(f"  with {label} ({ms:.2f} ms CPU a page): {cores} cores would ask"
                  f" {demand:,.0f} requests/s = {demand / per_core:.0%} of one coordinator core")
        print(f"    -> the coordinator saturates at about {saturate_cores:.0f} engine cores")
    problems = list(r.log_problems)
    for line in problems[:10]:
        print(f"!!!!! log: {line}")
    same = r.urls == {f"http://graph.invalid{p}" for p in expected_pages(pages, 10)} \
        and len(r.item_rows) == len(r.urls)
    if not same:
        print(f"!!!!! ITEMS MISMATCH in the capacity crawl: {len(r.urls)} distinct pages of"
              f" {pages}, {len(r.item_rows)} items")
    return {"fixed_cpu_s": round(fixed, 3), "bare_leases": bare_leases,
            "bare_us_per_lease": round(bare_cost * 1e6, 1),
            "bare_leases_per_s_per_core": round(1 / bare_cost) if bare_cost else None,
            "pages": r.pages, "leases": leases, "crawl_s": round(r.crawl_s, 3),
            "coordinator_cpu_s": round(r.top_cpu_s, 3),
            "coordinator_us_per_lease": round(cost * 1e6, 1),
            "leases_per_s_per_core": round(per_core), "tree_cpu_s": round(r.cpu_s, 2),
            "bounds": bounds, "items_complete": same, "log_problems": problems,
            "speedup_stats": {k: v for k, v in r.stats.items() if k.startswith("speedup/")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds; odd, for a median")
    parser.add_argument("--quick", action="store_true",
                        help="one round, smaller crawls: a check that it all runs")
    parser.add_argument("--parts", default="abce", help="which parts to run")
    args = parser.parse_args()
    count = 1 if args.quick else args.rounds
    pages, products, instant = (500, 500, 5000) if args.quick else (2000, 2000, 30000)
    results: dict[str, Any] = {"cores": os.cpu_count(), "rounds": count, "quick": args.quick}
    engine_ms = None
    started = time.monotonic()
    with GraphSite(pages, 10, 20) as site:
        if "a" in args.parts:
            a = plain_io(site, count)
            engine_runs = a.pop("runs")["scrapy-speedup, SPEEDUP_CRAWL_PROCESSES=2"]
            m = median(engine_runs)
            # The engines' CPU a page: the process tree's less the coordinator's.
            engine_ms = (m.cpu_s - m.top_cpu_s) / max(1, m.pages) * 1000
            results["plain_io"] = a
        if "b" in args.parts:
            results["cpu_callback"] = cpu_callback(site, count)
    if "c" in args.parts:
        with DemoSite(products, 20) as demo:
            results["cpu_pipeline"] = cpu_pipeline(demo, count)
    if "e" in args.parts:
        results["frontier"] = frontier_capacity(instant, engine_ms)
    print(f"\n{time.monotonic() - started:.0f} s in all; machine's 2-process scaling now:"
          f" {machine_scaling():.2f}x")
    write_results("crawl_processes" + ("-quick" if args.quick else ""), results)


if __name__ == "__main__":
    main()
