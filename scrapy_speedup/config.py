"""Settings of scrapy-speedup, parsed and validated once per crawler.

Every ``SPEEDUP_*`` setting is read here and nowhere else: components take
the :class:`SpeedupConfig` of their crawler from :meth:`SpeedupConfig.of`.
A bad value raises :exc:`SpeedupSettingsError` naming the setting, the value
and what it must be, whatever its type (a command-line string, a list, NaN).
"""

from __future__ import annotations

import ipaddress
import json
import math
import multiprocessing
import os
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from scrapy_speedup.exceptions import SpeedupSettingsError

if TYPE_CHECKING:
    from typing import Self

    from scrapy.crawler import Crawler
    from scrapy.settings import BaseSettings

__all__ = [
    "ENGINE_INDEX_SETTING", "DaskSettings", "SpeedupConfig", "SpeedupSettingsError",
    "default_start_method", "find_browser_executable",
]

#: Offloading a call costs the crawl's process ~55 us alone and ~0.2-0.4 ms in a
#: busy crawl (pickling, the socket, an extra turn of the loop): always
#: offloading a 0.1 ms function cost the demo crawl 5-10%. Below this run time
#: a function is cheaper inline; above, the pool wins (docs/benchmarks.rst).
DEFAULT_INLINE_BELOW_MS = 0.5

_START_METHODS = ("forkserver", "spawn")
# A table name, optionally with its schema: letters, digits and _.
_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
_NOT_GIVEN = object()
# The longest any *_SECONDS or *_MS setting may be: a week (a longer wait
# is no wait at all, and Python's timeouts overflow far past it).
_MAX_SECONDS = 7 * 24 * 3600.0
# More workers than this is a typo (each is a process with its own memory).
_MAX_WORKERS = 1024
_MAX_THREADS = 10_000


def default_start_method() -> str:
    # "fork" from a process that runs threads (Twisted's pool, the executor's
    # own threads) can copy a held lock into the child and deadlock it, so it
    # is never a default; forkserver forks from a clean, single-threaded server.
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _raw(settings: BaseSettings, name: str) -> Any:
    """The value, or _NOT_GIVEN when unset or empty (``-s NAME=``)."""
    value = settings.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return _NOT_GIVEN
    return value


def _error(name: str, value: Any, must: str) -> SpeedupSettingsError:
    return SpeedupSettingsError(f"{name} ({value!r}) must be {must}")


