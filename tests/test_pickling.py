from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import pytest
from parsel import Selector

from scrapy_speedup.exceptions import UnpicklableError
from scrapy_speedup.process import pickling as _pickling


@dataclass
class Product:
    name: str
    extra: Any


def test_roundtrip() -> None:
    assert _pickling.loads(_pickling.dumps({"a": [1, 2]}, "x")) == {"a": [1, 2]}


def test_names_the_nested_field_and_type() -> None:
    item = {"url": "u", "meta": {"files": [1, threading.Lock()]}}
    with pytest.raises(UnpicklableError) as info:
        _pickling.dumps(item, "the item")
    assert str(info.value).startswith(
        "the item: ['meta']['files'][1] holds a _thread.lock, which cannot be pickled"
    )


def test_names_a_dataclass_item_field() -> None:
    with pytest.raises(UnpicklableError, match=r"\['extra'\] holds a parsel.selector.Selector"):
        _pickling.dumps(Product("p", Selector(text="<p/>")), "the item")


def test_names_the_argument_of_a_call() -> None:
    parts = _pickling.call_parts(len, ("ok", open(__file__)), {}, "len")
    try:
        expected = r"arguments of len\(\): \[1\] holds a _io.TextIOWrapper"
        with pytest.raises(UnpicklableError, match=expected):
            _pickling.dumps_parts(("call", *(v for _, v in parts)), parts)
    finally:
        parts[1][1][1].close()


def test_lambda_gets_a_hint() -> None:
    parts = _pickling.call_parts(lambda: 1, (), {}, "<lambda>")
    with pytest.raises(UnpicklableError, match="define the function at module level"):
        _pickling.dumps_parts(("call", *(v for _, v in parts)), parts)
