"""Kinds of page, and what the router has learned about each.

A kind is (site, URL pattern, callback). The pattern is learned from the URL
itself: each path segment's runs of digits become ``{n}``, and a segment that
is an identifier (hex, a UUID, a long token of letters and digits) becomes
``{id}``; the query keeps its keys, not its values. ``/product/12.html`` and
``/product/7.html?ref=3`` are one kind, ``/deal/10.html`` another.

What a kind needs is learned from samples (see :mod:`.router`), as Crawlee's
AdaptivePlaywrightCrawler does it: ``SPEEDUP_BROWSER_SAMPLES`` pages of a new
kind are fetched both ways; one that differs decides "browser" at once (one
page is proof), the samples all the same decide "plain HTTP". A decided kind
is re-checked on a share of its pages (``SPEEDUP_BROWSER_RECHECK_SHARE``): a
difference turns a plain kind into a browser kind; as many same results in a
row as the samples turn a browser kind back into a plain one. A plain kind's
re-check costs a rendering the crawl does not need: while pages wait for the
browser, a due one waits too, up to :data:`RECHECK_LATE_MAX` intervals.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, urlsplit

__all__ = ["Kind", "KindKey", "Route", "url_pattern"]

#: How the router fetches a page: plain HTTP, the browser, or both (a sample;
#: with a user check, a "probe" is a plain fetch of a browser kind, checked);
#: or "held": plain HTTP while its kind's samples are out, the callback's
#: items held until they decide; or "wait" for that, past the held pages' cap.
Route = Literal["http", "browser", "sample", "probe", "held", "wait"]
KindKey = tuple[str, str, str]

#: How many re-check intervals a plain kind's re-check may wait for the
#: browser to have a free place: on a crawl the browser bounds, re-checks at
#: 1% were 8% more renderings where a tenth of the pages need it (the demo
#: shop), all on the crawl's span.
RECHECK_LATE_MAX = 4

_DIGITS = re.compile(r"\d+")
# An identifier: a UUID, or hex / a token of letters and digits mixed, long enough
# not to be a word.
_ID = re.compile(r"^(?=.*\d)(?=.*[A-Za-z])[A-Za-z0-9_-]{16,}$|^[0-9a-fA-F-]{16,}$")


def _segment(segment: str) -> str:
    stem, dot, ext = segment.rpartition(".") if "." in segment else (segment, "", "")
    if _ID.match(stem):
        return "{id}" + dot + ext
    return _DIGITS.sub("{n}", segment)


def url_pattern(url: str) -> tuple[str, str]:
    """(site, pattern) of *url*."""
    parts = urlsplit(url)
    path = "/".join(_segment(s) for s in parts.path.split("/"))
    keys = sorted({key for key, _ in parse_qsl(parts.query, keep_blank_values=True)})
    query = ("?" + "&".join(f"{k}=" for k in keys)) if keys else ""
    return parts.netloc.lower(), (path or "/") + query


@dataclass
class Kind:
    key: KindKey
    samples_needed: int
    recheck_share: float
    #: How long a sample may be in flight before it is no longer counted (a
    #: request dropped without a word must not hold the kind undecided).
    sample_expiry_s: float
    #: Pages held at most at once (the crawl's CONCURRENT_REQUESTS): held
    #: pages free their download slots, and past this the kind's pages wait
    #: before their download, so that the crawl does not download ahead of
    #: its limits (CLOSESPIDER_ITEMCOUNT, memory) while a kind is learned.
    held_cap: int = 16
    decision: Literal["?", "http", "browser"] = "?"
    why: str = "not sampled yet"
    #: Same results in a row, from samples or checks.
    agreeing: int = 0
    since_check: int = 0
    http_pages: int = 0
    browser_pages: int = 0
    samples: int = 0
    held_out: int = 0
    mispredictions: int = 0
    _in_flight: deque[float] = field(default_factory=deque)
    _waiters: list[asyncio.Future[None]] = field(default_factory=list)

    def route(self, checked: bool, browser_busy: bool = False) -> Route:
        """How to fetch the next page of this kind. *checked*: a user check
        decides, on the plain page, instead of a comparison. *browser_busy*:
        pages are waiting for a place in the browser."""
        if self.decision == "?":
            if checked:
                return "http"  # the check on the plain page is the sample
            if self.take_sample():
                return "sample"
            if self.held_out >= self.held_cap:
                return "wait"
            self.held_out += 1
            # Until the samples are in, the kind's other pages are fetched
            # plain and their output held for the decision: sent to the
            # browser they would cost a rendering each, most of them for kinds
            # that turn out plain; waiting for the decision before the
            # download kept them off the network (docs/design.rst).
            return "held"
        self.since_check += 1
        interval = math.ceil(1 / self.recheck_share) if self.recheck_share > 0 else 0
        # A plain kind's re-check (not one with a check, which fetches plain)
        # is a rendering more: it waits while the browser has pages waiting.
        # A browser kind's costs a plain fetch: never late.
        late_ok = self.decision == "http" and not checked and browser_busy
        if interval and self.since_check >= interval * (RECHECK_LATE_MAX if late_ok else 1):
            self.since_check = 0
            if checked:
                return "probe" if self.decision == "browser" else "http"
            self._in_flight.append(time.monotonic())
            return "sample"
        return self.decision

    def take_sample(self) -> bool:
        """True, and one more sample counted in flight, when this undecided
        kind has room for another sample."""
        now = time.monotonic()
        while self._in_flight and now - self._in_flight[0] > self.sample_expiry_s:
            self._in_flight.popleft()
        if self.decision != "?" or self.agreeing + len(self._in_flight) >= self.samples_needed:
            return False
        self._in_flight.append(now)
        return True

    def held_done(self) -> None:
        """A held page is settled (or never reached the spider)."""
        self.held_out = max(0, self.held_out - 1)
        self._wake()  # a place for a waiting page

    def sample_ended(self) -> None:
        if self._in_flight:
            self._in_flight.popleft()
        self._wake()  # a decision, or a place for another sample

    def decided(self) -> asyncio.Future[None]:
        """Done when a sample or a held page of this kind ends."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        return future

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    def learn(self, same: bool, why: str) -> str | None:
        """A sample's or check's result: *same* when plain HTTP was enough.
        Returns a line to log when the kind changed its decision."""
        before = self.decision
        if not same:
            self.agreeing = 0
            self.decision, self.why = "browser", why
        else:
            self.agreeing += 1
            if self.decision != "http" and self.agreeing >= self.samples_needed:
                self.decision = "http"
                self.why = f"{self.agreeing} pages in a row the same in plain HTTP ({why})"
        if before not in ("?", self.decision):
            return f"{before} -> {self.decision}: {self.why}"
        return None

    def label(self) -> str:
        site, pattern, callback = self.key
        return f"{site}{pattern} {callback}"
