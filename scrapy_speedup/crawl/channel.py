"""One end of a coordinator-engine socket, read and written by the reactor.

Frames are the process pool's (:mod:`scrapy_speedup.process.protocol`). The
socket is non-blocking: what it does not take now is written when it becomes
writable, so the reactor never waits for the other process; reading hands
each complete message to *on_message*, and end of file (the other process is
gone, or closed its end) to *on_eof*, once.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from scrapy_speedup.crawl.protocol import Message, decode, encode
from scrapy_speedup.exceptions import ProtocolError
from scrapy_speedup.process.protocol import FrameReader, frame

if TYPE_CHECKING:
    from collections.abc import Callable

    from scrapy_speedup._bridge import Bridge

__all__ = ["Channel"]

_READ_SIZE = 1 << 20


class Channel:
    def __init__(
        self, fd: int, bridge: Bridge, max_bytes: int,
        on_message: Callable[[Message], None], on_eof: Callable[[str], None],
    ) -> None:
        self.fd = fd
        self._bridge = bridge
        self._reader = FrameReader(max_bytes)
        self._on_message = on_message
        self._on_eof = on_eof
        self._wbuf = bytearray()
        self.closed = False
        self.sent_bytes = 0
        os.set_blocking(fd, False)
        bridge.watch(fd, on_read=self._readable)

    def send(self, message: Message) -> None:
        if self.closed:
            return
        data = frame(encode(message))
        self.sent_bytes += len(data)
        if not self._wbuf:
            try:
                written = os.write(self.fd, data)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                self._eof(f"the socket failed: {exc}")
                return
            if written == len(data):
                return
            data = data[written:]
            self._bridge.watch(self.fd, on_read=self._readable, on_write=self._writable)
        self._wbuf += data

    def flush_blocking(self, timeout_s: float) -> bool:
        """Write what is buffered, waiting up to *timeout_s*; for the last
        words of an engine process, once its reactor has stopped."""
        import select
        import time

        until = time.monotonic() + timeout_s
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        while self._wbuf and not self.closed:
            left = until - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                return False
            try:
                written = os.write(self.fd, self._wbuf)
            except BlockingIOError:
                continue
            except OSError:
                return False
            del self._wbuf[:written]
        return not self._wbuf

    @property
    def pending_bytes(self) -> int:
        return len(self._wbuf)

    def _writable(self) -> None:
        try:
            written = os.write(self.fd, self._wbuf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._eof(f"the socket failed: {exc}")
            return
        del self._wbuf[:written]
        if not self._wbuf:
            self._bridge.watch(self.fd, on_read=self._readable)

    def _readable(self) -> None:
        try:
            chunk = os.read(self.fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._eof(f"the socket failed: {exc}")
            return
        if not chunk:
            self._eof("end of file")
            return
        for payload in self._reader.feed(chunk):
            if self.closed:
                return
            try:
                message = decode(payload)
            except ProtocolError as exc:
                self._eof(f"a message that is not valid: {exc}")
                return
            self._on_message(message)
        if self._reader.error is not None:
            self._eof(f"a frame that is not valid: {self._reader.error}")

    def _eof(self, why: str) -> None:
        if self.closed:
            return
        self.close()
        self._on_eof(why)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._bridge.watch(self.fd)
