"""Store items in PostgreSQL through psycopg 3, in the crawl's thread pool."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from scrapy_speedup.config import SpeedupSettingsError
from scrapy_speedup.db._batching import (
    BatchingPipeline,
    Row,
    batch_settings,
    required_setting,
    table_setting,
)
from scrapy_speedup.extension import SpeedupExtension

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Self

    from scrapy.crawler import Crawler

__all__ = ["PostgresPipeline"]


def _column_type(value: Any) -> str:
    """The column type for a sample value; nested fields arrive as JSON text."""
    if isinstance(value, bool):
        return "BOOLEAN"
    if isinstance(value, int):
        return "BIGINT"
    if isinstance(value, float):
        return "DOUBLE PRECISION"
    if isinstance(value, bytes):
        return "BYTEA"
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            json.loads(value)
        except ValueError:
            return "TEXT"
        return "JSONB"
    return "TEXT"


class PostgresPipeline(BatchingPipeline):
    """Stores items in the table ``SPEEDUP_POSTGRES_TABLE`` of the database at
    ``SPEEDUP_POSTGRES_DSN``. Columns are added as fields appear, typed from
    their first value (nested fields as JSONB). The blocking psycopg driver
    runs in the crawl's thread pool; a row the database refuses fails its item
    with the database's message, and the other rows are stored."""

    database = "PostgreSQL"

    def __init__(self, crawler: Crawler, dsn: str, table: str) -> None:
        import psycopg

        self.refusals = (psycopg.Error,)
        super().__init__(crawler, *batch_settings(crawler))
        self.dsn, self.table = dsn, table
        self._conn: Any = None
        self._columns: set[str] = set()

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        dsn = required_setting(
            crawler, "SPEEDUP_POSTGRES_DSN", "PostgresPipeline",
            "e.g. 'postgresql://user@127.0.0.1:5432/dbname'",
        )
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise SpeedupSettingsError(
                "PostgresPipeline needs psycopg 3: pip install 'scrapy-speedup[postgres]'"
            ) from None
        return cls(crawler, dsn, table_setting(crawler, "SPEEDUP_POSTGRES_TABLE"))

    async def run_blocking(self, func: Callable[..., Any], *args: Any) -> Any:
        return await SpeedupExtension.of(self.crawler).run_in_thread(func, *args)

    def connect(self) -> None:
        import psycopg
        from psycopg import sql

        self._conn = psycopg.connect(self.dsn)
        with self._conn.transaction():
            self._conn.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {} (id_ BIGSERIAL PRIMARY KEY)").format(
                    sql.Identifier(self.table)
                )
            )
            cursor = self._conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s",
                (self.table,),
            )
            self._columns = {name for (name,) in cursor.fetchall()}

    def add_columns(self, rows: list[Row]) -> None:
        from psycopg import sql

        new = self.new_columns(rows, self._columns)
        if not new:
            return
        with self._conn.transaction():
            for column, sample in new.items():
                self._conn.execute(
                    sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                        sql.Identifier(self.table),
                        sql.Identifier(column),
                        sql.SQL(_column_type(sample)),
                    )
                )
        self._columns.update(new)

    def transaction(self) -> Any:
        return self._conn.transaction()

    def insert(self, row: Row) -> None:
        from psycopg import sql

        query = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            sql.Identifier(self.table),
            sql.SQL(", ").join(sql.Identifier(k) for k in row),
            sql.SQL(", ").join(sql.Placeholder() for _ in row),
        )
        self._conn.execute(query, list(row.values()))

    def disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
