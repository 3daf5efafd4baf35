"""What the database pipelines share: rows from items, batches, commits, stats.

An item is buffered as a row; rows are written and committed in batches of
``SPEEDUP_DB_BATCH_SIZE``, or every ``SPEEDUP_DB_COMMIT_INTERVAL_SECONDS``, and
at close. ``process_item`` returns only once the item's batch is committed, so
an item counted as scraped is in the database: a graceful stop loses no row.
A batch that fails is rolled back and written again row by row, so that only
the rows the database refuses fail, each with the database's message.
"""

from __future__ import annotations

import json
import logging
import re
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from itemadapter import ItemAdapter

from scrapy_speedup._bridge import Bridge
from scrapy_speedup.config import SpeedupSettingsError

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable
    from contextlib import AbstractContextManager

    from scrapy.crawler import Crawler
    from twisted.internet.defer import Deferred

    from scrapy_speedup._bridge import Timer

__all__ = [
    "BatchingPipeline",
    "DatabaseError",
    "Row",
    "batch_settings",
    "required_setting",
    "table_setting",
    "to_row",
]

logger = logging.getLogger(__name__)

Row = dict[str, Any]
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_STAT = "speedup/db/"


class DatabaseError(Exception):
    """The database refused an item; the message is the database's."""


def to_row(item: Any) -> Row:
    """A row from an item: scalars as they are, nested values as JSON text."""
    row: Row = {}
    for key, value in ItemAdapter(item).items():
        if value is None or isinstance(value, (str, int, float, bool, bytes)):
            row[key] = value
        else:
            row[key] = json.dumps(value, default=str, ensure_ascii=False)
    return row


def required_setting(crawler: Crawler, name: str, pipeline: str, hint: str) -> str:
    value = crawler.settings.get(name)
    if not value:
        raise SpeedupSettingsError(f"{pipeline} needs {name}, {hint}")
    return str(value)


def table_setting(crawler: Crawler, name: str) -> str:
    table = str(crawler.settings.get(name) or "items")
    if not _IDENTIFIER.match(table):
        raise SpeedupSettingsError(
            f"{name} ({table!r}) must be a plain table name: letters, digits and _,"
            " not starting with a digit"
        )
    return table


def batch_settings(crawler: Crawler) -> tuple[int, float]:
    settings = crawler.settings
    try:
        size = int(settings.get("SPEEDUP_DB_BATCH_SIZE") or 100)
        interval = float(settings.get("SPEEDUP_DB_COMMIT_INTERVAL_SECONDS") or 1.0)
    except ValueError as exc:
        raise SpeedupSettingsError(f"SPEEDUP_DB_BATCH_SIZE / _INTERVAL: {exc}") from None
    if size < 1 or interval <= 0:
        raise SpeedupSettingsError(
            f"SPEEDUP_DB_BATCH_SIZE ({size}) must be 1 or more and"
            f" SPEEDUP_DB_COMMIT_INTERVAL_SECONDS ({interval}) more than 0"
        )
    return size, interval


