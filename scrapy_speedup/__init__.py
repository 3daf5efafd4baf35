"""scrapy-speedup: make Scrapy crawls use the whole machine.

Enable it with ``ADDONS = {"scrapy_speedup.Addon": 500}`` in ``settings.py``.
"""

from __future__ import annotations

from scrapy_speedup.adaptive import AdaptiveConcurrencyMiddleware
from scrapy_speedup.addon import Addon
from scrapy_speedup.config import SpeedupConfig
from scrapy_speedup.exceptions import (
    DatabaseError,
    OffloadError,
    PoolClosedError,
    SpeedupSettingsError,
    TaskTimeoutError,
    ThreadPoolExhaustedError,
    UnpicklableError,
    WorkerCrashedError,
    WorkerInitError,
)
from scrapy_speedup.extension import SpeedupExtension
from scrapy_speedup.offload import (
    CpuBoundFunction,
    blocking,
    cpu_bound,
    run_in_process,
    run_in_thread,
)

__version__ = "0.1.0"

__all__ = [
    "AdaptiveConcurrencyMiddleware",
    "Addon",
    "CpuBoundFunction",
    "DatabaseError",
    "OffloadError",
    "PoolClosedError",
    "SpeedupConfig",
    "SpeedupExtension",
    "SpeedupSettingsError",
    "TaskTimeoutError",
    "ThreadPoolExhaustedError",
    "UnpicklableError",
    "WorkerCrashedError",
    "WorkerInitError",
    "__version__",
    "blocking",
    "cpu_bound",
    "run_in_process",
    "run_in_thread",
]
