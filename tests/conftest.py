"""Fixtures: a real demo site on 127.0.0.1, the three runtimes, and real
``scrapy crawl`` subprocesses whose stats, items and log the tests read."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.postgres_server import postgres_server

PROJECT = Path(__file__).parent / "project"
REPO = Path(__file__).parent.parent

#: Settings that select each runtime scrapy-speedup supports.
RUNTIMES: dict[str, dict[str, str]] = {
    "asyncio": {},
    "epoll": {"TWISTED_REACTOR": "twisted.internet.epollreactor.EPollReactor"},
    "reactorless": {"TWISTED_REACTOR_ENABLED": "False"},
}


@dataclass
class DemoSite:
    """A site server subprocess; ``with`` stops it."""

    url: str
    process: subprocess.Popen[str]

    def __enter__(self) -> DemoSite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(10)


def start_demo_site(products: int, latency_ms: float) -> DemoSite:
    process = subprocess.Popen(
        [sys.executable, "-m", "scrapy_speedup.demo", "--products", str(products),
         "--latency-ms", str(latency_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # blocks until it listens (or dies)
    match = re.search(r"listening on (http://\S+)", line)
    if not match:
        process.kill()
        raise RuntimeError(f"demo site did not start: {line!r}")
    return DemoSite(match[1], process)


@pytest.fixture(scope="session")
def demo_site() -> Iterator[DemoSite]:
    site = start_demo_site(products=500, latency_ms=5)
    yield site
    site.process.terminate()
    site.process.wait(10)


@pytest.fixture(params=list(RUNTIMES))
def runtime(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class CrawlResult:
    returncode: int
    log: str
    stats: dict[str, Any]
    items: list[dict[str, Any]]
    descendants: set[int] = field(default_factory=set)

    def stat(self, name: str) -> int:
        return int(self.stats.get(name, 0))

    def alive_descendants(self, grace: float = 5.0) -> list[int]:
        """Descendants still running *grace* seconds after the crawl exited
        (the fork server and resource tracker exit when they see it gone)."""
        processes = []
        for pid in self.descendants:
            try:
                processes.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(processes, timeout=grace)
        return [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE]


# A test whose assertion is a rate or a duration on a shared machine (an
# adaptive limit, the doctor's block lengths, a site's peak concurrency) may
# run a second time when it fails; a test of correctness (items lost or
# doubled, a hang) never does. `make test` counts the reruns ("R" in its
# progress, "N rerun" at the end).
timing = pytest.mark.flaky(reruns=1, reruns_delay=1)


class Crawl:
    """A ``scrapy crawl`` subprocess of the test project."""

    def __init__(
        self,
        tmp_path: Path,
        spider: str = "products",
        *,
        settings: dict[str, Any] | None = None,
        args: dict[str, Any] | None = None,
        runtime: str = "asyncio",
    ) -> None:
        self.stats_file = tmp_path / "stats.json"
        self.items_file = tmp_path / "items.jsonl"
        self.log_file = tmp_path / "crawl.log"
        all_settings = {**RUNTIMES[runtime], **(settings or {})}
        cmd = [sys.executable, "-m", "scrapy", "crawl", spider,
               "-o", f"{self.items_file}:jsonlines",
               "-s", f"TEST_STATS_FILE={self.stats_file}"]
        for key, value in all_settings.items():
            text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
            cmd += ["-s", f"{key}={text}"]
        for key, value in (args or {}).items():
            cmd += ["-a", f"{key}={value}"]
        env = {**os.environ, "PYTHONPATH": f"{PROJECT}{os.pathsep}{REPO}"}
        self._log = open(self.log_file, "w")
        # A process group of its own, as a crawl started in a terminal has:
        # Ctrl-C there signals the whole group (workers, fork server).
        self.process = subprocess.Popen(
            cmd, cwd=PROJECT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            process_group=0,
        )
        self.descendants: set[int] = set()

    def track_descendants(self) -> set[int]:
        try:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                self.descendants.add(child.pid)
        except psutil.NoSuchProcess:
            pass
        return self.descendants

    def wait_for_log(self, pattern: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.track_descendants()
            if re.search(pattern, self.log_file.read_text()):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not in the log:\n{self.log_file.read_text()}")

    def interrupt(self, signum: int = signal.SIGINT) -> None:
        """Ctrl-C in the crawl's terminal (SIGINT to its whole process group),
        or with SIGTERM what systemd's stop and ``kill -- -PGID`` do."""
        self.track_descendants()
        os.killpg(self.process.pid, signum)

    def result(self, timeout: float = 90) -> CrawlResult:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"crawl still running after {timeout} s:\n"
                                     f"{self.log_file.read_text()}")
            self.track_descendants()
            time.sleep(0.05)
        self._log.close()
        stats = json.loads(self.stats_file.read_text()) if self.stats_file.exists() else {}
        items = []
        if self.items_file.exists():
            items = [json.loads(line) for line in self.items_file.read_text().splitlines()]
        return CrawlResult(self.process.returncode, self.log_file.read_text(), stats, items,
                           self.descendants)


def run_crawl(tmp_path: Path, *, timeout: float = 90, **kwargs: Any) -> CrawlResult:
    return Crawl(tmp_path, **kwargs).result(timeout)


def assert_process_stats_add_up(result: CrawlResult) -> None:
    """Every task ends succeeded, dropped, errored, abandoned or cancelled."""
    s = result.stat
    ended = (s("speedup/process/succeeded_count") + s("speedup/process/dropped_count")
             + s("speedup/process/error_count") + s("speedup/process/abandoned_count")
             + s("speedup/process/cancelled_count"))
    assert s("speedup/process/task_count") == ended, result.stats


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A real PostgreSQL server on 127.0.0.1, started for the tests.

    ``make test`` installs Debian's postgresql where it is missing; without it
    the tests that need it are skipped, except on CI, where they fail.
    """
    with postgres_server() as server:
        yield server.dsn


def start_capacity_site(capacity: int, latency_ms: float,
                        halve_after_s: float | None = None) -> DemoSite:
    cmd = [sys.executable, "-m", "scrapy_speedup.demo.capacity", "--capacity", str(capacity),
           "--latency-ms", str(latency_ms)]
    if halve_after_s is not None:
        cmd += ["--halve-after-s", str(halve_after_s)]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    match = re.search(r"listening on (http://\S+)", process.stdout.readline())
    if not match:
        process.kill()
        raise RuntimeError("the capacity site did not start")
    return DemoSite(match[1], process)


@pytest.fixture(scope="session")
def follow_whole(demo_site: DemoSite, tmp_path_factory: pytest.TempPathFactory) -> CrawlResult:
    """The demo site crawled by the ``follow`` spider in one process: what a
    crawl of engine processes must match."""
    result = run_crawl(tmp_path_factory.mktemp("follow-whole"), spider="follow",
                       args={"site": demo_site.url})
    assert result.returncode == 0, result.log
    return result
