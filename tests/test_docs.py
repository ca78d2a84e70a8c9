"""Docs that state facts about the code are held to the code."""
from __future__ import annotations

import re

from appliance.runtime import importdoc
from appliance.runtime.engines import IMPORT_SIGNATURES
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


def test_the_params_tables_in_the_module_pages_are_the_manifests():
    from appliance_tools import paramdoc
    names = paramdoc.modules_with_pages()
    assert {"vibstats", "bearing", "process", "motion"} <= set(names)
    for name in names:
        page = (REPO / "docs" / "modules" / f"{name}.md").read_text()
        assert paramdoc.render(page, name) == page, \
            f"docs/modules/{name}.md is stale: python -m appliance_tools.paramdoc"


def test_the_map_in_the_architecture_page_is_the_repo():
    """Every folder of appliance/, hal/ and tools/, and every other folder two levels deep, is
    on the map, and the map has no folder the repo lacks."""
    import subprocess
    page = (REPO / "docs" / "architecture.md").read_text()
    block = page.split("<!-- tree:", 1)[1].split("```", 2)[1]
    stack, on_map = [], set()
    for line in block.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0].rstrip("/")
        stack[depth:] = [name]
        on_map.add("/".join(stack))
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    folders = set()
    for f in files:
        parts = f.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            folder = "/".join(parts[:i])
            if parts[0] in ("appliance", "hal", "tools") or i <= 2:
                folders.add(folder)
    skip = {f for f in folders if f.split("/")[0] in ("modules",) and f.count("/") == 2}   # src/<module>, models/<model>
    folders -= skip
    folders = {f for f in folders if not f.startswith("tests/hostile_modules/") and "__pycache__" not in f}
    assert on_map == folders, (sorted(on_map - folders), sorted(folders - on_map))


def test_no_code_touches_anothers_private_names():
    """Nothing outside a class uses its _private names, and nothing imports a module's _private
    functions (the house rule); only the standard library's own such names are allowed."""
    import ast
    allowed = {"_getframe", "_exit", "_replace", "_asdict", "_fields", "_make"}
    found = []
    for root in ("appliance", "hal", "tools", "benchmarks", "tests", "image", "requirements", ".ci"):
        for path in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                    owner = node.value
                    if isinstance(owner, ast.Name) and owner.id in ("self", "cls") or node.attr in allowed:
                        continue
                    if isinstance(owner, ast.Call) and getattr(owner.func, "id", "") == "super":
                        continue
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: .{node.attr}")
                elif isinstance(node, ast.ImportFrom):
                    found += [f"{path.relative_to(REPO)}:{node.lineno}: imports {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, "\n".join(found)


def test_nothing_outside_the_tests_imports_them():
    import re
    pattern = re.compile(r"^\s*(from|import)\s+(tests|conftest|support|broker|serialpeers)\b", re.M)
    for root in ("appliance", "hal", "tools", "benchmarks", "image", "requirements", ".ci"):
        for path in (REPO / root).rglob("*.py"):
            assert not pattern.search(path.read_text()), path
