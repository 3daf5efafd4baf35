"""The JavaScript shop's spider (tests/browser_shop.py), for whole-process tests."""

from __future__ import annotations

from tests.browser_shop import ShopSpider as _ShopSpider


class ShopSpider(_ShopSpider):
    name = "shop"
