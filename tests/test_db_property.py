"""Property: whatever the items (random field names, odd ones included,
nesting and value types), every item is either stored exactly once, with its
values read back equal after the documented conversion, or fails alone with
a message; the table holds exactly the items counted as scraped.

Each example is a whole in-process crawl into a fresh table. Hypothesis
runs on a worker thread and hands each crawl to the reactor's loop, which
keeps running on the test's thread.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import math
import sqlite3
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.inprocess import inprocess
from tests.test_db_hostile import store

EXAMPLES = 50
KEY = "k_"  # the test's own field: which item a row holds

_counter = itertools.count()


class Unstorable(Exception):  # noqa: N818
    """The documented rules refuse this item before it reaches the database."""


# -- items ------------------------------------------------------------------------

offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(
    lambda m: datetime.timezone(datetime.timedelta(minutes=m)))
# Names shared by several items, so that types change and cases collide from
# item to item; plain names; odd ones (not str, empty, NUL, a lone surrogate,
# over 63 bytes).
common = st.sampled_from(["name", "Name", "NAME", "price", "tags", "ID_"])
plain = st.text(st.characters(exclude_characters="\x00"), min_size=1, max_size=8)
odd = st.one_of(
    st.sampled_from(["a\x00b", "a\ud800", "é" * 32, "p" * 63, "p" * 64, " ", '"', "a b",
                     "select", ""]),
    st.integers(-3, 3),
    st.text(max_size=8),
)
names = st.one_of(common, common, plain, plain, odd).filter(
    lambda n: not (isinstance(n, str) and (n.lower() == KEY or n == "id_")))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**65), 2**65), st.floats(),
    st.text(max_size=10), st.binary(max_size=6),
    st.datetimes(min_value=datetime.datetime(2, 1, 1), max_value=datetime.datetime(9998, 1, 1),
                 timezones=st.none() | offsets),
    st.dates(), st.times(timezones=st.none() | offsets),
    st.decimals(places=None, min_value=-(10**20), max_value=10**20) | st.sampled_from(
        [Decimal("NaN"), Decimal("sNaN"), Decimal("-0"), Decimal("1E+3"), Decimal("1.50")]),
    st.uuids(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=4) | st.integers(0, 2), inner, max_size=3),
        st.frozensets(st.integers(-5, 5) | st.text(max_size=2), max_size=3),
    ),
    max_leaves=6,
)
items = st.lists(st.dictionaries(names, values, max_size=4), min_size=1, max_size=6)


# -- the documented conversion, written again here ------------------------------------

def _utf8(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate
        raise Unstorable from None


def _text(text: str, pg: bool) -> str:
    _utf8(text)
    if pg and "\x00" in text:
        raise Unstorable
    return text


def _json(value: Any, pg: bool) -> Any:
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Unstorable
        return value
    if isinstance(value, str):
        return _text(value, pg)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (Decimal, UUID)):
        return str(value)
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise Unstorable
        return {_text(k, pg): _json(v, pg) for k, v in value.items()}
    if isinstance(value, frozenset):
        try:
            value = sorted(value)
        except TypeError:
            raise Unstorable from None
    if isinstance(value, (list, tuple)):
        return [_json(v, pg) for v in value]
    raise Unstorable


def expected(item: dict[Any, Any], pg: bool) -> dict[str, Any]:
    """What each field reads back as, or Unstorable."""
    row: dict[str, Any] = {}
    folded: set[bytes] = set()
    for name, value in item.items():
        if not isinstance(name, str) or not name or "\x00" in name:
            raise Unstorable
        if pg and len(_utf8(name)) > 63:
            raise Unstorable
        if not pg:
            fold = _utf8(name).lower()
            if fold in folded or fold == b"id_":  # the table's own id_ column
                raise Unstorable
            folded.add(fold)
        if isinstance(value, bool):
            row[name] = value if pg else int(value)
        elif isinstance(value, int):
            if not -(2**63) <= value < 2**63:
                raise Unstorable
            row[name] = value
        elif isinstance(value, float):
            if math.isnan(value) and not pg:
                raise Unstorable
            row[name] = value
        elif isinstance(value, str):
            row[name] = _text(value, pg)
        elif isinstance(value, Decimal):
            if value.is_snan():
                raise Unstorable
            row[name] = value if pg else str(value)
        elif isinstance(value, (datetime.date, datetime.time, UUID)):
            row[name] = value if pg else (
                str(value) if isinstance(value, UUID) else value.isoformat())
        elif isinstance(value, (list, tuple, dict, frozenset)):
            data = _json(value, pg)
            row[name] = data if pg else json.dumps(data, ensure_ascii=False)
        else:
            row[name] = value
    return row


def same(read: Any, want: Any) -> bool:
    """Equal as the database keeps it: NaN is NaN; a JSON number is its
    decimal value (PostgreSQL's jsonb reads 1e16 back as an int)."""
    if isinstance(want, float) and isinstance(read, (int, float)) and not isinstance(read, bool):
        return (math.isnan(want) and math.isnan(read)) or float(read) == want
    if isinstance(want, Decimal) and want.is_nan():
        return isinstance(read, Decimal) and read.is_nan()
    if isinstance(want, dict):
        return (isinstance(read, dict) and read.keys() == want.keys()
                and all(same(read[k], want[k]) for k in want))
    if isinstance(want, list):
        return (isinstance(read, list) and len(read) == len(want)
                and all(same(r, w) for r, w in zip(read, want, strict=True)))
    return bool(read == want) and isinstance(read, bool) == isinstance(want, bool)


def fold(name: str) -> bytes:
    """A name as SQLite compares it (lone surrogates kept: they fail anyway)."""
    return name.encode("utf-8", "surrogatepass").lower()


def kind(value: Any) -> str:
    """Values of one kind share a PostgreSQL column type."""
    if isinstance(value, (list, tuple, dict, frozenset)):
        return "json"
    if isinstance(value, (datetime.datetime, datetime.time)):
        return f"{type(value).__name__}/{value.utcoffset() is not None}"
    return type(value).__name__


# -- the property -------------------------------------------------------------------

def check(items: list[dict[Any, Any]], run: Any, rows: list[dict[str, Any]], pg: bool) -> None:
    by_id = {id(item): i for i, item in enumerate(items)}
    scraped = {by_id[id(item)] for item in run.items}
    failed = {by_id[id(item)]: str(error) for item, error in run.errors}
    assert len(scraped) == len(run.items) and len(failed) == len(run.errors)
    assert scraped.isdisjoint(failed) and scraped | failed.keys() == set(range(len(items)))
    assert all(type(e).__name__ == "DatabaseError" and str(e) for _, e in run.errors)
    stored = [row[KEY] for row in rows]
    assert sorted(stored) == sorted(scraped), (stored, scraped, failed)  # each once
    assert run.stats.get("item_scraped_count", 0) == len(rows)
    # Fields whose items may fail for the database's reasons: a type that
    # changes from item to item (PostgreSQL), a name in another case (SQLite).
    kinds: dict[str, set[str]] = {}
    folds: dict[bytes, set[str]] = {}
    for item in items:
        for name, value in item.items():
            if isinstance(name, str) and value is not None:
                kinds.setdefault(name, set()).add(kind(value))
            if isinstance(name, str):
                folds.setdefault(fold(name), set()).add(name)
    for row in rows:
        item = items[row[KEY]]
        want = expected({k: v for k, v in item.items() if k != KEY}, pg)
        for name, value in want.items():
            read = row.get(name)  # PostgreSQL: no column until a value that is not None
            if not pg and isinstance(item[name], (list, tuple, dict, frozenset)):
                assert same(json.loads(read), json.loads(value)), (name, read, value)
            else:
                assert same(read, value), (name, read, value, item)
    for i, item in enumerate(items):
        fields = {k: v for k, v in item.items() if k != KEY}
        try:
            expected(fields, pg)
        except Unstorable:
            assert i in failed, (item, "stored, but the rules refuse it")
            continue
        at_risk = any(
            (pg and len(kinds.get(n, ())) > 1) or (not pg and len(folds[fold(n)]) > 1)
            or (pg and isinstance(v, Decimal))  # numeric's own limits
            for n, v in fields.items()
        )
        if not at_risk:
            assert i in scraped, (item, failed.get(i))


def run_property(loop: asyncio.AbstractEventLoop, pipeline: str,
                 db_settings: Callable[[int], dict[str, Any]],
                 read_rows: Callable[[dict[str, Any]], list[dict[str, Any]]], pg: bool) -> None:

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(items)
    def prop(examples: list[dict[Any, Any]]) -> None:
        batch = [{**item, KEY: i} for i, item in enumerate(examples)]
        settings_ = {**db_settings(next(_counter)), "LOG_LEVEL": "CRITICAL"}
        run = asyncio.run_coroutine_threadsafe(
            store(pipeline, settings_, batch), loop).result(timeout=60)
        check(batch, run, read_rows(settings_), pg)

    prop()


@inprocess
async def test_sqlite_stores_each_item_once_with_its_values_or_fails_it(tmp_path: Path) -> None:
    def read(settings_: dict[str, Any]) -> list[dict[str, Any]]:
        path = settings_["SPEEDUP_SQLITE_PATH"]
        with sqlite3.connect(path) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute("SELECT * FROM items")]

    await asyncio.to_thread(
        run_property, asyncio.get_running_loop(), "SQLitePipeline",
        lambda n: {"SPEEDUP_SQLITE_PATH": tmp_path / f"{n}.sqlite3"}, read, False)


@inprocess
async def test_postgres_stores_each_item_once_with_its_values_or_fails_it(
    postgres_dsn: str,
) -> None:
    import psycopg
    from psycopg.rows import dict_row

    def read(settings_: dict[str, Any]) -> list[dict[str, Any]]:
        with psycopg.connect(postgres_dsn, row_factory=dict_row) as conn:
            return conn.execute(f"SELECT * FROM {settings_['SPEEDUP_POSTGRES_TABLE']}").fetchall()

    await asyncio.to_thread(
        run_property, asyncio.get_running_loop(), "PostgresPipeline",
        lambda n: {"SPEEDUP_POSTGRES_DSN": postgres_dsn, "SPEEDUP_POSTGRES_TABLE": f"prop_{n}"},
        read, True)
