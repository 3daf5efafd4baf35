"""An extension that uses SIGALRM itself, as some projects do for timeouts."""

from __future__ import annotations

import signal


def on_alarm(signum, frame):
    raise TimeoutError("the project's own alarm")


class ProjectAlarm:
    def __init__(self):
        signal.signal(signal.SIGALRM, on_alarm)

    @classmethod
    def from_crawler(cls, crawler):
        return cls()
