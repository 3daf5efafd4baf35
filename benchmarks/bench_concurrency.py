"""Benchmark: adaptive concurrency against a sweep of fixed settings.

Servers (python -m scrapy_speedup.demo.capacity, 50 ms per page):
* capacity 6 (6 served at once, 6 queued, 503 beyond): fixed concurrency
  2, 4, 8, 16, 32 and 64 against adaptive (ceiling 64);
* capacity 12, halving after 3 s: fixed 8 and 32 against adaptive;
* no limit: fixed 64 against adaptive (ceiling 64).

Targets: adaptive >= 0.9x the best fixed setting's pages/s, <= 1% of
responses 503, no page lost; >= 0.95x the fixed ceiling without a limit.
Pages/s is pages scraped (a 503 is not a page) over the crawl's time (crawler
built to spider closed). Results go to benchmarks/results/concurrency.json.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

from sidebyside import CrawlRun, run_crawl, write_results

ADAPTIVE = {"SPEEDUP_ADAPTIVE_CONCURRENCY_ENABLED": True, "CONCURRENT_REQUESTS": 64,
            "CONCURRENT_REQUESTS_PER_DOMAIN": 64}


class CapacitySite:
    def __init__(self, capacity: int, halve_after_s: float | None = None) -> None:
        self.args = ["--capacity", str(capacity), "--latency-ms", "50"]
        if halve_after_s is not None:
            self.args += ["--halve-after-s", str(halve_after_s)]

    def __enter__(self) -> CapacitySite:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "scrapy_speedup.demo.capacity", *self.args],
            stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        match = re.search(r"listening on (\S+)", self.process.stdout.readline())
        assert match, "the capacity site did not start"
        self.url = match[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(10)


def fixed(n: int) -> dict:
    return {"CONCURRENT_REQUESTS": n, "CONCURRENT_REQUESTS_PER_DOMAIN": n}


def crawl(label: str, site: CapacitySite, settings: dict, pages: int) -> dict:
    run: CrawlRun = run_crawl(label, site.url, {"ADDONS": {"scrapy_speedup.Addon": 500},
                                                **settings},
                              {"count": pages}, spider="pages")
    responses = int(run.stats.get("downloader/response_count", 0))
    rejected = int(run.stats.get("downloader/response_status_count/503", 0))
    # Pages scraped per second: a 503 is not a page.
    row = {"label": label, "pages_per_s": round(run.items / run.crawl_s, 1),
           "pages": run.items, "lost": pages - run.items,
           "rejected_share": round(rejected / responses, 4) if responses else 0.0,
           "concurrency_max": run.stats.get("speedup/adaptive/127.0.0.1/concurrency_max")}
    print(f"  {label:22} {row['pages_per_s']:7.1f} pages/s  503: {row['rejected_share']:6.1%}"
          f"  lost: {row['lost']:4d}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=1000)
    args = parser.parse_args()
    results: dict = {"pages": args.pages}
    print("capacity 6:")
    with CapacitySite(6) as site:
        rows = [crawl(f"fixed {n}", site, {**fixed(n), "SPEEDUP_ENABLED": False}, args.pages)
                for n in (2, 4, 8, 16, 32, 64)]
        adaptive = crawl("adaptive (ceiling 64)", site, ADAPTIVE, args.pages)
    best = max((r for r in rows if r["lost"] == 0), key=lambda r: r["pages_per_s"])
    ratio = round(adaptive["pages_per_s"] / best["pages_per_s"], 3)
    results["capacity_6"] = {"fixed": rows, "adaptive": adaptive, "best_fixed": best["label"],
                             "ratio_to_best": ratio}
    print(f"  adaptive / best fixed without loss ({best['label']}):"
          f" {results['capacity_6']['ratio_to_best']:.2f}x")
    print("capacity 12, halving after 3 s:")
    rows = []
    for label, settings in (("fixed 8", {**fixed(8), "SPEEDUP_ENABLED": False}),
                            ("fixed 32", {**fixed(32), "SPEEDUP_ENABLED": False}),
                            ("adaptive (ceiling 64)", ADAPTIVE)):
        with CapacitySite(12, halve_after_s=3) as site:
            rows.append(crawl(label, site, settings, args.pages))
    results["halving"] = rows
    print("no limit:")
    with CapacitySite(100_000) as site:
        ceiling = crawl("fixed 64", site, {**fixed(64), "SPEEDUP_ENABLED": False}, args.pages)
        adaptive = crawl("adaptive (ceiling 64)", site, ADAPTIVE, args.pages)
    results["unlimited"] = {"fixed_64": ceiling, "adaptive": adaptive,
                            "ratio": round(adaptive["pages_per_s"] / ceiling["pages_per_s"], 3)}
    print(f"  adaptive / fixed 64: {results['unlimited']['ratio']:.2f}x")
    write_results("concurrency", results)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
