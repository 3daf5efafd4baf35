"""Store items in SQLite, batched in one writer thread."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from scrapy_speedup._thread_pool import ThreadPool
from scrapy_speedup.config import SpeedupConfig
from scrapy_speedup.db._batching import (
    BatchingPipeline,
    Row,
    batch_settings,
    required_setting,
    table_setting,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Self

    from scrapy.crawler import Crawler

__all__ = ["SQLitePipeline"]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class SQLitePipeline(BatchingPipeline):
    """Stores items in the table ``SPEEDUP_SQLITE_TABLE`` of the database file
    ``SPEEDUP_SQLITE_PATH``. Columns are added as fields appear; nested fields
    are stored as JSON text. SQLite allows one writer, so one thread does all
    the writing, off the reactor thread."""

    database = "SQLite"
    refusals = (sqlite3.Error,)

    def __init__(self, crawler: Crawler, path: str, table: str) -> None:
        super().__init__(crawler, *batch_settings(crawler))
        self.path, self.table = path, table
        self._db: sqlite3.Connection | None = None
        self._columns: set[str] = set()
        config = SpeedupConfig.from_settings(crawler.settings)
        self._writer = ThreadPool(
            crawler, replace(config, thread_workers=1), self.bridge, stat_prefix=None
        )

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        path = required_setting(
            crawler, "SPEEDUP_SQLITE_PATH", "SQLitePipeline", "the database file to write"
        )
        return cls(crawler, path, table_setting(crawler, "SPEEDUP_SQLITE_TABLE"))

    async def run_blocking(self, func: Callable[..., Any], *args: Any) -> Any:
        return await self._writer.run(func, args, {}, None)

    async def close_spider(self) -> None:
        await super().close_spider()
        await self._writer.close()

    def connect(self) -> None:
        # check_same_thread: the one writer thread uses it, but not the one
        # that created it (any thread of the pool may run connect()).
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        table = _quote(self.table)
        self._db.execute(f"CREATE TABLE IF NOT EXISTS {table} (id_ INTEGER PRIMARY KEY)")
        self._columns = {
            row[1] for row in self._db.execute(f"PRAGMA table_info({_quote(self.table)})")
        }

    def add_columns(self, rows: list[Row]) -> None:
        assert self._db is not None
        for column in self.new_columns(rows, self._columns):
            self._db.execute(f"ALTER TABLE {_quote(self.table)} ADD COLUMN {_quote(column)}")
            self._columns.add(column)

    def transaction(self) -> sqlite3.Connection:
        assert self._db is not None
        return self._db  # as a context manager: commit, or roll back

    def insert(self, row: Row) -> None:
        assert self._db is not None
        names = ", ".join(_quote(k) for k in row)
        marks = ", ".join("?" for _ in row)
        self._db.execute(
            f"INSERT INTO {_quote(self.table)} ({names}) VALUES ({marks})", list(row.values())
        )

    def disconnect(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
