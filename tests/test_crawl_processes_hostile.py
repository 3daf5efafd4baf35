"""Engine processes (SPEEDUP_CRAWL_PROCESSES) against what users and sites do:
errbacks, retries, cookies, odd requests, spider_idle feeders, JOBDIR,
crash loops, hung callbacks, bad settings. Whole ``scrapy crawl`` runs
against a real local server (:class:`Site`, in this process, on a thread).

The spiders are in tests/project/testproj/spiders_hostile.py."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from tests.conftest import REPO, Crawl, run_crawl

pytestmark = pytest.mark.subprocess

HOSTILE = "testproj.spiders_hostile"  # SPIDER_MODULES: getlist splits a string on commas
TWO: dict[str, Any] = {"SPEEDUP_CRAWL_PROCESSES": 2, "SPIDER_MODULES": HOSTILE}
ONE: dict[str, Any] = {"SPIDER_MODULES": HOSTILE}


class Site:
    """A threaded HTTP server that records what it is asked.

    ``/page/X``: a page, after ``latency_s``; ``/status/CODE/X``: that status;
    ``/login``: sets a session cookie; ``/private/X``: 200 with the cookie,
    403 without; ``/echo/X`` (any method): the method, body length and path;
    ``/redirect/X``: a 302 to ``/page/X``."""

    def __init__(self, latency_s: float = 0.01) -> None:
        self.latency_s = latency_s
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.arrivals: list[tuple[float, str]] = []
        self.active = 0
        self.peak = 0
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                site._handle(self)

            do_POST = do_GET  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        path = unquote(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        with self.lock:
            self.hits[path] += 1
            self.arrivals.append((time.monotonic(), path))
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            status, headers, content = 200, {}, b"<html><body>ok</body></html>"
            if path.startswith("/page/"):
                time.sleep(self.latency_s)
            elif path.startswith("/status/"):
                status = int(path.split("/")[2])
            elif path == "/login":
                headers["Set-Cookie"] = "session=ok; Path=/"
            elif path.startswith("/private/"):
                if "session=ok" not in (handler.headers.get("Cookie") or ""):
                    status = 403
            elif path.startswith("/echo/"):
                content = f"{handler.command} {len(body)} {path}".encode()
            elif path.startswith("/redirect/"):
                status, headers["Location"] = 302, "/page/" + path.split("/", 2)[2]
            else:
                status = 404
        finally:
            with self.lock:
                self.active -= 1
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Type", "text/html; charset=utf-8")
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        handler.wfile.write(content)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def site() -> Iterator[Site]:
    s = Site()
    yield s
    s.close()


def refused_url() -> str:
    """A port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def ok(result: Any) -> None:
    assert result.returncode == 0, result.log[-6000:]


# -- errbacks, retries, middlewares ------------------------------------------------

def test_each_errback_runs_once(site: Site, tmp_path: Path) -> None:
    """A refused port, a 500 after its retries, a 404: each request's errback
    runs once, and the 500s are tried 1 + RETRY_TIMES times at the site."""
    result = run_crawl(tmp_path, spider="h_errback", settings={**TWO, "RETRY_TIMES": 2},
                       args={"site": site.url, "refused": refused_url(), "count": 5},
                       timeout=60)
    ok(result)
    assert result.stats["finish_reason"] == "finished"
    seen = Counter((i["kind"], i["url"], i["errback"]) for i in result.items)
    assert max(seen.values()) == 1, seen
    kinds = Counter((i["kind"], i["errback"]) for i in result.items)
    assert kinds == {("refused", True): 5, ("500", True): 5, ("404", True): 5,
                     ("ok", False): 5}, kinds
    assert all(site.hits[f"/status/500/{n}"] == 3 for n in range(5)), site.hits
    assert all(site.hits[f"/status/404/{n}"] == 1 for n in range(5)), site.hits
    assert result.stats["retry/count"] == 5 * 2 + 5 * 2  # 500s and refused


