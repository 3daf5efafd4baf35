"""The crawl's frontier in Redis: requests as the bytes engines send, with
their fingerprint, priority and download slot beside them, leased in batches
under the crawl's per-site limits, acknowledged when handled, and given back
when a lease outlives its visibility timeout.

Every operation is one Lua script (atomic in Redis, one round trip for a
batch), so any number of machines share the frontier without locks.

Keys, under the crawl's prefix ``P`` (``<spider>`` by default):

=====================  ======  ==================================================
``P:dupefilter``       set     fingerprints seen (scrapy-redis's key and format:
                               hex); exact deduplication across machines
``P:seq``              string  a counter: request ids, FIFO order within a priority
``P:blob``             hash    request id -> the serialized request
``P:meta``             hash    request id -> "slot|priority"
``P:q:<slot>``         zset    a slot's queued request ids, by score: priority
                               first (higher first), then arrival
``P:slot``             hash    slot -> "concurrency|delay" (the crawl's limits)
``P:inflight``         hash    slot -> requests leased and not yet released
``P:lastseen``         hash    slot -> when its last request was leased
``P:ready``            zset    slots that may lease now, by their head's score
``P:waiting``          zset    slots waiting for their delay, by when it ends
``P:leases``           zset    leased request ids, by the lease's deadline
``P:leased``           hash    request id -> "machine|released" (0 or 1)
``P:queued``           string  requests queued in all slots
``P:start_urls``       list,   start URLs pushed by the crawl's tooling
                       set or  (scrapy-redis's key and formats; the key's name
                       zset    is a setting): moved into the frontier as needed
=====================  ======  ==================================================

A slot is in ``P:ready`` exactly when it has a queued request, fewer than its
concurrency in flight, and no delay to wait: a lease takes the best head of
the ready slots, as Scrapy's downloader-aware queue serves the slots that have
room. A request's download ending (``release``) frees its place at once; its
acknowledgement (``ack``, the response handled, its requests and items sent)
ends the lease. A lease past its deadline (its machine died, or hung) is put
back in its queue by ``reap``, past the dupefilter.

A start URL entry is moved from its key into the frontier, as it is, by the
script that pops it (``take_start_urls``): it is never out of Redis. It is
queued in a slot of its own (:data:`START_SLOT`, no limits) and leased like
a request; the machine that leases it makes its request, pushes that, and
acknowledges the entry after the push. A machine that dies meanwhile stops
renewing the lease, and the entry goes back to the frontier for another; a
request pushed twice so is dropped by the dupefilter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["PRIORITY_BOUND", "START_MARK", "START_SLOT", "Entry", "FrontierStore", "Leased",
           "StartKey"]

# Scores order a slot's queue: priority first, then arrival. A double holds
# integers exactly up to 2**53: 2**40 arrivals (a trillion requests) under
# each of +-2**12 priorities.
_PRIORITY_SCALE = 2**40
PRIORITY_BOUND = 2**12 - 1

#: The slot of start URL entries not yet made into requests: not a host name
#: (no host has "<"), so no download slot shares it.
START_SLOT = "<start_urls>"
#: Before a start URL entry's bytes in ``P:blob``: a leased blob that starts
#: with it is an entry, not a pickled request (a pickle starts with 0x80).
START_MARK = b"\0start-url\0"
# No limit on the slot of start URL entries: making their requests is local.
_START_CONCURRENCY = 2**31

# Shared by the scripts: make a slot ready, waiting or neither, from its state.
_SETTLE_SLOT = """
local function settle(P, slot, now)
  local head = redis.call('ZRANGE', P .. ':q:' .. slot, 0, 0, 'WITHSCORES')
  if #head == 0 then
    redis.call('ZREM', P .. ':ready', slot)
    redis.call('ZREM', P .. ':waiting', slot)
    return
  end
  local info = redis.call('HGET', P .. ':slot', slot)
  local sep = string.find(info, '|', 1, true)
  local concurrency = tonumber(string.sub(info, 1, sep - 1))
  local delay = tonumber(string.sub(info, sep + 1))
  local inflight = tonumber(redis.call('HGET', P .. ':inflight', slot) or '0')
  if inflight >= concurrency then
    redis.call('ZREM', P .. ':ready', slot)
    redis.call('ZREM', P .. ':waiting', slot)
    return
  end
  local lastseen = redis.call('HGET', P .. ':lastseen', slot)
  if delay > 0 and lastseen and tonumber(lastseen) + delay > now then
    redis.call('ZREM', P .. ':ready', slot)
    redis.call('ZADD', P .. ':waiting', tonumber(lastseen) + delay, slot)
    return
  end
  redis.call('ZREM', P .. ':waiting', slot)
  redis.call('ZADD', P .. ':ready', head[2], slot)
