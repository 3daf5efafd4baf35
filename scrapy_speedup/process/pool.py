"""The process pool of one crawler: dispatch, faults, backpressure and drain.

Data flow::

    run_in_process / @cpu_bound / a ProcessPipeline proxy
        │ ProcessPool.run / process_item: a _Task (a Call or a ProcessItem,
        │ not yet pickled) and a waiter the caller awaits
        v
    _queue ── _pump: at most SPEEDUP_PROCESS_MAX_IN_FLIGHT in the workers,
        │    a few per worker; pickled now, as a Task message
        v
    worker socket ──> worker process: run, answer with a Result (an Outcome)
        │
    _on_readable (reactor thread): frames -> messages; the Result settles
        its task: the waiter gets the value or the error

Each worker is a ``multiprocessing`` process (``forkserver`` or ``spawn``)
with one socket to the crawl, which the reactor watches like any other
connection, rather than ``concurrent.futures.ProcessPoolExecutor``, whose
helper threads compete with a busy reactor for the GIL (docs/design.rst).
Owning the sockets also makes faults exact:

* **Bounded in-flight, and backpressure on the crawl.** At most
  ``SPEEDUP_PROCESS_MAX_IN_FLIGHT`` tasks are in the workers; the rest wait in
  a queue while their callers await. While that queue is long the pool
  pauses the engine, so that the crawl stops downloading pages that would
  only wait for the pool: memory stays what a few batches of tasks need.
* **Blame, not guesswork.** The pool knows which tasks a worker holds, and
  the worker writes the task it runs to shared memory, so when a worker dies
  only that task is retried (up to ``SPEEDUP_PROCESS_RETRY_TIMES``) or errors;
  the others go to another worker and lose nothing.
* **One bad message fails one task.** A result that cannot be unpickled
  fails its task alone; bytes that are not a message (an unknown kind, a
  frame over ``SPEEDUP_PROCESS_MAX_MESSAGE_MB``) end that worker, as a crash.
* **Timeouts** kill only the worker that runs the late task.
* **Cheap functions run inline.** A function measured below
  ``SPEEDUP_PROCESS_INLINE_BELOW_MS`` runs on the reactor thread instead
  (``run_in_process`` only): offloading it would cost more than it saves.

Everything here runs on the reactor thread.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import multiprocessing
import multiprocessing.util  # imported before atexit.register below, see there
import os
import pickle
import signal
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scrapy.exceptions import DropItem

from scrapy_speedup.downloader import SpeedupDownloader
from scrapy_speedup.exceptions import (
    OffloadError,
    PoolClosedError,
    ProtocolError,
    RemoteTraceback,
    TaskTimeoutError,
    UnpicklableError,
    WorkerCrashedError,
    WorkerInitError,
)
from scrapy_speedup.process import pickling, worker
from scrapy_speedup.process.protocol import (
    Call,
    FrameReader,
    Log,
    Outcome,
    ProcessItem,
    Result,
    Started,
    Stats,
    StatsOp,
    Stop,
    Task,
    decode,
    frame,
)

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

    from scrapy.crawler import Crawler
    from twisted.internet.defer import Deferred

    from scrapy_speedup._bridge import Bridge
    from scrapy_speedup.config import SpeedupConfig

    Waiter = asyncio.Future[Any] | Deferred[Any]

__all__ = ["ProcessPool", "warm_up_fork_server"]

logger = logging.getLogger(__name__)

# Workers that die before they finish starting (a crashing import, say) this
# many times in a row will not start: fail instead of respawning forever.
_MAX_START_CRASHES = 3
# A worker that could not be started is tried again after this long.
_RESTART_DELAY_S = 0.5
# Inline decisions use an exponentially weighted mean of run times; a new
# sample weighs this much, so a change of page sizes shows within ~10 calls.
_EWMA_WEIGHT = 0.2
_MIN_SAMPLES_FOR_INLINE = 3
_READ_SIZE = 1 << 20
# Backpressure: the engine pauses while this many tasks per in-flight place
# wait in the queue, and resumes once the queue is down to the low mark. The
# high mark keeps the workers fed through the ~20-50 ms it takes a resumed
# crawl to deliver pages again; the gap between the marks keeps the engine
# from flapping on every result. (docs/benchmarks.rst, memory.)
_BACKLOG_HIGH_PER_SLOT = 2
_BACKLOG_LOW_PER_SLOT = 1

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
    if exitcode == 255:
        # What multiprocessing reports when the fork server that started the
        # worker is gone, whatever became of the worker.
        return "exit code 255 (or its fork server died)"
    return f"exit code {exitcode}"


@dataclass(eq=False)
class _Task:
    request: Call | ProcessItem
    # What each part of the request is to the user, for pickling errors.
    parts: list[tuple[str, Any]]
    name: str
    waiter: Waiter
    queued_at: float = field(default_factory=time.monotonic)
    body: bytes | None = None  # pickled when first sent
    seq: int = 0
    attempts: int = 0  # deaths of its own worker while it ran
    timed_out: bool = False


@dataclass(eq=False)
class _Worker:
    index: int
    process: BaseProcess
    conn: Connection
    fd: int
    reader: FrameReader
    wbuf: bytearray = field(default_factory=bytearray)
    assigned: deque[_Task] = field(default_factory=deque)
    sent: int = 0  # tasks sent over its life, for SPEEDUP_PROCESS_MAX_TASKS_PER_CHILD
    ready: bool = False
    stopping: bool = False
    # Set when the pool ends it: "timeout", "shutdown", "protocol".
    killed_for: str | None = None


@dataclass
class _Timing:
    """Measured run time of one offloaded function, for the inline decision."""

    mean_ms: float = 0.0
    samples: int = 0
    inline: bool = False  # said once, when it first runs inline

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
        # Any: the stubs' BaseContext lacks Process, which both contexts have.
        self._ctx: Any = multiprocessing.get_context(config.process_start_method)
        n = config.process_workers
        self._progress: Any = self._ctx.RawArray("d", 2 * n)
        self._max_in_flight = config.process_max_in_flight
        self._per_worker = max(1, math.ceil(self._max_in_flight / n))
        self._max_message_bytes = int(config.process_max_message_mb * 2**20)
        self._backlog_high = _BACKLOG_HIGH_PER_SLOT * self._max_in_flight
        self._backlog_low = _BACKLOG_LOW_PER_SLOT * self._max_in_flight
        self._workers: list[_Worker | None] = [None] * n
        # Workers whose process is being started, by index (see _spawn).
        self._starting: dict[int, BaseProcess] = {}
        self._queue: deque[_Task] = deque()
        self._in_flight = 0
        self._seq = 0
        self._timings: dict[str, _Timing] = {}
        self._fatal: BaseException | None = None
        self._start_crashes = 0
        self._started = False
        self._closed = False
        self._abandoned = False
        self._held_since: float | None = None  # when backpressure began
        self._ready_waiters: list[Waiter] = []
        self._drained: Waiter | None = None
        self._exited: Waiter | None = None
        self._spec: worker.WorkerSpec | None = None

    # -- life cycle -------------------------------------------------------------

    def start(self) -> None:
        """Start the workers; idempotent. Needs ``crawler.spider`` when
        pipelines run in the workers (their copy of the spider is made here)."""
        if self._started:
            return
        if self._closed:
            raise PoolClosedError("the process pool of this crawl is already closed")
        self._started = True
        warm_up_fork_server(self.config)  # a no-op if the add-on started it
        self._spec = worker.WorkerSpec(
            progress=self._progress,
            crawl_pid=os.getpid(),
            log_level=logging.getLogger().getEffectiveLevel(),
            max_message_bytes=self._max_message_bytes,
            import_roots=_import_roots([self.crawler.spidercls.__module__]),
            pipelines=self._pipeline_spec(),
        )
        for index in range(self.config.process_workers):
            self._spawn(index)
        _live_pools.add(self)
        self.stats.set_value(_STAT + "workers", self.config.process_workers)
        if self.config.process_timeout_seconds is not None:
            self._schedule_timeout_check()

    def _spawn(self, index: int) -> None:
        """Start worker *index* from a thread: ``Process.start()`` waits for
        the fork server, which the first time is still importing Scrapy and
        the pipelines (0.5-1 s), and the reactor must not wait with it."""
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=worker.main,
            args=(child, self._spec, index),
            name=f"scrapy-speedup-worker-{index}",
        )
        self._progress[2 * index] = self._progress[2 * index + 1] = 0.0
        self._starting[index] = process
        self.bridge.call_in_new_thread(
            process.start, f"scrapy-speedup-start-{index}",
            partial(self._on_spawned, index, process, parent, child),
        )

    def _on_spawned(
        self, index: int, process: BaseProcess, parent: Connection, child: Connection,
        _: object, error: BaseException | None,
    ) -> None:
        self._starting.pop(index, None)
        if error is not None:  # the fork server died, no memory, ...
            parent.close()
            child.close()
            self._on_start_error(index, error)
            return
        child.close()  # the worker's end: its EOF must mean the worker is gone
        fd = parent.fileno()
        os.set_blocking(fd, False)
        new = _Worker(index, process, parent, fd, FrameReader(self._max_message_bytes))
        self._workers[index] = new
        self.bridge.watch(fd, on_read=partial(self._on_readable, new))
        self.bridge.watch(process.sentinel, on_read=partial(self._on_exit, new))
        if self._abandoned or self._fatal is not None:
            new.killed_for = "shutdown"
            process.kill()
        elif self._closed:
            new.stopping = True  # started too late for the crawl: close it at once
            self._send(new, Stop("finished").encode())

    def _on_start_error(self, index: int, exc: BaseException) -> None:
        """A worker could not be started: try again shortly (multiprocessing
        restarts a fork server that died), up to _MAX_START_CRASHES times in
        a row; a start error never reaches the reactor."""
        self._start_crashes += 1
        self.stats.inc_value(_STAT + "start_error_count")
        logger.error(
            "Could not start worker process %d: %s: %s", index, type(exc).__name__, exc,
            extra={"crawler": self.crawler},
        )
        if self._start_crashes >= _MAX_START_CRASHES:
            self._set_fatal(WorkerCrashedError(
                f"worker processes could not be started {_MAX_START_CRASHES} times in a row"
                f" (last: {type(exc).__name__}: {exc})"
            ))
        else:
            self.bridge.call_later(_RESTART_DELAY_S, self._respawn, index)

    def _respawn(self, index: int) -> None:
        if (self._workers[index] is None and index not in self._starting
                and not self._closed and not self._abandoned and self._fatal is None):
            self._spawn(index)
            self._pump()

    def _pipeline_spec(self) -> bytes | None:
        if not self.config.process_pipelines:
            return None
        spider = self.crawler.spider
        assert spider is not None, "pipelines start in workers once the spider is open"
        settings, left_settings = _picklable(self.crawler.settings.copy_to_dict())
        attrs, left_attrs = _picklable(
            {k: v for k, v in vars(spider).items() if k not in ("crawler", "settings")}
        )
        if left_settings or left_attrs:
            logger.info(
                "Not sent to the worker processes, as they cannot be pickled:"
                " settings %s; spider attributes %s",
                left_settings, left_attrs, extra={"crawler": self.crawler},
            )
        return pickle.dumps(worker.PipelineSpec(
            paths=self.config.process_pipelines,
            settings=settings,
            spidercls=type(spider),
            spider_attrs=attrs,
        ))

    def _alive(self) -> list[_Worker]:
        return [w for w in self._workers if w is not None]

    async def close(self, reason: str = "finished") -> None:
        """Wait for the tasks in flight, then stop the workers (they run the
        pipelines' ``close_spider`` and ``spider_closed`` handlers with
        *reason*), waiting at most ``SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS`` for
        each step."""
        if not await self._drain_for_close():
            return
        timeout = self.config.shutdown_timeout_seconds
        workers = self._alive()
        if workers or self._starting:
            self._exited = self.bridge.new_waiter()
            for alive in workers:
                if not alive.stopping:
                    alive.stopping = True
                    self._send(alive, Stop(reason).encode())  # it closes its pipelines, exits
            timer = self.bridge.call_later(
                timeout, self._kill_all,
                f"it had not exited {timeout} s after it was asked to close its pipelines"
                " and stop (SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS): a close_spider still"
                " running, or a non-daemon thread of its own",
            )
            await self._exited
            timer.cancel()
        _live_pools.discard(self)

    async def _drain_for_close(self) -> bool:
        """Close to new work and wait for the tasks queued and out, at most
        SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS (then they are abandoned); whether
        the pool had started, and so has workers to stop."""
        if self._closed:
            return False
        self._closed = True
        self._release_backpressure()
        if not self._started:
            return False
        if self._in_flight or self._queue:
            self._drained = self.bridge.new_waiter()
            timer = self.bridge.call_later(self.config.shutdown_timeout_seconds, self.abandon,
                                           "close")
            await self._drained
            timer.cancel()
        return True

    def abandon(self, why: str) -> None:
        """Give up the work queued and running now, because the crawl is
        stopping and SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS passed: each task errors
        for its caller (counted abandoned), the workers are killed, and later
        tasks fail at once."""
        if self._abandoned:
            return
        self._abandoned = True
        self._release_backpressure()
        waiting = self._in_flight + len(self._queue)
        if waiting:
            logger.warning(
                "%d offloaded tasks still queued or running %s s after the crawl began to"
                " stop (SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS); abandoning them (%s)",
                waiting, self.config.shutdown_timeout_seconds, why,
                extra={"crawler": self.crawler},
            )
        while self._queue:
            task = self._queue.popleft()
            self._settle(task, "abandoned", self._abandoned_error(task))
        if self._in_flight:
            self._kill_all("its task was abandoned")
        self._check_drained()

    def _abandoned_error(self, task: _Task) -> PoolClosedError:
        return PoolClosedError(
            f"{task.name} abandoned: the crawl stopped and it had not finished within"
            f" SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS ({self.config.shutdown_timeout_seconds} s)"
        )

    def _kill_all(self, why: str) -> None:
        for alive in self._alive():
            if alive.killed_for is None:
                logger.warning(
                    "Killing worker pid %s: %s", alive.process.pid, why,
                    extra={"crawler": self.crawler},
                )
                alive.killed_for = why
                alive.process.kill()

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
        if (
            timing.samples >= _MIN_SAMPLES_FOR_INLINE
            and timing.mean_ms < self.config.process_inline_below_ms
            # A timeout asks for a call that can be stopped: only a worker
            # can be.
            and self.config.process_timeout_seconds is None
        ):
            if not timing.inline:
                timing.inline = True
                logger.info(
                    "run_in_process(%s) runs inline from now on: its calls take %.2f ms on"
                    " average, less than offloading one costs"
                    " (SPEEDUP_PROCESS_INLINE_BELOW_MS = %g). Inline calls are not isolated"
                    " in a worker: set SPEEDUP_PROCESS_INLINE_BELOW_MS = 0 to keep every"
                    " call in one.", name, timing.mean_ms, self.config.process_inline_below_ms,
                    extra={"crawler": self.crawler},
                )
            return self._run_inline(func, args, kwargs, timing)
        parts = pickling.call_parts(func, args, kwargs, name)
        value, elapsed = await self._submit(Call(func, args, kwargs), parts, name)
        timing.add(elapsed * 1000)
        return value

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
        parts = [(f"the item sent to {name}", item)]
        value, _ = await self._submit(ProcessItem(index, item), parts, name)
        return value

    async def wait_ready(self) -> None:
        """Start the workers and wait until one is ready; raise
        :exc:`WorkerInitError` if the pipelines failed to start in it."""
        self.start()
        if self._fatal is not None:
            raise self._fatal
        if any(w.ready for w in self._alive()):
            return
        waiter = self.bridge.new_waiter()
        self._ready_waiters.append(waiter)
        await waiter

    async def _submit(
        self, request: Call | ProcessItem, parts: list[tuple[str, Any]], name: str
    ) -> tuple[Any, float]:
        self.stats.inc_value(_STAT + "task_count")
        if self._fatal is not None:
            self.stats.inc_value(_STAT + "error_count")
            raise self._fatal
        if self._abandoned:
            self.stats.inc_value(_STAT + "abandoned_count")
            raise PoolClosedError(f"{name}: the crawl is stopping and its pool gave up")
        if self._closed:
            self.stats.inc_value(_STAT + "error_count")
            raise PoolClosedError(f"{name}: the process pool of this crawl is closed")
        self.start()
        task = _Task(request, parts, name, self.bridge.new_waiter())
        self._queue.append(task)
        self._pump()
        self._apply_backpressure()
        try:
            result: tuple[Any, float] = await task.waiter
        except BaseException:
            if task in self._queue:
                # Its caller gave up (a cancelled await) before it was sent:
                # it never runs. (One already sent runs; see _settle.)
                self._queue.remove(task)
                self.stats.inc_value(_STAT + "cancelled_count")
                self._release_backpressure()
            raise
        return result

    def _pump(self) -> None:
        limit = self.config.process_max_tasks_per_child
        while self._queue and self._in_flight < self._max_in_flight:
            candidates = [
                w
                for w in self._workers
                if w is not None
                and w.ready
                and not w.stopping
                and w.killed_for is None
                and len(w.assigned) < self._per_worker
                and (limit is None or w.sent < limit)
            ]
            if not candidates:
                break
            target = min(candidates, key=lambda w: len(w.assigned))
            task = self._queue.popleft()
            if task.body is None:
                # Pickled only now: a task waiting in the queue holds its
                # item, not also a copy of it in bytes.
                try:
                    task.body = pickling.dumps_parts(task.request, task.parts)
                except UnpicklableError as exc:
                    self.stats.inc_value(_STAT + "unpicklable_count")
                    self._settle(task, "error", exc)
                    continue
                # The bytes say it all from here; the item is the caller's.
                task.request, task.parts = _SENT, []
            self._seq += 1
            task.seq = self._seq
            target.assigned.append(task)
            target.sent += 1
            self._in_flight += 1
            self.stats.max_value(_STAT + "in_flight_max", self._in_flight)
            self.stats.max_value(
                _STAT + "queue_wait_seconds_max", round(time.monotonic() - task.queued_at, 3)
            )
            self._send(target, Task(task.seq, task.body).encode())
            if limit is not None and target.sent >= limit:
                # Recycled: it runs close_spider and exits after this task, and
                # _on_exit starts its replacement.
                target.stopping = True
                self._send(target, Stop("worker_recycled").encode())
        self._release_backpressure()

    # -- backpressure -----------------------------------------------------------

    def _apply_backpressure(self) -> None:
        """Hold the downloader back while the queue is long: the pages it
        would download now would only wait, in memory, for the pool."""
        if self._held_since is not None or len(self._queue) < self._backlog_high:
            return
        if self._closed or self._abandoned or self._fatal is not None:
            return
        downloader = self._downloader()
        if downloader is None:
            return
        downloader.hold(self)
        self._held_since = time.monotonic()
        self.stats.inc_value(_STAT + "backpressure_count")

    def _release_backpressure(self) -> None:
        if len(self._queue) > self._backlog_low and not (
                self._closed or self._abandoned or self._fatal is not None):
            return
        if self._held_since is None:
            return
        held_for = time.monotonic() - self._held_since
        self._held_since = None
        total = self.stats.get_value(_STAT + "backpressure_seconds", 0.0) + held_for
        self.stats.set_value(_STAT + "backpressure_seconds", round(total, 3))
        downloader = self._downloader()
        if downloader is not None:
            downloader.release(self)

    def _downloader(self) -> SpeedupDownloader | None:
        engine = self.crawler.engine
        downloader = getattr(engine, "downloader", None)
        # Without the add-on's downloader (a project's own that it could not
        # fix), the pool's callers still wait; only the engine is not held.
        return downloader if isinstance(downloader, SpeedupDownloader) else None

    def has_room(self, items_in_pipelines: int) -> bool:
        """Whether *items_in_pipelines* (Scrapy's count of items in the item
        pipelines, which counts an item the moment it is handed over, before
        it reaches the pool) leave room: fewer than the workers hold plus the
        backlog's high mark. A pool that stopped always has room."""
        if self._closed or self._abandoned or self._fatal is not None:
            return True
        return items_in_pipelines < self._max_in_flight + self._backlog_high

    # -- the sockets ------------------------------------------------------------

    def _send(self, target: _Worker, payload: bytes) -> None:
        """Write a frame without ever blocking the reactor: what the socket
        does not take now is written when it becomes writable."""
        data = frame(payload)
        if not target.wbuf:
            try:
                written = os.write(target.fd, data)
            except BlockingIOError:
                written = 0
            except OSError:  # the worker is gone; its exit is handled by _on_exit
                return
            if written == len(data):
                return
            data = data[written:]
            self.bridge.watch(
                target.fd,
                on_read=partial(self._on_readable, target),
                on_write=partial(self._on_writable, target),
            )
        target.wbuf += data

    def _on_writable(self, target: _Worker) -> None:
        try:
            written = os.write(target.fd, target.wbuf)
        except BlockingIOError:
            return
        except OSError:
            written = len(target.wbuf)
        del target.wbuf[:written]
        if not target.wbuf:
            self.bridge.watch(target.fd, on_read=partial(self._on_readable, target))

    def _on_readable(self, source: _Worker) -> None:
        try:
            chunk = os.read(source.fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:  # EOF: the worker is gone, and _on_exit says how
            self.bridge.watch(source.fd)
            return
        self._feed(source, chunk)

    def _feed(self, source: _Worker, chunk: bytes) -> None:
        """Handle the messages that *chunk* completes. Nothing raised here
        may reach the reactor: a broken channel ends its worker, and a
        message that cannot be handled is logged and dropped."""
        if source.killed_for == "protocol":
            return  # already being ended; what it says cannot be trusted
        # The messages before a bad one count: they may be results of tasks
        # that ran before the one that broke the channel.
        for payload in source.reader.feed(chunk):
            try:
                message = decode(payload)
                self._on_message(source, message)
            except ProtocolError as exc:
                self._protocol_error(source, str(exc))
                return
            except Exception:
                logger.exception(
                    "scrapy-speedup: could not handle a message from worker pid %s",
                    source.process.pid, extra={"crawler": self.crawler},
                )
        if source.reader.error is not None:
            self._protocol_error(source, str(source.reader.error))

    def _protocol_error(self, source: _Worker, why: str) -> None:
        self.stats.inc_value(_STAT + "protocol_error_count")
        logger.error(
            "Worker pid %s sent bytes that are not a valid message (%s); ending it",
            source.process.pid, why, extra={"crawler": self.crawler},
        )
        if source.killed_for is None:
            source.killed_for = "protocol"
            source.process.kill()
        self.bridge.watch(source.fd)

    def _on_message(self, source: _Worker, message: Any) -> None:
        if isinstance(message, Result):
            if not source.assigned or source.assigned[0].seq != message.seq:
                expected = source.assigned[0].seq if source.assigned else None
                raise ProtocolError(
                    f"a result for task {message.seq}, while the next result due is"
                    f" for task {expected}"
                )
            task = source.assigned.popleft()
            self._in_flight -= 1
            try:
                self._on_result(task, message.body)
            finally:
                self._pump()
                self._check_drained()
        elif isinstance(message, Log):
            record = pickle.loads(message.record)
            logging.getLogger(record.name).handle(record)
        elif isinstance(message, Stats):
            self.apply_stats(pickle.loads(message.ops))
        elif isinstance(message, Started):
            self._on_started(source, message.init_error)
        else:
            raise ProtocolError(f"a worker does not send {type(message).__name__}")

    def _on_started(self, source: _Worker, init_error: str | None) -> None:
        if init_error is not None:
            self._set_fatal(
                WorkerInitError(
                    "a pipeline of SPEEDUP_PROCESS_PIPELINES failed to start in a"
                    f" worker process:\n{init_error}"
                )
            )
            return
        source.ready = True
        self._start_crashes = 0
        for waiter in self._ready_waiters:
            self.bridge.resolve(waiter, None)
        self._ready_waiters.clear()
        self._pump()

    # -- outcomes ---------------------------------------------------------------

    def _on_result(self, task: _Task, body: bytes | memoryview) -> None:
        """Settle *task* from its outcome; whatever goes wrong fails this task
        alone."""
        try:
            outcome: Outcome = pickling.loads_named(body, f"the outcome of {task.name}")
            self.apply_stats(outcome.stats)
            if outcome.ok:
                value = pickling.loads_named(outcome.value, f"the result of {task.name}")
                self._settle(task, "succeeded", (value, outcome.seconds))
                return
            exc = self._worker_error(task, outcome)
        except UnpicklableError as error:
            self.stats.inc_value(_STAT + "unpicklable_count")
            exc = error
        except Exception as error:  # noqa: BLE001 - this task fails, the crawl goes on
            exc = OffloadError(f"{task.name}: its result could not be handled: {error!r}")
            exc.__cause__ = error
        self._settle(task, "dropped" if isinstance(exc, DropItem) else "error", exc)

    def _worker_error(self, task: _Task, outcome: Outcome) -> BaseException:
        exc: BaseException | None = None
        if outcome.value:
            with contextlib.suppress(Exception):
                exc = pickle.loads(outcome.value)
        # Only an Exception is raised as itself: SystemExit or
        # KeyboardInterrupt from a worker's task, raised in the crawl, would
        # stop its event loop (asyncio lets them through).
        if not isinstance(exc, Exception):
            exc = OffloadError(
                f"{task.name} raised {outcome.error_type}"
                f"{f': {outcome.error_message}' if outcome.error_message else ''}"
                " in its worker"
            )
        exc.__cause__ = RemoteTraceback(outcome.traceback)
        if isinstance(exc, UnpicklableError):
            self.stats.inc_value(_STAT + "unpicklable_count")
        return exc

    def _on_exit(self, gone: _Worker) -> None:
        """The worker's process ended: reap it, then retry, fail or hand on
        the tasks it held, and start a replacement."""
        self.bridge.watch(gone.process.sentinel)
        self._drain(gone)  # its last frames: results, logs, close_spider stats
        self.bridge.watch(gone.fd)
        gone.conn.close()
        gone.process.join(1)
        exitcode, pid = gone.process.exitcode, gone.process.pid
        with contextlib.suppress(ValueError):  # still running: left to the OS
            gone.process.close()
        self._workers[gone.index] = None
        tasks = list(gone.assigned)
        self._in_flight -= len(tasks)
        running_seq = int(self._progress[2 * gone.index])
        running = next((t for t in tasks if t.seq == running_seq), None)
        if gone.killed_for == "protocol" and tasks:
            # The bad bytes came where the next result was due: from the
            # oldest task it holds, whatever it runs now.
            running = tasks[0]
        if gone.killed_for == "shutdown":
            for task in tasks:
                self._settle(task, "abandoned", self._abandoned_error(task))
            tasks = []
        elif gone.killed_for == "timeout":
            for task in [t for t in tasks if t.timed_out]:
                tasks.remove(task)
                self.stats.inc_value(_STAT + "timeout_count")
                self._settle(
                    task,
                    "error",
                    TaskTimeoutError(
                        f"{task.name} ran past SPEEDUP_PROCESS_TIMEOUT_SECONDS"
                        f" ({self.config.process_timeout_seconds} s); its worker pid"
                        f" {pid} was killed and replaced"
                    ),
                )
        elif tasks or exitcode != 0:
            if running is not None:
                tasks.remove(running)
            self._on_crash(gone, pid, exitcode, running)
        # What is left never started, or ran on a worker that was not at fault.
        if self._fatal is not None:
            for task in tasks:
                self._settle(task, "error", self._fatal)
        elif self._abandoned:
            for task in tasks:
                self._settle(task, "abandoned", self._abandoned_error(task))
        else:
            self._queue.extendleft(reversed(tasks))
        if self._closed or self._abandoned:
            if self._exited is not None and not self._alive() and not self._starting:
                self.bridge.resolve(self._exited, None)
        elif self._fatal is None:
            self.stats.inc_value(_STAT + "worker_restart_count")
            self._spawn(gone.index)
        self._pump()
        self._check_drained()

    def _drain(self, gone: _Worker) -> None:
        if gone.killed_for == "protocol":
            return
        while True:
            try:
                chunk = os.read(gone.fd, _READ_SIZE)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            self._feed(gone, chunk)

    def _on_crash(
        self, gone: _Worker, pid: int | None, exitcode: int | None, running: _Task | None
    ) -> None:
        if gone.killed_for != "protocol":
            self.stats.inc_value(_STAT + "worker_crash_count")
        doing = f"while running {running.name}" if running is not None else "between tasks"
        if not gone.ready:
            doing = "while starting"
            self._start_crashes += 1
        how = "was ended" if gone.killed_for == "protocol" else "died"
        logger.error(
            "Worker pid %s %s with %s %s%s",
            pid,
            how,
            _describe_exit(exitcode),
            doing,
            f" (attempt {running.attempts + 1} of {self.config.process_retry_times + 1})"
            if running is not None
            else "",
            extra={"crawler": self.crawler},
        )
        if self._start_crashes >= _MAX_START_CRASHES:
            self._set_fatal(
                WorkerCrashedError(
                    f"worker processes died while starting {_MAX_START_CRASHES} times in"
                    f" a row (last: pid {pid}, {_describe_exit(exitcode)})"
                )
            )
        if running is None:
            return
        running.attempts += 1
        if running.attempts > self.config.process_retry_times:
            self._settle(
                running,
                "error",
                WorkerCrashedError(
                    f"{running.name}: its worker process died {running.attempts} times"
                    f" (last: pid {pid}, {_describe_exit(exitcode)});"
                    f" SPEEDUP_PROCESS_RETRY_TIMES is {self.config.process_retry_times}"
                ),
            )
        elif self._fatal is None and not self._abandoned:
            self.stats.inc_value(_STAT + "retry_count")
            self._queue.appendleft(running)
        else:
            self._settle(running, "abandoned", self._abandoned_error(running))

    def _set_fatal(self, error: BaseException) -> None:
        """The pool cannot work: fail everything waiting, now and later."""
        self._fatal = error
        while self._queue:
            self._settle(self._queue.popleft(), "error", error)
        for waiter in self._ready_waiters:
            self.bridge.fail(waiter, error)
        self._ready_waiters.clear()
        self._release_backpressure()

    def _settle(self, task: _Task, outcome: str, value: Any) -> None:
        """Count the task's end and hand the result or error to its caller."""
        if not self.bridge.is_pending(task.waiter):
            outcome = "cancelled"  # its caller stopped waiting while it ran
        self.stats.inc_value(f"{_STAT}{outcome}_count")
        if outcome == "succeeded":
            self.bridge.resolve(task.waiter, value)
        else:
            self.bridge.fail(task.waiter, value)

    def _check_drained(self) -> None:
        if self._drained is not None and not self._in_flight and not self._queue:
            self.bridge.resolve(self._drained, None)

    def _schedule_timeout_check(self) -> None:
        timeout = self.config.process_timeout_seconds
        assert timeout is not None
        # Often enough to stop a task within ~25% of its timeout, at most once
        # a second: a look at a few shared doubles.
        self.bridge.call_later(min(1.0, timeout / 4), self._check_timeouts)

    def _check_timeouts(self) -> None:
        if self._closed and not self._alive():
            return
        try:
            self._kill_late_workers()
        finally:
            self._schedule_timeout_check()

    def _kill_late_workers(self) -> None:
        timeout = self.config.process_timeout_seconds
        assert timeout is not None
        now = time.monotonic()
        for alive in self._alive():
            if not alive.assigned or alive.killed_for is not None:
                continue
            seq, started = self._progress[2 * alive.index : 2 * alive.index + 2]
            task = alive.assigned[0]
            if int(seq) == task.seq and now - started > timeout:
                logger.error(
                    "%s ran past SPEEDUP_PROCESS_TIMEOUT_SECONDS (%s s); killing its"
                    " worker pid %s",
                    task.name,
                    timeout,
                    alive.process.pid,
                    extra={"crawler": self.crawler},
                )
                task.timed_out = True
                alive.killed_for = "timeout"
                alive.process.kill()

    def apply_stats(self, ops: list[StatsOp]) -> None:
        """Replay a worker's stats changes; a change the crawl's collector
        refuses (a value of another type under the same key) is logged once
        per key and skipped, never raised into the pool."""
        for op in ops:
            try:
                method, key, value = op
                if method not in ("set_value", "inc_value", "max_value", "min_value"):
                    raise ValueError(f"unknown stats method {method!r}")
                getattr(self.stats, method)(key, value)
            except Exception as exc:  # noqa: BLE001 - one bad stat is not worth a task
                logger.warning(
                    "A stats change from a worker process could not be applied"
                    " (%r): %s: %s", op, type(exc).__name__, exc,
                    extra={"crawler": self.crawler},
                )

    # -- forced stop ------------------------------------------------------------

    def kill_now(self) -> None:
        """Interpreter exit with the pool still open: a forced stop."""
        abandoned = self._in_flight + len(self._queue)
        if abandoned:
            # The loop is gone: count here, as nobody awaits these tasks now.
            self.stats.inc_value(_STAT + "abandoned_count", abandoned)
            print(
                f"scrapy-speedup: forced stop, {abandoned} offloaded tasks abandoned",
                file=sys.stderr,
            )
        for alive in self._alive():
            alive.process.kill()
        for starting in self._starting.values():
            with contextlib.suppress(Exception):  # not started yet: nothing to kill
                starting.kill()


# Stands in for a task's request once it is pickled; see _pump.
_SENT: Any = None


def _picklable(values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The entries of *values* that pickle, and the names of those that do not."""
    kept, left = {}, []
    for key, value in values.items():
        try:
            pickle.dumps(value)
        except Exception:  # noqa: BLE001 - any pickling error means "leave it"
            left.append(key)
        else:
            kept[key] = value
    return kept, left


def _import_roots(module_names: list[str], *, all_roots: bool = False) -> tuple[str, ...]:
    """The folders a worker needs on its ``sys.path`` to import these modules
    that are not on the crawl's own ``sys.path`` (a worker starts with that):
    ``scrapy runspider file.py`` puts the file's folder there only while it
    imports the file. *all_roots*: those on it too, for a worker that does
    not start with the crawl's ``sys.path`` (a Dask worker)."""
    on_path = set() if all_roots else \
        {os.path.realpath(entry or os.curdir) for entry in sys.path}
    roots: list[str] = []
    for name in module_names:
        file = getattr(sys.modules.get(name), "__file__", None)
        if not file:
            continue
        root = Path(file).resolve().parent
        levels = name.count(".") + (Path(file).stem == "__init__")
        for _ in range(levels):
            root = root.parent
        if str(root) not in on_path and str(root) not in roots:
            roots.append(str(root))
    return tuple(roots)


def warm_up_fork_server(config: SpeedupConfig) -> None:
    """Start the fork server now, in the background, with the modules every
    worker needs already imported (Scrapy alone takes ~0.3 s to import), so
    that workers start in milliseconds once the pool is created."""
    if config.process_start_method != "forkserver":
        return
    from multiprocessing import forkserver

    modules = ["scrapy_speedup.process.worker", "scrapy.crawler"]
    modules += [path.rpartition(".")[0] for path in config.process_pipelines]
    if config.crawl_processes > 1:
        modules.append("scrapy_speedup.crawl.engine_process")
    # Preloading ignores modules that fail to import (workers then report the
    # error themselves); once the server runs, ensure_running() does nothing.
    forkserver.set_forkserver_preload(modules)
    # Ctrl-C signals the whole process group, and so does SIGTERM from systemd
    # or `kill -- -PGID`: a fork server still importing Scrapy would die of
    # SIGINT (it ignores it only once its imports are done) and of SIGTERM
    # at any time, and take the pool's start or its replacement workers with
    # it. A disposition of SIG_IGN is inherited across exec, and Python leaves
    # an ignored signal ignored, so the server is started with both ignored
    # (it still ends when the crawl does: it watches a pipe from the crawl);
    # meanwhile they are blocked here, so that one arriving in that moment is
    # delayed, not lost.
    if threading.current_thread() is not threading.main_thread():
        forkserver.ensure_running()  # signals can only be changed there
        return
    stops = {signal.SIGINT, signal.SIGTERM}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    handlers = {signum: signal.signal(signum, signal.SIG_IGN) for signum in stops}
    try:
        forkserver.ensure_running()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _kill_live_pools() -> None:
    for pool in list(_live_pools):
        pool.kill_now()


# At exit, multiprocessing joins every worker it started, which after a forced
# stop (Ctrl-C twice) waits for the slowest task. atexit runs handlers last in,
# first out, and multiprocessing.util registered its own on import (above), so
# this one runs first and kills the workers of pools that were not closed.
atexit.register(_kill_live_pools)
