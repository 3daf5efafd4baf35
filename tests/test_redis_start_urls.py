"""Start URLs pushed to Redis, scrapy-redis's way (``redis-cli lpush
myspider:start_urls https://...``), taken by the machines of a crawl with a
frontier on Redis (SPEEDUP_FRONTIER_URL): each entry exactly once, never
lost when a machine dies, bad entries refused one by one."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import redis as redis_client
import scrapy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from scrapy_speedup.exceptions import SpeedupSettingsError
from scrapy_speedup.redis_frontier.start_urls import FIELDS, BadStartUrlError, requests_from_entry
from scrapy_speedup.redis_frontier.store import START_MARK, FrontierStore
from tests.conftest import Crawl, CrawlResult, start_capacity_site
from tests.inprocess import crawl, inprocess, listening, make_crawler, reactor
from tests.redis_server import RedisServer, redis_server
from tests.test_redis_store import run

_crawls = itertools.count()
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=6,
)
_SCHEDULER_LOG = "scrapy_speedup.redis_frontier.scheduler"


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
def client(redis: RedisServer) -> Iterator[redis_client.Redis]:
    connection = redis_client.Redis.from_url(redis.url)
    try:
        yield connection
    finally:
        connection.close()


def crawl_name() -> str:
    return f"starts{next(_crawls)}"


class Pages(Resource):
    """Any path: a page whose title is the path; ``/hold`` answers only when
    :attr:`release` fires (a crawl that is still busy, on cue)."""

    isLeaf = True  # noqa: N815 - Twisted's name

    def __init__(self) -> None:
        super().__init__()
        self.held = defer.Deferred()
        self.release = defer.Deferred()
        self.bodies: dict[str, bytes] = {}

    def render_GET(self, request: Any) -> Any:  # noqa: N802 - Twisted's name
        path = request.path.decode()
        if path == "/hold":
            self.held.callback(None)
            self.release.addCallback(lambda _: (request.write(self._page(path)),
                                                request.finish()))
            return NOT_DONE_YET
        return self._page(path)

    def render_POST(self, request: Any) -> bytes:  # noqa: N802 - Twisted's name
        self.bodies[request.path.decode()] = request.content.read()
        return self._page(request.path.decode())

    @staticmethod
    def _page(path: str) -> bytes:
        return f"<html><title>{path}</title><body>{path}</body></html>".encode()


class StartsSpider(scrapy.Spider):
    """No start requests but ``start_path`` (if given): the rest comes from Redis."""

    name = "starts"

    def __init__(self, url: str = "", start_path: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.url, self.start_path = url, start_path

    async def start(self) -> Any:
        if self.start_path:
            yield scrapy.Request(self.url + self.start_path)

    def parse(self, response: Any) -> Any:
        yield {"path": urlparse(response.url).path, "tag": response.meta.get("tag"),
               "priority": response.request.priority, "callback": "parse",
               "method": response.request.method}

    def parse_other(self, response: Any) -> Any:
        yield {"path": urlparse(response.url).path, "tag": response.meta.get("tag"),
               "priority": response.request.priority, "callback": "parse_other",
               "method": response.request.method}


def frontier(redis: RedisServer, name: str, **more: Any) -> dict[str, Any]:
    return {"SPEEDUP_FRONTIER_URL": redis.url, "SPEEDUP_FRONTIER_NAME": name, **more}


def paths(items: list[dict[str, Any]]) -> Counter:
    return Counter(item["path"] for item in items)


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == _SCHEDULER_LOG and record.levelno >= logging.ERROR]


# -- one machine, in this process --------------------------------------------------------


@inprocess
async def test_urls_pushed_to_a_list_before_the_crawl_are_crawled(
        redis: RedisServer, client: redis_client.Redis) -> None:
    """``redis-cli lpush <crawl>:start_urls URL``, as for scrapy-redis: a plain
    spider crawls them; a URL pushed twice is crawled once (the frontier's
    dupefilter); the key is emptied, and the finished crawl leaves no key."""
    name = crawl_name()
    with listening(Pages()) as url:
        client.lpush(f"{name}:start_urls", *[f"{url}/a/{n}" for n in range(30)],
                     f"  {url}/a/0\n", f"{url}/a/1")
        run = await crawl(StartsSpider, frontier(redis, name))
    assert run.finish_reason == "finished"
    assert paths(run.items) == Counter({f"/a/{n}": 1 for n in range(30)})
    assert run.stat("speedup/frontier/start_url_count") == 32
    assert run.stat("speedup/frontier/start_url_error_count") == 0
    assert run.stat("dupefilter/filtered") == 2
    assert client.keys(f"{name}:*") == []


@inprocess
async def test_urls_in_a_set_or_a_sorted_set_are_crawled(
        redis: RedisServer, client: redis_client.Redis) -> None:
    """scrapy-redis's REDIS_START_URLS_AS_SET (and _AS_ZSET): the key's type
    says how to read it; no setting needed."""
    for kind in ("set", "zset"):
        name = crawl_name()
        with listening(Pages()) as url:
            urls = [f"{url}/{kind}/{n}" for n in range(20)]
            if kind == "set":
                client.sadd(f"{name}:start_urls", *urls)
            else:
                client.zadd(f"{name}:start_urls", {u: n for n, u in enumerate(urls)})
            run = await crawl(StartsSpider, frontier(redis, name))
        assert run.finish_reason == "finished", kind
        assert paths(run.items) == Counter({f"/{kind}/{n}": 1 for n in range(20)}), kind
        assert client.exists(f"{name}:start_urls") == 0


@inprocess
async def test_json_entries_carry_meta_priority_callback_method_and_body(
        redis: RedisServer, client: redis_client.Redis) -> None:
    name = crawl_name()
    pages = Pages()
    with listening(pages) as url:
        client.rpush(f"{name}:start_urls", *[json.dumps(entry) for entry in [
            {"url": f"{url}/j/1", "meta": {"tag": "one"}, "priority": 7},
            {"url": f"{url}/j/2", "callback": "parse_other", "meta": {"tag": "two"}},
            {"url": f"{url}/j/3", "method": "POST", "body": "a=1",
             "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
            {"url": f"{url}/j/4", "formdata": {"q": "scrapy"}, "method": "POST"},
            # Far past what the frontier orders (+-4095): kept on the request,
            # ordered as the highest.
            {"url": f"{url}/j/5", "priority": 100000},
            {"url": f"{url}/j/1", "dont_filter": True, "meta": {"tag": "again"}},
        ]])
        run = await crawl(StartsSpider, frontier(redis, name))
    assert run.finish_reason == "finished"
    got = sorted((item["path"], item["tag"], item["priority"], item["callback"],
                  item["method"]) for item in run.items)
    assert got == [
        ("/j/1", "again", 0, "parse", "GET"),
        ("/j/1", "one", 7, "parse", "GET"),
        ("/j/2", "two", 0, "parse_other", "GET"),
        ("/j/3", None, 0, "parse", "POST"),
        ("/j/4", None, 0, "parse", "POST"),
        ("/j/5", None, 100000, "parse", "GET"),
    ]
    assert pages.bodies == {"/j/3": b"a=1", "/j/4": b"q=scrapy"}
    assert run.stat("speedup/frontier/priority_clamped_count") == 1


BAD_ENTRIES = [
    (b"{not json", "not valid JSON"),
    (b'{"meta": {"tag": 1}}', 'no "url" field'),
    (b'{"url": 5}', '"url" must be a string'),
    (b'["http://a.example/"]', "not a URL or a JSON object"),
    (b'"http://a.example/"', "not a URL or a JSON object"),
    (b"relative/path", "Missing scheme"),
    (b"\xff\xfehttp://a.example/", "not UTF-8"),
    (b"", "refused: empty"),
    (b'{"url": "http://a.example/", "callback": "no_such_method"}',
     '"callback" (\'no_such_method\') is not a method of the spider'),
    (b'{"url": "http://a.example/", "callback": "name"}',
     '"callback" (\'name\') is not a method of the spider'),
    (b'{"url": "http://a.example/", "priority": "high"}', '"priority" must be an integer'),
    (b'{"url": "http://a.example/", "meta": [1]}', '"meta" must be a JSON object'),
    (b'{"url": "http://a.example/", "colour": "red"}', 'unknown field "colour"'),
    # Hostile ones: each once stopped the crawl, or would have sent it garbage.
    (b"[" * 100_000, "not valid JSON"),
    (b"http://a.example/" + b"x" * 5000, "past URLLENGTH_LIMIT (2083)"),
    (b'{"url": "http://a.example/", "method": "GET\\r\\nX-Injected: 1"}',
     "is not an HTTP method"),
    (b'{"url": "http://a.example/", "headers": {"X-A": "1\\r\\nX-Injected: 1"}}',
     "has a line break in it"),
    (b'{"url": "http://a.example/", "body": "a=1", "formdata": {"a": "1"}}',
     'both "body" and "formdata"'),
    (b"http://a.example:99999/", "Port out of range"),
]


@inprocess
async def test_bad_entries_are_refused_one_by_one(
        redis: RedisServer, client: redis_client.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    """Each bad entry: one ERROR line that says what is wrong with it, and
    counted; the good entries around them are crawled and the crawl finishes."""
    name = crawl_name()
    with listening(Pages()) as url:
        good = [f"{url}/good/{n}".encode() for n in range(len(BAD_ENTRIES))]
        bad = [entry for entry, _ in BAD_ENTRIES]
        mixed = [entry for pair in zip(good, bad, strict=True) for entry in pair]
        client.rpush(f"{name}:start_urls", *mixed)
        with caplog.at_level(logging.INFO):
            run = await crawl(StartsSpider, frontier(redis, name))
    assert run.finish_reason == "finished"
    assert paths(run.items) == Counter({f"/good/{n}": 1 for n in range(len(BAD_ENTRIES))})
    assert run.stat("speedup/frontier/start_url_error_count") == len(BAD_ENTRIES)
    lines = errors(caplog)
    assert len(lines) == len(BAD_ENTRIES), lines
    for (_, reason), line in zip(BAD_ENTRIES, lines, strict=True):
        assert reason in line, (reason, line)
        assert f"{name}:start_urls" in line, line


@inprocess
async def test_an_entry_pushed_while_the_crawl_runs_is_crawled(
        redis: RedisServer, client: redis_client.Redis) -> None:
    """The crawl's own start request is held at the site until the test has
    pushed a start URL: the crawl takes it before it ends."""
    name = crawl_name()
    pages = Pages()
    with listening(pages) as url:

        def push(_: object) -> None:
            client.lpush(f"{name}:start_urls", f"{url}/late")
            pages.release.callback(None)

        pages.held.addCallback(push)
        run = await crawl(StartsSpider, frontier(redis, name), url=url, start_path="/hold")
    assert run.finish_reason == "finished"
    assert paths(run.items) == Counter({"/hold": 1, "/late": 1})


@inprocess
async def test_a_crawl_told_to_wait_takes_urls_pushed_while_it_is_idle(
        redis: RedisServer, client: redis_client.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    """SPEEDUP_FRONTIER_WAIT_FOR_START_URLS_SECONDS: with nothing to do, the
    crawl waits for start URLs (scrapy-redis's RedisSpider waits for ever);
    a URL pushed then is crawled, and the crawl ends once idle that long."""
    name = crawl_name()
    pushed = asyncio.get_running_loop().create_future()

    def watch(crawler: Any) -> None:
        def look() -> None:
            if any("waiting for start URLs" in r.getMessage() for r in caplog.records):
                client.lpush(f"{name}:start_urls", f"{url}/waited")
                pushed.set_result(time.monotonic())
            else:
                reactor.callLater(0.05, look)

        look()

    with listening(Pages()) as url, caplog.at_level(logging.INFO):
        run = await crawl(StartsSpider, frontier(redis, name,
                                                 SPEEDUP_FRONTIER_WAIT_FOR_START_URLS_SECONDS=2),
                          during=watch)
    assert pushed.done()
    assert run.finish_reason == "finished"
    assert paths(run.items) == Counter({"/waited": 1})


@inprocess
async def test_a_start_urls_key_of_another_type_is_reported_not_read(
        redis: RedisServer, client: redis_client.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    """A hash (or a string) at the key: one ERROR line that names the key
    and its type; the crawl runs its own start requests and finishes."""
    for kind in ("hash", "string"):
        name = crawl_name()
        key = f"{name}:start_urls"
        if kind == "hash":
            client.hset(key, "url", "http://a.example/")
        else:
            client.set(key, "http://a.example/")
        caplog.clear()
        with listening(Pages()) as url, caplog.at_level(logging.INFO):
            run = await crawl(StartsSpider, frontier(redis, name), url=url, start_path="/own")
        assert run.finish_reason == "finished", kind
        assert paths(run.items) == Counter({"/own": 1}), kind
        lines = errors(caplog)
        assert len(lines) == 1, lines
        assert key in lines[0] and f"is a {kind}" in lines[0], lines
        assert client.type(key).decode() == kind  # not ours: left alone
        client.delete(key)


@inprocess
async def test_a_start_urls_key_of_its_own_name(
        redis: RedisServer, client: redis_client.Redis) -> None:
    """SPEEDUP_FRONTIER_START_URLS_KEY, with scrapy-redis's %(name)s (the
    spider's name), as REDIS_START_URLS_KEY was."""
    name = crawl_name()
    key = f"feed:{name}:%(name)s"
    with listening(Pages()) as url:
        client.lpush(f"feed:{name}:starts", f"{url}/own-key")
        client.lpush(f"{name}:start_urls", f"{url}/default-key")
        run = await crawl(StartsSpider, frontier(redis, name,
                                                 SPEEDUP_FRONTIER_START_URLS_KEY=key))
    assert run.finish_reason == "finished"
    assert paths(run.items) == Counter({"/own-key": 1})
    assert client.llen(f"{name}:start_urls") == 1
    client.delete(f"{name}:start_urls")


def test_scrapy_redis_stats_collector_is_refused(redis: RedisServer) -> None:
    """Left over from scrapy-redis, its stats collector would write the hash
    where the machines keep the crawl's counts (and not as counts)."""
    with pytest.raises(SpeedupSettingsError, match=r"STATS_CLASS is 'scrapy_redis\.stats\."
                       r"RedisStatsCollector'.*remove it"):
        make_crawler(StartsSpider, frontier(
            redis, crawl_name(), STATS_CLASS="scrapy_redis.stats.RedisStatsCollector"))


def test_the_store_hands_each_entry_to_one_taker_and_back_if_unacknowledged(
        redis: RedisServer) -> None:
    """FrontierStore.take_start_urls against a real Redis, four takers at
    once: each of 400 entries leased by exactly one; the leases one taker
    never acknowledges (it died) come back after their deadline, whole."""
    entries = [f"http://a.example/{n}".encode() for n in range(400)]

    async def test(store: FrontierStore) -> None:
        key = f"{store.prefix}:start_urls"
        await store.redis.rpush(key, *entries)
        got: list[list[bytes]] = [[] for _ in range(4)]
        # Taker 0 leases first: on a loaded machine (make test, two at a
        # time) the others could take everything before it ran once.
        first_leased = asyncio.Event()

        async def taker(i: int) -> None:
            mine = FrontierStore(store.redis, store.prefix)
            if i:
                await first_leased.wait()
            while True:
                starts = await mine.take_start_urls(key, 7, now=0)
                leased = await mine.lease(f"m{i}", 7, 30, now=0)
                assert all(item.blob.startswith(START_MARK) for item in leased)
                got[i] += [item.blob[len(START_MARK):] for item in leased]
                first_leased.set()
                if i:  # taker 0 "dies": it never acknowledges
                    await mine.ack([item.id for item in leased], now=0)
                if not leased and starts.left == 0:
                    return

        await asyncio.gather(*(taker(i) for i in range(4)))
        assert sorted(data for each in got for data in each) == sorted(entries)  # each once
        # The dying taker and others at once (which of the others, and how
        # many, is the scheduler's: one of them took none under make test).
        assert got[0] and any(got[1:]), [len(each) for each in got]
        assert await store.redis.exists(key) == 0
        assert await store.reap(now=29) == []
        assert len(await store.reap(now=31)) == len(got[0])
        again = await store.lease("m1", 1000, 30, now=31)
        assert sorted(item.blob[len(START_MARK):] for item in again) == sorted(got[0])

    run(redis, test)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    st.dictionaries(st.sampled_from([*FIELDS, "other"]), JSON_VALUES, max_size=6).map(
        lambda fields: json.dumps(fields).encode()),
    st.fixed_dictionaries({"url": st.sampled_from(["http://a.example/", "https://b.example/x?q=1",
                                                   "ftp://c", "//d", "http://[::1]/"])},
                          optional={name: JSON_VALUES for name in FIELDS if name != "url"}).map(
        lambda fields: json.dumps(fields).encode()),
))
def test_any_entry_is_a_request_or_refused_with_a_reason(data: bytes) -> None:
    """Whatever the tooling pushed: requests, or BadStartUrlError, never
    another exception (which would stop the machine's job)."""
    try:
        requests = requests_from_entry(data, StartsSpider(), 2083)
    except BadStartUrlError as exc:
        assert str(exc)
    else:
        assert all(isinstance(request, scrapy.Request) for request in requests)


