"""The process pool of one crawler: dispatch, faults, backpressure and drain.

Built on :class:`concurrent.futures.ProcessPoolExecutor`. What it adds:

* **Bounded in-flight.** At most ``max_in_flight`` tasks are in the executor;
  the rest wait in a queue while their callers await, so Scrapy's scraper
  slot fills and the downloader waits: a slow pool slows the crawl.
* **Blame, not guesswork, when a worker dies.** The executor fails *every*
  pending task when one worker dies. Each in-flight task owns a slot in a
  shared array where its worker writes its pid when it starts, so the pool
  knows which task was on the dead worker: that task is retried up to
  ``SPEEDUP_PROCESS_RETRY_TIMES`` and then errors; the others are resubmitted
  and lose nothing.
* **Timeouts** kill only the worker that runs the late task.
* **Cheap functions run inline.** Offloading costs the reactor thread about
  0.1-0.3 ms; a function measured below ``SPEEDUP_PROCESS_INLINE_BELOW_MS``
  runs on the reactor thread instead (``run_in_process`` only).

All methods except ``_done_in_thread`` run on the reactor thread.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import weakref
from collections import deque
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from scrapy.exceptions import DropItem

from scrapy_speedup import _pickling, _worker
from scrapy_speedup.exceptions import (
    OffloadError,
    PoolClosedError,
    RemoteTraceback,
    TaskTimeoutError,
    UnpicklableError,
    WorkerCrashedError,
    WorkerInitError,
)

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from scrapy.crawler import Crawler
    from scrapy.utils.asyncio import CallLaterResult
    from twisted.internet.defer import Deferred

    from scrapy_speedup._bridge import Bridge
    from scrapy_speedup.config import SpeedupConfig

__all__ = ["ProcessPool"]

logger = logging.getLogger(__name__)

# A pool that breaks this many times in a row with no task finishing is not
# going to recover (a worker that dies while starting, say): fail instead of
# rebuilding forever.
_MAX_BREAKS_WITHOUT_PROGRESS = 10
# Inline decisions use an exponentially weighted mean of run times; a new
# sample weighs this much, so a change of page sizes shows within ~10 calls.
_EWMA_WEIGHT = 0.2
_MIN_SAMPLES_FOR_INLINE = 3

_STAT = "speedup/process/"

# Pools whose workers must die if the interpreter exits before they are closed
# (a forced stop); see _kill_live_pools.
_live_pools: weakref.WeakSet[ProcessPool] = weakref.WeakSet()


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "an unknown exit code"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name} (exit code {exitcode})"
        except ValueError:
            pass
    return f"exit code {exitcode}"


@dataclass(eq=False)
class _Task:
    payload: bytes
    name: str
    waiter: asyncio.Future[Any] | Deferred[Any]
    queued_at: float = field(default_factory=time.monotonic)
    attempts: int = 0  # crashes of its own worker
    slot: int = -1
    timed_out: bool = False
    timer: CallLaterResult | None = None


@dataclass
class _Timing:
    """Measured run time of one offloaded function, for the inline decision."""

    mean_ms: float = 0.0
    samples: int = 0

    def add(self, ms: float) -> None:
        self.samples += 1
        weight = 1.0 if self.samples == 1 else _EWMA_WEIGHT
        self.mean_ms += weight * (ms - self.mean_ms)


class ProcessPool:
    """The process pool of one crawler; owned by :class:`SpeedupExtension`."""

    def __init__(self, crawler: Crawler, config: SpeedupConfig, bridge: Bridge) -> None:
        self.crawler = crawler
        self.config = config
        self.bridge = bridge
        self.stats = crawler.stats
        self._ctx = multiprocessing.get_context(config.process_start_method)
        n = config.process_max_in_flight
        self._slots: Any = self._ctx.RawArray("d", 2 * n)
        self._free_slots = list(range(n - 1, -1, -1))
        self._in_flight: dict[int, _Task] = {}
        self._queue: deque[_Task] = deque()
        self._events: Any = self._ctx.SimpleQueue()
        self._events_done = bridge.new_waiter()
        self._executor: ProcessPoolExecutor | None = None
        self._generation = 0
        self._breaks_without_progress = 0
        self._killed_pids: set[int] = set()
        self._crashed_pids: set[int] = set()
        self._timings: dict[str, _Timing] = {}
        self._fatal: BaseException | None = None
        self._closed = False
        self._drained: asyncio.Future[Any] | Deferred[Any] | None = None
        self._reader: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._executor is not None

    def start(self) -> None:
        """Create the executor; idempotent. Needs ``crawler.spider`` when
        pipelines run in the workers (their copy of the spider is made here)."""
        if self._executor is not None:
            return
        if self._closed:
            raise PoolClosedError("the process pool of this crawl is already closed")
        self._spec = _worker.WorkerSpec(
            slots=self._slots,
            events=self._events,
            log_level=logging.getLogger().getEffectiveLevel(),
            pipelines=self._pipeline_spec(),
        )
        self._reader = threading.Thread(
            target=self._read_events, name="speedup-process-events", daemon=True
        )
        self._reader.start()
        self._new_executor()
        _live_pools.add(self)
        self.stats.set_value(_STAT + "workers", self.config.process_workers)

    def _new_executor(self) -> None:
        self._executor = ProcessPoolExecutor(
            max_workers=self.config.process_workers,
            mp_context=self._ctx,
            initializer=_worker.initialize,
            initargs=(self._spec,),
            max_tasks_per_child=self.config.process_max_tasks_per_child,
        )
        self._generation += 1

    def _pipeline_spec(self) -> _worker.PipelineSpec | None:
        if not self.config.process_pipelines:
            return None
        spider = self.crawler.spider
        assert spider is not None, "pipelines start in workers once the spider is open"
        settings = {}
        for key, value in self.crawler.settings.copy_to_dict().items():
            try:
                _pickling.dumps(value, key)
            except UnpicklableError as exc:
                logger.debug("Setting %s is not sent to the workers: %s", key, exc)
            else:
                settings[key] = value
        attrs = {}
        for key, value in vars(spider).items():
            if key in ("crawler", "settings"):
                continue
            try:
                _pickling.dumps(value, key)
            except UnpicklableError as exc:
                logger.debug("Spider attribute %s is not sent to the workers: %s", key, exc)
            else:
                attrs[key] = value
        return _worker.PipelineSpec(
            paths=self.config.process_pipelines,
            settings=settings,
            spidercls=type(spider),
            spider_attrs=attrs,
        )

    async def close(self) -> None:
        """Wait for the tasks in flight, then shut the workers down (they run
        the pipelines' ``close_spider``), waiting at most
        ``SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS`` for each step."""
        if self._closed:
            return
        self._closed = True
        if self._executor is None:
            return
        timeout = self.config.shutdown_timeout_seconds
        if self._in_flight or self._queue:
            self._drained = self.bridge.new_waiter()
            timer = self.bridge.call_later(timeout, self._give_up_drain)
            await self._drained
            timer.cancel()
        executor = self._executor
        shutdown = self.bridge.run_in_new_thread(
            partial(executor.shutdown, wait=True), name="speedup-process-shutdown"
        )
        timer = self.bridge.call_later(timeout, self._kill_workers, "shutdown took too long")
        await shutdown
        timer.cancel()
        _live_pools.discard(self)
        self._events.put(None)  # the reader stops after the workers' last events
        await self._events_done
        self._executor = None

    def _give_up_drain(self) -> None:
        logger.warning(
            "%d offloaded tasks still running after SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS"
            " (%s s); abandoning them",
            len(self._in_flight) + len(self._queue),
            self.config.shutdown_timeout_seconds,
            extra={"crawler": self.crawler},
        )
        self.abandon()
        self._kill_workers("tasks abandoned at shutdown")

    def abandon(self) -> int:
        """Fail every queued and running task with :exc:`PoolClosedError`;
        return how many there were."""
        tasks = list(self._queue) + list(self._in_flight.values())
        self._queue.clear()
        for task in tasks:
            self._settle(task, "abandoned", PoolClosedError(f"{task.name} abandoned at shutdown"))
        self._check_drained()
        return len(tasks)

    def _kill_workers(self, why: str) -> None:
        executor = self._executor
        processes = dict(getattr(executor, "_processes", None) or {})
        for pid, process in processes.items():
            if process.is_alive():
                logger.warning("Killing worker pid %d: %s", pid, why)
                self._killed_pids.add(pid)
                process.kill()

    # -- submitting -------------------------------------------------------------

    async def run(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """``func(*args, **kwargs)`` in a worker, or inline when it is cheap."""
        name = getattr(func, "__qualname__", repr(func))
        key = f"{getattr(func, '__module__', '')}.{name}"
        timing = self._timings.get(key)
        if timing is None:
            timing = self._timings[key] = _Timing()
        if self._runs_inline(timing):
            return self._run_inline(func, args, kwargs, timing)
        payload = _pickling.dumps_message("call", _pickling.call_parts(func, args, kwargs, name))
        outcome = await self._submit(payload, name)
        status, value, elapsed = outcome
        timing.add(elapsed * 1000)
        return value

    def _runs_inline(self, timing: _Timing) -> bool:
        return (
            timing.samples >= _MIN_SAMPLES_FOR_INLINE
            and timing.mean_ms < self.config.process_inline_below_ms
        )

    def _run_inline(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timing: _Timing,
    ) -> Any:
        self.stats.inc_value(_STAT + "task_count")
        self.stats.inc_value(_STAT + "inline_count")
        started = time.perf_counter()
        try:
            value = getattr(func, "__speedup_wrapped__", func)(*args, **kwargs)
        except DropItem:
            self.stats.inc_value(_STAT + "dropped_count")
            raise
        except Exception:
            self.stats.inc_value(_STAT + "error_count")
            raise
        finally:
            timing.add((time.perf_counter() - started) * 1000)
        self.stats.inc_value(_STAT + "succeeded_count")
        return value

    async def process_item(self, index: int, item: Any, name: str) -> Any:
        """``process_item`` of the index-th pipeline of SPEEDUP_PROCESS_PIPELINES."""
        payload = _pickling.dumps_message("item", [("", index), (f"the item sent to {name}", item)])
        _, value, _ = await self._submit(payload, name)
        return value

    async def ping(self) -> None:
        """Start a worker and raise :exc:`WorkerInitError` if it failed to start."""
        await self._submit(_pickling.dumps_message("ping", []), "worker start")

    async def _submit(self, payload: bytes, name: str) -> tuple[str, Any, float]:
        self.stats.inc_value(_STAT + "task_count")
        if self._fatal is not None:
            self.stats.inc_value(_STAT + "error_count")
            raise self._fatal
        if self._closed and self._executor is None:
            self.stats.inc_value(_STAT + "error_count")
            raise PoolClosedError(f"{name}: the process pool of this crawl is closed")
        self.start()
        task = _Task(payload, name, self.bridge.new_waiter())
        self._queue.append(task)
        self._pump()
        return await task.waiter

    def _pump(self) -> None:
        while self._queue and self._free_slots and self._executor is not None:
            task = self._queue.popleft()
            slot = self._free_slots.pop()
            self._slots[2 * slot] = self._slots[2 * slot + 1] = 0.0
            task.slot = slot
            self._in_flight[slot] = task
            self.stats.max_value(_STAT + "in_flight_max", len(self._in_flight))
            self.stats.max_value(
                _STAT + "queue_wait_seconds_max", round(time.monotonic() - task.queued_at, 3)
            )
            generation = self._generation
            try:
                future = self._executor.submit(_worker.run_task, slot, task.payload)
            except BrokenExecutor:
                # Broken before its futures told us: they will, and rebuild it.
                self._release(task)
                self._queue.appendleft(task)
                return
            future.add_done_callback(
                partial(self._done_in_thread, task, generation, self._executor)
            )
            if self.config.process_timeout_seconds is not None:
                task.timer = self.bridge.call_later(
                    self.config.process_timeout_seconds, self._check_timeout, task, generation
                )

    def _release(self, task: _Task) -> None:
        if self._in_flight.get(task.slot) is task:
            del self._in_flight[task.slot]
            self._free_slots.append(task.slot)
        task.slot = -1
        if task.timer is not None:
            task.timer.cancel()
            task.timer = None

    # -- completion -------------------------------------------------------------

    def _done_in_thread(
        self,
        task: _Task,
        generation: int,
        executor: ProcessPoolExecutor,
        future: Future[bytes],
    ) -> None:
        """Runs on the executor's thread, right as the future completes.

        When a worker died, the executor fails every pending future *before* it
        terminates the other workers: reading exit codes here tells the task
        whose worker died from the ones whose worker is still alive."""
        worker_exit: tuple[int, int | None] | None = None
        if not future.cancelled() and isinstance(future.exception(), BrokenExecutor):
            pid = int(self._slots[2 * task.slot]) if task.slot >= 0 else 0
            # _processes is private, but the only place the exit codes are.
            process = (getattr(executor, "_processes", None) or {}).get(pid)
            worker_exit = (pid, process.exitcode if process is not None else None)
        self.bridge.call_from_thread(self._on_done, task, generation, future, worker_exit)

    def _on_done(
        self,
        task: _Task,
        generation: int,
        future: Future[bytes],
        worker_exit: tuple[int, int | None] | None,
    ) -> None:
        if task.slot < 0:  # abandoned
            return
        self._release(task)
        error = future.exception() if not future.cancelled() else OffloadError("cancelled")
        if error is None:
            self._on_result(task, future.result())
        elif isinstance(error, BrokenExecutor):
            self._on_broken(task, generation, error, worker_exit)
        else:
            self._settle(task, "error", error)
        self._pump()
        self._check_drained()

    def _on_result(self, task: _Task, raw: bytes) -> None:
        self._breaks_without_progress = 0
        status, value, stats_ops, elapsed = _pickling.loads(raw)
        self.apply_stats(stats_ops)
        if status == _worker.OK:
            self._settle(task, "succeeded", (status, _pickling.loads(value), elapsed))
        elif status == _worker.INIT_ERROR:
            error = WorkerInitError(
                "a pipeline of SPEEDUP_PROCESS_PIPELINES failed to start in a worker"
                f" process:\n{value}"
            )
            self._fatal = error
            self._settle(task, "error", error)
            for waiting in list(self._queue):
                self._queue.remove(waiting)
                self._settle(waiting, "error", error)
        else:
            exc, kind, message, tb = value
            if exc is None:
                exc = OffloadError(f"{task.name} raised {kind}: {message}")
            exc.__cause__ = RemoteTraceback(tb)
            if isinstance(exc, UnpicklableError):
                self.stats.inc_value(_STAT + "unpicklable_count")
            self._settle(task, "dropped" if isinstance(exc, DropItem) else "error", exc)

    def _on_broken(
        self,
        task: _Task,
        generation: int,
        error: BaseException,
        worker_exit: tuple[int, int | None] | None,
    ) -> None:
        if generation == self._generation and not self._closed:
            self._breaks_without_progress += 1
            if self._breaks_without_progress > _MAX_BREAKS_WITHOUT_PROGRESS:
                self._fatal = WorkerCrashedError(
                    f"the process pool broke {_MAX_BREAKS_WITHOUT_PROGRESS} times in a"
                    f" row with no task finishing; last error: {error}"
                )
            else:
                self.stats.inc_value(_STAT + "pool_rebuild_count")
                assert self._executor is not None
                self._executor.shutdown(wait=False)
                self._new_executor()
        pid, exitcode = worker_exit or (0, None)
        if task.timed_out:
            self.stats.inc_value(_STAT + "timeout_count")
            self._settle(
                task,
                "error",
                TaskTimeoutError(
                    f"{task.name} ran past SPEEDUP_PROCESS_TIMEOUT_SECONDS"
                    f" ({self.config.process_timeout_seconds} s); its worker pid {pid}"
                    " was killed and replaced"
                ),
            )
            return
        own_crash = bool(pid) and exitcode is not None and pid not in self._killed_pids
        if own_crash:
            if pid not in self._crashed_pids:
                self._crashed_pids.add(pid)
                self.stats.inc_value(_STAT + "worker_crash_count")
                logger.error(
                    "Worker pid %d died with %s while running %s (attempt %d of %d)",
                    pid,
                    _describe_exit(exitcode),
                    task.name,
                    task.attempts + 1,
                    self.config.process_retry_times + 1,
                    extra={"crawler": self.crawler},
                )
            task.attempts += 1
            if task.attempts > self.config.process_retry_times:
                self._settle(
                    task,
                    "error",
                    WorkerCrashedError(
                        f"{task.name}: its worker process died {task.attempts} times"
                        f" (last: pid {pid}, {_describe_exit(exitcode)});"
                        f" SPEEDUP_PROCESS_RETRY_TIMES is {self.config.process_retry_times}"
                    ),
                )
                return
            self.stats.inc_value(_STAT + "retry_count")
        if self._fatal is not None:
            self._settle(task, "error", self._fatal)
            return
        # Innocent (its worker was alive, or it had not started) or retried:
        # back to the front of the queue, in the new pool.
        task.queued_at = time.monotonic()
        self._queue.appendleft(task)

    def _settle(self, task: _Task, outcome: str, value: Any) -> None:
        """Count the task's end and hand the result or error to its caller."""
        self._release(task)
        self.stats.inc_value(f"{_STAT}{outcome}_count")
        if outcome == "succeeded":
            self.bridge.resolve(task.waiter, value)
        else:
            self.bridge.fail(task.waiter, value)

    def _check_drained(self) -> None:
        if self._drained is not None and not self._in_flight and not self._queue:
            self.bridge.resolve(self._drained, None)

    def _check_timeout(self, task: _Task, generation: int) -> None:
        timeout = self.config.process_timeout_seconds
        if (
            timeout is None
            or generation != self._generation
            or task.slot < 0
            or self._in_flight.get(task.slot) is not task
        ):
            return
        pid, started = int(self._slots[2 * task.slot]), self._slots[2 * task.slot + 1]
        remaining = timeout if not pid else started + timeout - time.monotonic()
        if remaining > 0:  # not started yet, or started later than submitted
            task.timer = self.bridge.call_later(remaining, self._check_timeout, task, generation)
            return
        logger.error(
            "%s ran past SPEEDUP_PROCESS_TIMEOUT_SECONDS (%s s); killing its worker pid %d",
            task.name,
            timeout,
            pid,
            extra={"crawler": self.crawler},
        )
        task.timed_out = True
        self._killed_pids.add(pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # -- events from workers ----------------------------------------------------

    def apply_stats(self, ops: list[_worker.StatsOp]) -> None:
        for method, key, value in ops:
            getattr(self.stats, method)(key, value)

    def _read_events(self) -> None:
        """Thread: log records and close-time stats sent by the workers."""
        while True:
            try:
                event = self._events.get()
            except (EOFError, OSError):
                break
            if event is None:
                break
            kind, payload = event
            if kind == "log":
                logging.getLogger(payload.name).handle(payload)
            elif kind == "stats":
                self.bridge.call_from_thread(self.apply_stats, payload)
        self.bridge.call_from_thread(self.bridge.resolve, self._events_done, None)

    # -- forced stop ------------------------------------------------------------

    def kill_now(self) -> None:
        """Interpreter exit with the pool still open: a forced stop."""
        abandoned = len(self._in_flight) + len(self._queue)
        if abandoned:
            # The loop is gone: count here, as nobody awaits these tasks now.
            self.stats.inc_value(_STAT + "abandoned_count", abandoned)
            print(
                f"scrapy-speedup: forced stop, {abandoned} offloaded tasks abandoned",
                file=sys.stderr,
            )
        self._kill_workers("forced stop")


def warm_up_fork_server(config: SpeedupConfig) -> None:
    """Start the fork server now, in the background, with the modules every
    worker needs already imported (Scrapy alone takes ~0.3 s to import), so
    that workers start in milliseconds once the pool is created."""
    if config.process_start_method != "forkserver":
        return
    from multiprocessing import forkserver

    modules = ["scrapy_speedup._worker", "scrapy.crawler"]
    modules += [path.rpartition(".")[0] for path in config.process_pipelines]
    # Preloading ignores modules that fail to import (workers then report the
    # error themselves); once the server runs, ensure_running() does nothing.
    forkserver.set_forkserver_preload(modules)
    forkserver.ensure_running()


def _kill_live_pools() -> None:
    for pool in list(_live_pools):
        pool.kill_now()


# ProcessPoolExecutor joins its threads (and so waits for every running task)
# in a hook of threading's shutdown. After a forced stop (Ctrl-C twice) that
# could take as long as the slowest task; this hook, registered later and so
# called earlier, kills the workers of pools that were not closed first.
threading._register_atexit(_kill_live_pools)  # type: ignore[attr-defined]
