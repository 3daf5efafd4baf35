"""Benchmark: the crawl's frontier on Redis (SPEEDUP_FRONTIER_URL), against
vanilla Scrapy and scrapy-redis, on one Redis server started here.

a. **A plain I/O crawl** of the link-graph site (python -m
   scrapy_speedup.demo.graph: 2,000 pages, 10 links a page, 20 ms latency),
   64 concurrent requests a process, side by side in rounds: vanilla Scrapy
   (one process, no Redis); scrapy-speedup's frontier with 1 and 2 machines
   (``scrapy crawl`` processes on this machine); scrapy-redis 0.9.1 with 1
   and 2 processes (its scheduler, dupefilter and priority queue; the spider
   kept open while idle, as a RedisSpider is, and stopped here once every
   page is in). Pages/s over the crawl's span (launch to the last page
   scraped, the same clock for all) and end to end (launch to the last
   process's exit). From Redis's own INFO, per page: commands, bytes in and
   out, and Redis's CPU; for the frontier also its round trips (one a
   machine's tick, one more each second for the stats).
b. **kill -9** of one of two processes once it has scraped 300 pages: the
   pages missing from the union of the outputs (lost), and the pages scraped
   twice, for both.
c. **The frontier alone**: its store driven by one client without Scrapy
   (requests of 100 sites, leased 64 at a time, each released and
   acknowledged): leases a second, and Redis's CPU per lease.
d. **Bounds**: from Redis's CPU per page in the 2-machine crawl (its
   pushes, leases, releases, acknowledgements, ticks and stats), the pages/s
   one Redis core serves, and the share of it that 10 and 100 machines
   crawling as fast as one here would take.

e. **Redis on another host**: part a again, the frontier and scrapy-redis
   reaching Redis through a proxy that holds every chunk 0.5 ms each way
   (asyncio's timer makes it about 1 ms; the round trip measured through it
   is printed, ~2 ms, as to another zone of a cloud region): what each
   design's round trips cost.
Every run's pages are checked against the pages reachable from /p/0.
Results go to benchmarks/results/redis_frontier.json.

    .venv/bin/python benchmarks/bench_redis_frontier.py [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from bench_crawl_processes import GraphSite, machine_scaling
from sidebyside import PROJECT, ROOT, _tree_cpu, write_results

sys.path.insert(0, str(ROOT))
from scrapy_speedup.redis_frontier.store import Entry, FrontierStore
from tests.redis_server import RedisServer, redis_server

GRAPH = {"CONCURRENT_REQUESTS": 64, "CONCURRENT_REQUESTS_PER_DOMAIN": 64,
         "LOG_LEVEL": "WARNING"}
VANILLA = {"ADDONS": {}}
SCRAPY_REDIS = {"ADDONS": {}, "SCHEDULER": "scrapy_redis.scheduler.Scheduler",
                "DUPEFILTER_CLASS": "scrapy_redis.dupefilter.RFPDupeFilter",
                "SCHEDULER_PERSIST": True}
KILL_AFTER_PAGES = 300


class LaggyProxy:
    """A TCP proxy to Redis that holds what it reads *delay_s* before passing
    it on, each way: Redis as another host sees it (a thread of its own)."""

    def __init__(self, upstream_port: int, delay_s: float) -> None:
        self.upstream_port, self.delay_s = upstream_port, delay_s
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1",
                                                                 self.upstream_port)
        except OSError:
            writer.close()
            return
        with contextlib.suppress(asyncio.CancelledError):  # the proxy's close
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer),
                                 return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                await asyncio.sleep(self.delay_s)
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def round_trip_ms(self, count: int = 200) -> float:
        """The median time of a PING through the proxy."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            times = []
            for _ in range(count):
                started = time.perf_counter()
                sock.sendall(b"PING\r\n")
                sock.recv(64)
                times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(10)

    async def _shutdown(self) -> None:
        self.server.close()
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.loop.call_soon(self.loop.stop)