@inprocess
async def test_a_big_key_and_big_entries(redis: RedisServer, client: redis_client.Redis) -> None:
    """1,000 start URLs in one list, and an entry with a 2 MB body: all
    crawled, the key emptied as machines have room, not at once."""
    name = crawl_name()
    pages = Pages()
    body = "b" * 2_000_000
    with listening(pages) as url:
        client.rpush(f"{name}:start_urls", *[f"{url}/big/{n}" for n in range(1000)],
                     json.dumps({"url": f"{url}/body", "method": "POST", "body": body}))
        lengths: list[int] = []

        def watch(crawler: Any) -> None:
            def look() -> None:
                lengths.append(client.llen(f"{name}:start_urls"))
                if lengths[-1]:
                    reactor.callLater(0.1, look)

            look()

        run = await crawl(StartsSpider, frontier(redis, name, CONCURRENT_REQUESTS=16),
                          timeout=120, during=watch)
    assert run.finish_reason == "finished"
    assert paths(run.items) == Counter({**{f"/big/{n}": 1 for n in range(1000)}, "/body": 1})
    assert pages.bodies["/body"] == body.encode()
    # Taken a few batches at a time: the key is what is left to take (seen
    # at 3 lengths between full and empty under make test's load, more alone).
    assert len({n for n in lengths if 0 < n < 1001}) >= 2, lengths


