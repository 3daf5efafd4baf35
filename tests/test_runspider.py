"""``scrapy runspider file.py``: the file's folder is on ``sys.path`` only
while Scrapy imports it, and the workers must still import what it defines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, DemoSite

pytestmark = pytest.mark.subprocess

SPIDER_FILE = '''
import scrapy

from scrapy_speedup import run_in_process


def square(n):
    return n * n


class CubePipeline:
    def process_item(self, item):
        item["cube"] = item["n"] ** 3
        return item


class FileSpider(scrapy.Spider):
    name = "file_spider"
    custom_settings = {
        "ADDONS": {"scrapy_speedup.Addon": 500},
        "ITEM_PIPELINES": {"spider_in_a_file.CubePipeline": 300},
        "SPEEDUP_PROCESS_PIPELINES": ["spider_in_a_file.CubePipeline"],
        "SPEEDUP_PROCESS_WORKERS": 2,
        # Always in the workers: the point is that they can import this file.
        "SPEEDUP_PROCESS_INLINE_BELOW_MS": 0,
    }

    async def start(self):
        yield scrapy.Request(self.site)

    async def parse(self, response):
        for n in range(6):
            yield {"n": n, "square": await run_in_process(square, n)}
'''


def test_functions_and_pipelines_of_the_spider_file_run_in_the_workers(
        demo_site: DemoSite, tmp_path: Path) -> None:
    spider_file = tmp_path / "spiders" / "spider_in_a_file.py"
    spider_file.parent.mkdir()
    spider_file.write_text(SPIDER_FILE)
    elsewhere = tmp_path / "cwd"  # not the file's folder, as `python -m` adds cwd
    elsewhere.mkdir()
    items_file = tmp_path / "items.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "scrapy", "runspider", str(spider_file),
         "-a", f"site={demo_site.url}/", "-o", f"{items_file}:jsonlines"],
        check=False, cwd=elsewhere, env=env, capture_output=True, text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "No module named" not in result.stderr, result.stderr
    items = sorted((json.loads(line) for line in items_file.read_text().splitlines()),
                   key=lambda item: item["n"])
    assert [(i["n"], i["square"], i["cube"]) for i in items] == [
        (n, n * n, n ** 3) for n in range(6)]
    # Six calls and six items, all in the workers.
    assert "'speedup/process/succeeded_count': 12," in result.stderr, result.stderr
    assert "'speedup/process/error_count'" not in result.stderr, result.stderr