@dataclass
class Fleet:
    """One run: one or more ``scrapy crawl`` processes started together."""

    label: str
    processes: int
    pages: int = 0
    repeats: int = 0
    missing: int = 0
    span_s: float = 0.0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    redis: dict[str, float] = field(default_factory=dict)
    stats: list[dict[str, Any]] = field(default_factory=list)
    killed: bool = False

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.span_s

    @property
    def end_to_end_pages_per_s(self) -> float:
        return self.pages / self.wall_s

    def per_page(self, key: str) -> float:
        return self.redis.get(key, 0.0) / max(1, self.pages)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.label, "processes": self.processes, "pages": self.pages,
            "repeats": self.repeats, "missing": self.missing, "span_s": round(self.span_s, 3),
            "wall_s": round(self.wall_s, 3), "pages_per_s": round(self.pages_per_s, 1),
            "end_to_end_pages_per_s": round(self.end_to_end_pages_per_s, 1),
            "cpu_ms_per_page": round(self.cpu_s / max(1, self.pages) * 1000, 2)}
        if self.redis:
            out["redis_per_page"] = {key: round(self.per_page(key), 3) for key in self.redis}
        return out


def redis_info(redis: RedisServer) -> dict[str, float]:
    import redis as redis_client

    client = redis_client.Redis.from_url(redis.url)
    try:
        stats, cpu = client.info("stats"), client.info("cpu")
        commands = client.info("commandstats")
    finally:
        client.close()
    return {"commands": stats["total_commands_processed"],
            "bytes_in": stats["total_net_input_bytes"],
            "bytes_out": stats["total_net_output_bytes"],
            "cpu_ms": (cpu["used_cpu_user"] + cpu["used_cpu_sys"]) * 1000,
            "exec": commands.get("cmdstat_exec", {}).get("calls", 0)}


def flush(redis: RedisServer) -> None:
    import redis as redis_client

    client = redis_client.Redis.from_url(redis.url)
    try:
        client.flushall()
    finally:
        client.close()


@dataclass
class Config:
    spider: str
    settings: dict[str, Any]
    processes: int
    redis: RedisServer | None
    #: scrapy-redis waits for work while idle: stopped once every page is in.
    stop_when_complete: bool = False


