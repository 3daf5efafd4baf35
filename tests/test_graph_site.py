from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urljoin

import pytest
from parsel import Selector

from scrapy_speedup.demo.graph import expected_pages, links_of


@contextmanager
def graph_site(*args: str) -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "scrapy_speedup.demo.graph", *args],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # blocks until it listens (or dies)
        match = re.search(r"listening on (http://\S+)", line)
        assert match, f"the graph site did not start: {line!r}"
        yield match[1]
    finally:
        process.terminate()
        process.wait(10)


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


@pytest.mark.parametrize("shape", ["tree", "random"])
def test_links_are_deterministic_and_in_the_site(shape: str) -> None:
    graph = links_of(300, 4, 0.5, 7, shape)
    assert graph == links_of(300, 4, 0.5, 7, shape)
    assert all(0 <= t < 300 for targets in graph for t in targets)
    assert links_of(300, 4, 0.5, 8, shape) != graph


def test_tree_reaches_every_page_and_random_has_dead_ends_and_a_late_chain() -> None:
    assert expected_pages(500, 3, 0.9, 1, "tree") == {f"/p/{i}" for i in range(500)}
    graph = links_of(500, 3, 0.9, 1, "random")
    assert sum(1 for targets in graph if not targets) >= 50
    # The last tenth is a chain: each page is linked only from the one before it.
    assert all(graph[i] == (i + 1,) for i in range(450, 499))
    assert not any(t > 450 for targets in graph[:450] for t in targets)


@pytest.mark.parametrize("shape", ["tree", "random"])
def test_crawl_of_the_served_site_finds_the_expected_pages(shape: str) -> None:
    with graph_site("--pages", "120", "--links", "3", "--latency-ms", "0",
                    "--seed", "5", "--shape", shape) as url:
        seen, todo = {"/p/0"}, ["/p/0"]
        while todo:
            page = Selector(text=get(url + todo.pop()).decode())
            assert page.css("h1::text").get() is not None
            for href in page.css("a::attr(href)").getall():
                path = urljoin("/p/0", href)
                if path not in seen:
                    seen.add(path)
                    todo.append(path)
        assert seen == expected_pages(120, 3, 0.9, 5, shape)
        stats = json.loads(get(url + "/stats"))
        assert stats["distinct_pages"] == stats["requests"] == len(seen)
        assert stats["repeated_pages"] == 0


def test_stats_record_the_most_requests_in_flight() -> None:
    with graph_site("--pages", "50", "--links", "2", "--latency-ms", "300") as url:
        port_url = url.replace("127.0.0.1", "localhost")
        barrier = threading.Barrier(5)
        errors: list[OSError] = []

        def fetch(base: str, page: int) -> None:
            try:
                barrier.wait(10)
                get(f"{base}/p/{page}")
            except OSError as exc:  # asserted in the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=fetch, args=(url, i)) for i in range(3)]
        threads += [threading.Thread(target=fetch, args=(port_url, i)) for i in range(3, 5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert not errors
        stats = json.loads(get(url + "/stats"))
        assert stats["in_flight_max"] == 5
        assert stats["in_flight"] == 0
        host = url.removeprefix("http://")
        assert stats["in_flight_max_per_host"] == {host: 3, "localhost" + host[9:]: 2}
        assert stats["requests"] == 5
        get(url + "/p/1")
        get(url + "/p/1")
        stats = json.loads(get(url + "/stats"))
        assert stats["repeated_pages"] == 1
        reset = json.loads(get(url + "/stats/reset"))
        assert reset["in_flight_max"] == 0 and reset["requests"] == 0
        assert reset["in_flight_max_per_host"] == {}
