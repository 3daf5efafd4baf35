"""Store items in SQLite, batched, on the pipeline's own writer thread."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

from scrapy_speedup.config import SpeedupConfig
from scrapy_speedup.db._batching import BatchingPipeline, required_setting
from scrapy_speedup.db._values import Dialect, ascii_fold, json_text
from scrapy_speedup.db._writing import DatabaseWriter, Refused, Unavailable, describe
from scrapy_speedup.exceptions import SpeedupSettingsError

if TYPE_CHECKING:
    from typing import Self

    from scrapy.crawler import Crawler

    from scrapy_speedup.db._values import Row

__all__ = ["SQLitePipeline"]

#: Primary result codes that mean the database cannot take a write now, not
#: that the row is wrong: busy or locked by another connection (past the
#: busy timeout), out of memory, read-only, interrupted (by the backstop),
#: I/O errors, corrupt, full, cannot open, lock protocol, not a database.
#: The rest (constraint, mismatch, too big, range, SQL errors) refuse a row.
_UNAVAILABLE_CODES = frozenset({
    sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_INTERRUPT, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PROTOCOL, sqlite3.SQLITE_NOTADB,
})


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class SQLiteWriter(DatabaseWriter):
    database = "SQLite"
    dialect = Dialect(
        database="SQLite", native_types=False, names_ignore_case=True, max_name_bytes=None,
        text_allows_nul=True, float_allows_nan=False, json=json_text,
    )

    def __init__(self, path: str, table: str, timeout_s: float) -> None:
        super().__init__(table, timeout_s)
        self.path = path
        self._table = _quote(table)
        self._folded: dict[bytes, str] = {}

    def connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; every one is begun
        # and ended here. check_same_thread=False: the backstop interrupts it
        # from another thread, and a new writer thread may close it.
        return sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None,
                               check_same_thread=False)

    def prepare_table(self, conn: sqlite3.Connection) -> dict[str, str]:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {self._table} (id_ INTEGER PRIMARY KEY)")
        return self._columns(conn)

    def _columns(self, conn: sqlite3.Connection) -> dict[str, str]:
        columns = {row[1]: "" for row in conn.execute(f"PRAGMA table_info({self._table})")}
        self._folded = {ascii_fold(name): name for name in columns}
        return columns

    def load_columns(self, conn: sqlite3.Connection) -> dict[str, str]:
        return self._columns(conn)

    def add_column(self, conn: sqlite3.Connection, name: str, value: Any) -> dict[str, str]:
        # No type: the column has no affinity, so each value keeps its own.
        conn.execute(f"ALTER TABLE {self._table} ADD COLUMN {_quote(name)}")
        return self._columns(conn)

    def column_problem(self, name: str, value: Any) -> str | None:
        if name in self.columns:
            return None
        other = self._folded.get(ascii_fold(name))
        if other is None:
            return None
        return (
            f"SQLite cannot store this item: the field {name!r} would share the column"
            f" {other!r} (SQLite column names ignore case): rename the field"
        )

    def begin(self, conn: sqlite3.Connection) -> None:
        # IMMEDIATE: the write lock is taken now, waiting at most the busy
        # timeout, so that no later statement of the batch waits for it.
        conn.execute("BEGIN IMMEDIATE")

    def commit(self, conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    def rollback(self, conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")

    def in_transaction(self, conn: sqlite3.Connection) -> bool:
        return conn.in_transaction

    def usable(self, conn: sqlite3.Connection) -> bool:
        return True

    def execute(self, conn: sqlite3.Connection, query: Any, params: Any = None) -> None:
        conn.execute(query, params or ())

    def insert_many(self, conn: sqlite3.Connection, rows: list[Row]) -> None:
        groups: dict[tuple[str, ...], list[list[Any]]] = {}
        for row in rows:
            groups.setdefault(tuple(row), []).append(list(row.values()))
        for names, values in groups.items():
            if not names:
                for _ in values:
                    conn.execute(f"INSERT INTO {self._table} DEFAULT VALUES")
                continue
            conn.executemany(
                f"INSERT INTO {self._table} ({', '.join(map(_quote, names))})"
                f" VALUES ({', '.join('?' * len(names))})",
                values,
            )

    def interrupt(self, conn: sqlite3.Connection) -> None:
        conn.interrupt()

    def close_connection(self, conn: sqlite3.Connection) -> None:
        conn.close()

    def classify(self, exc: BaseException, conn: Any, row: bool) -> Exception | None:
        if isinstance(exc, sqlite3.Error):
            code = getattr(exc, "sqlite_errorcode", None)
            if code is not None and code & 0xFF in _UNAVAILABLE_CODES:
                return Unavailable(describe(exc))
            return Refused(str(exc).strip())
        if row and isinstance(exc, (OverflowError, ValueError, TypeError)):
            return Refused(str(exc).strip())  # a value the driver cannot bind
        return None


class SQLitePipeline(BatchingPipeline):
    """Stores items in the table ``SPEEDUP_SQLITE_TABLE`` of the database file
    ``SPEEDUP_SQLITE_PATH``. Columns are added as fields appear; see
    ``docs/usage/databases.rst`` for how each value is stored. SQLite allows
    one writer: the pipeline's own thread does all the writing, off the
    reactor thread."""

    writer: SQLiteWriter

    def __init__(self, crawler: Crawler, path: str, table: str) -> None:
        config = SpeedupConfig.of(crawler)
        super().__init__(crawler, SQLiteWriter(path, table, config.db_timeout_seconds))

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        config = SpeedupConfig.of(crawler)
        path = required_setting(
            config.sqlite_path, "SPEEDUP_SQLITE_PATH", "SQLitePipeline",
            "the database file to write",
        )
        if "." in config.sqlite_table:
            raise SpeedupSettingsError(
                f"SPEEDUP_SQLITE_TABLE ({config.sqlite_table!r}) must be a plain table name:"
                " SQLite has no schemas (a name before a dot would name an attached"
                " database, and the pipeline attaches none)"
            )
        return cls(crawler, path, config.sqlite_table)
