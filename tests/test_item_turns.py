"""Items take turns with the responses in an engine process
(scrapy_speedup/crawl/item_turns.py): a pipeline that computes does not hold
the reactor for a whole burst of items, and one that waits is not made to
wait one item after another."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from scrapy import Spider
from scrapy.utils.test import get_crawler

from scrapy_speedup.crawl.item_turns import TurnTakingItemPipelineManager
from scrapy_speedup.extension import SpeedupExtension
from tests.inprocess import BASE_SETTINGS, inprocess, reactor

TURNS = "scrapy_speedup.crawl.item_turns.TurnTakingItemPipelineManager"


class Burn:
    """A pipeline that computes for 10 ms an item, inline."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def process_item(self, item: dict[str, Any]) -> dict[str, Any]:
        end = time.perf_counter() + 0.01
        while time.perf_counter() < end:
            pass
        self.log.append(f"item {item['n']}")
        return item


class Wait:
    """A pipeline that waits 0.3 s an item (a database, an API)."""

    async def process_item(self, item: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.3)
        return item


async def _manager(*pipelines: Any) -> TurnTakingItemPipelineManager:
    crawler = get_crawler(Spider, {**BASE_SETTINGS, "ITEM_PIPELINES": {}})
    crawler._apply_settings()  # the add-on's extension, as in a crawl
    manager = TurnTakingItemPipelineManager(*pipelines, crawler=crawler)
    return manager


@inprocess
async def test_a_response_read_meanwhile_runs_between_two_items() -> None:
    log: list[str] = []
    manager = await _manager(Burn(log))
    items = [asyncio.ensure_future(manager.process_item_async({"n": n})) for n in range(5)]
    # What the reactor would do next: read a socket, run a listing page's callback.
    reactor.callLater(0, log.append, "response")
    results = await asyncio.gather(*items)
    assert [r["n"] for r in results] == list(range(5))
    # Items in their order; the response after at most one item's pipelines
    # (without turns, all five ran before it).
    assert [e for e in log if e != "response"] == [f"item {n}" for n in range(5)]
    assert log.index("response") <= 1, log


@inprocess
async def test_pipelines_that_wait_are_not_made_to_wait_one_after_another() -> None:
    manager = await _manager(Wait())
    started = time.monotonic()
    await asyncio.gather(*(manager.process_item_async({"n": n}) for n in range(10)))
    assert time.monotonic() - started < 1.5  # one after another: 3 s


@inprocess
async def test_a_cancelled_item_gives_up_its_turn() -> None:
    log: list[str] = []
    manager = await _manager(Burn(log))
    first = asyncio.ensure_future(manager.process_item_async({"n": 0}))
    second = asyncio.ensure_future(manager.process_item_async({"n": 1}))
    third = asyncio.ensure_future(manager.process_item_async({"n": 2}))
    await asyncio.sleep(0)  # all three waiting for their turn
    second.cancel()
    await asyncio.gather(first, third)
    assert log == ["item 0", "item 2"]


@inprocess
async def test_items_take_turns_on_the_crawls_one_bridge() -> None:
    manager = await _manager(Burn([]))
    await manager.process_item_async({"n": 0})
    assert manager.crawler is not None
    assert manager._bridge is SpeedupExtension.of(manager.crawler).bridge


def _engine_settings(**settings: Any) -> Any:
    crawler = get_crawler(Spider, {**BASE_SETTINGS, "SPEEDUP_CRAWL_PROCESSES": 2,
                                   "_SPEEDUP_ENGINE_INDEX": 0, **settings})
    return crawler.settings


def test_engine_processes_take_turns_unless_the_project_has_its_own_item_processor() -> None:
    # (The coordinator's items come from the engines, handled already: its
    # crawl pipelines are cheap by design, docs/usage/engines.rst.)
    assert _engine_settings().get("ITEM_PROCESSOR") == TURNS
    own = "tests.test_item_turns.TurnTakingItemPipelineManager"
    assert _engine_settings(ITEM_PROCESSOR=own).get("ITEM_PROCESSOR") == own
    # A one-process crawl keeps Scrapy's.
    alone = get_crawler(Spider, BASE_SETTINGS)
    assert alone.settings.get("ITEM_PROCESSOR") == "scrapy.pipelines.ItemPipelineManager"


class Cheap:
    def process_item(self, item: dict[str, Any]) -> dict[str, Any]:
        return item


@inprocess
async def test_cheap_items_go_many_a_turn() -> None:
    # One a turn, cheap items fell behind the responses that made them (the
    # plain I/O crawl lost 15-20%): a turn takes as many as fit its budget.
    manager = await _manager(Cheap())
    turns = 0
    next_turn = manager._next

    def counted() -> None:
        nonlocal turns
        turns += 1
        next_turn()

    manager._next = counted  # type: ignore[method-assign]
    await manager.process_item_async({"n": -1})  # its cost measured
    turns = 0
    await asyncio.gather(*(manager.process_item_async({"n": n}) for n in range(500)))
    assert turns <= 10, turns
