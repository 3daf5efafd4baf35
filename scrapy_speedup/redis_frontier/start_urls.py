"""Start URL entries, as scrapy-redis's tooling pushes them to
``<spider>:start_urls``, made into requests.

An entry is a URL (``https://example.com/``), or a JSON object::

    {"url": "https://example.com/search", "method": "POST", "body": "q=1",
     "headers": {"Content-Type": "application/x-www-form-urlencoded"},
     "meta": {"job": 7}, "priority": 10, "dont_filter": true,
     "callback": "parse_search", "errback": "on_error", "cb_kwargs": {"page": 1}}

or ``"formdata": {...}`` for a form (a ``FormRequest``, as scrapy-redis 0.9
makes of the object's other fields). A spider with scrapy-redis's hook
``make_request_from_data(data: bytes)`` makes its own requests instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from scrapy import FormRequest, Request

if TYPE_CHECKING:
    from scrapy import Spider

__all__ = ["FIELDS", "BadStartUrlError", "describe", "requests_from_entry"]

#: The fields of a JSON entry, and what each must be.
FIELDS: dict[str, str] = {
    "url": "a string",
    "method": "a string",
    "headers": "a JSON object",
    "body": "a string",
    "meta": "a JSON object",
    "priority": "an integer",
    "dont_filter": "true or false",
    "callback": "the name of a method of the spider",
    "errback": "the name of a method of the spider",
    "cb_kwargs": "a JSON object",
    "formdata": "a JSON object",
}
_TYPES: dict[str, type | tuple[type, ...]] = {
    "url": str, "method": str, "headers": dict, "body": str, "meta": dict, "priority": int,
    "dont_filter": bool, "callback": str, "errback": str, "cb_kwargs": dict, "formdata": dict,
}
# RFC 9110's token: a method with a space or a line break in it would be
# written into the request line as it is.
_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# An entry is quoted in the log up to this length: enough to find it in the
# tooling that pushed it, not a megabyte of it.
_QUOTE_CHARS = 200


class BadStartUrlError(ValueError):
    """An entry that cannot be made into a request; the message says why."""


def describe(data: bytes) -> str:
    """The entry, quoted for the log."""
    text = repr(data[:_QUOTE_CHARS])
    return text + (f" (… {len(data)} bytes)" if len(data) > _QUOTE_CHARS else "")


def requests_from_entry(data: bytes, spider: Spider, max_url_length: int = 0) -> list[Request]:
    """The requests of one entry; :exc:`BadStartUrlError` if it is not one.
    *max_url_length*: Scrapy's URLLENGTH_LIMIT, which its spider middleware
    applies to the requests of callbacks and of ``start()`` (0: none)."""
    hook = getattr(spider, "make_request_from_data", None)
    requests = _from_hook(hook, data) if callable(hook) else _from_data(data, spider)
    for request in requests:
        if max_url_length and len(request.url) > max_url_length:
            raise BadStartUrlError(f"a URL of {len(request.url)} characters, past"
                                   f" URLLENGTH_LIMIT ({max_url_length})")
    return requests


def _from_data(data: bytes, spider: Spider) -> list[Request]:
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise BadStartUrlError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text:
        raise BadStartUrlError("empty")
    if text[0] not in "{[\"":
        return [_request(Request, spider, text)]
    try:
        fields = json.loads(text)
    except (ValueError, RecursionError) as exc:  # [[[[... nested past the stack
        raise BadStartUrlError(f"not valid JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise BadStartUrlError(f"a JSON {type(fields).__name__}, not a URL or a JSON object with"
                               ' a "url"')
    return [_from_fields(fields, spider)]


def _from_fields(fields: dict[str, Any], spider: Spider) -> Request:
    if "url" not in fields:
        raise BadStartUrlError('no "url" field')
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise BadStartUrlError(f"unknown field \"{unknown[0]}\" (fields: {', '.join(FIELDS)})")
    for name, value in fields.items():
        wanted = _TYPES[name]
        # JSON true is a Python bool, which is an int: not a priority.
        if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
            raise BadStartUrlError(f'"{name}" must be {FIELDS[name]}, not {json.dumps(value)[:80]}')
    kwargs = dict(fields)
    url = kwargs.pop("url")
    if "method" in kwargs and not _METHOD.fullmatch(kwargs["method"]):
        raise BadStartUrlError(f'"method" ({kwargs["method"]!r}) is not an HTTP method')
    if "body" in kwargs and "formdata" in kwargs:
        raise BadStartUrlError('both "body" and "formdata": give one (formdata makes the body)')
    for name in ("callback", "errback"):
        if name in kwargs:
            method = getattr(spider, kwargs[name], None)
            if not callable(method) or kwargs[name].startswith("_"):
                raise BadStartUrlError(f'"{name}" ({kwargs[name]!r}) is not a method of the'
                                       f" spider {spider.name!r}")
            kwargs[name] = method
    if "headers" in kwargs:
        for key, value in kwargs["headers"].items():
            strings = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str) for v in strings):
                raise BadStartUrlError(f'"headers" values must be strings or lists of strings;'
                                       f" {key!r} is {json.dumps(value)[:80]}")
            if any("\r" in v or "\n" in v for v in [key, *strings]):
                raise BadStartUrlError(f'"headers" {key!r} has a line break in it')
    cls = FormRequest if "formdata" in kwargs else Request
    if "formdata" in kwargs:
        for key, value in kwargs["formdata"].items():
            if not isinstance(value, str):
                raise BadStartUrlError(f'"formdata" values must be strings; {key!r} is'
                                       f" {json.dumps(value)[:80]}")
    return _request(cls, spider, url, **kwargs)


def _request(cls: type[Request], spider: Spider, url: str, **kwargs: Any) -> Request:
    try:
        return cls(url.strip(), **kwargs)
    except Exception as exc:  # noqa: BLE001 - Scrapy and w3lib raise several kinds
        # Scrapy's own words: "Missing scheme in request url: ..."
        raise BadStartUrlError(f"not a request Scrapy makes: {exc}") from None


def _from_hook(hook: Any, data: bytes) -> list[Request]:
    try:
        made = hook(data)
    except Exception as exc:  # noqa: BLE001 - the spider's code raises anything
        raise BadStartUrlError(f"make_request_from_data raised {type(exc).__name__}: {exc}") \
            from None
    if made is None:
        return []
    requests = [made] if isinstance(made, Request) else \
        list(made) if isinstance(made, Iterable) else [made]
    for request in requests:
        if not isinstance(request, Request):
            raise BadStartUrlError("make_request_from_data must return a Request, requests or"
                                   f" None, not {type(request).__name__}")
    return requests
