"""The database work of a pipeline, done on its writer thread, one attempt at
a batch at a time.

An attempt opens the connection if there is none, settles the batch's
in-doubt commit if the last attempt lost its connection while committing,
adds the columns the rows need (each in a transaction of its own), and
writes the rows:

1. all in one transaction;
2. if the database refuses a row: again in one transaction, with a savepoint
   per row, so that only the refused rows fail;
3. if the commit itself is refused (a deferred constraint): one transaction
   per row.

Every driver error is sorted into one of two kinds. :class:`Refused`: the
row is at fault (a constraint, a type, a value); that row fails with the
database's message and the others go on. :class:`Unavailable`: the database
is (a connection lost or refused, a timeout, a lock, a deadlock, a server
shutting down); the attempt ends, and the pipeline retries the rows that
have no outcome yet after a backoff.

A connection whose transaction state is unknown is never used again: after
an error it is rolled back, or closed and replaced. When a connection is lost
after the transaction took its id, the commit may or may not have happened;
the next attempt asks the server (PostgreSQL's ``pg_xact_status``) instead of
guessing, so that no row is lost or written twice.

The attempt reports what it settled through its :class:`Attempt`, under a
lock, so that the reactor thread can give up on an attempt that does not
come back (the backstop in ``_batching.py``) and know exactly which rows
are stored, which failed, and which transaction is in doubt.
"""

from __future__ import annotations

import contextlib
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from scrapy_speedup.db._values import Dialect, Row

__all__ = [
    "Abandoned",
    "Attempt",
    "DatabaseWriter",
    "Doubt",
    "Refused",
    "Unavailable",
]

#: An item's outcome: None when stored, else why it failed.
Outcome = str | None


class Unavailable(Exception):  # noqa: N818 - a state, as the message says
    """The database cannot take the batch now (not the rows' fault)."""


class Refused(Exception):  # noqa: N818
    """The database refused a statement because of what it holds."""


class Abandoned(Exception):  # noqa: N818
    """The reactor gave up on this attempt; it must not touch the database again."""


