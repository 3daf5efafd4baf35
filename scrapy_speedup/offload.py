"""Offloading from a callback: ``run_in_process`` and ``@cpu_bound`` for
CPU-heavy calls, ``run_in_thread`` and ``@blocking`` for calls that block."""

from __future__ import annotations

import functools
import importlib
import logging
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from scrapy_speedup.extension import SpeedupExtension, running_extensions

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

__all__ = ["CpuBoundFunction", "blocking", "cpu_bound", "run_in_process", "run_in_thread"]

logger = logging.getLogger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")

_warned: set[tuple[str, str]] = set()


def _warn_fallback(api: str, func: Any, what_happens: str) -> None:
    """Warn once per API and function that scrapy-speedup is not running."""
    name = getattr(func, "__qualname__", repr(func))
    if (api, name) not in _warned:
        _warned.add((api, name))
        logger.warning(
            "%s(%s): scrapy-speedup is not enabled in this process (no ADDONS entry,"
            " SPEEDUP_ENABLED=False, or inside a worker); %s",
            api, name, what_happens,
        )


def _the_running_extension(what: str) -> SpeedupExtension | None:
    """The extension of the one crawl with scrapy-speedup in this process, or
    None if there is none; several is an error, as the call cannot choose."""
    extensions = running_extensions()
    if len(extensions) > 1:
        raise RuntimeError(
            f"{what}() cannot tell which of the {len(extensions)} crawls with"
            f" scrapy-speedup in this process to use; call"
            f" SpeedupExtension.of(self.crawler).{what}(...) instead"
        )
    return extensions[0] if extensions else None


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
    extension = _the_running_extension("run_in_process")
    if extension is None:
        _warn_fallback("run_in_process", func, "running it inline")
        return getattr(func, "__speedup_wrapped__", func)(*args, **kwargs)
    result: _T = await extension.run_in_process(func, *args, **kwargs)
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
        # The worker calls this instead of the wrapper (see process.worker.run_task).
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


async def run_in_thread(
    func: Callable[..., _T], /, *args: Any, timeout: float | None = None, **kwargs: Any
) -> _T:
    """Run the blocking ``func(*args, **kwargs)`` in the crawl's thread pool.

    Use it for calls that wait (a blocking database driver, an SDK, a file
    write) from ``async def`` callbacks, pipelines and middlewares::

        await run_in_thread(cursor.execute, sql, params, timeout=10)

    At *timeout* seconds (default ``SPEEDUP_THREAD_TIMEOUT_SECONDS``, none if
    unset) the call raises :exc:`TimeoutError`; the thread it blocks is counted
    as stuck and replaced. Pass ``timeout`` by keyword: it is not given to
    *func*. Without scrapy-speedup enabled, Scrapy's own
    ``scrapy.utils.asyncio.run_in_thread`` runs it (with a warning, and no
    timeout).
    """
    extension = _the_running_extension("run_in_thread")
    if extension is None:
        from scrapy.utils.asyncio import run_in_thread as scrapy_run_in_thread

        _warn_fallback(
            "run_in_thread", func, "running it in Scrapy's shared thread pool, with no timeout"
        )
        return await scrapy_run_in_thread(func, *args, **kwargs)
    thread_result: _T = await extension.run_in_thread(func, *args, timeout=timeout, **kwargs)
    return thread_result


def blocking(
    func: Callable[_P, _T] | None = None, /, *, timeout: float | None = None
) -> Any:
    """Mark a function or method that blocks: calling it returns a coroutine
    that runs it in the crawl's thread pool.

    ::

        class StorePipeline:
            @blocking(timeout=10)
            def process_item(self, item):
                self.client.put(item)   # a blocking SDK call
                return item

    Scrapy awaits the coroutine, so the reactor keeps downloading meanwhile.
    ``@blocking`` without arguments uses ``SPEEDUP_THREAD_TIMEOUT_SECONDS``.
    """

    def decorate(function: Callable[_P, _T]) -> Callable[_P, Coroutine[Any, Any, _T]]:
        @functools.wraps(function)
        async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            return await run_in_thread(function, *args, timeout=timeout, **kwargs)

        return wrapper

    if func is not None:
        return decorate(func)
    return decorate
