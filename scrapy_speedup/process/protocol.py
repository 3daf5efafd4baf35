"""The messages between the crawl and a worker process, and their framing.

Each worker has one socket to the crawl (a ``multiprocessing`` duplex
``Connection``). Every frame is ``multiprocessing``'s: a signed 32-bit
big-endian length (or -1 then an unsigned 64-bit length) followed by the
message, whose first byte says its kind:

crawl to worker
    ``T`` :class:`Task` (``seq``, then a pickled :class:`Call` or
    :class:`ProcessItem`), ``Q`` :class:`Stop`.
worker to crawl
    ``I`` :class:`Started`, ``R`` :class:`Result` (``seq``, then a pickled
    :class:`Outcome`), ``L`` :class:`Log`, ``S`` :class:`Stats`.

Task and result bodies stay pickled bytes inside the message so that the
pool can tell one bad task from a broken channel: a result that cannot be
unpickled fails its task alone, while bytes that are not a message at all
(an unknown kind, a length over the limit) end the worker
(:exc:`~scrapy_speedup.exceptions.ProtocolError`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar

from scrapy_speedup.exceptions import ProtocolError

__all__ = [
    "Call",
    "FrameReader",
    "Log",
    "Message",
    "Outcome",
    "ProcessItem",
    "Result",
    "Started",
    "Stats",
    "StatsOp",
    "Stop",
    "Task",
    "decode",
    "frame",
]

_SEQ = struct.Struct("!Q")
_HEADER = struct.Struct("!i")
_BIG_HEADER = struct.Struct("!Q")

#: A stats change made in a worker, replayed on the crawl's stats collector:
#: (method name, key, value), e.g. ("inc_value", "myapp/words", 120).
StatsOp = tuple[str, str, Any]


# -- what a task asks (pickled inside a Task) ---------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """``func(*args, **kwargs)``: ``run_in_process`` and ``@cpu_bound``."""

    func: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ProcessItem:
    """``process_item(item)`` of the *pipeline*-th of SPEEDUP_PROCESS_PIPELINES."""

    pipeline: int
    item: Any


@dataclass(slots=True)
class Outcome:
    """How a task ended, pickled inside a :class:`Result`.

    *value* holds the pickled result (``ok``) or the pickled exception (empty
    when the exception itself cannot be pickled); it is pickled apart so that
    the crawl can say which of the two failed to unpickle.
    """

    ok: bool
    value: bytes
    seconds: float
    stats: list[StatsOp] = field(default_factory=list)
    error_type: str = ""
    error_message: str = ""
    traceback: str = ""


# -- messages -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Task:
    KIND: ClassVar[bytes] = b"T"
    seq: int
    body: bytes  # a pickled Call or ProcessItem

    def encode(self) -> bytes:
        return self.KIND + _SEQ.pack(self.seq) + self.body


@dataclass(frozen=True, slots=True)
class Stop:
    """Close the pipelines and exit; *reason* goes to their ``spider_closed``
    handlers (the crawl's close reason, or ``worker_recycled``)."""

    KIND: ClassVar[bytes] = b"Q"
    reason: str = "finished"

    def encode(self) -> bytes:
        return self.KIND + self.reason.encode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Started:
    """The worker is ready, or its pipelines failed to start (the traceback)."""

    KIND: ClassVar[bytes] = b"I"
    init_error: str | None

    def encode(self) -> bytes:
        return self.KIND + (self.init_error or "").encode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Result:
    KIND: ClassVar[bytes] = b"R"
    seq: int
    body: bytes | memoryview  # a pickled Outcome

    def encode(self) -> bytes:
        return self.KIND + _SEQ.pack(self.seq) + bytes(self.body)


@dataclass(frozen=True, slots=True)
class Log:
    """A pickled ``logging.LogRecord``, logged by the crawl as its own."""

    KIND: ClassVar[bytes] = b"L"
    record: bytes | memoryview

    def encode(self) -> bytes:
        return self.KIND + bytes(self.record)


@dataclass(frozen=True, slots=True)
class Stats:
    """Pickled stats changes made outside any task (``close_spider``)."""

    KIND: ClassVar[bytes] = b"S"
    ops: bytes | memoryview

    def encode(self) -> bytes:
        return self.KIND + bytes(self.ops)


Message = Task | Stop | Started | Result | Log | Stats


def decode(data: bytes | memoryview) -> Message:
    """The message in one frame's payload; :exc:`ProtocolError` if it is none."""
    view = memoryview(data)
    kind = bytes(view[:1])
    if kind in (Task.KIND, Result.KIND):
        if len(view) < 1 + _SEQ.size:
            raise ProtocolError(f"a {kind!r} message of {len(view)} bytes has no task number")
        (seq,) = _SEQ.unpack_from(view, 1)
        body = view[1 + _SEQ.size :]
        return Task(seq, bytes(body)) if kind == Task.KIND else Result(seq, body)
    if kind == Log.KIND:
        return Log(view[1:])
    if kind == Stats.KIND:
        return Stats(view[1:])
    if kind == Started.KIND:
        error = bytes(view[1:]).decode("utf-8", "replace")
        return Started(error or None)
    if kind == Stop.KIND:
        return Stop(bytes(view[1:]).decode("utf-8", "replace") or "finished")
    raise ProtocolError(f"unknown message kind {bytes(view[:8])!r} ({len(view)} bytes)")


def frame(payload: bytes) -> bytes:
    """*payload* framed as ``multiprocessing.Connection.recv_bytes`` expects."""
    if len(payload) > 0x7FFFFFFF:
        return _HEADER.pack(-1) + _BIG_HEADER.pack(len(payload)) + payload
    return _HEADER.pack(len(payload)) + payload


class FrameReader:
    """Splits a byte stream into frame payloads, refusing any frame longer
    than *max_bytes* (a corrupt or hostile length would otherwise have the
    reader wait forever for bytes that never come)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buf = bytearray()
        #: Set once the stream had a length that is negative or over the
        #: limit; nothing after it can be trusted, and feed() returns no more.
        self.error: ProtocolError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """Add *data*; return the payloads of the frames now complete, up to
        a bad length if there is one (see :attr:`error`)."""
        if self.error is not None:
            return []
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        pos = 0
        while len(buf) - pos >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf, pos)
            start = pos + _HEADER.size
            if size == -1:
                if len(buf) - start < _BIG_HEADER.size:
                    break
                (size,) = _BIG_HEADER.unpack_from(buf, start)
                start += _BIG_HEADER.size
            if size < 0 or size > self.max_bytes:
                self.error = ProtocolError(
                    f"a frame announces {size} bytes, over the limit of {self.max_bytes}"
                    " (SPEEDUP_PROCESS_MAX_MESSAGE_MB)"
                )
                break
            if len(buf) - start < size:
                break
            frames.append(bytes(buf[start : start + size]))
            pos = start + size
        del buf[:pos]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame."""
        return len(self._buf)
