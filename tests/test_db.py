"""The database pipelines, against real SQLite files and a real PostgreSQL."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import Crawl, DemoSite, run_crawl

pytestmark = pytest.mark.subprocess

COUNT = 40


def sqlite_rows(path: Path, query: str = "SELECT id, url, tags FROM items ORDER BY id") -> list:
    with sqlite3.connect(path) as db:
        return db.execute(query).fetchall()


def test_sqlite_stores_every_item(demo_site: DemoSite, runtime: str, tmp_path: Path) -> None:
    db = tmp_path / "items.sqlite3"
    result = run_crawl(
        tmp_path, spider="blocking", runtime=runtime,
        settings={"ITEM_PIPELINES": {"scrapy_speedup.db.SQLitePipeline": 300},
                  "SPEEDUP_SQLITE_PATH": db, "SPEEDUP_DB_BATCH_SIZE": 16,
                  "TEST_BLOCK_SECONDS": 0.01},
        args={"site": demo_site.url, "count": COUNT, "mode": "call"},
    )
    assert result.returncode == 0, result.log
    rows = sqlite_rows(db)
    assert [r[0] for r in rows] == list(range(COUNT))
    assert json.loads(rows[3][2]) == ["product", "p3"]  # nested fields as JSON
    assert result.stat("speedup/db/row_count") == COUNT
    assert result.stat("speedup/db/batch_count") >= COUNT // 16


def test_sqlite_refused_row_errors_alone(demo_site: DemoSite, tmp_path: Path) -> None:
    db = tmp_path / "items.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE items (id_ INTEGER PRIMARY KEY, id INTEGER CHECK (id <> 5))")
    result = run_crawl(
        tmp_path, spider="blocking",
        settings={"ITEM_PIPELINES": {"scrapy_speedup.db.SQLitePipeline": 300},
                  "SPEEDUP_SQLITE_PATH": db, "TEST_BLOCK_SECONDS": 0.01},
        args={"site": demo_site.url, "count": COUNT, "mode": "call"},
    )
    assert [r[0] for r in sqlite_rows(db)] == [i for i in range(COUNT) if i != 5]
    assert result.stat("test/item_error/DatabaseError") == 1
    assert "SQLite refused the item: CHECK constraint failed" in result.log
    assert result.stat("speedup/db/row_error_count") == 1


def test_sqlite_graceful_ctrl_c_loses_no_row(demo_site: DemoSite, tmp_path: Path) -> None:
    db = tmp_path / "items.sqlite3"
    crawl = Crawl(
        tmp_path, spider="blocking",
        settings={"ITEM_PIPELINES": {"scrapy_speedup.db.SQLitePipeline": 300},
                  "SPEEDUP_SQLITE_PATH": db, "LOG_LEVEL": "DEBUG",
                  # Rows wait for a commit for long: the stop must commit them.
                  "SPEEDUP_DB_BATCH_SIZE": 1000, "SPEEDUP_DB_COMMIT_INTERVAL_SECONDS": 60,
                  "SPEEDUP_THREAD_WORKERS": 2, "TEST_BLOCK_SECONDS": 0.1,
                  "CONCURRENT_REQUESTS": 4, "SCRAPER_SLOT_MAX_ACTIVE_SIZE": 50_000},
        args={"site": demo_site.url, "count": 300, "mode": "call"},
    )
    # Items are scraped only once committed, so none is before the stop.
    crawl.wait_for_log(r"Crawled \(200\).*product/10\.html")
    crawl.interrupt()
    result = crawl.result(timeout=60)
    assert result.stats["finish_reason"] == "shutdown"
    scraped = result.stat("item_scraped_count")
    assert 0 < scraped < 300
    assert len(sqlite_rows(db)) == scraped


def test_postgres_stores_items_and_isolates_a_refused_row(
    demo_site: DemoSite, postgres_dsn: str, runtime: str, tmp_path: Path
) -> None:
    import psycopg

    table = f"items_{runtime}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"CREATE TABLE {table} (id_ BIGSERIAL PRIMARY KEY, id BIGINT CHECK (id <> 5))")
    result = run_crawl(
        tmp_path, spider="blocking", runtime=runtime,
        settings={"ITEM_PIPELINES": {"scrapy_speedup.db.PostgresPipeline": 300},
                  "SPEEDUP_POSTGRES_DSN": postgres_dsn, "SPEEDUP_POSTGRES_TABLE": table,
                  "SPEEDUP_DB_BATCH_SIZE": 10, "TEST_BLOCK_SECONDS": 0.01},
        args={"site": demo_site.url, "count": COUNT, "mode": "call"},
    )
    assert result.returncode == 0, result.log
    with psycopg.connect(postgres_dsn) as conn:
        rows = conn.execute(f"SELECT id, url, tags FROM {table} ORDER BY id").fetchall()
    assert [r[0] for r in rows] == [i for i in range(COUNT) if i != 5]
    assert rows[3][2] == ["product", "p3"]  # nested fields as JSONB
    assert result.stat("test/item_error/DatabaseError") == 1
    assert 'violates check constraint "items_' in result.log
    # Written in batches by the pipeline's own writer thread.
    assert result.stat("speedup/db/batch_count") >= COUNT // 10
    assert result.stat("speedup/db/row_count") == COUNT - 1


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"ITEM_PIPELINES": {"scrapy_speedup.db.SQLitePipeline": 300}},
         "SQLitePipeline needs SPEEDUP_SQLITE_PATH"),
        ({"ITEM_PIPELINES": {"scrapy_speedup.db.SQLitePipeline": 300},
          "SPEEDUP_SQLITE_PATH": "x.db", "SPEEDUP_SQLITE_TABLE": "items; DROP"},
         "SPEEDUP_SQLITE_TABLE ('items; DROP') must be a plain table name"),
    ],
)
def test_bad_database_settings_stop_the_crawl(demo_site: DemoSite, tmp_path: Path,
                                              settings: dict, message: str) -> None:
    result = run_crawl(tmp_path, spider="blocking", settings=settings,
                       args={"site": demo_site.url, "count": 3})
    assert result.returncode != 0
    assert message in result.log