# -- machines: `scrapy crawl` processes ------------------------------------------------------


def machine(folder: Path, redis: RedisServer, name: str, *, spider: str = "redis_start",
            args: dict[str, Any] | None = None, **settings: Any) -> Crawl:
    folder.mkdir()
    return Crawl(folder, spider=spider, settings={
        "SPEEDUP_FRONTIER_URL": redis.url, "SPEEDUP_FRONTIER_NAME": name,
        "CONCURRENT_REQUESTS": 4, **settings}, args=args)


def crawled(results: list[CrawlResult]) -> Counter:
    return Counter(urlparse(item["url"]).path for result in results for item in result.items)


def test_two_machines_take_each_entry_exactly_once(tmp_path: Path, redis: RedisServer,
                                                   client: redis_client.Redis) -> None:
    """Both machines join and wait; 200 start URLs are pushed; each is crawled
    by exactly one machine, and both take part."""
    name = crawl_name()
    with start_capacity_site(capacity=1000, latency_ms=20) as site:
        crawls = [machine(tmp_path / f"m{i}", redis, name,
                          SPEEDUP_FRONTIER_WAIT_FOR_START_URLS_SECONDS=3) for i in range(2)]
        for each in crawls:
            each.wait_for_log("joined crawl", timeout=60)
        client.rpush(f"{name}:start_urls", *[f"{site.url}/page/{n}" for n in range(200)])
        results = [each.result(120) for each in crawls]
    for result in results:
        assert result.returncode == 0, result.log[-4000:]
        assert result.stats["finish_reason"] == "finished"
    assert crawled(results) == Counter({f"/page/{n}": 1 for n in range(200)})
    assert all(result.items for result in results), [len(r.items) for r in results]
    assert sum(r.stat("speedup/frontier/start_url_count") for r in results) == 200


