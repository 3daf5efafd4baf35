"""Rows from items: every field name and value checked, per item, before it
joins a batch, so that one field the database cannot take fails its own item
and no other.

What each Python type becomes is documented in ``docs/usage/databases.rst``;
the rules live here, in one place for both databases:

* Field names are non-empty ``str`` with no NUL and valid Unicode. PostgreSQL
  truncates identifiers to ``max_identifier_length`` bytes (63), so a longer
  name would share a column with any field of the same first 63 bytes: it is
  refused. SQLite compares column names ignoring ASCII case: two fields of
  one item that differ only so would share a column, and are refused.
* ``None``, ``bool``, ``int`` (signed 64-bit), ``float``, ``str`` and
  ``bytes`` are stored as they are. ``datetime``/``date``/``time``,
  ``Decimal`` and ``UUID`` are PostgreSQL's own types, and ISO 8601 / exact
  text in SQLite. Containers (``dict``, ``list``, ``tuple``, sets, items) are
  JSON: ``jsonb`` in PostgreSQL, JSON text in SQLite. Anything else is refused
  with a message naming the field and its type, never stored as its repr.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from uuid import UUID

from itemadapter import ItemAdapter

from scrapy_speedup.exceptions import DatabaseError

__all__ = [
    "INT64_MAX", "INT64_MIN", "Dialect", "Row", "a_type", "ascii_fold", "json_text", "to_row",
]

Row = dict[str, Any]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Far deeper than any scraped structure; what it catches is a value that
#: contains itself, which would otherwise recurse until RecursionError.
_MAX_DEPTH = 100


@dataclass(frozen=True)
class Dialect:
    """What one database accepts, for :func:`to_row`."""

    #: "SQLite" or "PostgreSQL", as messages name it.
    database: str
    #: datetime, date, time, Decimal and UUID kept as they are (the driver
    #: stores them as the database's types), else converted to text.
    native_types: bool
    #: Column names compare ignoring ASCII case (SQLite).
    names_ignore_case: bool
    #: The longest column name, in UTF-8 bytes; None: no limit.
    max_name_bytes: int | None
    #: Text may hold NUL characters (SQLite; PostgreSQL's text cannot).
    text_allows_nul: bool
    #: NaN can be stored as a float (PostgreSQL; SQLite would store NULL).
    float_allows_nan: bool
    #: A JSON-ready structure (dicts, lists, str, int, float, bool, None) to
    #: what the driver stores as JSON.
    json: Callable[[Any], Any]


def ascii_fold(name: str) -> bytes:
    """A column name as SQLite compares it: ASCII letters in lower case, the
    rest unchanged (SQLite does not fold non-ASCII letters)."""
    return name.encode("utf-8").lower()


def a_type(value: Any) -> str:
    """"an int", "a decimal.Decimal": the type of *value*, for messages."""
    cls = type(value)
    name = cls.__qualname__
    if cls.__module__ != "builtins":
        name = f"{cls.__module__}.{name}"
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"


def _refuse(dialect: Dialect, why: str) -> DatabaseError:
    return DatabaseError(f"{dialect.database} cannot store this item: {why}")


def _check_name(name: Any, dialect: Dialect) -> str:
    if not isinstance(name, str):
        raise _refuse(dialect, f"the field name {name!r} is {a_type(name)}, and a column"
                               " name must be a str")
    if not name:
        raise _refuse(dialect, "a field has an empty name, which no column can have")
    if "\x00" in name:
        raise _refuse(dialect, f"the field name {name!r} holds a NUL character (\\x00), which"
                               " no column name can hold")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise _refuse(dialect, f"the field name {name!r} is not valid Unicode (a lone"
                               f" surrogate at index {exc.start})") from None
    if dialect.max_name_bytes is not None and size > dialect.max_name_bytes:
        raise _refuse(
            dialect,
            f"the field name {name!r} is {size} bytes long in UTF-8; {dialect.database}"
            f" truncates column names to {dialect.max_name_bytes} bytes, so it would share"
            " a column with any field that starts with the same bytes: shorten it",
        )
    return name


def _check_text(text: str, where: str, dialect: Dialect) -> str:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _refuse(dialect, f"{where} holds a str that is not valid Unicode (a lone"
                                   f" surrogate at index {exc.start})") from None
    if not dialect.text_allows_nul and "\x00" in text:
        raise _refuse(dialect, f"{where} holds a NUL character (\\x00), which"
                               f" {dialect.database} text cannot hold")
    return text


def to_row(item: Any, dialect: Dialect) -> Row:
    """The row of *item*: raises :exc:`DatabaseError` naming the field at fault
    when the item cannot be stored as it is."""
    row: Row = {}
    folded: dict[bytes, str] = {}
    for name, value in ItemAdapter(item).items():
        _check_name(name, dialect)
        if dialect.names_ignore_case:
            other = folded.setdefault(ascii_fold(name), name)
            if other != name:
                raise _refuse(
                    dialect,
                    f"the fields {other!r} and {name!r} would share one column"
                    f" ({dialect.database} column names ignore case): rename one of them",
                )
        row[name] = _value(value, f"the field {name!r}", dialect)
    return row


def _value(value: Any, where: str, dialect: Dialect) -> Any:
    """A top-level field value, as the driver should get it."""
    if value is None:
        return None
    # Subclasses (IntEnum, numpy.float64, a str subclass) are stored as
    # their base type, not as whatever their __str__ says.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        number = int(value)
        if not INT64_MIN <= number <= INT64_MAX:
            raise _refuse(
                dialect,
                f"{where} holds the int {number}, outside the signed 64-bit range of a"
                f" {dialect.database} integer: store it as a str or a Decimal",
            )
        return number
    if isinstance(value, float):
        real = float(value)
        if math.isnan(real) and not dialect.float_allows_nan:
            raise _refuse(dialect, f"{where} holds NaN, which {dialect.database} would"
                                   " store as NULL: store None, or a str")
        return real
    if isinstance(value, str):
        return _check_text(str.__str__(value), where, dialect)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
        return value if dialect.native_types else value.isoformat()
    if isinstance(value, Decimal):
        if value.is_snan():
            raise _refuse(dialect, f"{where} holds a signaling NaN Decimal, which no"
                                   " database stores")
        return value if dialect.native_types else str(value)
    if isinstance(value, UUID):
        return value if dialect.native_types else str(value)
    if _is_container(value):
        return dialect.json(_json(value, where, dialect, 0))
    raise _refuse(dialect, f"{where} holds {a_type(value)}, which {dialect.database}"
                           " cannot store: convert it to a str, int, float, bool, bytes,"
                           " datetime, Decimal, UUID, dict or list first")


def _is_container(value: Any) -> bool:
    return isinstance(value, (dict, list, tuple, set, frozenset)) or ItemAdapter.is_item(value)


def _json(value: Any, where: str, dialect: Dialect, depth: int) -> Any:
    """*value* as JSON-ready data: what json.dumps writes without a default."""
    if depth > _MAX_DEPTH:
        field = where.split("[", 1)[0]
        raise _refuse(dialect, f"{field} is nested more than {_MAX_DEPTH} levels deep (a"
                               " value that contains itself?)")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)  # JSON numbers have no range: stored exactly
    if isinstance(value, float):
        real = float(value)
        if not math.isfinite(real):
            raise _refuse(dialect, f"{where} holds {real}, which JSON cannot hold: store"
                                   " None, or a str")
        return real
    if isinstance(value, str):
        return _check_text(str.__str__(value), where, dialect)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (Decimal, UUID)):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise _refuse(dialect, f"{where} holds bytes inside a nested value, which JSON cannot"
                               " hold: decode them to a str, or make them a field of"
                               " their own (stored as binary)")
    if isinstance(value, dict) or (
        not isinstance(value, (list, tuple, set, frozenset)) and ItemAdapter.is_item(value)
    ):
        pairs = value.items() if isinstance(value, dict) else ItemAdapter(value).items()
        obj: dict[str, Any] = {}
        for key, inner in pairs:
            if not isinstance(key, str):
                raise _refuse(dialect, f"{where} has the key {key!r}, {a_type(key)}:"
                                       " JSON object keys must be str")
            _check_text(key, f"{where} (a key)", dialect)
            obj[key] = _json(inner, f"{where}[{key!r}]", dialect, depth + 1)
        return obj
    if isinstance(value, (set, frozenset)):
        try:
            value = sorted(value)
        except TypeError:
            raise _refuse(dialect, f"{where} holds a set whose values cannot be sorted; a set"
                                   " is stored as a sorted list: make it a list") from None
    if isinstance(value, (list, tuple)):
        return [_json(inner, f"{where}[{i}]", dialect, depth + 1) for i, inner in enumerate(value)]
    raise _refuse(dialect, f"{where} holds {a_type(value)}, which JSON cannot hold:"
                           " convert it to a str, int, float, bool, dict or list first")


def json_text(data: Any) -> str:
    """JSON-ready data as the text SQLite stores."""
    return json.dumps(data, ensure_ascii=False, allow_nan=False)
