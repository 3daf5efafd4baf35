"""The crawl's frontier in Redis: requests as the bytes engines send, with
their fingerprint, priority and download slot beside them, leased in batches
under the crawl's per-site limits, acknowledged when handled, and given back
when a lease outlives its visibility timeout.

Every operation is one Lua script (atomic in Redis, one round trip for a
batch), so any number of machines share the frontier without locks; a
machine's whole job (its pushes, releases, acknowledgements, renewals, the
reaping, its next leases, its state and the crawl's counts) is one script
too: one round trip a tick, however many pages it carries.

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
``P:held``             hash    "machine|slot" -> the same, per machine: each
                               holds at most its share of a slot's places
``P:lastseen``         hash    slot -> when its last request was leased
``P:ready``            zset    slots that may lease now, by their head's score
``P:waiting``          zset    slots waiting for their delay, by when it ends
``P:leases``           zset    leased request ids, by the lease's deadline
``P:leased``           hash    request id -> "machine|released" (0 or 1)
``P:queued``           string  requests queued in all slots
``P:ticked``           hash    machine -> its last tick's token, how many it
                               queued and the ids it leased (JSON): a tick
                               sent again is not done twice; "machine|counts"
                               -> the token of its last counts added to
                               ``P:stats`` (:mod:`.crawl_state`)
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
script that pops it (``take_starts``, in the tick): it is never out of
Redis. It is queued in a slot of its own (:data:`START_SLOT`, no limits) and
leased like a request; the machine that leases it makes its request, pushes
that, and acknowledges the entry after the push. A machine that dies
meanwhile stops renewing the lease, and the entry goes back to the frontier
for another; a request pushed twice so is dropped by the dupefilter.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["PRIORITY_BOUND", "START_MARK", "START_SLOT", "Entry", "FrontierStore", "Job",
           "JobResult", "Leased", "StartKey"]

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
# A lease looks past at most this many ready slots where its machine holds
# its share already (a machine rarely holds its share of many sites at once).
_SKIP_MAX = 100

# Shared by the scripts: make a slot ready, waiting or neither, from its
# state. A slot's limits are read once a script (they change only with a push).
_SETTLE_SLOT = """
local slot_limits = {}
local function limits(P, slot)
  local cached = slot_limits[slot]
  if cached == nil then
    local info = redis.call('HGET', P .. ':slot', slot)
    local sep = string.find(info, '|', 1, true)
    cached = {tonumber(string.sub(info, 1, sep - 1)), tonumber(string.sub(info, sep + 1))}
    slot_limits[slot] = cached
  end
  return cached[1], cached[2]
end

local function settle(P, slot, now)
  local head = redis.call('ZRANGE', P .. ':q:' .. slot, 0, 0, 'WITHSCORES')
  if #head == 0 then
    redis.call('ZREM', P .. ':ready', slot)
    redis.call('ZREM', P .. ':waiting', slot)
    return
  end
  local concurrency, delay = limits(P, slot)
  local inflight = tonumber(redis.call('HGET', P .. ':inflight', slot) or '0')
  if inflight >= concurrency then
    redis.call('ZREM', P .. ':ready', slot)
    if delay > 0 then redis.call('ZREM', P .. ':waiting', slot) end
    return
  end
  if delay > 0 then
    local lastseen = redis.call('HGET', P .. ':lastseen', slot)
    if lastseen and tonumber(lastseen) + delay > now then
      redis.call('ZREM', P .. ':ready', slot)
      redis.call('ZADD', P .. ':waiting', tonumber(lastseen) + delay, slot)
      return
    end
    redis.call('ZREM', P .. ':waiting', slot)
  end
  redis.call('ZADD', P .. ':ready', head[2], slot)
end

-- The slots an operation touched, settled once each at its end (those
-- waiting for their delay are settled when it ends, by a lease).
local function settle_all(P, touched, now)
  for slot in pairs(touched) do
    if redis.call('ZSCORE', P .. ':waiting', slot) == false then settle(P, slot, now) end
  end
