"""What runs inside a worker process of the process pool.

Each worker is set up once by :func:`initialize` (signals, log forwarding, the
pipelines of ``SPEEDUP_PROCESS_PIPELINES``), then runs :func:`run_task` for each
task. Tasks and results cross as pickled bytes so that a pickling error names
the argument or field that failed (see ``_pickling``). Everything a task
reports (result, stats calls, run time) comes back in its result; what happens
outside a task (log records, ``close_spider`` at exit) goes through the
``events`` queue, read by a thread of the parent.
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import os
import signal
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing import util
from typing import TYPE_CHECKING, Any

from scrapy.statscollectors import MemoryStatsCollector

from scrapy_speedup import _pickling
from scrapy_speedup.exceptions import UnpicklableError

if TYPE_CHECKING:
    from multiprocessing.queues import SimpleQueue

    from scrapy import Spider
    from scrapy.crawler import Crawler

__all__ = ["PipelineSpec", "WorkerSpec", "initialize", "run_task"]

logger = logging.getLogger(__name__)

# Result statuses.
OK = "ok"
ERROR = "error"
INIT_ERROR = "init_error"

# Stats operations recorded in the worker and replayed on the crawl's stats.
StatsOp = tuple[str, str, Any]


@dataclass
class PipelineSpec:
    """How to build, in a worker, the pipelines that run there."""

    paths: tuple[str, ...]
    settings: dict[str, Any]
    spidercls: type[Spider]
    spider_attrs: dict[str, Any]


@dataclass
class WorkerSpec:
    """Sent to every worker when it starts (as the pool's initializer argument)."""

    # Two doubles per in-flight slot: the pid of the worker that runs the
    # slot's task and the time.monotonic() it started. Shared memory, so the
    # parent knows which task was on a worker that died or hangs.
    slots: Any
    events: SimpleQueue[Any]
    log_level: int
    pipelines: PipelineSpec | None = None


class _RecordingStats(MemoryStatsCollector):
    """A stats collector that also records every change, so that the worker can
    send the changes to the crawl's real stats collector."""

    def __init__(self, crawler: Crawler) -> None:
        super().__init__(crawler)
        self.ops: list[StatsOp] = []

    def take_ops(self) -> list[StatsOp]:
        ops, self.ops = self.ops, []
        return ops

    def set_value(self, key: str, value: Any, spider: Spider | None = None) -> None:
        self.ops.append(("set_value", key, value))
        super().set_value(key, value)

    def inc_value(
        self, key: str, count: int = 1, start: int = 0, spider: Spider | None = None
    ) -> None:
        self.ops.append(("inc_value", key, count))
        super().inc_value(key, count, start)

    def max_value(self, key: str, value: Any, spider: Spider | None = None) -> None:
        self.ops.append(("max_value", key, value))
        super().max_value(key, value)

    def min_value(self, key: str, value: Any, spider: Spider | None = None) -> None:
        self.ops.append(("min_value", key, value))
        super().min_value(key, value)


class _EventHandler(logging.handlers.QueueHandler):
    """Forwards log records to the parent, which logs them as its own."""

    # Only the standard attributes travel: extras such as ``spider`` hold
    # objects that are not worth (or not able to be) pickled.
    _KEEP = frozenset(logging.makeLogRecord({}).__dict__) | {"message"}

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = super().prepare(record)
        record.__dict__ = {k: v for k, v in record.__dict__.items() if k in self._KEEP}
        record.msg = f"[worker {os.getpid()}] {record.msg}"
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        self.queue.put(("log", record))


@dataclass
class _State:
    spec: WorkerSpec
    loop: asyncio.AbstractEventLoop | None = None
    crawler: Crawler | None = None
    pipelines: list[Any] = field(default_factory=list)
    init_error: str | None = None


_state: _State | None = None


def initialize(spec: WorkerSpec) -> None:
    """The pool's initializer. It never raises: an exception here would break
    the pool with no message, so a failure is kept and reported by each task."""
    global _state  # noqa: PLW0603 - one state per worker process
    # Ctrl-C in a terminal signals the whole process group; the parent decides
    # how the crawl stops, and the worker must finish the task it has.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    root.addHandler(_EventHandler(spec.events))
    root.setLevel(spec.log_level)
    _state = _State(spec)
    if spec.pipelines is not None:
        try:
            _open_pipelines(_state, spec.pipelines)
        except Exception:  # noqa: BLE001 - reported to the parent by run_task
            _state.init_error = traceback.format_exc()
        util.Finalize(None, _close_pipelines, exitpriority=10)


def _call(state: _State, method: Any, *args: Any) -> Any:
    """Call a pipeline method that may be sync, a coroutine or a Deferred."""
    from twisted.internet.defer import Deferred

    result = method(*args)
    if asyncio.iscoroutine(result):
        if state.loop is None:
            state.loop = asyncio.new_event_loop()
        return state.loop.run_until_complete(result)
    if isinstance(result, Deferred):
        if not result.called:
            raise RuntimeError(
                f"{method.__qualname__}() returned a Deferred that needs the"
                " reactor; worker processes run no reactor. Make it a plain or"
                " async def method, or leave it out of SPEEDUP_PROCESS_PIPELINES."
            )
        outcome: list[Any] = []
        result.addBoth(outcome.append)
        value = outcome[0]
        from twisted.python.failure import Failure

        if isinstance(value, Failure):
            value.raiseException()
        return value
    return result


def _spider_args(method: Any, spider: Spider) -> tuple[Any, ...]:
    from scrapy.utils.deprecate import argument_is_required

    return (spider,) if argument_is_required(method, "spider") else ()


def _open_pipelines(state: _State, spec: PipelineSpec) -> None:
    from scrapy.crawler import Crawler
    from scrapy.exceptions import NotConfigured
    from scrapy.utils.misc import build_from_crawler, load_object

    crawler = Crawler(spec.spidercls, spec.settings)
    crawler.stats = _RecordingStats(crawler)
    # The spider is not built again (its __init__ may need arguments or do
    # work); a copy of its attributes stands in for it.
    spider = spec.spidercls.__new__(spec.spidercls)
    spider.__dict__.update(spec.spider_attrs)
    spider._set_crawler(crawler)
    crawler.spider = spider
    crawler.settings.freeze()
    state.crawler = crawler
    for path in spec.paths:
        try:
            pipeline = build_from_crawler(load_object(path), crawler)
        except NotConfigured as exc:
            # As inline: a pipeline that raises NotConfigured is left out.
            logger.warning("Disabled %s in the worker: %s", path, exc)
            pipeline = None
        if pipeline is not None and hasattr(pipeline, "open_spider"):
            _call(state, pipeline.open_spider, *_spider_args(pipeline.open_spider, spider))
        state.pipelines.append(pipeline)


def _close_pipelines() -> None:
    state = _state
    if state is None or state.crawler is None:
        return
    spider = state.crawler.spider
    for pipeline in reversed(state.pipelines):
        if pipeline is None or not hasattr(pipeline, "close_spider"):
            continue
        try:
            _call(state, pipeline.close_spider, *_spider_args(pipeline.close_spider, spider))
        except Exception:
            logger.exception("Error in %s.close_spider()", type(pipeline).__qualname__)
    stats = state.crawler.stats
    assert isinstance(stats, _RecordingStats)
    ops = stats.take_ops()
    if ops:
        state.spec.events.put(("stats", ops))


def _error_payload(exc: BaseException) -> tuple[BaseException | None, str, str, str]:
    tb = "".join(traceback.format_exception(exc))
    kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        exc_copy = _pickling.loads(_pickling.dumps(exc, "the exception"))
    except Exception:  # noqa: BLE001 - the parent rebuilds a generic error
        exc_copy = None
    return exc_copy, kind, str(exc), tb


def run_task(slot: int, payload: bytes) -> bytes:
    """Run one task; always return pickled ``(status, value, stats_ops, seconds)``.

    For ``OK`` the value is itself pickled bytes; for ``ERROR`` it is
    ``(exception or None, type name, message, traceback text)``.
    """
    state = _state
    assert state is not None, "the worker was not initialized"
    slots = state.spec.slots
    slots[2 * slot] = os.getpid()
    slots[2 * slot + 1] = time.monotonic()
    if state.init_error is not None:
        return _pickling.dumps((INIT_ERROR, state.init_error, [], 0.0), "init error")
    op, *data = _pickling.loads(payload)
    started = time.perf_counter()
    what = "the result"
    try:
        if op == "call":
            func, args, kwargs = data
            func = getattr(func, "__speedup_wrapped__", func)
            what = f"the result of {getattr(func, '__qualname__', func)}()"
            value = func(*args, **kwargs)
        elif op == "item":
            index, item = data
            pipeline = state.pipelines[index]
            if pipeline is None:  # disabled by NotConfigured in the worker
                value = item
            else:
                what = f"the item returned by {type(pipeline).__qualname__}.process_item()"
                assert state.crawler is not None
                method = pipeline.process_item
                value = _call(
                    state, method, item, *_spider_args(method, state.crawler.spider)
                )
        else:  # "ping": makes a worker start, and reports its init error
            value = os.getpid()
        status: str = OK
    except Exception as exc:  # noqa: BLE001 - every error goes to the parent
        status, value = ERROR, _error_payload(exc)
    elapsed = time.perf_counter() - started
    stats = state.crawler.stats if state.crawler is not None else None
    ops = stats.take_ops() if isinstance(stats, _RecordingStats) else []
    if status == OK:
        # Pickled on its own so that an error's path starts at the value.
        try:
            value = _pickling.dumps(value, what)
        except UnpicklableError as exc:
            status, value = ERROR, _error_payload(exc)
    return _pickling.dumps((status, value, ops, elapsed), "the task's outcome")
