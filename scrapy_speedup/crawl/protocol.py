"""The messages between the coordinator and an engine process.

Every message is one frame (:func:`scrapy_speedup.process.protocol.frame`,
the process pool's framing) whose first byte says its kind and whose rest is
the pickled tuple of its fields. Requests and items travel as pickled bytes
of their own inside a message, so that one that cannot be unpickled fails
alone and the channel goes on.

coordinator to engine
    ``L`` :class:`Lease`, ``C`` :class:`Close`.
engine to coordinator
    ``Y`` :class:`Ready`, ``F`` :class:`StartFailed`, ``R`` :class:`Report`,
    ``D`` :class:`Closed`.

A :class:`Report` carries, in this order of handling, the requests the
engine's callbacks made, the items its pipelines passed, the leases whose
download ended, and the leases it has handled. The coordinator handles the
acknowledgements last, so an acknowledged lease has nothing of its own left
in transit: that is what lets the coordinator tell that the crawl has ended.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from scrapy_speedup.exceptions import ProtocolError

__all__ = [
    "Close", "Closed", "CookieUpdate", "Lease", "Message", "NewRequest", "Ready", "Report",
    "StartFailed", "decode", "encode",
]

#: (lease id, HTTP status or None, download latency in seconds or None, name
#: of the download's exception or None)
Release = tuple[int, "int | None", "float | None", "str | None"]
#: Cookies that one engine's CookiesMiddleware put in a jar: (the jar's key,
#: ``meta["cookiejar"]``; the URL of the request they came with; the
#: ``http.cookiejar.Cookie`` objects). Cookies are the crawl's: every engine
#: applies every other engine's, so a login in one holds in all.
CookieUpdate = tuple[Any, str, list[Any]]
#: A request a callback made: (its fingerprint, ``dont_filter``, its download
#: slot, its priority, pickled ``Request.to_dict``). The engine computes the
#: first four with the crawl's own fingerprinter and slot rules, so that the
#: coordinator filters, queues and lends the request without rebuilding it
#: (:mod:`.byte_frontier`). A plain tuple: it pickles fastest.
NewRequest = tuple[bytes, bool, str, int, bytes]


@dataclass(slots=True)
class Lease:
    """Requests to download and handle: (lease id, pickled ``Request.to_dict``)."""

    KIND: ClassVar[bytes] = b"L"
    entries: list[tuple[int, bytes]]
    #: Cookies set in other engines since the last lease (see CookieUpdate),
    #: applied before the requests are queued.
    cookies: list[CookieUpdate] = field(default_factory=list)


@dataclass(slots=True)
class Close:
    """Close the spider with *reason*: finish what is in flight, hand back the
    leases not started, send the final stats."""

    KIND: ClassVar[bytes] = b"C"
    reason: str


@dataclass(slots=True)
class Ready:
    """The engine process has opened its spider and pipelines."""

    KIND: ClassVar[bytes] = b"Y"
    pid: int


@dataclass(slots=True)
class StartFailed:
    """The spider or one of its components could not start: the error's text."""

    KIND: ClassVar[bytes] = b"F"
    error: str


@dataclass(slots=True)
class Report:
    """What an engine process did since its last report (see the module's
    docstring for the order of handling)."""

    KIND: ClassVar[bytes] = b"R"
    #: New requests (see NewRequest).
    requests: list[NewRequest] = field(default_factory=list)
    #: Items that passed the engine's pipelines: (lease of the response that
    #: made it, or None; pickled item).
    items: list[tuple[int | None, bytes]] = field(default_factory=list)
    #: Leases whose download ended.
    released: list[Release] = field(default_factory=list)
    #: Leases the engine made for requests it keeps (they could not be
    #: serialized): outstanding until acknowledged like any other.
    local: list[int] = field(default_factory=list)
    #: Leases handled: the response went through the callback and pipelines.
    acked: list[int] = field(default_factory=list)
    #: Cookies this engine put in its jars (handled first).
    cookies: list[CookieUpdate] = field(default_factory=list)
    #: The engine's stats (all now and then, the counts that crawl-wide
    #: limits read in between), for the CLOSESPIDER_* limits and LogStats.
    stats: dict[str, Any] | None = None

    def __bool__(self) -> bool:
        return bool(self.requests or self.items or self.released or self.local
                    or self.acked or self.cookies or self.stats is not None)


@dataclass(slots=True)
class Closed:
    """The engine's spider has closed: its final stats, and the leases it had
    not started (the coordinator puts them back in the frontier)."""

    KIND: ClassVar[bytes] = b"D"
    stats: dict[str, Any]
    returned: list[int]


Message = Lease | Close | Ready | StartFailed | Report | Closed
_KINDS: dict[bytes, type[Any]] = {
    cls.KIND: cls for cls in (Lease, Close, Ready, StartFailed, Report, Closed)
}


def encode(message: Message) -> bytes:
    # Not dataclasses.astuple: it deep-copies every list it finds.
    values = tuple(getattr(message, f.name) for f in fields(message))
    return message.KIND + pickle.dumps(values, protocol=pickle.HIGHEST_PROTOCOL)


def decode(payload: bytes) -> Message:
    """The message in one frame; :exc:`ProtocolError` if it is none."""
    cls = _KINDS.get(payload[:1])
    if cls is None:
        raise ProtocolError(f"unknown message kind {payload[:8]!r} ({len(payload)} bytes)")
    try:
        values = pickle.loads(payload[1:])
    except Exception as exc:  # noqa: BLE001 - pickling and user code raise anything
        raise ProtocolError(f"a {cls.__name__} message that does not unpickle: {exc!r}") \
            from None
    if not isinstance(values, tuple) or len(values) != len(fields(cls)):
        raise ProtocolError(f"a {cls.__name__} message with fields {values!r:.200}")
    message: Message = cls(*values)
    return message
