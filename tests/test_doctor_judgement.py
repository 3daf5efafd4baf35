"""How the reactor doctor judges a block from its samples: CPU time and
voluntary waits, not the wall clock alone, decide whether a call was long."""

from __future__ import annotations

import logging
import os
import types
from typing import Any

import pytest
from scrapy import Spider
from scrapy.settings import Settings

from scrapy_speedup.config import SpeedupConfig
from scrapy_speedup.reactor_doctor import (
    _POOL_START,
    ReactorDoctor,
    _Blocker,
    _Component,
    _row_fix,
    _Sample,
)
from tests.inprocess import make_crawler

PARSE = _Component("MySpider.parse", "spider")
FEEDS = _Component("FeedExporter.item_scraped", "extension", scrapys=True)


def frame() -> types.FrameType:
    """A distinct frame object: samples in one call share theirs."""
    import sys

    return sys._getframe()


def call(component: _Component | None, wall_ms: float, cpu_ms: float, waits: int,
         *, start: float = 0.0, library: bool = False) -> list[_Sample]:
    """Two samples of one call: its first and last."""
    f = frame()
    where = (f.f_code, 1)
    return [
        _Sample(0.0, start, component, f, where, cpu=start, waits=100, library=library),
        _Sample(0.0, start + wall_ms / 1000, component, f, where,
                cpu=start + cpu_ms / 1000, waits=100 + waits, library=library),
    ]


@pytest.fixture
def doctor() -> ReactorDoctor:
    crawler = make_crawler(Spider)
    crawler.stats.open_spider()
    return ReactorDoctor(crawler, SpeedupConfig.of(crawler), bridge=None)  # type: ignore[arg-type]


def judge(doctor: ReactorDoctor, samples: list[_Sample]) -> tuple[Any, ...]:
    return doctor._judge(0.2, 0.0, samples)


def test_a_call_long_only_because_it_was_preempted_is_busy_work(doctor: ReactorDoctor) -> None:
    # 20 ms on the wall clock, 1.5 ms on the CPU, no voluntary switch: other
    # processes had the cores. Moving the 1.5 ms parse would not help.
    samples = call(PARSE, 20, 1.5, 0) + call(PARSE, 12, 1.2, 0, start=0.03)
    assert judge(doctor, samples)[3] == "busy"


def test_a_call_that_waited_is_named_with_the_thread_fix(doctor: ReactorDoctor) -> None:
    component, _, longest, kind, nature = judge(doctor, call(PARSE, 20, 0.5, 3))
    assert (component, kind, nature) == (PARSE, "call", "waits")
    assert longest == pytest.approx(0.02)
    assert "run_in_thread" in doctor._fix(PARSE, nature)


def test_a_call_long_on_the_cpu_is_named_with_the_process_fix(doctor: ReactorDoctor) -> None:
    component, _, _, kind, nature = judge(doctor, call(PARSE, 30, 25, 2))
    assert (component, kind, nature) == (PARSE, "call", "cpu")
    assert "run_in_process" in doctor._fix(PARSE, nature)


def test_a_sleep_whose_samples_cost_5_ms_of_cpu_still_waits(doctor: ReactorDoctor) -> None:
    # 150 ms asleep; 40 samples at ~0.15 ms each on a loaded machine.
    component, _, _, kind, nature = judge(doctor, call(PARSE, 150, 6, 40))
    assert (component, kind, nature) == (PARSE, "call", "waits")


def test_a_long_library_call_is_library_not_many_short_calls(doctor: ReactorDoctor) -> None:
    _, where, longest, kind, _ = judge(doctor, call(None, 40, 30, 0, library=True))
    assert kind == "library"
    assert longest == pytest.approx(0.04)
    assert "test_doctor_judgement.py" in where


def test_scrapys_own_components_and_the_pool_start_get_no_move_advice(
        doctor: ReactorDoctor) -> None:
    assert "Scrapy's own component" in doctor._fix(FEEDS, "cpu")
    assert "run_in_process" not in doctor._fix(FEEDS, "cpu")
    assert "SPEEDUP_PROCESS_WORKERS" in doctor._fix(_POOL_START, "cpu")
    assert _row_fix(_Blocker(FEEDS, "x", "call")) == "-"
    assert _row_fix(_Blocker(_POOL_START, "x", "call")) == "-"
    assert _row_fix(_Blocker(PARSE, "x", "call", "waits")) == "thread"


def test_a_library_block_is_said_at_info_once(doctor: ReactorDoctor,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    for _ in range(3):
        doctor._block(0.2, 0.9, 0.0, call(None, 40, 30, 0, library=True))
    said = [r for r in caplog.records if "Library code blocked the reactor" in r.message]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert doctor.stats.get_value("speedup/reactor/block_count/library") == 3


def test_a_reactor_busy_with_short_calls_points_to_engine_processes(
        doctor: ReactorDoctor) -> None:
    assert _row_fix(_Blocker(None, "(many short calls)", "busy")) == "engines"
    cores = len(os.sched_getaffinity(0))
    hint = doctor._engines_hint()
    if cores > 1:
        assert f'SPEEDUP_CRAWL_PROCESSES = "auto" ({cores} here)' in hint
    engine = ReactorDoctor(
        doctor.crawler,
        SpeedupConfig.from_settings(Settings({"SPEEDUP_CRAWL_PROCESSES": 2,
                                              "_SPEEDUP_ENGINE_INDEX": 0})),
        bridge=None,  # type: ignore[arg-type]
    )
    assert "one of 2 engine processes" in engine._engines_hint()
