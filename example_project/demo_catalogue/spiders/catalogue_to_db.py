from __future__ import annotations

from demo_catalogue.spiders.catalogue import CatalogueSpider


class CatalogueToDatabaseSpider(CatalogueSpider):
    """The catalogue crawl, stored in a database by scrapy-speedup's pipelines:

    scrapy crawl catalogue_to_db -a site=http://127.0.0.1:8000

    writes catalogue.sqlite3. For PostgreSQL instead::

        scrapy crawl catalogue_to_db -a site=... \\
            -s 'ITEM_PIPELINES={"demo_catalogue.pipelines.MinHashPipeline": 300,
                "demo_catalogue.pipelines.NearDuplicatePipeline": 400,
                "scrapy_speedup.db.PostgresPipeline": 800}' \\
            -s SPEEDUP_POSTGRES_DSN=postgresql://user@127.0.0.1:5432/catalogue
    """

    name = "catalogue_to_db"
    custom_settings = {
        "ITEM_PIPELINES": {
            "demo_catalogue.pipelines.MinHashPipeline": 300,
            "demo_catalogue.pipelines.NearDuplicatePipeline": 400,
            # Rows committed in batches, in one writer thread, off the reactor.
            "scrapy_speedup.db.SQLitePipeline": 800,
        },
        "SPEEDUP_SQLITE_PATH": "catalogue.sqlite3",
        "SPEEDUP_SQLITE_TABLE": "products",
    }
