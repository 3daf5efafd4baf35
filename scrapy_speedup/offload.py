"""``run_in_process`` and ``@cpu_bound``: offload CPU-heavy calls from a callback."""

from __future__ import annotations

import functools
import importlib
import logging
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from scrapy_speedup.extension import running_extensions

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

__all__ = ["CpuBoundFunction", "cpu_bound", "run_in_process"]

logger = logging.getLogger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")

_warned_inline: set[str] = set()


async def run_in_process(func: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Run ``func(*args, **kwargs)`` in the crawl's process pool and return its result.

    *func* must be importable by the workers (defined at module level), and its
    arguments and result must pickle. Use it from ``async def`` callbacks,
    pipelines and middlewares::

        signature = await run_in_process(minhash_signature, text)

    When one crawl runs in the process, its pool is found without help. When
    several do, call ``SpeedupExtension.of(self.crawler).run_in_process(...)``.
    Without scrapy-speedup enabled, the call runs inline (with a warning).
    """
    extensions = running_extensions()
    if len(extensions) > 1:
        raise RuntimeError(
            f"run_in_process() cannot tell which of the {len(extensions)} crawls"
            " with scrapy-speedup in this process to use; call"
            " SpeedupExtension.of(self.crawler).run_in_process(...) instead"
        )
    if not extensions:
        name = getattr(func, "__qualname__", repr(func))
        if name not in _warned_inline:
            _warned_inline.add(name)
            logger.warning(
                "run_in_process(%s): scrapy-speedup is not enabled in this process"
                " (no ADDONS entry, SPEEDUP_ENABLED=False, or inside a worker);"
                " running it inline",
                name,
            )
        return getattr(func, "__speedup_wrapped__", func)(*args, **kwargs)
    result: _T = await extensions[0].run_in_process(func, *args, **kwargs)
    return result


def _load_cpu_bound(module: str, qualname: str) -> CpuBoundFunction[Any, Any]:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[no-any-return]


class CpuBoundFunction(Generic[_P, _T]):
    """A module-level function whose calls run in the crawl's process pool.

    Calling it returns a coroutine: ``await heavy(x)``. The undecorated
    function stays reachable as ``heavy.func`` for a plain, inline call.
    """

    def __init__(self, func: Callable[_P, _T]) -> None:
        qualname = getattr(func, "__qualname__", "")
        if "<locals>" in qualname or getattr(func, "__name__", "") == "<lambda>":
            raise TypeError(
                f"@cpu_bound needs a module-level function that workers can import;"
                f" {qualname or func!r} is a lambda or nested function"
            )
        functools.update_wrapper(self, func)
        self.func = func
        # The worker calls this instead of the wrapper (see _worker.run_task).
        self.__speedup_wrapped__ = func

    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> Coroutine[Any, Any, _T]:
        return run_in_process(self, *args, **kwargs)  # type: ignore[arg-type]

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled by name, like a plain function: the module attribute is this
        # wrapper, not the function, so the default by-reference pickle fails.
        return (_load_cpu_bound, (self.func.__module__, self.func.__qualname__))

    def __repr__(self) -> str:
        return f"<cpu_bound {self.func.__module__}.{self.func.__qualname__}>"


def cpu_bound(func: Callable[_P, _T]) -> CpuBoundFunction[_P, _T]:
    """Mark a module-level function CPU-bound: awaiting a call offloads it.

    ::

        @cpu_bound
        def text_stats(html: str) -> dict[str, float]: ...

        async def parse(self, response):
            yield await text_stats(response.text)
    """
    return CpuBoundFunction(func)
