"""What runs in an engine process: a whole Scrapy crawler of the user's spider,
with the user's settings and spider arguments, fed by the coordinator.

The coordinator takes a copy of the crawler's settings when the add-on first
sees them (the project's, ``-s``, the spider's ``custom_settings``) and the
spider's arguments (``-a``), and each engine process builds its crawler from
them. The add-on, loaded again there, sees :data:`ENGINE_INDEX_SETTING` and
sets the crawler up as an engine (:meth:`scrapy_speedup.Addon.update_settings`):
the lease scheduler, no feeds, no delay of its own (the coordinator holds the
crawl's), no stats dump. The spider's ``start()`` runs in the coordinator
only.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import traceback
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scrapy_speedup.config import ENGINE_INDEX_SETTING

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from scrapy.crawler import Crawler
    from scrapy.settings import BaseSettings

__all__ = ["EngineSpec", "current", "main", "remember", "spec_for"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSpec:
    """What an engine process needs to build the same crawler."""

    spider_module: str
    spider_qualname: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    #: The crawler's settings as the add-on first saw them, pickled.
    settings: bytes
    import_roots: tuple[str, ...]
    coordinator_pid: int
    max_message_bytes: int
    #: Whether the coordinator runs AsyncCrawlerProcess's way (the asyncio
    #: reactor, or none): the engine does as it does.
    use_asyncio: bool


@dataclass(frozen=True)
class _Remembered:
    settings: bytes
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


_remembered: weakref.WeakKeyDictionary[Crawler, _Remembered] = weakref.WeakKeyDictionary()


def remember(crawler: Crawler, settings: BaseSettings) -> None:
    """Keep what engine processes of *crawler* need, as the add-on first sees
    its settings (called from ``update_settings``, within ``Crawler.crawl``).

    Raises :exc:`SpeedupSettingsError` naming a setting or argument that
    cannot be sent to another process."""
    from scrapy_speedup.exceptions import SpeedupSettingsError

    args, kwargs = _spider_arguments(crawler)
    for name, value in [*((f"argument {i}", a) for i, a in enumerate(args)),
                        *((f"argument {k!r}", v) for k, v in kwargs.items())]:
        try:
            pickle.dumps(value)
        except Exception as exc:  # noqa: BLE001 - pickling and user code raise anything
            raise SpeedupSettingsError(
                f"SPEEDUP_CRAWL_PROCESSES: the spider's {name} ({value!r:.80}) cannot be"
                f" sent to the engine processes: {exc}"
            ) from None
    snapshot = settings.copy()
    try:
        blob = pickle.dumps(snapshot, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        for name in snapshot:
            try:
                pickle.dumps(snapshot[name])
            except Exception as exc:  # noqa: BLE001 - pickling and user code raise anything
                raise SpeedupSettingsError(
                    f"SPEEDUP_CRAWL_PROCESSES: the setting {name} ({snapshot[name]!r:.80})"
                    f" cannot be sent to the engine processes: {exc}. Use import paths"
                    " (strings) rather than objects, or functions defined at module level."
                ) from None
        raise
    _remembered[crawler] = _Remembered(blob, args, kwargs)


def _spider_arguments(crawler: Crawler) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments *crawler*'s spider was made with (``scrapy crawl -a``,
    ``CrawlerProcess.crawl(Spider, **kwargs)``). Scrapy keeps them nowhere:
    they are the locals of the ``Crawler.crawl`` call that is running."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in ("crawl", "crawl_async") and \
                frame.f_locals.get("self") is crawler and "kwargs" in frame.f_locals:
            return tuple(frame.f_locals.get("args", ())), dict(frame.f_locals["kwargs"])
        frame = frame.f_back  # type: ignore[assignment]
    from scrapy_speedup.exceptions import SpeedupSettingsError

    raise SpeedupSettingsError(
        "SPEEDUP_CRAWL_PROCESSES: the spider's arguments could not be found (the add-on"
        " runs outside Crawler.crawl); this Scrapy version is not supported for engine"
        " processes"
    )


def spec_for(crawler: Crawler) -> EngineSpec:
    from scrapy.utils.reactor import is_asyncio_reactor_installed

    from scrapy_speedup.config import SpeedupConfig
    from scrapy_speedup.process.pool import _import_roots

    remembered = _remembered.get(crawler)
    if remembered is None:
        raise RuntimeError("the add-on did not keep this crawler's settings for its engines")
    spidercls = crawler.spidercls
    use_asyncio = not crawler.settings.getbool("TWISTED_REACTOR_ENABLED")
    if not use_asyncio:
        use_asyncio = is_asyncio_reactor_installed()
    return EngineSpec(
        spider_module=spidercls.__module__,
        spider_qualname=spidercls.__qualname__,
        args=remembered.args,
        kwargs=remembered.kwargs,
        settings=remembered.settings,
        import_roots=_import_roots([spidercls.__module__]),
        coordinator_pid=os.getpid(),
        max_message_bytes=int(SpeedupConfig.of(crawler).process_max_message_mb * 2**20),
        use_asyncio=use_asyncio,
    )


# -- in the engine process ------------------------------------------------------

@dataclass
class _Current:
    conn: Connection
    spec: EngineSpec
    index: int
    #: Set by the lease scheduler as the spider closes.
    returned: list[int]
    link: Any = None


_current: _Current | None = None


def current() -> _Current:
    """This engine process's link to its coordinator."""
    if _current is None:
        raise RuntimeError(
            "scrapy_speedup.crawl.lease_scheduler.LeaseScheduler runs only in an engine"
            " process of SPEEDUP_CRAWL_PROCESSES"
        )
    return _current


