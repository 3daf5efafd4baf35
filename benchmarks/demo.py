"""``make demo``: the demo crawl with scrapy-speedup off and on, side by side.

Starts the local demo site, crawls it with vanilla Scrapy, then with the
add-on (the MinHash pipeline in worker processes), and prints pages/s, the
ratio and CPU use.
"""

from __future__ import annotations

import argparse
import os

from sidebyside import DemoSite, compare_items, print_table, run_crawl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--products", type=int, default=1000)
    parser.add_argument("--latency-ms", type=float, default=20)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with DemoSite(args.products, args.latency_ms) as site:
        print(f"Demo site: {site.url}, {args.products} products, {args.latency_ms:g} ms"
              f" per response; {cores} CPU cores\n")
        print("Crawling with vanilla Scrapy ...", flush=True)
        vanilla = run_crawl("vanilla Scrapy", site.url, {"ADDONS": {}})
        print("Crawling with scrapy-speedup ...", flush=True)
        speedup = run_crawl("scrapy-speedup", site.url)
    print()
    print_table([[vanilla], [speedup]], [vanilla.label, speedup.label])
    cpu_per_page = vanilla.cpu_s / vanilla.pages
    limit = cores / cpu_per_page
    print(f"\nCPU per page (vanilla): {cpu_per_page * 1000:.1f} ms; with {cores} cores the"
          f" limit is {limit:.0f} pages/s ({limit / vanilla.pages_per_s:.2f}x vanilla)")
    same = compare_items(vanilla, speedup, ignore=("near_duplicate_of",))
    print(f"Items identical: {'yes' if same else 'NO'} ({speedup.items} items,"
          f" {speedup.stats.get('demo/near_duplicates', 0)} near duplicates found)")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
