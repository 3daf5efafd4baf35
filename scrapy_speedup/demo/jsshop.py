"""A local shop whose pages need JavaScript, some of them: for the browser router.

Kinds of page, each with a URL pattern of its own:

* ``/shop/list/<n>.html``: a listing, static: 20 links to products and a
  ``next`` link.
* ``/shop/item/<i>.html``: a product, static: ``<h1>``, ``p.price``, an image.
* ``/shop/app/<i>.html``: a product rendered by a script: the HTML has an
  empty ``<div id="app">``; an inline script writes the ``<h1>`` and the price.
* ``/shop/deal/<i>.html``: a product that *looks* static: the HTML has the
  ``<h1>`` and a ``p.price`` holding a placeholder (``0.00``); a script
  (``/shop/data/<i>.js``) loads the real price. A check for ``p.price``
  passes on the plain page, which is wrong: only comparing the results, or a
  check on the price's value, sees it.

Product ``i`` is an ``app`` page when ``i % 20 == 0``, a ``deal`` page when
``i % 20 == 10``, else an ``item`` page: one page in ten needs the browser.
With ``scripted_items`` set (``--scripted-items``, or the attribute, in a
test), the ``item`` pages keep their URLs but are rendered by a script, as the
``app`` pages are: the site has changed.

Images (``/shop/img/<i>.png``) and the data scripts are counted: ``/shop/stats``
gives the counts as JSON.

Run ``python -m scrapy_speedup.demo.jsshop --products 1000 --latency-ms 20``;
it prints ``listening on http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
from collections import Counter
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

__all__ = ["PER_LIST", "ShopResource", "expected_items", "kind_of", "main"]

reactor: Any = _reactor

PER_LIST = 20
_PATH = re.compile(rb"^/shop/(list|item|app|deal|img|data)/(\d+)\.(html|png|js)$")
# The smallest valid PNG (1x1, transparent).
_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)


def kind_of(product: int) -> str:
    if product % 20 == 0:
        return "app"
    return "deal" if product % 20 == 10 else "item"


def price_of(product: int) -> str:
    return f"{(product * 37) % 500 + 10}.{product % 100:02d}"


def expected_items(products: int) -> dict[str, dict[str, str]]:
    """The item of each product page, by URL path, as a spider that reads
    ``h1`` and ``p.price`` from the rendered page gets it."""
    return {
        f"/shop/{kind_of(i)}/{i}.html": {"title": f"Product {i}", "price": price_of(i)}
        for i in range(products)
    }


def _list_page(n: int, products: int) -> bytes | None:
    first = n * PER_LIST
    if first >= products:
        return None
    links = "".join(
        f'<li><a href="/shop/{kind_of(i)}/{i}.html">Product {i}</a></li>'
        for i in range(first, min(first + PER_LIST, products))
    )
    more = f'<a class="next" href="/shop/list/{n + 1}.html">next</a>' \
        if first + PER_LIST < products else ""
    return (f"<!DOCTYPE html><html><head><title>List {n}</title></head><body>"
            f"<ul class=\"products\">{links}</ul>{more}</body></html>").encode()


def _product_page(kind: str, i: int, scripted: bool = False) -> bytes:
    head = f"<!DOCTYPE html><html><head><title>Product {i}</title></head><body>"
    image = f'<img src="/shop/img/{i}.png" alt="">'
    if kind == "item" and not scripted:
        body = f'<h1>Product {i}</h1><p class="price">{price_of(i)}</p>{image}'
    elif kind in ("app", "item"):
        data = json.dumps({"title": f"Product {i}", "price": price_of(i)})
        body = (
            '<div id="app"></div><script>'
            f"const d = {data};"
            "const app = document.getElementById('app');"
            "const h = document.createElement('h1'); h.textContent = d.title;"
            "const p = document.createElement('p'); p.className = 'price';"
            "p.textContent = d.price; app.append(h, p);"
            f"</script>{image}"
        )
    else:  # deal: the markup is there, the price comes from a script
        body = (f'<h1>Product {i}</h1><p class="price">0.00</p>{image}'
                f'<script src="/shop/data/{i}.js"></script>')
    return f"{head}{body}</body></html>".encode()


class ShopResource(Resource):
    isLeaf = True  # noqa: N815 - Twisted's name

    def __init__(self, products: int, latency_s: float, scripted_items: bool = False) -> None:
        super().__init__()
        self.products = products
        self.latency_s = latency_s
        self.scripted_items = scripted_items
        #: Requests served, by kind ("list", "item", "app", "deal", "img", "data").
        self.served: Counter[str] = Counter()

    def _body(self, path: bytes) -> tuple[bytes, bytes] | None:
        if path == b"/shop/stats":
            return json.dumps(dict(self.served)).encode(), b"application/json"
        m = _PATH.match(path)
        if not m:
            return None
        kind, number = m[1].decode(), int(m[2])
        if kind == "list":
            page = _list_page(number, self.products)
            return None if page is None else (page, b"text/html; charset=utf-8")
        if number >= self.products:
            return None
        if kind == "img":
            return _PNG, b"image/png"
        if kind == "data":
            script = f"document.querySelector('p.price').textContent = '{price_of(number)}';"
            return script.encode(), b"application/javascript"
        if kind != kind_of(number):
            return None  # each product has one URL
        return _product_page(kind, number, self.scripted_items), b"text/html; charset=utf-8"

    def render_GET(self, request: Any) -> int:  # noqa: N802 - Twisted's name
        m = _PATH.match(request.path)
        if m:
            self.served[m[1].decode()] += 1
        reactor.callLater(self.latency_s, self._respond, request, self._body(request.path))
        return NOT_DONE_YET

    @staticmethod
    def _respond(request: Any, found: tuple[bytes, bytes] | None) -> None:
        if request.finished or request._disconnected:
            return
        if found is None:
            request.setResponseCode(404)
            found = (b"<html><body><h1>Not found</h1></body></html>", b"text/html")
        request.setHeader(b"content-type", found[1])
        request.write(found[0])
        request.finish()


def main(argv: list[str] | None = None) -> None:
    from scrapy_speedup.demo.site import serve

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--products", type=int, default=1000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--scripted-items", action="store_true")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)
    serve(ShopResource(args.products, args.latency_ms / 1000, args.scripted_items), args.port)


if __name__ == "__main__":
    main()
