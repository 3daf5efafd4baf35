"""Every error that scrapy-speedup raises, in one place."""

from __future__ import annotations

__all__ = [
    "DatabaseError",
    "EngineProcessError",
    "OffloadError",
    "PoolClosedError",
    "ProtocolError",
    "RemoteTraceback",
    "SpeedupSettingsError",
    "TaskTimeoutError",
    "ThreadPoolExhaustedError",
    "UnpicklableError",
    "WorkerCrashedError",
    "WorkerInitError",
]


class SpeedupSettingsError(ValueError):
    """A ``SPEEDUP_*`` setting has a value that scrapy-speedup cannot use.

    Raised while the crawler is built, so that a crawl never runs without the
    speedup its settings ask for. The message names the setting, the value
    and what it must be.
    """


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
    """Work was offloaded after the crawl's pool was shut down, or was
    abandoned when the crawl stopped before it finished."""


class ProtocolError(OffloadError):
    """A worker's socket carried bytes that are not a valid message (a frame
    over the size limit, an unknown kind, a result for a task it does not
    hold). The worker is ended; its tasks are handled as after a crash."""


class EngineProcessError(RuntimeError):
    """An engine process of ``SPEEDUP_CRAWL_PROCESSES`` failed to start, or
    the crawl could not go on without it."""


class ThreadPoolExhaustedError(RuntimeError):
    """Every thread the crawl's thread pool may have is stuck in a call that
    ran past its timeout, so a blocking call cannot run."""


class DatabaseError(Exception):
    """A database pipeline could not store an item: the database refused the
    row (the message is the database's), the item cannot be stored as it is
    (a field name or value the pipeline refuses, and why), or the database
    stayed unavailable through every retry."""


class RemoteTraceback(Exception):  # noqa: N818 - a traceback, not an error
    """Carries the worker-side traceback as the ``__cause__`` of a re-raised error,
    so that Scrapy's log of the error shows where in the worker it happened."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f"\n\nWorker traceback:\n{self.tb}"
