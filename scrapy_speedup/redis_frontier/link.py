"""The crawl's one connection to Redis, on a thread of its own.

Redis is reached with the ``redis`` client's asyncio API on an event loop
that runs in a dedicated thread: the reactor never waits on Redis, under
every runtime (the asyncio reactor, Twisted's epoll reactor, reactorless
mode). Jobs run one after another, in the order they were given, so a
machine's pushes always reach Redis before the acknowledgement of the page
that made them (the crawl's end depends on it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from redis.asyncio import Redis

    from scrapy_speedup._bridge import Bridge

__all__ = ["RedisLink"]

logger = logging.getLogger(__name__)


class RedisLink:
    def __init__(self, url: str, bridge: Bridge) -> None:
        self.url = url
        self.bridge = bridge
        self.loop = asyncio.new_event_loop()
        self.redis: Redis | None = None
        self._queue: asyncio.Queue[Any] | None = None
        self._thread = threading.Thread(target=self._run, name="scrapy-speedup-redis",
                                        daemon=True)
        self._ready = threading.Event()
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        from redis.asyncio import Redis
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
        from redis.retry import Retry

        # A Redis that restarts or is away a while: each command is retried
        # with a back-off (about 30 s in all) before its job fails.
        self.redis = Redis.from_url(
            self.url, socket_timeout=10, socket_connect_timeout=5,
            retry=Retry(ExponentialBackoff(cap=5, base=0.1), 12),
            retry_on_error=[RedisConnectionError, RedisTimeoutError, OSError],
        )
        self._queue = asyncio.Queue()
        self._ready.set()
        while True:
            job = await self._queue.get()
            if job is None:
                break
            work, done = job
            try:
                result, error = await work(), None
            except Exception as exc:  # noqa: BLE001 - handed to done()
                result, error = None, exc
            self.bridge.call_from_thread(done, result, error)
        await self.redis.aclose()

    def submit(self, work: Callable[[], Awaitable[Any]],
               done: Callable[[Any, BaseException | None], None]) -> None:
        """Run ``await work()`` on the Redis thread, after the jobs before it;
        then ``done(result, error)`` on the reactor thread."""
        assert self._queue is not None
        self.loop.call_soon_threadsafe(self._queue.put_nowait, (work, done))

    def close(self, timeout_s: float = 10) -> None:
        """Stop after the jobs given so far (at most *timeout_s*)."""
        if self._queue is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._queue.put_nowait, None)
            self._thread.join(timeout_s)
