"""The coordinator's frontier where it is the bottleneck: requests leased and
acknowledged per second on one core.

A real ``CrawlerProcess`` coordinator (scrapy-speedup's add-on, the ``links``
spider of example_project, ``SPEEDUP_CRAWL_PROCESSES=2``) whose engine
processes answer at once (``instant_engine.py``: the real protocol over the
real sockets, each lease released and acknowledged as soon as it arrives, with
the page's new links). The engines cost next to nothing, so the coordinator
runs flat out on its core: its leases per second over the crawl *are* its
capacity, and its own CPU time a lease says the same from the other side.

Both of the coordinator's frontiers, in the same rounds: the byte frontier
(Scrapy's default scheduling) and Scrapy's scheduler and downloader slots
(chosen here by a project's own priority queue, which changes nothing else);
each without items (the frontier alone) and with one item a page through a
feed (``-o``, jsonlines).

    .venv/bin/python benchmarks/bench_frontier_capacity.py            # 3 rounds, 30,000 pages
    .venv/bin/python benchmarks/bench_frontier_capacity.py --quick    # 1 round, 5,000 pages

Results: benchmarks/results/frontier_capacity[-quick].json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROJECT = ROOT / "example_project"
SITE = "http://graph.invalid"

CONFIGS: dict[str, dict[str, Any]] = {
    "byte frontier": {},
    "Scrapy's scheduler": {"SCHEDULER_PRIORITY_QUEUE": "instant_engine.ProjectPriorityQueue"},
}


def child(pages: int, items: bool, config: str, out: Path) -> None:
    """One crawl, in this process: the coordinator."""
    import instant_engine
    from scrapy import signals
    from scrapy.crawler import CrawlerProcess

    from demo_catalogue.spiders.links import LinksSpider
    from scrapy_speedup.crawl import engine_process

    # The coordinator starts engine_process.main: instant engines instead.
    engine_process.main = instant_engine.main  # type: ignore[assignment]
    marks: dict[str, tuple[float, float]] = {}

    def mark(name: str) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        marks[name] = (time.perf_counter(), usage.ru_utime + usage.ru_stime)

    def opened(spider: Any) -> None:
        mark("opened")

    def closed(spider: Any, reason: str) -> None:
        mark("closed")

    settings = {
        "ADDONS": {"scrapy_speedup.Addon": 500},
        "SPEEDUP_CRAWL_PROCESSES": 2,
        "CONCURRENT_REQUESTS": 256, "CONCURRENT_REQUESTS_PER_DOMAIN": 256,
        "LOG_LEVEL": "WARNING", "TELNETCONSOLE_ENABLED": False,
        **CONFIGS[config],
    }
    if items:
        settings["FEEDS"] = {str(out.with_suffix(".jsonl")): {"format": "jsonlines"}}
    process = CrawlerProcess(settings)
    crawler = process.create_crawler(LinksSpider)
    crawler.signals.connect(opened, signals.spider_opened)
    crawler.signals.connect(closed, signals.spider_closed)
    process.crawl(crawler, site=SITE, items="1" if items else "0", graph_pages=str(pages))
    process.start()
    stats = crawler.stats.get_stats()
    (t0, cpu0), (t1, cpu1) = marks["opened"], marks["closed"]
    item_lines = 0
    if items:
        with open(out.with_suffix(".jsonl"), "rb") as feed:
            item_lines = sum(1 for _ in feed)
    out.write_text(json.dumps({
        "leases": int(stats.get("speedup/crawl/lease_count", 0)),
        "pages": int(stats.get("response_received_count", 0)),
        "items": item_lines,
        "span_s": t1 - t0, "cpu_s": cpu1 - cpu0,
        "finish_reason": stats.get("finish_reason"),
    }))


def one_run(pages: int, items: bool, config: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "result.json")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), str(PROJECT)])}
        done = subprocess.run(
            [sys.executable, str(Path(__file__)), "--child", str(pages), "1" if items else "0",
             config, str(out)], env=env, capture_output=True, text=True, timeout=900,
            check=False)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"{config}: the crawl failed ({done.returncode}):"
                               f"\n{done.stderr[-4000:]}")
        result: dict[str, Any] = json.loads(out.read_text())
    problems = [line for line in done.stderr.splitlines() if "ERROR" in line or "Traceback" in line]
    result["log_problems"] = problems[:5]
    expected = pages  # every page of the graph is reachable from /p/0 (tree shape)
    result["complete"] = result["pages"] == expected and (not items or result["items"] == expected)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 5,000 pages")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--pages", type=int, default=None)
    args = parser.parse_args()
    pages = args.pages or (5000 if args.quick else 30000)
    count = args.rounds or (1 if args.quick else 3)
    runs: dict[str, list[dict[str, Any]]] = {}
    for n in range(count):
        print(f"round {n + 1}/{count}", flush=True)
        for items in (False, True):
            for config in CONFIGS:
                label = f"{config}, {'an item a page through a feed' if items else 'no items'}"
                result = one_run(pages, items, config)
                runs.setdefault(label, []).append(result)
                print(f"  {label}: {result['leases']} leases in {result['span_s']:.1f} s,"
                      f" coordinator CPU {result['cpu_s']:.1f} s", flush=True)
                if not result["complete"] or result["log_problems"]:
                    print(f"!!!!! {label}: pages {result['pages']}, items {result['items']} of"
                          f" {pages}; log: {result['log_problems']}")
    print(f"\nThe frontier's capacity ({pages} pages of the link graph, 10 links a page, 2"
          " instant engines, CONCURRENT_REQUESTS 256; medians of the rounds)")
    print(f"{'':58} {'leases/s':>10} {'CPU us/lease':>13} {'leases/s a core':>16}")
    summary = {}
    for label, results in runs.items():
        rate = statistics.median(r["leases"] / r["span_s"] for r in results)
        cost = statistics.median(r["cpu_s"] / max(1, r["leases"]) for r in results)
        summary[label] = {"leases_per_s": round(rate), "cpu_us_per_lease": round(cost * 1e6, 1),
                          "leases_per_s_per_core": round(1 / cost) if cost else None,
                          "rounds": results}
        print(f"{label:58} {rate:10,.0f} {cost * 1e6:13.1f} {1 / cost:16,.0f}")
    for cores, ms in ((16, 8.0), (64, 8.0)):
        demand = cores * 1000 / ms
        best = summary["byte frontier, no items"]["leases_per_s_per_core"]
        print(f"  {cores} engine cores at {ms:g} ms of CPU a page ask {demand:,.0f} leases/s:"
              f" {demand / best:.0%} of one coordinator core on the byte frontier")
    out = HERE / "results" / f"frontier_capacity{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps({"pages": pages, "rounds": count, "runs": summary}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4], Path(sys.argv[5]))
    else:
        main()