def describe(exc: BaseException) -> str:
    """The first line of a driver's error, with its class: libpq's messages
    go on with advice that is noise in an item's error."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


@dataclass(eq=False)
class Doubt:
    """A transaction that was committing, or about to, when its connection was
    lost or given up: whether it committed is for the server to say."""

    #: Rows the transaction holds.
    indices: list[int]
    #: Its id, for the server (PostgreSQL); None where no one can ask (SQLite).
    xid: str | None = None
    #: The server process that ran it, (pid, start time), to end it if it
    #: still holds the transaction open.
    backend: tuple[int, Any] | None = None
    #: The outcome of each of its rows if it committed.
    outcome: dict[int, Outcome] = field(default_factory=dict)


@dataclass(eq=False)
class Attempt:
    """One try at writing a batch's rows, shared by the writer thread (which
    fills it) and the reactor thread (which watches it and may abandon it)."""

    rows: list[Row]
    #: Indices of the rows whose outcome is unknown.
    todo: list[int]
    #: The batch's in-doubt transaction, to settle first.
    doubt: Doubt | None = None
    conn: Any = None
    #: When the running statement started; None between statements.
    busy_since: float | None = None
    interrupted: bool = False
    abandoned: bool = False
    settled: dict[int, Outcome] = field(default_factory=dict)
    #: A transaction of this attempt whose outcome is unknown.
    open_doubt: Doubt | None = None
    doubt_checked: bool = False
    doubt_settled: bool = False
    reconnected: bool = False
    #: The batch's last chance: each row in a transaction of its own.
    one_by_one: bool = False
    #: Set from the reactor when the crawl's stop deadline passes: a row the
    #: database cannot take ends the one-by-one pass.
    hurry: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @contextlib.contextmanager
    def statement(self) -> Iterator[None]:
        with self.lock:
            if self.abandoned:
                raise Abandoned
            self.busy_since = time.monotonic()
        try:
            yield
        finally:
            self.busy_since = None

    # Once abandoned, the reactor has read what the attempt settled: what
    # the thread learns later is not recorded, as no one reads it. The doubt
    # is set before a commit and cleared after it, so whatever the moment of
    # abandoning, a commit that may have happened is in open_doubt.

    def settle(self, outcomes: dict[int, Outcome], *, ends_doubt: bool = False) -> None:
        with self.lock:
            if not self.abandoned:
                self.settled.update(outcomes)
                if ends_doubt:
                    self.open_doubt = None

    def set_doubt(self, doubt: Doubt | None) -> None:
        with self.lock:
            if not self.abandoned:
                self.open_doubt = doubt

    def abandon(self) -> None:
        with self.lock:
            self.abandoned = True


# The most rows one batch's one-by-one pass fails alone, each possibly after
# the whole database timeout, before the rest fail with the batch.
_MAX_FAILED_ALONE = 5


class DatabaseWriter(ABC):
    """The blocking half of a database pipeline: one connection, used by one
    thread at a time. Subclasses provide the driver's statements."""

    #: As messages name it: "SQLite", "PostgreSQL".
    database: ClassVar[str]
    #: What :func:`~scrapy_speedup.db._values.to_row` accepts for this database.
    dialect: Dialect

    def __init__(self, table: str, timeout_s: float) -> None:
        self.table = table
        self.timeout_s = timeout_s
        #: The connection in use; None when there is none (or it was given up).
        self.conn: Any = None
        self.connections_opened = 0
        #: Column name -> its type as the database names it ("" in SQLite).
        self.columns: dict[str, str] = {}

    # -- what the driver provides ------------------------------------------------

    @abstractmethod
    def connect(self) -> Any:
        """A new connection, with the database's timeouts set."""

    @abstractmethod
    def prepare_table(self, conn: Any) -> dict[str, str]:
        """Create the table if it is missing; return its columns."""

    @abstractmethod
    def add_column(self, conn: Any, name: str, value: Any) -> dict[str, str]:
        """Add the column *name* for *value* in a transaction of its own;
        return the table's columns as they are now."""

    @abstractmethod
    def load_columns(self, conn: Any) -> dict[str, str]:
        """The table's columns as they are now."""

    def needs_column(self, value: Any) -> bool:
        """Whether a field holding *value* needs its column now."""
        return True

    @abstractmethod
    def column_problem(self, name: str, value: Any) -> str | None:
        """Why *value* cannot go to the existing column (or the column
        *name* cannot be added), if it cannot."""

    @abstractmethod
    def begin(self, conn: Any) -> None: ...

    def transaction_id(self, conn: Any) -> tuple[str, tuple[int, Any]] | None:
        """The id of the current transaction and the server process that runs
        it, where the server can later say whether it committed."""
        return None

    @abstractmethod
    def commit(self, conn: Any) -> None: ...

    @abstractmethod
    def rollback(self, conn: Any) -> None: ...

    @abstractmethod
    def in_transaction(self, conn: Any) -> bool: ...

    @abstractmethod
    def usable(self, conn: Any) -> bool:
        """Whether *conn* is still connected."""

    @abstractmethod
    def execute(self, conn: Any, query: Any, params: Any = None) -> None: ...

    @abstractmethod
    def insert_many(self, conn: Any, rows: list[Row]) -> None:
        """Insert *rows* (in the current transaction)."""

    def committed(self, conn: Any, doubt: Doubt) -> bool | None:
        """Whether the in-doubt transaction committed; None: nobody can know."""
        return None

    @abstractmethod
    def interrupt(self, conn: Any) -> None:
        """From another thread: stop the statement that *conn* runs."""

    @abstractmethod
    def close_connection(self, conn: Any) -> None: ...

    @abstractmethod
    def classify(self, exc: BaseException, conn: Any, row: bool) -> Exception | None:
        """:class:`Unavailable` or :class:`Refused` for a driver's error (with
        *row*: raised while sending a row's values); None for anything else."""

    # -- one attempt ---------------------------------------------------------------

    def run(self, attempt: Attempt, func: Callable[..., Any], *args: Any, row: bool = False) -> Any:
        """``func(*args)``, a statement: watched by the reactor's backstop,
        its driver errors sorted into Refused and Unavailable."""
        with attempt.statement():
            try:
                return func(*args)
            except Exception as exc:
                problem = self.classify(exc, attempt.conn, row)
                if problem is None:
                    raise
                raise problem from exc

    def attempt(self, attempt: Attempt) -> None:
        """Blocking, on the writer thread: one try at the batch's rows. Raises
        Unavailable when the database is; anything else unexpected leaves the
        connection closed, as its state is unknown."""
        try:
            if self.conn is None and not self._connect(attempt):
                return
            attempt.conn = self.conn
            if attempt.doubt is not None:
                self._settle_doubt(attempt, attempt.doubt)
            todo = [i for i in attempt.todo if i not in attempt.settled]
            todo = self._prepare_columns(attempt, todo)
            if todo:
                self._write(attempt, todo)
        except Unavailable:
            self._recover(attempt)
            raise
        except BaseException:  # Abandoned, or a bug: the connection's state is unknown
            self._discard(attempt.conn)
            raise

    def disconnect(self, attempt: Attempt) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            attempt.conn = conn
            with attempt.statement():
                self.close_connection(conn)

    def forget(self, conn: Any) -> None:
        """From the reactor thread, when the thread that uses *conn* is stuck:
        the next attempt opens a new connection; *conn* is left to that
        thread, which closes it if it ever comes back."""
        if conn is not None and self.conn is conn:
            self.conn = None

    def _connect(self, attempt: Attempt) -> bool:
        """Open the connection; False when the table cannot be used, which
        fails the rows (or, opening, raises Refused)."""
        conn = self.run(attempt, self.connect)
        attempt.conn = conn
        try:
            columns = self.run(attempt, self.prepare_table, conn)
        except Refused as exc:
            self._discard(conn)
            if not attempt.todo:
                raise
            attempt.settle({i: f"{self.database} cannot use the table {self.table!r}: {exc}"
                            for i in attempt.todo})
            return False
        except BaseException:
            self._discard(conn)
            raise
        with attempt.lock:  # given up on meanwhile: the new thread owns self.conn
            if not attempt.abandoned:
                self.columns = columns
                self.connections_opened += 1
                attempt.reconnected = self.connections_opened > 1
                self.conn = conn
        if self.conn is not conn:
            self._discard(conn)
            raise Abandoned
        return True

    def _discard(self, conn: Any) -> None:
        if conn is None:
            return
        if self.conn is conn:
            self.conn = None
        with contextlib.suppress(Exception):
            self.close_connection(conn)

    def _recover(self, attempt: Attempt) -> None:
        """After Unavailable: roll back and keep the connection if it still
        works, else close it. A rolled-back transaction did not commit; one
        whose connection is gone stays in doubt where the server can tell."""
        conn = attempt.conn
        if conn is None:
            return
        if conn is self.conn and self.usable(conn):
            try:
                if self.in_transaction(conn):
                    self.run(attempt, self.rollback, conn)
            except (Unavailable, Refused):
                pass
            else:
                attempt.set_doubt(None)
                return
        self._discard(conn)
        doubt = attempt.open_doubt
        if doubt is not None and doubt.xid is None:
            attempt.set_doubt(None)  # SQLite: closing rolled it back

    def _settle_doubt(self, attempt: Attempt, doubt: Doubt) -> None:
        try:
            committed = self.run(attempt, self.committed, attempt.conn, doubt)
        except Refused:
            committed = None
        with attempt.lock:
            if attempt.abandoned:
                raise Abandoned
            attempt.doubt_checked = True
            attempt.doubt_settled = True
            if committed:
                attempt.settled.update(doubt.outcome)
            elif committed is None:
                attempt.settled.update(dict.fromkeys(doubt.indices, (
                    f"the connection to {self.database} was lost while these items were"
                    " committed, and the server can no longer say whether they were: they"
                    " may be stored"
                )))

    def _prepare_columns(self, attempt: Attempt, todo: list[int]) -> list[int]:
        """Add the columns the rows need, one transaction each; a row whose
        field cannot have its column, or whose value does not fit its
        column, fails alone."""
        failed: dict[int, Outcome] = {}
        refused_columns: dict[str, str] = {}
        for i in todo:
            for name, value in attempt.rows[i].items():
                problem = self.column_problem(name, value)
                if problem is None and name not in self.columns and self.needs_column(value):
                    problem = refused_columns.get(name)
                    if problem is None:
                        problem = self._add_column(attempt, name, value)
                        if problem is not None:
                            refused_columns[name] = problem
                    if problem is None:
                        problem = self.column_problem(name, value)
                if problem is not None:
                    failed[i] = problem
                    break
        if failed:
            attempt.settle(failed)
        return [i for i in todo if i not in failed]

    def _add_column(self, attempt: Attempt, name: str, value: Any) -> str | None:
        try:
            self.columns = self.run(attempt, self.add_column, attempt.conn, name, value)
        except Refused as exc:
            message = f"{self.database} refused to add the column {name!r} for this item: {exc}"
            try:  # someone else may have added it meanwhile
                self.columns = self.run(attempt, self.load_columns, attempt.conn)
            except Refused:
                return message
            return None if name in self.columns else message
        return None

    def _write(self, attempt: Attempt, todo: list[int]) -> None:
        if attempt.one_by_one:
            self._write_each_alone(attempt, todo)
            return
        rows = attempt.rows

        def all_at_once(outcome: dict[int, Outcome]) -> None:
            self.run(attempt, self.insert_many, attempt.conn, [rows[i] for i in todo], row=True)
            outcome.update(dict.fromkeys(todo))

        def each_in_a_savepoint(outcome: dict[int, Outcome]) -> None:
            for i in todo:
                self.run(attempt, self.execute, attempt.conn, "SAVEPOINT speedup_row")
                try:
                    self.run(attempt, self.insert_many, attempt.conn, [rows[i]], row=True)
                except Refused as exc:
                    self.run(attempt, self.execute, attempt.conn,
                             "ROLLBACK TO SAVEPOINT speedup_row")
                    outcome[i] = self.refusal(exc)
                else:
                    outcome[i] = None
                self.run(attempt, self.execute, attempt.conn, "RELEASE SAVEPOINT speedup_row")

        for body in (all_at_once, each_in_a_savepoint):
            try:
                self._transaction(attempt, todo, body)
            except Refused:
                continue
            return
        for i in todo:  # a commit was refused: each row on its own
            self._write_alone(attempt, i)

    def _write_alone(self, attempt: Attempt, i: int) -> None:
        """Row *i* in a transaction of its own; a refusal fails it alone."""

        def one(outcome: dict[int, Outcome]) -> None:
            self.run(attempt, self.insert_many, attempt.conn, [attempt.rows[i]], row=True)
            outcome[i] = None

        try:
            self._transaction(attempt, [i], one)
        except Refused as exc:
            attempt.settle({i: self.refusal(exc)})

    def _write_each_alone(self, attempt: Attempt, todo: list[int]) -> None:
        """Every row in a transaction of its own, so that a row the database
        cannot take even alone (a trigger that runs past the statement
        timeout, a serialization failure, a full disk for one large row)
        fails alone while the database keeps taking the others. When the
        database itself is gone, or a commit is in doubt, the batch's own
        rules apply to the rows left: after two failing rows in a row (a lock
        on the table looks like that), after _MAX_FAILED_ALONE rows failed
        alone, or once the crawl's stop deadline has passed."""
        previous_failed = False
        failed_alone = 0
        for i in todo:
            try:
                self._write_alone(attempt, i)
            except Unavailable as exc:
                self._recover(attempt)
                # Each failing row may have waited the whole timeout: two in
                # a row mean the database itself (a lock, an outage), and the
                # pass is bounded in rows and by the crawl's stop deadline.
                if (self.conn is None or attempt.open_doubt is not None or previous_failed
                        or failed_alone >= _MAX_FAILED_ALONE or attempt.hurry):
                    raise
                previous_failed = True
                failed_alone += 1
                attempt.settle({i: (
                    f"{self.database} could not take this item, even alone, through every"
                    f" retry: {exc}"
                )})
            else:
                previous_failed = False

    def refusal(self, exc: Refused) -> str:
        return f"{self.database} refused the item: {exc}"

    def _transaction(
        self, attempt: Attempt, indices: list[int], body: Callable[[dict[int, Outcome]], None]
    ) -> None:
        conn = attempt.conn
        self.run(attempt, self.begin, conn)
        doubt = Doubt(list(indices))
        identity = self.run(attempt, self.transaction_id, conn)
        if identity is not None:
            doubt.xid, doubt.backend = identity
        attempt.set_doubt(doubt)
        try:
            body(doubt.outcome)
        except Refused:
            self.run(attempt, self.rollback, conn)
            attempt.set_doubt(None)
            raise
        try:
            self.run(attempt, self.commit, conn)
        except Refused:
            # A deferred constraint: PostgreSQL has ended the transaction,
            # SQLite keeps it open.
            if self.in_transaction(conn):
                self.run(attempt, self.rollback, conn)
            attempt.set_doubt(None)
            raise
        attempt.settle(doubt.outcome, ends_doubt=True)
