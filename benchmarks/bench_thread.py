"""Benchmark: a blocking call per item, inline against the thread pool.

One run, side by side, on the local demo site (20 ms per page; its POST
/api/items answers after 50 ms): each item is sent to that API with a blocking
urllib call (demo_catalogue.pipelines.ApiExportPipeline):

* inline, as vanilla Scrapy runs it: the reactor waits 50 ms per item;
* ``@blocking`` (ThreadedApiExportPipeline) in scrapy-speedup's 32 threads;
* by hand with Twisted's ``deferToThread`` and REACTOR_THREADPOOL_MAXSIZE=32;
* no pipeline at all: the reactor's own ceiling for this crawl.

Targets: >= 8x vanilla, and not slower than the hand-written version, with
identical items. Ratios are medians of per-round ratios; results go to
benchmarks/results/thread-<products>.json.
"""

from __future__ import annotations

import argparse

from sidebyside import (
    DemoSite,
    compare_items,
    median_run,
    print_table,
    round_ratios,
    run_crawl,
    write_results,
)

THREADS = 32
API_LATENCY_S = 0.05
P = "demo_catalogue.pipelines."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; odd, for a median")
    args = parser.parse_args()
    with DemoSite(args.products, 20, api_latency_ms=API_LATENCY_S * 1000) as site:
        api = {"DEMO_API_URL": f"{site.url}/api/items", "SPEEDUP_PROCESS_PIPELINES": []}
        configs = {
            "vanilla: blocking call inline": {
                **api, "ADDONS": {}, "ITEM_PIPELINES": {P + "ApiExportPipeline": 300}},
            "scrapy-speedup: @blocking": {
                **api, "ITEM_PIPELINES": {P + "ThreadedApiExportPipeline": 300},
                "SPEEDUP_THREAD_WORKERS": THREADS},
            "by hand: deferToThread": {
                **api, "ADDONS": {}, "REACTOR_THREADPOOL_MAXSIZE": THREADS,
                "ITEM_PIPELINES": {P + "DeferToThreadApiExportPipeline": 300}},
            "no pipeline (reactor ceiling)": {**api, "ADDONS": {}, "ITEM_PIPELINES": {}},
        }
        runs: dict[str, list] = {label: [] for label in configs}
        labels = list(configs)
        for i in range(args.repeat):
            print(f"  round {i + 1}/{args.repeat}", flush=True)
            # A different order each round: no configuration always runs
            # right after the long vanilla run, or first.
            for label in labels[i % len(labels) :] + labels[: i % len(labels)]:
                runs[label].append(run_crawl(label, site.url, configs[label]))
    vanilla, speedup, by_hand, ceiling = runs.values()
    print(f"\nA blocking {API_LATENCY_S * 1000:.0f} ms API call per item, {THREADS} threads")
    print_table(list(runs.values()), list(runs))
    limit = THREADS / API_LATENCY_S
    ceiling_run = median_run(ceiling)
    same = all(compare_items(v, s) for v, s in zip(vanilla, speedup, strict=True))
    against_vanilla = round_ratios(speedup, vanilla)
    against_hand = round_ratios(speedup, by_hand)
    print(f"theoretical limit: {THREADS} threads / {API_LATENCY_S * 1000:.0f} ms ="
          f" {limit:.0f} items/s; the reactor's own ceiling here:"
          f" {ceiling_run.crawl_pages_per_s:.0f} pages/s (crawl only)")
    print(f"scrapy-speedup against vanilla: {against_vanilla['crawl']:.2f}x crawl only,"
          f" {against_vanilla['end_to_end']:.2f}x end to end (target >= 8x);"
          f" against deferToThread: {against_hand['crawl']:.2f}x crawl only"
          f" (target >= 1.0x); items identical: {same}")
    results = {
        "products": args.products, "repeat": args.repeat, "threads": THREADS,
        "api_latency_ms": API_LATENCY_S * 1000, "limit_items_per_s": limit,
        "runs": [median_run(r).summary() for r in runs.values()],
        "against_vanilla": against_vanilla, "against_defer_to_thread": against_hand,
        "items_identical": same,
    }
    write_results(f"thread-{args.products}", results)


if __name__ == "__main__":
    main()
