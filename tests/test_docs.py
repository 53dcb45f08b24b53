"""The documents stay true to the code: the table of named views, the layout, the CLI, citations
and links that resolve inside the repository, and a site whose nav holds every page. No model is
loaded, and mkdocs is not needed (`make docs` runs its strict build)."""

import re
from pathlib import Path

import pytest

from dostream.cli.main import COMMANDS
from dostream.stream import AUTHORS, VIEWS

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
REFERENCE = ROOT / "docs" / "reference.md"
README = ROOT / "README.md"
STREAMS = ROOT / "docs" / "streams.md"
MKDOCS = ROOT / "mkdocs.yml"
PAGES = sorted((ROOT / "docs").rglob("*.md"))


def view_table(path: Path) -> dict[str, set[str]]:
    """The first Markdown table whose header starts `| view | supervised authors |`, as
    {name: authors}; the first two cells of a row hold backticked names."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(
        (i for i, line in enumerate(lines) if re.match(r"\|\s*view\s*\|\s*supervised authors\s*\|", line)), None
    )
    assert start is not None, f"{path.name}: no table with the header '| view | supervised authors | ...'"
    table: dict[str, set[str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.fullmatch(r"`([^`]+)`", cells[0])
        assert name, f"{path.name}: view table row without a `name` in its first cell: {line!r}"
        assert name.group(1) not in table, f"{path.name}: view {name.group(1)!r} listed twice"
        table[name.group(1)] = set(re.findall(r"`([^`]+)`", cells[1]))
    return table


@pytest.mark.parametrize("path", [DESIGN, STREAMS], ids=lambda p: p.name)
def test_view_table_matches_stream_views(path):
    table = view_table(path)
    missing = sorted(set(VIEWS) - set(table))
    assert not missing, f"{path.name}: views of stream.VIEWS missing from its table: {missing}"
    stale = sorted(set(table) - set(VIEWS))
    assert not stale, f"{path.name}: its view table lists names that stream.VIEWS does not have: {stale}"
    for name, authors in VIEWS.items():
        assert table[name] == set(authors), (
            f"{path.name}: view {name!r} lists {sorted(table[name])}, stream.VIEWS has {sorted(authors)}"
        )


def test_author_table_matches_vocabulary():
    text = DESIGN.read_text(encoding="utf-8")
    rows = re.findall(
        r"^\|\s*`([a-z]+)`\s*\|[^|\n]*\|\s*(masked|supervised)\s*\|\s*(masked|supervised)\s*\|$", text, re.M
    )
    assert [r[0] for r in rows] == list(AUTHORS), "docs/design.md: the author table is not stream.AUTHORS, in order"
    for author, interventional, observational in rows:
        assert (interventional == "supervised") == (author in VIEWS["interventional"]), author
        assert (observational == "supervised") == (author in VIEWS["observational"]), author


def test_every_subcommand_has_a_contract():
    text = DESIGN.read_text(encoding="utf-8")
    missing = [name for name in COMMANDS if f"`dostream {name} " not in text and f"`dostream {name}`" not in text]
    assert not missing, f"docs/design.md: no CLI contract for: {missing}"


def test_layout_names_existing_modules():
    text = DESIGN.read_text(encoding="utf-8")
    layout = text[text.index("## Layout") : text.index("\n## ", text.index("## Layout") + 1)]
    named = set(re.findall(r"`(dostream/[\w/]+\.py)`", layout))
    gone = sorted(p for p in named if not (ROOT / p).exists())
    assert not gone, f"docs/design.md's layout names modules that do not exist: {gone}"
    commands = {f"dostream/cli/{name}.py" for name in COMMANDS}
    unnamed = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "dostream").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
        and str(p.relative_to(ROOT)) not in named | commands
        and "__pycache__" not in p.parts
    )
    assert not unnamed, f"docs/design.md's layout does not describe: {unnamed}"


DOCS = [
    README,
    ROOT / "Makefile",
    *sorted((ROOT / "docs").rglob("*.md")),
    *sorted(p for top in ("dostream", "tests", "benchmarks", "examples") for p in (ROOT / top).rglob("*.py")),
]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_cite_nothing_outside_the_repository(path):
    text = path.read_text(encoding="utf-8")
    patterns = (r"\bDESIGN\.md", r"\bREFERENCE\.md", r"\bSTYLE\.md", r"\bseeds/", r"\.\./shared")
    if path.name == "test_docs.py":
        return  # the patterns themselves
    for pattern in patterns:
        hit = re.search(pattern, text)
        assert hit is None, f"{path.relative_to(ROOT)} cites {hit.group()!r}, which is not in the repository"


def test_reference_citations_resolve():
    sections = set(re.findall(r"^## (\d+)\. ", REFERENCE.read_text(encoding="utf-8"), re.M))
    files = [README] + [
        p
        for top in ("dostream", "tests", "benchmarks", "docs", "examples")
        for p in sorted((ROOT / top).rglob("*"))
        if p.suffix in (".py", ".md", ".jsonl")
    ]
    bad = []
    for path in files:
        for n in re.findall(r"reference\.md\)? §(\d+)", path.read_text(encoding="utf-8", errors="replace")):
            if n not in sections:
                bad.append(f"{path.relative_to(ROOT)}: §{n}")
    assert not bad, f"citations of docs/reference.md sections that do not exist: {bad}"


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_exist(path):
    text = path.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    broken = [t for t in links if "://" not in t and not (path.parent / t).exists()]
    assert not broken, f"{path.relative_to(ROOT)}: links to missing files: {broken}"
    if path.parent != ROOT:  # a site page: mkdocs resolves links to files under docs/ only
        outside = [t for t in links if "://" not in t and ROOT / "docs" not in (path.parent / t).resolve().parents]
        assert not outside, f"{path.relative_to(ROOT)}: links out of docs/ (write the path as code): {outside}"


def test_site_nav_holds_every_page():
    nav = set(re.findall(r":\s*\"?([\w./-]+\.md)\"?\s*$", MKDOCS.read_text(encoding="utf-8"), re.M))
    pages = {str(p.relative_to(ROOT / "docs")) for p in PAGES}
    assert not pages - nav, f"mkdocs.yml: pages in docs/ missing from the nav: {sorted(pages - nav)}"
    assert not nav - pages, f"mkdocs.yml: nav entries with no page in docs/: {sorted(nav - pages)}"


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move detail to a page under docs/"
    blocks = re.findall(r"```(?:bash|console)?\n(.*?)```", "\n".join(lines), re.S)
    used = {m for block in blocks for m in re.findall(r"^(?:\$ )?dostream ([a-z]+)", block, re.M)}
    unknown = sorted(used - set(COMMANDS))
    assert not unknown, f"README.md runs dostream subcommands that do not exist: {unknown}"
    assert {"import", "train", "serve", "streams"} <= used, "README.md: the tour import -> train -> serve -> learn"
