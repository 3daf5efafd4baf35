from __future__ import annotations

import pytest
from scrapy.settings import Settings

from scrapy_speedup.config import SpeedupConfig, SpeedupSettingsError


def config(**values: object) -> SpeedupConfig:
    return SpeedupConfig.from_settings(Settings(values))


def test_defaults() -> None:
    c = config()
    assert c.enabled and c.process_enabled
    assert c.process_workers >= 1
    assert c.process_max_in_flight == 4 * c.process_workers
    assert c.process_start_method == "forkserver"
    assert c.process_retry_times == 1
    assert c.process_timeout_seconds is None
    assert c.process_max_tasks_per_child is None
    assert c.process_pipelines == ()
    assert c.doctor_enabled and c.lag_warn_ms == 100



def test_values_from_command_line_strings() -> None:
    c = config(
        SPEEDUP_PROCESS_WORKERS="3",
        SPEEDUP_PROCESS_TIMEOUT_SECONDS="2.5",
        SPEEDUP_PROCESS_PIPELINES="a.B,c.D",
        SPEEDUP_PROCESS_ENABLED="False",
    )
    assert c.process_workers == 3 and c.process_max_in_flight == 12
    assert c.process_timeout_seconds == 2.5
    assert c.process_pipelines == ("a.B", "c.D")
    assert not c.process_enabled
    assert config(SPEEDUP_PROCESS_PIPELINES='["a.B"]').process_pipelines == ("a.B",)
    assert config(SPEEDUP_PROCESS_PIPELINES="[]").process_pipelines == ()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"SPEEDUP_PROCESS_WORKERS": 0}, r"SPEEDUP_PROCESS_WORKERS \(0\) must be more than 0"),
        ({"SPEEDUP_PROCESS_WORKERS": "eight"}, r"WORKERS \('eight'\) must be an integer"),
        ({"SPEEDUP_PROCESS_WORKERS": True}, r"SPEEDUP_PROCESS_WORKERS \(True\) must be an integer"),
        ({"SPEEDUP_PROCESS_RETRY_TIMES": -1}, r"RETRY_TIMES \(-1\) must be 0 or more"),
        ({"SPEEDUP_PROCESS_TIMEOUT_SECONDS": 0}, r"TIMEOUT_SECONDS \(0.0\) must be more than 0"),
        ({"SPEEDUP_PROCESS_START_METHOD": "fork"}, r"must be 'forkserver' or 'spawn'.*deadlock"),
        ({"SPEEDUP_PROCESS_PIPELINES": [1]}, r"import paths as strings, got 1"),
        ({"SPEEDUP_LAG_WARN_MS": 0}, r"SPEEDUP_LAG_WARN_MS \(0.0\) must be more than 0"),
        ({"SPEEDUP_LAG_WARN_MS": "soon"}, r"SPEEDUP_LAG_WARN_MS \('soon'\) must be a number"),
    ],
)
def test_bad_values_are_named(values: dict[str, object], message: str) -> None:
    with pytest.raises(SpeedupSettingsError, match=message):
        config(**values)
