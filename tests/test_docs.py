"""The README stays short and every link in the documentation leads somewhere: README.md has at
most README_MAX_LINES lines; every relative link and picture of README.md, docs/*.md and
reports/README.md names a file or folder of the repository, and every ``#anchor`` a heading
of the page it points into, by GitHub's rules. No pipeline run: well under a second.
(tests/test_pipeline_e2e.py runs the pages' ``<!-- runnable -->`` blocks.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250  # issue 24: a README a newcomer reads in ten minutes; the rest is in docs/
PAGES = ["README.md", "reports/README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto: ...: not a file of this repository


def prose(text: str) -> str:
    """``text`` without its fenced code blocks (a ``# comment`` there is no heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def anchors(page: str) -> set[str]:
    """The ``#anchor`` of every heading of ``page`` as GitHub makes them: the heading's text
    (link text, no backticks or asterisks), lower case, anything but letters, digits, ``_``,
    ``-`` and spaces dropped, spaces to ``-``; a repeated one gets ``-1``, ``-2``, ..."""
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?)\s*$", prose((REPO / page).read_text()), flags=re.M):
        text = re.sub(r"[`*]", "", re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading))
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def repository_paths() -> set[str]:
    """Every file git would put in a clone (tracked, or new and not ignored), and their folders."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    return set(files) | {str(parent) for name in files for parent in Path(name).parents if str(parent) != "."}


def links(page: str) -> list[str]:
    """The targets of ``page``'s links and pictures outside code (fenced or inline)."""
    return LINK.findall(re.sub(r"`[^`\n]*`", "", prose((REPO / page).read_text())))


def test_readme_is_short():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move a subject to docs/"


def test_the_readme_links_every_docs_page():
    """The README links every page of docs/, so none is found only by browsing."""
    readme = {target.split("#")[0] for target in links("README.md")}
    unlinked = [page for page in PAGES if page.startswith("docs/") and page not in readme]
    assert not unlinked, unlinked


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_and_anchor_resolves(page):
    paths = repository_paths()
    broken = []
    for target in links(page):
        if SCHEME.match(target):
            continue
        path, _, anchor = target.partition("#")
        resolved = ((REPO / page).parent / path if path else REPO / page).resolve()
        relative = resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else None
        if relative is None or str(relative) not in paths:
            broken.append(f"{target}: no such file in the repository")
        elif anchor and (relative.suffix != ".md" or anchor not in anchors(str(relative))):
            broken.append(f"{target}: no heading #{anchor} in {relative}")
    assert not broken, f"{page}: {broken}"


def test_anchor_rules_match_github():
    """The slugs GitHub gives headings of the kinds these pages use."""
    assert anchors("README.md") >= {"quick-start-two-commands", "the-papers-run", "generating-and-serving"}
    assert "gpu-memory-and-speed-measured" in anchors("docs/gpu.md")
    assert "the-mlflow-ui-fashiondiff-ui" in anchors("docs/mlflow-ui.md")  # backticks and colon dropped
