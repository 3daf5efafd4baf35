"""Benchmark: adaptive concurrency against a sweep of fixed settings.

Servers (python -m scrapy_speedup.demo.capacity, 50 ms per page):

1. capacity 6 (6 served at once, 6 queued, 503 beyond): a sweep of fixed
   concurrency 2, 4, 8, 16, 32 and 64 once, then, in each round, adaptive
   (ceiling 64) and the best fixed setting that lost no page;
2. no limit: fixed 64 against adaptive (ceiling 64), in each round;
3. a slow machine: no limit, but each page costs 10 ms of CPU in the
   callback, so the crawl's own reactor is the bottleneck: fixed 64, adaptive,
   and adaptive without the reactor doctor's input, in each round;
4. capacity 12, halving 3 s after the first request, with a timeline of
   every download and of the adaptive limit: adaptive in each round (how long
   after the halving the 503s stop), fixed 8 and fixed 32 once; the chart
   of concurrency and throughput over time is drawn from the last round.

Targets: adaptive >= 0.9x the best fixed setting's pages/s, <= 1% of
responses 503, no page lost; after the capacity halves, the 503s stop within
5 s; >= 0.95x the fixed ceiling without a limit. Pages/s is pages scraped (a
503 is not a page) over the crawl's time (crawler built to spider closed).
Ratios are per round (both runs of a ratio back to back, order alternating),
and their median is reported. Results: benchmarks/results/concurrency.json and
benchmarks/results/concurrency-halving.png (copy it to docs/_static/ to
update the docs' chart).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from sidebyside import RESULTS, CapacitySite, CrawlRun, run_crawl, write_results

ADAPTIVE = {"SPEEDUP_ADAPTIVE_CONCURRENCY_ENABLED": True, "CONCURRENT_REQUESTS": 64,
            "CONCURRENT_REQUESTS_PER_DOMAIN": 64}
HALVE_AFTER_S = 3.0
# The 503s have stopped once none came for this long (or the crawl ended).
QUIET_S = 2.0


def fixed(n: int) -> dict[str, Any]:
    return {"CONCURRENT_REQUESTS": n, "CONCURRENT_REQUESTS_PER_DOMAIN": n,
            "SPEEDUP_ENABLED": False}


def crawl(label: str, site: CapacitySite, settings: dict[str, Any], pages: int,
          *, cpu_ms: float = 0, timeline: bool = False) -> dict[str, Any]:
    # The adaptive limit is sampled by the timeline (the stats keep only the
    # lowest and highest limits, over all slots): its last sample is the
    # limit at the end.
    adaptive = bool(settings.get("SPEEDUP_ADAPTIVE_CONCURRENCY_ENABLED"))
    with tempfile.TemporaryDirectory() as tmp:
        extra: dict[str, Any] = {}
        if timeline or adaptive:
            extra = {"EXTENSIONS": {"timeline.Timeline": 0},
                     "BENCH_TIMELINE_FILE": str(Path(tmp, "timeline.json"))}
        run: CrawlRun = run_crawl(
            label, site.url, {"ADDONS": {"scrapy_speedup.Addon": 500}, **settings, **extra},
            {"count": pages, "cpu_ms": cpu_ms}, spider="pages")
        events = json.loads(Path(tmp, "timeline.json").read_text()) if extra else None
    responses = int(run.stats.get("downloader/response_count", 0))
    rejected = int(run.stats.get("downloader/response_status_count/503", 0))
    row: dict[str, Any] = {
        "label": label, "pages_per_s": round(run.items / run.crawl_s, 1), "pages": run.items,
        "lost": pages - run.items,
        "rejected_share": round(rejected / responses, 4) if responses else 0.0,
        "concurrency_max": run.stats.get("speedup/adaptive/concurrency_max"),
        "concurrency_end": (events["samples"][-1][1]
                            if adaptive and events and events["samples"] else None),
        "lag_max_ms": run.stats.get("speedup/reactor/lag_max_ms"),
    }
    if timeline and events is not None:
        row["timeline"] = events
        row.update(after_halving(events))
    limit = f"  limit max {row['concurrency_max']}" if row["concurrency_max"] else ""
    print(f"  {label:30} {row['pages_per_s']:7.1f} pages/s  503: {row['rejected_share']:6.1%}"
          f"  lost: {row['lost']:4d}{limit}", flush=True)
    return row


def after_halving(events: dict[str, Any]) -> dict[str, Any]:
    """When the 503s stopped after the capacity halved: the last 503 before a
    quiet stretch of QUIET_S (or the end of the crawl), in seconds after the
    halving, and how many 503s came after that (later probing)."""
    rejected = [t for t, status in events["downloads"] if status == 503 and t >= HALVE_AFTER_S]
    end = events["downloads"][-1][0] if events["downloads"] else HALVE_AFTER_S
    stop = HALVE_AFTER_S
    for i, t in enumerate(rejected):
        stop = t
        following = rejected[i + 1] if i + 1 < len(rejected) else end + QUIET_S
        if following - t >= QUIET_S:
            break
    return {"rejected_after_halving": len(rejected),
            "rejected_stop_s": round(stop - HALVE_AFTER_S, 2),
            "rejected_after_stop": sum(1 for t in rejected if t > stop)}


def ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    return round(a["pages_per_s"] / b["pages_per_s"], 3)


def chart(adaptive: dict[str, Any], others: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    samples = adaptive["timeline"]["samples"]
    top.step([s[0] for s in samples], [s[1] for s in samples], where="post",
             label="adaptive limit")
    top.plot([s[0] for s in samples], [s[2] for s in samples], alpha=0.6,
             label="adaptive: requests in flight")
    top.set_ylabel("concurrency")
    bin_s = 0.5
    for run in [adaptive, *others]:
        downloads = run["timeline"]["downloads"]
        end = max(t for t, _ in downloads)
        edges = [i * bin_s for i in range(int(end / bin_s) + 2)]

        def rate(status_ok: bool, downloads: list[Any] = downloads,
                 edges: list[float] = edges) -> list[float]:
            counts = [0] * len(edges)
            for t, status in downloads:
                if (status == 200) == status_ok:
                    counts[int(t / bin_s)] += 1
            return [c / bin_s for c in counts]

        middle.plot(edges, rate(True), label=run["label"])
        bottom.plot(edges, rate(False), label=run["label"])
    middle.set_ylabel("pages/s")
    bottom.set_ylabel("503 responses/s")
    bottom.set_xlabel("seconds since the first request")
    for ax in (top, middle, bottom):
        ax.axvline(HALVE_AFTER_S, color="grey", linestyle="--", linewidth=1)
        ax.legend(loc="upper right", fontsize="small")
        ax.grid(alpha=0.3)
    top.set_title("Capacity 12 at 50 ms per page, halving to 6 at 3 s (dashed line)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=1000)
    parser.add_argument("--halving-pages", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    args = parser.parse_args()
    results: dict[str, Any] = {"pages": args.pages, "rounds": args.repeat}

    print("capacity 6, sweep:")
    with CapacitySite(6) as site:
        sweep = [crawl(f"fixed {n}", site, fixed(n), args.pages) for n in (2, 4, 8, 16, 32, 64)]
    best = max((r for r in sweep if r["lost"] == 0), key=lambda r: r["pages_per_s"])
    best_n = int(best["label"].split()[1])
    results["capacity_6_sweep"] = sweep

    rounds: dict[str, list[Any]] = {key: [] for key in (
        "capacity_6", "unlimited", "slow_machine", "halving")}
    for i in range(args.repeat):
        print(f"round {i + 1} of {args.repeat}:")
        order = (lambda pair: pair) if i % 2 == 0 else (lambda pair: pair[::-1])
        with CapacitySite(6) as site:
            runs = {label: crawl(f"capacity 6: {label}", site, settings, args.pages)
                    for label, settings in order([(best["label"], fixed(best_n)),
                                                  ("adaptive", ADAPTIVE)])}
        rounds["capacity_6"].append({**runs, "ratio": ratio(runs["adaptive"],
                                                            runs[best["label"]])})
        with CapacitySite(100_000) as site:
            runs = {label: crawl(f"no limit: {label}", site, settings, args.pages)
                    for label, settings in order([("fixed 64", fixed(64)),
                                                  ("adaptive", ADAPTIVE)])}
        rounds["unlimited"].append({**runs, "ratio": ratio(runs["adaptive"], runs["fixed 64"])})
        slow_pages = args.pages * 6 // 10
        with CapacitySite(100_000) as site:
            runs = {label: crawl(f"slow machine: {label}", site, settings, slow_pages,
                                 cpu_ms=10)
                    for label, settings in order([
                        ("fixed 64", fixed(64)), ("adaptive", ADAPTIVE),
                        ("adaptive, no doctor", {**ADAPTIVE, "SPEEDUP_DOCTOR_ENABLED": False})])}
        rounds["slow_machine"].append({**runs, "ratio": ratio(runs["adaptive"], runs["fixed 64"])})
        with CapacitySite(12, halve_after_s=HALVE_AFTER_S) as site:
            rounds["halving"].append(crawl("halving: adaptive", site, ADAPTIVE,
                                           args.halving_pages, timeline=True))
    others = []
    for n in (8, 32):
        with CapacitySite(12, halve_after_s=HALVE_AFTER_S) as site:
            others.append(crawl(f"fixed {n}", site, fixed(n), args.halving_pages, timeline=True))
    halving = rounds["halving"][-1]
    halving["label"] = "adaptive (ceiling 64)"
    RESULTS.mkdir(exist_ok=True)
    chart(halving, others, RESULTS / "concurrency-halving.png")

    def median(key: str) -> float:
        return round(statistics.median(r["ratio"] for r in rounds[key]), 3)

    summary = {
        "capacity_6": {"best_fixed": best["label"], "ratio_median": median("capacity_6"),
                       "adaptive_rejected_share_max": max(
                           r["adaptive"]["rejected_share"] for r in rounds["capacity_6"]),
                       "adaptive_lost_max": max(r["adaptive"]["lost"]
                                                for r in rounds["capacity_6"])},
        "unlimited": {"ratio_median": median("unlimited")},
        "slow_machine": {"ratio_median": median("slow_machine"),
                         "limit_end": [r["adaptive"]["concurrency_end"]
                                       for r in rounds["slow_machine"]],
                         "limit_end_no_doctor": [r["adaptive, no doctor"]["concurrency_end"]
                                                 for r in rounds["slow_machine"]],
                         "lag_max_ms": [r["adaptive"]["lag_max_ms"]
                                        for r in rounds["slow_machine"]]},
        "halving": {"rejected_stop_s": [r["rejected_stop_s"] for r in rounds["halving"]],
                    "rejected_after_stop": [r["rejected_after_stop"] for r in rounds["halving"]],
                    "rejected_share": [r["rejected_share"] for r in rounds["halving"]],
                    "lost": [r["lost"] for r in rounds["halving"]],
                    "pages_per_s": [r["pages_per_s"] for r in rounds["halving"]],
                    "fixed": [{k: v for k, v in r.items() if k != "timeline"} for r in others]},
    }
    print("\nsummary:")
    print(json.dumps(summary, indent=2))
    for run in [*rounds["halving"][:-1], *others]:
        run.pop("timeline", None)
    results.update(rounds=rounds, summary=summary)
    write_results("concurrency", results)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
