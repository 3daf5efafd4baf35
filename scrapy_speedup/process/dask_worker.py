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
Pipelines are opened, run and closed on the worker's threads, one at a time
but not always the same thread: an object bound to the thread that made it
(an ``sqlite3`` connection) needs ``check_same_thread=False``.
"""

from __future__ import annotations

import asyncio
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

# How long a worker that shuts down waits for a task of the crawl still
# running before it leaves the pipelines unclosed.
_TEARDOWN_WAIT_S = 10.0


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

    async def setup(self, worker: Worker) -> None:
        # Made here: the plugin is pickled to reach the worker, a lock is not.
        self.lock = threading.Lock()
        # Off the worker's event loop: opening pipelines may take a while
        # (a model to load), and the loop must keep answering the scheduler.
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        # A cluster on this machine can import the project from where the
        # crawl does; a remote one must have it installed.
        roots = [r for r in self.spec.import_roots if os.path.isdir(r) and r not in sys.path]
        sys.path[:0] = roots
        collector = _StatsCollector(self.spec.max_message_bytes)
        state = local._State(self.spec, cast("local._Channel", collector))
        if self.spec.pipelines is not None:
            try:
                local._open_pipelines(state, pickle.loads(self.spec.pipelines))
            except Exception:  # reported to the crawl by init_error()
                self.error = traceback.format_exc()
                logging.getLogger(__name__).exception(
                    "scrapy-speedup: the crawl's pipelines could not start on this worker")
        self.state = state

    async def teardown(self, worker: Worker) -> None:
        # The crawl closes its pipelines with close() and its reason first; a
        # worker that shuts down before closes them with this one.
        await asyncio.to_thread(self.close, "dask_worker_shutdown", _TEARDOWN_WAIT_S)

    def close(self, reason: str, wait_s: float) -> list[StatsOp]:
        """Close the pipelines (once); the stats changes their close made.
        A task still running holds the pipelines: past *wait_s* they are left
        open (a task Dask cannot stop), with a warning."""
        if self.state is None:
            return []
        if not self.lock.acquire(timeout=wait_s):
            logging.getLogger(__name__).warning(
                "scrapy-speedup: a task of the crawl still runs on this worker after %s s;"
                " its pipelines are not closed", wait_s)
            return []
        try:
            if self.closed:
                return []
            self.closed = True
            local._close_pipelines(self.state, reason)
            collector = cast("_StatsCollector", self.state.channel)
            return collector.ops
        finally:
            self.lock.release()


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
    """Run one task of the crawl *name*; its pickled Outcome. Says when it
    starts (an event of the topic *name*): the crawl's
    SPEEDUP_PROCESS_TIMEOUT_SECONDS counts from then, not from the time it
    waited in the cluster's queue."""
    plugin = _plugin(name)
    worker = get_worker()
    with plugin.lock:
        if plugin.error is not None or plugin.state is None:
            raise RuntimeError(f"the crawl's pipelines did not start on this worker:\n"
                               f"{plugin.error}")
        worker.log_event(name, str(worker.get_current_task()))
        return local.run_task(plugin.state, body)


async def close(name: str, reason: str, wait_s: float, dask_worker: Worker) -> list[StatsOp]:
    """Close the crawl's pipelines on this worker (run by ``Client.run``,
    which passes *dask_worker*); the stats changes their close made. A
    coroutine, so that the worker's event loop goes on meanwhile."""
    plugin = dask_worker.plugins.get(name)
    if not isinstance(plugin, CrawlPlugin):
        return []
    return await asyncio.to_thread(plugin.close, reason, wait_s)