def test_a_middleware_that_answers_or_ignores(site: Site, tmp_path: Path) -> None:
    """A downloader middleware returns a Response itself (a cache) or raises
    IgnoreRequest: callback or errback once each, and the crawl ends."""
    result = run_crawl(tmp_path, spider="h_dmw", settings=TWO,
                       args={"site": site.url, "count": 6}, timeout=60)
    ok(result)
    assert result.stats["finish_reason"] == "finished"
    kinds = Counter((i["kind"], i["errback"]) for i in result.items)
    assert kinds == {("fake", False): 6, ("ignore", True): 6, ("page", False): 6}, kinds
    assert not any(p.startswith(("/fake", "/ignore")) for p in site.hits), site.hits


def test_odd_requests_travel_intact(site: Site, tmp_path: Path) -> None:
    """POST with a 512 KiB body, bytes in meta and cb_kwargs, a non-ASCII
    URL, a header: the site and the callback see what the spider sent."""
    result = run_crawl(tmp_path, spider="h_odd", settings=TWO,
                       args={"site": site.url, "count": 8}, timeout=60)
    ok(result)
    assert sorted(i["n"] for i in result.items) == list(range(8))
    for item in result.items:
        assert item["meta_ok"] and item["blob_ok"], item
        assert item["echo"] == f"POST {512 * 1024} /echo/{item['n']}/é?q=日本&n={item['n']}", item


def test_cookies_of_a_login_hold_for_the_crawl(site: Site, tmp_path: Path) -> None:
    """Log in once (a session cookie), then crawl pages that need it: as in
    one process, every page is served, whichever engine downloads it."""
    (tmp_path / "one").mkdir()
    one = run_crawl(tmp_path / "one", spider="h_login", settings=ONE,
                    args={"site": site.url, "count": 20}, timeout=60)
    ok(one)
    assert all(i["ok"] for i in one.items) and len(one.items) == 20
    (tmp_path / "two").mkdir()
    two = run_crawl(tmp_path / "two", spider="h_login", settings=TWO,
                    args={"site": site.url, "count": 20}, timeout=60)
    ok(two)
    denied = sorted(i["url"] for i in two.items if not i["ok"])
    assert not denied, f"{len(denied)} of 20 pages refused for want of the session cookie"


# -- crashes and hangs -----------------------------------------------------------

def test_a_page_that_kills_its_engine_every_time_ends_the_crawl(site: Site,
                                                                tmp_path: Path) -> None:
    """A callback that SIGKILLs its own process on one page, every time: the
    crawl must end, bounded, with every other page crawled once and an error
    that names the page, not restart engines in a loop."""
    began = time.monotonic()
    result = run_crawl(tmp_path, spider="h_killer", settings=TWO,
                       args={"site": site.url, "count": 10, "kill_at": 3}, timeout=90)
    took = time.monotonic() - began
    urls = Counter(i["url"] for i in result.items)
    assert max(urls.values()) == 1, urls
    assert set(urls) == {f"{site.url}/page/{n}" for n in range(10) if n != 3}, urls
    assert "/page/3" in result.log, result.log[-3000:]
    assert took < 90, took


def test_every_engine_dead_then_replaced_the_crawl_goes_on(site: Site, tmp_path: Path) -> None:
    """Page 3 kills the engine that handles it, twice: both engines die (the
    second got page 3 back from the first) and are replaced. The pages they
    had downloaded went back to the frontier while no engine was there to
    take them: the replacements must get them."""
    kills = tmp_path / "kills"
    kills.mkdir()
    result = run_crawl(tmp_path, spider="h_killer", settings=TWO, timeout=60,
                       args={"site": site.url, "count": 10, "kill_at": 3, "kills": 2,
                             "kill_dir": kills})
    ok(result)
    assert result.stats["finish_reason"] == "finished"
    urls = Counter(i["url"] for i in result.items)
    assert set(urls) == {f"{site.url}/page/{n}" for n in range(10)}, urls
    assert max(urls.values()) == 1, urls
    assert result.stats["speedup/crawl/process_crash_count"] == 2


