"""The front door and the topic pages: every relative link (Markdown or HTML) names a file of the
tree, and every #anchor one of that page's headings (GitHub's anchor rule)."""

from __future__ import annotations

import re
from pathlib import Path

from launch_util import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("*/README.md"))]
PAGES += sorted((ROOT / "profiling" / "results").rglob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)|(?:src|href)=\"([^\"]+)\"")


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", page.read_text(), re.M)}


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    bad = []
    for m in LINK.finditer(page.read_text()):
        link = m.group(1) or m.group(2)
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        path, _, frag = link.partition("#")
        target = (root / path.lstrip("/")) if path.startswith("/") else (page.parent / path if path else page)
        if not target.exists():
            bad.append(f"{page.relative_to(root)}: {link}: no such file")
        elif frag and target.suffix == ".md" and frag not in anchors(target):
            bad.append(f"{page.relative_to(root)}: {link}: no such heading")
    return bad


def test_every_relative_link_and_anchor_of_the_docs_resolves():
    assert len(PAGES) > 10
    assert [bad for page in PAGES for bad in broken_links(page)] == []


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "README.md").write_text("# Front\n")
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Title\n[a](../README.md#front) [b](gone.md) [c](#title) [d](#nope) [e](https://x.org/y)\n"
    )
    assert broken_links(page, tmp_path) == [
        "docs/page.md: gone.md: no such file",
        "docs/page.md: #nope: no such heading",
    ]
