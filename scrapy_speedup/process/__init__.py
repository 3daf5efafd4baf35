"""The process pool: CPU work of the crawl in worker processes.

* :mod:`~scrapy_speedup.process.pool`: the pool of one crawler (dispatch,
  faults, backpressure, drain), on the reactor thread;
* :mod:`~scrapy_speedup.process.worker`: what runs in a worker process;
* :mod:`~scrapy_speedup.process.protocol`: the messages between them;
* :mod:`~scrapy_speedup.process.pickling`: pickling whose errors name the
  argument, field or class that failed;
* :mod:`~scrapy_speedup.process.pipeline`: the proxy that runs an unchanged
  item pipeline of ``SPEEDUP_PROCESS_PIPELINES`` in the workers.

The package imports nothing itself: a worker process imports only what it
runs (``worker``, ``protocol``, ``pickling``).
"""