def test_every_engine_killed_at_once_loses_nothing(tmp_path: Path) -> None:
    """Both engines SIGKILLed at the same moment (the OOM killer, a
    container's memory limit): replacements start and the crawl goes on to
    the end, every page once."""
    site = Site(latency_s=0.05)
    try:
        crawl = Crawl(tmp_path, spider="h_pages",
                      settings={**TWO, "CONCURRENT_REQUESTS": 2, "LOG_LEVEL": "DEBUG"},
                      args={"site": site.url, "count": 60})
        crawl.wait_for_log(r"engine processes crawl for this one", timeout=60)
        log = crawl.log_file.read_text()
        pids = [int(p) for p in log.split("(pids ", 1)[1].split(")", 1)[0].split(", ")]
        crawl.wait_for_log(r"Crawled \(200\).*/page/", timeout=30)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        result = crawl.result(timeout=60)
    finally:
        site.close()
    ok(result)
    assert result.stats["finish_reason"] == "finished"
    ns = Counter(i["n"] for i in result.items)
    assert set(ns) == set(range(60)) and max(ns.values()) == 1, ns
    assert result.stats["speedup/crawl/process_crash_count"] == 2


# -- spider features ---------------------------------------------------------------

def test_a_spider_idle_feeder_goes_on_then_ends(site: Site, tmp_path: Path) -> None:
    """scrapy-redis style: spider_idle schedules more (engine.crawl) and
    raises DontCloseSpider, 3 times; then the crawl ends."""
    result = run_crawl(tmp_path, spider="h_idle", settings=TWO, timeout=60,
                       args={"site": site.url, "count": 5, "batches": 3})
    ok(result)
    assert result.stats["finish_reason"] == "finished"
    urls = Counter(i["url"] for i in result.items)
    assert len(urls) == 1 + 3 * 5 and max(urls.values()) == 1, urls


@pytest.mark.parametrize("processes", [1, 2])
def test_a_lazy_start_waits_for_room(site: Site, tmp_path: Path, processes: int) -> None:
    """Scrapy's recipe for a long start() (pause while the engine backs out,
    until scheduler_empty) keeps the scheduler nearly empty in one process:
    with engine processes too, on either frontier, not every start request
    read at once into the coordinator's memory."""
    from tests.test_crawl_processes import FRONTIERS

    for frontier, extra in FRONTIERS.items():
        (tmp_path / frontier).mkdir()
        result = run_crawl(tmp_path / frontier, spider="h_lazy_start", timeout=90,
                           settings={**TWO, **extra, "SPEEDUP_CRAWL_PROCESSES": processes,
                                     "CONCURRENT_REQUESTS": 4},
                           args={"site": site.url, "count": 200})
        ok(result)
        assert result.stats["finish_reason"] == "finished"
        assert len(result.items) == 200
        # One process: at most a request or two waiting at any time.
        assert result.stats["lazy/scheduled_max"] <= 4 * 2, (frontier, result.stats)
        if processes == 1:
            break  # no frontier of engine processes to choose


def test_a_link_is_crawled_while_its_pages_item_is_in_the_pipelines(site: Site,
                                                                   tmp_path: Path) -> None:
    """Page n links to page n + 1, and the engine's pipeline holds page n's
    item until page n + 1 is parsed: as in one process, the link is lent at
    once, on either frontier, not when page n is done with (which waits for
    that pipeline)."""
    _hold_items_until_the_next_page(site, tmp_path, chain=True)


def test_a_download_that_ends_frees_its_place_before_its_page_is_done(site: Site,
                                                                    tmp_path: Path) -> None:
    """CONCURRENT_REQUESTS = 1 and every page queued; the engine's pipeline
    holds page n's item until page n + 1 is parsed: as in one process, the
    place page n's download held is free when the download ends, on either
    frontier, not only when page n is done with (which waits for that
    pipeline)."""
    _hold_items_until_the_next_page(site, tmp_path, chain=False)


