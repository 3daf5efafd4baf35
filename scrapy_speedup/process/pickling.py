"""Pickling with errors that say *which* argument or field cannot be pickled.

``pickle`` says "cannot pickle '_thread.lock' object" and no more; on a
100-field item that is useless. When a dump fails we walk the object and
report the path to the smallest part that fails on its own.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from itemadapter import ItemAdapter

from scrapy_speedup.exceptions import UnpicklableError

__all__ = ["call_parts", "dumps", "dumps_parts", "loads", "loads_named"]

_PROTOCOL = pickle.HIGHEST_PROTOCOL
# Deep enough for nested items; the walk only happens after a failure.
_MAX_DEPTH = 8

loads = pickle.loads


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _fails(obj: Any) -> Exception | None:
    try:
        pickle.dumps(obj, protocol=_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - any pickling error is the answer
        return exc
    return None


def _children(obj: Any) -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        return [(f"[{k!r}]", v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [(f"[{i}]", v) for i, v in enumerate(obj)]
    if ItemAdapter.is_item(obj):
        return [(f"[{k!r}]", v) for k, v in ItemAdapter(obj).items()]
    attrs = getattr(obj, "__dict__", None)
    if isinstance(attrs, dict):
        return [(f".{k}", v) for k, v in attrs.items()]
    return []


def _locate(obj: Any, error: Exception, path: str = "", depth: int = 0) -> str:
    """Return ``path: type (error)`` for the deepest part of *obj* that fails."""
    if depth < _MAX_DEPTH:
        for suffix, child in _children(obj):
            child_error = _fails(child)
            if child_error is not None:
                return _locate(child, child_error, path + suffix, depth + 1)
    where = f"{path} " if path else ""
    hint = ""
    if getattr(obj, "__name__", None) == "<lambda>" or "<locals>" in getattr(
        obj, "__qualname__", ""
    ):
        hint = "; define the function at module level so workers can import it"
    return (
        f"{where}holds a {_type_name(obj)}, which cannot be pickled"
        f" ({type(error).__name__}: {error}){hint}"
    )


def dumps(obj: Any, what: str) -> bytes:
    """Pickle *obj*; on failure raise :exc:`UnpicklableError` naming the part of
    *what* (e.g. "the item returned by MyPipeline.process_item()") that fails."""
    try:
        return pickle.dumps(obj, protocol=_PROTOCOL)
    except Exception as exc:
        raise UnpicklableError(f"{what}: {_locate(obj, exc)}") from exc


def dumps_parts(message: Any, parts: list[tuple[str, Any]]) -> bytes:
    """Pickle *message*; on failure name the first of its *parts* that fails.

    *parts* pairs each value inside the message with what it is to the user,
    e.g. ``("the arguments of parse_page()", args)``.
    """
    try:
        return pickle.dumps(message, protocol=_PROTOCOL)
    except Exception as exc:
        for what, value in parts:
            part_error = _fails(value)
            if part_error is not None:
                raise UnpicklableError(f"{what}: {_locate(value, part_error)}") from exc
        raise UnpicklableError(f"{parts[0][0] if parts else 'the task'}: {exc}") from exc


class _NamingUnpickler(pickle.Unpickler):
    """Remembers the last class it looked up: when rebuilding an object
    fails, that is the class whose rebuilding failed."""

    last: str = ""

    def find_class(self, module: str, name: str) -> Any:
        self.last = f"{module}.{name}"
        return super().find_class(module, name)


def loads_named(data: bytes | memoryview, what: str) -> Any:
    """Unpickle *data*; on failure raise :exc:`UnpicklableError` naming *what*
    it is and the class that could not be rebuilt.

    The classic case: an exception class whose ``__init__`` takes required
    arguments pickles fine but cannot be rebuilt from its ``args``.
    """
    try:
        return pickle.loads(data)
    except Exception as exc:
        unpickler = _NamingUnpickler(io.BytesIO(data))
        try:
            unpickler.load()
        except Exception:  # noqa: BLE001 - the same failure, now with a name
            pass
        culprit = f"rebuilding a {unpickler.last} failed: " if unpickler.last else ""
        raise UnpicklableError(
            f"{what} cannot be unpickled in the crawl: {culprit}{type(exc).__name__}: {exc}"
            " (a class whose __init__ takes arguments that are not in its pickled"
            " state, such as an exception with required arguments, needs a"
            " __reduce__ method)"
        ) from exc


def call_parts(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], name: str
) -> list[tuple[str, Any]]:
    """The parts of a call, named for :func:`dumps_parts`."""
    return [
        (f"the function {name}", func),
        (f"the arguments of {name}()", args),
        (f"the keyword arguments of {name}()", kwargs),
    ]
