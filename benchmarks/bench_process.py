"""Benchmark: CPU-heavy work in the process pool against vanilla Scrapy.

One run, side by side, on the local demo site (20 ms per response):

1. **Heavy pipeline**: ~10 ms of pure-Python MinHash per item, run inline by
   vanilla Scrapy and in worker processes by scrapy-speedup
   (SPEEDUP_PROCESS_PIPELINES). Target on 2 cores: >= 1.8x, identical items.
2. **Small work**: ~0.1 ms per item through run_in_process(), against the same
   call inline (no add-on). Target: at most 5% slower. Also shown: forcing
   every call into the pool (SPEEDUP_PROCESS_INLINE_BELOW_MS=0), to show what
   the inline rule saves.

Configurations run back to back in rounds; each ratio is the median of the
per-round ratios (the machine is shared and noisy), given end to end (whole
process) and for the crawl (crawler built to spider closed). Results go to
benchmarks/results/process.json.
"""

from __future__ import annotations

import argparse
import os

from sidebyside import (
    DemoSite,
    compare_items,
    median_run,
    print_table,
    round_ratios,
    run_crawl,
    write_results,
)


def run_rounds(site: str, configs: dict[str, tuple[dict, dict]], repeat: int,
               title: str) -> dict[str, list]:
    runs: dict[str, list] = {label: [] for label in configs}
    labels = list(configs)
    for i in range(repeat):
        print(f"  {title}, round {i + 1}/{repeat}", flush=True)
        # A different order each round, so that no configuration always runs first.
        for label in labels[i % len(labels) :] + labels[: i % len(labels)]:
            settings, args = configs[label]
            runs[label].append(run_crawl(label, site, settings, args))
    return runs


def heavy(site: str, repeat: int) -> dict:
    runs = run_rounds(site, {"vanilla Scrapy": ({"ADDONS": {}}, {}),
                             "scrapy-speedup": ({}, {})}, repeat, "heavy pipeline")
    vanilla_runs, speedup_runs = runs["vanilla Scrapy"], runs["scrapy-speedup"]
    vanilla, speedup = median_run(vanilla_runs), median_run(speedup_runs)
    cores = os.cpu_count() or 1
    cpu_per_page = vanilla.cpu_s / vanilla.pages
    limit = cores / cpu_per_page
    print("\nHeavy pipeline (MinHash, ~10 ms per item)")
    print_table([vanilla_runs, speedup_runs], list(runs))
    same = all(compare_items(v, s, ignore=("near_duplicate_of",))
               for v, s in zip(vanilla_runs, speedup_runs, strict=True))
    ratios = round_ratios(speedup_runs, vanilla_runs)
    print(f"theoretical limit: {cores} cores / {cpu_per_page * 1000:.1f} ms CPU per page ="
          f" {limit:.0f} pages/s ({limit / vanilla.pages_per_s:.2f}x vanilla end to end);"
          f" items identical: {same}")
    print(f"ratios per round: end to end {ratios['end_to_end_rounds']},"
          f" crawl {ratios['crawl_rounds']}")
    return {"vanilla": vanilla.summary(), "speedup": speedup.summary(), "ratios": ratios,
            "cpu_ms_per_page": round(cpu_per_page * 1000, 2),
            "limit_pages_per_s": round(limit, 1),
            "limit_ratio": round(limit / vanilla.pages_per_s, 3), "items_identical": same}


def small(site: str, repeat: int) -> dict:
    light = {"ITEM_PIPELINES": {}, "SPEEDUP_PROCESS_PIPELINES": []}
    args = {"top_words": 1}
    configs = {
        "inline (no add-on)": ({**light, "ADDONS": {}}, args),
        "run_in_process (default)": (light, args),
        "run_in_process, always offload": ({**light, "SPEEDUP_PROCESS_INLINE_BELOW_MS": 0}, args),
    }
    runs = run_rounds(site, configs, repeat, "small work")
    inline, default, forced = runs.values()
    print("\nSmall work (~0.1 ms per item through run_in_process)")
    print_table(list(runs.values()), list(runs))
    ratios = round_ratios(default, inline)
    forced_ratios = round_ratios(forced, inline)
    same = all(compare_items(a, b) for a, b in zip(inline, default, strict=True))
    print(f"cost against inline: end to end {1 - ratios['end_to_end']:+.1%},"
          f" crawl {1 - ratios['crawl']:+.1%} (target: at most 5%); items identical: {same}")
    return {"runs": [median_run(r).summary() for r in runs.values()],
            "ratios": ratios, "always_offload_ratios": forced_ratios, "items_identical": same}


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
    write_results(f"process-{args.products}", results)


if __name__ == "__main__":
    main()
