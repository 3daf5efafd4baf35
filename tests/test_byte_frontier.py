"""The byte frontier (scrapy_speedup/crawl/byte_frontier.py) against Scrapy's
own queues and downloader slots, without processes: the order requests come
out in, and the limits of each site and of the crawl. Whole crawls on it are
in test_crawl_processes*.py (it is the default frontier there)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scrapy import Request
from scrapy.core.downloader import Downloader
from scrapy.pqueues import ScrapyPriorityQueue
from scrapy.squeues import FifoMemoryQueue, LifoMemoryQueue
from scrapy.utils.test import get_crawler

from scrapy_speedup.crawl.byte_frontier import ByteFrontier, Entry, _PriorityQueue, usable

_NO_HANDLERS = {"DOWNLOAD_HANDLERS": {"http": None, "https": None}}


class _Timers:
    """A bridge whose timers the test fires."""

    def __init__(self) -> None:
        self.pending: list[list[Any]] = []

    def call_later(self, delay: float, func: Any, *args: Any) -> Any:
        timer = [delay, func, args, False]
        self.pending.append(timer)
        return SimpleNamespace(cancel=lambda: timer.__setitem__(3, True))

    def fire_due(self) -> None:
        due, self.pending = self.pending, []
        for _, func, args, cancelled in due:
            if not cancelled:
                func(*args)


def _frontier(room: int = 1000, **overrides: Any) -> tuple[ByteFrontier, list[Entry], _Timers]:
    crawler = get_crawler(settings_dict={**_NO_HANDLERS, **overrides})
    crawler.engine = SimpleNamespace(downloader=Downloader(crawler))  # type: ignore[assignment]
    lent: list[Entry] = []

    def lend(entry: Entry) -> bool:
        if len(lent) >= room:
            return False
        lent.append(entry)
        return True

    timers = _Timers()
    frontier = ByteFrontier(crawler, timers, fingerprints=set(),  # type: ignore[arg-type]
                            lend=lend)
    return frontier, lent, timers


def _entry(n: int, site: str = "a", priority: int = 0, *, start: bool = False,
           dont_filter: bool = False) -> Entry:
    return Entry(n.to_bytes(4, "big"), dont_filter, site, priority, str(n).encode(), start)


# -- the order of the queue ---------------------------------------------------------------

_ops = st.lists(st.one_of(
    st.tuples(st.just("push"), st.integers(-3, 3), st.booleans()),
    st.tuples(st.just("pop"), st.just(0), st.just(False)),
), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops=_ops, lifo=st.booleans(), start_queue=st.sampled_from([None, "fifo", "lifo"]))
def test_the_queue_pops_in_scrapys_order(ops: list[tuple[str, int, bool]], lifo: bool,
                                         start_queue: str | None) -> None:
    """Any mix of pushes (priority, start request or not) and pops comes out
    of _PriorityQueue exactly as out of Scrapy's ScrapyPriorityQueue."""
    crawler = get_crawler(settings_dict=_NO_HANDLERS)
    start_cls = {None: None, "fifo": FifoMemoryQueue, "lifo": LifoMemoryQueue}[start_queue]
    scrapys = ScrapyPriorityQueue.from_crawler(
        crawler, LifoMemoryQueue if lifo else FifoMemoryQueue, "", start_queue_cls=start_cls,
    )
    ours = _PriorityQueue(lifo, None if start_queue is None else start_queue == "lifo")
    for n, (op, priority, start) in enumerate(ops):
        if op == "push":
            meta = {"is_start_request": True} if start else {}
            scrapys.push(Request(f"http://a/{n}", priority=priority, meta=meta))
            ours.push(_entry(n, priority=priority, start=start))
        elif ours.size:
            expected = scrapys.pop()
            assert expected is not None
            assert f"http://a/{ours.pop().blob.decode()}" == expected.url
        else:
            assert scrapys.pop() is None
    while ours.size:
        expected = scrapys.pop()
        assert expected is not None and f"http://a/{ours.pop().blob.decode()}" == expected.url
    assert scrapys.pop() is None


def test_duplicates_are_filtered_and_dont_filter_is_not() -> None:
    frontier, lent, _ = _frontier()
    assert frontier.push(_entry(1))
    assert not frontier.push(_entry(1))
    assert frontier.push(_entry(1, dont_filter=True))
    frontier.push_many([(b"\0\0\0\2", False, "a", 0, b"2"), (b"\0\0\0\2", False, "a", 0, b"2"),
                        (b"\0\0\0\1", True, "a", 0, b"1")])
    frontier.pump()
    assert sorted(e.blob for e in lent) == [b"1", b"1", b"1", b"2"]
    stats = frontier.stats.get_stats()
    assert stats["dupefilter/filtered"] == 2
    assert stats["scheduler/enqueued"] == stats["scheduler/dequeued"] == 4


