#!/usr/bin/env python
"""Assemble the site GitHub Pages publishes: the built book plus the student edition.

    python scripts/assemble_site.py _build/html student _build/site

Copies HTML_DIR (the book as scripts/build_book.sh built it) to OUT_DIR, then every notebook of
STUDENT_DIR (the student edition committed under student/, without the solutions) unchanged into
OUT_DIR/student/, and writes OUT_DIR/student/index.html, which lists them, each with a download
link and a link that opens it in Colab (from the repository named in _config.yml, as the
notebooks' own badges do). The how-to page links that index. .github/workflows/book.yml runs
this after the build and uploads OUT_DIR.

OUT_DIR must not exist or be empty. Bad input gets a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import html
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _nbio  # noqa: E402
import colab_badges  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STUDENT = colab_badges.STUDENT_DIR  # the folder name, in the repository and on the site


def title(nb: dict, fallback: str) -> str:
    """The notebook's first `# ` heading."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            for line in _nbio.text(cell.get("source")).split("\n"):
                if line.startswith("# "):
                    return line[2:].strip()
    return fallback


def index_page(entries: list[tuple[str, str, str]]) -> str:
    """The student edition's index: (file name, title, Colab address) per notebook."""
    rows = "\n".join(
        f'  <li><a href="{html.escape(name)}" download>{html.escape(name)}</a>: {html.escape(heading)}'
        f' (<a href="{html.escape(colab)}">open in Colab</a>)</li>'
        for name, heading, colab in entries
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>qtutor: the student edition</title>
</head>
<body>
<h1>The student edition</h1>
<p>The chapters of <a href="../index.html">the book</a> with every solution removed: the
exercises, the stubs to fill in and the checks stay. Download a notebook and run it in Jupyter
with <code>qtutor</code> installed (<a href="../book/how-to-read-and-run.html">how to read and run
this book</a> says how), or open it in Colab, where its first cell installs <code>qtutor</code>.</p>
<ul>
{rows}
</ul>
</body>
</html>
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html_dir", type=Path, help="the built book, e.g. _build/html")
    ap.add_argument("student_dir", type=Path, help="the student edition, e.g. student")
    ap.add_argument("out_dir", type=Path, help="the site to write, e.g. _build/site")
    args = ap.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"assemble_site: {msg}", file=sys.stderr)
        return 2

    if not (args.html_dir / "index.html").is_file():
        return fail(f"{args.html_dir} holds no index.html: build the book first (bash scripts/build_book.sh)")
    if (args.html_dir / STUDENT).exists():
        return fail(f"{args.html_dir} already has a {STUDENT}/ the edition would overwrite")
    notebooks = sorted(args.student_dir.glob("*.ipynb"))
    if not notebooks:
        return fail(f"no notebooks in {args.student_dir}")
    if args.out_dir.exists() and (not args.out_dir.is_dir() or any(args.out_dir.iterdir())):
        return fail(f"{args.out_dir} exists and is not an empty folder")

    url, branch, path_to_book = colab_badges.read_repository(ROOT / "_config.yml")
    shutil.copytree(args.html_dir, args.out_dir, dirs_exist_ok=True)
    out = args.out_dir / STUDENT
    out.mkdir()
    entries = []
    for path in notebooks:
        shutil.copyfile(path, out / path.name)  # byte for byte: the committed edition
        in_repo = "/".join(p for p in (path_to_book, STUDENT, path.name) if p)
        entries.append((path.name, title(_nbio.read(path), path.stem), colab_badges.colab_url(url, branch, in_repo)))
    (out / "index.html").write_text(index_page(entries), encoding="utf-8")
    print(f"assemble_site: {args.out_dir}: the book from {args.html_dir}, {len(entries)} student notebooks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