def _hold_items_until_the_next_page(site: Site, tmp_path: Path, *, chain: bool) -> None:
    from tests.test_crawl_processes import FRONTIERS

    for processes, (frontier, extra) in [(1, ("one", {})), *((2, f) for f in FRONTIERS.items())]:
        (tmp_path / frontier / "marks").mkdir(parents=True)
        result = run_crawl(tmp_path / frontier, spider="h_chain", timeout=60,
                           settings={**TWO, **extra, "SPEEDUP_CRAWL_PROCESSES": processes,
                                     "CONCURRENT_REQUESTS": 1 if not chain else 16},
                           args={"site": site.url, "count": 4, "wait_s": 3,
                                 "chain": int(chain), "mark_dir": tmp_path / frontier / "marks"})
        ok(result)
        assert result.stats["finish_reason"] == "finished"
        assert sorted(i["n"] for i in result.items) == [0, 1, 2, 3]
        late = [i["n"] for i in result.items if i.get("waited_out")]
        assert not late, f"{frontier}: page n+1 not crawled while item n was held, n in {late}"


def test_start_urls_and_an_item_that_does_not_pickle(site: Site, tmp_path: Path) -> None:
    """start_urls only (Scrapy's own start()); one item holds a lock. The
    others all arrive; the bad one is an error, counted, as in one process
    (where the feed cannot write it either)."""
    result = run_crawl(tmp_path, spider="h_start_urls", settings=TWO, timeout=60,
                       args={"site": site.url, "count": 10, "lock_at": 4})
    ok(result)
    assert result.stats["finish_reason"] == "finished"
    assert sorted(i["url"] for i in result.items) == sorted(
        f"{site.url}/page/{n}" for n in range(10) if n != 4)
    assert result.stats["speedup/crawl/item_unpicklable_count"] == 1
    assert "cannot be sent to the coordinator" in result.log


def test_closespider_errorcount_is_the_crawls(site: Site, tmp_path: Path) -> None:
    result = run_crawl(tmp_path, spider="h_raise",
                       settings={**TWO, "CLOSESPIDER_ERRORCOUNT": 5, "CONCURRENT_REQUESTS": 2},
                       args={"site": site.url, "count": 200}, timeout=60)
    ok(result)
    assert result.stats["finish_reason"] == "closespider_errorcount"
    assert 5 <= result.stats["spider_exceptions/count"] < 40, result.stats


def test_closespider_timeout_is_the_crawls(tmp_path: Path) -> None:
    site = Site(latency_s=0.2)
    try:
        began = time.monotonic()
        result = run_crawl(tmp_path, spider="h_pages",
                           settings={**TWO, "CLOSESPIDER_TIMEOUT": 3, "CONCURRENT_REQUESTS": 2},
                           args={"site": site.url, "count": 500}, timeout=60)
        took = time.monotonic() - began
    finally:
        site.close()
    ok(result)
    assert result.stats["finish_reason"] == "closespider_timeout"
    assert len(result.items) < 100
    assert took < 40, took


def test_spider_state_with_jobdir(site: Site, tmp_path: Path) -> None:
    """self.state (JOBDIR): callbacks that use it work, as in one process."""
    result = run_crawl(tmp_path, spider="h_state",
                       settings={**TWO, "JOBDIR": str(tmp_path / "job")},
                       args={"site": site.url, "count": 10}, timeout=60)
    ok(result)
    assert result.stats.get("spider_exceptions/AttributeError", 0) == 0, result.stats
    assert len(result.items) == 10


def test_jobdir_interrupted_then_resumed(tmp_path: Path) -> None:
    """JOBDIR, Ctrl-C once mid-crawl, then the same command again: the two
    runs together scrape every page exactly once."""
    site = Site(latency_s=0.05)
    job = str(tmp_path / "job")
    settings = {**TWO, "JOBDIR": job, "CONCURRENT_REQUESTS": 2, "LOG_LEVEL": "DEBUG"}
    try:
        (tmp_path / "a").mkdir()
        crawl = Crawl(tmp_path / "a", spider="h_pages", settings=settings,
                      args={"site": site.url, "count": 120})
        crawl.wait_for_log(r"Scraped from <200 \S+/page/(1[0-9])>", timeout=60)
        crawl.interrupt()
        first = crawl.result(timeout=60)
        (tmp_path / "b").mkdir()
        second = run_crawl(tmp_path / "b", spider="h_pages", settings=settings,
                           args={"site": site.url, "count": 120}, timeout=60)
    finally:
        site.close()
    ok(first)
    ok(second)
    assert first.stats["finish_reason"] == "shutdown"
    assert second.stats["finish_reason"] == "finished"
    ns = Counter(i["n"] for i in first.items + second.items)
    assert set(ns) == set(range(120)), sorted(set(range(120)) - set(ns))
    assert max(ns.values()) == 1, [n for n, c in ns.items() if c > 1]


