"""Pages that need JavaScript: scrapy-playwright, a browser only where a page
needs it (:mod:`.router`), and a browser that stays healthy over a long crawl
(:mod:`.handler`). The add-on sets them up (:mod:`.setup`)."""
