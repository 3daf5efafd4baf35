"""The crawl's stats from the coordinator's own and each engine process's.

Counts are summed, maxima maxed, and what only the coordinator knows for the
whole crawl is its own: when the crawl started and finished and why, and how
many items reached the crawl's pipelines (each engine counts the items it
passed on; the coordinator counts those that came out of the crawl
pipelines, which is what a one-process crawl counts).
"""

from __future__ import annotations

from typing import Any

__all__ = ["crawl_totals"]

#: Keys whose crawl-wide value is the coordinator's alone.
_COORDINATOR_ONLY = frozenset({
    "start_time", "finish_time", "finish_reason", "elapsed_time_seconds",
    "item_scraped_count", "items_per_minute", "responses_per_minute",
})
#: Keys the coordinator holds as the sum of the engines' while the crawl runs.
_FROM_ENGINES = frozenset({"response_received_count", "spider_exceptions/count"})
#: Per engine process, under speedup/crawl/engine/<index>/.
_PER_ENGINE = ("response_received_count", "item_scraped_count")


def _is_max(key: str) -> bool:
    last = key.rsplit("/", 1)[-1]
    return last == "max" or last.endswith("_max") or last.startswith("max_") or \
        key == "memusage/startup"


def _is_min(key: str) -> bool:
    last = key.rsplit("/", 1)[-1]
    return last == "min" or last.endswith("_min") or last.startswith("min_")


def crawl_totals(
    own: dict[str, Any], engines: list[tuple[int, dict[str, Any]]],
) -> dict[str, Any]:
    """The crawl's stats: *own* (the coordinator's) merged with *engines*'
    ((index, stats) of each engine process, its final or last reported
    stats; an engine that was replaced appears with its replacement's index)."""
    totals = {k: v for k, v in own.items() if k not in _FROM_ENGINES}
    for index, stats in engines:
        for key in _PER_ENGINE:
            if key in stats:
                name = f"speedup/crawl/engine/{index}/{key}"
                totals[name] = totals.get(name, 0) + stats[key]
        for key, value in stats.items():
            if key in _COORDINATOR_ONLY:
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if key not in totals:
                totals[key] = value
            elif not number or not isinstance(totals[key], (int, float)):
                continue  # a text or a time: the first one stands
            elif _is_max(key):
                totals[key] = max(totals[key], value)
            elif _is_min(key):
                totals[key] = min(totals[key], value)
            else:
                totals[key] += value
    return totals
