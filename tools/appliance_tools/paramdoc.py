"""The params tables in docs/modules/<module>.md, generated from each module's module.yaml.

    python -m appliance_tools.paramdoc          rewrite the tables (tests/test_docs.py holds them current)
"""
from __future__ import annotations

import sys

from appliance.config import params as schema
from appliance_tools.modbuild import DEFAULT_SRC_ROOT, REPO, load_manifest

DOCS = REPO / "docs" / "modules"
BEGIN = "<!-- params: generated from modules/src/{name}/module.yaml by `python -m appliance_tools.paramdoc`; do not edit -->"
END = "<!-- params: end -->"


def block(name: str) -> str:
    manifest = load_manifest(DEFAULT_SRC_ROOT / name).params
    if manifest is None:
        raise SystemExit(f"modules/src/{name}/module.yaml has no params")
    return f"{BEGIN.format(name=name)}\n\n{schema.table(manifest)}\n\n{END}"


def modules_with_pages() -> list[str]:
    return sorted(d.name for d in DEFAULT_SRC_ROOT.iterdir()
                  if (d / "module.yaml").is_file() and (DOCS / f"{d.name}.md").is_file())


def render(page: str, name: str) -> str:
    """The page with its params block replaced (or refused if the markers are missing)."""
    start = page.find(BEGIN.format(name=name))
    end = page.find(END, start)
    if start < 0 or end < 0:
        raise ValueError(f"docs/modules/{name}.md has no params markers")
    return page[:start] + block(name) + page[end + len(END):]


def main() -> int:
    for name in modules_with_pages():
        path = DOCS / f"{name}.md"
        new = render(path.read_text(), name)
        if new != path.read_text():
            path.write_text(new)
            print(f"updated {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