end
"""

# The operations, as Lua functions of one script each and of the tick, which
# runs a machine's whole job in one call. KEYS: none (one prefix; a cluster
# would need hash tags). ``A`` is ARGV; an operation on a list of requests
# reads A[first .. last].
_FUNCTIONS = _SETTLE_SLOT + """
-- Per request: fingerprint ('' = dont_filter), slot, concurrency, delay,
-- priority, blob. How many were queued (the rest were seen before).
local function push(P, now, A, first, last)
  local added = 0
  local touched = {}
  for i = first, last, 6 do
    local fp, slot = A[i], A[i + 1]
    if fp == '' or redis.call('SADD', P .. ':dupefilter', fp) == 1 then
      local id = redis.call('INCR', P .. ':seq')
      local score = -tonumber(A[i + 4]) * %(scale)d + id
      redis.call('HSET', P .. ':slot', slot, A[i + 2] .. '|' .. A[i + 3])
      slot_limits[slot] = {tonumber(A[i + 2]), tonumber(A[i + 3])}
      redis.call('HSET', P .. ':blob', id, A[i + 5])
      redis.call('HSET', P .. ':meta', id, slot .. '|' .. A[i + 4])
      redis.call('ZADD', P .. ':q:' .. slot, score, id)
      added = added + 1
      touched[slot] = true
    end
  end
  if added > 0 then
    redis.call('INCRBY', P .. ':queued', added)
    settle_all(P, touched, now)
  end
  return added
end

-- Up to count requests that their slots allow now, best first: a flat
-- list id, blob, id, blob...
-- A machine holds at most its share of a slot's places (its concurrency
-- over the machines in the crawl, rounded up), so that the machine whose
-- download just ended does not take every freed place of a site again.
local function lease(P, now, machine, count, visibility)
  for _, slot in ipairs(redis.call('ZRANGEBYSCORE', P .. ':waiting', '-inf', now)) do
    redis.call('ZREM', P .. ':waiting', slot)  -- settle puts it back if it still waits
    settle(P, slot, now)
  end
  local machines = math.max(1, redis.call('HLEN', P .. ':machines'))
  local out = {}
  -- The ready slots ranked before `skipped` are those where this machine
  -- holds its share: their scores stay, and the others' only grow.
  local skipped = 0
  while #out < 2 * count and skipped < %(skip)d do
    local best = redis.call('ZRANGE', P .. ':ready', skipped, skipped)
    if #best == 0 then break end
    local slot = best[1]
    local held = machine .. '|' .. slot
    local concurrency = limits(P, slot)
    local popped = {}
    if tonumber(redis.call('HGET', P .. ':held', held) or '0')
        >= math.ceil(concurrency / machines) then
      skipped = skipped + 1
    else
      popped = redis.call('ZPOPMIN', P .. ':q:' .. slot)
      if #popped == 0 then redis.call('ZREM', P .. ':ready', slot) end
    end
    if #popped > 0 then
      local id = popped[1]
      redis.call('HINCRBY', P .. ':inflight', slot, 1)
      redis.call('HINCRBY', P .. ':held', held, 1)
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
end

-- P:meta holds "slot|priority"; a slot's name may hold a |, a priority not.
local function slot_of(meta)
  return string.match(meta, '^(.*)|[^|]*$')
end

-- A place of a slot given back: the crawl's count and its machine's.
local function free_place(P, slot, leased)
  redis.call('HINCRBY', P .. ':inflight', slot, -1)
  local held = string.sub(leased, 1, -3) .. '|' .. slot
  if redis.call('HINCRBY', P .. ':held', held, -1) <= 0 then
    redis.call('HDEL', P .. ':held', held)
  end
end

-- The download of each id ended: its place in the slot is free.
local function release(P, now, A, first, last)
  local freed = 0
  local touched = {}
  for i = first, last do
    local id = A[i]
    local leased = redis.call('HGET', P .. ':leased', id)
    if leased and string.sub(leased, -1) == '0' then
      redis.call('HSET', P .. ':leased', id, string.sub(leased, 1, -2) .. '1')
      local slot = slot_of(redis.call('HGET', P .. ':meta', id))
      free_place(P, slot, leased)
      touched[slot] = true
      freed = freed + 1
    end
  end
  settle_all(P, touched, now)
  return freed
