"""Item pipelines that store items in a database without blocking the reactor.

* :class:`SQLitePipeline`: SQLite.
* :class:`PostgresPipeline`: PostgreSQL through psycopg 3 (a blocking
  driver); ``pip install scrapy-speedup[postgres]``.

Each writes in batches on a writer thread of its own, with one connection.
An item counted as scraped is in the database, once; every other item fails
with a :exc:`DatabaseError` that says why (``docs/usage/databases.rst``).
"""

from __future__ import annotations

from scrapy_speedup.db.postgres import PostgresPipeline
from scrapy_speedup.db.sqlite import SQLitePipeline
from scrapy_speedup.exceptions import DatabaseError

__all__ = ["DatabaseError", "PostgresPipeline", "SQLitePipeline"]
