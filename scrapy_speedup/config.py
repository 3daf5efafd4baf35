"""Settings of scrapy-speedup, parsed and validated once per crawler."""

from __future__ import annotations

import json
import multiprocessing
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import Self

    from scrapy.settings import BaseSettings

__all__ = ["SpeedupConfig", "SpeedupSettingsError", "default_start_method"]

#: Offloading a call costs the crawl's process ~55 us alone and ~0.2-0.4 ms in a
#: busy crawl (pickling, the socket, an extra turn of the loop): always
#: offloading a 0.1 ms function cost the demo crawl 5-10%. Below this run time
#: a function is cheaper inline; above, the pool wins (docs/benchmarks.rst).
DEFAULT_INLINE_BELOW_MS = 0.5


class SpeedupSettingsError(ValueError):
    """A ``SPEEDUP_*`` setting has a value that scrapy-speedup cannot use.

    Raised while the crawler is built, so that a crawl never runs without the
    speedup its settings ask for.
    """


def default_start_method() -> str:
    # "fork" from a process that runs threads (Twisted's pool, the executor's
    # own threads) can copy a held lock into the child and deadlock it, so it
    # is never a default; forkserver forks from a clean, single-threaded server.
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _get(settings: BaseSettings, name: str, kind: type, default: Any) -> Any:
    value = settings.get(name)
    if value is None or value == "":
        return default
    try:
        if kind is bool:
            return settings.getbool(name)
        if isinstance(value, bool):  # bool is an int: True workers is a typo
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise SpeedupSettingsError(
            f"{name} ({value!r}) must be {_KIND_NAMES[kind]}"
        ) from None


_KIND_NAMES = {int: "an integer", float: "a number", bool: "True or False"}


