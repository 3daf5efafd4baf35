"""Serve the demo catalogue on 127.0.0.1 with a fixed latency per response.

Run ``python -m scrapy_speedup.demo --products 2000 --latency-ms 20``; it
prints ``listening on http://127.0.0.1:PORT`` once it accepts connections.

``POST /api/items`` is a stand-in for the API a pipeline sends items to: it
answers ``{"stored": true}`` after ``--api-latency-ms``.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import TYPE_CHECKING, Any

from twisted.internet import reactor as _reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from scrapy_speedup.demo.catalogue import index_page, product_page

if TYPE_CHECKING:
    from twisted.web.server import Request

__all__ = ["CatalogueResource", "main", "serve"]

# The installed reactor, whose interface the stubs cannot know.
reactor: Any = _reactor

_INDEX = re.compile(rb"^/catalogue/page-(\d+)\.html$")
_PRODUCT = re.compile(rb"^/product/(\d+)\.html$")


class CatalogueResource(Resource):
    isLeaf = True  # noqa: N815 - Twisted's name

    def __init__(self, products: int, latency_s: float, api_latency_s: float = 0.05) -> None:
        super().__init__()
        self.products = products
        self.latency_s = latency_s
        self.api_latency_s = api_latency_s
        self._cache: dict[bytes, bytes | None] = {}

    def _page(self, path: bytes) -> bytes | None:
        if path not in self._cache:
            if path == b"/":
                body = index_page(1, self.products)
            elif m := _INDEX.match(path):
                body = index_page(int(m[1]), self.products)
            elif m := _PRODUCT.match(path):
                body = product_page(int(m[1]), self.products)
            else:
                body = None
            self._cache[path] = body
        return self._cache[path]

    def render_GET(self, request: Request) -> int:  # noqa: N802 - Twisted's name
        body = self._page(request.path)
        reactor.callLater(self.latency_s, self._respond, request, body)
        return NOT_DONE_YET

    def render_POST(self, request: Request) -> int | bytes:  # noqa: N802 - Twisted's name
        if request.path != b"/api/items":
            request.setResponseCode(404)
            return b"{}"
        reactor.callLater(self.api_latency_s, self._respond, request, b'{"stored": true}')
        return NOT_DONE_YET

    @staticmethod
    def _respond(request: Request, body: bytes | None) -> None:
        if request.finished or request._disconnected:
            return
        if body is None:
            request.setResponseCode(404)
            body = b"<html><body><h1>Not found</h1></body></html>"
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.write(body)
        request.finish()


class _QuietSite(Site):
    def log(self, request: Any) -> None:
        """No access log: the benchmarks make thousands of requests."""


def serve(resource: Resource, port: int) -> None:
    """Serve *resource* on 127.0.0.1:*port* (0: a free port) until killed;
    prints ``listening on http://127.0.0.1:PORT`` first, for whoever started it."""
    site = _QuietSite(resource)
    site.noisy = False
    listening = reactor.listenTCP(port, site, backlog=1024, interface="127.0.0.1")
    print(f"listening on http://127.0.0.1:{listening.getHost().port}", flush=True)
    reactor.run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--products", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--api-latency-ms", type=float, default=50.0)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)
    serve(
        CatalogueResource(args.products, args.latency_ms / 1000, args.api_latency_ms / 1000),
        args.port,
    )
    sys.exit(0)
