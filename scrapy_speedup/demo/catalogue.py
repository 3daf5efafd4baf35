"""The pages of the demo catalogue: deterministic, realistic product HTML.

Product ``i`` is the same on every run. One product in ten re-uses the
description of an earlier one with a few words changed, so that near-duplicate
detection has something real to find.
"""

from __future__ import annotations

import html
import random
from functools import cache

__all__ = ["PRODUCTS_PER_PAGE", "index_page", "product_page"]

PRODUCTS_PER_PAGE = 20
_NEAR_DUPLICATE_EVERY = 10

_WORDS = (
    "steel oak walnut ceramic linen cotton wool leather brass copper glass bamboo"
    " lamp chair table shelf cabinet desk stool bench mirror rug vase kettle"
    " handmade durable compact foldable adjustable modern classic rustic minimal"
    " warm bright soft sturdy light heavy smooth textured matte glossy natural"
    " kitchen office garden bedroom studio hallway balcony workshop library"
    " designed crafted finished tested shipped assembled polished sealed woven"
    " for with and the a of in on by to from every daily long lasting easy care"
    " clean wipe dry store stack fold carry hang mount fit match pair gift"
).split()
_CATEGORIES = ("Furniture", "Lighting", "Kitchen", "Textiles", "Decor", "Garden")


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 18))]
    return " ".join(words).capitalize() + "."


@cache
def _description(product: int) -> tuple[str, ...]:
    rng = random.Random(product)
    if product % _NEAR_DUPLICATE_EVERY == 0 and product >= _NEAR_DUPLICATE_EVERY:
        paragraphs = list(_description(product - _NEAR_DUPLICATE_EVERY + 1))
        words = paragraphs[0].split()
        for _ in range(3):  # a near duplicate: a few words differ
            words[rng.randrange(len(words))] = rng.choice(_WORDS)
        paragraphs[0] = " ".join(words)
        return tuple(paragraphs)
    return tuple(
        " ".join(_sentence(rng) for _ in range(rng.randint(4, 7))) for _ in range(5)
    )


def _layout(title: str, body: str) -> bytes:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)} | Demo Catalogue</title>"
        "<link rel=\"stylesheet\" href=\"/static/site.css\"></head><body>"
        "<header><nav><a href=\"/\">Home</a> <a href=\"/catalogue/page-1.html\">"
        "Catalogue</a></nav></header>"
        f"<main>{body}</main>"
        "<footer><p>Demo Catalogue, a local site for scrapy-speedup.</p></footer>"
        "</body></html>"
    ).encode()


def _product_url(product: int) -> str:
    return f"/product/{product}.html"


def index_page(page: int, products: int) -> bytes | None:
    """Catalogue page *page* (from 1), or None past the last one."""
    first = (page - 1) * PRODUCTS_PER_PAGE
    if page < 1 or first >= products:
        return None
    items = "".join(
        f"<li class=\"product\"><a href=\"{_product_url(p)}\">Product {p}</a>"
        f" <span class=\"price\">{_price(p)}</span></li>"
        for p in range(first, min(first + PRODUCTS_PER_PAGE, products))
    )
    more = first + PRODUCTS_PER_PAGE < products
    nxt = f"<a class=\"next\" href=\"/catalogue/page-{page + 1}.html\">Next</a>" if more else ""
    return _layout(f"Catalogue page {page}", f"<h1>Catalogue</h1><ul>{items}</ul>{nxt}")


def _price(product: int) -> str:
    return f"{random.Random(-product).uniform(5, 500):.2f}"


def product_page(product: int, products: int) -> bytes | None:
    """The page of product *product*, or None if there is no such product."""
    if not 0 <= product < products:
        return None
    rng = random.Random(product * 7919)
    category = _CATEGORIES[product % len(_CATEGORIES)]
    paragraphs = "".join(f"<p>{html.escape(p)}</p>" for p in _description(product))
    specs = "".join(
        f"<tr><th>{name}</th><td>{value}</td></tr>"
        for name, value in (
            ("Width", f"{rng.randint(10, 200)} cm"),
            ("Height", f"{rng.randint(10, 200)} cm"),
            ("Weight", f"{rng.uniform(0.2, 40):.1f} kg"),
            ("Material", rng.choice(_WORDS[:12])),
            ("SKU", f"DC-{product:06d}"),
        )
    )
    related = "".join(
        f"<li><a href=\"{_product_url(r)}\">Product {r}</a></li>"
        for r in sorted({rng.randrange(products) for _ in range(4)})
    )
    body = (
        f"<nav class=\"breadcrumb\"><a href=\"/\">Home</a> / {category}</nav>"
        f"<article class=\"product\" data-id=\"{product}\">"
        f"<h1>Product {product}</h1><p class=\"price\">{_price(product)}</p>"
        f"<section class=\"description\">{paragraphs}</section>"
        f"<table class=\"specs\">{specs}</table></article>"
        f"<aside><h2>Related</h2><ul>{related}</ul></aside>"
    )
    return _layout(f"Product {product}", body)
