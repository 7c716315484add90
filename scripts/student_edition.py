#!/usr/bin/env python
"""Write the student edition of the chapters: the same notebooks with every solution removed.

    python scripts/student_edition.py SRC_DIR OUT_DIR      # e.g. chapters student

For each SRC_DIR/*.ipynb, writes OUT_DIR/<same name> with
* every sphinx-exercise solution removed from markdown cells: from an opening
  ```{solution} / :::{solution} fence (any fence length) to its closing fence;
* every gated solution removed: from a {solution-start} fence to its {solution-end} fence,
  including whole cells (code cells too) between them;
* every cell tagged `solution` removed;
* markdown cells left empty by the above dropped, all outputs and execution counts cleared.
Exercises, hints and the calls to `qtutor.checks` stay. Exits 1 if a notebook still mentions
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="folder of chapter notebooks, e.g. chapters")
    ap.add_argument("out", type=Path, help="folder to write the student edition to")
    args = ap.parse_args(argv)

    notebooks = sorted(args.src.glob("*.ipynb"))
    if not notebooks:
        print(f"student_edition: no notebooks in {args.src}")
        return 1
    if args.out.resolve() == args.src.resolve():
        print("student_edition: OUT_DIR must differ from SRC_DIR")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    failures, total = [], 0
    for path in notebooks:
        stripper = Stripper()
        nb = stripper.notebook(_nbio.read(path))
        leftover = [
            i
            for i, c in enumerate(nb["cells"])
            if c.get("cell_type") == "markdown"
            and any(OPEN_RE.match(line) for line in _nbio.text(c.get("source")).split("\n"))
        ]
        if stripper.in_gated or leftover:
            failures.append(
                f"student_edition: {path}: solution not removed cleanly "
                f"(unclosed solution-start or fence; cells {leftover})"
            )
            continue
        _nbio.write(args.out / path.name, nb)
        total += stripper.removed
    for line in failures:
        print(line)
    print(f"student_edition: {len(notebooks) - len(failures)} notebooks -> {args.out}, {total} solutions removed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
