from __future__ import annotations

import time
import urllib.request

from scrapy_speedup.demo.catalogue import PRODUCTS_PER_PAGE, index_page, product_page
from tests.conftest import start_demo_site


def test_pages_are_deterministic_and_bounded() -> None:
    assert product_page(7, 100) == product_page(7, 100)
    assert product_page(100, 100) is None
    assert index_page(1, 100) is not None
    assert index_page(100 // PRODUCTS_PER_PAGE + 1, 100) is None
    assert b'class="next"' in (index_page(1, 100) or b"")


def test_near_duplicates_share_most_of_their_text() -> None:
    a, b = product_page(11, 100), product_page(20, 100)
    assert a is not None and b is not None
    assert b"Product 20" in b
    paragraph_a = a.split(b"<p>")[3]
    assert paragraph_a in b  # the later paragraphs are the same


def test_served_with_latency() -> None:
    site = start_demo_site(products=50, latency_ms=100)
    try:
        started = time.monotonic()
        with urllib.request.urlopen(f"{site.url}/product/3.html", timeout=10) as response:
            body = response.read()
        assert time.monotonic() - started >= 0.1
        assert body == product_page(3, 50)
        try:
            urllib.request.urlopen(f"{site.url}/product/50.html", timeout=10)
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
        else:
            raise AssertionError("expected a 404")
    finally:
        site.process.terminate()
        site.process.wait(10)