end
"""

# KEYS: none (one prefix; a cluster would need hash tags). ARGV: P, now,
# then per request: fingerprint ('' = dont_filter), slot, concurrency,
# delay, priority, blob. Returns how many were queued (the rest were seen).
_PUSH = _SETTLE_SLOT + """
local P, now = ARGV[1], tonumber(ARGV[2])
local added = 0
local touched = {}
for i = 3, #ARGV, 6 do
  local fp, slot = ARGV[i], ARGV[i + 1]
  if fp == '' or redis.call('SADD', P .. ':dupefilter', fp) == 1 then
    local id = redis.call('INCR', P .. ':seq')
    local score = -tonumber(ARGV[i + 4]) * %(scale)d + id
    redis.call('HSET', P .. ':slot', slot, ARGV[i + 2] .. '|' .. ARGV[i + 3])
    redis.call('HSET', P .. ':blob', id, ARGV[i + 5])
    redis.call('HSET', P .. ':meta', id, slot .. '|' .. ARGV[i + 4])
    redis.call('ZADD', P .. ':q:' .. slot, score, id)
    added = added + 1
    touched[slot] = true
  end
end
if added > 0 then
  redis.call('INCRBY', P .. ':queued', added)
  for slot in pairs(touched) do
    if redis.call('ZSCORE', P .. ':waiting', slot) == false then settle(P, slot, now) end
  end
end
return added
""".replace("%(scale)d", str(_PRIORITY_SCALE))

# ARGV: P, now, machine, count, visibility (seconds). Returns a flat list:
# id, blob, id, blob...
_LEASE = _SETTLE_SLOT + """
local P, now, machine = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local count, visibility = tonumber(ARGV[4]), tonumber(ARGV[5])
for _, slot in ipairs(redis.call('ZRANGEBYSCORE', P .. ':waiting', '-inf', now)) do
  settle(P, slot, now)
