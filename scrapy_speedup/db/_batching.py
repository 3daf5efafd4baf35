"""What the database pipelines share on the reactor thread: batches, retries,
the backstop, stats.

An item is checked and turned into a row when it arrives (``_values.py``):
one the database could not take as it is fails there, alone. Rows are
written and committed in batches of ``SPEEDUP_DB_BATCH_SIZE``, or every
``SPEEDUP_DB_COMMIT_INTERVAL_SECONDS``, and at close, one batch at a time, on
the pipeline's own writer thread (``_thread.py``) with its own connection
(``_writing.py``). ``process_item`` returns only once the item's row is
committed, so an item counted as scraped is in the database, once; every
other item fails with a :exc:`DatabaseError` that says why.

The database's own timeouts (``SPEEDUP_DB_TIMEOUT_SECONDS``: PostgreSQL's
``statement_timeout`` and ``lock_timeout``, SQLite's busy timeout) end a
statement that waits too long, so its outcome is known: the attempt fails as
unavailable and the batch is retried, at most ``SPEEDUP_DB_RETRY_TIMES``
times, after a growing delay. A statement that runs well past that timeout
means a server or a network that does not answer: the backstop here
interrupts it, then gives up on its connection and thread, and the batch
goes on with a new connection; a commit that may have happened meanwhile is
settled by asking the server (see ``_writing.py``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from scrapy_speedup.config import SpeedupConfig
from scrapy_speedup.db._thread import WriterThread
from scrapy_speedup.db._values import Row, to_row
from scrapy_speedup.db._writing import Attempt, DatabaseWriter, Doubt, Refused, Unavailable
from scrapy_speedup.exceptions import DatabaseError, SpeedupSettingsError
from scrapy_speedup.extension import SpeedupExtension

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from scrapy.crawler import Crawler
    from twisted.internet.defer import Deferred

    from scrapy_speedup._bridge import Bridge, Timer
    from scrapy_speedup.db._thread import Job

__all__ = ["BatchingPipeline", "DatabaseError", "backoff_s", "required_setting"]

logger = logging.getLogger(__name__)

_STAT = "speedup/db/"

#: Retries wait about 0.5 s, 1 s, 2 s, 4 s... at most 30 s, each shortened by
#: up to half at random, so that crawls that lost the same server do not all
#: come back at once. The default five retries wait ~8-15 s in all: enough
#: for a server restart or a failover, short enough that a database that is
#: gone for good fails its items within a minute.
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 30.0


def backoff_s(retry: int) -> float:
    """How long to wait before retry number *retry* (1, 2, ...)."""
    delay = min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2.0 ** (retry - 1))
    return delay * random.uniform(0.5, 1.0)


def backstop_margin_s(timeout_s: float) -> float:
    """How long past SPEEDUP_DB_TIMEOUT_SECONDS a statement may run before
    it is interrupted, and as long again before its connection is given up.
    The database ends a statement at the timeout; one that runs on is on a
    server or network that does not answer. Never under 2 s, so that a busy
    machine is not taken for a dead server."""
    return max(2.0, timeout_s)


def required_setting(value: str | None, name: str, pipeline: str, hint: str) -> str:
    if not value:
        raise SpeedupSettingsError(f"{pipeline} needs {name}, {hint}")
    return value


@dataclass(eq=False)
class _Batch:
    rows: list[Row]
    waiters: list[asyncio.Future[Any] | Deferred[Any]]
    #: Row index -> None (stored) or why it failed; missing: not known yet.
    outcomes: dict[int, str | None] = field(default_factory=dict)
    #: A commit whose outcome the next attempt must ask the server about.
    doubt: Doubt | None = None

    def pending(self) -> list[int]:
        return [i for i in range(len(self.rows)) if i not in self.outcomes]


class BatchingPipeline:
    """Buffers rows and writes them in batches, one batch at a time, on its
    own writer thread, through a :class:`DatabaseWriter`."""

    def __init__(self, crawler: Crawler, writer: DatabaseWriter) -> None:
        self.crawler = crawler
        self.stats = crawler.stats
        self.writer = writer
        self.name = type(self).__name__
        config = SpeedupConfig.of(crawler)
        self.config = config
        self.batch_size = config.db_batch_size
        self.interval_s = config.db_commit_interval_seconds
        self.timeout_s = config.db_timeout_seconds
        self.retry_times = config.db_retry_times
        self.margin_s = backstop_margin_s(self.timeout_s)
        try:
            self._extension = SpeedupExtension.of(crawler)
        except RuntimeError as exc:
            raise SpeedupSettingsError(
                f"{self.name} writes through scrapy-speedup's extension, which is missing: {exc}"
            ) from None
        self._thread: WriterThread | None = None
        # Why retries stopped: the crawl is stopping and its deadline
        # (SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS) passed; "" until then.
        self._no_retries = ""
        self._sleeping: asyncio.Future[Any] | Deferred[Any] | None = None
        self._attempt: Attempt | None = None  # the latest, maybe running
        self._extension.when_giving_up(self._stop_retrying)
        self._pending: list[tuple[Row, asyncio.Future[Any] | Deferred[Any]]] = []
        self._oldest = 0.0  # when the oldest pending row arrived
        self._writing = False
        self._timer: Timer | None = None
        self._closing = False
        self._idle: asyncio.Future[Any] | Deferred[Any] | None = None
        self._counts = dict.fromkeys(
            ("stored", "refused", "failed", "unavailable", "batches", "retries",
             "reconnects", "doubts", "stuck"), 0,
        )

    @property
    def bridge(self) -> Bridge:
        return self._extension.bridge

    def _count(self, name: str, stat: str, value: int = 1) -> None:
        self._counts[name] += value
        self.stats.inc_value(_STAT + stat, value)
        # Per database too: with both pipelines on, the sums hold per pipeline.
        self.stats.inc_value(f"{_STAT}{self.writer.database.lower()}/{stat}", value)

    # -- the pipeline -----------------------------------------------------------

    async def open_spider(self) -> None:
        self._thread = WriterThread(
            self.bridge, f"scrapy-speedup-{self.writer.database.lower()}-writer"
        )
        try:
            await self._write(_Batch([], []), opening=True)
        except BaseException:
            await self._thread.close(0)
            raise
        logger.info(
            "%s writes to the table %r in batches of %d, committed at least every %s s"
            " (database timeout %s s, %d retries)",
            self.name, self.writer.table, self.batch_size, self.interval_s, self.timeout_s,
            self.retry_times, extra={"crawler": self.crawler},
        )

    async def process_item(self, item: Any) -> Any:
        try:
            row = to_row(item, self.writer.dialect)
        except DatabaseError:
            self._count("refused", "refused_item_count")
            raise
        waiter = self.bridge.new_waiter()
        if not self._pending:
            self._oldest = time.monotonic()
        self._pending.append((row, waiter))
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
        if self._thread is not None:
            try:
                await self._run(Attempt([], []), self.writer.disconnect)
            except Exception as exc:  # noqa: BLE001 - closing: every row is settled
                logger.warning("%s: closing the connection failed: %s", self.name, exc,
                               extra={"crawler": self.crawler})
            await self._thread.close(self.config.shutdown_timeout_seconds)
        c = self._counts
        logger.info(
            "%s: %d items stored, %d failed (%d refused before reaching %s, %d while it was"
            " unavailable, %d refused by it); %d batches, %d retries, %d reconnections,"
            " %d in-doubt commits checked, %d stuck writes given up",
            self.name, c["stored"], c["refused"] + c["failed"], c["refused"],
            self.writer.database, c["unavailable"], c["failed"] - c["unavailable"],
            c["batches"], c["retries"], c["reconnects"], c["doubts"], c["stuck"],
            extra={"crawler": self.crawler},
        )

    # -- batches --------------------------------------------------------------

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

    async def _write_batch(self, items: list[tuple[Row, Any]]) -> None:
        started = time.monotonic()
        batch = _Batch([row for row, _ in items], [waiter for _, waiter in items])
        try:
            await self._write(batch)
        except Exception as exc:  # a bug must not leave items waiting
            logger.error("%s: writing a batch of %d rows failed unexpectedly", self.name,
                         len(items), exc_info=True, extra={"crawler": self.crawler})
            for i in batch.pending():
                batch.outcomes[i] = f"{self.name} failed unexpectedly: {type(exc).__name__}: {exc}"
        self._count("batches", "batch_count")
        self.stats.max_value(_STAT + "batch_seconds_max", round(time.monotonic() - started, 3))
        for i, waiter in enumerate(batch.waiters):
            error = batch.outcomes[i]
            if error is None:
                self._count("stored", "row_count")
            else:
                self._count("failed", "row_error_count")
            self.bridge.resolve(waiter, error)
        self._writing = False
        if len(self._pending) >= self.batch_size or (self._closing and self._pending):
            self._flush()
        elif self._pending:
            self._start_timer()
        if self._idle is not None and not self._pending and not self._writing:
            self.bridge.resolve(self._idle, None)

    async def _write(self, batch: _Batch, *, opening: bool = False) -> None:
        """Attempt the batch until every row has an outcome: retried while
        the database is unavailable, at most SPEEDUP_DB_RETRY_TIMES times."""
        started = time.monotonic()
        retry = 0
        one_by_one = False
        while True:
            attempt = Attempt(batch.rows, batch.pending(), batch.doubt, one_by_one=one_by_one,
                              hurry=bool(self._no_retries))
            self._attempt = attempt
            try:
                await self._run(attempt, self.writer.attempt)
            except Unavailable as exc:
                self._merge(batch, attempt)
                if not batch.pending() and not opening:
                    return
                if retry >= self.retry_times or self._no_retries:
                    if not opening and not one_by_one and len(batch.pending()) > 1:
                        # One row can be what the database cannot take (a
                        # statement timeout in a trigger, a full disk for
                        # one large row): before failing them all, each row
                        # gets a last try alone.
                        one_by_one = True
                        logger.warning(
                            "%s: writing the %d items of a batch one by one, so that only"
                            " an item %s cannot take fails (%s)", self.name,
                            len(batch.pending()), self.writer.database, exc,
                            extra={"crawler": self.crawler},
                        )
                        continue
                    self._give_up_batch(batch, str(exc), retry, time.monotonic() - started,
                                        opening)
                    return
                retry += 1
                delay = backoff_s(retry)
                self._count("retries", "retry_count")
                logger.warning(
                    "%s is unavailable (%s): %s in %.1f s (retry %d of %d)",
                    self.writer.database, exc,
                    "connecting again" if opening
                    else f"writing {len(batch.pending())} items again",
                    delay, retry, self.retry_times, extra={"crawler": self.crawler},
                )
                await self._sleep(delay)
                continue
            except Refused as exc:
                if not opening:
                    raise  # an attempt settles refused rows itself: a bug
                raise DatabaseError(
                    f"{self.name} cannot use the table {self.writer.table!r}: {exc}"
                ) from None
            self._merge(batch, attempt)
            for i in batch.pending():  # every attempt that returns settles all
                batch.outcomes[i] = f"{self.name} did not write this item (a bug: please report)"
            return

    def _merge(self, batch: _Batch, attempt: Attempt) -> None:
        with attempt.lock:  # the thread of an abandoned attempt may still run
            batch.outcomes.update(attempt.settled)
            if attempt.doubt_settled:
                batch.doubt = None
            doubt = attempt.open_doubt
            checked, reconnected = attempt.doubt_checked, attempt.reconnected
        if checked:
            self._count("doubts", "in_doubt_count")
        if reconnected:
            self._count("reconnects", "reconnect_count")
        if doubt is None:
            return
        if doubt.xid is not None:
            batch.doubt = doubt
            return
        for i in doubt.indices:  # abandoned mid-commit, and no server to ask
            batch.outcomes.setdefault(i, (
                f"{self.writer.database} did not answer while these items were being"
                " committed, and its connection was given up: they may be stored"
            ))

    def _give_up_batch(
        self, batch: _Batch, reason: str, retries: int, seconds: float, opening: bool
    ) -> None:
        message = (
            f"{self.writer.database} stayed unavailable through {retries} retries over"
            f" {seconds:.1f} s (SPEEDUP_DB_RETRY_TIMES={self.retry_times}"
            f"{'; ' + self._no_retries if self._no_retries else ''}): {reason}"
        )
        if opening:
            raise DatabaseError(f"{self.name} cannot connect: {message}")
        in_doubt = set(batch.doubt.indices) if batch.doubt is not None else set()
        pending = batch.pending()
        for i in pending:
            batch.outcomes[i] = message + (
                "; the connection was lost while this item was being committed, and"
                " whether it was could not be checked: it may be stored"
                if i in in_doubt else ""
            )
            self._count("unavailable", "unavailable_item_count")
        logger.error("%s: %d items failed: %s", self.name, len(pending),
                     message, extra={"crawler": self.crawler})

    def _stop_retrying(self, why: str) -> None:
        """The crawl is stopping and its deadline passed: a batch the database
        does not take is failed at once instead of retried, so that a stop
        while the database is down ends in bounded time; rows still get one
        attempt each, as the database may be up."""
        self._no_retries = f"no more retries: {why}"
        if self._attempt is not None:
            self._attempt.hurry = True
        if self._sleeping is not None:
            self.bridge.resolve(self._sleeping, None)

    async def _sleep(self, seconds: float) -> None:
        waiter = self._sleeping = self.bridge.new_waiter()
        self.bridge.call_later(seconds, self.bridge.resolve, waiter, None)
        await waiter

    # -- the writer thread and its backstop -------------------------------------

    async def _run(self, attempt: Attempt, func: Callable[[Attempt], Any]) -> Any:
        """``func(attempt)`` on the writer thread, watched: a statement that
        runs past the timeout by the margin is interrupted, and by twice the
        margin given up on (Unavailable)."""
        assert self._thread is not None
        job = self._thread.submit(func, attempt)
        every = min(1.0, self.timeout_s / 4)
        timer: Timer | None = None

        def check() -> None:
            nonlocal timer
            timer = None
            if job.done or job.given_up:
                return
            since = attempt.busy_since
            if since is not None:
                late = time.monotonic() - since - self.timeout_s
                if late > 2 * self.margin_s:
                    self._give_up(job, attempt, late + self.timeout_s)
                    return
                if late > self.margin_s and not attempt.interrupted:
                    attempt.interrupted = True
                    self._interrupt(attempt, late + self.timeout_s)
            timer = self.bridge.call_later(every, check)

        timer = self.bridge.call_later(every, check)
        try:
            return await job.waiter
        finally:
            if timer is not None:
                timer.cancel()

    def _interrupt(self, attempt: Attempt, seconds: float) -> None:
        logger.warning(
            "%s has not answered a statement for %.1f s, past SPEEDUP_DB_TIMEOUT_SECONDS"
            " (%s s): interrupting it", self.writer.database, seconds, self.timeout_s,
            extra={"crawler": self.crawler},
        )
        conn = attempt.conn
        if conn is None:
            return

        def interrupt() -> None:
            try:
                self.writer.interrupt(conn)
            except Exception as exc:  # noqa: BLE001 - the backstop gives up next
                logger.debug("interrupting %s failed: %s", self.writer.database, exc)

        # In a thread of its own: a PostgreSQL cancel request opens a connection.
        threading.Thread(target=interrupt, name=f"{self.name}-interrupt", daemon=True).start()

    def _give_up(self, job: Job, attempt: Attempt, seconds: float) -> None:
        assert self._thread is not None
        attempt.abandon()
        self.writer.forget(attempt.conn)
        self._count("stuck", "stuck_count")
        reason = (
            f"{self.writer.database} did not answer a statement for {seconds:.1f} s, even"
            " when interrupted: its connection was given up"
        )
        logger.warning(
            "%s; its thread is left behind, and the batch goes on with a new connection",
            reason, extra={"crawler": self.crawler},
        )
        self._thread.give_up(job, Unavailable(reason))
