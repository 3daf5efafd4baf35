"""The overload-retry policy of adaptive concurrency, piece by piece:
Retry-After (finding 12), back-off (finding 17), timeouts (finding 11), and
what the retry looks like."""

from __future__ import annotations

import time
from email.utils import formatdate
from typing import Any
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scrapy.exceptions import DownloadTimeoutError
from scrapy.http import HtmlResponse, Request
from twisted.internet.error import TCPTimedOutError, TimeoutError

from scrapy_speedup import adaptive
from scrapy_speedup.adaptive import backoff_seconds, retry_after_seconds
from tests.test_adaptive_state import standalone


@given(st.one_of(st.text(), st.binary(), st.none()), st.one_of(st.text(), st.none()))
def test_retry_after_is_none_or_a_wait_of_at_most_60_s(value: Any, date: Any) -> None:
    seconds = retry_after_seconds(value, date)
    assert seconds is None or 0 <= seconds <= 60


@given(st.integers(min_value=0, max_value=10**30))
def test_retry_after_in_seconds(seconds: int) -> None:
    assert retry_after_seconds(str(seconds).encode()) == min(seconds, 60)


@given(st.integers(min_value=-10**6, max_value=10**6))
def test_retry_after_as_a_date_is_relative_to_the_responses_date(offset: int) -> None:
    sent = 1_700_000_000
    value = formatdate(sent + offset, usegmt=True)
    wait = retry_after_seconds(value, formatdate(sent, usegmt=True))
    assert wait == (None if offset <= 0 else min(offset, 60))


def test_retry_after_as_a_date_without_a_date_header_is_relative_to_now() -> None:
    wait = retry_after_seconds(formatdate(time.time() + 30, usegmt=True))
    assert wait is not None and 28 <= wait <= 30


@given(st.integers(min_value=0, max_value=10_000))
def test_backoff_doubles_with_jitter_up_to_60_s(retries: int) -> None:
    wait = backoff_seconds(retries)
    base = 2.0 ** min(retries, 32)
    assert min(60, 0.5 * base) <= wait <= min(60, 1.5 * base)


def run_now(coroutine: Any) -> Any:
    """The result of a coroutine that must not wait."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    coroutine.close()
    raise AssertionError("it waited")


def overloaded(mw: Any, request: Request, *, status: int = 503, flags: list[str] | None = None,
               retry_after: str = "0") -> Any:
    mw.crawler.crawling = True
    mw.crawler.engine.running = True
    response = HtmlResponse(request.url, status=status, request=request, flags=flags,
                            headers={"Retry-After": retry_after})
    # No back-off here: these tests are about what is retried, not when.
    with mock.patch.object(adaptive, "backoff_seconds", lambda retries: 0.0):
        return run_now(mw.process_response(request, response))


def test_the_retry_is_a_copy_outside_scrapys_budget() -> None:
    mw = standalone({"RETRY_PRIORITY_ADJUST": -3})
    request = Request("http://example.com/a", priority=5, meta={"download_slot": "example.com"})
    retry = overloaded(mw, request)
    assert isinstance(retry, Request) and retry is not request
    assert (retry.url, retry.dont_filter, retry.priority) == (request.url, True, 2)
    assert retry.meta["speedup_overload_retries"] == 1
    assert "retry_times" not in retry.meta
    # Its own priority_adjust, as RetryMiddleware reads it.
    request.meta["priority_adjust"] = 4
    assert overloaded(mw, request).priority == 9


def test_past_its_retries_the_response_goes_on() -> None:
    mw = standalone({"SPEEDUP_ADAPTIVE_OVERLOAD_RETRY_TIMES": 2})
    request = Request("http://example.com/a", meta={"speedup_overload_retries": 2})
    response = overloaded(mw, request)
    assert isinstance(response, HtmlResponse) and response.status == 503
    assert mw.stats.get_value("speedup/adaptive/overload_retry_max_reached") == 1


@pytest.mark.parametrize("case", ["dont_retry", "cached", "200", "500"])
def test_what_is_not_retried(case: str) -> None:
    mw = standalone()
    request = Request("http://example.com/a", meta={"dont_retry": case == "dont_retry"})
    status = int(case) if case.isdigit() else 503
    result = overloaded(mw, request, status=status,
                        flags=["cached"] if case == "cached" else None)
    assert isinstance(result, HtmlResponse)


def test_a_stopping_crawl_does_not_retry() -> None:
    mw = standalone()
    request = Request("http://example.com/a")
    mw.crawler.crawling = False
    response = HtmlResponse(request.url, status=503, request=request)
    assert run_now(mw.process_response(request, response)) is response


@pytest.mark.parametrize("exc", [DownloadTimeoutError("slow"), TimeoutError(),
                                 TCPTimedOutError()])
def test_download_timeouts_are_overload(exc: Exception) -> None:
    mw = standalone()
    request = Request("http://example.com/a", meta={"download_slot": "example.com"})
    mw.process_exception(request, exc)
    stats = mw.stats.get_stats()
    assert stats["speedup/adaptive/overload_count"] == stats["speedup/adaptive/timeout_count"] == 1
    assert mw.limit("example.com") == 2  # halved from 4


def test_other_exceptions_are_not_overload() -> None:
    mw = standalone()
    request = Request("http://example.com/a", meta={"download_slot": "example.com"})
    mw.process_exception(request, ConnectionRefusedError())
    assert mw.stats.get_value("speedup/adaptive/overload_count") is None