end

-- Each id was handled: its lease ends (released first if it was not).
local function ack(P, now, A, first, last)
  local done = 0
  local touched = {}
  for i = first, last do
    local id = A[i]
    local leased = redis.call('HGET', P .. ':leased', id)
    if leased then
      local slot = slot_of(redis.call('HGET', P .. ':meta', id))
      if string.sub(leased, -1) == '0' then
        free_place(P, slot, leased)
        touched[slot] = true
      end
      redis.call('HDEL', P .. ':leased', id)
      redis.call('ZREM', P .. ':leases', id)
      redis.call('HDEL', P .. ':blob', id)
      redis.call('HDEL', P .. ':meta', id)
      done = done + 1
    end
  end
  settle_all(P, touched, now)
  return done
end

-- Leases past their deadline go back to their queue, at their old place:
-- the ids put back.
local function reap(P, now, limit)
  local late = redis.call('ZRANGEBYSCORE', P .. ':leases', '-inf', now, 'LIMIT', 0, limit)
  local touched = {}
  for _, id in ipairs(late) do
    local leased = redis.call('HGET', P .. ':leased', id)
    local slot, priority = string.match(redis.call('HGET', P .. ':meta', id), '^(.*)|([^|]*)$')
    local score = -tonumber(priority) * %(scale)d + tonumber(id)
    if leased and string.sub(leased, -1) == '0' then
      free_place(P, slot, leased)
    end
    redis.call('HDEL', P .. ':leased', id)
    redis.call('ZREM', P .. ':leases', id)
    redis.call('ZADD', P .. ':q:' .. slot, score, id)
    redis.call('INCR', P .. ':queued')
    touched[slot] = true
  end
  settle_all(P, touched, now)
  return late
end

