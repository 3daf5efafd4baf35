"""What the machines of a Redis crawl share besides the frontier: the
crawl's counts, its ``CLOSESPIDER_*`` limits, its start time, the reason it
closes, and the clean-up when it has finished.

- Each machine adds its stats changes (integer counters) to ``P:stats`` with
  every job, and reads the totals back: the limits apply to the whole crawl.
- The first machine to see a limit reached sets ``P:closing`` to the reason;
  every machine closes with it when it sees it.
- The last machine to leave a crawl that finished (nothing queued, nothing
  leased) deletes its keys, so that the next run of the spider starts a
  new crawl. A crawl that stopped otherwise (Ctrl-C, a limit) keeps them, and
  the next run resumes it, as with ``JOBDIR``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from scrapy.statscollectors import StatsCollector

__all__ = ["Limits", "SharedCounts", "forget_finished_crawl"]

# The keys of a crawl (P:q:<slot> queues are empty, hence gone, once it finished).
_KEYS = ("dupefilter", "seq", "blob", "meta", "slot", "inflight", "lastseen", "ready",
         "waiting", "leases", "leased", "queued", "held", "ticked", "stats", "started",
         "closing", "machines")

_FORGET = """
if redis.call('HLEN', KEYS[#KEYS]) == 0
    and tonumber(redis.call('GET', KEYS[12]) or '0') == 0
    and redis.call('ZCARD', KEYS[10]) == 0 then
  redis.call('DEL', unpack(KEYS))
  return 1
end
return 0
"""


# A machine's counts added to the crawl's and the totals read, once per
# token: an exchange whose reply was lost is sent again (by redis-py's retry,
# or with the machine's job) and must not add its counts twice, which would
# close the crawl on a CLOSESPIDER_* limit it has not reached. The token is
# kept in P:ticked under "<machine>|counts". KEYS: P:stats, P:started,
# P:closing, P:ticked; ARGV: machine, token, now, then counter, change pairs.
_EXCHANGE = """
local field = ARGV[1] .. '|counts'
if redis.call('HGET', KEYS[4], field) ~= ARGV[2] then
  for i = 4, #ARGV, 2 do
    redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  redis.call('HSET', KEYS[4], field, ARGV[2])
end
redis.call('SETNX', KEYS[2], ARGV[3])
return {redis.call('GET', KEYS[2]), redis.call('GET', KEYS[3]), redis.call('HGETALL', KEYS[1])}
"""


@dataclass(frozen=True)
class Limits:
    """The crawl's CLOSESPIDER_* limits (0: none)."""

    itemcount: int = 0
    pagecount: int = 0
    errorcount: int = 0
    timeout_s: float = 0.0

    def any(self) -> bool:
        return bool(self.itemcount or self.pagecount or self.errorcount or self.timeout_s)

    def reached(self, totals: dict[str, int], running_s: float) -> str | None:
        if self.itemcount and totals.get("item_scraped_count", 0) >= self.itemcount:
            return "closespider_itemcount"
        if self.pagecount and totals.get("response_received_count", 0) >= self.pagecount:
            return "closespider_pagecount"
        if self.errorcount and totals.get("spider_exceptions/count", 0) >= self.errorcount:
            return "closespider_errorcount"
        if self.timeout_s and running_s >= self.timeout_s:
            return "closespider_timeout"
        return None


@dataclass
class SharedCounts:
    """This machine's part of the crawl's counts."""

    prefix: str
    limits: Limits
    machine: str
    _sent: dict[str, int] = field(default_factory=dict)
    _script: Any = None

    def changes(self, stats: StatsCollector) -> dict[str, int]:
        """On the reactor thread: the counters that changed since the last
        exchange (``*_max`` and ``*_min`` are not sums)."""
        changes = {}
        for key, value in stats.get_stats().items():
            if type(value) is not int or key.endswith(("_max", "_min")):
                continue
            delta = value - self._sent.get(key, 0)
            if delta:
                changes[key] = delta
        return changes

    def sent_count(self, key: str) -> int:
        """How much of counter *key* this machine has added to the crawl's."""
        return self._sent.get(key, 0)

    def sent(self, changes: dict[str, int]) -> None:
        for key, delta in changes.items():
            self._sent[key] = self._sent.get(key, 0) + delta

    async def exchange(self, redis: Redis, changes: dict[str, int],
                       token: str) -> tuple[str | None, dict[str, int]]:
        """On the Redis thread: add *changes* (once per *token*), read the
        totals; the reason the crawl closes, if it does (this machine may be
        the one to decide)."""
        p = self.prefix
        now = time.time()
        keys = [f"{p}:stats", f"{p}:started", f"{p}:closing", f"{p}:ticked"]
        args: list[Any] = [self.machine, token, now]
        for key, delta in changes.items():
            args += [key, delta]
        if self._script is None:
            self._script = redis.register_script(_EXCHANGE)
        started, closing, flat = await self._script(keys=keys, args=args)
        raw = dict(zip(flat[::2], flat[1::2], strict=True))
        totals = {k.decode(): int(v) for k, v in raw.items()}
        if isinstance(closing, bytes):
            return closing.decode(), totals
        reason = self.limits.reached(totals, now - float(started))
        if reason is not None:
            # The first machine to see it decides; the others follow.
            await redis.set(f"{p}:closing", reason, nx=True)
            decided = await redis.get(f"{p}:closing")
            return (decided.decode() if isinstance(decided, bytes) else reason), totals
        return None, totals


async def forget_finished_crawl(redis: Redis, prefix: str) -> bool:
    """Delete the crawl's keys if no machine is in it any more and nothing is
    queued or leased; whether it did (atomic: a machine joining meanwhile
    keeps them)."""
    keys = [f"{prefix}:{name}" for name in _KEYS]
    return bool(await redis.eval(_FORGET, len(keys), *keys))
