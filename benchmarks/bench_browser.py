"""Benchmark: the browser router, and the browser's memory over a long crawl.

One run, side by side, real ``scrapy crawl shop`` processes of example_project
against the JavaScript shop (python -m scrapy_speedup.demo.jsshop), where one
product page in ten needs JavaScript (5% rendered by a script, 5% loading
their price with one):

a. **Pages/s**: the router (SPEEDUP_BROWSER_ROUTER_ENABLED, learning which
   kinds need the browser) against every page in the browser (``-a
   browser=all``) and against an oracle that marks exactly the pages that need
   it by hand (``-a browser=oracle``), both with scrapy-speedup's browser
   (SPEEDUP_BROWSER_ENABLED) and the router off. Targets: router >= 5x
   all-browser, >= 0.9x the oracle. Configurations run in alternating rounds;
   each ratio is the median of the per-round ratios of pages/s over the
   crawl's own span (stats' elapsed_time_seconds). Every run's items must be
   the shop's expected items, exactly (same items in each run).
   ``--page-reuse-off-too`` runs each configuration also with a new page for
   each rendering (SPEEDUP_BROWSER_PAGE_REUSE_ENABLED=False), side by side.
b. **Browser memory**: a 2,000-product all-browser crawl (2,100 pages); the
   resident memory (RSS) of the crawl's descendant processes (Playwright's
   driver and Chromium's processes), sampled every 0.5 s against the pages
   crawled so far (LOGSTATS_INTERVAL=1): at the end against after 200 pages,
   one sample each and the medians of the samples over pages 200-400 and over
   the last 200 pages (one sample moves by 100-200 MiB as Chromium starts and
   ends renderer processes).
   scrapy-speedup (contexts recycled every 100 pages, images, media and fonts
   blocked) against scrapy-playwright alone (add-on off, its defaults), same
   crawl, same run. Target: scrapy-speedup <= 1.2x.

Results go to benchmarks/results/browser.json.

    .venv/bin/python benchmarks/bench_browser.py [--rounds 2] [--products 300]
        [--memory-products 2000] [--quick] [--skip-memory] [--skip-all-browser]
        [--page-reuse-off-too] [--skip-throughput]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from sidebyside import PROJECT, ROOT, write_results

from scrapy_speedup.config import find_browser_executable
from scrapy_speedup.demo.jsshop import expected_items

_PROBLEM = re.compile(r"\bERROR\b|Traceback")
_CRAWLED = re.compile(r"Crawled (\d+) pages")


@dataclass
class Run:
    label: str
    pages: int
    items: list[dict[str, Any]] = field(repr=False)
    stats: dict[str, Any] = field(repr=False)
    wall_s: float
    #: (pages crawled, RSS of the browser processes in MiB), every 0.5 s.
    memory: list[tuple[int, float]] = field(default_factory=list, repr=False)
    problems: tuple[str, ...] = ()

    @property
    def crawl_s(self) -> float:
        return float(self.stats["elapsed_time_seconds"])

    @property
    def renderings(self) -> int:
        return int(self.stats.get("speedup/browser/rendered_count", 0))

    @property
    def pages_opened(self) -> int:
        """Browser pages opened: fewer than renderings when pages are reused."""
        return int(self.stats.get("playwright/page_count", 0))

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.crawl_s

    def summary(self) -> dict[str, Any]:
        return {"label": self.label, "pages": self.pages, "items": len(self.items),
                "crawl_s": round(self.crawl_s, 2), "pages_per_s": round(self.pages_per_s, 2),
                "wall_s": round(self.wall_s, 2),
                "browser_stats": {k: v for k, v in self.stats.items()
                                  if k.startswith(("speedup/browser/", "playwright/page_count",
                                                   "playwright/context_count"))}}


class Shop:
    def __init__(self, products: int, latency_ms: float) -> None:
        self.args = ["--products", str(products), "--latency-ms", str(latency_ms)]

    def __enter__(self) -> Shop:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "scrapy_speedup.demo.jsshop", *self.args],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.process.stdout is not None
        match = re.search(r"listening on (http://\S+)", self.process.stdout.readline())
        if not match:
            self.process.kill()
            raise RuntimeError("the shop did not start")
        self.url = match[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(10)


def _browser_rss_mb(root: psutil.Process) -> float:
    total = 0
    try:
        children = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    for child in children:
        try:
            total += child.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


def run(label: str, site: str, settings: dict[str, Any], args: dict[str, Any],
        *, timeout_s: float = 1800, memory: bool = False) -> Run:
    with tempfile.TemporaryDirectory() as tmp:
        stats_file, items_file = Path(tmp, "stats.json"), Path(tmp, "items.jsonl")
        log_path = Path(tmp, "crawl.log")
        cmd = [sys.executable, "-m", "scrapy", "crawl", "shop", "-a", f"site={site}",
               "-o", f"{items_file}:jsonlines",
               "-s", "STATS_CLASS=jsonstats.JsonStatsCollector",
               "-s", f"BENCH_STATS_FILE={stats_file}",
               "-s", f"LOG_LEVEL={'INFO' if memory else 'WARNING'}",
               "-s", "LOGSTATS_INTERVAL=1"]
        for key, value in settings.items():
            text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
            cmd += ["-s", f"{key}={text}"]
        for key, value in args.items():
            cmd += ["-a", f"{key}={value}"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), str(Path(__file__).parent), str(PROJECT)])}
        samples: list[tuple[int, float]] = []
        started = time.perf_counter()
        with open(log_path, "w") as log:
            process = subprocess.Popen(cmd, cwd=PROJECT, env=env, stderr=log, text=True)
            root = psutil.Process(process.pid)
            deadline = time.monotonic() + timeout_s
            while process.poll() is None:
                if memory:
                    counts = _CRAWLED.findall(log_path.read_text())
                    rss = _browser_rss_mb(root)
                    if counts and rss:
                        samples.append((int(counts[-1]), rss))
                if time.monotonic() > deadline:
                    process.kill()
                    raise RuntimeError(f"{label}: crawl ran past {timeout_s} s")
                # Sampled every 0.5 s; without samples, the end to end time
                # is read to 10 ms, not to the sampling's 0.5 s.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(0.5 if memory else 0.01)
        wall = time.perf_counter() - started
        err = log_path.read_text()
        if process.returncode != 0:
            raise RuntimeError(f"{label}: crawl failed ({process.returncode}):\n{err[-5000:]}")
        stats = json.loads(stats_file.read_text())
        items = [json.loads(line) for line in items_file.read_text().splitlines()]
    problems = tuple(line for line in err.splitlines() if _PROBLEM.search(line))
    # The pages of the site the crawl scheduled: the router's second fetches
    # of a page (a sample's rendering, a held page's) are not pages more.
    return Run(label, int(stats.get("scheduler/dequeued", 0)), items, stats, wall,
               samples, problems)


def check_items(run_: Run, products: int) -> None:
    expected = expected_items(products)
    got = {"/" + row["url"].split("/", 3)[3]: {"title": row["title"], "price": row["price"]}
           for row in run_.items}
    if len(run_.items) != len(got) or got != expected:
        wrong = [path for path in expected if got.get(path) != expected[path]][:5]
        raise RuntimeError(f"{run_.label}: {len(run_.items)} items, {len(got)} distinct, not"
                           f" the shop's {len(expected)}; first wrong: {wrong}")


def throughput(products: int, rounds: int, all_browser: bool = True,
               page_reuse_off: bool = False) -> dict[str, Any]:
    browser = {"SPEEDUP_BROWSER_ENABLED": True, "SPEEDUP_BROWSER_ROUTER_ENABLED": False}
    configs: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
        "all-browser": (browser, {"browser": "all"}),
        "oracle": (browser, {"browser": "oracle"}),
        "router": ({"SPEEDUP_BROWSER_ROUTER_ENABLED": True}, {}),
    }
    if page_reuse_off:  # the same crawls, a new page for each rendering
        off = {"SPEEDUP_BROWSER_PAGE_REUSE_ENABLED": False}
        configs.update({f"{label} (new pages)": ({**settings, **off}, args)
                        for label, (settings, args) in configs.items()})
    if not all_browser:  # minutes a round at 1,000 products
        configs = {k: v for k, v in configs.items() if not k.startswith("all-browser")}
    runs: dict[str, list[Run]] = {label: [] for label in configs}
    with Shop(products, latency_ms=20) as shop:
        for number in range(rounds):
            for label, (settings, args) in configs.items():
                result = run(label, shop.url, {"CONCURRENT_REQUESTS": 16, **settings}, args)
                check_items(result, products)
                runs[label].append(result)
                print(f"  round {number + 1} {label:24} {result.pages_per_s:7.2f} pages/s"
                      f" ({result.pages} pages, {result.crawl_s:.1f} s; end to end"
                      f" {result.wall_s:.1f} s; {result.renderings} renderings in"
                      f" {result.pages_opened} pages)", flush=True)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x.pages_per_s / y.pages_per_s
                                 for x, y in zip(runs[a], runs[b], strict=True))

    def medians(label: str) -> dict[str, float]:
        return {"crawl_s": round(statistics.median(r.crawl_s for r in runs[label]), 2),
                "wall_s": round(statistics.median(r.wall_s for r in runs[label]), 2),
                "renderings": statistics.median(r.renderings for r in runs[label])}

    result = {
        "products": products, "rounds": rounds,
        "medians": {label: medians(label) for label in runs},
        "page_reuse_speedup": {
            label: round(ratio(label, f"{label} (new pages)"), 2)
            for label in runs if f"{label} (new pages)" in runs},
        "router_vs_all_browser": round(ratio("router", "all-browser"), 2) if all_browser else None,
        "router_vs_oracle": round(ratio("router", "oracle"), 2),
        "runs": {label: [r.summary() for r in rs] for label, rs in runs.items()},
        "log_problems": {label: sorted({p for r in rs for p in r.problems})[:10]
                         for label, rs in runs.items()},
    }
    if all_browser:
        print(f"router vs all-browser: {result['router_vs_all_browser']}x (target >= 5);",
              end=" ")
    print(f"router vs oracle: {result['router_vs_oracle']}x (target >= 0.9)", flush=True)
    for label, speedup in result["page_reuse_speedup"].items():
        print(f"{label}: pages reused against a new page each: {speedup}x", flush=True)
    return result


def _median_between(samples: list[tuple[int, float]], low: int, high: float) -> float:
    """The median RSS of the samples taken with *low* to *high* pages crawled:
    one sample moves by 100-200 MiB as Chromium starts and ends renderer
    processes, more than the growth looked for."""
    window = [rss for crawled, rss in samples if low <= crawled < high]
    if not window:
        raise RuntimeError(f"no sample between {low} and {high} pages: {samples[-3:]}")
    return statistics.median(window)


def _at(samples: list[tuple[int, float]], pages: int) -> float:
    """The RSS of the first sample with at least *pages* pages crawled."""
    for crawled, rss in samples:
        if crawled >= pages:
            return rss
    raise RuntimeError(f"no sample at {pages} pages: {samples[-3:]}")


def memory(products: int) -> dict[str, Any]:
    executable = find_browser_executable(None)
    alone = {
        "SPEEDUP_ENABLED": False,  # the add-on stays out of the crawl
        "DOWNLOAD_HANDLERS": {
            "http": "scrapy_playwright.handler.ScrapyPlaywrightDownloadHandler",
            "https": "scrapy_playwright.handler.ScrapyPlaywrightDownloadHandler",
        },
        "PLAYWRIGHT_LAUNCH_OPTIONS": {"executable_path": executable,
                                      "args": ["--no-sandbox", "--headless=new"]},
        "CONCURRENT_REQUESTS": 4,
    }
    configs = {
        "scrapy-playwright alone": alone,
        "scrapy-speedup": {"SPEEDUP_BROWSER_ENABLED": True, "SPEEDUP_BROWSER_ROUTER_ENABLED":
                           False, "CONCURRENT_REQUESTS": 16},
    }
    out: dict[str, Any] = {"products": products}
    with Shop(products, latency_ms=5) as shop:
        for label, settings in configs.items():
            result = run(label, shop.url, settings, {"browser": "all"}, memory=True)
            check_items(result, products)
            at_200, end = _at(result.memory, 200), result.memory[-1][1]
            # The same, as medians: pages 200-400 and the last 200 pages.
            early = _median_between(result.memory, 200, 400)
            late = _median_between(result.memory, result.pages - 200, math.inf)
            out[label] = {
                "pages": result.pages, "rss_mb_after_200_pages": round(at_200, 1),
                "rss_mb_at_end": round(end, 1), "end_vs_200": round(end / at_200, 2),
                "rss_mb_median_200_to_400_pages": round(early, 1),
                "rss_mb_median_last_200_pages": round(late, 1),
                "median_end_vs_200": round(late / early, 2),
                "rss_mb_max": round(max(rss for _, rss in result.memory), 1),
                "pages_per_s": round(result.pages_per_s, 2),
                "samples": [(p, round(r, 1)) for p, r in result.memory[::4]],
                "summary": result.summary(), "log_problems": list(result.problems[:10]),
            }
            print(f"  {label:24} RSS {at_200:7.1f} MiB after 200 pages, {end:7.1f} MiB at the"
                  f" end ({result.pages} pages): {end / at_200:.2f}x; medians {early:.0f} MiB"
                  f" (pages 200-400), {late:.0f} MiB (last 200): {late / early:.2f}x;"
                  f" {result.pages_per_s:.2f} pages/s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--products", type=int, default=300)
    parser.add_argument("--memory-products", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="1 round, 100 and 300 products")
    parser.add_argument("--skip-all-browser", action="store_true",
                        help="router and oracle only in part a")
    parser.add_argument("--page-reuse-off-too", action="store_true",
                        help="each configuration of part a also with a new page for each"
                             " rendering (SPEEDUP_BROWSER_PAGE_REUSE_ENABLED=False)")
    parser.add_argument("--skip-throughput", action="store_true", help="part b only")
    parser.add_argument("--skip-memory", action="store_true",
                        help="part a only (results in browser-throughput-<products>.json)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.products, args.memory_products = 1, 100, 300
    results: dict[str, Any] = {}
    if not args.skip_throughput:
        print(f"a. pages/s, {args.products} products, {args.rounds} rounds", flush=True)
        results["throughput"] = throughput(args.products, args.rounds,
                                           not args.skip_all_browser, args.page_reuse_off_too)
    if args.skip_memory:
        write_results(f"browser-throughput-{args.products}", results)
        return
    print(f"b. browser memory, all-browser crawl of {args.memory_products} products", flush=True)
    results["memory"] = memory(args.memory_products)
    write_results("browser" if "throughput" in results else "browser-memory", results)


if __name__ == "__main__":
    main()
