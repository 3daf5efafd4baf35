"""A local server with a capacity, for testing and benchmarking concurrency.

It serves at most ``--capacity`` requests at once, each after ``--latency-ms``;
the next ``--capacity`` requests wait in a queue; beyond that it answers 503
at once, with ``Retry-After: 1``. With ``--halve-after-s T`` its capacity
halves T seconds after the first request. Pages link nowhere: crawlers request
``/page/N`` for the N they want.

Other paths, for tests of what a hostile site does:

* ``/redirect/N``: a 302 to ``/page/N``, at once;
* ``/unavailable/N``: a 503, at once, for ever (a site that is down); with
  ``?retry_after=V`` it sends ``Retry-After: V`` as given, with
  ``?retry_after_in=S`` an HTTP date S seconds from now;
* ``/stall/N``: never answers (for download timeouts);
* ``/stats``: ``served``, ``rejected``, ``capacity`` and ``peak`` (the most
  ``/page`` requests served or queued at once) as JSON.

Run ``python -m scrapy_speedup.demo.capacity --capacity 6 --latency-ms 50``;
it prints ``listening on http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import deque
from email.utils import formatdate
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from scrapy_speedup.demo.site import serve

__all__ = ["CapacityResource", "main"]

reactor: Any = _reactor  # the installed reactor; the stubs cannot know it


class CapacityResource(Resource):
    isLeaf = True  # noqa: N815 - Twisted's name

    def __init__(
        self,
        capacity: int,
        latency_s: float,
        halve_after_s: float | None = None,
        *,
        record: bool = False,
    ) -> None:
        super().__init__()
        self.capacity = capacity
        self.latency_s = latency_s
        self.halve_after_s = halve_after_s
        self.active = 0
        self.queue: deque[Any] = deque()
        self.served = self.rejected = self.peak = 0
        self._started = False
        #: With ``record``: (time.monotonic(), path) of every request, as it arrived.
        self.arrivals: list[tuple[float, bytes]] | None = [] if record else None
        self.stalled: list[Any] = []

    def render_GET(self, request: Any) -> bytes | int:  # noqa: N802 - Twisted's name
        if not self._started and self.halve_after_s is not None:
            reactor.callLater(self.halve_after_s, self._halve)
        self._started = True
        path = request.path
        if self.arrivals is not None:
            self.arrivals.append((time.monotonic(), path))
        if path == b"/stats":
            return json.dumps({"served": self.served, "rejected": self.rejected,
                               "capacity": self.capacity, "peak": self.peak}).encode()
        if path.startswith(b"/redirect/"):
            request.redirect(b"/page/" + path[len(b"/redirect/"):])
            return b""
        if path.startswith(b"/unavailable/"):
            return self._unavailable(request)
        if path.startswith(b"/stall/"):
            self.stalled.append(request)
            request.notifyFinish().addBoth(lambda _: self.stalled.remove(request))
            return NOT_DONE_YET
        if self.active < self.capacity:
            self._serve(request)
            self.peak = max(self.peak, self.active + len(self.queue))
        elif len(self.queue) < self.capacity:
            self.queue.append(request)
            self.peak = max(self.peak, self.active + len(self.queue))
        else:
            self.rejected += 1
            request.setResponseCode(503)
            request.setHeader(b"retry-after", b"1")
            return b"<html><body>Busy</body></html>"
        return NOT_DONE_YET

    def _unavailable(self, request: Any) -> bytes:
        request.setResponseCode(503)
        if b"retry_after" in request.args:
            request.setHeader(b"retry-after", request.args[b"retry_after"][0])
        elif b"retry_after_in" in request.args:
            when = time.time() + float(request.args[b"retry_after_in"][0])
            request.setHeader(b"retry-after", formatdate(when, usegmt=True).encode())
        return b"<html><body>Down</body></html>"

    def requests_to(self, path: bytes) -> list[float]:
        """When requests for *path* arrived (``record`` must be on)."""
        assert self.arrivals is not None, "CapacityResource(record=True) records arrivals"
        return [t for t, p in self.arrivals if p == path]

    def _halve(self) -> None:
        self.capacity = max(1, self.capacity // 2)

    def _serve(self, request: Any) -> None:
        self.active += 1
        reactor.callLater(self.latency_s, self._respond, request)

    def _respond(self, request: Any) -> None:
        self.active -= 1
        if not request._disconnected:
            self.served += 1
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            request.write(b"<html><body><p>%s</p></body></html>" % request.path)
            request.finish()
        while self.queue and self.active < self.capacity:
            waiting = self.queue.popleft()
            if not waiting._disconnected:
                self._serve(waiting)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--capacity", type=int, default=6)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--halve-after-s", type=float, default=None)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    serve(CapacityResource(args.capacity, args.latency_ms / 1000, args.halve_after_s), args.port)


if __name__ == "__main__":
    main()
