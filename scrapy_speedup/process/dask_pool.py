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

import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scrapy_speedup.exceptions import (
    OffloadError,
    TaskTimeoutError,
    WorkerCrashedError,
    WorkerInitError,
)
from scrapy_speedup.process import pickling, worker
from scrapy_speedup.process.pool import (
    _STAT,
    ProcessPool,
    _import_roots,
    _live_pools,
    _Task,
)

if TYPE_CHECKING:
    from scrapy.crawler import Crawler

    from scrapy_speedup._bridge import Bridge
    from scrapy_speedup.config import DaskSettings, SpeedupConfig

__all__ = ["DaskPool"]

logger = logging.getLogger(__name__)

# How often the pool looks whether the client lost the scheduler for good.
_WATCH_S = 1.0


@dataclass(eq=False)
class _Out:
    """A task sent to the cluster."""

    future: Any
    key: str
    #: When its worker began it (an event from the worker); None while it
    #: waits in the cluster's queue, which SPEEDUP_PROCESS_TIMEOUT_SECONDS
    #: does not count.
    began: float | None = None


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
        self._out: dict[_Task, _Out] = {}
        self._by_key: dict[str, _Task] = {}
        self._counting_workers = False
        self._workerless_since: float | None = None

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
        _live_pools.add(self)  # a forced stop counts what it abandons
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

    def _connect(self, spec: worker.WorkerSpec) -> tuple[Any, int, dict[str, str]]:
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
            # Each task says when it starts: timeouts count from then.
            client.subscribe_topic(self._name, self._on_event_thread)
            workers = len(client.scheduler_info().get("workers", {}))
        except Exception as exc:
            client.close()
            raise WorkerInitError(
                f"could not set the crawl up on the Dask cluster at {self.dask.address}:"
                f" {type(exc).__name__}: {exc}"
            ) from exc
        return client, workers, {address: error for address, error in errors.items() if error}

    def _on_connected(self, result: tuple[Any, int, dict[str, str]] | None,
                      error: BaseException | None) -> None:
        self._connecting = False
        if error is not None:
            self._set_fatal(error if isinstance(error, OffloadError) else OffloadError(
                f"the Dask cluster at {self.dask.address}: {type(error).__name__}: {error}"))
            return
        assert result is not None
        client, workers, failed = result
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
        self.stats.set_value(_STAT + "workers", workers)
        logger.info("scrapy-speedup: process pool on the Dask cluster at %s (%d workers now)",
                    self.dask.address, workers, extra={"crawler": self.crawler})
        for waiter in self._ready_waiters:
            self.bridge.resolve(waiter, None)
        self._ready_waiters.clear()
        self._watch_client()
        self._pump()

    def _watch_client(self) -> None:
        """Fail everything once the client has given up on the scheduler
        (Dask closes it after distributed.comm.timeouts.connect of trying
        to reconnect): a task sent just before may never hear back."""
        client = self._client
        if client is None or self._closed:
            return
        if client.status not in ("closing", "closed"):
            self.bridge.call_later(_WATCH_S, self._watch_client)
            if self._out and not self._counting_workers:
                # Tasks wait: has the cluster any worker left to run them?
                self._counting_workers = True
                self.bridge.call_in_new_thread(
                    lambda: len(client.scheduler_info().get("workers", {})),
                    "scrapy-speedup-dask-workers", self._counted_workers)
            return
        lost = OffloadError(f"lost the Dask scheduler at {self.dask.address}"
                            " (SPEEDUP_DASK_SCHEDULER_ADDRESS): the client gave up"
                            " reconnecting")
        logger.error("scrapy-speedup: %s; %d tasks out and %d queued fail", lost,
                     len(self._out), len(self._queue), extra={"crawler": self.crawler})
        self._client = None
        self._fail_everything(lost)

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
        if not await self._drain_for_close():
            return
        timeout = self.config.shutdown_timeout_seconds
        _live_pools.discard(self)
        client = self._client
        if client is None:
            return
        self._client = None
        # Bounded, as the local pool's close is: a task Dask cannot stop, or
        # a close_spider that hangs, must not hold the crawl's end.
        outcome = self.bridge.new_waiter()

        def closed(ops: Any, error: BaseException | None) -> None:
            if self.bridge.is_pending(outcome):
                self.bridge.resolve(outcome, (ops, error))

        self.bridge.call_in_new_thread(
            lambda: _close_cluster_side(client, self._name, reason, timeout),
            "scrapy-speedup-dask-close", closed,
        )
        timer = self.bridge.call_later(timeout + 2, closed, None, TimeoutError(
            f"the Dask workers had not closed the pipelines {timeout} s after they were asked"
            " (SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS): a close_spider still running, or a task"
            " that Dask cannot stop"))
        ops, error = await outcome
        timer.cancel()
        if error is not None:
            logger.warning("scrapy-speedup: could not close the pipelines on the Dask"
                           " workers: %s: %s", type(error).__name__, error,
                           extra={"crawler": self.crawler})
            return
        self.apply_stats(ops)

    def abandon(self, why: str) -> None:
        if self._abandoned:
            return
        futures = [out.future for out in self._out.values()]
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
            key = f"{task.name}-{uuid.uuid4().hex}"
            try:
                future = client.submit(dask_worker.run, self._name, task.body, pure=False,
                                       key=key)
            except Exception as exc:  # noqa: BLE001 - a closed client, a lost scheduler
                lost = OffloadError(
                    f"lost the Dask scheduler at {self.dask.address}"
                    f" (SPEEDUP_DASK_SCHEDULER_ADDRESS): {type(exc).__name__}: {exc}")
                self._settle(task, "error", lost)
                self._set_fatal(lost)
                return
            self._in_flight += 1
            self._out[task] = _Out(future, key)
            self._by_key[key] = task
            self.stats.max_value(_STAT + "in_flight_max", self._in_flight)
            self.stats.max_value(
                _STAT + "queue_wait_seconds_max", round(time.monotonic() - task.queued_at, 3)
            )
            future.add_done_callback(lambda done, task=task: self._on_done_thread(task, done))
        self._release_backpressure()

    def _counted_workers(self, workers: int | None, error: BaseException | None) -> None:
        self._counting_workers = False
        if error is not None or workers is None or self._fatal is not None:
            return
        now = time.monotonic()
        if workers:
            self._workerless_since = None
            return
        if self._workerless_since is None:
            self._workerless_since = now
            logger.warning("scrapy-speedup: the Dask cluster at %s has no worker; %d tasks"
                           " wait for one (at most SPEEDUP_DASK_CONNECT_TIMEOUT_SECONDS)",
                           self.dask.address, len(self._out), extra={"crawler": self.crawler})
        elif now - self._workerless_since > self.dask.connect_timeout_seconds:
            gone = OffloadError(
                f"the Dask cluster at {self.dask.address} has had no worker for"
                f" {now - self._workerless_since:.0f} s (SPEEDUP_DASK_CONNECT_TIMEOUT_SECONDS)")
            logger.error("scrapy-speedup: %s; its %d tasks fail, and the pool with them", gone,
                         len(self._out), extra={"crawler": self.crawler})
            self._fail_everything(gone)

    def _fail_everything(self, error: OffloadError) -> None:
        futures = [out.future for out in self._out.values()]
        for task in list(self._out):
            self._forget(task)
            self._settle(task, "error", error)
        self._set_fatal(error)
        client = self._client
        if futures and client is not None:
            self.bridge.call_in_new_thread(lambda: client.cancel(futures),
                                           "scrapy-speedup-dask-cancel", _ignore)
        self._check_drained()

    def _on_event_thread(self, event: tuple[float, Any]) -> None:
        """On the client's thread: a task of this crawl began on a worker."""
        self.bridge.call_from_thread(self._began, str(event[1]))

    def _began(self, key: str) -> None:
        task = self._by_key.get(key)
        if task is not None and task in self._out:
            self._out[task].began = time.monotonic()

    def _on_done_thread(self, task: _Task, future: Any) -> None:
        """On the client's callback thread: fetch the outcome there (a local
        wait on the client's loop), then settle the task on the reactor."""
        try:
            body, error = future.result(), None
        except BaseException as exc:  # noqa: BLE001 - settled on the reactor thread
            body, error = None, exc
        with contextlib.suppress(Exception):  # a client closed meanwhile
            future.release()
        self.bridge.call_from_thread(self._on_done, task, body, error)

    def _on_done(self, task: _Task, body: bytes | None, error: BaseException | None) -> None:
        if not self._forget(task):
            return  # settled already (a timeout, abandoned)
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

    def _forget(self, task: _Task) -> bool:
        """Take *task* off the tasks out; whether it was there."""
        out = self._out.pop(task, None)
        if out is None:
            return False
        self._by_key.pop(out.key, None)
        self._in_flight -= 1
        return True

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
        late = [(task, out.future) for task, out in self._out.items()
                if out.began is not None and now - out.began > timeout]
        for task, _ in late:
            logger.error("%s ran past SPEEDUP_PROCESS_TIMEOUT_SECONDS (%s s) on the Dask"
                         " cluster; it is cancelled", task.name, timeout,
                         extra={"crawler": self.crawler})
            self._forget(task)
            self.stats.inc_value(_STAT + "timeout_count")
            self._settle(task, "error", TaskTimeoutError(
                f"{task.name} ran past SPEEDUP_PROCESS_TIMEOUT_SECONDS"
                f" ({timeout} s) on the Dask cluster; it was cancelled"
            ))
        if late and self._client is not None:
            client, futures = self._client, [future for _, future in late]
            # Cancelling waits on the client's loop: not on the reactor thread.
            self.bridge.call_in_new_thread(lambda: client.cancel(futures),
                                           "scrapy-speedup-dask-cancel", _ignore)
        if late:
            self._pump()
            self._check_drained()


def _close_cluster_side(client: Any, name: str, reason: str,
                        timeout: float) -> list[Any]:
    """On a thread: close the crawl's pipelines on every worker, gather the
    stats their close made, remove the plugin, disconnect."""
    from scrapy_speedup.process import dask_worker

    try:
        by_worker = client.run(dask_worker.close, name, reason, timeout, wait=True)
        ops = [op for worker_ops in by_worker.values() for op in worker_ops]
        client.unregister_worker_plugin(name)
        return ops
    finally:
        client.close(timeout=timeout)


def _ignore(_: Any, error: BaseException | None) -> None:
    if error is not None:
        logger.debug("scrapy-speedup: Dask client call failed: %r", error)
