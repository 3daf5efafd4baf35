"""Benchmark: CPU-heavy work in the process pool against vanilla Scrapy.

One run, side by side, on the local demo site (20 ms per response):

1. **Heavy pipeline**: ~10 ms of pure-Python MinHash per item, run inline by
   vanilla Scrapy and in worker processes by scrapy-speedup
   (SPEEDUP_PROCESS_PIPELINES). Target on 2 cores: >= 1.8x, identical items.
2. **Small work**: ~0.1 ms per item through run_in_process(), against the same
   call inline (no add-on). Target: at most 5% slower. Also shown: forcing
   every call into the pool (SPEEDUP_PROCESS_INLINE_BELOW_MS=0), to show what
   the inline rule saves.

Runs alternate and each configuration's median run is reported (the machine
is shared and noisy). Results go to benchmarks/results/process.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from sidebyside import DemoSite, compare_items, median_run, print_table, run_crawl

RESULTS = Path(__file__).parent / "results"


def heavy(site: str, repeat: int) -> dict:
    runs: dict[str, list] = {"vanilla": [], "speedup": []}
    for i in range(repeat):
        print(f"  heavy pipeline, round {i + 1}/{repeat}", flush=True)
        runs["vanilla"].append(run_crawl("vanilla Scrapy", site, {"ADDONS": {}}))
        runs["speedup"].append(run_crawl("scrapy-speedup", site))
    vanilla, speedup = median_run(runs["vanilla"]), median_run(runs["speedup"])
    cores = os.cpu_count() or 1
    cpu_per_page = vanilla.cpu_s / vanilla.pages
    limit = cores / cpu_per_page
    print("\nHeavy pipeline (MinHash, ~10 ms per item)")
    print_table([vanilla, speedup], vanilla)
    same = compare_items(vanilla, speedup, ignore=("near_duplicate_of",))
    ratio = speedup.pages_per_s / vanilla.pages_per_s
    print(f"theoretical limit: {cores} cores / {cpu_per_page * 1000:.1f} ms CPU per page ="
          f" {limit:.0f} pages/s ({limit / vanilla.pages_per_s:.2f}x vanilla);"
          f" items identical: {same}")
    return {"vanilla": vanilla.summary(), "speedup": speedup.summary(), "ratio": round(ratio, 3),
            "limit_pages_per_s": round(limit, 1),
            "limit_ratio": round(limit / vanilla.pages_per_s, 3),
            "items_identical": same, "all_ratios": [
                round(s.pages_per_s / v.pages_per_s, 3)
                for v, s in zip(runs["vanilla"], runs["speedup"], strict=True)]}


def small(site: str, repeat: int) -> dict:
    light = {"ITEM_PIPELINES": {}, "SPEEDUP_PROCESS_PIPELINES": []}
    configs = {
        "inline (no add-on)": {**light, "ADDONS": {}},
        "run_in_process (default)": light,
        "run_in_process, always offload": {**light, "SPEEDUP_PROCESS_INLINE_BELOW_MS": 0},
    }
    runs: dict[str, list] = {label: [] for label in configs}
    for i in range(repeat):
        print(f"  small work, round {i + 1}/{repeat}", flush=True)
        for label, settings in configs.items():
            runs[label].append(run_crawl(label, site, settings, {"top_words": 1}))
    medians = [median_run(r) for r in runs.values()]
    inline, default, forced = medians
    print("\nSmall work (~0.1 ms per item through run_in_process)")
    print_table(medians, inline)
    cost = 1 - default.pages_per_s / inline.pages_per_s
    print(f"cost of offloading against inline: {cost:+.1%} (target: at most 5%);"
          f" items identical: {compare_items(inline, default)}")
    return {"runs": [m.summary() for m in medians], "cost_vs_inline": round(cost, 4),
            "items_identical": compare_items(inline, default)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=20)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; odd, for a median")
    args = parser.parse_args()
    results: dict = {"products": args.products, "latency_ms": args.latency_ms,
                     "cores": os.cpu_count(), "repeat": args.repeat}
    with DemoSite(args.products, args.latency_ms) as site:
        results["heavy"] = heavy(site.url, args.repeat)
        results["small"] = small(site.url, args.repeat)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "process.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
