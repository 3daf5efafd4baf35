"""The add-on: settings checked at start, and pools per crawler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from scrapy.settings import Settings

from scrapy_speedup import Addon, SpeedupExtension, SpeedupSettingsError
from scrapy_speedup.process.pipeline import ProcessPipeline
from tests.conftest import PROJECT, REPO, DemoSite, run_crawl


class HeavyPipeline:
    def process_item(self, item):
        return item


def test_addon_adds_the_extension_and_swaps_listed_pipelines() -> None:
    settings = Settings({
        "ITEM_PIPELINES": {"tests.test_addon.HeavyPipeline": 300},
        "SPEEDUP_PROCESS_PIPELINES": ["tests.test_addon.HeavyPipeline"],
    })
    Addon().update_settings(settings)
    assert SpeedupExtension in settings.getdict("EXTENSIONS")
    pipelines = settings.getdict("ITEM_PIPELINES")
    [(proxy, priority)] = pipelines.items()
    assert issubclass(proxy, ProcessPipeline) and priority == 300
    assert proxy.target == "tests.test_addon.HeavyPipeline" and proxy.index == 0


def test_addon_switched_off_changes_nothing() -> None:
    settings = Settings({"SPEEDUP_ENABLED": False})
    Addon().update_settings(settings)
    assert SpeedupExtension not in settings.getdict("EXTENSIONS")


def test_listed_pipeline_must_be_enabled() -> None:
    settings = Settings({"SPEEDUP_PROCESS_PIPELINES": ["tests.test_addon.HeavyPipeline"]})
    with pytest.raises(SpeedupSettingsError, match="not enabled in ITEM_PIPELINES"):
        Addon().update_settings(settings)


@pytest.mark.parametrize("pipeline", ["SQLitePipeline", "PostgresPipeline"])
def test_a_database_pipeline_cannot_be_listed_for_the_workers(pipeline: str) -> None:
    path = f"scrapy_speedup.db.{pipeline}"
    settings = Settings({"SPEEDUP_PROCESS_PIPELINES": [path], "ITEM_PIPELINES": {path: 300}})
    with pytest.raises(SpeedupSettingsError, match="already writes off the reactor"):
        Addon().update_settings(settings)


def test_listed_pipeline_must_import() -> None:
    settings = Settings({"SPEEDUP_PROCESS_PIPELINES": ["tests.nowhere.Pipeline"]})
    with pytest.raises(SpeedupSettingsError, match="cannot be imported"):
        Addon().update_settings(settings)


@pytest.mark.subprocess
def test_bad_setting_stops_the_crawl_before_it_starts(demo_site: DemoSite, tmp_path: Path) -> None:
    result = run_crawl(tmp_path, settings={"SPEEDUP_PROCESS_WORKERS": "-2"},
                       args={"site": demo_site.url})
    assert result.returncode != 0
    assert "SpeedupSettingsError: SPEEDUP_PROCESS_WORKERS ('-2') must be 1 or more" in result.log
    assert result.items == []


def _two_crawls(demo_site: DemoSite, tmp_path: Path, mode: str) -> dict:
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": f"{PROJECT}{os.pathsep}{REPO}"}
    subprocess.run(
        [sys.executable, "two_crawls.py", demo_site.url, mode, str(out)],
        cwd=PROJECT, env=env, timeout=90, check=True, capture_output=True,
    )
    return json.loads(out.read_text())


@pytest.mark.subprocess
def test_two_crawlers_have_two_pools(demo_site: DemoSite, tmp_path: Path) -> None:
    results = _two_crawls(demo_site, tmp_path, "explicit")
    first, second = set(results["first"]["pids"]), set(results["second"]["pids"])
    assert len(results["first"]["pids"]) == len(results["second"]["pids"]) == 10
    assert first and second and not first & second


@pytest.mark.subprocess
def test_run_in_process_asks_which_crawler_when_several_run(demo_site: DemoSite,
                                                           tmp_path: Path) -> None:
    results = _two_crawls(demo_site, tmp_path, "call")
    errors = results["first"]["errors"] + results["second"]["errors"]
    assert errors
    assert all("cannot tell which of the 2 crawls" in e for e in errors)
    assert "SpeedupExtension.of(self.crawler).run_in_process" in errors[0]


@pytest.mark.subprocess
def test_script_without_main_guard_fails_clearly(demo_site: DemoSite, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{PROJECT}{os.pathsep}{REPO}"}
    result = subprocess.run(
        [sys.executable, "unguarded_crawl.py", demo_site.url],
        cwd=PROJECT, env=env, timeout=90, capture_output=True, text=True, check=False,
    )
    log = result.stdout + result.stderr
    # Each worker's re-run of the script stops at once with a message that
    # says what to fix, and the worker goes on to serve the real crawl.
    assert 'Put the code that starts the crawl under `if __name__ == "__main__":`' in log
    assert "scrapy-speedup process pool: 3 tasks: 3 succeeded" in log
    assert result.returncode == 0


def test_a_redis_frontier_takes_the_scheduler_and_the_crawls_limits() -> None:
    from scrapy_speedup.redis_frontier.scheduler import LIMITS_SETTING, RedisScheduler

    settings = Settings({"SPEEDUP_FRONTIER_URL": "redis://127.0.0.1:6379/0",
                         "CLOSESPIDER_ITEMCOUNT": 40, "CLOSESPIDER_TIMEOUT": 60})
    settings.set("CLOSESPIDER_PAGECOUNT", 7, priority="cmdline")
    Addon().update_settings(settings)
    assert settings["SCHEDULER"] is RedisScheduler
    assert settings.getdict(LIMITS_SETTING) == {"itemcount": 40, "pagecount": 7,
                                                "errorcount": 0, "timeout_s": 60.0}
    # Each machine's CloseSpider would count its own pages alone.
    for name in ("CLOSESPIDER_ITEMCOUNT", "CLOSESPIDER_PAGECOUNT", "CLOSESPIDER_TIMEOUT"):
        assert settings.getint(name) == 0


@pytest.mark.parametrize(("values", "message"), [
    ({"JOBDIR": "/tmp/job"}, "leave JOBDIR unset"),
    ({"SCHEDULER": "tests.test_addon.HeavyPipeline"}, "leave SCHEDULER"),
    ({"CLOSESPIDER_TIMEOUT_NO_ITEM": 5}, "CLOSESPIDER_TIMEOUT_NO_ITEM is not supported"),
])
def test_what_a_redis_frontier_cannot_do_yet_is_refused(values: dict[str, object],
                                                        message: str) -> None:
    settings = Settings({"SPEEDUP_FRONTIER_URL": "redis://127.0.0.1:6379/0", **values})
    with pytest.raises(SpeedupSettingsError, match=message):
        Addon().update_settings(settings)