def test_a_machine_killed_after_taking_start_urls_loses_none(
        tmp_path: Path, redis: RedisServer, client: redis_client.Redis) -> None:
    """The first machine takes a batch of start URLs and is killed (SIGKILL)
    while it turns them into requests, before it sent any: a second machine
    crawls every one of them once their lease runs out."""
    name = crawl_name()
    hang_file = tmp_path / "hanging"
    with start_capacity_site(capacity=1000, latency_ms=5) as site:
        client.rpush(f"{name}:start_urls", *[f"{site.url}|{n}" for n in range(40)])
        victim = machine(tmp_path / "victim", redis, name, spider="redis_hook",
                         args={"hang_at": "5", "hang_file": hang_file},
                         SPEEDUP_FRONTIER_VISIBILITY_TIMEOUT_SECONDS=2)
        deadline = time.monotonic() + 60
        while not hang_file.exists():
            assert victim.process.poll() is None, victim.log_file.read_text()[-3000:]
            assert time.monotonic() < deadline, victim.log_file.read_text()[-3000:]
            time.sleep(0.05)
        assert client.llen(f"{name}:start_urls") < 40  # taken from the key...
        victim.interrupt(signal.SIGKILL)
        killed = victim.result(30)
        assert killed.returncode == -signal.SIGKILL
        # ...and sent nothing: the machine hung in the first batch.
        assert killed.items == []
        survivor = machine(tmp_path / "survivor", redis, name, spider="redis_hook",
                           SPEEDUP_FRONTIER_VISIBILITY_TIMEOUT_SECONDS=2)
        result = survivor.result(120)
    assert result.returncode == 0, result.log[-4000:]
    assert result.stats["finish_reason"] == "finished"
    assert crawled([result]) == Counter({f"/page/{n}": 1 for n in range(40)})
    assert result.stat("speedup/frontier/lease_expired_count") >= 1
    assert {item["tag"] for item in result.items} == {str(n) for n in range(40)}


