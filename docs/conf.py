"""Sphinx configuration: ``make docs`` builds it with warnings as errors."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

project = "scrapy-speedup"
author = "The scrapy-speedup developers"
copyright = "2026, The scrapy-speedup developers"  # noqa: A001 - Sphinx's name

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
nitpicky = False
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = "scrapy-speedup"


def setup(app):  # noqa: ANN001, ANN201 - Sphinx's hook
    # ``.. setting:: NAME`` defines a setting and ``:setting:`NAME``` links to
    # it, as in Scrapy's own documentation.
    app.add_crossref_type("setting", "setting", indextemplate="pair: %s; setting")
    app.add_crossref_type("stat", "stat", indextemplate="pair: %s; stats key")
