"""Faults that the test crawls inject, by product id (setting TEST_FAULTS)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from scrapy.exceptions import DropItem


def apply(item: dict, faults: dict, marker_dir: str | None) -> dict:
    fault = faults.get(str(item["id"]))
    if fault == "kill_once":
        marker = Path(marker_dir) / f"killed-{item['id']}"
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
    elif fault == "poison":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == "raise":
        raise ValueError(f"bad product {item['id']}")
    elif fault == "drop":
        raise DropItem(f"unwanted product {item['id']}")
    elif fault == "unpicklable_result":
        item["lock"] = threading.Lock()
    elif fault and fault.startswith("sleep:"):
        time.sleep(float(fault.partition(":")[2]))
    item["words"] = len(item["text"].split())
    item["pid"] = os.getpid()
    return item


def process(item: dict, faults: dict, marker_dir: str | None) -> dict:
    """The function that the spiders send to run_in_process()."""
    return apply(item, faults, marker_dir)
