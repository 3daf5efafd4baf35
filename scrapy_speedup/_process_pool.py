"""The process pool of one crawler: dispatch, faults, backpressure and drain.

Each worker is a ``multiprocessing`` process (``forkserver`` or ``spawn``)
with one socket to the crawl, which the reactor watches like any other
connection: tasks are written to it and results read from it on the reactor
thread. ``concurrent.futures.ProcessPoolExecutor`` was the first design; it
costs the crawl ~0.4 ms of CPU and three thread hand-offs per task (its
manager and feeder threads compete with a busy reactor for the GIL), which
kept a 2-core crawl at 1.35x instead of near 2x (docs/benchmarks.rst). Owning
the sockets also makes faults exact:

* **Bounded in-flight.** Each worker holds at most ``max_in_flight / workers``
  tasks (one running, the rest queued in its socket so it never idles while
  the reactor is busy); the rest wait in a queue while their callers await, so
  Scrapy's scraper slot fills and the downloader waits: a slow pool slows the
  crawl.
* **Blame, not guesswork.** The pool knows which tasks a worker holds, and
  the worker writes the task it runs to shared memory, so when a worker dies
  only that task is retried (up to ``SPEEDUP_PROCESS_RETRY_TIMES``) or errors;
  the others go to another worker and lose nothing.
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
import struct
import sys
import time
import weakref
from collections import deque
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
# Inline decisions use an exponentially weighted mean of run times; a new
# sample weighs this much, so a change of page sizes shows within ~10 calls.
_EWMA_WEIGHT = 0.2
_MIN_SAMPLES_FOR_INLINE = 3
# multiprocessing's frame header: a signed 32-bit length, or -1 then 64 bits.
_HEADER = struct.Struct("!i")
_BIG_HEADER = struct.Struct("!Q")
_READ_SIZE = 1 << 20

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


def _frame(data: bytes) -> bytes:
    """*data* framed as ``multiprocessing.Connection.recv_bytes`` expects."""
    if len(data) > 0x7FFFFFFF:
        return _HEADER.pack(-1) + _BIG_HEADER.pack(len(data)) + data
    return _HEADER.pack(len(data)) + data


@dataclass(eq=False)
class _Task:
    payload: bytes
    name: str
    waiter: Waiter
    queued_at: float = field(default_factory=time.monotonic)
    seq: int = 0
    attempts: int = 0  # deaths of its own worker while it ran
    timed_out: bool = False


@dataclass(eq=False)
class _Worker:
    index: int
    process: BaseProcess
    conn: Connection
    fd: int
    rbuf: bytearray = field(default_factory=bytearray)
    wbuf: bytearray = field(default_factory=bytearray)
    assigned: deque[_Task] = field(default_factory=deque)
    sent: int = 0  # tasks sent over its life, for SPEEDUP_PROCESS_MAX_TASKS_PER_CHILD
    ready: bool = False
    stopping: bool = False
    killed_for: str | None = None  # set when the pool kills it: "timeout", "shutdown"


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
        # Any: the stubs' BaseContext lacks Process, which both contexts have.
        self._ctx: Any = multiprocessing.get_context(config.process_start_method)
        n = config.process_workers
        self._progress: Any = self._ctx.RawArray("d", 2 * n)
        self._per_worker = max(1, math.ceil(config.process_max_in_flight / n))
        self._workers: list[_Worker | None] = [None] * n
        self._queue: deque[_Task] = deque()
        self._in_flight = 0
        self._seq = 0
        self._timings: dict[str, _Timing] = {}
        self._fatal: BaseException | None = None
        self._start_crashes = 0
        self._started = False
        self._closed = False
        self._ready_waiters: list[Waiter] = []
        self._drained: Waiter | None = None
        self._exited: Waiter | None = None
        self._spec: _worker.WorkerSpec | None = None

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
        self._spec = _worker.WorkerSpec(
            progress=self._progress,
            log_level=logging.getLogger().getEffectiveLevel(),
            pipelines=self._pipeline_spec(),
        )
        for index in range(self.config.process_workers):
            self._spawn(index)
        _live_pools.add(self)
        self.stats.set_value(_STAT + "workers", self.config.process_workers)
        if self.config.process_timeout_seconds is not None:
            self._schedule_timeout_check()

    def _spawn(self, index: int) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker.main,
            args=(child, self._spec, index),
            name=f"scrapy-speedup-worker-{index}",
        )
        process.start()
        child.close()  # the worker's end: its EOF must mean the worker is gone
        fd = parent.fileno()
        os.set_blocking(fd, False)
        worker = _Worker(index, process, parent, fd)
        self._progress[2 * index] = self._progress[2 * index + 1] = 0.0
        self._workers[index] = worker
        self.bridge.watch(fd, on_read=partial(self._on_readable, worker))
        self.bridge.watch(process.sentinel, on_read=partial(self._on_exit, worker))

    def _pipeline_spec(self) -> _worker.PipelineSpec | None:
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
        return _worker.PipelineSpec(
            paths=self.config.process_pipelines,
            settings=settings,
            spidercls=type(spider),
            spider_attrs=attrs,
        )

    def _alive(self) -> list[_Worker]:
        return [w for w in self._workers if w is not None]

    async def close(self) -> None:
        """Wait for the tasks in flight, then stop the workers (they run the
        pipelines' ``close_spider``), waiting at most
        ``SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS`` for each step."""
        if self._closed:
            return
        self._closed = True
        if not self._started:
            return
        timeout = self.config.shutdown_timeout_seconds
        if self._in_flight or self._queue:
            self._drained = self.bridge.new_waiter()
            timer = self.bridge.call_later(timeout, self._give_up_drain)
            await self._drained
            timer.cancel()
        workers = self._alive()
        if workers:
            self._exited = self.bridge.new_waiter()
            for worker in workers:
                worker.stopping = True
                self._send(worker, b"")  # asks the worker to close and exit
            timer = self.bridge.call_later(timeout, self._kill_all, "shutdown")
            await self._exited
            timer.cancel()
        _live_pools.discard(self)

    def _give_up_drain(self) -> None:
        logger.warning(
            "%d offloaded tasks still running after SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS"
            " (%s s); abandoning them",
            self._in_flight + len(self._queue),
            self.config.shutdown_timeout_seconds,
            extra={"crawler": self.crawler},
        )
        while self._queue:
            task = self._queue.popleft()
            self._settle(task, "abandoned", PoolClosedError(f"{task.name} abandoned"))
        self._kill_all("shutdown")
        self._check_drained()

    def _kill_all(self, why: str) -> None:
        for worker in self._alive():
            if worker.killed_for is None:
                logger.warning(
                    "Killing worker pid %s: %s", worker.process.pid, why,
                    extra={"crawler": self.crawler},
                )
                worker.killed_for = why
                worker.process.kill()

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
        ):
            return self._run_inline(func, args, kwargs, timing)
        payload = _pickling.dumps_message("call", _pickling.call_parts(func, args, kwargs, name))
        value, elapsed = await self._submit(payload, name)
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
        payload = _pickling.dumps_message("item", [("", index), (f"the item sent to {name}", item)])
        value, _ = await self._submit(payload, name)
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

    async def _submit(self, payload: bytes, name: str) -> tuple[Any, float]:
        self.stats.inc_value(_STAT + "task_count")
        if self._fatal is not None:
            self.stats.inc_value(_STAT + "error_count")
            raise self._fatal
        if self._closed:
            self.stats.inc_value(_STAT + "error_count")
            raise PoolClosedError(f"{name}: the process pool of this crawl is closed")
        self.start()
        task = _Task(payload, name, self.bridge.new_waiter())
        self._queue.append(task)
        self._pump()
        result: tuple[Any, float] = await task.waiter
        return result

    def _pump(self) -> None:
        limit = self.config.process_max_tasks_per_child
        while self._queue:
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
                return
            worker = min(candidates, key=lambda w: len(w.assigned))
            task = self._queue.popleft()
            self._seq += 1
            task.seq = self._seq
            worker.assigned.append(task)
            worker.sent += 1
            self._in_flight += 1
            self.stats.max_value(_STAT + "in_flight_max", self._in_flight)
            self.stats.max_value(
                _STAT + "queue_wait_seconds_max", round(time.monotonic() - task.queued_at, 3)
            )
            self._send(worker, _worker.SEQ.pack(task.seq) + task.payload)
            if limit is not None and worker.sent >= limit:
                # Recycled: it runs close_spider and exits after this task, and
                # _on_exit starts its replacement.
                worker.stopping = True
                self._send(worker, b"")

    # -- the sockets ------------------------------------------------------------

    def _send(self, worker: _Worker, data: bytes) -> None:
        """Write a frame without ever blocking the reactor: what the socket
        does not take now is written when it becomes writable."""
        frame = _frame(data)
        if not worker.wbuf:
            try:
                written = os.write(worker.fd, frame)
            except BlockingIOError:
                written = 0
            except OSError:  # the worker is gone; its exit is handled by _on_exit
                return
            if written == len(frame):
                return
            frame = frame[written:]
            self.bridge.watch(
                worker.fd,
                on_read=partial(self._on_readable, worker),
                on_write=partial(self._on_writable, worker),
            )
        worker.wbuf += frame

    def _on_writable(self, worker: _Worker) -> None:
        try:
            written = os.write(worker.fd, worker.wbuf)
        except BlockingIOError:
            return
        except OSError:
            written = len(worker.wbuf)
        del worker.wbuf[:written]
        if not worker.wbuf:
            self.bridge.watch(worker.fd, on_read=partial(self._on_readable, worker))

    def _on_readable(self, worker: _Worker) -> None:
        try:
            chunk = os.read(worker.fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:  # EOF: the worker is gone, and _on_exit says how
            self.bridge.watch(worker.fd)
            return
        worker.rbuf += chunk
        self._read_frames(worker)

    def _read_frames(self, worker: _Worker) -> None:
        buf, pos = worker.rbuf, 0
        while len(buf) - pos >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf, pos)
            start = pos + _HEADER.size
            if size == -1:
                if len(buf) - start < _BIG_HEADER.size:
                    break
                (size,) = _BIG_HEADER.unpack_from(buf, start)
                start += _BIG_HEADER.size
            if len(buf) - start < size:
                break
            frame = bytes(buf[start : start + size])
            pos = start + size
            self._on_frame(worker, frame)
        del buf[:pos]

    def _on_frame(self, worker: _Worker, frame: bytes) -> None:
        kind = frame[:1]
        if kind == _worker.RESULT:
            (seq,) = _worker.SEQ.unpack_from(frame, 1)
            task = worker.assigned.popleft()
            assert task.seq == seq, (task.seq, seq)
            self._in_flight -= 1
            self._on_result(task, memoryview(frame)[1 + _worker.SEQ.size :])
            self._pump()
            self._check_drained()
        elif kind == _worker.LOG:
            record = pickle.loads(frame[1:])
            logging.getLogger(record.name).handle(record)
        elif kind == _worker.STATS:
            self.apply_stats(pickle.loads(frame[1:]))
        elif kind == _worker.STARTED:
            init_error = pickle.loads(frame[1:])
            if init_error is None:
                worker.ready = True
                self._start_crashes = 0
                for waiter in self._ready_waiters:
                    self.bridge.resolve(waiter, None)
                self._ready_waiters.clear()
                self._pump()
            else:
                self._set_fatal(
                    WorkerInitError(
                        "a pipeline of SPEEDUP_PROCESS_PIPELINES failed to start in a"
                        f" worker process:\n{init_error}"
                    )
                )

    # -- outcomes ---------------------------------------------------------------

    def _on_result(self, task: _Task, raw: memoryview) -> None:
        status, value, stats_ops, elapsed = _pickling.loads(raw)
        self.apply_stats(stats_ops)
        if status == _worker.OK:
            self._settle(task, "succeeded", (_pickling.loads(value), elapsed))
            return
        exc, kind, message, tb = value
        if exc is None:
            exc = OffloadError(f"{task.name} raised {kind}: {message}")
        exc.__cause__ = RemoteTraceback(tb)
        if isinstance(exc, UnpicklableError):
            self.stats.inc_value(_STAT + "unpicklable_count")
        self._settle(task, "dropped" if isinstance(exc, DropItem) else "error", exc)

    def _on_exit(self, worker: _Worker) -> None:
        """The worker's process ended: reap it, then retry, fail or hand on
        the tasks it held, and start a replacement."""
        self.bridge.watch(worker.process.sentinel)
        self._drain(worker)  # its last frames: results, logs, close_spider stats
        self.bridge.watch(worker.fd)
        worker.conn.close()
        worker.process.join(1)
        exitcode, pid = worker.process.exitcode, worker.process.pid
        with contextlib.suppress(ValueError):  # still running: left to the OS
            worker.process.close()
        self._workers[worker.index] = None
        tasks = list(worker.assigned)
        self._in_flight -= len(tasks)
        running_seq = int(self._progress[2 * worker.index])
        running = tasks[0] if tasks and tasks[0].seq == running_seq else None
        if worker.killed_for == "shutdown":
            for task in tasks:
                self._settle(task, "abandoned", PoolClosedError(f"{task.name} abandoned"))
            tasks = []
        elif worker.killed_for == "timeout":
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
            self._on_crash(worker, pid, exitcode, running)
        # What is left never started, or ran on a worker that was not at fault.
        if self._fatal is not None:
            for task in tasks:
                self._settle(task, "error", self._fatal)
        else:
            self._queue.extendleft(reversed(tasks))
        if self._closed:
            if self._exited is not None and not self._alive():
                self.bridge.resolve(self._exited, None)
        elif self._fatal is None:
            self.stats.inc_value(_STAT + "worker_restart_count")
            self._spawn(worker.index)
        self._pump()
        self._check_drained()

    def _drain(self, worker: _Worker) -> None:
        while True:
            try:
                chunk = os.read(worker.fd, _READ_SIZE)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            worker.rbuf += chunk
        self._read_frames(worker)

    def _on_crash(
        self, worker: _Worker, pid: int | None, exitcode: int | None, running: _Task | None
    ) -> None:
        self.stats.inc_value(_STAT + "worker_crash_count")
        doing = f"while running {running.name}" if running is not None else "between tasks"
        if not worker.ready:
            doing = "while starting"
            self._start_crashes += 1
        logger.error(
            "Worker pid %s died with %s %s%s",
            pid,
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
        elif self._fatal is None:
            self.stats.inc_value(_STAT + "retry_count")
            self._queue.appendleft(running)

    def _set_fatal(self, error: BaseException) -> None:
        """The pool cannot work: fail everything waiting, now and later."""
        self._fatal = error
        while self._queue:
            self._settle(self._queue.popleft(), "error", error)
        for waiter in self._ready_waiters:
            self.bridge.fail(waiter, error)
        self._ready_waiters.clear()

    def _settle(self, task: _Task, outcome: str, value: Any) -> None:
        """Count the task's end and hand the result or error to its caller."""
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
        timeout = self.config.process_timeout_seconds
        assert timeout is not None
        now = time.monotonic()
        for worker in self._alive():
            if not worker.assigned or worker.killed_for is not None:
                continue
            seq, started = self._progress[2 * worker.index : 2 * worker.index + 2]
            task = worker.assigned[0]
            if int(seq) == task.seq and now - started > timeout:
                logger.error(
                    "%s ran past SPEEDUP_PROCESS_TIMEOUT_SECONDS (%s s); killing its"
                    " worker pid %s",
                    task.name,
                    timeout,
                    worker.process.pid,
                    extra={"crawler": self.crawler},
                )
                task.timed_out = True
                worker.killed_for = "timeout"
                worker.process.kill()
        self._schedule_timeout_check()

    def apply_stats(self, ops: list[_worker.StatsOp]) -> None:
        for method, key, value in ops:
            getattr(self.stats, method)(key, value)

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
        for worker in self._alive():
            worker.process.kill()


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


# At exit, multiprocessing joins every worker it started, which after a forced
# stop (Ctrl-C twice) waits for the slowest task. atexit runs handlers last in,
# first out, and multiprocessing.util registered its own on import (above), so
# this one runs first and kills the workers of pools that were not closed.
atexit.register(_kill_live_pools)
