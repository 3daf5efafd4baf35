"""A local site that is a link graph, for testing and benchmarking crawls that
follow links.

Page ``/p/<i>`` (``i`` in ``0 .. N-1``) has a ``<h1>``, a line of text and
links to other pages, drawn from ``--seed``; the same arguments give the same
site. Two shapes:

* ``tree`` (the default): each page has ``--links`` K links. Its first
  ``K - round(K * D)`` links (at least one; D is ``--dup-share``) go to its
  children in a tree rooted at ``/p/0``, so that every page is reachable; the
  rest, and a leaf's links, go to pages drawn at random, which the tree
  already links to: with D = 0.9 and K = 10 each page has one child (a chain)
  and 9 random links, and about 90% of the site's links are duplicates.
* ``random``: a fifth of the pages link to nothing; the last tenth are a
  chain, each linking to the next, that only one other page enters (reachable
  only late); the other pages link to K pages drawn at random outside the
  chain. Some pages may be unreachable: :func:`expected_pages` says which are.

Each response is sent ``--latency-ms`` after its request arrived. The server
enforces nothing; it measures: ``/stats`` gives, as JSON, the requests for
pages it served, the distinct pages, and the most it had in flight at once,
overall and per ``Host`` header; ``/stats/reset`` sets them to zero.

Run ``python -m scrapy_speedup.demo.graph --pages 2000 --links 10
--latency-ms 20``; it prints ``listening on http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter, deque
from functools import lru_cache
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

__all__ = ["SHAPES", "GraphResource", "expected_pages", "links_of", "main", "page_html"]

SHAPES = ("tree", "random")
_PAGE = re.compile(rb"^/p/(\d+)$")


@lru_cache(maxsize=8)
def links_of(pages: int, links: int, dup_share: float = 0.9, seed: int = 0,
             shape: str = "tree") -> tuple[tuple[int, ...], ...]:
    """The targets of each page's links, by page number."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if not 0 <= dup_share <= 1:
        raise ValueError(f"dup_share must be between 0 and 1, got {dup_share!r}")
    rng = random.Random(seed)
    if shape == "tree":
        children = max(1, links - round(links * dup_share))
        graph = []
        for i in range(pages):
            tree = [c for c in range(i * children + 1, i * children + children + 1) if c < pages]
            graph.append(tuple(tree + [rng.randrange(pages) for _ in range(links - len(tree))]))
        return tuple(graph)
    chain_start = pages - max(1, pages // 10)
    graph = []
    for i in range(pages):
        if i >= chain_start:
            graph.append((i + 1,) if i + 1 < pages else ())
        elif i != 0 and rng.random() < 0.2:
            graph.append(())
        else:
            graph.append(tuple(rng.randrange(chain_start) for _ in range(links)))
    # The chain is entered from the last page a breadth-first crawl finds.
    entry = [i for i in _reachable(graph) if graph[i]][-1]
    graph[entry] = (*graph[entry], chain_start)
    return tuple(graph)


def _reachable(graph: list[tuple[int, ...]] | tuple[tuple[int, ...], ...]) -> list[int]:
    """Pages reachable from page 0, in breadth-first order."""
    order: list[int] = []
    seen, todo = {0}, deque([0])
    while todo:
        page = todo.popleft()
        order.append(page)
        for target in graph[page]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return order


def expected_pages(pages: int, links: int, dup_share: float = 0.9, seed: int = 0,
                   shape: str = "tree") -> set[str]:
    """The paths of the pages reachable from ``/p/0``: what a complete crawl
    of the site from there requests."""
    return {f"/p/{i}" for i in _reachable(links_of(pages, links, dup_share, seed, shape))}


def page_html(index: int, targets: tuple[int, ...]) -> bytes:
    anchors = "".join(f'<li><a href="/p/{t}">page {t}</a></li>' for t in targets)
    return (f"<html><head><title>Page {index}</title></head><body><h1>Page {index}</h1>"
            f"<p>Page {index} of the link graph, with {len(targets)} links.</p>"
            f"<ul>{anchors}</ul></body></html>").encode()


class GraphResource(Resource):
    isLeaf = True  # noqa: N815 - Twisted's name

    def __init__(self, pages: int, links: int, latency_s: float, *, dup_share: float = 0.9,
                 seed: int = 0, shape: str = "tree") -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted: no hints
        self.graph = links_of(pages, links, dup_share, seed, shape)
        self.latency_s = latency_s
        self.in_flight: Counter[bytes] = Counter()
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.served: Counter[int] = Counter()
        # What is in flight now stays counted: it was there at the reset too.
        self.in_flight_max = sum(self.in_flight.values())
        self.in_flight_max_per_host: Counter[bytes] = +self.in_flight

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "distinct_pages": len(self.served),
            "repeated_pages": sum(1 for n in self.served.values() if n > 1),
            "in_flight": sum(self.in_flight.values()),
            "in_flight_max": self.in_flight_max,
            "in_flight_max_per_host": {h.decode(errors="replace"): n
                                       for h, n in self.in_flight_max_per_host.items()},
        }

    def render_GET(self, request: Any) -> bytes | int:  # noqa: N802 - Twisted's name
        path = request.path
        if path in (b"/stats", b"/stats/reset"):
            if path == b"/stats/reset":
                self.reset()
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(self.stats()).encode()
        match = _PAGE.match(path)
        index = int(match[1]) if match else -1
        body = page_html(index, self.graph[index]) if 0 <= index < len(self.graph) else None
        host = request.getHeader(b"host") or b""
        self.requests += 1
        if body is not None:
            self.served[index] += 1
        self.in_flight[host] += 1
        self.in_flight_max = max(self.in_flight_max, sum(self.in_flight.values()))
        self.in_flight_max_per_host[host] = max(self.in_flight_max_per_host[host],
                                                self.in_flight[host])
        # Counted out once, whether the response is sent or the client leaves.
        request.notifyFinish().addBoth(lambda _: self.in_flight.subtract([host]))
        # Imported here: a crawl imports links_of() and must choose its reactor.
        from twisted.internet import reactor as installed

        reactor: Any = installed  # the stubs cannot know which one is installed
        reactor.callLater(self.latency_s, self._respond, request, body)
        return NOT_DONE_YET

    @staticmethod
    def _respond(request: Any, body: bytes | None) -> None:
        if request.finished or request._disconnected:
            return
        if body is None:
            request.setResponseCode(404)
            body = b"<html><body><h1>Not found</h1></body></html>"
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.write(body)
        request.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--links", type=int, default=10)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--dup-share", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", choices=SHAPES, default="tree")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)
    from scrapy_speedup.demo.site import serve

    serve(GraphResource(args.pages, args.links, args.latency_ms / 1000,
                        dup_share=args.dup_share, seed=args.seed, shape=args.shape), args.port)


if __name__ == "__main__":
    main()
