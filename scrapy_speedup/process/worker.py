"""What runs inside a worker process of the process pool.

A worker talks to the crawl over one socket with the messages of
:mod:`~scrapy_speedup.process.protocol`: it says :class:`Started`, then runs
each :class:`Task` it receives and answers with a :class:`Result`, forwarding
its log records (:class:`Log`) as it goes, until :class:`Stop` or the crawl's
end of the socket closes; then it closes the pipelines it runs and sends
their stats changes (:class:`Stats`).
"""

from __future__ import annotations

import asyncio
import collections.abc
import logging
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from scrapy import signals
from scrapy.statscollectors import MemoryStatsCollector

from scrapy_speedup.exceptions import UnpicklableError
from scrapy_speedup.process import pickling
from scrapy_speedup.process.protocol import (
    Call,
    Log,
    Message,
    Outcome,
    ProcessItem,
    Result,
    Started,
    Stats,
    StatsOp,
    Stop,
    Task,
    decode,
)

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from scrapy import Spider
    from scrapy.crawler import Crawler

__all__ = ["PipelineSpec", "WorkerSpec", "current", "main", "run_task"]

logger = logging.getLogger(__name__)


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
    max_message_bytes: int
    # The crawl's process: a worker dies with it (see _die_with_the_crawl).
    crawl_pid: int = 0
    # Folders to put first on the worker's sys.path before anything of the
    # project is unpickled (see pool._import_roots).
    import_roots: tuple[str, ...] = ()
    # A pickled PipelineSpec: unpickled by main() once import_roots are on
    # sys.path, since it names the spider's class.
    pipelines: bytes | None = None


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

    def __init__(self, conn: Connection, max_bytes: int) -> None:
        self.conn = conn
        #: The largest message the crawl takes; a larger one ends the worker.
        self.max_bytes = max_bytes - 64  # the frame's header, the task number
        self._lock = threading.Lock()

    def send(self, message: Message) -> None:
        data = message.encode()
        if len(data) > self.max_bytes:
            # Callers make their messages fit (results, logs, stats): one
            # that does not is a bug here, not a reason to end the worker.
            raise ValueError(f"a {type(message).__name__} message of {len(data)} bytes")
        with self._lock:
            self.conn.send_bytes(data)


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
            # A record too big to send is cut, not dropped: a huge log line
            # must cost neither the worker nor its task.
            room = self.channel.max_bytes // 2 - 4096
            if len(message) + len(clean.exc_text or "") > room:
                message = _cut(message, room)
                clean.exc_text = _cut(clean.exc_text or "", room // 4) or None
            clean.msg, clean.args, clean.exc_info = f"[worker {os.getpid()}] {message}", None, None
            self.channel.send(Log(pickle.dumps(clean)))
        except Exception:  # noqa: BLE001 - logging must never break the task
            self.handleError(record)


def _cut(text: str, room: int) -> str:
    if len(text) <= room:
        return text
    return f"{text[: max(0, room)]}... [cut: {len(text)} characters in all]"


@dataclass
class _State:
    spec: WorkerSpec
    channel: _Channel
    loop: asyncio.AbstractEventLoop | None = None
    crawler: Crawler | None = None
    pipelines: list[Any] = field(default_factory=list)
    # Per pipeline: (spider,) when its process_item still takes the spider.
    item_args: list[tuple[Any, ...]] = field(default_factory=list)


#: This worker's state; fault-injection tests reach the socket through it.
current: _State | None = None


def main(conn: Connection, spec: WorkerSpec, index: int) -> None:
    """The worker process: start, run tasks until asked to stop, close."""
    global current  # noqa: PLW0603 - one worker per process
    # Ctrl-C in a terminal, and SIGTERM from systemd or `kill -- -PGID`,
    # signal the whole process group; the crawl decides how it stops (it
    # kills a worker with SIGKILL when it must), and the worker must finish
    # the task it has.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.path[:0] = [root for root in spec.import_roots if root not in sys.path]
    _die_with_the_crawl(spec.crawl_pid)
    channel = _Channel(conn, spec.max_message_bytes)
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    root.addHandler(_LogHandler(channel))
    root.setLevel(spec.log_level)
    state = current = _State(spec, channel)
    init_error = None
    if spec.pipelines is not None:
        try:
            _open_pipelines(state, pickle.loads(spec.pipelines))
        except Exception:  # noqa: BLE001 - reported to the crawl, which stops
            init_error = traceback.format_exc()
    channel.send(Started(init_error))
    if init_error is not None:
        return
    progress = spec.progress
    reason = "finished"
    while True:
        try:
            # A frame over the limit raises OSError: the crawl never sends
            # one, so the channel is broken, as when the crawl is gone.
            message = decode(conn.recv_bytes(spec.max_message_bytes))
        except (EOFError, OSError):
            return
        if isinstance(message, Stop):
            reason = message.reason
            break
        if not isinstance(message, Task):
            logger.error("Unexpected %s from the crawl; stopping", type(message).__name__)
            return
        progress[2 * index] = message.seq
        progress[2 * index + 1] = time.monotonic()
        channel.send(Result(message.seq, run_task(state, message.body)))
    _close_pipelines(state, reason)


def _die_with_the_crawl(crawl_pid: int) -> None:
    """End this worker as soon as the crawl's process is gone (killed with
    SIGKILL, or by the OOM killer): a worker notices a closed socket only
    between tasks, so one in a long or hung task would live on, orphaned, and
    it ignores SIGTERM. A pidfd becomes readable when the process exits; it is
    opened as the worker starts, while the crawl waits for it, so a reused
    pid is unlikely to fool it (the fallback's polling is less sure)."""
    if not crawl_pid:
        return
    try:
        pidfd = os.pidfd_open(crawl_pid)
    except (AttributeError, OSError):  # not Linux 5.3+: poll the pid instead
        pidfd = None

    def watch() -> None:
        if pidfd is not None:
            poller = select.poll()  # not select(): it refuses fds over 1023
            poller.register(pidfd, select.POLLIN)
            poller.poll()
        else:
            while True:
                time.sleep(1.0)
                try:
                    os.kill(crawl_pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:
                    continue
        os._exit(1)

    threading.Thread(target=watch, name="scrapy-speedup-crawl-watch", daemon=True).start()


def _call(state: _State, method: Any, *args: Any) -> Any:
    """Call a pipeline method that may be sync, a coroutine or a Deferred."""
    return _settled(state, method(*args), getattr(method, "__qualname__", repr(method)))


def _settled(state: _State, result: Any, what: str) -> Any:
    """The value of *result*: a coroutine is run to its end on the worker's
    own loop, a Deferred must already have fired."""
    from twisted.internet.defer import Deferred

    # Not asyncio.iscoroutine: in 3.11 it takes a plain generator for one.
    if isinstance(result, collections.abc.Coroutine):
        if state.loop is None:
            state.loop = asyncio.new_event_loop()
        return state.loop.run_until_complete(result)
    if isinstance(result, Deferred):
        if not result.called:
            raise RuntimeError(
                f"{what}() returned a Deferred that needs the"
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
    # As in the crawl, after the pipelines opened: a pipeline that connects
    # to spider_opened / spider_closed in from_crawler (to open a file, to
    # flush a buffer) gets them in the worker that built it.
    _send_signal(state, signals.spider_opened, spider=spider)


def _send_signal(state: _State, signal_: object, **kwargs: Any) -> None:
    """Send a Scrapy signal to the handlers connected in this worker,
    running async handlers to their end (there is no reactor here)."""
    from pydispatch.dispatcher import getAllReceivers, liveReceivers
    from pydispatch.robustapply import robustApply

    assert state.crawler is not None
    sender = state.crawler.signals.sender
    for receiver in liveReceivers(getAllReceivers(sender, signal_)):
        name = getattr(receiver, "__qualname__", repr(receiver))
        try:
            _settled(state, robustApply(receiver, signal=signal_, sender=sender, **kwargs), name)
        except Exception:
            logger.exception("Error in the signal handler %s in a worker process", name)


def _close_pipelines(state: _State, reason: str) -> None:
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
    _send_signal(state, signals.spider_closed, spider=spider, reason=reason)
    stats = state.crawler.stats
    assert isinstance(stats, _RecordingStats)
    ops = _sendable_ops(stats.take_ops(), state.channel.max_bytes - 1024)
    if ops:
        state.channel.send(Stats(pickle.dumps(ops)))


def _sendable_ops(ops: list[StatsOp], room: int) -> list[StatsOp]:
    """The stats changes that pickle, within *room* bytes in all; each one
    left out is logged (its key named), so that one odd value costs that
    value only, never the task that set it."""
    kept: list[StatsOp] = []
    size = 0
    for op in ops:
        try:
            data = pickle.dumps(op)
        except Exception as exc:  # noqa: BLE001 - any pickling error means "leave it"
            logger.warning(
                "Stats change %s(%r) in a worker not sent to the crawl: its value, a %s,"
                " cannot be pickled (%s)", op[0], op[1], type(op[2]).__qualname__, exc,
            )
            continue
        if size + len(data) > room:
            logger.warning(
                "Stats change %s(%r) in a worker not sent to the crawl: over"
                " SPEEDUP_PROCESS_MAX_MESSAGE_MB with the others", op[0], op[1],
            )
            continue
        size += len(data)
        kept.append(op)
    return kept


def _error_outcome(exc: BaseException, seconds: float, ops: list[StatsOp]) -> Outcome:
    try:
        # Only an exception that survives the round trip is sent as itself;
        # the crawl rebuilds a generic error from the type name otherwise.
        value = pickling.dumps(exc, "the exception")
        pickling.loads(value)
    except Exception:  # noqa: BLE001 - any failure means "send it by name"
        value = b""
    return Outcome(
        ok=False,
        value=value,
        seconds=seconds,
        stats=ops,
        error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
        error_message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
    )


def run_task(state: _State, body: bytes) -> bytes:
    """Run one task; return its pickled :class:`Outcome`."""
    started = time.perf_counter()
    what = "the result"
    try:
        task = pickling.loads(body)
        if isinstance(task, Call):
            func = getattr(task.func, "__speedup_wrapped__", task.func)
            what = f"the result of {getattr(func, '__qualname__', func)}()"
            value = func(*task.args, **task.kwargs)
        elif isinstance(task, ProcessItem):
            pipeline = state.pipelines[task.pipeline]
            if pipeline is None:  # disabled by NotConfigured in the worker
                value = task.item
            else:
                what = f"the item returned by {type(pipeline).__qualname__}.process_item()"
                value = _call(
                    state, pipeline.process_item, task.item, *state.item_args[task.pipeline]
                )
        else:
            raise TypeError(f"a task must be a Call or a ProcessItem, not {type(task)!r}")
        error: BaseException | None = None
    # Everything the task raises is its outcome, SystemExit and
    # KeyboardInterrupt included: the worker must not die of it (which
    # would retry the task as if the worker had crashed).
    except BaseException as exc:  # noqa: BLE001
        error = exc
    seconds = time.perf_counter() - started
    stats = state.crawler.stats if state.crawler is not None else None
    ops = stats.take_ops() if isinstance(stats, _RecordingStats) else []
    if ops:
        ops = _sendable_ops(ops, state.channel.max_bytes // 4)
    if error is None:
        try:
            outcome = Outcome(ok=True, value=pickling.dumps(value, what), seconds=seconds,
                              stats=ops)
        except UnpicklableError as exc:
            error = exc
    if error is not None:
        outcome = _error_outcome(error, seconds, ops)
    data = pickling.dumps(outcome, "the task's outcome")
    if len(data) > state.channel.max_bytes:
        too_big = UnpicklableError(
            f"{what} is {len(data) / 2**20:.1f} MB pickled, over"
            f" SPEEDUP_PROCESS_MAX_MESSAGE_MB ({state.spec.max_message_bytes / 2**20:g})"
        )
        data = pickling.dumps(_error_outcome(too_big, seconds, []), "the task's outcome")
    return data
