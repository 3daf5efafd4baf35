"""Run the demo crawl several ways against the local demo site and compare.

Each run is a real ``scrapy crawl catalogue`` process of ``example_project``.
Throughput is end-to-end: pages over the wall time of the whole process,
start-up and shut-down included, so that a pool's start-up cost counts.
CPU is the user + system time of the crawl's whole process tree (workers
included), sampled every 0.1 s.
"""

from __future__ import annotations

import json
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

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ROOT / "example_project"

__all__ = ["CapacitySite", "CrawlRun", "DemoSite", "compare_items", "run_crawl", "write_results"]

RESULTS = Path(__file__).parent / "results"


def write_results(name: str, results: dict[str, Any]) -> None:
    """Save a benchmark's results as benchmarks/results/<name>.json."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


class DemoSite:
    """``python -m scrapy_speedup.demo`` in a subprocess, for a ``with`` block."""

    def __init__(self, products: int, latency_ms: float, api_latency_ms: float = 50) -> None:
        self.products, self.latency_ms = products, latency_ms
        self.api_latency_ms = api_latency_ms

    def __enter__(self) -> DemoSite:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "scrapy_speedup.demo", "--products", str(self.products),
             "--latency-ms", str(self.latency_ms), "--api-latency-ms", str(self.api_latency_ms)],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        match = re.search(r"listening on (\S+)", line)
        if not match:
            self.process.kill()
            raise RuntimeError(f"the demo site did not start: {line!r}")
        self.url = match[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(10)


class CapacitySite:
    """``python -m scrapy_speedup.demo.capacity`` in a subprocess, for a ``with`` block."""

    def __init__(self, capacity: int, halve_after_s: float | None = None,
                 latency_ms: float = 50) -> None:
        self.args = ["--capacity", str(capacity), "--latency-ms", str(latency_ms)]
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


@dataclass
class CrawlRun:
    label: str
    pages: int
    items: int
    wall_s: float
    cpu_s: float
    stats: dict[str, Any]
    item_rows: list[dict[str, Any]] = field(repr=False)
    #: Peak resident memory of the crawl's own process (RSS, every 0.1 s), and
    #: of its whole process tree, workers included (PSS, every 0.5 s), in MiB.
    rss_max_mb: float = 0.0
    tree_pss_max_mb: float = 0.0

    @property
    def pages_per_s(self) -> float:
        """End to end: pages over the whole process's wall time."""
        return self.pages / self.wall_s

    @property
    def crawl_s(self) -> float:
        return float(self.stats["bench/crawl_seconds"])

    @property
    def crawl_pages_per_s(self) -> float:
        """Pages over the crawl's time (crawler built to spider closed)."""
        return self.pages / self.crawl_s

    @property
    def cores_busy(self) -> float:
        return self.cpu_s / self.wall_s

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label, "pages": self.pages, "items": self.items,
            "wall_s": round(self.wall_s, 3), "pages_per_s": round(self.pages_per_s, 1),
            "crawl_s": round(self.crawl_s, 3),
            "crawl_pages_per_s": round(self.crawl_pages_per_s, 1),
            "cpu_s": round(self.cpu_s, 2), "cores_busy": round(self.cores_busy, 2),
            "rss_max_mb": round(self.rss_max_mb, 1),
            "tree_pss_max_mb": round(self.tree_pss_max_mb, 1),
            "speedup_stats": {k: v for k, v in self.stats.items() if k.startswith("speedup/")},
        }


def _tree_cpu(root: psutil.Process, seen: dict[int, float],
              tree_memory: bool) -> tuple[float, float]:
    """Record each process's CPU time in *seen*; return the resident memory
    (MiB) of *root*, and with *tree_memory* the proportional set size of its
    whole tree (PSS: pages shared with the fork server and between workers
    count once, not once per process; reading it is slower, so not always)."""
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    root_rss = tree_rss = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            if process.pid == root.pid:
                root_rss = process.memory_info().rss / 2**20
            if tree_memory:
                tree_rss += process.memory_full_info().pss / 2**20
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        seen[process.pid] = times.user + times.system
    return root_rss, tree_rss