def _number(name: str, value: Any, kind: str) -> float:
    """*value* as a finite number; strings are parsed; bools, lists, NaN and
    infinities are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _error(name, value, kind)
    try:
        number = float(value) if not isinstance(value, int) else value
    except (ValueError, OverflowError):
        raise _error(name, value, kind) from None
    if isinstance(number, float) and not math.isfinite(number):
        raise _error(name, value, f"{kind}, and finite")
    return number


_MAX_IN_FLIGHT = 100_000


def _int(
    settings: BaseSettings, name: str, default: int | None, *, minimum: int,
    maximum: int | None = None,
) -> int | None:
    value = _raw(settings, name)
    if value is _NOT_GIVEN:
        return default
    number = _number(name, value, "an integer")
    if isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            raise _error(name, value, "an integer") from None
    elif isinstance(number, float):
        if not number.is_integer():
            raise _error(name, value, "an integer")  # 1.9 workers is not 1
        number = int(number)
    if number < minimum:
        raise _error(name, value, f"{minimum} or more")
    if maximum is not None and number > maximum:
        raise _error(name, value, f"at most {maximum}")
    return int(number)


def _float(
    settings: BaseSettings, name: str, default: float | None, *, allow_zero: bool = False,
    minimum: float = 0.0, maximum: float = _MAX_SECONDS,
) -> float | None:
    value = _raw(settings, name)
    if value is _NOT_GIVEN:
        return default
    number = float(_number(name, value, "a number"))
    if number < minimum or (number == 0 and not allow_zero):
        if minimum:
            raise _error(name, value, f"at least {minimum:g}")
        raise _error(name, value, "0 or more" if allow_zero else "more than 0")
    if number > maximum:
        raise _error(name, value, f"at most {maximum:g}")
    return number


def _bool(settings: BaseSettings, name: str, default: bool) -> bool:
    value = _raw(settings, name)
    if value is _NOT_GIVEN:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "false", "0"):
        return value.strip().lower() in ("true", "1")
    raise _error(name, value, "True or False")


def _str(settings: BaseSettings, name: str, default: str | None) -> str | None:
    value = _raw(settings, name)
    if value is _NOT_GIVEN:
        return default
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise _error(name, value, "a string")
    return value


def _table(settings: BaseSettings, name: str) -> str:
    table = _str(settings, name, "items")
    assert table is not None
    if not _TABLE.fullmatch(table):  # fullmatch: "$" allows a trailing newline
        raise _error(
            name, table,
            "a plain table name, optionally with its schema (schema.table): letters,"
            " digits and _, not starting with a digit",
        )
    return table


def _list_from_text(name: str, value: Any, must: str) -> Any:
    """A list given as a string (the command line): JSON if it starts with
    ``[``, else comma-separated, as ``getlist`` reads it. Other values as
    they are."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except ValueError:
            raise _error(name, value, f"{must}; this is not valid JSON") from None
    return [part.strip() for part in text.split(",") if part.strip()]


def _str_list(settings: BaseSettings, name: str) -> tuple[str, ...]:
    """Like ``getlist`` (comma-separated), and a JSON list from the command line."""
    value = _raw(settings, name)
    if value is _NOT_GIVEN:
        return ()
    value = _list_from_text(name, value, "a list")
    if not isinstance(value, (list, tuple)):
        raise _error(name, value, "a list of import paths")
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise SpeedupSettingsError(
                f"{name} must list import paths as strings, got {item!r}"
            )
    paths = tuple(item.strip() for item in value)
    repeated = sorted({p for p in paths if paths.count(p) > 1})
    if repeated:
        raise SpeedupSettingsError(f"{name} lists {', '.join(repeated)} more than once")
    return paths


def _start_method(settings: BaseSettings) -> str:
    name = "SPEEDUP_PROCESS_START_METHOD"
    value = _str(settings, name, default_start_method())
    assert value is not None
    method = value.strip().lower()
    if method == "fork":
        raise _error(
            name, value,
            "'forkserver' or 'spawn': 'fork' copies the crawl's threads' locks into"
            " the workers and can deadlock them",
        )
    if method not in _START_METHODS:
        raise _error(name, value, "'forkserver' or 'spawn'")
    if method not in multiprocessing.get_all_start_methods():
        raise SpeedupSettingsError(
            f"{name} ({value!r}) is not available on this platform; available:"
            f" {multiprocessing.get_all_start_methods()}"
        )
    return method


def _per_slot_default(settings: BaseSettings) -> int:
    """The default ceiling of adaptive concurrency: Scrapy's own per-slot
    limit. Scrapy's settings are Scrapy's to validate: a value it takes (0
    per domain with a per-IP limit) must not stop the crawl here."""
    for name in ("CONCURRENT_REQUESTS_PER_DOMAIN", "CONCURRENT_REQUESTS_PER_IP"):
        try:
            value = int(settings.get(name) or 0)
        except (TypeError, ValueError):
            continue
        if value > 0:
            return value
    return 8


_EXECUTORS = ("local", "dask")


@dataclass(frozen=True)
class DaskSettings:
    """Where the Dask scheduler is, and how to reach it safely."""

    address: str
    #: (CA file, certificate file, key file) for a ``tls://`` address.
    tls: tuple[str, str, str] | None
    connect_timeout_seconds: float


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: where it points is not known here


def _dask(settings: BaseSettings, executor: str) -> DaskSettings | None:
    """The Dask settings, checked for safety: tasks are pickles, and a
    worker runs whatever pickle it is sent, so they travel only over TLS, or
    to this machine, unless the user says in so many words that the network
    is trusted (unauthenticated Dask schedulers have been a known hole,
    CVE-2021-42343)."""
    name = "SPEEDUP_DASK_SCHEDULER_ADDRESS"
    address = _str(settings, name, None)
    if executor != "dask":
        return None
    if address is None:
        raise SpeedupSettingsError(
            f'SPEEDUP_PROCESS_EXECUTOR is "dask": set {name} to the Dask scheduler\'s'
            ' address, e.g. "tls://scheduler.example:8786" or "tcp://127.0.0.1:8786"'
        )
    address = address.strip()
    parts = urlsplit(address)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if parts.scheme not in ("tcp", "tls") or not host or port is None:
        raise _error(name, address, 'a "tls://host:port" or "tcp://host:port" address')
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username \
            or parts.password:
        raise _error(name, address, 'a "tls://host:port" or "tcp://host:port" address, with'
                     " nothing after the port and no user or password")
    # As Dask spells it (a lowercase scheme, no trailing slash): Dask refuses
    # other spellings that urlsplit takes.
    address = f"{parts.scheme}://{f'[{host}]' if ':' in host else host}:{port}"
    paths = [_str(settings, "SPEEDUP_DASK_TLS_CA_FILE", None),
             _str(settings, "SPEEDUP_DASK_TLS_CERT_FILE", None),
             _str(settings, "SPEEDUP_DASK_TLS_KEY_FILE", None)]
    given = [path for path in paths if path is not None]
    if parts.scheme == "tls":
        if len(given) != 3:
            raise SpeedupSettingsError(
                f"{name} ({address!r}) is a TLS address: set SPEEDUP_DASK_TLS_CA_FILE,"
                " SPEEDUP_DASK_TLS_CERT_FILE and SPEEDUP_DASK_TLS_KEY_FILE (the CA that"
                " signed the scheduler's certificate, and this client's certificate and key)"
            )
        for what, path in zip(("CA", "CERT", "KEY"), given, strict=True):
            if not os.path.isfile(path):
                raise SpeedupSettingsError(f"SPEEDUP_DASK_TLS_{what}_FILE: no file at {path!r}")
        tls: tuple[str, str, str] | None = (given[0], given[1], given[2])
    else:
        if given:
            raise SpeedupSettingsError(
                f"SPEEDUP_DASK_TLS_* files are set but {name} ({address!r}) is not a tls://"
                " address: nothing would be encrypted"
            )
        tls = None
        if not _is_loopback(host) and not _bool(
                settings, "SPEEDUP_DASK_INSECURE_ALLOW_PLAIN_TCP", False):
            raise SpeedupSettingsError(
                f"{name} ({address!r}) sends pickles in clear to another machine, and a"
                " Dask worker runs any pickle it is sent: use a tls:// address with"
                " SPEEDUP_DASK_TLS_CA_FILE, _CERT_FILE and _KEY_FILE, or, on a network"
                " you trust entirely, set SPEEDUP_DASK_INSECURE_ALLOW_PLAIN_TCP = True"
            )
    timeout = _float(settings, "SPEEDUP_DASK_CONNECT_TIMEOUT_SECONDS", 30.0)
    assert timeout is not None
    return DaskSettings(address, tls, timeout)


def _executor(settings: BaseSettings) -> str:
    name = "SPEEDUP_PROCESS_EXECUTOR"
    value = _str(settings, name, "local")
    assert value is not None
    executor = value.strip().lower()
    if executor not in _EXECUTORS:
        raise _error(name, value, '"local" (the process pool of this machine) or "dask"')
    if executor == "dask":
        try:
            import distributed  # noqa: F401 - only whether it is installed
        except ImportError:
            raise SpeedupSettingsError(
                f'{name} is "dask" but Dask\'s distributed package is not installed:'
                ' pip install "scrapy-speedup[dask]"'
            ) from None
    return executor


@dataclass(frozen=True)
class FrontierSettings:
    """The crawl's frontier on Redis."""

    url: str
    #: Prefix of the crawl's keys; None: the spider's name.
    name: str | None
    visibility_timeout_seconds: float
    max_outage_seconds: float
    #: The key of the crawl's start URLs (``%(name)s``: the spider's name);
    #: None: ``<name>:start_urls``.
    start_urls_key: str | None = None
    #: How long the crawl, idle, waits for start URLs before it finishes;
    #: ``math.inf``: for ever.
    wait_for_start_urls_seconds: float = 0.0


def _start_urls_key(settings: BaseSettings) -> str | None:
    name = "SPEEDUP_FRONTIER_START_URLS_KEY"
    key = _str(settings, name, None)
    if key is None:
        return None
    try:
        formatted = key % {"name": "spider"}
    except (KeyError, ValueError, TypeError):
        raise _error(name, key, 'a Redis key, with "%(name)s" for the spider\'s name and'
                     ' "%%" for a "%"') from None
    if not formatted.strip():
        raise _error(name, key, "a Redis key, not blank")
    return key


def _wait_for_start_urls(settings: BaseSettings) -> float:
    name = "SPEEDUP_FRONTIER_WAIT_FOR_START_URLS_SECONDS"
    value = _raw(settings, name)
    if isinstance(value, str) and value.strip().lower() == "forever":
        return math.inf
    try:
        wait = _float(settings, name, 0.0, allow_zero=True)
    except SpeedupSettingsError:
        raise _error(name, value, 'a number of seconds (0: do not wait) or "forever"') from None
    assert wait is not None
    return wait


def _frontier(settings: BaseSettings) -> FrontierSettings | None:
    name = "SPEEDUP_FRONTIER_URL"
    url = _str(settings, name, None)
    if url is None:
        return None
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise _error(name, url, 'a Redis URL: "redis://host:6379/0", or "rediss://" for TLS')
    visibility = _float(settings, "SPEEDUP_FRONTIER_VISIBILITY_TIMEOUT_SECONDS", 60.0,
                        minimum=1.0)
    assert visibility is not None
    prefix = _str(settings, "SPEEDUP_FRONTIER_NAME", None)
    if prefix is not None and (not prefix.strip() or any(c.isspace() for c in prefix)):
        raise _error("SPEEDUP_FRONTIER_NAME", prefix, "a name without spaces")
    outage = _float(settings, "SPEEDUP_FRONTIER_MAX_OUTAGE_SECONDS", 300.0)
    assert outage is not None
    return FrontierSettings(url, prefix, visibility, outage, _start_urls_key(settings),
                            _wait_for_start_urls(settings))


#: The setting that scrapy-speedup sets in an engine process (its index). It
#: is not a user setting: a crawl that sets it by hand would act as an engine.
ENGINE_INDEX_SETTING = "_SPEEDUP_ENGINE_INDEX"


def _crawl_processes(settings: BaseSettings) -> int:
    name = "SPEEDUP_CRAWL_PROCESSES"
    value = _raw(settings, name)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1
    if isinstance(value, str) and value.strip().lower() == "auto":
        return cores
    # Each engine is a whole crawler process (~80 MB); past a few per core
    # they only share the cores, and a typo (1000) would start them all.
    most = max(4 * cores, 2)
    number = _int(settings, name, 1, minimum=1, maximum=_MAX_WORKERS)
    assert number is not None
    if number > most:
        raise _error(name, value, f'at most {most} (4 x the {cores} cores here), or "auto"')
    return number


def _pipeline_dict(settings: BaseSettings, name: str) -> dict[str, int]:
    """A component dict like ITEM_PIPELINES ({path: order}); a list is taken
    too, in its order. Entries set to None are off, as in Scrapy."""
    value = _raw(settings, name)
    if value is _NOT_GIVEN:
        return {}
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text) if text[:1] in "[{" else None
        except ValueError:
            raise _error(name, value, "a dict of import paths and orders; this is not valid"
                         " JSON") from None
        if value is None:
            value = [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        value = {item: index for index, item in enumerate(value)}
    if not hasattr(value, "items"):
        raise _error(name, value, "a dict of import paths and orders, like ITEM_PIPELINES")
    pipelines: dict[str, int] = {}
    for entry, order in dict(value.items()).items():
        if order is None:
            continue
        key = f"{entry.__module__}.{entry.__qualname__}" if isinstance(entry, type) else entry
        if not isinstance(key, str) or not key.strip():
            raise SpeedupSettingsError(f"{name} must name pipelines by import path, got {key!r}")
        if isinstance(order, bool) or not isinstance(order, int):
            raise SpeedupSettingsError(
                f"{name} gives {key!r} the order {order!r}: it must be an integer"
            )
        pipelines[key.strip()] = order
    return pipelines


# One parse per crawler; see SpeedupConfig.of.
_of_crawler: weakref.WeakKeyDictionary[Crawler, SpeedupConfig] = weakref.WeakKeyDictionary()


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
    process_max_message_mb: float
    process_pipelines: tuple[str, ...]
    #: "local" (the process pool) or "dask" (see :attr:`dask`).
    process_executor: str
    dask: DaskSettings | None
    #: The crawl's frontier on Redis (SPEEDUP_FRONTIER_URL), or None.
    frontier: FrontierSettings | None
    thread_enabled: bool
    thread_workers: int
    thread_timeout_seconds: float | None
    thread_max_stuck: int
    adaptive_enabled: bool
    adaptive_min_concurrency: int
    adaptive_max_concurrency: int
    adaptive_overload_retry_times: int
    adaptive_debug: bool
    doctor_enabled: bool
    lag_warn_ms: float
    shutdown_timeout_seconds: float
    sqlite_path: str | None
    sqlite_table: str
    postgres_dsn: str | None
    postgres_table: str
    db_batch_size: int
    db_commit_interval_seconds: float
    db_timeout_seconds: float
    db_retry_times: int
    crawl_processes: int
    crawl_pipelines: dict[str, int]
    crawl_start_timeout_seconds: float
    #: Set by scrapy-speedup in the settings of each engine process (its
    #: index, from 0); None in the process the user started.
    engine_index: int | None
    browser_router_enabled: bool = False
    #: The browser half (scrapy-playwright's handler, kept healthy) is on:
    #: the router needs it; a crawl that marks pages by hand can turn it on.
    browser_enabled: bool = False
    browser_executable: str | None = None
    #: The user check: a CSS selector (str) or a function (response) -> bool.
    browser_check: str | Callable[[Any], bool] | None = None
    browser_samples: int = 2
    browser_recheck_share: float = 0.01
    browser_blocked_resource_types: tuple[str, ...] = ("image", "media", "font")
    browser_context_max_pages: int = 100
    browser_timeout_seconds: float = 30.0
    browser_max_pages: int = 4
    browser_page_reuse_enabled: bool = True

    @property
    def coordinates(self) -> bool:
        """Whether this crawler is the coordinator of engine processes."""
        return self.crawl_processes > 1 and self.engine_index is None

    @classmethod
    def of(cls, crawler: Crawler) -> Self:
        """The config of *crawler*, parsed from its settings on first use."""
        config = _of_crawler.get(crawler)
        if config is None:
            config = _of_crawler[crawler] = cls.from_settings(crawler.settings)
        return config  # type: ignore[return-value]

    @classmethod
    def from_settings(cls, settings: BaseSettings) -> Self:
        workers = _int(settings, "SPEEDUP_PROCESS_WORKERS", os.cpu_count() or 1, minimum=1,
                       maximum=_MAX_WORKERS)
        assert workers is not None
        # Four tasks per worker: one running, three waiting in its socket, so
        # that it never idles while the reactor is busy with a stretch of
        # callbacks; more only delays the queue (docs/benchmarks.rst).
        # The backpressure thresholds are multiples of it: a huge value
        # would turn backpressure off without saying so.
        max_in_flight = _int(settings, "SPEEDUP_PROCESS_MAX_IN_FLIGHT", 4 * workers, minimum=1,
                             maximum=_MAX_IN_FLIGHT)
        thread_workers = _int(settings, "SPEEDUP_THREAD_WORKERS", 32, minimum=1,
                              maximum=_MAX_THREADS)
        assert thread_workers is not None
        adaptive_min = _int(settings, "SPEEDUP_ADAPTIVE_MIN_CONCURRENCY", 1, minimum=1)
        adaptive_max = _int(
            settings, "SPEEDUP_ADAPTIVE_MAX_CONCURRENCY", _per_slot_default(settings), minimum=1
        )
        assert adaptive_min is not None and adaptive_max is not None
        if adaptive_max < adaptive_min:
            raise SpeedupSettingsError(
                f"SPEEDUP_ADAPTIVE_MAX_CONCURRENCY ({adaptive_max}) must be at least"
                f" SPEEDUP_ADAPTIVE_MIN_CONCURRENCY ({adaptive_min})"
            )
        executor = _executor(settings)
        values: dict[str, Any] = {
            "enabled": _bool(settings, "SPEEDUP_ENABLED", True),
            "process_enabled": _bool(settings, "SPEEDUP_PROCESS_ENABLED", True),
            "process_workers": workers,
            "process_start_method": _start_method(settings),
            "process_max_in_flight": max_in_flight,
            "process_retry_times": _int(settings, "SPEEDUP_PROCESS_RETRY_TIMES", 1, minimum=0),
            "process_timeout_seconds": _float(settings, "SPEEDUP_PROCESS_TIMEOUT_SECONDS", None),
            "process_max_tasks_per_child": _int(
                settings, "SPEEDUP_PROCESS_MAX_TASKS_PER_CHILD", None, minimum=1
            ),
            "process_inline_below_ms": _float(
                settings, "SPEEDUP_PROCESS_INLINE_BELOW_MS", DEFAULT_INLINE_BELOW_MS,
                allow_zero=True,
            ),
            # Far above any item or result worth sending between processes;
            # what it guards against is a corrupt length that would have the
            # crawl wait forever for 2**63 bytes.
            "process_max_message_mb": _float(settings, "SPEEDUP_PROCESS_MAX_MESSAGE_MB", 512.0,
                                             minimum=1.0, maximum=2.0**20),
            "process_pipelines": _str_list(settings, "SPEEDUP_PROCESS_PIPELINES"),
            "process_executor": executor,
            "dask": _dask(settings, executor),
            "frontier": _frontier(settings),
            "thread_enabled": _bool(settings, "SPEEDUP_THREAD_ENABLED", True),
            "thread_workers": thread_workers,
            "thread_timeout_seconds": _float(settings, "SPEEDUP_THREAD_TIMEOUT_SECONDS", None),
            "thread_max_stuck": _int(
                settings, "SPEEDUP_THREAD_MAX_STUCK", thread_workers, minimum=0,
                maximum=_MAX_THREADS,
            ),
            "adaptive_enabled": _bool(settings, "SPEEDUP_ADAPTIVE_CONCURRENCY_ENABLED", False),
            "adaptive_min_concurrency": adaptive_min,
            "adaptive_max_concurrency": adaptive_max,
            "adaptive_overload_retry_times": _int(
                # Five back-offs of 1, 2, 4, 8 and 16 s (+-50%): a page that
                # stays overloaded fails after about 30 s, not minutes.
                settings, "SPEEDUP_ADAPTIVE_OVERLOAD_RETRY_TIMES", 5, minimum=0
            ),
            "adaptive_debug": _bool(settings, "SPEEDUP_ADAPTIVE_DEBUG", False),
            "doctor_enabled": _bool(settings, "SPEEDUP_DOCTOR_ENABLED", True),
            # asyncio's debug mode calls a callback slow from 100 ms on.
            # Below 10 ms the doctor's timer (a fifth of it) would run
            # every 2 ms and report the loop's own jitter as blocks.
            "lag_warn_ms": _float(settings, "SPEEDUP_LAG_WARN_MS", 100.0, minimum=10.0,
                                  maximum=60_000.0),
            "shutdown_timeout_seconds": _float(settings, "SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS", 30.0),
            "sqlite_path": _str(settings, "SPEEDUP_SQLITE_PATH", None),
            "sqlite_table": _table(settings, "SPEEDUP_SQLITE_TABLE"),
            "postgres_dsn": _str(settings, "SPEEDUP_POSTGRES_DSN", None),
            "postgres_table": _table(settings, "SPEEDUP_POSTGRES_TABLE"),
            "db_batch_size": _int(settings, "SPEEDUP_DB_BATCH_SIZE", 100, minimum=1),
            "db_commit_interval_seconds": _float(
                settings, "SPEEDUP_DB_COMMIT_INTERVAL_SECONDS", 1.0
            ),
            "db_timeout_seconds": _float(settings, "SPEEDUP_DB_TIMEOUT_SECONDS", 60.0),
            "db_retry_times": _int(settings, "SPEEDUP_DB_RETRY_TIMES", 5, minimum=0),
            "crawl_processes": _crawl_processes(settings),
            "crawl_pipelines": _pipeline_dict(settings, "SPEEDUP_CRAWL_PIPELINES"),
            # Each engine process imports the project and opens the spider and
            # its pipelines: seconds, or a minute for a heavy model loaded in
            # open_spider; past this the crawl stops rather than wait forever.
            "crawl_start_timeout_seconds": _float(
                settings, "SPEEDUP_CRAWL_START_TIMEOUT_SECONDS", 120.0
            ),
            "engine_index": _int(settings, ENGINE_INDEX_SETTING, None, minimum=0),
            **_browser(settings),
        }
        return cls(**values)


#: Playwright's resource types (playwright.dev/python/docs/api/class-request
#: #request-resource-type). "document" is the page itself: blocking it would
#: block every page.
_RESOURCE_TYPES = frozenset({
    "stylesheet", "image", "media", "font", "script", "texttrack", "xhr", "fetch",
    "eventsource", "websocket", "manifest", "other",
})
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def _browser_check(settings: BaseSettings) -> str | Callable[[Any], bool] | None:
    """A CSS selector, or a function (response) -> bool given as an object or
    as a dotted path. "div.price" is both a selector and a dotted path: it is
    a function only when it imports as one."""
    name = "SPEEDUP_BROWSER_CHECK"
    value = _raw(settings, name)
    if value is _NOT_GIVEN:
        return None
    if callable(value):
        return value  # type: ignore[no-any-return]
    if not isinstance(value, str):
        raise _error(name, value, "a CSS selector or the import path of a function"
                                  " (response) -> bool")
    text = value.strip()
    if _DOTTED.fullmatch(text):
        from scrapy.utils.misc import load_object

        try:
            func = load_object(text)
        except (ImportError, NameError, ValueError, AttributeError):
            func = None  # a selector such as "div.price"
        if func is not None:
            if not callable(func):
                raise _error(name, value, "a CSS selector or the import path of a function"
                                          f" (response) -> bool; {text} is not callable")
            return func  # type: ignore[no-any-return]
    from cssselect import GenericTranslator, SelectorError

    try:
        GenericTranslator().css_to_xpath(text)
    except SelectorError as exc:
        raise _error(name, value, "a CSS selector or the import path of a function"
                                  f" (response) -> bool; as a selector: {exc}") from None
    return text


def _resource_types(settings: BaseSettings) -> tuple[str, ...]:
    name = "SPEEDUP_BROWSER_BLOCKED_RESOURCE_TYPES"
    value = _raw(settings, name)
    if value is _NOT_GIVEN:
        return ("image", "media", "font")
    must = f"a list of Playwright resource types, from {sorted(_RESOURCE_TYPES)}"
    value = _list_from_text(name, value, must)  # "image,font" too
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(
        isinstance(t, str) for t in value
    ):
        raise _error(name, value, must)
    types = tuple(dict.fromkeys(t.strip().lower() for t in value))
    wrong = [t for t in types if t not in _RESOURCE_TYPES]
    if wrong:
        raise _error(name, settings.get(name), f"{must}; not {', '.join(wrong)}")
    return types


def find_browser_executable(given: str | None, headless: bool = True) -> str | None:
    """The Chromium to launch: the one given, else (headless) Chromium's
    headless shell, else chromium or chromium-browser on PATH (Debian's and
    Ubuntu's package names).

    The headless shell is what Playwright launches for headless Chromium: the
    full browser without a window (``--headless=new``) cost 1.6x its CPU a
    page, most of it in the browser process (docs/benchmarks.rst).
    """
    import shutil

    if given:
        return shutil.which(given) or (given if os.access(given, os.X_OK) else None)
    names = ["chromium", "chromium-browser"]
    if headless:
        names.insert(0, "chromium-headless-shell")
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def _browser(settings: BaseSettings) -> dict[str, Any]:
    router = _bool(settings, "SPEEDUP_BROWSER_ROUTER_ENABLED", False)
    enabled = _bool(settings, "SPEEDUP_BROWSER_ENABLED", False) or router
    executable = _str(settings, "SPEEDUP_BROWSER_EXECUTABLE", None)
    if executable is not None and find_browser_executable(executable) is None:
        raise _error("SPEEDUP_BROWSER_EXECUTABLE", executable,
                     "the path or the name on PATH of a Chromium executable; none is there")
    cores = os.cpu_count() or 1
    return {
        "browser_router_enabled": router,
        "browser_enabled": enabled,
        "browser_executable": executable,
        "browser_check": _browser_check(settings),
        "browser_samples": _int(settings, "SPEEDUP_BROWSER_SAMPLES", 2, minimum=1,
                                maximum=1000),
        # Each re-check of a plain kind renders a page the crawl did not need
        # rendered: where a tenth of the pages need the browser, 1% (every
        # 100th page) adds 9% to the renderings, 2% added 18% (docs/benchmarks.rst).
        "browser_recheck_share": _float(settings, "SPEEDUP_BROWSER_RECHECK_SHARE", 0.01,
                                        allow_zero=True, maximum=1.0),
        "browser_blocked_resource_types": _resource_types(settings),
        # Playwright keeps every request and response of a context until the
        # context closes (microsoft/playwright#6319): a context per 100 pages
        # keeps a long crawl's browser memory flat (docs/usage/browser.rst).
        "browser_context_max_pages": _int(settings, "SPEEDUP_BROWSER_CONTEXT_MAX_PAGES", 100,
                                          minimum=1),
        "browser_timeout_seconds": _float(settings, "SPEEDUP_BROWSER_TIMEOUT_SECONDS", 30.0),
        # A rendering page keeps about a core busy while its scripts run; more
        # pages than twice the cores only queue inside the browser (#59).
        "browser_max_pages": _int(settings, "SPEEDUP_BROWSER_MAX_PAGES", 2 * cores, minimum=1,
                                  maximum=1000),
        # A new page costs Chromium a renderer's set-up and tear-down: with
        # pages navigated again an all-browser crawl went 1.38x faster
        # (docs/benchmarks.rst).
        "browser_page_reuse_enabled": _bool(settings, "SPEEDUP_BROWSER_PAGE_REUSE_ENABLED", True),
    }
