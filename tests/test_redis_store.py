"""The Redis frontier's store against a real redis-server: deduplication,
priorities, per-slot concurrency and delay for every machine, leases that
come back after their visibility timeout, and atomicity under machines that
lease at once."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from scrapy_speedup.redis_frontier.store import Entry, FrontierStore, Job
from tests.redis_server import RedisServer, redis_server

_names = itertools.count()


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with redis_server() as running:
        yield running


def run(server: RedisServer, test: Callable[[FrontierStore], Awaitable[Any]]) -> Any:
    """Run *test* with a store of a crawl of its own (a fresh prefix)."""

    async def main() -> Any:
        client = Redis.from_url(server.url)
        try:
            return await test(FrontierStore(client, f"crawl{next(_names)}"))
        finally:
            await client.aclose()

    # On a thread of its own: pytest-twisted runs the tests inside the reactor's
    # loop, where asyncio.run() may not start another.
    outcome: list[tuple[Any, BaseException | None]] = []

    def target() -> None:
        try:
            outcome.append((asyncio.run(asyncio.wait_for(main(), 30)), None))
        except BaseException as exc:  # noqa: BLE001 - raised again below
            outcome.append((None, exc))

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(60)
    assert outcome, "the test's loop hung"
    value, error = outcome[0]
    if error is not None:
        raise error
    return value


def entry(n: int, *, slot: str = "a.example", priority: int = 0, concurrency: int = 8,
          delay: float = 0.0, fp: bool = True) -> Entry:
    return Entry(f"fp{n}".encode() if fp else None, slot, concurrency, delay, priority,
                 f"request {n}".encode())


def blobs(leased: list[Any]) -> list[bytes]:
    return [item.blob for item in leased]


def test_duplicates_are_dropped_unless_dont_filter(server: RedisServer) -> None:
    async def test(store: FrontierStore) -> None:
        assert await store.push([entry(1), entry(1), entry(2)], now=0) == 2
        assert await store.push([entry(1)], now=0) == 0
        assert await store.push([entry(1, fp=False), entry(1, fp=False)], now=0) == 2
        assert await store.counts() == (4, 0)
        # scrapy-redis's dupefilter key and format: hex fingerprints.
        members = await store.redis.smembers(f"{store.prefix}:dupefilter")
        assert members == {b"fp1".hex().encode(), b"fp2".hex().encode()}

    run(server, test)


def test_priority_first_then_arrival(server: RedisServer) -> None:
    async def test(store: FrontierStore) -> None:
        await store.push([entry(1, priority=0), entry(2, priority=5), entry(3, priority=0),
                          entry(4, priority=-3), entry(5, priority=5)], now=0)
        leased = await store.lease("m1", 10, 60, now=0)
        assert blobs(leased) == [b"request 2", b"request 5", b"request 1", b"request 3",
                                 b"request 4"]

    run(server, test)


def test_priority_holds_across_slots_that_have_room(server: RedisServer) -> None:
    async def test(store: FrontierStore) -> None:
        await store.push([entry(1, slot="a", priority=1), entry(2, slot="b", priority=9),
                          entry(3, slot="a", priority=5), entry(4, slot="c", priority=7)], now=0)
        assert blobs(await store.lease("m1", 4, 60, now=0)) == [
            b"request 2", b"request 4", b"request 3", b"request 1"]

    run(server, test)


def test_a_slot_never_has_more_than_its_concurrency_out(server: RedisServer) -> None:
    async def test(store: FrontierStore) -> None:
        await store.push([entry(n, concurrency=2) for n in range(5)]
                         + [entry(10, slot="b", concurrency=1)], now=0)
        first = await store.lease("m1", 10, 60, now=0)
        assert sorted(blobs(first)) == [b"request 0", b"request 1", b"request 10"]
        assert await store.lease("m2", 10, 60, now=0) == []
        # A download that ended frees its place before the page is handled.
        assert await store.release([first[0].id], now=1) == 1
        assert await store.release([first[0].id], now=1) == 0  # once
        assert blobs(await store.lease("m2", 10, 60, now=1)) == [b"request 2"]
        # An acknowledgement without a release frees it too.
        assert await store.ack([first[1].id], now=2) == 1
        assert blobs(await store.lease("m1", 10, 60, now=2)) == [b"request 3"]
        assert await store.counts() == (1, 4)

    run(server, test)


def test_download_delay_holds_for_every_machine(server: RedisServer) -> None:
    async def test(store: FrontierStore) -> None:
        await store.push([entry(n, delay=1.0) for n in range(3)], now=0)
        assert len(await store.lease("m1", 10, 60, now=0)) == 1
        assert await store.lease("m2", 10, 60, now=0.5) == []
        assert len(await store.lease("m2", 10, 60, now=1.0)) == 1
        # A new request for a waiting slot waits too.
        await store.push([entry(9, delay=1.0, priority=9)], now=1.2)
        assert await store.lease("m1", 10, 60, now=1.5) == []
        assert blobs(await store.lease("m1", 10, 60, now=2.0)) == [b"request 9"]

    run(server, test)


def test_a_lease_past_its_deadline_comes_back(server: RedisServer) -> None:
    async def test(store: FrontierStore) -> None:
        await store.push([entry(1, concurrency=1), entry(2, concurrency=1)], now=0)
        (lost,) = await store.lease("dead machine", 10, 5, now=0)
        assert await store.reap(now=4) == []
        assert await store.reap(now=6) == [lost.id]
        # Its place and its turn (it came first) are back.
        assert blobs(await store.lease("m2", 10, 5, now=6)) == [lost.blob]
        # A late acknowledgement of a reaped lease changes nothing.
        assert await store.counts() == (1, 1)

    run(server, test)


def test_renewed_leases_are_not_reaped(server: RedisServer) -> None:
    async def test(store: FrontierStore) -> None:
        await store.push([entry(1)], now=0)
        (slow,) = await store.lease("m1", 1, 5, now=0)
        assert await store.renew([slow.id], deadline=20) == 1
        assert await store.reap(now=10) == []
        assert await store.ack([slow.id], now=11) == 1
        assert await store.renew([slow.id], deadline=30) == 0
        assert await store.counts() == (0, 0)

    run(server, test)


def test_machines_leasing_at_once_never_get_the_same_request(server: RedisServer) -> None:
    async def test(store: FrontierStore) -> None:
        total = 2000
        await store.push([entry(n, slot=f"s{n % 13}", concurrency=3) for n in range(total)],
                         now=0)
        seen: list[bytes] = []

        async def machine(name: str) -> None:
            while True:
                leased = await store.lease(name, 16, 60, now=0)
                if not leased:
                    queued, _ = await store.counts()
                    if not queued:
                        return
                    await asyncio.sleep(0)
                    continue
                seen.extend(blobs(leased))
                await store.ack([item.id for item in leased], now=0)

        await asyncio.gather(*(machine(f"m{i}") for i in range(4)))
        assert len(seen) == total and len(set(seen)) == total
        assert await store.counts() == (0, 0)

    run(server, test)



def test_a_tick_is_each_operation_in_order_in_one_call(server: RedisServer) -> None:
    """A machine's job: the pushes first (so that a page's links are in
    before its acknowledgement), then releases, acknowledgements, renewals,
    reaping and leasing; its state; machines that died forgotten."""
    async def test(store: FrontierStore) -> None:
        first = await store.tick(Job("m1", "starting|100", push=[entry(1, concurrency=1),
                                                                  entry(2, concurrency=1)],
                                     want=5, visibility_s=10), now=0)
        assert first.added == 2 and [item.blob for item in first.leased] == [b"request 1"]
        assert first.state == (1, 1, 1)  # 1 queued, 1 leased, 1 machine starting
        (leased,) = first.leased
        # Its link pushed, itself acknowledged and the next leased, at once:
        # the slot's place is free for the lease of the same tick.
        second = await store.tick(Job("m1", "running|100", push=[entry(3, concurrency=1),
                                                                   entry(1, concurrency=1)],
                                      ack=[leased.id], want=5, visibility_s=10), now=1)
        assert second.added == 1
        assert [item.blob for item in second.leased] == [b"request 2"]
        assert second.state == (1, 1, 0)
        # Another machine whose state ran out (it died) is forgotten; its
        # lease comes back with the reaping.
        await store.tick(Job("m2", "running|5", want=0), now=1)
        third = await store.tick(Job("m1", "running|100", reap=True, want=0), now=20)
        assert third.reaped == [second.leased[0].id]
        assert await store.redis.hkeys(f"{store.prefix}:machines") == [b"m1"]
        assert third.state == (2, 0, 0)
        renewed = await store.tick(Job("m1", "running|100", want=1, visibility_s=10), now=20)
        last = await store.tick(Job("m1", "running|100", renew=[renewed.leased[0].id],
                                    renew_deadline=100, reap=True), now=50)
        assert last.reaped == [] and last.state == (1, 1, 0)  # renewed: not reaped at 50

    run(server, test)



def test_a_tick_sent_again_is_done_once_and_returns_its_leases(server: RedisServer) -> None:
    """Its reply was lost (the connection dropped after Redis ran it): sent
    again, it queues nothing more, and hands out the leases it took."""
    async def test(store: FrontierStore) -> None:
        job = Job("m1", "running|100", push=[entry(1, fp=False), entry(2, fp=False)], want=1)
        first = await store.tick(job, now=0)
        again = await store.tick(job, now=1)
        assert again.added == first.added == 2
        assert again.leased == first.leased and len(first.leased) == 1
        assert again.state == (1, 1, 0)
        # A new job is a new job.
        assert len((await store.tick(Job("m1", "running|100", want=5), now=2)).leased) == 1

    run(server, test)


def test_each_machine_holds_its_share_of_a_sites_places(server: RedisServer) -> None:
    """A site's CONCURRENT_REQUESTS_PER_DOMAIN is shared by the machines of
    the crawl: the machine whose download just ended cannot take every freed
    place again while another machine waits with room."""
    async def test(store: FrontierStore) -> None:
        await store.push([entry(n, slot="one|site", concurrency=4) for n in range(20)], now=0)
        alone = await store.tick(Job("m1", "running|100", want=10), now=0)
        assert len(alone.leased) == 4  # one machine in the crawl: every place
        await store.ack([item.id for item in alone.leased], now=0)
        await store.tick(Job("m2", "running|100"), now=0)  # a second machine joins
        first = await store.tick(Job("m1", "running|100", want=10), now=1)
        second = await store.tick(Job("m2", "running|100", want=10), now=1)
        assert (len(first.leased), len(second.leased)) == (2, 2)
        # m1's download ends: its place is free, and m1 may take it again,
        # but no more than its share.
        again = await store.tick(Job("m1", "running|100", release=[first.leased[0].id],
                                     want=10), now=2)
        assert len(again.leased) == 1
        # A late machine's places come back with its leases (the slot's name
        # holds a |, which the frontier's bookkeeping must not split).
        late = await store.tick(Job("m1", "running|100", reap=True, want=0), now=100)
        assert len(late.reaped) == 5
        assert await store.redis.hgetall(f"{store.prefix}:held") == {}
        assert await store.redis.hget(f"{store.prefix}:inflight", "one|site") == b"0"

    run(server, test)


ops = st.lists(st.one_of(
    st.tuples(st.just("push"), st.integers(0, 30), st.sampled_from("abc"), st.integers(-3, 3)),
    st.tuples(st.just("lease"), st.integers(1, 5)),
    st.tuples(st.just("release"), st.integers(0, 40)),
    st.tuples(st.just("ack"), st.integers(0, 40)),
    st.tuples(st.just("reap"), st.integers(0, 40)),
), max_size=60)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(ops)
def test_any_sequence_keeps_the_books(server: RedisServer, sequence: list[Any]) -> None:
    """Whatever machines do, in any order: a slot never has more than its
    concurrency out, the counts match the keys, and each request pushed once
    is handled exactly once when every lease is finally acknowledged."""
    limits = {"a": 1, "b": 2, "c": 3}

    async def test(store: FrontierStore) -> None:
        pushed: set[bytes] = set()
        out: dict[bytes, tuple[str, bool, float]] = {}  # id -> slot, released, leased at
        handled: list[bytes] = []
        now = 0.0
        for op in sequence:
            now += 1
            if op[0] == "push":
                _, n, slot, priority = op
                e = Entry(f"fp{n}".encode(), slot, limits[slot], 0.0, priority,
                          f"{slot}{n}".encode())
                if await store.push([e], now) == 1:
                    assert e.blob not in pushed
                    pushed.add(e.blob)
            elif op[0] == "lease":
                for item in await store.lease("m", op[1], 10, now):
                    assert item.id not in out
                    out[item.id] = (item.blob.decode()[0], False, now)
            elif op[0] in ("release", "ack") and out:
                lease_id = sorted(out)[op[1] % len(out)]
                slot, _, at = out[lease_id]
                if op[0] == "release":
                    await store.release([lease_id], now)
                    out[lease_id] = (slot, True, at)
                else:
                    assert await store.ack([lease_id], now) == 1
                    handled.append(lease_id)
                    del out[lease_id]
            elif op[0] == "reap":
                for lease_id in await store.reap(now - 10 + op[1] % 3):
                    del out[lease_id]
            for slot, limit in limits.items():
                busy = sum(1 for s, released, _ in out.values() if s == slot and not released)
                assert busy <= limit
            _, leases = await store.counts()
            assert leases == len(out)
        # Drain: everything pushed is handled once.
        while True:
            now += 100
            await store.ack(list(out), now)
            handled.extend(out)
            out.clear()
            leased = await store.lease("m", 100, 10, now)
            if not leased:
                break
            out.update({item.id: ("", False, now) for item in leased})
        assert await store.counts() == (0, 0)
        assert len(handled) == len(set(handled)) == len(pushed)

    run(server, test)


async def assert_places(store: FrontierStore, limits: dict[str, int],
                        out: dict[bytes, tuple[str, str, bool]]) -> None:
    """The leases *out* (id -> slot, machine, released) are what the
    frontier counts, and no slot has more than its limit out."""
    for slot, limit in limits.items():
        busy = [m for s, m, released in out.values() if s == slot and not released]
        assert len(busy) <= limit
        inflight = await store.redis.hget(f"{store.prefix}:inflight", slot)
        assert int(inflight or 0) == len(busy)
        for machine in ("m1", "m2", "m3"):
            held = await store.redis.hget(f"{store.prefix}:held", f"{machine}|{slot}")
            assert int(held or 0) == busy.count(machine)
    _, leases = await store.counts()
    assert leases == len(out)


machine_ops = st.lists(st.one_of(
    st.tuples(st.just("push"), st.integers(0, 30), st.sampled_from("abc"), st.integers(-3, 3)),
    st.tuples(st.just("tick"), st.sampled_from(["m1", "m2", "m3"]), st.integers(0, 6)),
    st.tuples(st.just("release"), st.integers(0, 40)),
    st.tuples(st.just("ack"), st.integers(0, 40)),
    st.tuples(st.just("leave"), st.sampled_from(["m1", "m2", "m3"])),
    st.tuples(st.just("wait"), st.integers(1, 30)),
), max_size=60)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(machine_ops)
def test_machines_joining_leaving_and_dying_keep_each_sites_limit(
        server: RedisServer, sequence: list[Any]) -> None:
    """Machines lease in ticks, join, leave and die (their state runs out,
    their leases are reaped): a slot never has more than its concurrency
    out, the crawl's and the machines' counts of places match the leases
    out, and every request is handled once when all is acknowledged."""
    limits = {"a": 1, "b": 2, "c": 5}

    async def test(store: FrontierStore) -> None:
        p = store.prefix
        pushed: set[bytes] = set()
        out: dict[bytes, tuple[str, str, bool]] = {}  # id -> slot, machine, released
        handled: list[bytes] = []
        now = 0.0
        for op in sequence:
            now += 1
            if op[0] == "push":
                _, n, slot, priority = op
                e = Entry(f"fp{n}".encode(), slot, limits[slot], 0.0, priority,
                          f"{slot}{n}".encode())
                if await store.push([e], now) == 1:
                    pushed.add(e.blob)
            elif op[0] == "tick":
                _, machine, want = op
                result = await store.tick(Job(machine, f"running|{now + 10}", reap=True,
                                              want=want, visibility_s=10), now)
                for lease_id in result.reaped:
                    del out[lease_id]
                for item in result.leased:
                    assert item.id not in out
                    out[item.id] = (item.blob.decode()[0], machine, False)
            elif op[0] in ("release", "ack") and out:
                lease_id = sorted(out)[op[1] % len(out)]
                slot, machine, _ = out[lease_id]
                if op[0] == "release":
                    await store.release([lease_id], now)
                    out[lease_id] = (slot, machine, True)
                else:
                    assert await store.ack([lease_id], now) == 1
                    handled.append(lease_id)
                    del out[lease_id]
            elif op[0] == "leave":
                await store.redis.hdel(f"{p}:machines", op[1])
            elif op[0] == "wait":
                now += op[1]
            await assert_places(store, limits, out)
        while True:
            now += 100
            await store.ack(list(out), now)
            handled.extend(out)
            out.clear()
            result = await store.tick(Job("m1", f"running|{now + 10}", want=100,
                                          visibility_s=10), now)
            if not result.leased:
                break
            out.update({item.id: ("", "m1", False) for item in result.leased})
        assert await store.counts() == (0, 0)
        assert len(handled) == len(set(handled)) == len(pushed)

    run(server, test)
