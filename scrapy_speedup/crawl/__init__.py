"""The crawl itself on every core: a coordinator with one frontier, and engine
processes that lease requests from it (``SPEEDUP_CRAWL_PROCESSES``).

- :mod:`.protocol`: the messages between the coordinator and an engine process.
- :mod:`.channel`: a framed, non-blocking socket watched by the reactor.
- :mod:`.frontier`: the coordinator's scheduler (Scrapy's queues and dupefilter)
  and the dispatcher that hands requests to the engine processes.
- :mod:`.downloader`: the coordinator's downloader: Scrapy's per-site slots
  (concurrency, delay, AutoThrottle) for the whole crawl, leasing instead of
  downloading.
- :mod:`.coordinator`: starts and watches the engine processes, tracks leases.
- :mod:`.engine_process`: what runs in an engine process.
- :mod:`.lease_scheduler`: an engine process's scheduler: leased requests in,
  new requests, items, releases and acknowledgements out.
- :mod:`.stats`: the crawl's stats from each process's.
"""