def test_ctrl_c_stops_a_crawl_that_waits_for_ever(tmp_path: Path, redis: RedisServer,
                                                  client: redis_client.Redis) -> None:
    """SPEEDUP_FRONTIER_WAIT_FOR_START_URLS_SECONDS = "forever", scrapy-redis's
    default: the machine crawls what is pushed, waits, and stops at Ctrl-C."""
    name = crawl_name()
    with start_capacity_site(capacity=1000, latency_ms=5) as site:
        each = machine(tmp_path / "m", redis, name,
                       SPEEDUP_FRONTIER_WAIT_FOR_START_URLS_SECONDS="forever")
        each.wait_for_log("waiting for start URLs", timeout=60)
        client.lpush(f"{name}:start_urls", f"{site.url}/page/1")
        deadline = time.monotonic() + 30
        while not (each.items_file.exists() and each.items_file.read_text().strip()):
            assert time.monotonic() < deadline, each.log_file.read_text()[-3000:]
            time.sleep(0.05)
        each.wait_for_log("waiting for start URLs.*\n.*waiting for start URLs", timeout=30)
        each.interrupt(signal.SIGINT)
        stopped = time.monotonic()
        result = each.result(30)
        took = time.monotonic() - stopped
    assert result.returncode == 0, result.log[-4000:]
    assert result.stats["finish_reason"] == "shutdown"
    assert crawled([result]) == Counter({"/page/1": 1})
    assert took < 20, took


def test_redis_down_when_the_crawl_starts(tmp_path: Path) -> None:
    """The start URLs are in Redis, which is down when the machine starts: it
    waits for Redis, then crawls them."""
    name = crawl_name()
    with redis_server() as server:
        connection = redis_client.Redis.from_url(server.url)
        with start_capacity_site(capacity=1000, latency_ms=5) as site:
            connection.rpush(f"{name}:start_urls", *[f"{site.url}/page/{n}" for n in range(10)])
            connection.close()
            server.stop()  # appendonly: the URLs are kept
            each = machine(tmp_path / "m", server, name)
            each.wait_for_log("frontier on Redis at", timeout=60)
            # Redis is back a moment after the machine began to look for it (the
            # test holds either way: the machine waits for Redis, or finds it).
            time.sleep(0.5)
            server.start()
            result = each.result(120)
    assert result.returncode == 0, result.log[-4000:]
    assert result.stats["finish_reason"] == "finished"
    assert crawled([result]) == Counter({f"/page/{n}": 1 for n in range(10)})