class BatchingPipeline(ABC):
    """Buffers rows and writes them in batches, one batch at a time, through
    ``run_blocking`` (a thread); subclasses do the database work."""

    #: Named in the message of a refused row: "SQLite refused the item: …".
    database: ClassVar[str]
    #: The driver's errors that mean "this row is refused" (set per instance
    #: where the driver is an optional import).
    refusals: tuple[type[Exception], ...]

    def __init__(self, crawler: Crawler, batch_size: int, interval_s: float) -> None:
        self.crawler = crawler
        self.stats = crawler.stats
        self.batch_size = batch_size
        self.interval_s = interval_s
        self._pending: list[tuple[Row, asyncio.Future[Any] | Deferred[Any]]] = []
        self._oldest = 0.0  # when the oldest pending row arrived
        self._writing = False
        self._timer: Timer | None = None
        self._closing = False
        self._idle: asyncio.Future[Any] | Deferred[Any] | None = None
        self._bridge: Bridge | None = None

    @property
    def bridge(self) -> Bridge:
        if self._bridge is None:
            self._bridge = Bridge()
        return self._bridge

    # -- what backends provide --------------------------------------------------

    @abstractmethod
    async def run_blocking(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking database call off the reactor thread."""

    @abstractmethod
    def connect(self) -> None:
        """Blocking: open the connection."""

    @abstractmethod
    def add_columns(self, rows: list[Row]) -> None:
        """Blocking: add the columns that *rows* have and the table lacks."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Any]:
        """A transaction: committed on exit, rolled back on an exception."""

    @abstractmethod
    def insert(self, row: Row) -> None:
        """Blocking: insert one row, in the current transaction."""

    def write(self, rows: list[Row]) -> list[str | None]:
        """Blocking: insert and commit *rows* in one transaction; if the
        database refuses it, again row by row, so that only the rows at fault
        fail. Return an error message or None for each row."""
        self.add_columns(rows)
        try:
            with self.transaction():
                for row in rows:
                    self.insert(row)
            return [None] * len(rows)
        except self.refusals:
            pass
        errors: list[str | None] = []
        for row in rows:
            try:
                with self.transaction():
                    self.insert(row)
                errors.append(None)
            except self.refusals as exc:
                errors.append(f"{self.database} refused the item: {str(exc).strip()}")
        return errors

    @abstractmethod
    def disconnect(self) -> None:
        """Blocking: close the connection."""

    # -- the pipeline -----------------------------------------------------------

    async def open_spider(self) -> None:
        await self.run_blocking(self.connect)

    async def process_item(self, item: Any) -> Any:
        waiter = self.bridge.new_waiter()
        if not self._pending:
            self._oldest = time.monotonic()
        self._pending.append((to_row(item), waiter))
        if len(self._pending) >= self.batch_size:
            self._flush()
        else:
            self._start_timer()
        error = await waiter
        if error is not None:
            raise DatabaseError(error)
        return item

    async def close_spider(self) -> None:
        self._closing = True
        if self._pending or self._writing:
            self._idle = self.bridge.new_waiter()
            self._flush()
            await self._idle
        await self.run_blocking(self.disconnect)

    def _start_timer(self) -> None:
        # Ticks at least every 0.5 s: items wait for their commit, and the
        # engine waits for items, so a stop must not wait for a long interval.
        if self._timer is None:
            self._timer = self.bridge.call_later(min(self.interval_s, 0.5), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        stopping = not self.crawler.crawling  # Crawler.stop(), e.g. Ctrl-C
        if stopping or time.monotonic() - self._oldest >= self.interval_s:
            self._flush()
        elif self._pending:
            self._start_timer()

    def _flush(self) -> None:
        """Start writing the pending rows, unless a batch is being written:
        then they go when it is done."""
        if self._writing or not self._pending:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending[: self.batch_size], self._pending[self.batch_size :]
        self._oldest = time.monotonic()
        self._writing = True
        from scrapy.utils.defer import deferred_from_coro

        deferred_from_coro(self._write_batch(batch))

    async def _write_batch(self, batch: list[tuple[Row, Any]]) -> None:
        started = time.monotonic()
        try:
            errors = await self.run_blocking(self.write, [row for row, _ in batch])
        except Exception as exc:  # noqa: BLE001 - the whole batch failed (connection lost)
            logger.error("Writing a batch of %d rows failed: %s", len(batch), exc,
                         extra={"crawler": self.crawler})
            errors = [f"{type(exc).__name__}: {exc}"] * len(batch)
        self.stats.inc_value(_STAT + "batch_count")
        self.stats.max_value(_STAT + "batch_seconds_max", round(time.monotonic() - started, 3))
        for (_, waiter), error in zip(batch, errors, strict=True):
            self.stats.inc_value(_STAT + ("row_error_count" if error else "row_count"))
            self.bridge.resolve(waiter, error)
        self._writing = False
        if len(self._pending) >= self.batch_size or (self._closing and self._pending):
            self._flush()
        elif self._pending:
            self._start_timer()
        if self._idle is not None and not self._pending and not self._writing:
            self.bridge.resolve(self._idle, None)

    @staticmethod
    def new_columns(rows: list[Row], known: set[str]) -> dict[str, Any]:
        """Columns the rows have that the table lacks, each with a sample value."""
        new: dict[str, Any] = {}
        for row in rows:
            for key, value in row.items():
                if key not in known and (key not in new or new[key] is None):
                    new[key] = value
        return new