class _Items:
    """The processes' item files, read as they grow."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.offsets = [0] * len(paths)
        self.seen: set[str] = set()
        self.grew_at = time.monotonic()

    def read(self) -> None:
        for i, path in enumerate(self.paths):
            if not path.exists():
                continue
            with open(path, "rb") as f:
                f.seek(self.offsets[i])
                text = f.read()
            complete = text[:text.rfind(b"\n") + 1]
            self.offsets[i] += len(complete)
            new = {json.loads(line)["url"] for line in complete.splitlines()}
            if new - self.seen:
                self.grew_at = time.monotonic()
            self.seen |= new

    def count(self, i: int) -> int:
        return sum(1 for _ in open(self.paths[i])) if self.paths[i].exists() else 0

    def rows(self) -> list[dict[str, Any]]:
        return [json.loads(line) for path in self.paths if path.exists()
                for line in path.read_text().splitlines() if line.endswith("}")]


def _launch(config: Config, site: GraphSite, tmp: str, i: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "scrapy", "crawl", config.spider, "-a", f"site={site.url}",
           "-s", "SPIDER_MODULES=demo_catalogue.spiders,frontier_spiders",
           "-s", "STATS_CLASS=jsonstats.JsonStatsCollector",
           "-s", f"BENCH_STATS_FILE={Path(tmp, f'stats{i}.json')}",
           "-s", f"BENCH_ITEMS_FILE={Path(tmp, f'items{i}.jsonl')}"]
    for key, value in config.settings.items():
        text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        cmd += ["-s", f"{key}={text}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(Path(__file__).parent), str(PROJECT)])}
    with open(Path(tmp, f"log{i}.txt"), "w") as log:
        return subprocess.Popen(cmd, cwd=PROJECT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, process_group=0)


def fleet(label: str, site: GraphSite, config: Config, *, kill_after: int = 0,
          timeout_s: float = 300) -> Fleet:
    """Start the processes at once and wait for them: each ends by itself,
    or (scrapy-redis) is stopped with Ctrl-C once every page is in, or once
    no page came for 5 s. With *kill_after*, the first is killed with
    SIGKILL once it has scraped that many pages."""
    expected = site.expected_urls()
    run = Fleet(label, config.processes)
    if config.redis is not None:
        flush(config.redis)
        before = redis_info(config.redis)
    with tempfile.TemporaryDirectory() as tmp:
        items = _Items([Path(tmp, f"items{i}.jsonl") for i in range(config.processes)])
        started = time.time()
        procs = [_launch(config, site, tmp, i) for i in range(config.processes)]
        cpu: dict[int, float] = {}
        deadline = time.monotonic() + timeout_s
        stopping = False
        while any(p.poll() is None for p in procs):
            for p in procs:
                if p.poll() is None:
                    _tree_cpu(psutil.Process(p.pid), cpu, tree_memory=False)
            items.read()
            if kill_after and not run.killed and items.count(0) >= kill_after:
                os.killpg(procs[0].pid, signal.SIGKILL)
                run.killed = True
            quiet = time.monotonic() - items.grew_at > 5
            if config.stop_when_complete and not stopping and (items.seen >= expected or quiet):
                stopping = True
                for p in procs:
                    if p.poll() is None:
                        os.killpg(p.pid, signal.SIGINT)
            if time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"{label}: ran past {timeout_s} s")
            time.sleep(0.1)
        run.wall_s = time.time() - started
        for i, p in enumerate(procs):
            if p.returncode != 0 and not (run.killed and i == 0):
                text = Path(tmp, f"log{i}.txt").read_text()
                raise RuntimeError(f"{label}: process {i} exited {p.returncode}:\n"
                                   f"{text[-4000:]}")
        rows = items.rows()
        run.stats = [json.loads(path.read_text())
                     for path in Path(tmp).glob("stats*.json")]
    urls = [row["url"] for row in rows]
    run.pages = len(set(urls))
    run.repeats = len(urls) - run.pages
    run.missing = len(expected - set(urls))
    run.span_s = max(row["at"] for row in rows) - started
    run.cpu_s = sum(cpu.values())
    if config.redis is not None:
        after = redis_info(config.redis)
        run.redis = {key: after[key] - before[key] for key in after}
        # The info calls themselves: 3 commands each, before and after.
        run.redis["commands"] -= 6
        trips = sum(s.get("speedup/frontier/round_trip_count", 0) for s in run.stats)
        # scrapy-redis sends one command a round trip, but for its pop (MULTI,
        # ZRANGE, ZREMRANGEBYRANK, EXEC in one round trip).
        run.redis["round_trips"] = trips if trips else \
            run.redis["commands"] - 3 * run.redis["exec"]
    return run


def throughput(site: GraphSite, redis: RedisServer, count: int, *, url: str = "",
               title: str = "a. Plain I/O crawl") -> dict[str, Any]:
    """Part a, or with *url* (a proxy to *redis*) part e."""
    url = url or redis.url

    def ours(machines: int) -> Config:
        return Config("links_stamped", {**GRAPH, "SPEEDUP_FRONTIER_URL": url}, machines, redis)

    def theirs(processes: int) -> Config:
        return Config("links_scrapy_redis", {**GRAPH, **SCRAPY_REDIS, "REDIS_URL": url},
                      processes, redis, stop_when_complete=True)

    configs = {
        "vanilla Scrapy, 1 process": Config("links_stamped", {**GRAPH, **VANILLA}, 1, None),
        "scrapy-speedup frontier, 1 machine": ours(1),
        "scrapy-speedup frontier, 2 machines": ours(2),
        "scrapy-redis, 1 process": theirs(1),
        "scrapy-redis, 2 processes": theirs(2),
    }
    runs: dict[str, list[Fleet]] = {label: [] for label in configs}
    labels = list(configs)
    scaling = machine_scaling()
    for i in range(count):
        print(f"  {title}, round {i + 1}/{count}", flush=True)
        for label in labels[i % len(labels):] + labels[:i % len(labels)]:
            runs[label].append(fleet(label, site, configs[label]))
    print(f"\n{title} ({site.pages} pages, {site.links} links a page,"
          f" {site.latency_ms:g} ms latency, 64 concurrent a process)")
    print(f"{'':38} {'pages':>5} {'span':>8} {'x van.':>7} {'end-end':>8} {'cmds':>6}"
          f" {'trips':>6} {'bytes':>7} {'redis':>6}")
    print(f"{'':38} {'':>5} {'pages/s':>8} {'':>7} {'pages/s':>8} {'/page':>6}"
          f" {'/page':>6} {'/page':>7} {'us/pg':>6}")
    base = runs[labels[0]]
    out: dict[str, Any] = {}
    for label, fleets in runs.items():
        ratios = [f.pages_per_s / b.pages_per_s for f, b in zip(fleets, base, strict=True)]
        end_ratios = [f.end_to_end_pages_per_s / b.end_to_end_pages_per_s
                      for f, b in zip(fleets, base, strict=True)]
        m = sorted(fleets, key=lambda f: f.pages_per_s)[len(fleets) // 2]
        print(f"{label:38} {m.pages:5d} {m.pages_per_s:8.1f} {statistics.median(ratios):6.2f}x"
              f" {m.end_to_end_pages_per_s:8.1f} {m.per_page('commands'):6.2f}"
              f" {m.per_page('round_trips'):6.3f}"
              f" {m.per_page('bytes_in') + m.per_page('bytes_out'):7.0f}"
              f" {m.per_page('cpu_ms') * 1000:6.0f}")
        out[label] = {**m.summary(), "ratio_to_vanilla": round(statistics.median(ratios), 3),
                      "ratio_rounds": [round(r, 3) for r in ratios],
                      "end_to_end_ratio": round(statistics.median(end_ratios), 3),
                      "rounds": [f.summary() for f in fleets]}
        bad = [f for f in fleets if f.missing or f.repeats]
        for f in bad:
            print(f"!!!!! {label}: {f.missing} pages missing, {f.repeats} scraped twice !!!!!")
    for n in (1, 2):
        ours_label = f"scrapy-speedup frontier, {n} machine{'s' if n > 1 else ''}"
        theirs_label = f"scrapy-redis, {n} process{'es' if n > 1 else ''}"
        per_round = [a.pages_per_s / b.pages_per_s
                     for a, b in zip(runs[ours_label], runs[theirs_label], strict=True)]
        out[f"ours_over_scrapy_redis_{n}"] = round(statistics.median(per_round), 3)
        print(f"  {n} process(es): the frontier / scrapy-redis, pages/s over the span:"
              f" {statistics.median(per_round):.2f}x (rounds"
              f" {[round(r, 2) for r in per_round]})")
    print(f"  the machine's 2-process scaling, measured before this part: {scaling:.2f}x")
    out["scaling"] = round(scaling, 3)
    return out


def kill(site: GraphSite, redis: RedisServer) -> dict[str, Any]:
    print("  kill -9 of one of two processes", flush=True)
    ours = fleet("scrapy-speedup frontier, 2 machines, one killed", site, Config(
        "links_stamped", {**GRAPH, "SPEEDUP_FRONTIER_URL": redis.url,
                          "SPEEDUP_FRONTIER_VISIBILITY_TIMEOUT_SECONDS": 10}, 2, redis),
        kill_after=KILL_AFTER_PAGES)
    theirs = fleet("scrapy-redis, 2 processes, one killed", site, Config(
        "links_scrapy_redis", {**GRAPH, **SCRAPY_REDIS, "REDIS_URL": redis.url}, 2, redis,
        stop_when_complete=True), kill_after=KILL_AFTER_PAGES)
    print(f"\nb. kill -9 of one of two processes after it scraped {KILL_AFTER_PAGES} pages"
          f" ({len(site.expected_urls())} pages to crawl)")
    out = {}
    for run in (ours, theirs):
        print(f"  {run.label}: {run.missing} pages lost, {run.repeats} scraped twice,"
              f" {run.pages} pages in the union ({run.span_s:.1f} s)")
        out[run.label] = run.summary()
    return out


async def _drive_store(url: str, total: int, sites: int, batch: int) -> dict[str, float]:
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    store = FrontierStore(client, "bench")
    blob = b"x" * 420  # a pickled Request.to_dict of a graph page is ~420 bytes
    entries = [Entry(f"fp{n}".encode(), f"site{n % sites}.example", 8, 0.0, 0, blob)
               for n in range(total)]
    started = time.perf_counter()
    cpu_started = time.process_time()
    for i in range(0, total, 1000):
        await store.push(entries[i:i + 1000], now=0)
    pushed = time.perf_counter()
    leased = 0
    while True:
        got = await store.lease("m1", batch, 60, now=1)
        if not got:
            break
        ids = [item.id for item in got]
        await store.release(ids, now=1)
        await store.ack(ids, now=1)
        leased += len(got)
    ended = time.perf_counter()
    client_cpu = time.process_time() - cpu_started
    await client.aclose()
    assert leased == total, (leased, total)
    return {"push_s": pushed - started, "lease_ack_s": ended - pushed,
            "client_cpu_s": client_cpu}


def store_alone(redis: RedisServer, total: int) -> dict[str, Any]:
    flush(redis)
    before = redis_info(redis)
    timing = asyncio.run(_drive_store(redis.url, total, 100, 64))
    after = redis_info(redis)
    redis_cpu_ms = after["cpu_ms"] - before["cpu_ms"]
    per_s = total / timing["lease_ack_s"]
    redis_us = redis_cpu_ms * 1000 / total
    print(f"\nc. The frontier alone ({total} requests of 100 sites, pushed 1,000 a call, then"
          " leased 64 a call, each released and acknowledged)")
    print(f"  push: {total / timing['push_s']:,.0f} requests/s; lease + release + ack:"
          f" {per_s:,.0f} requests/s from one client")
    print(f"  Redis's CPU (push, lease, release, ack): {redis_us:.1f} us a request:"
          f" {1e6 / redis_us:,.0f} requests/s on one Redis core")
    return {"requests": total, "push_per_s": round(total / timing["push_s"]),
            "lease_release_ack_per_s": round(per_s),
            "redis_cpu_us_per_request": round(redis_us, 2),
            "redis_core_requests_per_s": round(1e6 / redis_us),
            "client_cpu_us_per_request": round(timing["client_cpu_s"] * 1e6 / total, 1)}


def bounds(a: dict[str, Any]) -> dict[str, Any]:
    two = a["scrapy-speedup frontier, 2 machines"]
    cpu_us = two["redis_per_page"]["cpu_ms"] * 1000
    per_machine = a["scrapy-speedup frontier, 1 machine"]["pages_per_s"]
    capacity = 1e6 / cpu_us
    print(f"\nd. Bounds: Redis spent {cpu_us:.0f} us of CPU a page in the 2-machine crawl"
          f" (every operation, the ticks and the stats): one Redis core serves"
          f" ~{capacity:,.0f} pages/s")
    out: dict[str, Any] = {"redis_cpu_us_per_page": round(cpu_us, 1),
                           "redis_core_pages_per_s": round(capacity),
                           "machine_pages_per_s": per_machine}
    for machines in (10, 100):
        demand = machines * per_machine
        print(f"  {machines} machines at {per_machine:.0f} pages/s each (one machine here):"
              f" {demand:,.0f} pages/s = {demand / capacity:.0%} of one Redis core")
        out[f"{machines}_machines_share_of_redis_core"] = round(demand / capacity, 3)
    out["machines_one_redis_core_serves"] = round(capacity / per_machine)
    print(f"  one Redis core keeps up with ~{capacity / per_machine:.0f} such machines")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds; odd, for a median")
    parser.add_argument("--quick", action="store_true",
                        help="one round, a smaller site: a check that it all runs")
    parser.add_argument("--parts", default="abcde", help="which parts to run")
    args = parser.parse_args()
    count = 1 if args.quick else args.rounds
    pages = 500 if args.quick else 2000
    results: dict[str, Any] = {"cores": os.cpu_count(), "rounds": count, "quick": args.quick}
    started = time.monotonic()
    with redis_server(durable=False) as redis, GraphSite(pages, 10, 20) as site:
        if "a" in args.parts:
            results["throughput"] = throughput(site, redis, count)
        if "b" in args.parts:
            results["kill"] = kill(site, redis)
        if "e" in args.parts:
            proxy = LaggyProxy(redis.port, 0.0005)
            try:
                rtt = proxy.round_trip_ms()
                print(f"\n  a round trip to Redis through the proxy: {rtt:.2f} ms", flush=True)
                results["remote"] = {"round_trip_ms": round(rtt, 3), **throughput(
                    site, redis, count, url=proxy.url,
                    title=f"e. Redis on another host (round trip {rtt:.1f} ms)")}
            finally:
                proxy.close()
        if "c" in args.parts:
            results["store"] = store_alone(redis, 5000 if args.quick else 50000)
        if "d" in args.parts and "throughput" in results:
            results["bounds"] = bounds(results["throughput"])
    print(f"\n{time.monotonic() - started:.0f} s in all")
    write_results("redis_frontier" + ("-quick" if args.quick else ""), results)


if __name__ == "__main__":
    main()
