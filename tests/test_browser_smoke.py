"""A real Chromium renders a page whose content a script writes."""

from __future__ import annotations

from scrapy_speedup.demo.jsshop import ShopResource, price_of
from tests.browser_shop import BROWSER_SETTINGS, ShopSpider, chromium_processes
from tests.inprocess import crawl, inprocess, listening


@inprocess
async def test_chromium_renders_a_script_page() -> None:
    shop = ShopResource(products=20, latency_s=0)
    with listening(shop) as url:
        run = await crawl(ShopSpider, {**BROWSER_SETTINGS, "SPEEDUP_BROWSER_ENABLED": True},
                          url=url, meta={"playwright": True})
    assert run.finish_reason == "finished"
    items = {item["url"].rsplit("/", 2)[-2] + "/" + item["url"].rsplit("/", 1)[-1]: item
             for item in run.items}
    assert len(items) == 20
    # Product 0 is written by a script, product 10's price by a loaded script.
    assert items["app/0.html"]["title"] == "Product 0"
    assert items["app/0.html"]["price"] == price_of(0)
    assert items["deal/10.html"]["price"] == price_of(10)
    assert run.stat("speedup/browser/rendered_count") == 21
    # Pages navigated again: fewer opened than rendered (docs/usage/browser.rst).
    assert run.stat("playwright/page_count") < 21
    # Images blocked by default: the browser never asked for one.
    assert shop.served["img"] == 0
    assert run.stat("playwright/request_count/aborted") == 20
    assert not chromium_processes()