# -- the limits of each site and of the crawl ---------------------------------------------

def test_each_site_gets_at_most_its_concurrency_and_the_crawl_its_total() -> None:
    frontier, lent, _ = _frontier(CONCURRENT_REQUESTS=5, CONCURRENT_REQUESTS_PER_DOMAIN=2)
    for n in range(10):
        frontier.push(_entry(n, site="a"))
    for n in range(10, 20):
        frontier.push(_entry(n, site="b"))
    frontier.pump()
    by_site = [e.slot for e in lent]
    assert by_site.count("a") == 2 and by_site.count("b") == 2
    # Five in the slots (the crawl's total), four of them lent.
    assert frontier.active == 5
    frontier.released(lent[0], downloaded=True)
    frontier.pump()
    assert len(lent) == 5 and frontier.active == 5
    assert lent[-1].slot == lent[0].slot  # the queued one of that site went


def test_download_slots_setting_and_a_delay_space_a_sites_requests() -> None:
    frontier, lent, timers = _frontier(
        DOWNLOAD_SLOTS={"slow": {"concurrency": 1, "delay": 0.2, "jitter": 0}},
    )
    for n in range(3):
        frontier.push(_entry(n, site="slow"))
    for n in range(3, 6):
        frontier.push(_entry(n, site="fast"))
    frontier.pump()
    assert [e.slot for e in lent].count("slow") == 1
    assert [e.slot for e in lent].count("fast") == 3
    slow = next(e for e in lent if e.slot == "slow")
    frontier.released(slow, downloaded=True)  # concurrency is free; the delay is not
    assert [e.slot for e in lent].count("slow") == 1
    assert timers.pending and 0.1 < timers.pending[-1][0] <= 0.2
    time.sleep(0.2)
    timers.fire_due()
    assert [e.slot for e in lent].count("slow") == 2


def test_a_request_handled_without_a_download_does_not_wait_for_the_delay() -> None:
    frontier, lent, _ = _frontier(DOWNLOAD_DELAY=30, DOWNLOAD_DELAY_JITTER=0)
    for n in range(2):
        frontier.push(_entry(n))
    frontier.pump()
    assert len(lent) == 1
    frontier.released(lent[0], downloaded=False)  # a cache hit: the site saw nothing
    assert len(lent) == 2


def test_the_least_busy_site_goes_first() -> None:
    """DownloaderAwarePriorityQueue (Scrapy's default): the next request is
    from the site with the fewest requests in its slot, in turns."""
    frontier, lent, _ = _frontier(CONCURRENT_REQUESTS=6, CONCURRENT_REQUESTS_PER_DOMAIN=8)
    for n in range(10):
        frontier.push(_entry(n, site="big", priority=5))  # higher priority, one site
    for site in ("b", "c"):
        frontier.push(_entry(hash(site) % 1000 + 100, site=site))
    frontier.pump()
    # Not six of "big": b and c each got a turn as soon as "big" was busier.
    assert sorted(e.slot for e in lent) == ["b", "big", "big", "big", "big", "c"]


def test_the_one_queue_takes_priority_over_sites() -> None:
    frontier, lent, _ = _frontier(SCHEDULER_PRIORITY_QUEUE="scrapy.pqueues.ScrapyPriorityQueue",
                                  CONCURRENT_REQUESTS=4)
    for n in range(10):
        frontier.push(_entry(n, site="big", priority=5))
    frontier.push(_entry(100, site="b"))
    frontier.pump()
    assert [e.slot for e in lent] == ["big"] * 4


def test_no_engine_room_holds_the_site_and_a_returned_entry_goes_first() -> None:
    frontier, lent, _ = _frontier(room=1, CONCURRENT_REQUESTS_PER_DOMAIN=4)
    for n in range(3):
        frontier.push(_entry(n))
    frontier.pump()
    assert len(lent) == 1 and len(frontier) == 2  # one in the slot, one in the queue
    first = lent.pop()
    frontier.returned(first)  # its engine died before the download
    assert lent == [first]  # lent again at once, before the others
    lent.clear()
    frontier.pump()
    assert len(lent) == 1 and lent[0] is not first


