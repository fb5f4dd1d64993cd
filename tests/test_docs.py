"""README.md and docs/: every relative link resolves, and the README's test command is CI's.

Links and headings are read with markdown-it-py (locked through typer -> rich), so a link inside
a code span or fence is not taken for one, as a renderer would not.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from markdown_it import MarkdownIt
from markdown_it.token import Token

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted([ROOT / "README.md", *DOCS.glob("*.md")])


def _tokens(path: Path) -> list[Token]:
    return MarkdownIt("commonmark").enable("table").parse(path.read_text(encoding="utf-8"))


def _inline_children(tokens: list[Token]) -> list[Token]:
    return [child for t in tokens if t.type == "inline" for child in t.children or []]


def _slug(text: str) -> str:
    # GitHub's heading anchors: lowercase, punctuation but `-` and `_` dropped, spaces to `-`.
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    tokens = _tokens(path)
    seen: Counter[str] = Counter()
    anchors = set()
    for i, token in enumerate(tokens):
        if token.type != "heading_open":
            continue
        text = "".join(child.content for child in tokens[i + 1].children or [])
        slug = _slug(text)
        # A repeated heading gets -1, -2, ... as on GitHub.
        anchors.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return anchors


def _links(path: Path) -> list[str]:
    return [str(t.attrs["href"]) for t in _inline_children(_tokens(path)) if t.type == "link_open"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for href in _links(page):
        url = urlsplit(href)
        if url.scheme or url.netloc:
            continue  # external: not checked offline
        target = (page.parent / unquote(url.path)).resolve() if url.path else page
        if not target.exists():
            broken.append(f"{href}: no such file")
        elif url.fragment and target.suffix == ".md" and url.fragment not in _anchors(target):
            broken.append(f"{href}: no heading #{url.fragment} in {target.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_every_docs_page_is_in_the_index() -> None:
    index = {(DOCS / unquote(urlsplit(h).path)).resolve() for h in _links(DOCS / "README.md")}
    unlisted = [p.name for p in DOCS.glob("*.md") if p.name != "README.md" and p not in index]
    assert not unlisted, f"docs/README.md does not link {unlisted}"


def test_readme_test_command_is_what_ci_runs() -> None:
    tokens = _tokens(ROOT / "README.md")
    start = next(
        i
        for i, t in enumerate(tokens)
        if t.type == "inline" and t.content == "The two commands" and tokens[i - 1].tag == "h2"
    )
    section = []
    for token in tokens[start + 1 :]:
        if token.type == "heading_open" and token.tag == "h2":
            break
        section.append(token)
    fences = [t.content.strip() for t in section if t.type == "fence"]
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert fences, "README.md: no code block under 'The two commands'"
    assert fences[-1] == ci_lines[-1].strip()