def _positive(name: str, value: float | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        floor = "0 or more" if allow_zero else "more than 0"
        raise SpeedupSettingsError(f"{name} ({value!r}) must be {floor}")


def _get_list(settings: BaseSettings, name: str) -> list[Any]:
    """Like ``getlist``, and a JSON list from the command line works too."""
    value = settings.get(name)
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError:
            raise SpeedupSettingsError(f"{name} ({value!r}) is not a valid JSON list") from None
        return list(parsed)
    return settings.getlist(name)


@dataclass(frozen=True)
class SpeedupConfig:
    """Every ``SPEEDUP_*`` setting, with its default filled in.

    The reference of each setting, its type and default, is
    ``docs/reference/settings.rst``.
    """

    enabled: bool
    process_enabled: bool
    process_workers: int
    process_start_method: str
    process_max_in_flight: int
    process_retry_times: int
    process_timeout_seconds: float | None
    process_max_tasks_per_child: int | None
    process_inline_below_ms: float
    process_pipelines: tuple[str, ...]
    thread_enabled: bool
    thread_workers: int
    thread_timeout_seconds: float | None
    adaptive_enabled: bool
    adaptive_min_concurrency: int
    adaptive_max_concurrency: int
    adaptive_overload_retry_times: int
    adaptive_debug: bool
    doctor_enabled: bool
    lag_warn_ms: float
    shutdown_timeout_seconds: float

    @classmethod
    def from_settings(cls, settings: BaseSettings) -> Self:
        workers = _get(settings, "SPEEDUP_PROCESS_WORKERS", int, os.cpu_count() or 1)
        _positive("SPEEDUP_PROCESS_WORKERS", workers)
        start_method = str(
            settings.get("SPEEDUP_PROCESS_START_METHOD") or default_start_method()
        )
        if start_method not in ("forkserver", "spawn"):
            raise SpeedupSettingsError(
                f"SPEEDUP_PROCESS_START_METHOD ({start_method!r}) must be"
                " 'forkserver' or 'spawn': 'fork' copies the crawl's threads'"
                " locks into the workers and can deadlock them"
            )
        if start_method not in multiprocessing.get_all_start_methods():
            raise SpeedupSettingsError(
                f"SPEEDUP_PROCESS_START_METHOD ({start_method!r}) is not available"
                f" on this platform; available: {multiprocessing.get_all_start_methods()}"
            )
        # Four tasks per worker: one running, three waiting in its socket, so
        # that it never idles while the reactor is busy with a stretch of
        # callbacks; more only delays the queue (docs/benchmarks.rst).
        max_in_flight = _get(settings, "SPEEDUP_PROCESS_MAX_IN_FLIGHT", int, 4 * workers)
        _positive("SPEEDUP_PROCESS_MAX_IN_FLIGHT", max_in_flight)
        retry_times = _get(settings, "SPEEDUP_PROCESS_RETRY_TIMES", int, 1)
        _positive("SPEEDUP_PROCESS_RETRY_TIMES", retry_times, allow_zero=True)
        timeout = _get(settings, "SPEEDUP_PROCESS_TIMEOUT_SECONDS", float, None)
        _positive("SPEEDUP_PROCESS_TIMEOUT_SECONDS", timeout)
        max_tasks = _get(settings, "SPEEDUP_PROCESS_MAX_TASKS_PER_CHILD", int, None)
        _positive("SPEEDUP_PROCESS_MAX_TASKS_PER_CHILD", max_tasks)
        inline_below = _get(
            settings, "SPEEDUP_PROCESS_INLINE_BELOW_MS", float, DEFAULT_INLINE_BELOW_MS
        )
        _positive("SPEEDUP_PROCESS_INLINE_BELOW_MS", inline_below, allow_zero=True)
        thread_workers = _get(settings, "SPEEDUP_THREAD_WORKERS", int, 32)
        _positive("SPEEDUP_THREAD_WORKERS", thread_workers)
        thread_timeout = _get(settings, "SPEEDUP_THREAD_TIMEOUT_SECONDS", float, None)
        _positive("SPEEDUP_THREAD_TIMEOUT_SECONDS", thread_timeout)
        adaptive_min = _get(settings, "SPEEDUP_ADAPTIVE_MIN_CONCURRENCY", int, 1)
        _positive("SPEEDUP_ADAPTIVE_MIN_CONCURRENCY", adaptive_min)
        adaptive_max = _get(
            settings,
            "SPEEDUP_ADAPTIVE_MAX_CONCURRENCY",
            int,
            settings.getint("CONCURRENT_REQUESTS_PER_DOMAIN", 8),
        )
        if adaptive_max < adaptive_min:
            raise SpeedupSettingsError(
                f"SPEEDUP_ADAPTIVE_MAX_CONCURRENCY ({adaptive_max}) must be at least"
                f" SPEEDUP_ADAPTIVE_MIN_CONCURRENCY ({adaptive_min})"
            )
        overload_retries = _get(settings, "SPEEDUP_ADAPTIVE_OVERLOAD_RETRY_TIMES", int, 10)
        _positive("SPEEDUP_ADAPTIVE_OVERLOAD_RETRY_TIMES", overload_retries, allow_zero=True)
        # asyncio's debug mode calls a callback slow from 100 ms on.
        lag_warn_ms = _get(settings, "SPEEDUP_LAG_WARN_MS", float, 100.0)
        _positive("SPEEDUP_LAG_WARN_MS", lag_warn_ms)
        shutdown_timeout = _get(settings, "SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS", float, 30.0)
        _positive("SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS", shutdown_timeout)

        pipelines = _get_list(settings, "SPEEDUP_PROCESS_PIPELINES")
        for path in pipelines:
            if not isinstance(path, str):
                raise SpeedupSettingsError(
                    f"SPEEDUP_PROCESS_PIPELINES must list import paths as strings,"
                    f" got {path!r}"
                )
        return cls(
            enabled=_get(settings, "SPEEDUP_ENABLED", bool, True),
            process_enabled=_get(settings, "SPEEDUP_PROCESS_ENABLED", bool, True),
            process_workers=workers,
            process_start_method=start_method,
            process_max_in_flight=max_in_flight,
            process_retry_times=retry_times,
            process_timeout_seconds=timeout,
            process_max_tasks_per_child=max_tasks,
            process_inline_below_ms=inline_below,
            process_pipelines=tuple(pipelines),
            thread_enabled=_get(settings, "SPEEDUP_THREAD_ENABLED", bool, True),
            thread_workers=thread_workers,
            thread_timeout_seconds=thread_timeout,
            adaptive_enabled=_get(settings, "SPEEDUP_ADAPTIVE_CONCURRENCY_ENABLED", bool, False),
            adaptive_min_concurrency=adaptive_min,
            adaptive_max_concurrency=adaptive_max,
            adaptive_overload_retry_times=overload_retries,
            adaptive_debug=_get(settings, "SPEEDUP_ADAPTIVE_DEBUG", bool, False),
            doctor_enabled=_get(settings, "SPEEDUP_DOCTOR_ENABLED", bool, True),
            lag_warn_ms=lag_warn_ms,
            shutdown_timeout_seconds=shutdown_timeout,
        )