def test_an_idle_site_is_forgotten() -> None:
    frontier, lent, _ = _frontier()
    frontier.push(_entry(1, site="once"))
    frontier.pump()
    frontier.released(lent[0], downloaded=True)
    frontier._gc_at = 0
    frontier.pump()
    assert "once" in frontier._sites  # seen just now
    frontier._sites["once"].lastseen -= 1000
    frontier._gc_at = 0
    frontier.pump()
    assert "once" not in frontier._sites


@pytest.mark.parametrize(("settings_dict", "why"), [
    ({"JOBDIR": "job"}, "JOBDIR"),
    ({"AUTOTHROTTLE_ENABLED": True}, "AutoThrottle"),
    ({"SPEEDUP_ADAPTIVE_CONCURRENCY_ENABLED": True}, "adaptive"),
    ({"DUPEFILTER_DEBUG": True}, "DUPEFILTER_DEBUG"),
    ({"SCHEDULER_MEMORY_QUEUE": "scrapy.squeues.PickleLifoDiskQueue"}, "SCHEDULER_MEMORY_QUEUE"),
    ({}, None),
])
def test_when_the_byte_frontier_stands_for_scrapys(settings_dict: dict[str, Any],
                                                    why: str | None, tmp_path: Path) -> None:
    from scrapy.core.scheduler import Scheduler

    if "JOBDIR" in settings_dict:
        settings_dict = {"JOBDIR": str(tmp_path / "job")}
    crawler = get_crawler(settings_dict={**_NO_HANDLERS, **settings_dict})
    scheduler = Scheduler.from_crawler(crawler)
    reason = usable(crawler, scheduler)
    assert (reason is None) if why is None else (reason is not None and why in reason)


def test_a_site_waiting_for_its_delay_does_not_hold_back_the_others(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A site that found no engine with room, and whose next try draws a
    longer delay (DOWNLOAD_DELAY_JITTER, 0.5 by Scrapy's default), waits for
    its timer, not for an engine: room that comes meanwhile goes to the other
    sites' requests, not to nobody until that timer fires."""
    draws = iter([0.0, 0.0, -0.5, 0.5])  # the jitter of each delay drawn, in turn
    monkeypatch.setattr("scrapy.core.downloader.random.uniform",
                        lambda low, high: next(draws, 0.0))
    frontier, lent, timers = _frontier(room=1, DOWNLOAD_SLOTS={"slow": {"delay": 100}})
    for n in range(2):
        frontier.push(_entry(n, site="slow"))
    frontier.pump()
    assert len(lent) == 1  # the second waits for the delay
    # A cache hit: no delay owed; the next of the site finds every engine full.
    frontier.released(lent[0], downloaded=False)
    assert len(lent) == 1
    frontier.push(_entry(2, site="fast"))
    lent.clear()  # an engine has room again; the slow site now draws 150 s
    frontier.pump()
    assert [e.blob for e in lent] == [b"2"]
    assert timers.pending and not timers.pending[-1][3]  # the slow site waits for its turn


def test_a_requeued_entry_is_counted_as_enqueued_again() -> None:
    """An entry whose engine died after its download goes back to the queue
    and out again: scheduler/enqueued counts it again, as Scrapy's frontier
    does (its requeue enqueues), so the crawl never shows more dequeued than
    enqueued."""
    frontier, lent, _ = _frontier()
    frontier.push(_entry(1))
    frontier.pump()
    frontier.released(lent[0], downloaded=True)
    frontier.requeue(lent.pop())
    frontier.pump()
    assert len(lent) == 1
    stats = frontier.stats.get_stats()
    assert stats["scheduler/enqueued"] == stats["scheduler/dequeued"] == 2
    assert stats["scheduler/enqueued/memory"] == stats["scheduler/dequeued/memory"] == 2


def test_the_duplicate_logged_is_one_that_was_filtered(caplog: pytest.LogCaptureFixture) -> None:
    """RFPDupeFilter's first-duplicate line names a request that was
    filtered, not the first of the report (which may have been queued)."""
    import pickle

    frontier, _, _ = _frontier()
    frontier.push(_entry(1))
    with caplog.at_level("DEBUG", logger="scrapy.dupefilters"):
        frontier.push_many([(b"new!", False, "a", 0, pickle.dumps({"url": "new"})),
                            (b"\0\0\0\1", False, "a", 0, pickle.dumps({"url": "old"}))])
    [record] = [r for r in caplog.records if "Filtered duplicate" in r.getMessage()]
    assert "<GET old>" in record.getMessage(), record.getMessage()