-- Move start URL entries from their key into the frontier, at most as many
-- as there is room for in the start slot's queue (the machine's want): the
-- key stays the buffer its tooling watches. A list is read from its head
-- (as scrapy-redis does: lpush serves the last pushed first), a sorted set
-- from its highest score. An entry's queue is ordered by the "priority" of
-- its JSON object, if it has one, so that it is made into its request as
-- soon as that request's priority says. {taken, left in the key, its type}.
local function take_starts(P, key, now, want)
  local slot = '%(start_slot)s'
  local kind = redis.call('TYPE', key)['ok']
  local size = 0
  if kind == 'list' then size = redis.call('LLEN', key)
  elseif kind == 'set' then size = redis.call('SCARD', key)
  elseif kind == 'zset' then size = redis.call('ZCARD', key)
  elseif kind ~= 'none' then return {0, 0, kind} end
  local n = math.min(size, want - redis.call('ZCARD', P .. ':q:' .. slot))
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
  redis.call('HSET', P .. ':slot', slot, '%(start_concurrency)d|0')
  slot_limits[slot] = {%(start_concurrency)d, 0}
  for _, data in ipairs(taken) do
    local priority = 0
    if string.sub(data, 1, 1) == '{' then
      local ok, decoded = pcall(cjson.decode, data)
      if ok and type(decoded) == 'table' and type(decoded['priority']) == 'number' then
        priority = math.max(-%(bound)d, math.min(%(bound)d, math.floor(decoded['priority'])))
      end
    end
    local id = redis.call('INCR', P .. ':seq')
    redis.call('HSET', P .. ':blob', id, '%(start_mark)s' .. data)
    redis.call('HSET', P .. ':meta', id, slot .. '|' .. priority)
    redis.call('ZADD', P .. ':q:' .. slot, -priority * %(scale)d + id, id)
  end
  redis.call('INCRBY', P .. ':queued', #taken)
  settle(P, slot, now)
  return {#taken, size - #taken, kind}
end

-- Extend the deadline of leases still being worked on.
local function renew(P, deadline, A, first, last)
  local renewed = 0
  for i = first, last do
    if redis.call('ZADD', P .. ':leases', 'XX', 'CH', deadline, A[i]) == 1 then
      renewed = renewed + 1
    elseif redis.call('ZSCORE', P .. ':leases', A[i]) then
      renewed = renewed + 1
    end
  end
  return renewed
end
""".replace("%(scale)d", str(_PRIORITY_SCALE)).replace("%(skip)d", str(_SKIP_MAX)) \
    .replace("%(bound)d", str(PRIORITY_BOUND)).replace("%(start_slot)s", START_SLOT) \
    .replace("%(start_concurrency)d", str(_START_CONCURRENCY)) \
    .replace("%(start_mark)s", "\\0start-url\\0")

# One script each: ARGV: P, now (or the deadline, for renew), then the
# operation's arguments.
_PUSH = _FUNCTIONS + "return push(ARGV[1], tonumber(ARGV[2]), ARGV, 3, #ARGV)"
_LEASE = _FUNCTIONS + ("return lease(ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]),"
                       " tonumber(ARGV[5]))")
_RELEASE = _FUNCTIONS + "return release(ARGV[1], tonumber(ARGV[2]), ARGV, 3, #ARGV)"
_ACK = _FUNCTIONS + "return ack(ARGV[1], tonumber(ARGV[2]), ARGV, 3, #ARGV)"
_REAP = _FUNCTIONS + "return reap(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]))"
_RENEW = _FUNCTIONS + "return renew(ARGV[1], tonumber(ARGV[2]), ARGV, 3, #ARGV)"
_TAKE_STARTS = _FUNCTIONS + ("return take_starts(ARGV[1], ARGV[2], tonumber(ARGV[3]),"
                             " tonumber(ARGV[4]))")

# A machine's job, in one round trip, in this order: its pushes (before the
# acknowledgements of the pages that made them), releases, acknowledgements,
# renewals, reaping, leasing; then its own state in P:machines, the machines
# that died forgotten, and the crawl's counts. ARGV: P, now, machine, want,
# visibility, renewal deadline, reap limit (0: none), machine state
# ("starting|until" or "running|until"), the start URLs key ('' for none),
# the job's token, then the counts of pushes (entries),
# releases, acknowledgements and renewals, then their arguments in that
# order. Start URL entries are taken into the frontier before the lease.
# Returns {added, reaped ids, leased (flat), queued, leases out, machines
# starting, {start entries taken, left in their key, the key's type}}.
#
# A job whose reply was lost (the connection dropped after Redis ran it) is
# sent again with its token, by redis-py's retry or by the machine: it is
# not done again (its dont_filter requests would be queued twice), and its
# leases, which no machine would work on until they expired, are returned.
_TICK = _FUNCTIONS + """
local P, now, machine = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local want, visibility = tonumber(ARGV[4]), tonumber(ARGV[5])
local deadline, reap_limit, state = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
local start_key, token = ARGV[9], ARGV[10]
local n_push, n_release = tonumber(ARGV[11]), tonumber(ARGV[12])
local n_ack, n_renew = tonumber(ARGV[13]), tonumber(ARGV[14])
local added, reaped, leased, starts = 0, {}, {}, {0, 0, 'none'}
local last = redis.call('HGET', P .. ':ticked', machine)
last = last and cjson.decode(last)
if last and last[1] == token then
  added = last[2]
  for _, id in ipairs(last[3]) do
    local holder = redis.call('HGET', P .. ':leased', id)
    if holder and string.sub(holder, 1, -3) == machine then
      leased[#leased + 1] = id
      leased[#leased + 1] = redis.call('HGET', P .. ':blob', id)
    end
  end
else
  local i = 15
  added = push(P, now, ARGV, i, i + 6 * n_push - 1)
  i = i + 6 * n_push
  release(P, now, ARGV, i, i + n_release - 1)
  i = i + n_release
  ack(P, now, ARGV, i, i + n_ack - 1)
  i = i + n_ack
  renew(P, deadline, ARGV, i, i + n_renew - 1)
  if reap_limit > 0 then reaped = reap(P, now, reap_limit) end
  if start_key ~= '' then starts = take_starts(P, start_key, now, want) end
  if want > 0 then leased = lease(P, now, machine, want, visibility) end
  local ids = {}
  for j = 1, #leased, 2 do ids[#ids + 1] = leased[j] end
  -- cjson writes an empty table as an object, read back as an empty table.
  redis.call('HSET', P .. ':ticked', machine, cjson.encode({token, added, ids}))
end
redis.call('HSET', P .. ':machines', machine, state)
local machines = redis.call('HGETALL', P .. ':machines')
local starting = 0
for j = 1, #machines, 2 do
  local value = machines[j + 1]
  local sep = string.find(value, '|', 1, true)
  if tonumber(string.sub(value, sep + 1)) < now then
    redis.call('HDEL', P .. ':machines', machines[j])  -- died without leaving
    redis.call('HDEL', P .. ':ticked', machines[j], machines[j] .. '|counts')
  elseif string.sub(value, 1, sep - 1) == 'starting' then
    starting = starting + 1
  end
end
local queued = tonumber(redis.call('GET', P .. ':queued') or '0')
local out = redis.call('ZCARD', P .. ':leases')
return {added, reaped, leased, queued, out, starting, starts}
"""


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

    @classmethod
    def of(cls, reply: list[Any]) -> StartKey:
        taken, left, kind = reply
        return cls(int(taken), int(left), kind.decode() if isinstance(kind, bytes)
                   else str(kind))


@dataclass
class Job:
    """What one machine sends in one tick."""

    machine: str
    #: "starting|<until>" or "running|<until>": whether the machine is still
    #: in its spider's start(), and when it counts as dead if not heard of.
    state: str
    #: Names the job: one sent again with the same token is done once.
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    push: list[Entry] = field(default_factory=list)
    release: list[bytes] = field(default_factory=list)
    ack: list[bytes] = field(default_factory=list)
    renew: list[bytes] = field(default_factory=list)
    renew_deadline: float = 0.0
    reap: bool = False
    want: int = 0
    visibility_s: float = 60.0
    #: The start URLs key to take entries from ("": none).
    start_key: str = ""


@dataclass
class JobResult:
    added: int
    reaped: list[bytes]
    leased: list[Leased]
    #: The crawl's: requests queued, leases out, machines still starting.
    state: tuple[int, int, int]
    starts: StartKey


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
        self._tick = redis.register_script(_TICK)
        self._take_starts = redis.register_script(_TAKE_STARTS)

    async def tick(self, job: Job, now: float, reap_limit: int = 1000) -> JobResult:
        """A machine's whole job in one round trip (see _TICK)."""
        args: list[Any] = [
            self.prefix, now, job.machine, job.want, job.visibility_s, job.renew_deadline,
            reap_limit if job.reap else 0, job.state, job.start_key, job.token,
            len(job.push), len(job.release), len(job.ack), len(job.renew),
            *_push_args(job.push), *job.release, *job.ack, *job.renew,
        ]
        added, reaped, flat, queued, out, starting, starts = await self._tick(args=args)
        return JobResult(int(added), list(reaped),
                         [Leased(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)],
                         (int(queued), int(out), int(starting)), StartKey.of(starts))

    async def push(self, entries: list[Entry], now: float) -> int:
        """Queue the entries not seen before; how many were queued."""
        if not entries:
            return 0
        return int(await self._push(args=[self.prefix, now, *_push_args(entries)]))

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
        return StartKey.of(await self._take_starts(args=[self.prefix, key, now, want]))

    async def counts(self) -> tuple[int, int]:
        """(requests queued, leases out)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(f"{self.prefix}:queued")
        pipe.zcard(f"{self.prefix}:leases")
        queued, leases = await pipe.execute()
        return int(queued or 0), int(leases)


def _push_args(entries: list[Entry]) -> list[Any]:
    args: list[Any] = []
    for entry in entries:
        if not -PRIORITY_BOUND <= entry.priority <= PRIORITY_BOUND:
            raise ValueError(f"priority {entry.priority} is outside"
                             f" +-{PRIORITY_BOUND}, which the Redis frontier orders")
        args += [entry.fingerprint.hex() if entry.fingerprint is not None else "",
                 entry.slot, entry.concurrency, entry.delay_s, entry.priority, entry.blob]
    return args
