"""Benchmark: the process pool on a Dask cluster against the local pool.

The demo catalogue crawl (MinHash, ~10 ms of CPU per item, in
SPEEDUP_PROCESS_PIPELINES), side by side in rounds: vanilla Scrapy (the
pipeline inline), the local process pool of 2 workers, and a Dask cluster of
2 single-threaded workers on this machine (Dask's own ``dask scheduler`` and
``dask worker`` processes, as tests/dask_cluster.py starts them).

Besides pages/s and the ratios, it states what a task costs to go through
Dask rather than the local pool, in CPU per item: in the crawl's process
(submitting, callbacks, results) and on the cluster's side (scheduler,
workers and their nannies, all of their CPU while the crawl ran, less the
same MinHash work that the local workers did).

    .venv/bin/python benchmarks/bench_dask.py [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from bench_crawl_processes import VANILLA, check_items, machine_scaling, report_log_problems, run
from bench_crawl_processes import table as print_table
from sidebyside import ROOT, DemoSite, write_results

sys.path.insert(0, str(ROOT))
from tests.dask_cluster import DaskCluster, dask_cluster


def cluster_cpu_s(cluster: DaskCluster) -> float:
    """CPU time so far of the cluster's processes and their children."""
    total = 0.0
    for process in cluster.processes:
        try:
            root = psutil.Process(process.pid)
            for p in [root, *root.children(recursive=True)]:
                times = p.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds; odd, for a median")
    parser.add_argument("--quick", action="store_true", help="one round, 300 products")
    args = parser.parse_args()
    count = 1 if args.quick else args.rounds
    products = 300 if args.quick else 1000
    minhash = "demo_catalogue.pipelines.MinHashPipeline"
    results: dict[str, Any] = {"rounds": count, "products": products}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, DemoSite(products, 20) as site, \
            dask_cluster(Path(tmp), workers=2) as cluster:
        scaling = machine_scaling()
        local = {"SPEEDUP_PROCESS_WORKERS": 2, "SPEEDUP_PROCESS_PIPELINES": [minhash]}
        dask = {**local, "SPEEDUP_PROCESS_EXECUTOR": "dask",
                "SPEEDUP_DASK_SCHEDULER_ADDRESS": cluster.address}
        configs: dict[str, dict[str, Any]] = {
            "vanilla Scrapy": VANILLA,
            "local process pool, 2 workers": local,
            "Dask, 2 workers on this machine": dask,
        }
        runs: dict[str, list[Any]] = {label: [] for label in configs}
        cluster_cpu: list[float] = []
        labels = list(configs)
        for i in range(count):
            print(f"  round {i + 1}/{count}", flush=True)
            for label in labels[i % len(labels):] + labels[:i % len(labels)]:
                before = cluster_cpu_s(cluster)
                runs[label].append(run(label, site.url, configs[label], spider="catalogue"))
                if label.startswith("Dask"):
                    cluster_cpu.append(cluster_cpu_s(cluster) - before)
        print(f"\nThe CPU-heavy pipeline on a Dask cluster ({products} products, MinHash"
              " ~10 ms an item)")
        out = print_table(runs, scaling)
        same = check_items(runs, ignore=("near_duplicate_of",))
        print(f"  items identical (near_duplicate_of aside): {same}")
        # Per item, medians over the rounds.
        local_runs, dask_runs = runs[labels[1]], runs[labels[2]]
        local_crawl = statistics.median(r.top_cpu_s / r.items for r in local_runs) * 1000
        local_workers = statistics.median((r.cpu_s - r.top_cpu_s) / r.items
                                          for r in local_runs) * 1000
        dask_crawl = statistics.median(r.top_cpu_s / r.items for r in dask_runs) * 1000
        dask_cluster_ms = statistics.median(
            c / r.items for c, r in zip(cluster_cpu, dask_runs, strict=True)) * 1000
        crawl_cost = dask_crawl - local_crawl
        cluster_cost = dask_cluster_ms - local_workers
        print(f"  CPU per item, ms: crawl's process {local_crawl:.2f} (local pool) /"
              f" {dask_crawl:.2f} (Dask); workers {local_workers:.2f} (local) / cluster"
              f" {dask_cluster_ms:.2f} (Dask: scheduler, workers, nannies)")
        print(f"  -> going through Dask costs {crawl_cost:+.2f} ms of the crawl's CPU and"
              f" {cluster_cost:+.2f} ms of the cluster's per task, beside the ~10 ms task")
        results.update({
            "scaling": round(scaling, 3), "configs": out, "items_identical": same,
            "cpu_ms_per_item": {
                "local_crawl": round(local_crawl, 3), "local_workers": round(local_workers, 3),
                "dask_crawl": round(dask_crawl, 3), "dask_cluster": round(dask_cluster_ms, 3),
                "dask_cost_crawl": round(crawl_cost, 3),
                "dask_cost_cluster": round(cluster_cost, 3),
            },
            "log_problems": report_log_problems(runs),
        })
    print(f"\n{time.monotonic() - started:.0f} s in all")
    write_results("dask" + ("-quick" if args.quick else ""), results)


if __name__ == "__main__":
    main()
