"""The one bridge between offloaded work and the reactor thread.

Results of offloaded work arrive on the reactor thread in one of two ways:
worker processes write to sockets that the reactor watches (``add_reader``),
and other threads hand results over with ``loop.call_soon_threadsafe`` when
an asyncio loop runs (the default asyncio reactor, and Scrapy's reactorless
mode) or ``reactor.callFromThread`` on a plain Twisted reactor. Either way
they complete a waiter that the caller awaits: an ``asyncio.Future`` or a
``Deferred``. The reactor thread never blocks on a result.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import TYPE_CHECKING, Any, Protocol

from scrapy.utils.asyncio import call_later, is_asyncio_available
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from zope.interface import implementer

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Bridge", "Timer"]


class Timer(Protocol):
    """What :meth:`Bridge.call_later` returns."""

    def cancel(self) -> None: ...


@implementer(IReadDescriptor, IWriteDescriptor)
class _FileDescriptor:
    """What Twisted's reactor watches for a file descriptor of ours."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.on_read: Callable[[], None] | None = None
        self.on_write: Callable[[], None] | None = None

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:  # noqa: N802 - Twisted's name
        if self.on_read is not None:
            self.on_read()

    def doWrite(self) -> None:  # noqa: N802 - Twisted's name
        if self.on_write is not None:
            self.on_write()

    def connectionLost(self, reason: object) -> None:  # noqa: N802 - Twisted's name
        pass

    def logPrefix(self) -> str:  # noqa: N802 - Twisted's name
        return "scrapy-speedup"


class Bridge:
    """Thread hand-off and waiters for the runtime the crawl runs on.

    Build it on the reactor thread, once the reactor or loop runs.
    """

    def __init__(self) -> None:
        self.uses_asyncio: bool = is_asyncio_available()
        self._loop: asyncio.AbstractEventLoop | None = None
        if self.uses_asyncio:
            self._loop = asyncio.get_event_loop()
        self._descriptors: dict[int, _FileDescriptor] = {}

    @property
    def runtime(self) -> str:
        if not self.uses_asyncio:
            return "Twisted reactor"
        from scrapy.utils.reactorless import is_reactorless

        return "reactorless asyncio" if is_reactorless() else "asyncio reactor"

    def new_waiter(self) -> asyncio.Future[Any] | Deferred[Any]:
        if self._loop is not None:
            return self._loop.create_future()
        return Deferred()

    @staticmethod
    def is_pending(waiter: asyncio.Future[Any] | Deferred[Any]) -> bool:
        if isinstance(waiter, Deferred):
            return not waiter.called
        return not waiter.done()

    def resolve(self, waiter: asyncio.Future[Any] | Deferred[Any], value: Any) -> None:
        """Complete *waiter*; a waiter the caller cancelled is left alone."""
        if not self.is_pending(waiter):
            return
        if isinstance(waiter, Deferred):
            waiter.callback(value)
        else:
            waiter.set_result(value)

    def fail(self, waiter: asyncio.Future[Any] | Deferred[Any], exc: BaseException) -> None:
        if not self.is_pending(waiter):
            return
        if isinstance(waiter, Deferred):
            waiter.errback(exc)
        else:
            waiter.set_exception(exc)

    def call_from_thread(self, func: Callable[..., Any], *args: Any) -> None:
        """Run ``func(*args)`` on the reactor thread; callable from any thread."""
        if self._loop is not None:
            # The loop is closed after a forced stop; late results have no one
            # to go to and are counted as abandoned by the pool.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(func, *args)
            return
        from twisted.internet import reactor

        reactor.callFromThread(func, *args)

    def watch(
        self,
        fd: int,
        *,
        on_read: Callable[[], None] | None = None,
        on_write: Callable[[], None] | None = None,
    ) -> None:
        """Call *on_read* / *on_write* on the reactor thread whenever *fd* is
        readable / writable; ``None`` stops watching for that event."""
        if self._loop is not None:
            if on_read is None:
                self._loop.remove_reader(fd)
            else:
                self._loop.add_reader(fd, on_read)
            if on_write is None:
                self._loop.remove_writer(fd)
            else:
                self._loop.add_writer(fd, on_write)
            return
        from twisted.internet import reactor as _reactor

        reactor: Any = _reactor  # the installed reactor; the stubs cannot know it
        descriptor = self._descriptors.setdefault(fd, _FileDescriptor(fd))
        if (on_read is None) != (descriptor.on_read is None):
            (reactor.removeReader if on_read is None else reactor.addReader)(descriptor)
        if (on_write is None) != (descriptor.on_write is None):
            (reactor.removeWriter if on_write is None else reactor.addWriter)(descriptor)
        descriptor.on_read, descriptor.on_write = on_read, on_write
        if on_read is None and on_write is None:
            del self._descriptors[fd]

    def call_later(self, delay: float, func: Callable[..., Any], *args: Any) -> Timer:
        """Call ``func(*args)`` on the reactor thread after *delay* seconds;
        the result has ``cancel()``."""
        if self._loop is not None:
            # The loop's own call_later: Scrapy's looks up the runtime on each
            # call, which cost the reactor doctor's 50 timer calls a second
            # half their time.
            return self._loop.call_later(delay, func, *args)
        return call_later(delay, func, *args)

    def call_in_new_thread(
        self, func: Callable[[], Any], name: str,
        done: Callable[[Any, BaseException | None], None],
    ) -> None:
        """Run a blocking *func* on a new daemon thread, then
        ``done(result, error)`` on the reactor thread."""

        def target() -> None:
            try:
                result = func()
            except BaseException as exc:  # noqa: BLE001 - handed to done()
                self.call_from_thread(done, None, exc)
            else:
                self.call_from_thread(done, result, None)

        threading.Thread(target=target, name=name, daemon=True).start()

    def run_in_new_thread(
        self, func: Callable[[], Any], name: str
    ) -> asyncio.Future[Any] | Deferred[Any]:
        """Run a blocking *func* (e.g. a pool's shutdown) on a new daemon thread
        and return a waiter completed with its result on the reactor thread."""
        waiter = self.new_waiter()

        def target() -> None:
            try:
                result = func()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                self.call_from_thread(self.fail, waiter, exc)
            else:
                self.call_from_thread(self.resolve, waiter, result)

        threading.Thread(target=target, name=name, daemon=True).start()
        return waiter