# -- signals and bounds ----------------------------------------------------------------

def test_ctrl_c_while_the_engines_start(site: Site, tmp_path: Path) -> None:
    """Ctrl-C before the engine processes have opened their spiders: the
    crawl closes as any Ctrl-C'd crawl does (reason shutdown, stats dumped),
    and leaves no process behind."""
    crawl = Crawl(tmp_path, spider="h_pages", settings={**TWO, "SPEEDUP_CRAWL_PROCESSES": 4},
                  args={"site": site.url, "count": 50})
    crawl.wait_for_log(r"\n\S+ \S+ \[scrapy.core.engine\] INFO: Spider opened", timeout=30)
    assert "[engine" not in crawl.log_file.read_text().split("Spider opened")[0][-300:]
    crawl.interrupt()
    result = crawl.result(timeout=60)
    ok(result)
    assert result.stats.get("finish_reason") == "shutdown", result.log[-3000:]
    assert "Spider closed (shutdown)" in result.log
    assert not result.alive_descendants()


def test_ctrl_c_with_a_callback_stuck_in_a_cpu_loop(site: Site, tmp_path: Path) -> None:
    """One engine's callback never returns; Ctrl-C once: the crawl still
    ends, bounded (the stuck engine is killed after the shutdown timeout),
    with the other pages' items and no orphan."""
    marker = tmp_path / "spinning"
    crawl = Crawl(tmp_path, spider="h_spin",
                  settings={**TWO, "SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS": 1},
                  args={"site": site.url, "count": 10, "marker": marker})
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline and crawl.process.poll() is None:
        crawl.track_descendants()
        time.sleep(0.05)
    assert marker.exists(), crawl.log_file.read_text()[-3000:]
    time.sleep(1)  # the other engine finishes its pages
    began = time.monotonic()
    crawl.interrupt()
    result = crawl.result(timeout=60)
    took = time.monotonic() - began
    assert took < 30, took
    assert result.returncode in (0, 1), result.log[-3000:]
    assert result.stats.get("finish_reason") == "shutdown", result.log[-3000:]
    assert "had not closed" in result.log  # says which engine was killed, and why
    assert not result.alive_descendants()


def test_sigterm_to_the_group_closes_gracefully(tmp_path: Path) -> None:
    site = Site(latency_s=0.05)
    try:
        crawl = Crawl(tmp_path, spider="h_pages",
                      settings={**TWO, "CONCURRENT_REQUESTS": 2, "LOG_LEVEL": "DEBUG"},
                      args={"site": site.url, "count": 300})
        crawl.wait_for_log(r"Scraped from <200 \S+/page/1[0-9]>", timeout=60)
        crawl.interrupt(signal.SIGTERM)
        result = crawl.result(timeout=60)
    finally:
        site.close()
    ok(result)
    assert result.stats["finish_reason"] == "shutdown"
    ns = Counter(i["n"] for i in result.items)
    assert max(ns.values()) == 1
    assert result.stats["item_scraped_count"] == len(ns) == result.stats["response_received_count"]
    assert not result.alive_descendants()


# -- ways to start a crawl ----------------------------------------------------------

SCRIPT_SPIDER = '''
import os, sys, json
import scrapy


class ScriptSpider(scrapy.Spider):
    name = "script_spider"

    async def start(self):
        for n in range(12):
            yield scrapy.Request(f"{self.site}/page/{n}", cb_kwargs={"n": n})

    def parse(self, response, n):
        yield {"n": n, "pid": os.getpid()}
'''

SCRIPT_MAIN = '''
from scrapy.crawler import CrawlerProcess

if __name__ == "__main__":
    process = CrawlerProcess({
        "ADDONS": {"scrapy_speedup.Addon": 500},
        "SPEEDUP_CRAWL_PROCESSES": 2,
        "FEEDS": {sys.argv[2]: {"format": "jsonlines"}},
        "LOG_LEVEL": "INFO",
    })
    process.crawl(ScriptSpider, site=sys.argv[1])
    process.start()
'''


