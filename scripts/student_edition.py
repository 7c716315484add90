#!/usr/bin/env python
"""Write the student edition of the chapters: the same notebooks with every solution removed.

    python scripts/student_edition.py chapters student           # rewrite the edition
    python scripts/student_edition.py chapters student --check   # exit 1 if it is out of date

The edition is committed in the repository under student/ (CI runs the --check), so that its
Colab badges can open it: in Colab the {exercise} and {solution} directives are plain text, and
a full chapter runs each solution cell right after the exercise's stub.

For each SRC_DIR/*.ipynb, writes OUT_DIR/<same name> with
* every sphinx-exercise solution removed from markdown cells: from an opening
  ```{solution} / :::{solution} fence (any fence length) to its closing fence;
* every gated solution removed: from a {solution-start} fence to its {solution-end} fence,
  including whole cells (code cells too) between them;
* every cell tagged `solution` removed;
* markdown cells left empty by the above dropped, all outputs and execution counts cleared,
  the notebook's language_info reduced to the language's name;
* the Colab badge line (scripts/colab_badges.py) rewritten to open the student notebook,
  student/<same name> in the repository named by _config.yml, and to say it is the student edition.
Exercises, hints, the stubs to fill in and the calls to `qtutor.checks` stay. Exits 1 if a notebook still mentions
a solution directive afterwards (an unclosed fence, say), so a broken edition is never written
silently.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _nbio  # noqa: E402
import colab_badges  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

OPEN_RE = re.compile(r"^\s{0,3}(?P<fence>`{3,}|:{3,})\s*\{(?P<name>solution(?:-start|-end)?)\}")


def _closes(line: str, fence: str) -> bool:
    """Whether `line` is a bare closing fence for an opening `fence` (CommonMark rule)."""
    s = line.strip()
    return bool(s) and set(s) == {fence[0]} and len(s) >= len(fence)


class Stripper:
    """Removes solutions from a sequence of cells; state carries across cells for gated ones."""

    def __init__(self) -> None:
        self.in_gated = False  # between {solution-start} and {solution-end}
        self.removed = 0

    def markdown(self, source: str) -> str:
        lines = source.split("\n")
        out: list[str] = []
        i = 0
        while i < len(lines):
            line = lines[i]
            m = OPEN_RE.match(line)
            if m is None:
                if not self.in_gated:
                    out.append(line)
                i += 1
                continue
            fence, name = m.group("fence"), m.group("name")
            # skip this directive, through its closing fence
            j = i + 1
            while j < len(lines) and not _closes(lines[j], fence):
                j += 1
            i = j + 1
            if name == "solution":
                if not self.in_gated:
                    self.removed += 1
            elif name == "solution-start":
                self.in_gated = True
                self.removed += 1
            else:  # solution-end
                self.in_gated = False
        text = "\n".join(out)
        return re.sub(r"\n{3,}", "\n\n", text).strip("\n")

    def notebook(self, nb: dict) -> dict:
        nb = copy.deepcopy(nb)
        cells = []
        for cell in nb.get("cells", []):
            tags = cell.get("metadata", {}).get("tags", [])
            if "solution" in tags:
                self.removed += 1
                continue
            if cell.get("cell_type") == "markdown":
                src = _nbio.text(cell.get("source"))
                if self.in_gated or any(OPEN_RE.match(line) for line in src.split("\n")):
                    new = self.markdown(src)
                    if not new.strip():
                        continue
                    cell["source"] = new
            elif self.in_gated:
                continue  # a code (or raw) cell inside a gated solution
            if cell.get("cell_type") == "code":
                cell["outputs"] = []
                cell["execution_count"] = None
                cell.get("metadata", {}).pop("execution", None)
            cells.append(cell)
        nb["cells"] = cells
        return nb


def student_notebook(path: Path, root: Path = ROOT) -> tuple[dict, int, list[int], bool]:
    """(the student edition of the chapter at ``path``, solutions removed, markdown cells that
    still open a solution directive, whether a gated solution was left open)."""
    stripper = Stripper()
    nb = stripper.notebook(_nbio.read(path))
    # running a chapter rewrites language_info with the local interpreter's details (version,
    # lexer): the edition keeps only the language, so it does not depend on who ran the chapter
    meta = nb.setdefault("metadata", {})
    meta["language_info"] = {"name": meta.get("language_info", {}).get("name", "python")}
    leftover = [
        i
        for i, c in enumerate(nb["cells"])
        if c.get("cell_type") == "markdown"
        and any(OPEN_RE.match(line) for line in _nbio.text(c.get("source")).split("\n"))
    ]
    url, branch, path_to_book = colab_badges.read_repository(root / "_config.yml")
    in_repo = "/".join(p for p in (path_to_book, colab_badges.STUDENT_DIR, path.name) if p)
    nb = colab_badges.update(nb, colab_badges.badge_line(url, branch, in_repo), f"git+{url}@{branch}")
    return nb, stripper.removed, leftover, stripper.in_gated


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="folder of chapter notebooks, e.g. chapters")
    ap.add_argument("out", type=Path, help="folder to write the student edition to, e.g. student")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if OUT is not the edition of SRC")
    ap.add_argument("--root", type=Path, default=ROOT, help="book root holding _config.yml (default: the repository)")
    args = ap.parse_args(argv)

    notebooks = sorted(args.src.glob("*.ipynb"))
    if not notebooks:
        print(f"student_edition: no notebooks in {args.src}")
        return 1
    if args.out.resolve() == args.src.resolve():
        print("student_edition: OUT_DIR must differ from SRC_DIR")
        return 1
    if not args.check:
        args.out.mkdir(parents=True, exist_ok=True)
    failures, stale, total = [], [], 0
    for path in notebooks:
        nb, removed, leftover, open_gate = student_notebook(path, args.root.resolve())
        if open_gate or leftover:
            failures.append(
                f"student_edition: {path}: solution not removed cleanly "
                f"(unclosed solution-start or fence; cells {leftover})"
            )
            continue
        target = args.out / path.name
        if args.check:
            if not target.is_file() or target.read_text(encoding="utf-8") != _nbio.dumps(nb):
                stale.append(path.name)
        else:
            _nbio.write(target, nb)
        total += removed
    extra = sorted({p.name for p in args.out.glob("*.ipynb")} - {p.name for p in notebooks})
    for line in failures:
        print(line)
    if args.check:
        if stale or extra:
            what = [f"{', '.join(stale)} out of date"] if stale else []
            what += [f"{', '.join(extra)} without a chapter"] if extra else []
            print(
                f"student_edition: {args.out} is not the edition of {args.src} ({'; '.join(what)}): "
                f"run python scripts/student_edition.py {args.src} {args.out}"
            )
            return 1
        if not failures:
            print(f"student_edition: {args.out} is the edition of {args.src} ({len(notebooks)} notebooks)")
        return 1 if failures else 0
    for name in extra:
        print(f"student_edition: {args.out / name} has no chapter in {args.src}: remove it")
    print(f"student_edition: {len(notebooks) - len(failures)} notebooks -> {args.out}, {total} solutions removed")
    return 1 if failures or extra else 0


if __name__ == "__main__":
    sys.exit(main())