async def _no_start() -> Any:
    """The engine's spider's start(): the coordinator runs the real one."""
    return
    yield  # an async generator that yields nothing


def main(conn: Connection, spec_bytes: bytes, index: int) -> None:
    global _current  # noqa: PLW0603 - one engine per process
    # Ctrl-C reaches the whole process group: the coordinator decides, and
    # asks the engines to close. It kills them if it must.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    spec: EngineSpec = pickle.loads(spec_bytes)
    from scrapy_speedup.process.worker import _die_with_the_crawl

    _die_with_the_crawl(spec.coordinator_pid)
    for root in spec.import_roots:
        if root not in sys.path:
            sys.path.insert(0, root)
    _current = _Current(conn, spec, index, [])
    error: str | None = None
    crawler = None
    try:
        crawler, process = _build(spec, index)
        result = process.crawl(crawler, *spec.args, **spec.kwargs)
        failures: list[str] = []

        def record(failure: Any) -> None:
            failures.append(failure.getTraceback() if hasattr(failure, "getTraceback")
                            else "".join(traceback.format_exception(failure)))

        if hasattr(result, "addErrback"):
            result.addErrback(record)
        else:  # an asyncio future (AsyncCrawlerProcess)
            def done(future: Any) -> None:
                if not future.cancelled() and future.exception() is not None:
                    record(future.exception())

            result.add_done_callback(done)
        process.start(install_signal_handlers=False)
        if failures:
            error = failures[0]
    except BaseException:  # noqa: BLE001 - pickling and user code raise anything
        error = traceback.format_exc()
    _finish(error, crawler)


def _build(spec: EngineSpec, index: int) -> tuple[Any, Any]:
    import importlib

    from scrapy.crawler import AsyncCrawlerProcess, CrawlerProcess

    settings = pickle.loads(spec.settings)
    settings.set(ENGINE_INDEX_SETTING, index, priority=100)
    # Before the process configures logging: every line of this engine,
    # Scrapy's start-up lines too, says which engine it is.
    log_format = settings.get("LOG_FORMAT") or ""
    marked = f"[engine {index}] [%(name)s]"
    settings.set("LOG_FORMAT", log_format.replace("[%(name)s]", marked) if "[%(name)s]"
                 in log_format else f"[engine {index}] {log_format}", priority=100)
    module = importlib.import_module(spec.spider_module)
    spidercls: Any = module
    for part in spec.spider_qualname.split("."):
        spidercls = getattr(spidercls, part)
    process = (AsyncCrawlerProcess if spec.use_asyncio else CrawlerProcess)(settings)
    crawler: Any = process.create_crawler(spidercls)
    create_spider = crawler._create_spider

    keeps_state = bool(settings.get("JOBDIR"))

    def create_engine_spider(*args: Any, **kwargs: Any) -> Any:
        spider = create_spider(*args, **kwargs)
        spider.start = _no_start
        if keeps_state:
            # JOBDIR's SpiderState runs in the coordinator; callbacks that use
            # spider.state get one of this engine's own (not persisted).
            spider.state = {}
        return spider

    crawler._create_spider = create_engine_spider
    return crawler, process


def _finish(error: str | None, crawler: Any) -> None:
    """The last words to the coordinator, once the crawler has stopped."""
    from scrapy_speedup.crawl.channel import Channel
    from scrapy_speedup.crawl.protocol import Closed, StartFailed

    assert _current is not None
    link = _current.link
    channel: Channel | None = getattr(link, "channel", None)
    started = link is not None and getattr(link, "ready_sent", False)
    if channel is None:
        # The spider never opened: the channel was never set up.
        from scrapy_speedup.crawl.protocol import encode
        from scrapy_speedup.process.protocol import frame

        message = encode(StartFailed(error or "the engine's crawler stopped before it opened"))
        try:
            os.set_blocking(_current.conn.fileno(), True)
            os.write(_current.conn.fileno(), frame(message))
        except OSError:
            pass
        os._exit(1)
    if link is not None:
        link.flush()
    if not started:
        channel.send(StartFailed(error or "the engine's crawler stopped before it opened"))
    else:
        stats = dict(crawler.stats.get_stats()) if crawler is not None else {}
        channel.send(Closed(_picklable(stats), list(_current.returned)))
    channel.flush_blocking(30.0)
    # Exit now: multiprocessing would otherwise join the engine's own pool
    # workers, which the crawl's close has already ended.
    logging.shutdown()
    os._exit(0 if error is None else 1)


def _picklable(stats: dict[str, Any]) -> dict[str, Any]:
    kept = {}
    for key, value in stats.items():
        try:
            pickle.dumps(value)
        except Exception:  # noqa: BLE001 - a stat that cannot travel stays here
            continue
        kept[key] = value
    return kept
