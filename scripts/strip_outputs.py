#!/usr/bin/env python
"""Strip outputs from notebooks in place: chapters are kept in git without outputs.

    python scripts/strip_outputs.py                 # chapters/*.ipynb
    python scripts/strip_outputs.py A.ipynb B.ipynb
    python scripts/strip_outputs.py --check         # exit 1 if any notebook has outputs

Clears every code cell's outputs and execution count, drops per-cell execution timing
metadata (`metadata.execution`, written by nbclient/JupyterLab) and the notebook-level
`widgets` state. Cell tags, the kernelspec and language_info are kept. Idempotent.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _nbio  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def strip(nb: dict) -> dict:
    nb = copy.deepcopy(nb)
    nb.get("metadata", {}).pop("widgets", None)
    for cell in nb.get("cells", []):
        meta = cell.get("metadata", {})
        meta.pop("execution", None)
        meta.pop("ExecuteTime", None)
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    return nb


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: chapters/*.ipynb")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if any has outputs")
    args = ap.parse_args(argv)

    notebooks = args.notebooks or sorted((ROOT / "chapters").glob("*.ipynb"))
    dirty = []
    for path in notebooks:
        nb = _nbio.read(path)
        new = strip(nb)
        if _nbio.same(nb, new):
            continue
        dirty.append(str(path))
        if not args.check:
            _nbio.write(path, new)
    if args.check and dirty:
        print(f"strip_outputs: notebooks with outputs (run python scripts/strip_outputs.py): {', '.join(dirty)}")
        return 1
    if not args.check:
        print(f"strip_outputs: {len(notebooks)} notebooks, {len(dirty)} stripped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