def run_script(tmp_path: Path, args: list[str], timeout: float = 60) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        done = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, text=True,
                              capture_output=True, timeout=timeout, start_new_session=True,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"still running after {timeout} s: {exc.stderr!r}") from None
    return done.returncode, done.stdout + done.stderr


def test_runspider_of_a_single_file(site: Site, tmp_path: Path) -> None:
    (tmp_path / "single.py").write_text(SCRIPT_SPIDER)
    out = tmp_path / "items.jsonl"
    rc, log = run_script(tmp_path, [
        "-m", "scrapy", "runspider", "single.py", "-a", f"site={site.url}",
        "-o", f"{out}:jsonlines", "-s", "ADDONS={\"scrapy_speedup.Addon\": 500}",
        "-s", "SPEEDUP_CRAWL_PROCESSES=2"])
    assert rc == 0, log[-4000:]
    items = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(i["n"] for i in items) == list(range(12)), log[-3000:]
    assert len({i["pid"] for i in items}) == 2


def test_crawler_process_script_with_the_spider_in_main(site: Site, tmp_path: Path) -> None:
    """The spider class defined in the script itself (``__main__``): either it
    works, or the crawl stops at once with an error that says to move the
    spider into an importable module."""
    (tmp_path / "script.py").write_text(SCRIPT_SPIDER + SCRIPT_MAIN)
    out = tmp_path / "items.jsonl"
    rc, log = run_script(tmp_path, ["script.py", site.url, str(out)])
    if rc == 0:
        items = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted(i["n"] for i in items) == list(range(12)), log[-3000:]
    else:
        assert "importable" in log or "module" in log, log[-4000:]


def test_a_setting_that_cannot_be_pickled_is_named(site: Site, tmp_path: Path) -> None:
    """A spider whose custom_settings hold a lambda: the crawl stops, and the
    error names the setting, once."""
    script = SCRIPT_SPIDER.replace(
        'name = "script_spider"',
        'name = "script_spider"\n    custom_settings = {"MY_HOOK": lambda x: x}')
    (tmp_path / "lam.py").write_text(script)
    rc, log = run_script(tmp_path, [
        "-m", "scrapy", "runspider", "lam.py", "-a", f"site={site.url}",
        "-s", "ADDONS={\"scrapy_speedup.Addon\": 500}", "-s", "SPEEDUP_CRAWL_PROCESSES=2"])
    assert rc != 0, log[-3000:]
    assert "MY_HOOK" in log and "cannot be sent to the engine processes" in log, log[-3000:]
    assert log.count("SpeedupSettingsError: SPEEDUP_CRAWL_PROCESSES: the setting MY_HOOK") == 1, \
        log[-5000:]


def test_a_crawl_pipeline_that_does_not_import(site: Site, tmp_path: Path) -> None:
    result = run_crawl(tmp_path, spider="h_pages",
                       settings={**TWO, "SPEEDUP_CRAWL_PIPELINES": {"testproj.nope.Missing": 100}},
                       args={"site": site.url, "count": 3}, timeout=60)
    assert result.returncode == 1, result.log[-3000:]
    assert "SPEEDUP_CRAWL_PIPELINES" in result.log and "testproj.nope.Missing" in result.log, \
        result.log[-3000:]
    assert not result.items


# -- politeness -------------------------------------------------------------------

def test_download_delay_holds_across_processes(site: Site, tmp_path: Path) -> None:
    """DOWNLOAD_DELAY 0.3 s, not randomized: the site never sees two requests
    closer than the delay (a little slack for the trip to the engine)."""
    result = run_crawl(tmp_path, spider="h_pages",
                       settings={**TWO, "DOWNLOAD_DELAY": 0.3, "RANDOMIZE_DOWNLOAD_DELAY": False},
                       args={"site": site.url, "count": 12}, timeout=60)
    ok(result)
    assert len(result.items) == 12
    times = sorted(t for t, p in site.arrivals if p.startswith("/page/"))
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.25, gaps


