"""Docs that state facts about the code are held to the code."""
from __future__ import annotations

import re

from appliance.runtime import importdoc
from appliance.runtime.backend import IMPORT_SIGNATURES
from conftest import REPO


def test_the_host_import_table_in_the_architecture_page_is_the_codes():
    page = (REPO / "docs" / "architecture.md").read_text()
    start, end = page.index(importdoc.BEGIN), page.index(importdoc.END) + len(importdoc.END)
    assert page[start:end] == importdoc.render(), \
        "docs/architecture.md is stale: paste `python -m appliance.runtime.importdoc` between its markers"


def test_every_import_is_served_and_documented_for_module_authors():
    assert set(importdoc.served()) == {name for _, name in IMPORT_SIGNATURES}
    abi = (REPO / "modules" / "ABI.md").read_text()
    documented = set(re.findall(r"^\| `ap\.(\w+)` \|", abi, re.M))
    assert documented == {name for _, name in IMPORT_SIGNATURES}