def run_crawl(label: str, site: str, settings: dict[str, Any] | None = None,
              args: dict[str, Any] | None = None, *, timeout_s: float = 600,
              spider: str = "catalogue") -> CrawlRun:
    with tempfile.TemporaryDirectory() as tmp:
        stats_file, items_file = Path(tmp, "stats.json"), Path(tmp, "items.jsonl")
        cmd = [sys.executable, "-m", "scrapy", "crawl", spider, "-a", f"site={site}",
               "-o", f"{items_file}:jsonlines",
               "-s", "STATS_CLASS=jsonstats.JsonStatsCollector",
               "-s", f"BENCH_STATS_FILE={stats_file}", "-s", "LOG_LEVEL=WARNING"]
        for key, value in (settings or {}).items():
            text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
            cmd += ["-s", f"{key}={text}"]
        for key, value in (args or {}).items():
            cmd += ["-a", f"{key}={value}"]
        # The repository first: the code measured is this checkout's.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), str(Path(__file__).parent), str(PROJECT)])}
        cpu: dict[int, float] = {}
        started = time.perf_counter()
        # A file, not a pipe: a crawl that logs more than a pipe holds would
        # block on it while nobody reads.
        log = open(Path(tmp, "crawl.log"), "w+")  # closed below
        process = subprocess.Popen(cmd, cwd=PROJECT, env=env, stderr=log, text=True)
        root = psutil.Process(process.pid)
        deadline = time.monotonic() + timeout_s
        rss_max = tree_pss_max = 0.0
        samples = 0
        while process.poll() is None:
            samples += 1
            rss, tree_rss = _tree_cpu(root, cpu, tree_memory=samples % 5 == 0)
            rss_max, tree_pss_max = max(rss_max, rss), max(tree_pss_max, tree_rss)
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"{label}: crawl ran past {timeout_s} s")
            time.sleep(0.1)
        wall = time.perf_counter() - started
        log.seek(0)
        err = log.read()
        log.close()
        if process.returncode != 0:
            raise RuntimeError(f"{label}: crawl failed ({process.returncode}):\n{err[-5000:]}")
        stats = json.loads(stats_file.read_text())
        rows = [json.loads(line) for line in items_file.read_text().splitlines()]
    return CrawlRun(label, int(stats.get("response_received_count", 0)),
                    int(stats.get("item_scraped_count", 0)), wall, sum(cpu.values()),
                    stats, rows, rss_max, tree_pss_max)


def compare_items(a: CrawlRun, b: CrawlRun, ignore: tuple[str, ...] = ()) -> bool:
    """Same items, by URL. *ignore* names fields that depend on crawl order."""

    def key(run: CrawlRun) -> dict[str, dict[str, Any]]:
        return {row["url"]: {k: v for k, v in row.items() if k not in ignore}
                for row in run.item_rows}

    return key(a) == key(b)


def median_run(runs: list[CrawlRun]) -> CrawlRun:
    """The run with the median end-to-end throughput (of an odd number of runs)."""
    middle = statistics.median_low([r.pages_per_s for r in runs])
    return next(r for r in runs if r.pages_per_s == middle)


def round_ratios(runs: list[CrawlRun], baselines: list[CrawlRun]) -> dict[str, Any]:
    """Ratios of runs made back to back, round by round, and their medians:
    each round's pair saw the same machine load."""
    pairs = list(zip(runs, baselines, strict=True))
    end_to_end = [r.pages_per_s / b.pages_per_s for r, b in pairs]
    crawl = [r.crawl_pages_per_s / b.crawl_pages_per_s for r, b in pairs]
    return {
        "end_to_end": round(statistics.median(end_to_end), 3),
        "crawl": round(statistics.median(crawl), 3),
        "end_to_end_rounds": [round(x, 3) for x in end_to_end],
        "crawl_rounds": [round(x, 3) for x in crawl],
    }


def print_table(runs: list[list[CrawlRun]], labels: list[str]) -> None:
    """One line per configuration: its median run, and ratios to the first."""
    print(f"{'':31} {'pages':>5} {'end-to-end':>17} {'crawl only':>17} {'CPU cores':>9}")
    print(f"{'':31} {'':>5} {'pages/s':>9} {'ratio':>7} {'pages/s':>9} {'ratio':>7} {'busy':>9}")
    for label, config_runs in zip(labels, runs, strict=True):
        run = median_run(config_runs)
        ratios = round_ratios(config_runs, runs[0])
        print(f"{label:31} {run.pages:5d} {run.pages_per_s:9.1f} {ratios['end_to_end']:6.2f}x"
              f" {run.crawl_pages_per_s:9.1f} {ratios['crawl']:6.2f}x {run.cores_busy:9.2f}")
