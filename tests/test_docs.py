"""The README is a front door: short, every link resolves, every command it shows exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_MAX_BYTES = 12 * 1024
# [text](target): text may span lines; images too (![alt](target)).
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_BLOCK = re.compile(r"^```[a-z]*\n(.*?)^```", re.M | re.S)


def without_code(text: str) -> str:
    return CODE_BLOCK.sub("", re.sub(r"`[^`\n]*`", "", text))


def anchors(markdown: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", without_code(markdown.read_text(encoding="utf-8")), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def relative_links(markdown: Path) -> list[str]:
    return [target for target in LINK.findall(without_code(markdown.read_text(encoding="utf-8")))
            if not re.match(r"[a-z]+:", target)]


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail to docs/ (limit {README_MAX_BYTES})"


def test_every_relative_link_resolves():
    broken = []
    for markdown in [README, *DOCS]:
        for target in relative_links(markdown):
            path_part, _, anchor = target.partition("#")
            resolved = (markdown.parent / path_part).resolve() if path_part else markdown
            if not resolved.exists():
                broken.append(f"{markdown.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{markdown.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in relative_links(README)}
    orphans = [page.name for page in DOCS if page.resolve() not in linked]
    assert not orphans, f"docs pages the README does not link to: {orphans}"


def commands(text: str) -> list[list[str]]:
    """The commands of the code blocks of a markdown text (continuation lines joined, comments dropped)."""
    found = []
    for block in CODE_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            for command in line.split("#", 1)[0].split("&&"):
                if command.split():
                    found.append(command.split())
    return found


def entry_point(words: list[str]) -> Path | None:
    """The file a `bash X` / `python X` / `python -m X` command runs, relative to the project root."""
    if words[0] == "bash":
        return ROOT / words[1]
    if words[0] in ("python", "python3"):
        if words[1] == "-m":
            module = ROOT / words[2].replace(".", "/")
            return module.with_suffix(".py") if module.with_suffix(".py").exists() else module / "__main__.py"
        return ROOT / words[1]
    return None


def test_every_command_of_the_readme_exists():
    text = README.read_text(encoding="utf-8")
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert [entry_point(words) for words in commands(quick_start)] == [
        ROOT / "scripts/run_demo.sh", ROOT / "scripts/run_tests.sh"], "the quick start is exactly the two commands"
    missing = [" ".join(words) for words in commands(text)
               if (path := entry_point(words)) is not None and not path.is_file()]
    assert not missing, f"README commands whose script or module does not exist: {missing}"
