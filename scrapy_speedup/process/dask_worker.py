"""What runs on the workers of a Dask cluster (``SPEEDUP_PROCESS_EXECUTOR =
"dask"``): the same tasks as in a local worker process, in the same format.

A crawl registers one :class:`CrawlPlugin` (named after the crawl) with the
cluster: each Dask worker, present or joining later (a replacement for one
that died), builds the crawl's ``SPEEDUP_PROCESS_PIPELINES`` once, as a local
worker process does. :func:`run` runs one pickled task and returns its
pickled :class:`~.protocol.Outcome`, exactly as the local pool's worker does
(:func:`~.local.run_task`), so the crawl settles it with the same code.

A worker runs the crawl's tasks one at a time (a lock): pipelines, and the
asyncio loop their coroutines run on, are not built for threads, and the
local pool gives each of its workers one task at a time too. Dask workers
started with several threads still run other clients' tasks alongside.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import threading
import traceback
from typing import TYPE_CHECKING, cast

from distributed import WorkerPlugin, get_worker

from scrapy_speedup.process import worker as local
from scrapy_speedup.process.protocol import Message, Stats

if TYPE_CHECKING:
    from distributed import Worker

    from scrapy_speedup.process.protocol import StatsOp

__all__ = ["CrawlPlugin", "close", "init_error", "run"]


class _StatsCollector:
    """Stands in for a local worker's socket: what :mod:`.worker` sends
    outside tasks (the stats of ``close_spider``) is kept here and returned
    by :func:`close`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes - 64
        self.ops: list[StatsOp] = []

    def send(self, message: Message) -> None:
        if isinstance(message, Stats):
            self.ops.extend(pickle.loads(message.ops))


class CrawlPlugin(WorkerPlugin):
    """The crawl's state on one Dask worker."""

    def __init__(self, name: str, spec: local.WorkerSpec) -> None:
        self.name = name
        self.spec = spec
        self.state: local._State | None = None
        self.error: str | None = None
        self.closed = False

    def setup(self, worker: Worker) -> None:
        # Made here: the plugin is pickled to reach the worker, a lock is not.
        self.lock = threading.Lock()
        # A cluster on this machine can import the project from where the
        # crawl does; a remote one must have it installed.
        roots = [r for r in self.spec.import_roots if os.path.isdir(r) and r not in sys.path]
        sys.path[:0] = roots
        collector = _StatsCollector(self.spec.max_message_bytes)
        state = local._State(self.spec, cast("local._Channel", collector))
        if self.spec.pipelines is not None:
            try:
                local._open_pipelines(state, pickle.loads(self.spec.pipelines))
            except Exception:
                self.error = traceback.format_exc()
                logging.getLogger(__name__).exception(
                    "scrapy-speedup: the crawl's pipelines could not start on this worker")
        self.state = state

    def teardown(self, worker: Worker) -> None:
        # The crawl closes its pipelines with close() and its reason first; a
        # worker that shuts down before closes them with this one.
        self.close("dask_worker_shutdown")

    def close(self, reason: str) -> list[StatsOp]:
        """Close the pipelines (once); the stats changes their close made."""
        if self.state is None:
            return []
        with self.lock:
            if self.closed:
                return []
            self.closed = True
            local._close_pipelines(self.state, reason)
            collector = cast("_StatsCollector", self.state.channel)
            return collector.ops


def _plugin(name: str, worker: Worker | None = None) -> CrawlPlugin:
    plugin = (worker or get_worker()).plugins.get(name)
    if not isinstance(plugin, CrawlPlugin):
        raise RuntimeError(f"this Dask worker has no scrapy-speedup plugin {name!r}")
    return plugin


def init_error(name: str, dask_worker: Worker) -> str | None:
    """The traceback of the pipelines' failure to start on this worker
    (run by ``Client.run``, which passes *dask_worker*)."""
    return _plugin(name, dask_worker).error


def run(name: str, body: bytes) -> bytes:
    """Run one task of the crawl *name*; its pickled Outcome."""
    plugin = _plugin(name)
    with plugin.lock:
        if plugin.error is not None or plugin.state is None:
            raise RuntimeError(f"the crawl's pipelines did not start on this worker:\n"
                               f"{plugin.error}")
        return local.run_task(plugin.state, body)


def close(name: str, reason: str, dask_worker: Worker) -> list[StatsOp]:
    """Close the crawl's pipelines on this worker (run by ``Client.run``,
    which passes *dask_worker*); the stats changes their close made."""
    plugin = dask_worker.plugins.get(name)
    return plugin.close(reason) if isinstance(plugin, CrawlPlugin) else []
