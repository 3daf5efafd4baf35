"""What runs inside a worker process of the process pool.

A worker talks to the crawl over one socket (a ``multiprocessing`` duplex
``Connection``). Frames from the crawl are tasks, ``seq`` (8 bytes) followed
by the pickled task, and an empty frame asks the worker to stop. Frames to
the crawl start with one byte that says what follows:

* ``I`` the worker started: pickled ``None``, or the traceback of the pipeline
  that failed to start;
* ``R`` a result: ``seq`` then the pickled outcome (see :func:`run_task`);
* ``L`` a pickled log record, logged by the crawl as its own;
* ``S`` pickled stats changes made outside any task (``close_spider``).

Tasks and results cross as pickled bytes so that a pickling error names the
argument or field that failed (see ``_pickling``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import struct
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from scrapy.statscollectors import MemoryStatsCollector

from scrapy_speedup import _pickling
from scrapy_speedup.exceptions import UnpicklableError

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from scrapy import Spider
    from scrapy.crawler import Crawler

__all__ = ["SEQ", "PipelineSpec", "WorkerSpec", "main", "run_task"]

logger = logging.getLogger(__name__)

#: The task number that heads task and result frames.
SEQ = struct.Struct("!Q")

# Result statuses.
OK = "ok"
ERROR = "error"

# Frame kinds, worker to crawl.
STARTED = b"I"
RESULT = b"R"
LOG = b"L"
STATS = b"S"

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
    """Sent to every worker when it starts."""

    # Two doubles per worker: the seq of the task it runs and the
    # time.monotonic() it started it. Shared memory, so that the crawl knows
    # which task was running when a worker dies or overruns its timeout, at no
    # cost per task.
    progress: Any
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


class _Channel:
    """The worker's end of the socket; sends are locked because user code may
    log from threads of its own."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, kind: bytes, payload: bytes) -> None:
        with self._lock:
            self.conn.send_bytes(kind + payload)


class _LogHandler(logging.Handler):
    """Forwards log records to the crawl, which logs them as its own."""

    # Only the standard attributes travel: extras such as ``spider`` hold
    # objects that are not worth (or not able to be) pickled.
    _KEEP = frozenset(logging.makeLogRecord({}).__dict__)

    def __init__(self, channel: _Channel) -> None:
        super().__init__()
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            clean = logging.makeLogRecord(
                {k: v for k, v in record.__dict__.items() if k in self._KEEP}
            )
            clean.msg, clean.args, clean.exc_info = f"[worker {os.getpid()}] {message}", None, None
            self.channel.send(LOG, pickle.dumps(clean))
        except Exception:  # noqa: BLE001 - logging must never break the task
            self.handleError(record)


@dataclass
class _State:
    spec: WorkerSpec
    channel: _Channel
    loop: asyncio.AbstractEventLoop | None = None
    crawler: Crawler | None = None
    pipelines: list[Any] = field(default_factory=list)
    # Per pipeline: (spider,) when its process_item still takes the spider.
    item_args: list[tuple[Any, ...]] = field(default_factory=list)


def main(conn: Connection, spec: WorkerSpec, index: int) -> None:
    """The worker process: start, run tasks until asked to stop, close."""
    # Ctrl-C in a terminal signals the whole process group; the crawl decides
    # how it stops, and the worker must finish the task it has.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = _Channel(conn)
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    root.addHandler(_LogHandler(channel))
    root.setLevel(spec.log_level)
    state = _State(spec, channel)
    init_error = None
    if spec.pipelines is not None:
        try:
            _open_pipelines(state, spec.pipelines)
        except Exception:  # noqa: BLE001 - reported to the crawl, which stops
            init_error = traceback.format_exc()
    channel.send(STARTED, pickle.dumps(init_error))
    if init_error is not None:
        return
    progress = spec.progress
    while True:
        try:
            frame = conn.recv_bytes()
        except (EOFError, OSError):  # the crawl is gone
            return
        if not frame:
            break
        (seq,) = SEQ.unpack_from(frame)
        progress[2 * index] = seq
        progress[2 * index + 1] = time.monotonic()
        outcome = run_task(state, memoryview(frame)[SEQ.size :])
        channel.send(RESULT, SEQ.pack(seq) + outcome)
    _close_pipelines(state)


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
        state.item_args.append(
            _spider_args(pipeline.process_item, spider) if pipeline is not None else ()
        )


def _close_pipelines(state: _State) -> None:
    if state.crawler is None:
        return
    spider = state.crawler.spider
    assert spider is not None
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
        state.channel.send(STATS, pickle.dumps(ops))


def _error_payload(exc: BaseException) -> tuple[BaseException | None, str, str, str]:
    tb = "".join(traceback.format_exception(exc))
    kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        exc_copy = _pickling.loads(_pickling.dumps(exc, "the exception"))
    except Exception:  # noqa: BLE001 - the crawl rebuilds a generic error
        exc_copy = None
    return exc_copy, kind, str(exc), tb


def run_task(state: _State, payload: memoryview) -> bytes:
    """Run one task; return pickled ``(status, value, stats_ops, seconds)``.

    For ``OK`` the value is itself pickled bytes, so that an error's path
    starts at the value; for ``ERROR`` it is ``(exception or None, type name,
    message, traceback text)``.
    """
    op, *data = _pickling.loads(payload)
    started = time.perf_counter()
    what = "the result"
    try:
        if op == "call":
            func, args, kwargs = data
            func = getattr(func, "__speedup_wrapped__", func)
            what = f"the result of {getattr(func, '__qualname__', func)}()"
            value = func(*args, **kwargs)
        else:  # "item"
            index, item = data
            pipeline = state.pipelines[index]
            if pipeline is None:  # disabled by NotConfigured in the worker
                value = item
            else:
                what = f"the item returned by {type(pipeline).__qualname__}.process_item()"
                value = _call(state, pipeline.process_item, item, *state.item_args[index])
        status: str = OK
    except Exception as exc:  # noqa: BLE001 - every error goes to the crawl
        status, value = ERROR, _error_payload(exc)
    elapsed = time.perf_counter() - started
    stats = state.crawler.stats if state.crawler is not None else None
    ops = stats.take_ops() if isinstance(stats, _RecordingStats) else []
    if status == OK:
        try:
            value = _pickling.dumps(value, what)
        except UnpicklableError as exc:
            status, value = ERROR, _error_payload(exc)
    return _pickling.dumps((status, value, ops, elapsed), "the task's outcome")
