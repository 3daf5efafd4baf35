"""Store items in PostgreSQL through psycopg 3, on the pipeline's own writer
thread."""

from __future__ import annotations

import datetime
import math
import time
from dataclasses import replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from uuid import UUID

from scrapy_speedup.config import SpeedupConfig
from scrapy_speedup.db._batching import BatchingPipeline, required_setting
from scrapy_speedup.db._values import Dialect, a_type
from scrapy_speedup.db._writing import DatabaseWriter, Doubt, Refused, Unavailable, describe
from scrapy_speedup.exceptions import SpeedupSettingsError

if TYPE_CHECKING:
    from typing import Self

    from scrapy.crawler import Crawler

    from scrapy_speedup.db._values import Row

__all__ = ["PostgresPipeline"]

#: SQLSTATE classes and codes that mean the database cannot take the batch
#: now, whatever it holds: connection exceptions (08), transaction rollbacks
#: such as deadlocks and serialization failures (40), insufficient resources
#: (53: disk full, too many connections), operator intervention (57: a
#: statement timeout or cancel, a server shutting down or starting), system
#: errors (58), a lock not obtained within lock_timeout (55P03), a session
#: ended for idling in a transaction (25P03), a read-only server (25006: a
#: standby, during a failover). Everything else refuses the row: integrity
#: (23), data (22), syntax and types (42), program limits (54: too many
#: columns), errors raised by triggers.
_UNAVAILABLE_CLASSES = frozenset({"08", "40", "53", "57", "58"})
_UNAVAILABLE_STATES = frozenset({"55P03", "25P03", "25006"})

# Column types, as PostgreSQL names them (``regtype``), for each Python type.
_BIGINT, _DOUBLE, _TEXT, _JSONB = "bigint", "double precision", "text", "jsonb"
#: The column types a value of each type may go to unchanged; any other of
#: the types known here would convert it (a float rounded in a bigint, a
#: str parsed as a date or as JSON), so the item is refused instead. Column
#: types not known here (enums, domains, arrays) are left to PostgreSQL.
_ACCEPTS: dict[str, frozenset[str]] = {
    _BIGINT: frozenset({"bigint", "integer", "smallint", "numeric"}),
    _DOUBLE: frozenset({"double precision", "real", "numeric"}),
    _TEXT: frozenset({"text", "character varying", "character"}),
    _JSONB: frozenset({"jsonb", "json"}),
}
_KNOWN = frozenset({
    *(t for types in _ACCEPTS.values() for t in types), "boolean", "bytea", "date",
    "timestamp with time zone", "timestamp without time zone", "time with time zone",
    "time without time zone", "uuid",
})


def column_type(value: Any) -> str:
    """The PostgreSQL type a value of this Python type is stored as."""
    from psycopg.types.json import Jsonb

    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return _BIGINT
    if isinstance(value, float):
        return _DOUBLE
    if isinstance(value, str):
        return _TEXT
    if isinstance(value, bytes):
        return "bytea"
    if isinstance(value, datetime.datetime):
        aware = value.utcoffset() is not None
        return f"timestamp {'with' if aware else 'without'} time zone"
    if isinstance(value, datetime.date):
        return "date"
    if isinstance(value, datetime.time):
        return f"time {'with' if value.utcoffset() is not None else 'without'} time zone"
    if isinstance(value, Decimal):
        return "numeric"
    if isinstance(value, UUID):
        return "uuid"
    if isinstance(value, Jsonb):
        return _JSONB
    raise TypeError(f"no column type for {type(value).__name__}")  # _values.py stops these


def _fits(value: Any, kind: str, column: str) -> bool:
    if column == kind or column not in _KNOWN:
        return True
    if kind == _BIGINT and column in ("double precision", "real"):
        # Exactly, as long as the float's mantissa holds the int.
        return bool(abs(value) <= 2 ** (53 if column == "double precision" else 24))
    return column in _ACCEPTS.get(kind, ())


