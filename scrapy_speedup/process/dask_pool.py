"""The crawl's process pool on a Dask cluster (``SPEEDUP_PROCESS_EXECUTOR =
"dask"``).

It is the local :class:`~.pool.ProcessPool` with the workers swapped: the
same queue, at most ``SPEEDUP_PROCESS_MAX_IN_FLIGHT`` tasks out, the same
backpressure on the crawl, the same pickling with its precise errors, the
same outcomes (a worker's exception raised as itself, with its traceback;
``DropItem`` counted as dropped), the same stats. What differs:

* Tasks go to the cluster with ``Client.submit``; the client runs its own
  event loop on a thread of its own, so the reactor never waits on the
  network. Results come back to the reactor thread through the bridge.
* A Dask worker that dies while it runs a task: Dask runs the task again on
  another worker, up to the scheduler's ``distributed.scheduler.allowed-failures``
  (3 by default); past it the task fails with Dask's ``KilledWorker``,
  raised to the caller as :exc:`WorkerCrashedError` and counted
  (``speedup/process/worker_crash_count``).
* ``SPEEDUP_PROCESS_TIMEOUT_SECONDS`` fails a late task with
  :exc:`TaskTimeoutError` and cancels it; Dask cannot stop a task that
  already runs on a worker's thread, so that thread finishes it.
* Pipelines (``SPEEDUP_PROCESS_PIPELINES``) open once on each Dask worker,
  through a worker plugin, and close when the crawl closes.

The code the tasks run (the project's pipelines, the functions given to
``run_in_process``) must be importable on the workers, as for any Dask work.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from scrapy_speedup.exceptions import (
    OffloadError,
    TaskTimeoutError,
    WorkerCrashedError,
    WorkerInitError,
)
from scrapy_speedup.process import pickling, worker
from scrapy_speedup.process.pool import _STAT, ProcessPool, _import_roots, _Task

if TYPE_CHECKING:
    from scrapy.crawler import Crawler

    from scrapy_speedup._bridge import Bridge
    from scrapy_speedup.config import DaskSettings, SpeedupConfig

__all__ = ["DaskPool"]

logger = logging.getLogger(__name__)


class DaskPool(ProcessPool):
    """A :class:`ProcessPool` whose workers are a Dask cluster's."""

    def __init__(self, crawler: Crawler, config: SpeedupConfig, bridge: Bridge) -> None:
        super().__init__(crawler, config, bridge)
        assert config.dask is not None
        self.dask: DaskSettings = config.dask
        # distributed has no type hints: its Client and Futures are Any here.
        self._client: Any = None
        self._connecting = False
        # Unique per crawl: crawls that share a cluster keep their pipelines apart.
        self._name = f"scrapy-speedup-{uuid.uuid4().hex}"
        self._out: dict[_Task, tuple[Any, float]] = {}

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> None:
        """Connect to the cluster (on a thread: connecting waits on the
        network) and register the crawl's plugin; tasks wait until then."""
        if self._started:
            return
        if self._closed:
            from scrapy_speedup.exceptions import PoolClosedError

            raise PoolClosedError("the process pool of this crawl is already closed")
        self._started = True
        spec = worker.WorkerSpec(
            progress=None,
            log_level=logging.getLogger().getEffectiveLevel(),
            max_message_bytes=self._max_message_bytes,
            import_roots=_import_roots([self.crawler.spidercls.__module__], all_roots=True),
            pipelines=self._pipeline_spec(),
        )
        self._connecting = True
        self.bridge.call_in_new_thread(
            lambda: self._connect(spec), "scrapy-speedup-dask-connect", self._on_connected,
        )
        if self.config.process_timeout_seconds is not None:
            self._schedule_timeout_check()

    def _connect(self, spec: worker.WorkerSpec) -> tuple[Any, dict[str, str]]:
        """On a thread: the client, and the workers whose pipelines failed."""
        from distributed import Client
        from distributed.security import Security

        new_client: Any = Client
        new_security: Any = Security

        from scrapy_speedup.process import dask_worker

        security = None
        if self.dask.tls is not None:
            ca, cert, key = self.dask.tls
            security = new_security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key,
                                require_encryption=True)
        try:
            client = new_client(self.dask.address, security=security, set_as_default=False,
                            timeout=self.dask.connect_timeout_seconds)
        except Exception as exc:
            raise OffloadError(
                f"could not reach the Dask scheduler at {self.dask.address}"
                f" (SPEEDUP_DASK_SCHEDULER_ADDRESS) within"
                f" {self.dask.connect_timeout_seconds:g} s: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            client.register_plugin(dask_worker.CrawlPlugin(self._name, spec), name=self._name)
            errors = client.run(dask_worker.init_error, self._name)
        except Exception as exc:
            client.close()
            raise WorkerInitError(
                f"could not set the crawl up on the Dask cluster at {self.dask.address}:"
                f" {type(exc).__name__}: {exc}"
            ) from exc
        return client, {address: error for address, error in errors.items() if error}

    def _on_connected(self, result: tuple[Any, dict[str, str]] | None,
                      error: BaseException | None) -> None:
        self._connecting = False
        if error is not None:
            self._set_fatal(error if isinstance(error, OffloadError) else OffloadError(
                f"the Dask cluster at {self.dask.address}: {type(error).__name__}: {error}"))
            return
        assert result is not None
        client, failed = result
        if self._closed or self._abandoned:
            self.bridge.call_in_new_thread(client.close, "scrapy-speedup-dask-close",
                                           _ignore)
            return
        self._client = client
        if failed:
            address, trace = next(iter(failed.items()))
            self._set_fatal(WorkerInitError(
                f"SPEEDUP_PROCESS_PIPELINES failed to start on Dask worker {address}"
                f" ({len(failed)} of the cluster's workers):\n{trace}"
            ))
            return
        workers = len(client.scheduler_info().get("workers", {}))
        self.stats.set_value(_STAT + "workers", workers)
        logger.info("scrapy-speedup: process pool on the Dask cluster at %s (%d workers now)",
                    self.dask.address, workers, extra={"crawler": self.crawler})
        for waiter in self._ready_waiters:
            self.bridge.resolve(waiter, None)
        self._ready_waiters.clear()
        self._pump()

    async def wait_ready(self) -> None:
        self.start()
        if self._fatal is not None:
            raise self._fatal
        if self._client is not None:
            return
        waiter = self.bridge.new_waiter()
        self._ready_waiters.append(waiter)
        await waiter

    async def close(self, reason: str = "finished") -> None:
        """Wait for the tasks out (at most SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS),
        then close the pipelines on every worker and disconnect."""
        if self._closed:
            return
        self._closed = True
        self._release_backpressure()
        if not self._started:
            return
        timeout = self.config.shutdown_timeout_seconds
        if self._in_flight or self._queue:
            self._drained = self.bridge.new_waiter()
            timer = self.bridge.call_later(timeout, self.abandon, "close")
            await self._drained
            timer.cancel()
        client = self._client
        if client is None:
            return
        self._client = None
        try:
            ops = await self.bridge.run_in_new_thread(
                lambda: _close_cluster_side(client, self._name, reason, timeout),
                "scrapy-speedup-dask-close",
            )
        except Exception as exc:  # noqa: BLE001 - the crawl closes anyway
            logger.warning("scrapy-speedup: could not close the pipelines on the Dask"
                           " workers: %s: %s", type(exc).__name__, exc,
                           extra={"crawler": self.crawler})
            return
        self.apply_stats(ops)

    def abandon(self, why: str) -> None:
        if self._abandoned:
            return
        futures = [future for future, _ in self._out.values()]
        super().abandon(why)  # settles the queue; _kill_all settles what is out
        if futures and self._client is not None:
            client = self._client
            self.bridge.call_in_new_thread(lambda: client.cancel(futures),
                                           "scrapy-speedup-dask-cancel", _ignore)

    def _kill_all(self, why: str) -> None:
        # A Dask worker is not ours to kill: the tasks out are given up.
        for task in list(self._out):
            self._forget(task)
            self._settle(task, "abandoned", self._abandoned_error(task))
        self._check_drained()

    def kill_now(self) -> None:
        abandoned = self._in_flight + len(self._queue)
        if abandoned:
            self.stats.inc_value(_STAT + "abandoned_count", abandoned)

    # -- dispatch -----------------------------------------------------------------

    def _pump(self) -> None:
        from scrapy_speedup.exceptions import UnpicklableError
        from scrapy_speedup.process import dask_worker

        client = self._client
        while client is not None and self._queue and self._in_flight < self._max_in_flight:
            task = self._queue.popleft()
            if task.body is None:
                try:
                    task.body = pickling.dumps_parts(task.request, task.parts)
                except UnpicklableError as exc:
                    self.stats.inc_value(_STAT + "unpicklable_count")
                    self._settle(task, "error", exc)
                    continue
                task.request, task.parts = None, []  # type: ignore[assignment]
            future = client.submit(dask_worker.run, self._name, task.body, pure=False,
                                   key=f"{task.name}-{uuid.uuid4().hex}")
            self._in_flight += 1
            self._out[task] = (future, time.monotonic())
            self.stats.max_value(_STAT + "in_flight_max", self._in_flight)
            self.stats.max_value(
                _STAT + "queue_wait_seconds_max", round(time.monotonic() - task.queued_at, 3)
            )
            future.add_done_callback(lambda done, task=task: self._on_done_thread(task, done))
        self._release_backpressure()

    def _on_done_thread(self, task: _Task, future: Any) -> None:
        """On the client's callback thread: fetch the outcome there (a local
        wait on the client's loop), then settle the task on the reactor."""
        try:
            body, error = future.result(), None
        except BaseException as exc:  # noqa: BLE001 - settled on the reactor thread
            body, error = None, exc
        future.release()
        self.bridge.call_from_thread(self._on_done, task, body, error)

    def _on_done(self, task: _Task, body: bytes | None, error: BaseException | None) -> None:
        if self._out.pop(task, None) is None:
            return  # settled already (a timeout, abandoned)
        self._in_flight -= 1
        if error is None and body is not None:
            self._on_result(task, body)
        else:
            self._settle(task, "error", self._cluster_error(task, error))
        self._pump()
        self._check_drained()

    def _cluster_error(self, task: _Task, error: BaseException | None) -> BaseException:
        from distributed.scheduler import KilledWorker

        if isinstance(error, KilledWorker):
            self.stats.inc_value(_STAT + "worker_crash_count")
            crashed = WorkerCrashedError(
                f"{task.name}: every Dask worker that ran it died (Dask's"
                f" distributed.scheduler.allowed-failures): {error}"
            )
            crashed.__cause__ = error
            return crashed
        failed = OffloadError(f"{task.name} failed on the Dask cluster:"
                              f" {type(error).__name__}: {error}")
        failed.__cause__ = error
        return failed

    def _forget(self, task: _Task) -> None:
        if self._out.pop(task, None) is not None:
            self._in_flight -= 1

    # -- timeouts -----------------------------------------------------------------

    def _check_timeouts(self) -> None:
        if self._closed and not self._out:
            return
        try:
            self._fail_late_tasks()
        finally:
            self._schedule_timeout_check()

    def _fail_late_tasks(self) -> None:
        timeout = self.config.process_timeout_seconds
        assert timeout is not None
        now = time.monotonic()
        late = [(task, future) for task, (future, sent) in self._out.items()
                if now - sent > timeout]
        for task, future in late:
            logger.error("%s ran past SPEEDUP_PROCESS_TIMEOUT_SECONDS (%s s) on the Dask"
                         " cluster; it is cancelled", task.name, timeout,
                         extra={"crawler": self.crawler})
            self._forget(task)
            self.stats.inc_value(_STAT + "timeout_count")
            self._settle(task, "error", TaskTimeoutError(
                f"{task.name} ran past SPEEDUP_PROCESS_TIMEOUT_SECONDS"
                f" ({timeout} s) on the Dask cluster; it was cancelled"
            ))
            future.cancel()
        if late:
            self._pump()
            self._check_drained()


def _close_cluster_side(client: Any, name: str, reason: str,
                        timeout: float) -> list[Any]:
    """On a thread: close the crawl's pipelines on every worker, gather the
    stats their close made, remove the plugin, disconnect."""
    from scrapy_speedup.process import dask_worker

    try:
        by_worker = client.run(dask_worker.close, name, reason, wait=True)
        ops = [op for worker_ops in by_worker.values() for op in worker_ops]
        client.unregister_worker_plugin(name)
        return ops
    finally:
        client.close(timeout=timeout)


def _ignore(_: Any, error: BaseException | None) -> None:
    if error is not None:
        logger.debug("scrapy-speedup: Dask client call failed: %r", error)
