"""README.md and docs/*.md: every relative link leads to a file, and every #anchor to a heading of its page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+).+?\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def prose_lines(text: str) -> list[str]:
    """The lines of a Markdown text outside fenced code blocks, with inline code spans removed."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(CODE_SPAN.sub("", line))
    return lines


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text lower-cased, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor in a page; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    """The targets of the Markdown links and images of a page, outside code."""
    return [match.group(1) for line in prose_lines(page.read_text(encoding="utf-8")) for match in LINK.finditer(line)]


def dead_links(page: Path) -> list[str]:
    """The relative links of a page that lead nowhere: a missing file, or an anchor no heading of the target has."""
    dead = []
    for target in links(page):
        if not target or EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            dead.append(f"{target} (no such file)")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            dead.append(f"{target} (no heading #{anchor} in {destination.name})")
    return dead


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_no_dead_relative_links(page):
    assert dead_links(page) == [], f"{page.relative_to(ROOT)}: dead links"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(ROOT / "README.md")}
    unlinked = [page.name for page in PAGES[1:] if page.resolve() not in linked]
    assert unlinked == []


def test_the_readme_shows_the_gallery():
    assert "docs/gallery.png" in links(ROOT / "README.md")
    assert (ROOT / "docs" / "gallery.png").stat().st_size < 1_500_000


@pytest.mark.parametrize(
    "heading, anchor",
    [  # anchors as GitHub renders them for headings of these pages
        ("Measured latency (2-core CPU)", "measured-latency-2-core-cpu"),
        ("Targets: any score of the model's output", "targets-any-score-of-the-models-output"),
        ("Results: the paper's tables I–IV", "results-the-papers-tables-iiv"),
        ("The `fdcam` **server**", "the-fdcam-server"),
        ("Exact shortcuts in the switch passes", "exact-shortcuts-in-the-switch-passes"),
    ],
)
def test_slug_follows_github(heading, anchor):
    assert slug(heading) == anchor


def test_the_checker_finds_dead_links(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n", encoding="utf-8")
    (tmp_path / "page.md").write_text(
        "# Page\n\n## Here\n\n"
        "[ok](other.md) [ok](other.md#a-section) [ok](#here) [ok](https://example.com/x.md)\n"
        "[missing file](nowhere.md) [missing anchor](other.md#no-such) [missing here](#nowhere)\n"
        "![missing picture](pic.png) `[in code](gone.md)`\n\n```\n[in a fence](gone.md)\n```\n",
        encoding="utf-8",
    )
    assert dead_links(tmp_path / "page.md") == [
        "nowhere.md (no such file)",
        "other.md#no-such (no heading #no-such in other.md)",
        "#nowhere (no heading #nowhere in page.md)",
        "pic.png (no such file)",
    ]


def test_repeated_headings_get_numbered_anchors(tmp_path):
    (tmp_path / "page.md").write_text("# Title\n\n## Notes\n\n## Notes\n\n```\n# not a heading\n```\n")
    assert anchors(tmp_path / "page.md") == {"title", "notes", "notes-1"}
