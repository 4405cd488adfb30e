"""Regenerates the docs' benchmark tables from the results in bench/results/*.json (the figures are data; the docs
only show them).

A generated table sits between two markers in a Markdown file; the first names the results file and the table's
index in it (default 0):

    <!-- results: bench_ewc_penalty.json#0 -->
    ...generated: one line saying where and when it was measured, then the table...
    <!-- /results -->

    python bench/render_docs.py          # rewrite README.md and docs/*.md
    python bench/render_docs.py --check  # exit 1 if any generated table differs from its results (tests run this)
"""

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(
    r"(<!-- results: (?P<file>[\w.-]+\.json)(?:#(?P<index>\d+))? -->\n)(?P<body>.*?)(<!-- /results -->)", re.S
)


def caption(results: dict) -> str:
    where = results["machine"]["description"]
    command = f"; `{results['command']}`" if results.get("command") else ""
    return f"*{where}, torch {results['torch']}, {results['date']}{command}.*"


def markdown_table(table: dict) -> str:
    align = table.get("align") or ["---"] + ["---:"] * (len(table["headers"]) - 1)
    lines = [table["headers"], align, *table["rows"]]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def render(results: dict, index: int) -> str:
    return f"{caption(results)}\n\n{markdown_table(results['tables'][index])}\n"


def rendered_page(text: str) -> str:
    def block(match):
        results = json.loads((RESULTS / match["file"]).read_text())
        body = render(results, int(match["index"] or 0))
        return match[1] + body + match[5]

    return BLOCK.sub(block, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report pages whose tables differ from the results")
    args = parser.parse_args(argv)
    stale = []
    for page in PAGES:
        text = page.read_text()
        new = rendered_page(text)
        if new != text:
            stale.append(page.relative_to(ROOT))
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print(f"out of date with bench/results: {', '.join(map(str, stale))} (run python bench/render_docs.py)")
        return 1
    for page in stale:
        print(f"rewrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
