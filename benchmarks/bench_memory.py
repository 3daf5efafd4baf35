"""Benchmark: memory of a long crawl whose pipeline runs in the process pool.

The demo crawl (MinHash pipeline, ~10 ms of CPU per item, offloaded with
SPEEDUP_PROCESS_PIPELINES) over a large catalogue with fast pages (5 ms), so
that the pool, not the site, is the bottleneck: the case where a crawl can run
ahead of its pipeline and hold pages in memory. Vanilla Scrapy (the pipeline
inline) and scrapy-speedup crawl the same catalogue, in rounds, side by side.

Reported per configuration and round: the peak resident memory (RSS) of the
crawl's own process, sampled every 0.1 s, and the peak proportional memory
(PSS) of its whole process tree, fork server and workers included, every
0.5 s; the most pages Scrapy's scraper held at once
(bench/scraper_active_max); and the speed. The crawl's memory target: at most
1.25x vanilla's at the same items, with no loss of speed. Results go to
benchmarks/results/memory-<products>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics

from bench_process import run_rounds
from sidebyside import DemoSite, median_run, print_table, round_ratios, write_results

EXTENSIONS = {"ahead.PagesAhead": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, default=10_000)
    parser.add_argument("--latency-ms", type=float, default=5)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; odd, for a median")
    args = parser.parse_args()
    configs = {
        "vanilla Scrapy": ({"ADDONS": {}, "EXTENSIONS": EXTENSIONS}, {}),
        "scrapy-speedup": ({"EXTENSIONS": EXTENSIONS}, {}),
    }
    with DemoSite(args.products, args.latency_ms) as site:
        runs = run_rounds(site.url, configs, args.repeat, "memory")
    vanilla_runs, speedup_runs = runs["vanilla Scrapy"], runs["scrapy-speedup"]
    print(f"\nMemory, {args.products} products, {args.latency_ms:g} ms pages")
    print_table([vanilla_runs, speedup_runs], list(runs))
    rows = {}
    for label, config_runs in runs.items():
        rows[label] = {
            "items": [r.items for r in config_runs],
            "rss_max_mb": [round(r.rss_max_mb, 1) for r in config_runs],
            "tree_pss_max_mb": [round(r.tree_pss_max_mb, 1) for r in config_runs],
            "scraper_active_max": [r.stats.get("bench/scraper_active_max", 0)
                                   for r in config_runs],
            "median": median_run(config_runs).summary(),
        }
        print(f"{label:16} items {rows[label]['items']}  crawl process peak RSS"
              f" {rows[label]['rss_max_mb']} MiB  tree (PSS) {rows[label]['tree_pss_max_mb']} MiB"
              f"  pages held at most {rows[label]['scraper_active_max']}")
    rss_ratios = [s.rss_max_mb / v.rss_max_mb
                  for s, v in zip(speedup_runs, vanilla_runs, strict=True)]
    tree_ratios = [s.tree_pss_max_mb / v.rss_max_mb
                   for s, v in zip(speedup_runs, vanilla_runs, strict=True)]
    speed = round_ratios(speedup_runs, vanilla_runs)
    result = {
        "products": args.products, "latency_ms": args.latency_ms, "cores": os.cpu_count(),
        "repeat": args.repeat, "runs": rows,
        "crawl_rss_ratio": round(statistics.median(rss_ratios), 3),
        "crawl_rss_ratio_rounds": [round(x, 3) for x in rss_ratios],
        "tree_pss_vs_vanilla_ratio": round(statistics.median(tree_ratios), 3),
        "speed_ratios": speed,
    }
    print(f"crawl process peak RSS, speedup / vanilla: {result['crawl_rss_ratio']}x"
          f" (rounds {result['crawl_rss_ratio_rounds']}; target <= 1.25x);"
          f" whole tree (workers included) / vanilla: {result['tree_pss_vs_vanilla_ratio']}x;"
          f" speed: crawl {speed['crawl']}x, end to end {speed['end_to_end']}x")
    write_results(f"memory-{args.products}", result)


if __name__ == "__main__":
    main()