end
local out = {}
while #out < 2 * count do
  local best = redis.call('ZRANGE', P .. ':ready', 0, 0)
  if #best == 0 then break end
  local slot = best[1]
  local popped = redis.call('ZPOPMIN', P .. ':q:' .. slot)
  if #popped == 0 then
    redis.call('ZREM', P .. ':ready', slot)
  else
    local id = popped[1]
    redis.call('HINCRBY', P .. ':inflight', slot, 1)
    redis.call('HSET', P .. ':lastseen', slot, now)
    redis.call('ZADD', P .. ':leases', now + visibility, id)
    redis.call('HSET', P .. ':leased', id, machine .. '|0')
    redis.call('DECR', P .. ':queued')
    out[#out + 1] = id
    out[#out + 1] = redis.call('HGET', P .. ':blob', id)
    settle(P, slot, now)
  end
end
return out
"""

# The download of each id ended: its place in the slot is free. ARGV: P, now, ids...
_RELEASE = _SETTLE_SLOT + """
local P, now = ARGV[1], tonumber(ARGV[2])
local freed = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local leased = redis.call('HGET', P .. ':leased', id)
  if leased and string.sub(leased, -1) == '0' then
    redis.call('HSET', P .. ':leased', id, string.sub(leased, 1, -2) .. '1')
    local meta = redis.call('HGET', P .. ':meta', id)
    local slot = string.sub(meta, 1, string.find(meta, '|', 1, true) - 1)
    redis.call('HINCRBY', P .. ':inflight', slot, -1)
    if redis.call('ZSCORE', P .. ':waiting', slot) == false then settle(P, slot, now) end
    freed = freed + 1
  end
end
return freed
"""

# Each id was handled: its lease ends (released first if it was not).
# ARGV: P, now, ids...
_ACK = _SETTLE_SLOT + """
local P, now = ARGV[1], tonumber(ARGV[2])
local done = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local leased = redis.call('HGET', P .. ':leased', id)
  if leased then
    local meta = redis.call('HGET', P .. ':meta', id)
    local slot = string.sub(meta, 1, string.find(meta, '|', 1, true) - 1)
    if string.sub(leased, -1) == '0' then
      redis.call('HINCRBY', P .. ':inflight', slot, -1)
      if redis.call('ZSCORE', P .. ':waiting', slot) == false then settle(P, slot, now) end
    end
    redis.call('HDEL', P .. ':leased', id)
    redis.call('ZREM', P .. ':leases', id)
    redis.call('HDEL', P .. ':blob', id)
    redis.call('HDEL', P .. ':meta', id)
    done = done + 1
  end
end
return done
"""

# Leases past their deadline go back to their queue, at their old place.
# ARGV: P, now, limit. Returns the ids put back.
_REAP = _SETTLE_SLOT + """
local P, now, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local late = redis.call('ZRANGEBYSCORE', P .. ':leases', '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(late) do
  local leased = redis.call('HGET', P .. ':leased', id)
  local meta = redis.call('HGET', P .. ':meta', id)
  local sep = string.find(meta, '|', 1, true)
  local slot = string.sub(meta, 1, sep - 1)
  local score = -tonumber(string.sub(meta, sep + 1)) * %(scale)d + tonumber(id)
  if leased and string.sub(leased, -1) == '0' then
    redis.call('HINCRBY', P .. ':inflight', slot, -1)
  end
  redis.call('HDEL', P .. ':leased', id)
  redis.call('ZREM', P .. ':leases', id)
  redis.call('ZADD', P .. ':q:' .. slot, score, id)
  redis.call('INCR', P .. ':queued')
  if redis.call('ZSCORE', P .. ':waiting', slot) == false then settle(P, slot, now) end
end
return late
""".replace("%(scale)d", str(_PRIORITY_SCALE))

# Extend the deadline of leases still being worked on. ARGV: P, deadline, ids...
_RENEW = """
local P, deadline = ARGV[1], tonumber(ARGV[2])
local renewed = 0
for i = 3, #ARGV do
  if redis.call('ZADD', P .. ':leases', 'XX', 'CH', deadline, ARGV[i]) == 1 then
    renewed = renewed + 1
  elseif redis.call('ZSCORE', P .. ':leases', ARGV[i]) then
    renewed = renewed + 1
  end
end
return renewed
"""

# Move start URL entries from their key (ARGV[2]) into the frontier, at most
# as many as there is room for in the start slot's queue (ARGV[4], the
# machine's want): the key stays the buffer its tooling watches. A list is
# read from its head (as scrapy-redis does: ``lpush`` serves the last pushed
# first), a sorted set from its highest score. An entry's queue is ordered by
# the "priority" of its JSON object, if it has one, so that it is made into
# its request as soon as that request's priority says.
# ARGV: P, key, now, want. Returns {taken, left in the key, the key's type}.
_TAKE_STARTS = _SETTLE_SLOT + """
local P, key, now, want = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local kind = redis.call('TYPE', key)['ok']
local size = 0
if kind == 'list' then size = redis.call('LLEN', key)
elseif kind == 'set' then size = redis.call('SCARD', key)
elseif kind == 'zset' then size = redis.call('ZCARD', key)
elseif kind ~= 'none' then return {0, 0, kind} end
local n = math.min(size, want - redis.call('ZCARD', P .. ':q:' .. SLOT))
if n <= 0 then return {0, size, kind} end
local taken
if kind == 'list' then
  taken = redis.call('LRANGE', key, 0, n - 1)
  redis.call('LTRIM', key, n, -1)
elseif kind == 'set' then
  taken = redis.call('SPOP', key, n)
else
  taken = redis.call('ZREVRANGE', key, 0, n - 1)
  redis.call('ZREMRANGEBYRANK', key, -n, -1)
end
redis.call('HSET', P .. ':slot', SLOT, '%(concurrency)d|0')
for _, data in ipairs(taken) do
  local priority = 0
  if string.sub(data, 1, 1) == '{' then
    local ok, decoded = pcall(cjson.decode, data)
    if ok and type(decoded) == 'table' and type(decoded['priority']) == 'number' then
      priority = math.max(-%(bound)d, math.min(%(bound)d, math.floor(decoded['priority'])))
    end
  end
  local id = redis.call('INCR', P .. ':seq')
  redis.call('HSET', P .. ':blob', id, MARK .. data)
  redis.call('HSET', P .. ':meta', id, SLOT .. '|' .. priority)
  redis.call('ZADD', P .. ':q:' .. SLOT, -priority * %(scale)d + id, id)
end
redis.call('INCRBY', P .. ':queued', #taken)
settle(P, SLOT, now)
return {#taken, size - #taken, kind}
""".replace("%(scale)d", str(_PRIORITY_SCALE)).replace("%(bound)d", str(PRIORITY_BOUND)) \
    .replace("%(concurrency)d", str(_START_CONCURRENCY)) \
    .replace("SLOT", "'" + START_SLOT + "'").replace("MARK", "'\\0start-url\\0'")


@dataclass(frozen=True)
class Entry:
    """A request on its way into the frontier."""

    #: The request's fingerprint, or None for ``dont_filter``.
    fingerprint: bytes | None
    slot: str
    #: The slot's limits, as the machine that made the request sees them
    #: (every machine runs the same settings).
    concurrency: int
    delay_s: float
    priority: int
    blob: bytes


@dataclass(frozen=True)
class Leased:
    id: bytes
    blob: bytes


@dataclass(frozen=True)
class StartKey:
    """What one look at the start URLs key found."""

    #: Entries moved into the frontier.
    taken: int
    #: Entries left in the key.
    left: int
    #: The key's Redis type: "none" (no key), "list", "set", "zset", or
    #: another, which is not read.
    kind: str


class FrontierStore:
    """The frontier's operations, each one Redis round trip; *prefix* names
    the crawl (every machine of a crawl uses the same)."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self._push = redis.register_script(_PUSH)
        self._lease = redis.register_script(_LEASE)
        self._release = redis.register_script(_RELEASE)
        self._ack = redis.register_script(_ACK)
        self._reap = redis.register_script(_REAP)
        self._renew = redis.register_script(_RENEW)
        self._take_starts = redis.register_script(_TAKE_STARTS)

    async def push(self, entries: list[Entry], now: float) -> int:
        """Queue the entries not seen before; how many were queued."""
        if not entries:
            return 0
        args: list[Any] = [self.prefix, now]
        for entry in entries:
            if not -PRIORITY_BOUND <= entry.priority <= PRIORITY_BOUND:
                raise ValueError(f"priority {entry.priority} is outside"
                                 f" +-{PRIORITY_BOUND}, which the Redis frontier orders")
            args += [entry.fingerprint.hex() if entry.fingerprint is not None else "",
                     entry.slot, entry.concurrency, entry.delay_s, entry.priority, entry.blob]
        return int(await self._push(args=args))

    async def lease(self, machine: str, count: int, visibility_s: float,
                    now: float) -> list[Leased]:
        """Up to *count* requests that their slots allow now, best first."""
        flat = await self._lease(args=[self.prefix, now, machine, count, visibility_s])
        return [Leased(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]

    async def release(self, ids: list[bytes], now: float) -> int:
        if not ids:
            return 0
        return int(await self._release(args=[self.prefix, now, *ids]))

    async def ack(self, ids: list[bytes], now: float) -> int:
        if not ids:
            return 0
        return int(await self._ack(args=[self.prefix, now, *ids]))

    async def renew(self, ids: list[bytes], deadline: float) -> int:
        if not ids:
            return 0
        return int(await self._renew(args=[self.prefix, deadline, *ids]))

    async def reap(self, now: float, limit: int = 1000) -> list[bytes]:
        """Put back the leases past their deadline; their ids."""
        return list(await self._reap(args=[self.prefix, now, limit]))

    async def take_start_urls(self, key: str, want: int, now: float) -> StartKey:
        """Move up to *want* start URL entries from *key* into the frontier
        (fewer if some are queued there already)."""
        taken, left, kind = await self._take_starts(args=[self.prefix, key, now, want])
        return StartKey(int(taken), int(left), kind.decode() if isinstance(kind, bytes)
                        else str(kind))

    async def counts(self) -> tuple[int, int]:
        """(requests queued, leases out)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(f"{self.prefix}:queued")
        pipe.zcard(f"{self.prefix}:leases")
        queued, leases = await pipe.execute()
        return int(queued or 0), int(leases)
