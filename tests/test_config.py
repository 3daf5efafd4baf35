"""Settings: defaults, command-line strings, and every bad value a clear error."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scrapy.settings import Settings

from scrapy_speedup.config import SpeedupConfig, SpeedupSettingsError

REPO = Path(__file__).parent.parent
SETTING_NAMES = sorted(set(re.findall(
    r'"(SPEEDUP_[A-Z_]+)"', (REPO / "scrapy_speedup" / "config.py").read_text()
)))


def config(**values: object) -> SpeedupConfig:
    return SpeedupConfig.from_settings(Settings(values))


def test_defaults() -> None:
    c = config()
    assert c.enabled and c.process_enabled
    assert c.process_workers >= 1
    assert c.process_max_in_flight == 4 * c.process_workers
    assert c.process_start_method == "forkserver"
    assert c.process_retry_times == 1
    assert c.process_timeout_seconds is None
    assert c.process_max_tasks_per_child is None
    assert c.process_pipelines == ()
    assert c.doctor_enabled and c.lag_warn_ms == 100
    assert (c.db_batch_size, c.db_commit_interval_seconds) == (100, 1.0)
    assert c.thread_max_stuck == c.thread_workers == 32


def test_browser_settings() -> None:
    c = config()
    assert not c.browser_router_enabled and not c.browser_enabled
    assert c.browser_blocked_resource_types == ("image", "media", "font")
    assert (c.browser_samples, c.browser_recheck_share) == (2, 0.01)
    assert c.browser_context_max_pages == 100 and c.browser_timeout_seconds == 30
    assert config(SPEEDUP_BROWSER_ROUTER_ENABLED="true").browser_enabled  # the router needs it
    c = config(SPEEDUP_BROWSER_BLOCKED_RESOURCE_TYPES="Image, font,image",
               SPEEDUP_BROWSER_CHECK="div.price", SPEEDUP_BROWSER_RECHECK_SHARE="0")
    assert c.browser_blocked_resource_types == ("image", "font")
    assert c.browser_check == "div.price"  # a selector: "div" does not import
    assert c.browser_recheck_share == 0
    assert config(SPEEDUP_BROWSER_BLOCKED_RESOURCE_TYPES="").browser_blocked_resource_types \
        == ("image", "media", "font")  # -s NAME= : the default, as for every setting
    assert config(SPEEDUP_BROWSER_BLOCKED_RESOURCE_TYPES=[]).browser_blocked_resource_types == ()
    assert config(SPEEDUP_BROWSER_CHECK="os.path.exists").browser_check is os.path.exists


def test_values_from_command_line_strings() -> None:
    c = config(
        SPEEDUP_PROCESS_WORKERS="3",
        SPEEDUP_PROCESS_TIMEOUT_SECONDS="2.5",
        SPEEDUP_PROCESS_PIPELINES="a.B,c.D",
        SPEEDUP_PROCESS_ENABLED="False",
        SPEEDUP_PROCESS_START_METHOD=" Spawn ",
        SPEEDUP_DB_BATCH_SIZE="7",
        SPEEDUP_POSTGRES_TABLE="archive.items",
    )
    assert c.process_workers == 3 and c.process_max_in_flight == 12
    assert c.process_timeout_seconds == 2.5
    assert c.process_pipelines == ("a.B", "c.D")
    assert not c.process_enabled
    assert c.process_start_method == "spawn"
    assert c.db_batch_size == 7
    assert c.postgres_table == "archive.items"
    assert config(SPEEDUP_PROCESS_PIPELINES='["a.B"]').process_pipelines == ("a.B",)
    assert config(SPEEDUP_PROCESS_PIPELINES="[]").process_pipelines == ()
    assert config(SPEEDUP_PROCESS_WORKERS=2.0).process_workers == 2
    # Scrapy's own settings are Scrapy's to check: 0 per domain is valid
    # with a per-IP limit, and the adaptive ceiling then follows the latter.
    c = config(CONCURRENT_REQUESTS_PER_DOMAIN=0, CONCURRENT_REQUESTS_PER_IP=4)
    assert c.adaptive_max_concurrency == 4
    # An empty value on the command line (-s NAME=) means the default.
    assert config(SPEEDUP_PROCESS_TIMEOUT_SECONDS="").process_timeout_seconds is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"SPEEDUP_PROCESS_WORKERS": 0}, r"SPEEDUP_PROCESS_WORKERS \(0\) must be 1 or more"),
        ({"SPEEDUP_PROCESS_WORKERS": "eight"}, r"WORKERS \('eight'\) must be an integer"),
        ({"SPEEDUP_PROCESS_WORKERS": True}, r"SPEEDUP_PROCESS_WORKERS \(True\) must be an integer"),
        ({"SPEEDUP_PROCESS_WORKERS": 1.9}, r"SPEEDUP_PROCESS_WORKERS \(1.9\) must be an integer"),
        ({"SPEEDUP_PROCESS_WORKERS": [5]}, r"SPEEDUP_PROCESS_WORKERS \(\[5\]\) must be an integer"),
        ({"SPEEDUP_PROCESS_RETRY_TIMES": -1}, r"RETRY_TIMES \(-1\) must be 0 or more"),
        ({"SPEEDUP_PROCESS_TIMEOUT_SECONDS": 0}, r"TIMEOUT_SECONDS \(0\) must be more than 0"),
        ({"SPEEDUP_PROCESS_TIMEOUT_SECONDS": "nan"}, r"TIMEOUT_SECONDS \('nan'\) .* finite"),
        ({"SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS": math.inf}, r"SHUTDOWN_TIMEOUT_SECONDS .* finite"),
        ({"SPEEDUP_PROCESS_START_METHOD": "fork"}, r"must be 'forkserver' or 'spawn'.*deadlock"),
        ({"SPEEDUP_PROCESS_START_METHOD": "threads"}, r"\('threads'\) must be 'forkserver' or"
                                                      r" 'spawn'$"),
        ({"SPEEDUP_PROCESS_PIPELINES": [1]}, r"import paths as strings, got 1"),
        ({"SPEEDUP_PROCESS_PIPELINES": "a.B,a.B"}, r"SPEEDUP_PROCESS_PIPELINES lists a.B more"
                                                   r" than once"),
        ({"SPEEDUP_PROCESS_PIPELINES": 5}, r"SPEEDUP_PROCESS_PIPELINES \(5\) must be a list"),
        ({"SPEEDUP_LAG_WARN_MS": 0}, r"SPEEDUP_LAG_WARN_MS \(0\) must be at least 10"),
        ({"SPEEDUP_LAG_WARN_MS": 0.01}, r"SPEEDUP_LAG_WARN_MS \(0.01\) must be at least 10"),
        ({"SPEEDUP_PROCESS_MAX_IN_FLIGHT": 10**20},
         r"SPEEDUP_PROCESS_MAX_IN_FLIGHT \(100000000000000000000\) must be at most 100000"),
        ({"SPEEDUP_LAG_WARN_MS": "soon"}, r"SPEEDUP_LAG_WARN_MS \('soon'\) must be a number"),
        ({"SPEEDUP_DB_BATCH_SIZE": 0}, r"SPEEDUP_DB_BATCH_SIZE \(0\) must be 1 or more"),
        ({"SPEEDUP_DB_COMMIT_INTERVAL_SECONDS": 0}, r"INTERVAL_SECONDS \(0\) must be more than 0"),
        ({"SPEEDUP_ENABLED": "maybe"}, r"SPEEDUP_ENABLED \('maybe'\) must be True or False"),
        ({"SPEEDUP_SQLITE_TABLE": "items; DROP"}, r"must be a plain table name"),
        ({"SPEEDUP_POSTGRES_TABLE": "shop.items\n"}, r"must be a plain table name"),
        ({"SPEEDUP_ADAPTIVE_MIN_CONCURRENCY": 5, "SPEEDUP_ADAPTIVE_MAX_CONCURRENCY": 4},
         r"SPEEDUP_ADAPTIVE_MAX_CONCURRENCY \(4\) must be at least"),
        ({"SPEEDUP_PROCESS_WORKERS": 10**10}, r"SPEEDUP_PROCESS_WORKERS .* must be at most 1024"),
        ({"SPEEDUP_SHUTDOWN_TIMEOUT_SECONDS": 1e10}, r"SHUTDOWN_TIMEOUT_SECONDS .* at most 604800"),
        ({"SPEEDUP_PROCESS_MAX_MESSAGE_MB": 1e-9}, r"MAX_MESSAGE_MB .* must be at least 1"),
        ({"SPEEDUP_CRAWL_PROCESSES": 0}, r"SPEEDUP_CRAWL_PROCESSES \(0\) must be 1 or more"),
        ({"SPEEDUP_CRAWL_PROCESSES": "many"}, r"SPEEDUP_CRAWL_PROCESSES .* an integer"),
        ({"SPEEDUP_CRAWL_PROCESSES": 1000}, r"SPEEDUP_CRAWL_PROCESSES \(1000\) must be at most"
                                            r" \d+ \(4 x the \d+ cores here\)"),
        ({"SPEEDUP_CRAWL_PIPELINES": "{not json"}, r"SPEEDUP_CRAWL_PIPELINES .* not valid JSON"),
        ({"SPEEDUP_CRAWL_PIPELINES": {"a.B": "x"}}, r"gives 'a.B' the order 'x'"),
        ({"SPEEDUP_CRAWL_PIPELINES": 5}, r"SPEEDUP_CRAWL_PIPELINES \(5\) must be a dict"),
        ({"SPEEDUP_BROWSER_CHECK": "div[[["}, r"SPEEDUP_BROWSER_CHECK \('div\[\[\['\) must be a CSS"
                                           r" selector or .*; as a selector: Expected"),
        ({"SPEEDUP_BROWSER_CHECK": "os.sep"}, r"SPEEDUP_BROWSER_CHECK .* os.sep is not callable"),
        ({"SPEEDUP_BROWSER_CHECK": 5}, r"SPEEDUP_BROWSER_CHECK \(5\) must be a CSS selector"),
        ({"SPEEDUP_BROWSER_BLOCKED_RESOURCE_TYPES": ["image", "document"]},
         r"SPEEDUP_BROWSER_BLOCKED_RESOURCE_TYPES .* must be a list of Playwright resource"
         r" types, from .*; not document"),
        ({"SPEEDUP_BROWSER_BLOCKED_RESOURCE_TYPES": "[image"}, r"RESOURCE_TYPES .* not valid JSON"),
        ({"SPEEDUP_BROWSER_BLOCKED_RESOURCE_TYPES": 3}, r"RESOURCE_TYPES \(3\) must be a list"),
        ({"SPEEDUP_BROWSER_RECHECK_SHARE": 1.5}, r"RECHECK_SHARE \(1.5\) must be at most 1"),
        ({"SPEEDUP_BROWSER_RECHECK_SHARE": -0.1}, r"RECHECK_SHARE \(-0.1\) must be 0 or more"),
        ({"SPEEDUP_BROWSER_SAMPLES": 0}, r"SPEEDUP_BROWSER_SAMPLES \(0\) must be 1 or more"),
        ({"SPEEDUP_BROWSER_CONTEXT_MAX_PAGES": "many"}, r"CONTEXT_MAX_PAGES .* an integer"),
        ({"SPEEDUP_BROWSER_TIMEOUT_SECONDS": 0}, r"BROWSER_TIMEOUT_SECONDS \(0\) must be more"),
        ({"SPEEDUP_BROWSER_MAX_PAGES": 0}, r"SPEEDUP_BROWSER_MAX_PAGES \(0\) must be 1 or more"),
        ({"SPEEDUP_BROWSER_ROUTER_ENABLED": "yes"}, r"ROUTER_ENABLED \('yes'\) must be True"),
        ({"SPEEDUP_BROWSER_EXECUTABLE": "/no/such/chromium"},
         r"SPEEDUP_BROWSER_EXECUTABLE \('/no/such/chromium'\) must be the path or the name on"
         r" PATH of a Chromium executable"),
    ],
)
def test_bad_values_are_named(values: dict[str, object], message: str) -> None:
    with pytest.raises(SpeedupSettingsError, match=message):
        config(**values)


def test_every_setting_is_documented() -> None:
    reference = (REPO / "docs" / "reference" / "settings.rst").read_text()
    readme = (REPO / "README.md").read_text()
    assert len(SETTING_NAMES) > 25
    for name in SETTING_NAMES:
        assert f".. setting:: {name}\n" in reference, name
        assert name in readme, name


junk = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["nan", "inf", "-1", "0", "1.9", "2", " 3 ", "True", "false", "[5]", "[]",
                     '["a.B"]', "a.B,c.D", "spawn", "FORKSERVER", "fork", "items", "1e400"]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                         max_size=2),
)


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(SETTING_NAMES), value=junk)
def test_any_value_is_taken_or_refused_by_name(name: str, value: object) -> None:
    """Every value of every setting is either taken, giving a usable config,
    or refused with a SpeedupSettingsError that names the setting."""
    try:
        c = config(**{name: value})
    except SpeedupSettingsError as exc:
        assert name in str(exc)
        return
    for field, got in vars(c).items():
        if isinstance(got, float):
            assert math.isfinite(got), (field, got)
            assert got >= 0, (field, got)
        if isinstance(got, int) and not isinstance(got, bool):
            assert got >= 0, (field, got)
    assert c.process_workers >= 1 and c.process_max_in_flight >= 1
    assert c.db_batch_size >= 1 and c.db_commit_interval_seconds > 0
    assert c.shutdown_timeout_seconds > 0 and c.lag_warn_ms > 0
    assert c.process_start_method in ("forkserver", "spawn")
    assert all(isinstance(p, str) and p for p in c.process_pipelines)


def test_crawl_processes_and_pipelines() -> None:
    assert config().crawl_processes == 1
    assert not config(SPEEDUP_CRAWL_PROCESSES=2).engine_index
    assert config(SPEEDUP_CRAWL_PROCESSES="auto").crawl_processes == len(os.sched_getaffinity(0))
    assert config(SPEEDUP_CRAWL_PROCESSES=2).coordinates
    assert not config(SPEEDUP_CRAWL_PROCESSES=2, _SPEEDUP_ENGINE_INDEX=0).coordinates
    assert config(SPEEDUP_CRAWL_PIPELINES="a.B, c.D").crawl_pipelines == {"a.B": 0, "c.D": 1}
    assert config(SPEEDUP_CRAWL_PIPELINES='{"a.B": 300, "c.D": null}').crawl_pipelines == \
        {"a.B": 300}


def test_dask_settings(tmp_path: Path) -> None:
    assert config().process_executor == "local" and config().dask is None
    local = config(SPEEDUP_PROCESS_EXECUTOR="dask",
                   SPEEDUP_DASK_SCHEDULER_ADDRESS="tcp://127.0.0.1:8786")
    assert local.process_executor == "dask"
    assert local.dask is not None and local.dask.address == "tcp://127.0.0.1:8786"
    assert local.dask.tls is None and local.dask.connect_timeout_seconds == 30
    for address in ("tcp://localhost:8786", "tcp://[::1]:8786", "tcp://127.3.2.1:1"):
        assert config(SPEEDUP_PROCESS_EXECUTOR="dask",
                      SPEEDUP_DASK_SCHEDULER_ADDRESS=address).dask is not None
    # Plain TCP to anything but this machine only when the user says so.
    remote = {"SPEEDUP_PROCESS_EXECUTOR": "dask",
              "SPEEDUP_DASK_SCHEDULER_ADDRESS": "tcp://dask.internal:8786"}
    with pytest.raises(SpeedupSettingsError, match="sends pickles in clear"):
        config(**remote)
    assert config(**remote, SPEEDUP_DASK_INSECURE_ALLOW_PLAIN_TCP="True").dask is not None
    files = []
    for name in ("ca", "cert", "key"):
        path = tmp_path / f"{name}.pem"
        path.write_text("x")
        files.append(str(path))
    tls = config(SPEEDUP_PROCESS_EXECUTOR="dask",
                 SPEEDUP_DASK_SCHEDULER_ADDRESS="tls://dask.internal:8786",
                 SPEEDUP_DASK_TLS_CA_FILE=files[0], SPEEDUP_DASK_TLS_CERT_FILE=files[1],
                 SPEEDUP_DASK_TLS_KEY_FILE=files[2])
    assert tls.dask is not None and tls.dask.tls == tuple(files)


@pytest.mark.parametrize(("values", "message"), [
    ({"SPEEDUP_PROCESS_EXECUTOR": "ray"}, r'must be "local" .* or "dask"'),
    ({"SPEEDUP_PROCESS_EXECUTOR": "dask"}, "set SPEEDUP_DASK_SCHEDULER_ADDRESS"),
    ({"SPEEDUP_PROCESS_EXECUTOR": "dask", "SPEEDUP_DASK_SCHEDULER_ADDRESS": "127.0.0.1:8786"},
     r'a "tls://host:port" or "tcp://host:port" address'),
    ({"SPEEDUP_PROCESS_EXECUTOR": "dask", "SPEEDUP_DASK_SCHEDULER_ADDRESS": "tcp://h:port"},
     r'a "tls://host:port"'),
    ({"SPEEDUP_PROCESS_EXECUTOR": "dask", "SPEEDUP_DASK_SCHEDULER_ADDRESS": "tls://h:8786"},
     "is a TLS address: set SPEEDUP_DASK_TLS_CA_FILE"),
    ({"SPEEDUP_PROCESS_EXECUTOR": "dask", "SPEEDUP_DASK_SCHEDULER_ADDRESS": "tls://h:8786",
      "SPEEDUP_DASK_TLS_CA_FILE": "/nonexistent/ca", "SPEEDUP_DASK_TLS_CERT_FILE": "/nonexistent/c",
      "SPEEDUP_DASK_TLS_KEY_FILE": "/nonexistent/k"}, "SPEEDUP_DASK_TLS_CA_FILE: no file at"),
    ({"SPEEDUP_PROCESS_EXECUTOR": "dask", "SPEEDUP_DASK_SCHEDULER_ADDRESS": "tcp://127.0.0.1:1",
      "SPEEDUP_DASK_TLS_CA_FILE": "/etc/hostname"}, "nothing would be encrypted"),
    ({"SPEEDUP_PROCESS_EXECUTOR": "dask", "SPEEDUP_DASK_SCHEDULER_ADDRESS": "tcp://10.0.0.5:1",
      "SPEEDUP_DASK_INSECURE_ALLOW_PLAIN_TCP": "maybe"}, "must be True or False"),
])
def test_bad_dask_settings_are_named(values: dict[str, object], message: str) -> None:
    with pytest.raises(SpeedupSettingsError, match=message):
        SpeedupConfig.from_settings(Settings(values))


def test_frontier_settings() -> None:
    assert config().frontier is None
    f = config(SPEEDUP_FRONTIER_URL="redis://:secret@10.0.0.5:6379/2").frontier
    assert f is not None and f.url == "redis://:secret@10.0.0.5:6379/2"
    assert f.name is None and f.visibility_timeout_seconds == 60
    assert f.max_outage_seconds == 300
    f = config(SPEEDUP_FRONTIER_URL="rediss://redis.internal:6380/0", SPEEDUP_FRONTIER_NAME="shop",
               SPEEDUP_FRONTIER_VISIBILITY_TIMEOUT_SECONDS="5").frontier
    assert f is not None and f.name == "shop" and f.visibility_timeout_seconds == 5


@pytest.mark.parametrize(("values", "message"), [
    ({"SPEEDUP_FRONTIER_URL": "http://127.0.0.1:6379"}, "a Redis URL"),
    ({"SPEEDUP_FRONTIER_URL": "127.0.0.1:6379"}, "a Redis URL"),
    ({"SPEEDUP_FRONTIER_URL": "redis://h:6379", "SPEEDUP_FRONTIER_NAME": "my crawl"},
     "a name without spaces"),
    ({"SPEEDUP_FRONTIER_URL": "redis://h:6379",
      "SPEEDUP_FRONTIER_VISIBILITY_TIMEOUT_SECONDS": "0.5"}, "VISIBILITY_TIMEOUT"),
])
def test_bad_frontier_settings_are_named(values: dict[str, object], message: str) -> None:
    with pytest.raises(SpeedupSettingsError, match=message):
        SpeedupConfig.from_settings(Settings(values))
