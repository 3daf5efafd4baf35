"""An extension that uses SIGALRM itself, as some projects do for timeouts:
from the start (``TEST_ALARM_FROM = "start"``), or from the first item on
(``"first_item"``). Its handler raises: if the reactor doctor ever fired it,
the crawl's log would show "the project's own alarm"."""

from __future__ import annotations

import signal

from scrapy import signals


def on_alarm(signum, frame):
    raise TimeoutError("the project's own alarm")


class ProjectAlarm:
    def __init__(self, crawler):
        self.installed = False
        if crawler.settings.get("TEST_ALARM_FROM", "start") == "start":
            self.install()
        else:
            crawler.signals.connect(self.install, signal=signals.item_scraped)

    @classmethod
    def from_crawler(cls, crawler):
        return cls(crawler)

    def install(self, *args, **kwargs):
        if not self.installed:
            signal.signal(signal.SIGALRM, on_alarm)
            self.installed = True
