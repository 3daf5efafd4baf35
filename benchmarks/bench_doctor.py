"""Benchmark: what the reactor doctor costs a plain crawl.

A crawl that keeps the reactor busy, so that any cost shows: the ``pages``
spider fetches 3000 pages from the capacity server without a limit at 5 ms
per page, 32 at once, no pipeline. Three configurations, in a different
order each round: scrapy-speedup with the doctor (the default), without it
(SPEEDUP_DOCTOR_ENABLED=False), and Scrapy alone.

Target: the doctor costs <= 2% (crawl-only pages/s, median of per-round
ratios). Also reported: the crawl process's CPU seconds.

Crawls on a shared VM vary by +-30% from one to the next, far more than the
cost to measure, so a second, steadier measurement runs inside one crawl: a
reactor-bound loop (small CPU work, then a turn of the event loop, as a busy
crawl does) timed in 0.5 s phases with the doctor on and off in turn, 20
phases each; the median of the on/off ratios of neighbouring phases is the
doctor's cost. Results: benchmarks/results/doctor.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import scrapy
from sidebyside import CapacitySite, CrawlRun, run_crawl, write_results

from scrapy_speedup._bridge import Bridge
from scrapy_speedup.extension import SpeedupExtension
from scrapy_speedup.reactor_doctor import ReactorDoctor

CONCURRENCY = {"CONCURRENT_REQUESTS": 32, "CONCURRENT_REQUESTS_PER_DOMAIN": 32}
CONFIGS = {
    "doctor on": {},
    "doctor off": {"SPEEDUP_DOCTOR_ENABLED": False},
    "Scrapy alone": {"SPEEDUP_ENABLED": False},
}


class TimedDoctor(ReactorDoctor):
    """The doctor, with its own CPU time counted."""

    def _tick(self) -> None:
        started = time.perf_counter()
        super()._tick()
        LoopSpider.tick_s += time.perf_counter() - started
        LoopSpider.ticks += 1



class LoopSpider(scrapy.Spider):
    """Crawls nothing: its start() times the reactor-bound loop, doctor on and off."""

    name = "doctor_overhead"
    phases = 200
    phase_s = 0.1
    # Per pair of phases: (on, off) work per wall second, and per CPU second
    # of the whole process.
    results: list[tuple[tuple[float, float], tuple[float, float]]] = []
    # The doctor's own cost: the time of its timer's callbacks.
    tick_s = 0.0
    ticks = 0
    doctor_on_s = 0.0

    async def start(self):  # type: ignore[override]
        ext = SpeedupExtension.of(self.crawler)
        assert ext.doctor is not None
        ext.doctor.stop()
        await self.run_phase()  # warm-up
        for i in range(self.phases):
            # Neighbouring phases, in alternating order: a drift in the
            # machine's speed favours neither.
            doctor = TimedDoctor(self.crawler, ext.config, Bridge())
            if i % 2:
                off = await self.run_phase()
            started = time.perf_counter()
            doctor.start()
            on = await self.run_phase()
            doctor.stop()
            LoopSpider.doctor_on_s += time.perf_counter() - started
            if not i % 2:
                off = await self.run_phase()
            LoopSpider.results.append((on, off))
        return
        yield

    async def run_phase(self) -> tuple[float, float]:
        """Work units per wall second and per CPU second over one phase."""
        data = {"title": "x" * 40, "tags": list(range(20)), "price": 12.5}
        units = 0
        started, cpu = time.perf_counter(), time.process_time()
        while (elapsed := time.perf_counter() - started) < self.phase_s:
            for _ in range(20):
                json.loads(json.dumps(data))
            units += 1
            await asyncio.sleep(0)
        return units / elapsed, units / (time.process_time() - cpu)


def micro() -> dict[str, object]:
    from scrapy.crawler import CrawlerProcess

    process = CrawlerProcess({"ADDONS": {"scrapy_speedup.Addon": 500}, "LOG_LEVEL": "WARNING",
                              "TELNETCONSOLE_ENABLED": False})
    process.crawl(LoopSpider)
    process.start()
    wall = [on[0] / off[0] for on, off in LoopSpider.results]
    cpu = [on[1] / off[1] for on, off in LoopSpider.results]
    on_s = LoopSpider.doctor_on_s
    return {"phases": LoopSpider.phases, "phase_s": LoopSpider.phase_s,
            "tick_us": round(LoopSpider.tick_s / LoopSpider.ticks * 1e6, 1),
            "ticks_per_s": round(LoopSpider.ticks / on_s, 1),
            "own_share": round(LoopSpider.tick_s / on_s, 5),
            "wall_ratio_median": round(statistics.median(wall), 4),
            "wall_ratio_quartiles": [round(q, 4) for q in statistics.quantiles(wall, n=4)],
            "cpu_ratio_median": round(statistics.median(cpu), 4),
            "cpu_ratio_quartiles": [round(q, 4) for q in statistics.quantiles(cpu, n=4)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=5, help="rounds; odd, for a median")
    args = parser.parse_args()
    loop = micro()
    print(f"the doctor's own time: {loop['own_share']:.3%} of the reactor thread"
          f" ({loop['ticks_per_s']} timer calls/s at {loop['tick_us']} us each)")
    print(f"reactor-bound loop, doctor on / off: work per CPU second"
          f" {loop['cpu_ratio_median']:.4f}x (quartiles {loop['cpu_ratio_quartiles']}),"
          f" per wall second {loop['wall_ratio_median']:.4f}x"
          f" (quartiles {loop['wall_ratio_quartiles']})", flush=True)
    runs: dict[str, list[CrawlRun]] = {label: [] for label in CONFIGS}
    labels = list(CONFIGS)
    with CapacitySite(100_000, latency_ms=5) as site:
        for i in range(args.repeat):
            for label in labels[i % len(labels):] + labels[:i % len(labels)]:
                settings = {"ADDONS": {"scrapy_speedup.Addon": 500}, **CONCURRENCY,
                            **CONFIGS[label]}
                run = run_crawl(label, site.url, settings, {"count": args.pages},
                                spider="pages")
                runs[label].append(run)
                print(f"  round {i + 1}: {label:12} {run.crawl_pages_per_s:7.1f} pages/s"
                      f"  {run.cpu_s:5.2f} CPU s", flush=True)

    def ratios(a: str, b: str) -> dict[str, object]:
        pairs = list(zip(runs[a], runs[b], strict=True))
        speed = [x.crawl_pages_per_s / y.crawl_pages_per_s for x, y in pairs]
        cpu = [x.cpu_s / y.cpu_s for x, y in pairs]
        return {"speed": round(statistics.median(speed), 4),
                "speed_rounds": [round(r, 4) for r in speed],
                "cpu": round(statistics.median(cpu), 4),
                "cpu_rounds": [round(r, 4) for r in cpu]}

    results = {
        "reactor_bound_loop": loop,
        "pages": args.pages, "repeat": args.repeat,
        "pages_per_s": {label: [round(r.crawl_pages_per_s, 1) for r in rs]
                        for label, rs in runs.items()},
        "doctor_on_vs_off": ratios("doctor on", "doctor off"),
        "doctor_on_vs_scrapy": ratios("doctor on", "Scrapy alone"),
    }
    on_off = results["doctor_on_vs_off"]
    print(f"\ndoctor on / off: {on_off['speed']:.3f}x pages/s"
          f" (cost {(1 - on_off['speed']) * 100:+.1f}%, target <= 2%),"
          f" {on_off['cpu']:.3f}x CPU; rounds {on_off['speed_rounds']}")
    vs = results["doctor_on_vs_scrapy"]
    print(f"scrapy-speedup (doctor on) / Scrapy alone: {vs['speed']:.3f}x pages/s,"
          f" {vs['cpu']:.3f}x CPU")
    write_results("doctor", results)


if __name__ == "__main__":
    main()