# -- the add-on's other parts inside engines -------------------------------------------

def test_run_in_process_in_a_callback_of_an_engine(site: Site, tmp_path: Path) -> None:
    result = run_crawl(tmp_path, spider="h_process", settings=TWO,
                       args={"site": site.url, "count": 12}, timeout=60)
    ok(result)
    assert sorted((i["n"], i["square"]) for i in result.items) == [(n, n * n) for n in range(12)]
    assert not result.alive_descendants()


def test_sqlite_pipeline_in_two_engines(site: Site, tmp_path: Path) -> None:
    """The SQLite pipeline of scrapy-speedup in the engines' ITEM_PIPELINES,
    one database file: every item is a row, exactly once, no lock error."""
    import sqlite3

    db = tmp_path / "items.sqlite3"
    result = run_crawl(tmp_path, spider="h_pages",
                       settings={**TWO, "ITEM_PIPELINES": {"scrapy_speedup.db.SQLitePipeline": 800},
                                 "SPEEDUP_SQLITE_PATH": str(db), "SPEEDUP_DB_BATCH_SIZE": 5},
                       args={"site": site.url, "count": 300}, timeout=90)
    ok(result)
    with sqlite3.connect(db) as conn:
        rows = Counter(n for (n,) in conn.execute("SELECT n FROM items"))
    assert set(rows) == set(range(300)) and max(rows.values()) == 1
    assert len(result.items) == 300
    assert "database is locked" not in result.log, result.log[-3000:]


def test_dbm_http_cache_keeps_every_engines_pages(site: Site, tmp_path: Path) -> None:
    """HTTPCACHE with Scrapy's DBM storage, one cache file for the crawl: either
    it is refused at once with an error naming HTTPCACHE_STORAGE, or a second
    run is served from the cache for every page of the first (as in one
    process), not only for those of the engine that closed last."""
    settings = {**TWO, "HTTPCACHE_ENABLED": True, "HTTPCACHE_DIR": str(tmp_path / "cache"),
                "HTTPCACHE_STORAGE": "scrapy.extensions.httpcache.DbmCacheStorage"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = run_crawl(tmp_path / "a", spider="h_pages", settings=settings,
                      args={"site": site.url, "count": 40}, timeout=60)
    if first.returncode != 0:
        assert "HTTPCACHE_STORAGE" in first.log and "FilesystemCacheStorage" in first.log, \
            first.log[-3000:]
        assert not site.hits  # refused before anything was downloaded
        return
    assert len(first.items) == 40
    served = sum(site.hits.values())
    second = run_crawl(tmp_path / "b", spider="h_pages", settings=settings,
                       args={"site": site.url, "count": 40}, timeout=60)
    ok(second)
    assert len(second.items) == 40
    assert sum(site.hits.values()) == served, \
        f"{sum(site.hits.values()) - served} of 40 pages not in the cache"


@pytest.mark.parametrize("processes", [1, 2])
def test_cache_hits_do_not_wait_for_the_download_delay(site: Site, tmp_path: Path,
                                                       processes: int) -> None:
    """HTTPCACHE hits never reach the download slot in Scrapy: a re-run from
    the cache is not paced by DOWNLOAD_DELAY (15 pages x 0.4 s = 6 s)."""
    settings = {**TWO, "SPEEDUP_CRAWL_PROCESSES": processes, "HTTPCACHE_ENABLED": True,
                "HTTPCACHE_DIR": str(tmp_path / "cache"), "DOWNLOAD_DELAY": 0.4,
                "RANDOMIZE_DOWNLOAD_DELAY": False}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = run_crawl(tmp_path / "a", spider="h_pages", settings=settings,
                      args={"site": site.url, "count": 15}, timeout=60)
    ok(first)
    second = run_crawl(tmp_path / "b", spider="h_pages", settings=settings,
                       args={"site": site.url, "count": 15}, timeout=60)
    ok(second)
    assert second.stats["httpcache/hit"] == 15
    assert second.stats["elapsed_time_seconds"] < 3, second.stats["elapsed_time_seconds"]
