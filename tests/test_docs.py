"""The README and docs/ stand on their own: every relative link resolves inside the repository, and nothing the
project ships points to a file outside it."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve_inside_the_repository(page):
    for target in LINK.findall(page.read_text()):
        if "://" in target or target.startswith("#") or target.startswith("mailto:"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"{page.name} links outside the repository: {target}"
        assert path.exists(), f"{page.name} links to a missing file: {target}"


def test_nothing_shipped_points_outside_the_repository():
    shipped = [*PAGES, *ROOT.glob("pc_lightning/**/*.py"), *ROOT.glob("conf/**/*.yaml"), *ROOT.glob("sweeps/*.yaml"),
               *ROOT.glob("bench/*.py"), *ROOT.glob("tests/*.py"), ROOT / "Makefile", ROOT / "pyproject.toml"]
    needle = "DESIGN" + ".md"  # spelled apart so this file does not match itself
    offenders = [str(p.relative_to(ROOT)) for p in shipped if p.is_file()
                 and (needle in p.read_text() or ".." + "/shared" in p.read_text())]
    assert not offenders, f"these files refer to a document outside the repository: {offenders}"
