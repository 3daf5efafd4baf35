"""Engine processes that answer at once, for measuring the coordinator's
frontier where it is the bottleneck (``bench_frontier_capacity.py``).

An instant engine speaks the real protocol (:mod:`scrapy_speedup.crawl.protocol`)
over the real socket, and does for each lease what a real engine's Scrapy
does in ~9 ms, without the ~9 ms: it "downloads" the link-graph page of the
leased URL, releases and acknowledges the lease, and sends the page's links
that it has not sent before (a real engine drops those too), each as the bytes
of its ``Request.to_dict`` with its fingerprint, slot and priority; and with
``items`` one item a page. The requests are built once, before the engine says
it is ready, so that the engine's own cost is a dictionary lookup a link.
"""

from __future__ import annotations

import os
import pickle
import signal
import time
from typing import TYPE_CHECKING, Any

from scrapy import Request
from scrapy.pqueues import ScrapyPriorityQueue
from scrapy.utils.request import fingerprint

from scrapy_speedup.crawl.protocol import Close, Closed, Lease, Ready, Report, decode, encode
from scrapy_speedup.demo.graph import links_of
from scrapy_speedup.process.protocol import FrameReader, frame

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

_STATS_EVERY_S = 0.5


class ProjectPriorityQueue(ScrapyPriorityQueue):
    """Scrapy's priority queue under another name: a project's own, which
    makes the coordinator keep Scrapy's scheduler (the other frontier) and
    changes nothing else."""


def _requests(site: str, pages: int) -> list[tuple[bytes, bool, str, int, bytes]]:
    host = site.split("://", 1)[1].split("/", 1)[0].split(":", 1)[0]
    out = []
    for index in range(pages):
        request = Request(f"{site}/p/{index}")
        blob = pickle.dumps(request.to_dict(), protocol=pickle.HIGHEST_PROTOCOL)
        out.append((fingerprint(request), False, host, 0, blob))
    return out


def main(conn: Connection, spec_bytes: bytes, index: int) -> None:
    """What the coordinator starts instead of an engine process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec = pickle.loads(spec_bytes)
    kwargs: dict[str, Any] = spec.kwargs
    site = kwargs["site"].rstrip("/")
    pages = int(kwargs["graph_pages"])
    items = kwargs.get("items", "1") != "0"
    graph = links_of(pages, 10)
    requests = _requests(site, pages)
    fd = conn.fileno()
    os.set_blocking(fd, True)

    def send(message: Any) -> None:
        data = memoryview(frame(encode(message)))
        while data:
            data = data[os.write(fd, data):]

    sent: set[int] = set()
    received = 0
    stats_at = 0.0
    reader = FrameReader(spec.max_message_bytes)
    send(Ready(os.getpid()))
    while True:
        data = os.read(fd, 1 << 20)
        if not data:
            os._exit(0)
        for payload in reader.feed(data):
            message = decode(payload)
            if isinstance(message, Close):
                send(Closed({"response_received_count": received,
                             "item_scraped_count": received if items else 0}, []))
                os._exit(0)
            if not isinstance(message, Lease):
                continue
            report = Report()
            for lease_id, blob in message.entries:
                url = pickle.loads(blob)["url"]
                page = int(url.rpartition("/p/")[2])
                received += 1
                report.released.append((lease_id, 200, 0.0, None))
                for target in graph[page]:
                    if target not in sent:
                        sent.add(target)
                        report.requests.append(requests[target])
                if items:
                    report.items.append((lease_id, pickle.dumps(
                        {"url": url, "title": f"Page {page}"},
                        protocol=pickle.HIGHEST_PROTOCOL)))
                report.acked.append(lease_id)
            now = time.monotonic()
            if now - stats_at >= _STATS_EVERY_S:
                stats_at = now
                report.stats = {"response_received_count": received}
            send(report)
