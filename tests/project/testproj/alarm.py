"""An extension that uses SIGALRM itself, as some projects do for timeouts:
from the start, or once the item whose id is ``TEST_ALARM_AT_ITEM`` is
scraped, then arms its own timer an hour ahead, as a project guarding a
call with ``alarm()`` does (``alarm()`` and the doctor share one timer, so this
also replaces any alarm the doctor had pending). Its handler raises: if the
reactor doctor ever fired it, the crawl's log would show "the project's own
alarm"."""

from __future__ import annotations

import signal

from scrapy import signals


def on_alarm(signum, frame):
    raise TimeoutError("the project's own alarm")


class ProjectAlarm:
    def __init__(self, crawler):
        self.at_item = crawler.settings.get("TEST_ALARM_AT_ITEM")
        if self.at_item is None:
            signal.signal(signal.SIGALRM, on_alarm)
        else:
            crawler.signals.connect(self.item_scraped, signal=signals.item_scraped)

    @classmethod
    def from_crawler(cls, crawler):
        return cls(crawler)

    def item_scraped(self, item):
        if item["id"] == int(self.at_item):
            signal.signal(signal.SIGALRM, on_alarm)
            signal.alarm(3600)
