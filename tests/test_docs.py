"""README.md and docs/*.md cannot rot: every Python block runs, every relative link and #anchor resolves.

A page's Python blocks run in order in one namespace (a block may use what an earlier block of the same page
defined), in a temporary working directory. A block whose first line is ``# not runnable here: <reason>`` is only
compiled (its syntax is still checked); the reason must say what it needs (a GPU, torchrun, ...).
"""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
NOT_RUNNABLE = re.compile(r"#\s*not runnable here:\s*\S")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _ids(pages):
    return [str(p.relative_to(ROOT)) for p in pages]


def python_blocks(text):
    return [body for lang, body in FENCE.findall(text) if lang in ("python", "py")]


def prose(text):
    """The page without its fenced blocks (a `# comment` in a code block is no heading, a link in one no link)."""
    return FENCE.sub("", text)


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path):
    seen, result = {}, set()
    for heading in HEADING.findall(prose(path.read_text())):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def test_every_page_is_checked():
    assert len(PAGES) > 5 and all(p.exists() for p in PAGES)


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples save checkpoints and adapters
    torch.manual_seed(0)
    namespace = {"__name__": f"docs.{page.stem}"}
    threads = torch.get_num_threads()
    try:
        for i, block in enumerate(python_blocks(page.read_text())):
            code = compile(block, f"{page.name}, Python block {i + 1}", "exec")
            first_line = block.lstrip().splitlines()[0] if block.strip() else ""
            if NOT_RUNNABLE.match(first_line):
                continue
            exec(code, namespace)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_links_resolve(page):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no heading with anchor #{anchor} in {linked.name})")
    assert not broken, f"{page.name}: broken links: {broken}"


def test_slug_follows_github():
    assert slug("Protecting a model: `ff.EWC`") == "protecting-a-model-ffewc"
    assert slug("DDP and FSDP2") == "ddp-and-fsdp2"
    assert slug("The ops — `ewc_penalty`") == "the-ops--ewc_penalty"


def test_readme_is_a_front_page():
    """At most 300 lines: what fastforget is, the quick start, examples and headline figures; the rest in docs/."""
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 300, f"README.md has {lines} lines; move detail to docs/"
