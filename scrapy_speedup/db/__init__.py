"""Item pipelines that store items in a database without blocking the reactor.

* :class:`SQLitePipeline`: SQLite, batched in one writer thread.
* :class:`PostgresPipeline`: PostgreSQL through psycopg 3 (a blocking driver)
  in the crawl's thread pool; ``pip install scrapy-speedup[postgres]``.
"""

from __future__ import annotations

from scrapy_speedup.db._batching import DatabaseError
from scrapy_speedup.db.postgres import PostgresPipeline
from scrapy_speedup.db.sqlite import SQLitePipeline

__all__ = ["DatabaseError", "PostgresPipeline", "SQLitePipeline"]
