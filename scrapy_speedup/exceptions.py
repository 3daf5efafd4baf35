"""Errors that scrapy-speedup raises to the code that offloaded the work."""

from __future__ import annotations

__all__ = [
    "OffloadError",
    "PoolClosedError",
    "RemoteTraceback",
    "TaskTimeoutError",
    "UnpicklableError",
    "WorkerCrashedError",
    "WorkerInitError",
]


class OffloadError(RuntimeError):
    """Base class of the errors raised by scrapy-speedup's process pool."""


class WorkerCrashedError(OffloadError):
    """The worker process died while it ran the task, every time it was tried."""


class TaskTimeoutError(OffloadError, TimeoutError):
    """The task ran past ``SPEEDUP_PROCESS_TIMEOUT_SECONDS``; its worker was replaced."""


class UnpicklableError(OffloadError, TypeError):
    """An argument, result or item cannot cross to or from a worker process.

    The message names the argument or field, and the type that failed.
    """


class WorkerInitError(OffloadError):
    """A pipeline listed in ``SPEEDUP_PROCESS_PIPELINES`` failed to start in a worker."""


class PoolClosedError(OffloadError):
    """Work was offloaded after the crawl's process pool was shut down."""


class RemoteTraceback(Exception):  # noqa: N818 - a traceback, not an error
    """Carries the worker-side traceback as the ``__cause__`` of a re-raised error,
    so that Scrapy's log of the error shows where in the worker it happened."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f"\n\nWorker traceback:\n{self.tb}"