class PostgresWriter(DatabaseWriter):
    database = "PostgreSQL"

    def __init__(self, dsn: str, table: str, timeout_s: float) -> None:
        from psycopg import sql
        from psycopg.types.json import Jsonb

        super().__init__(table, timeout_s)
        self.dsn = dsn
        self._table = sql.Identifier(*table.split("."))
        # max_name_bytes is the server's, read when connecting.
        self.dialect = Dialect(
            database="PostgreSQL", native_types=True, names_ignore_case=False,
            max_name_bytes=63, text_allows_nul=False, float_allows_nan=True, json=Jsonb,
        )

    def _connect_options(self) -> dict[str, Any]:
        """libpq options that bound how long a dead server or network can
        keep a call waiting; an option given in the DSN wins."""
        from psycopg.conninfo import conninfo_to_dict

        seconds = max(1, math.ceil(self.timeout_s))
        options = {
            "connect_timeout": max(2, seconds),  # libpq takes 2 s at least
            "keepalives": 1,
            "keepalives_idle": seconds,
            "keepalives_interval": max(1, seconds // 3),
            "keepalives_count": 3,
            # Data the server's machine has not acknowledged after this long
            # means the network is gone: the kernel closes the connection.
            "tcp_user_timeout": int(self.timeout_s * 1000),
        }
        given = conninfo_to_dict(self.dsn)
        return {key: value for key, value in options.items() if key not in given}

    def connect(self) -> Any:
        import psycopg
        from psycopg.types.string import StrDumper

        conn = psycopg.connect(self.dsn, autocommit=True, **self._connect_options())
        try:
            # A str is sent as text, not as a literal of unknown type that
            # PostgreSQL would parse as whatever the column is (a date, JSON).
            conn.adapters.register_dumper(str, StrDumper)
            ms = str(max(1, int(self.timeout_s * 1000)))
            settings = conn.execute(
                "SELECT set_config('statement_timeout', %s, false),"
                " set_config('lock_timeout', %s, false),"
                " set_config('idle_in_transaction_session_timeout', %s, false),"
                " current_setting('max_identifier_length')::int",
                [ms, ms, ms],
            ).fetchone()
            assert settings is not None
            max_name = int(settings[3])
        except BaseException:
            conn.close()
            raise
        self.dialect = replace(self.dialect, max_name_bytes=max_name)
        return conn

    def _regclass(self, conn: Any) -> str:
        # The name as the INSERT writes it, so that to_regclass finds the
        # table the INSERT resolves to (schema-qualified, or first in the
        # search_path), not any table of that name in another schema.
        return str(self._table.as_string(conn))

    def prepare_table(self, conn: Any) -> dict[str, str]:
        from psycopg import sql

        (oid,) = conn.execute("SELECT to_regclass(%s)::oid", [self._regclass(conn)]).fetchone()
        if oid is None:
            conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (id_ BIGSERIAL PRIMARY KEY)")
                         .format(self._table))
        return self.load_columns(conn)

    def load_columns(self, conn: Any) -> dict[str, str]:
        rows = conn.execute(
            "SELECT attname, atttypid::regtype::text FROM pg_attribute"
            " WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
            [self._regclass(conn)],
        ).fetchall()
        return dict(rows)

    def needs_column(self, value: Any) -> bool:
        # A None says nothing of the field's type: its column waits for a
        # value that does (a missing column reads as NULL meanwhile).
        return value is not None

    def add_column(self, conn: Any, name: str, value: Any) -> dict[str, str]:
        from psycopg import sql

        conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
            self._table, sql.Identifier(name), sql.SQL(column_type(value))))
        return self.load_columns(conn)

    def column_problem(self, name: str, value: Any) -> str | None:
        column = self.columns.get(name)
        if column is None or value is None:
            return None
        kind = column_type(value)
        if _fits(value, kind, column):
            return None
        held = "a dict or list" if kind == _JSONB else a_type(value)
        return (
            f"PostgreSQL cannot store this item: the field {name!r} holds {held} (stored as"
            f" {kind}), and the column {name!r} of {self.table!r} is {column}: give the field"
            " one type in every item, or change the column's type"
        )

    def begin(self, conn: Any) -> None:
        conn.execute("BEGIN")

    def transaction_id(self, conn: Any) -> tuple[str, tuple[int, Any]]:
        current = (
            "pg_current_xact_id()" if conn.info.server_version >= 130000 else "txid_current()"
        )
        xid, started = conn.execute(
            f"SELECT {current}::text, backend_start FROM pg_stat_activity"
            " WHERE pid = pg_backend_pid()"
        ).fetchone()
        return xid, (conn.info.backend_pid, started)

    def committed(self, conn: Any, doubt: Doubt) -> bool | None:
        """Ask the server; if the lost connection's server process still has
        the transaction open, end that process, and ask again."""
        import psycopg

        status_of = (
            "pg_xact_status(%s::xid8)" if conn.info.server_version >= 130000
            else "txid_status(%s::bigint)"
        )
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                (status,) = conn.execute(f"SELECT {status_of}", [doubt.xid]).fetchone()
            except psycopg.errors.InvalidParameterValue as exc:
                if "in the future" not in str(exc):
                    raise
                # The server crashed before the transaction's id reached its
                # log, and recovered behind it: the commit never happened.
                return False
            if status in ("committed", "aborted"):
                return bool(status == "committed")
            if status is None:  # too old for the server to remember
                return None
            if doubt.backend is not None:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE pid = %s AND backend_start = %s",
                    list(doubt.backend),
                )
            if time.monotonic() > deadline:
                raise Unavailable(
                    "the transaction of the lost connection is still in progress on the server"
                )
            time.sleep(0.05)

    def commit(self, conn: Any) -> None:
        conn.execute("COMMIT")

    def rollback(self, conn: Any) -> None:
        conn.execute("ROLLBACK")

    def in_transaction(self, conn: Any) -> bool:
        from psycopg.pq import TransactionStatus

        return bool(conn.info.transaction_status != TransactionStatus.IDLE)

    def usable(self, conn: Any) -> bool:
        return not (conn.closed or conn.broken)

    def execute(self, conn: Any, query: Any, params: Any = None) -> None:
        conn.execute(query, params)

    def insert_many(self, conn: Any, rows: list[Row]) -> None:
        from psycopg import sql

        groups: dict[tuple[str, ...], list[list[Any]]] = {}
        for row in rows:
            # A None whose column does not exist yet is left out: NULL anyway.
            names = tuple(k for k, v in row.items() if v is not None or k in self.columns)
            groups.setdefault(names, []).append([row[k] for k in names])
        for names, values in groups.items():
            if not names:
                for _ in values:
                    conn.execute(sql.SQL("INSERT INTO {} DEFAULT VALUES").format(self._table))
                continue
            # psycopg does not escape a % in an identifier, and a query
            # with parameters reads it as a placeholder: doubled, it is one %.
            query = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                self._table,
                sql.SQL(", ").join(sql.Identifier(name.replace("%", "%%")) for name in names),
                sql.SQL(", ").join(sql.Placeholder() * len(names)),
            )
            with conn.cursor() as cursor:
                cursor.executemany(query, values)

    def interrupt(self, conn: Any) -> None:
        if hasattr(conn, "cancel_safe"):  # psycopg >= 3.2: bounded in time
            conn.cancel_safe(timeout=max(1.0, self.timeout_s))
        else:
            conn.cancel()

    def close_connection(self, conn: Any) -> None:
        conn.close()

    def classify(self, exc: BaseException, conn: Any, row: bool) -> Exception | None:
        import psycopg

        if isinstance(exc, psycopg.Error):
            state = exc.sqlstate
            if conn is None or conn.closed or conn.broken:
                return Unavailable(describe(exc))
            if state is None:
                # No SQLSTATE: libpq's own errors (a connection that failed)
                # are operational; the rest are raised by psycopg while
                # sending a row's values.
                if isinstance(exc, psycopg.OperationalError):
                    return Unavailable(describe(exc))
                return Refused(str(exc).strip())
            if state[:2] in _UNAVAILABLE_CLASSES or state in _UNAVAILABLE_STATES:
                return Unavailable(describe(exc))
            return Refused(str(exc).strip())
        if row and isinstance(exc, (OverflowError, ValueError, TypeError)):
            return Refused(str(exc).strip())
        return None


class PostgresPipeline(BatchingPipeline):
    """Stores items in the table ``SPEEDUP_POSTGRES_TABLE`` (``table`` or
    ``schema.table``) of the database at ``SPEEDUP_POSTGRES_DSN``. Columns are
    added as fields appear, typed from the Python type of their values; see
    ``docs/usage/databases.rst``. The blocking psycopg driver runs on the
    pipeline's own writer thread, with one connection."""

    writer: PostgresWriter

    def __init__(self, crawler: Crawler, dsn: str, table: str) -> None:
        config = SpeedupConfig.of(crawler)
        super().__init__(crawler, PostgresWriter(dsn, table, config.db_timeout_seconds))

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        config = SpeedupConfig.of(crawler)
        dsn = required_setting(
            config.postgres_dsn, "SPEEDUP_POSTGRES_DSN", "PostgresPipeline",
            "e.g. 'postgresql://user@127.0.0.1:5432/dbname'",
        )
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise SpeedupSettingsError(
                "PostgresPipeline needs psycopg 3: pip install 'scrapy-speedup[postgres]'"
            ) from None
        return cls(crawler, dsn, config.postgres_table)
